//! Resident memory: probes (current, peak per window) that `glimpse profile` reports per part
//! and per stage, and the budget checked before any part is loaded. The estimate is built from
//! the chosen variants' bytes on disk (external data included) and the overheads measured per
//! part (docs/benchmarks.md, "Memory"); it must fit in `--max-memory`, else the cgroup limit or
//! `MemAvailable`. An edge board then gets a message naming the parts and what might fit,
//! instead of an OOM kill halfway through loading.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::folder::{Dtype, ModelFolder, Part};

/// The highest `VmHWM` seen before a [`reset_peak`]: the process peak survives the resets that
/// measure one step.
static PEAK_BEFORE_RESETS: AtomicU64 = AtomicU64::new(0);

fn status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident memory of this process now (Linux `VmRSS`), bytes; `None` off Linux.
pub fn rss_bytes() -> Option<u64> {
    status_kb("VmRSS:")
}

/// Peak resident memory of this process since the last [`reset_peak`] (Linux `VmHWM`), bytes.
pub fn peak_since_reset() -> Option<u64> {
    status_kb("VmHWM:")
}

/// Peak resident memory of this process since it started, resets included, bytes.
pub fn process_peak() -> Option<u64> {
    peak_since_reset().map(|p| p.max(PEAK_BEFORE_RESETS.load(Ordering::Relaxed)))
}

/// Starts a new peak window: the kernel's high-water mark drops to the current RSS (Linux
/// `clear_refs` 5), so the next [`peak_since_reset`] covers only what follows. `false` when the
/// kernel does not allow it (then peaks cover everything since the process started).
pub fn reset_peak() -> bool {
    if let Some(p) = peak_since_reset() {
        PEAK_BEFORE_RESETS.fetch_max(p, Ordering::Relaxed);
    }
    std::fs::write("/proc/self/clear_refs", b"5").is_ok()
}

/// Hands the heap pages that are free back to the OS (glibc `malloc_trim`). A model load frees
/// as much as it keeps (parsed messages, unpacked weights) in pieces below glibc's mmap
/// threshold, whose pages the allocator would otherwise keep resident for later allocations;
/// measured on the real-size SmolVLM-256M vision encoder with tract, that is 0.4 GB.
/// A no-op off glibc.
pub fn release_free() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What loading one ONNX file cost in resident memory.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoadMemory {
    /// The part or stage file's stem (`vision_encoder`, `vision_blocks_0`, `decoder_model_merged`).
    pub part: String,
    /// Bytes of the file and its external data.
    pub file_bytes: u64,
    /// Resident bytes the load added (RSS after minus before): what the loaded session keeps.
    pub kept_bytes: i64,
    /// Peak resident bytes during the load above the RSS before it: the load's transient cost
    /// (parsed copies, unpacked weights). `None` when peaks cannot be reset here.
    pub transient_bytes: Option<u64>,
    /// RSS after the load, bytes.
    pub rss_after: u64,
}

/// Runs `load` (one ONNX file) and measures what it cost; `None` off Linux.
pub fn measure_load<T>(part: &str, file: &Path, load: impl FnOnce() -> T) -> (T, Option<LoadMemory>) {
    let before = rss_bytes();
    let resettable = before.is_some() && reset_peak();
    let out = load();
    release_free();
    let (Some(before), Some(after)) = (before, rss_bytes()) else { return (out, None) };
    let transient = if resettable { peak_since_reset().map(|p| p.saturating_sub(before)) } else { None };
    let m = LoadMemory {
        part: part.to_string(),
        file_bytes: file_bytes(file),
        kept_bytes: after as i64 - before as i64,
        transient_bytes: transient,
        rss_after: after,
    };
    (out, Some(m))
}

/// Resident bytes a loaded part keeps per byte of its file: 1.04-1.07 measured on the real-size
/// SmolVLM-256M parts with both backends.
pub const KEPT_PER_BYTE: f64 = 1.1;

/// Peak resident bytes while a part loads, above what was resident before, per byte of its
/// file: tract holds unpacked and packed weights side by side during its codegen pass (up to
/// 1.68 measured), ONNX Runtime up to 1.25. The largest part, loaded last, sets the load peak.
pub const LOAD_PEAK_PER_BYTE: f64 = 1.75;

/// Working memory while answering (activations, KV cache, logits) per byte of the parts' fp32
/// variant: it follows the model's dimensions more than its dtype. Measured on the real-size
/// SmolVLM-256M and LLaVA-OneVision-0.5B shapes answering about an image, above the parts kept
/// (docs/benchmarks.md, "Memory"): tract up to 0.22 (SmolVLM-256M q4 and LLaVA-OneVision q4,
/// whose block-quantized products run on dequantized temporaries), ONNX Runtime up to 0.20 with
/// its shared arena (SmolVLM-256M q4); 0.3 leaves a margin for other images and thread counts.
pub const WORKING_PER_FP32_BYTE: f64 = 0.3;

/// The resident peak expected for parts of `sizes` bytes whose fp32 variants total
/// `fp32_bytes`: the larger of the load peak (every other part kept, the largest
/// loading) and the answering peak (every part kept, plus working memory).
pub fn estimate(sizes: &[u64], fp32_bytes: u64) -> u64 {
    let total: u64 = sizes.iter().sum();
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let load = KEPT_PER_BYTE * (total - largest) as f64 + LOAD_PEAK_PER_BYTE * largest as f64;
    let answer = KEPT_PER_BYTE * total as f64 + WORKING_PER_FP32_BYTE * fp32_bytes as f64;
    load.max(answer) as u64
}

/// Memory this process may use: `MemAvailable`, or less when a cgroup v2 limit is set (the limit
/// minus the working set, i.e. current use without reclaimable file cache, as the kubelet counts
/// it); with where the figure came from.
pub fn available() -> Option<(u64, &'static str)> {
    let cgroup = (|| {
        let max: u64 = read_sys("/sys/fs/cgroup/memory.max")?.trim().parse().ok()?;
        let current: u64 = read_sys("/sys/fs/cgroup/memory.current")?.trim().parse().ok()?;
        let stat = read_sys("/sys/fs/cgroup/memory.stat").unwrap_or_default();
        let inactive_file: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("inactive_file "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Some(max.saturating_sub(current.saturating_sub(inactive_file)))
    })();
    lower_of(cgroup, meminfo_bytes("MemAvailable"), "MemAvailable")
}

fn read_sys(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A `/proc/meminfo` field (`MemTotal`, `MemAvailable`) in bytes.
fn meminfo_bytes(key: &str) -> Option<u64> {
    let info = read_sys("/proc/meminfo")?;
    let value = info.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let kb: u64 = value.split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

/// The lower of a cgroup figure and a `/proc/meminfo` one (`name`), with where it came from.
fn lower_of(cgroup: Option<u64>, meminfo: Option<u64>, name: &'static str) -> Option<(u64, &'static str)> {
    match (cgroup, meminfo) {
        (Some(c), Some(m)) if c < m => Some((c, "the cgroup memory limit")),
        (_, Some(m)) => Some((m, name)),
        (Some(c), None) => Some((c, "the cgroup memory limit")),
        (None, None) => None,
    }
}

/// A memory budget and what set it, as the refusal names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryLimit {
    /// Bytes.
    pub bytes: u64,
    /// `--max-memory`, or the profile's share of the machine's memory.
    pub from: String,
}

/// The machine's memory: `MemTotal`, or the cgroup v2 limit when lower; with where the figure
/// came from.
pub fn total() -> Option<(u64, &'static str)> {
    let cgroup = read_sys("/sys/fs/cgroup/memory.max").and_then(|m| m.trim().parse::<u64>().ok());
    lower_of(cgroup, meminfo_bytes("MemTotal"), "MemTotal")
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
    budget: Option<&MemoryLimit>,
    backend: &str,
) -> Result<()> {
    let (budget, source) = match budget {
        Some(b) => (b.bytes, b.from.as_str()),
        None => match available() {
            Some(a) => a,
            None => return Ok(()),
        },
    };
    let sizes: Vec<(Part, Dtype, u64)> =
        parts.iter().map(|&(p, d)| (p, d, file_bytes(&folder.part_file(p, d)))).collect();
    let extra_bytes: u64 = extra.iter().map(|e| e.1).sum();
    // working memory follows the fp32 shape; a part without an fp32 file counts as its own size
    let fp32: u64 =
        sizes
            .iter()
            .map(|&(p, _, b)| {
                if folder.variants(p).contains(&Dtype::Fp32) {
                    file_bytes(&folder.part_file(p, Dtype::Fp32))
                } else {
                    b
                }
            })
            .sum::<u64>()
            + extra_bytes;
    let with_extra = |mut v: Vec<u64>| {
        v.extend(extra.iter().map(|e| e.1));
        v
    };
    let model: u64 = sizes.iter().map(|s| s.2).sum::<u64>() + extra_bytes;
    let needed = estimate(&with_extra(sizes.iter().map(|s| s.2).collect()), fp32);
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
            let bytes: Option<Vec<u64>> = parts
                .iter()
                .map(|&(p, _)| folder.variants(p).contains(&d).then(|| file_bytes(&folder.part_file(p, d))))
                .collect();
            let bytes = with_extra(bytes?);
            let need = estimate(&bytes, fp32);
            (need <= budget)
                .then(|| format!("--dtype {d} ({} of files, about {} resident)", mb(bytes.iter().sum()), mb(need)))
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
            "{} of model files ({}); estimated as the larger of the load peak (parts kept x {KEPT_PER_BYTE}, the largest loading x {LOAD_PEAK_PER_BYTE}) and the answering peak (parts kept plus {} x the fp32 size of working memory on {backend}); {hint}",
            mb(model),
            listed.join(", "),
            WORKING_PER_FP32_BYTE
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimate covers the peaks measured on the real-size shapes (docs/benchmarks.md,
    /// "Memory": `glimpse ask`, both backends, fp32 and q4, the worst of text-only and with an
    /// image, and of `glimpse profile`'s per-stage peaks), without asking for more than 2.5x any of
    /// them.
    #[test]
    fn the_estimate_covers_the_measured_peaks() {
        let mb = 1_000_000;
        let smol = 1_026_643_720;
        let (smol_fp32, smol_q4) =
            (vec![373_761_409, 113_541_375, 539_340_936], vec![63_229_973, 113_541_394, 85_254_120]);
        let ov = 4_119_562_935;
        let (ov_fp32, ov_q4) =
            (vec![1_597_793_439, 544_768_258, 1_977_001_238], vec![255_944_516, 544_768_277, 309_713_995]);
        // backend, parts' bytes, their fp32 bytes, measured worst peak (MB)
        for (backend, sizes, fp32, peak) in [
            ("tract", &smol_fp32, smol, 1334),
            ("tract", &smol_q4, smol, 510),
            ("ort", &smol_fp32, smol, 1266),
            ("ort", &smol_q4, smol, 498),
            ("tract", &ov_fp32, ov, 4595),
            ("tract", &ov_q4, ov, 2125),
            ("ort", &ov_fp32, ov, 4115),
            ("ort", &ov_q4, ov, 1115),
        ] {
            let e = estimate(sizes, fp32);
            let peak = peak * mb;
            // at most 2.5x: ONNX Runtime maps LLaVA-OneVision's 545 MB embedding table and reads
            // only the rows a prompt looks up, which the estimate counts as kept (2.2x there)
            assert!(e >= peak && (e as f64) < 2.5 * peak as f64, "{backend}: estimate {e} for a measured peak {peak}");
        }
    }
}
