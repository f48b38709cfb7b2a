//! Glimpse targets: what the machine running Glimpse can do. For now, run-time CPU feature
//! detection; device profiles, GPU detection and SIMD kernels build on it.

/// CPU features relevant to inference kernels, detected at run time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// Architecture name (`x86_64`, `aarch64`, ...).
    pub arch: &'static str,
    /// Detected feature names, in a fixed order.
    pub features: Vec<&'static str>,
}

impl CpuFeatures {
    /// Whether a feature was detected.
    pub fn has(&self, name: &str) -> bool {
        self.features.contains(&name)
    }
}

/// Detects the running CPU's features.
pub fn cpu_features() -> CpuFeatures {
    let mut features = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => { $( if std::arch::is_x86_feature_detected!($f) { features.push($f); } )* };
        }
        probe!("sse4.1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni");
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => { $( if std::arch::is_aarch64_feature_detected!($f) { features.push($f); } )* };
        }
        probe!("neon", "fp16", "dotprod", "i8mm");
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
}
