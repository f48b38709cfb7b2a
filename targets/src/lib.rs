//! Glimpse targets: what the machine running Glimpse is and what it can do.
//!
//! - [`profile`]: per-device defaults (backend, execution providers, dtype per model part,
//!   threads, pruning budget) from embedded TOML files; [`Profile::choose_dtype`] backs
//!   `--dtype auto`.
//! - [`mod@detect`]: board / Jetson L4T / CPU features / GPU detection from `/proc` and `/etc`
//!   (testable against fixture trees) and the recommended [`Profile`].
//! - `hal` (feature `hal`): embedded-hal 1.0 adapters (busy indicator, trigger input,
//!   [`hal::IoLines`]) for robot apps; `gpio` (feature `gpio`, Linux): them on GPIO character
//!   devices.

pub mod detect;
pub mod error;
pub mod frame;
#[cfg(all(feature = "gpio", target_os = "linux"))]
pub mod gpio;
#[cfg(feature = "hal")]
pub mod hal;
pub mod part;
pub mod profile;

pub use detect::{detect, detect_from_root, Detected, GpuInfo, GpuKind, JetsonInfo};
pub use error::{DetectError, ProfileError};
pub use part::Part;
pub use profile::{profiles, ExecutionProvider, MemoryShare, Profile, Threads};

/// CPU features relevant to inference kernels, detected at run time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// Architecture name (`x86_64`, `aarch64`, ...).
    pub arch: &'static str,
    /// Detected feature names (Rust target-feature spelling), in a fixed order.
    pub features: Vec<&'static str>,
}

impl CpuFeatures {
    /// Whether a feature was detected.
    pub fn has(&self, name: &str) -> bool {
        self.features.contains(&name)
    }
}

/// Detects the running CPU's features with `std::arch` (not `/proc/cpuinfo`).
pub fn cpu_features() -> CpuFeatures {
    let mut features = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => { $( if std::arch::is_x86_feature_detected!($f) { features.push($f); } )* };
        }
        probe!(
            "sse4.1",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avxvnni",
            "avx512bf16",
            "avx512fp16"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => { $( if std::arch::is_aarch64_feature_detected!($f) { features.push($f); } )* };
        }
        probe!("neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2");
    }
    CpuFeatures { arch: std::env::consts::ARCH, features }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_reports_the_compile_target_arch() {
        let f = cpu_features();
        assert_eq!(f.arch, std::env::consts::ARCH);
        #[cfg(target_arch = "aarch64")]
        assert!(f.has("neon"), "every aarch64 Linux CPU has NEON");
        #[cfg(all(target_arch = "x86_64", target_feature = "sse4.1"))]
        assert!(f.has("sse4.1"));
    }

    #[test]
    fn live_features_use_the_profile_vocabulary() {
        for f in cpu_features().features {
            assert!(profile::KNOWN_CPU_FEATURES.contains(&f), "{f}");
        }
    }
}
