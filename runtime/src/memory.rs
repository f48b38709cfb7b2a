//! The memory budget, checked before any part is loaded: the chosen variants' bytes on disk
//! (external data included) times the measured peak-to-model ratio must fit in the budget
//! (`--max-memory`, else the cgroup limit or `MemAvailable`). An edge board then gets a message
//! naming the parts and what might fit, instead of an OOM kill halfway through loading.

use std::path::Path;

use crate::error::{Error, Result};
use crate::folder::{Dtype, ModelFolder, Part};

/// Peak resident memory per byte of model files: 1.7-2.3x measured while answering on the
/// real-size SmolVLM-256M shape with both backends (issue #20 figures); 2.0 as the estimate.
pub const PEAK_PER_MODEL_BYTE: f64 = 2.0;

/// Memory this process may use: `MemAvailable`, or less when a cgroup v2 limit is set (the limit
/// minus the working set, i.e. current use without reclaimable file cache, as the kubelet counts
/// it); with where the figure came from.
pub fn available() -> Option<(u64, &'static str)> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let info = read("/proc/meminfo");
    let mem_available = info.as_deref().and_then(|i| {
        let kb: u64 = i.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    });
    let cgroup = (|| {
        let max: u64 = read("/sys/fs/cgroup/memory.max")?.trim().parse().ok()?;
        let current: u64 = read("/sys/fs/cgroup/memory.current")?.trim().parse().ok()?;
        let stat = read("/sys/fs/cgroup/memory.stat").unwrap_or_default();
        let inactive_file: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("inactive_file "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Some(max.saturating_sub(current.saturating_sub(inactive_file)))
    })();
    match (cgroup, mem_available) {
        (Some(c), Some(m)) if c < m => Some((c, "the cgroup memory limit")),
        (_, Some(m)) => Some((m, "MemAvailable")),
        (Some(c), None) => Some((c, "the cgroup memory limit")),
        (None, None) => None,
    }
}

/// Bytes of one ONNX file and its external data files named after it (`<file>_data*`,
/// `<file>.data*`, the onnx-community and onnx naming); data under other names is not counted.
pub fn file_bytes(path: &Path) -> u64 {
    let mut total = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let f = e.file_name();
            let f = f.to_string_lossy();
            if f.starts_with(&format!("{name}_data")) || f.starts_with(&format!("{name}.data")) {
                total += std::fs::metadata(e.path()).map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

/// Checks the parts about to be loaded, plus `extra` files loaded beside them (a prompt
/// compressor: name and bytes), against `budget` (bytes), or against what the machine has free
/// when `budget` is `None`.
pub fn check(
    folder: &ModelFolder,
    parts: &[(Part, Dtype)],
    extra: &[(String, u64)],
    budget: Option<u64>,
) -> Result<()> {
    let (budget, source) = match budget {
        Some(b) => (b, "--max-memory"),
        None => match available() {
            Some(a) => a,
            None => return Ok(()),
        },
    };
    let sizes: Vec<(Part, Dtype, u64)> =
        parts.iter().map(|&(p, d)| (p, d, file_bytes(&folder.part_file(p, d)))).collect();
    let extra_bytes: u64 = extra.iter().map(|e| e.1).sum();
    let model: u64 = sizes.iter().map(|s| s.2).sum::<u64>() + extra_bytes;
    let needed = (model as f64 * PEAK_PER_MODEL_BYTE) as u64;
    if needed <= budget {
        return Ok(());
    }
    let mb =
        |b: u64| if b < 10_000_000 { format!("{:.2} MB", b as f64 / 1e6) } else { format!("{:.0} MB", b as f64 / 1e6) };
    let mut listed: Vec<String> = sizes.iter().map(|(p, d, b)| format!("{p} {d} {}", mb(*b))).collect();
    listed.extend(extra.iter().map(|(name, b)| format!("{name} {}", mb(*b))));
    let smaller: Vec<String> = [Dtype::Q4, Dtype::Int8, Dtype::Fp16]
        .into_iter()
        .filter_map(|d| {
            let bytes: Option<u64> = parts
                .iter()
                .map(|&(p, _)| folder.variants(p).contains(&d).then(|| file_bytes(&folder.part_file(p, d))))
                .sum();
            bytes
                .map(|b| b + extra_bytes)
                .filter(|b| (*b as f64 * PEAK_PER_MODEL_BYTE) as u64 <= budget)
                .map(|b| format!("--dtype {d} ({} of files)", mb(b)))
        })
        .collect();
    let hint = if smaller.is_empty() {
        "no smaller dtype variant in the folder fits".to_string()
    } else {
        format!("would fit: {}", smaller.join(", "))
    };
    Err(Error::MemoryBudget {
        needed,
        budget,
        limit_from: source.to_string(),
        detail: format!(
            "{} of model files ({}) x {PEAK_PER_MODEL_BYTE} measured peak ratio; {hint}",
            mb(model),
            listed.join(", ")
        ),
    })
}
