//! Device detection: which board, which CPU features, which GPU, and therefore which
//! [`Profile`] to use by default.
//!
//! Everything is read from files under a root directory so that tests can point it at fixture
//! trees: `<root>/proc/device-tree/model`, `<root>/etc/nv_tegra_release`, `<root>/proc/cpuinfo`
//! and `<root>/proc/driver/nvidia/gpus/*/information`. [`fn@detect`] uses `/` and replaces the
//! cpuinfo features by what the running CPU reports through `std::arch`.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::DetectError;
use crate::profile::{profiles, Profile};

/// Jetson Linux (L4T) release, from `/etc/nv_tegra_release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JetsonInfo {
    /// Major release, e.g. `36` for `# R36 (release), ...`.
    pub l4t_major: u32,
    /// The `REVISION:` value, e.g. `4.3`.
    pub revision: String,
    /// `BOARD:` value when present (`generic`, `t186ref`).
    pub board: Option<String>,
}

impl JetsonInfo {
    /// Full L4T version, e.g. `36.4.3`.
    pub fn l4t_version(&self) -> String {
        format!("{}.{}", self.l4t_major, self.revision)
    }

    /// Parses the first line of `nv_tegra_release`
    /// (`# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ...`).
    pub fn parse(text: &str) -> Option<JetsonInfo> {
        let line = text.lines().find(|l| l.trim_start().starts_with("# R"))?;
        let rest = line.trim_start().strip_prefix("# R")?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let l4t_major = digits.parse().ok()?;
        let field =
            |name: &str| line.split(',').find_map(|part| part.trim().strip_prefix(name).map(|v| v.trim().to_string()));
        let revision = field("REVISION:")?;
        Some(JetsonInfo { l4t_major, revision, board: field("BOARD:") })
    }
}

/// Whether a GPU shares memory with the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum GpuKind {
    /// On the SoC, sharing DRAM with the CPU (Jetson).
    Integrated,
    /// A PCIe card with its own memory.
    Discrete,
}

/// A GPU usable by an execution provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuInfo {
    /// Human-readable name.
    pub name: String,
    /// Integrated or discrete.
    pub kind: GpuKind,
    /// CUDA compute capability (`8.7` for Orin) when known.
    pub compute_capability: Option<String>,
}

/// What detection found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detected {
    /// Board name from the device tree (NUL-stripped), or cpuinfo's `Model:` line.
    pub device: Option<String>,
    /// Jetson Linux release, when `/etc/nv_tegra_release` exists.
    pub jetson: Option<JetsonInfo>,
    /// `x86_64`, `aarch64`, or `unknown` when cpuinfo could not tell.
    pub arch: String,
    /// CPU model (`model name` on x86, core name from `CPU part` on ARM).
    pub cpu_model: Option<String>,
    /// Logical CPUs.
    pub cpu_count: Option<usize>,
    /// CPU features as Rust target-feature names (`avx2`, `avx512f`, `neon`, `dotprod`, ...), in
    /// [`crate::profile::KNOWN_CPU_FEATURES`] order.
    pub cpu_features: Vec<String>,
    /// GPU usable for inference, if any.
    pub gpu: Option<GpuInfo>,
    /// Name of the profile [`Detected::choose_profile`] returns.
    pub recommended_profile: &'static str,
    /// Files that existed but could not be read (detection carried on without them).
    pub warnings: Vec<String>,
}

impl Detected {
    /// The built-in profile for this machine: the board's profile (Jetson Orin Nano/NX, AGX Orin,
    /// Raspberry Pi 5) or the best x86/aarch64 one, then down its `fallback` chain until the
    /// profile's architecture and required CPU features are met (ending at `generic`).
    pub fn choose_profile(&self) -> &'static Profile {
        let all = profiles();
        let start = self.board_profile();
        let mut cur = all.iter().find(|p| p.name == start);
        for _ in 0..all.len() {
            match cur {
                Some(p) if p.supports(&self.arch, &self.cpu_features) => return p,
                Some(p) => cur = p.fallback.as_deref().and_then(|f| all.iter().find(|q| q.name == f)),
                None => break,
            }
        }
        // `generic` requires nothing; the registry test guarantees it exists and is last.
        &all[all.len() - 1]
    }

    /// Whether a feature was detected.
    pub fn has(&self, feature: &str) -> bool {
        self.cpu_features.iter().any(|f| f == feature)
    }

    /// The profile detection starts from: the first whose `[detect]` board rules match the
    /// device, else the first `default_for_arch` profile for this architecture (`generic` last).
    fn board_profile(&self) -> &'static str {
        let device = self.device.as_deref().unwrap_or("");
        let all = profiles();
        let rules = |p: &&Profile| p.detect.clone().unwrap_or_default();
        all.iter()
            .find(|p| rules(p).matches_board(device, self.jetson.is_some()))
            .or_else(|| all.iter().find(|p| rules(p).default_for_arch && (p.arch == self.arch || p.arch == "any")))
            .map_or("generic", |p| p.name.as_str())
    }

    fn finish(mut self) -> Detected {
        self.recommended_profile = self.choose_profile().name.as_str();
        self
    }
}

impl fmt::Display for Detected {
    /// Multi-line human summary, as `glimpse targets` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_unknown = |v: Option<&str>| v.unwrap_or("unknown").to_string();
        writeln!(f, "device:    {}", or_unknown(self.device.as_deref()))?;
        if let Some(j) = &self.jetson {
            writeln!(f, "jetson:    L4T {}", j.l4t_version())?;
        }
        let count = self.cpu_count.map_or(String::new(), |n| format!(" x{n}"));
        writeln!(f, "cpu:       {} ({}){count}", or_unknown(self.cpu_model.as_deref()), self.arch)?;
        writeln!(
            f,
            "features:  {}",
            if self.cpu_features.is_empty() { "-".into() } else { self.cpu_features.join(" ") }
        )?;
        match &self.gpu {
            Some(g) => {
                let cc = g.compute_capability.as_deref().map_or(String::new(), |c| format!(", compute {c}"));
                writeln!(f, "gpu:       {} ({:?}{cc})", g.name, g.kind)?;
            }
            None => writeln!(f, "gpu:       none")?,
        }
        write!(f, "profile:   {}", self.recommended_profile)?;
        for w in &self.warnings {
            write!(f, "\nwarning:   {w}")?;
        }
        Ok(())
    }
}

/// Detects from the files under `root` only (no live CPU probing): for tests and for inspecting
/// another machine's `/proc` and `/etc` copies. Missing files are simply absent information.
pub fn detect_from_root(root: &Path) -> Result<Detected, DetectError> {
    if !root.is_dir() {
        return Err(DetectError::NotADirectory { path: root.to_path_buf() });
    }
    let mut warnings = Vec::new();
    let mut read = |rel: &str| -> Option<Vec<u8>> {
        let path = root.join(rel);
        match fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                warnings.push(format!("{}: {e}", path.display()));
                None
            }
        }
    };
    let dt_model = read("proc/device-tree/model").map(|b| clean_string(&b)).filter(|s| !s.is_empty());
    let jetson = read("etc/nv_tegra_release").and_then(|b| JetsonInfo::parse(&String::from_utf8_lossy(&b)));
    let cpuinfo = read("proc/cpuinfo").map(|b| CpuInfo::parse(&String::from_utf8_lossy(&b))).unwrap_or_default();
    let discrete = nvidia_discrete_gpu(&root.join("proc/driver/nvidia/gpus"), &mut warnings);

    let device = dt_model.or(cpuinfo.board_model.clone());
    let gpu = jetson_gpu(device.as_deref(), jetson.is_some()).or(discrete);
    let detected = Detected {
        device,
        jetson,
        arch: cpuinfo.arch.clone().unwrap_or_else(|| "unknown".to_string()),
        cpu_model: cpuinfo.model,
        cpu_count: cpuinfo.count,
        cpu_features: cpuinfo.features,
        gpu,
        recommended_profile: "generic",
        warnings,
    };
    Ok(detected.finish())
}

/// Detects the machine this process runs on: `/` for board, Jetson and GPU information, and the
/// running CPU's features from `std::arch` run-time detection (which also works where
/// `/proc/cpuinfo` is missing or describes another CPU, e.g. under qemu-user).
pub fn detect() -> Detected {
    let mut d = detect_from_root(Path::new("/")).unwrap_or_else(|_| Detected {
        device: None,
        jetson: None,
        arch: String::new(),
        cpu_model: None,
        cpu_count: None,
        cpu_features: Vec::new(),
        gpu: None,
        recommended_profile: "generic",
        warnings: vec!["/ is not a directory".to_string()],
    });
    let live = crate::cpu_features();
    if d.arch != "unknown" && d.arch != live.arch {
        // qemu-user shows the host's /proc/cpuinfo: its model and core count describe another CPU.
        d.warnings.push(format!(
            "/proc/cpuinfo describes a {} CPU but this process runs on {} (emulated?); using run-time detection",
            d.arch, live.arch
        ));
        d.cpu_model = None;
        d.cpu_count = None;
    }
    d.arch = live.arch.to_string();
    d.cpu_features = live.features.iter().map(|f| f.to_string()).collect();
    if d.cpu_count.is_none() {
        d.cpu_count = std::thread::available_parallelism().ok().map(|n| n.get());
    }
    d.finish()
}

/// Device-tree strings end with NUL (and may hold several NUL-separated entries): keep the first.
fn clean_string(bytes: &[u8]) -> String {
    let first = bytes.split(|&b| b == 0).next().unwrap_or(&[]);
    String::from_utf8_lossy(first).trim().to_string()
}

#[derive(Debug, Default)]
struct CpuInfo {
    arch: Option<String>,
    model: Option<String>,
    board_model: Option<String>,
    count: Option<usize>,
    features: Vec<String>,
}

/// cpuinfo flag → Rust target feature, x86 (`flags` line).
const X86_FLAGS: [(&str, &str); 12] = [
    ("sse4_1", "sse4.1"),
    ("avx", "avx"),
    ("avx2", "avx2"),
    ("fma", "fma"),
    ("f16c", "f16c"),
    ("avx512f", "avx512f"),
    ("avx512bw", "avx512bw"),
    ("avx512vl", "avx512vl"),
    ("avx512_vnni", "avx512vnni"),
    ("avx_vnni", "avxvnni"),
    ("avx512_bf16", "avx512bf16"),
    ("avx512_fp16", "avx512fp16"),
];

/// cpuinfo hwcaps → Rust target feature, aarch64 (`Features` line); all listed hwcaps required.
const ARM_FEATURES: [(&[&str], &str); 7] = [
    (&["asimd"], "neon"),
    (&["fphp", "asimdhp"], "fp16"),
    (&["asimddp"], "dotprod"),
    (&["i8mm"], "i8mm"),
    (&["bf16"], "bf16"),
    (&["sve"], "sve"),
    (&["sve2"], "sve2"),
];

/// Arm Ltd (`CPU implementer: 0x41`) core names by `CPU part`.
const ARM_PARTS: [(&str, &str); 12] = [
    ("0xd03", "Cortex-A53"),
    ("0xd04", "Cortex-A35"),
    ("0xd05", "Cortex-A55"),
    ("0xd07", "Cortex-A57"),
    ("0xd08", "Cortex-A72"),
    ("0xd09", "Cortex-A73"),
    ("0xd0b", "Cortex-A76"),
    ("0xd0c", "Neoverse-N1"),
    ("0xd40", "Neoverse-V1"),
    ("0xd41", "Cortex-A78"),
    ("0xd42", "Cortex-A78AE"),
    ("0xd4f", "Neoverse-V2"),
];

impl CpuInfo {
    fn parse(text: &str) -> CpuInfo {
        let mut info = CpuInfo::default();
        let mut count = 0;
        let (mut flags, mut hwcaps, mut implementer, mut part) = (None, None, None, None);
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else { continue };
            let (key, value) = (key.trim(), value.trim());
            match key {
                "processor" => count += 1,
                "flags" => {
                    flags.get_or_insert(value);
                }
                "Features" => {
                    hwcaps.get_or_insert(value);
                }
                "model name" if info.model.is_none() => info.model = Some(value.to_string()),
                "CPU implementer" => {
                    implementer.get_or_insert(value);
                }
                "CPU part" => {
                    part.get_or_insert(value);
                }
                "Model" => info.board_model = Some(value.to_string()),
                _ => {}
            }
        }
        info.count = (count > 0).then_some(count);
        if let Some(flags) = flags {
            info.arch = Some("x86_64".to_string());
            let have: Vec<&str> = flags.split_whitespace().collect();
            info.features =
                X86_FLAGS.iter().filter(|(flag, _)| have.contains(flag)).map(|(_, f)| f.to_string()).collect();
        } else if let Some(hwcaps) = hwcaps {
            info.arch = Some("aarch64".to_string());
            let have: Vec<&str> = hwcaps.split_whitespace().collect();
            info.features = ARM_FEATURES
                .iter()
                .filter(|(caps, _)| caps.iter().all(|c| have.contains(c)))
                .map(|(_, f)| f.to_string())
                .collect();
            if info.model.is_none() && implementer == Some("0x41") {
                info.model = part.and_then(|p| ARM_PARTS.iter().find(|(id, _)| *id == p)).map(|(_, n)| n.to_string());
            }
        }
        info
    }
}

fn jetson_gpu(device: Option<&str>, has_l4t: bool) -> Option<GpuInfo> {
    let device = device.unwrap_or("");
    if !(has_l4t || device.contains("Jetson")) {
        return None;
    }
    let (name, cc) = if device.contains("Orin") {
        ("NVIDIA Ampere iGPU (Orin)", Some("8.7"))
    } else if device.contains("Xavier") {
        ("NVIDIA Volta iGPU (Xavier)", Some("7.2"))
    } else if device.contains("Nano") || device.contains("TX1") {
        ("NVIDIA Maxwell iGPU (Tegra X1)", Some("5.3"))
    } else {
        ("NVIDIA Tegra iGPU", None)
    };
    Some(GpuInfo { name: name.to_string(), kind: GpuKind::Integrated, compute_capability: cc.map(str::to_string) })
}

/// First `Model:` from the NVIDIA driver's per-GPU information files.
fn nvidia_discrete_gpu(dir: &Path, warnings: &mut Vec<String>) -> Option<GpuInfo> {
    let entries = fs::read_dir(dir).ok()?;
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path().join("information")).collect();
    files.sort();
    files.iter().find_map(|file| match fs::read_to_string(file) {
        Ok(text) => text.lines().find_map(|l| l.strip_prefix("Model:")).map(|m| GpuInfo {
            name: m.trim().to_string(),
            kind: GpuKind::Discrete,
            compute_capability: None,
        }),
        Err(e) => {
            warnings.push(format!("{}: {e}", file.display()));
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jetson_release_line_parses() {
        let j = JetsonInfo::parse(
            "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n",
        )
        .unwrap();
        assert_eq!(j.l4t_version(), "36.4.3");
        assert_eq!(j.board.as_deref(), Some("generic"));
        assert_eq!(JetsonInfo::parse("garbage"), None);
        assert_eq!(JetsonInfo::parse("# Rxx (release), REVISION: 1.0"), None);
    }

    #[test]
    fn device_tree_strings_lose_their_nul() {
        assert_eq!(clean_string(b"Raspberry Pi 5 Model B Rev 1.0\0"), "Raspberry Pi 5 Model B Rev 1.0");
        assert_eq!(clean_string(b"a\0b\0"), "a");
        assert_eq!(clean_string(b""), "");
    }

    #[test]
    fn live_detection_matches_the_build_arch() {
        let d = detect();
        assert_eq!(d.arch, std::env::consts::ARCH);
        assert_eq!(d.recommended_profile, d.choose_profile().name);
        assert!(d.choose_profile().supports(&d.arch, &d.cpu_features));
    }
}
