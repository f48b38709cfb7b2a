//! Vector kernels for the token-selection stage (similarities between visual tokens, norms,
//! matrix-vector scores), with one implementation per instruction set chosen once at run time.
//!
//! The free functions ([`dot`], [`cosine`], [`l1_norm`], [`l2_norm`], [`dots`], [`dot_i8`]) use the
//! best path this CPU supports ([`active_isa`]); set `GLIMPSE_SIMD=scalar` (or any [`Isa`] name)
//! before the first call to force a path, or call through [`Kernels::for_isa`] explicitly.
//!
//! f32 reductions run in blocks of [`BLOCK`] elements: SIMD lanes within a block, f64 across
//! blocks, so every path stays within ~1e-6 relative of the others even on 600k-element inputs.

mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::error::SimdError;

/// Elements per f32 partial sum (see the module docs).
pub const BLOCK: usize = 1024;

/// An implementation path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, no explicit SIMD.
    Scalar,
    /// x86-64 AVX2 + FMA (256-bit).
    Avx2Fma,
    /// x86-64 AVX-512 F + BW (512-bit, masked tails).
    Avx512,
    /// aarch64 NEON (128-bit).
    Neon,
    /// aarch64 NEON with the `sdot` int8 dot-product instruction.
    NeonDotprod,
}

impl Isa {
    /// Every path, fastest first on its architecture.
    pub const ALL: [Isa; 5] = [Isa::Avx512, Isa::Avx2Fma, Isa::NeonDotprod, Isa::Neon, Isa::Scalar];

    /// Short name (`scalar`, `avx2`, `avx512`, `neon`, `neon-dotprod`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2Fma => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::NeonDotprod => "neon-dotprod",
        }
    }

    /// Whether the running CPU can execute this path.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDotprod => {
                std::arch::is_aarch64_feature_detected!("neon") && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Isa {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Isa::ALL.into_iter().find(|i| i.name() == s.trim().to_ascii_lowercase()).ok_or_else(|| {
            let names: Vec<_> = Isa::ALL.iter().map(|i| i.name()).collect();
            format!("unknown SIMD path `{s}` (known: {})", names.join(", "))
        })
    }
}

type F2 = fn(&[f32], &[f32]) -> f32;
type F1 = fn(&[f32]) -> f32;
type I2 = fn(&[i8], &[i8]) -> i32;

/// A table of kernels for one [`Isa`]. Cheap to copy; obtain one with [`Kernels::for_isa`],
/// [`Kernels::best`] or [`kernels`].
#[derive(Clone, Copy)]
pub struct Kernels {
    isa: Isa,
    dot_block: F2,
    sum_sq_block: F1,
    l1_block: F1,
    dot_i8: I2,
}

impl fmt::Debug for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernels").field("isa", &self.isa).finish()
    }
}

impl Kernels {
    /// The kernels for `isa`, or `None` when this CPU (or build target) cannot run it.
    pub fn for_isa(isa: Isa) -> Option<Kernels> {
        if !isa.is_supported() {
            return None;
        }
        // Each arm below is reached only when `is_supported` confirmed the CPU features that
        // the module's safe wrappers rely on.
        Some(match isa {
            Isa::Scalar => Kernels::scalar(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => Kernels {
                isa,
                dot_block: avx2::dot_block,
                sum_sq_block: avx2::sum_sq_block,
                l1_block: avx2::l1_block,
                dot_i8: avx2::dot_i8,
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Kernels {
                isa,
                dot_block: avx512::dot_block,
                sum_sq_block: avx512::sum_sq_block,
                l1_block: avx512::l1_block,
                dot_i8: avx512::dot_i8,
            },
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => Kernels {
                isa,
                dot_block: neon::dot_block,
                sum_sq_block: neon::sum_sq_block,
                l1_block: neon::l1_block,
                dot_i8: neon::dot_i8,
            },
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDotprod => Kernels {
                isa,
                dot_block: neon::dot_block,
                sum_sq_block: neon::sum_sq_block,
                l1_block: neon::l1_block,
                dot_i8: neon::dot_i8_sdot,
            },
            #[allow(unreachable_patterns)]
            _ => return None,
        })
    }

    /// The fastest path this CPU supports.
    pub fn best() -> Kernels {
        Isa::ALL.into_iter().find_map(Kernels::for_isa).unwrap_or_else(Kernels::scalar)
    }

    /// The portable path (always available).
    pub fn scalar() -> Kernels {
        Kernels {
            isa: Isa::Scalar,
            dot_block: scalar::dot_block,
            sum_sq_block: scalar::sum_sq_block,
            l1_block: scalar::l1_block,
            dot_i8: scalar::dot_i8,
        }
    }

    /// Which path these kernels use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Dot product `Σ aᵢbᵢ`.
    ///
    /// # Panics
    /// If `a.len() != b.len()` (a caller bug: both come from the same hidden size).
    pub fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot: length mismatch");
        if a.len() <= BLOCK {
            return (self.dot_block)(a, b);
        }
        a.chunks(BLOCK).zip(b.chunks(BLOCK)).map(|(x, y)| f64::from((self.dot_block)(x, y))).sum::<f64>() as f32
    }

    /// Euclidean norm `sqrt(Σ aᵢ²)`.
    pub fn l2_norm(&self, a: &[f32]) -> f32 {
        self.sum_sq(a).sqrt()
    }

    /// Sum of absolute values `Σ |aᵢ|`.
    pub fn l1_norm(&self, a: &[f32]) -> f32 {
        if a.len() <= BLOCK {
            return (self.l1_block)(a);
        }
        a.chunks(BLOCK).map(|x| f64::from((self.l1_block)(x))).sum::<f64>() as f32
    }

    /// Cosine similarity `a·b / (|a| |b|)`; 0 when either vector is all zeros.
    ///
    /// # Panics
    /// If `a.len() != b.len()`.
    pub fn cosine(&self, a: &[f32], b: &[f32]) -> f32 {
        let ab = self.dot(a, b);
        let denom = (f64::from(self.sum_sq(a)) * f64::from(self.sum_sq(b))).sqrt();
        if denom > 0.0 {
            (f64::from(ab) / denom) as f32
        } else {
            0.0
        }
    }

    /// `out[r] = matrix[r*cols..(r+1)*cols] · vector` for a row-major `matrix` with
    /// `out.len()` rows and `vector.len()` columns (e.g. every visual token against a query).
    pub fn dots(&self, matrix: &[f32], vector: &[f32], out: &mut [f32]) -> Result<(), SimdError> {
        let (rows, cols) = (out.len(), vector.len());
        if rows.checked_mul(cols) != Some(matrix.len()) {
            return Err(SimdError::Shape { matrix_len: matrix.len(), rows, cols });
        }
        if cols == 0 {
            out.fill(0.0);
            return Ok(());
        }
        for (o, row) in out.iter_mut().zip(matrix.chunks_exact(cols)) {
            *o = self.dot(row, vector);
        }
        Ok(())
    }

    /// Exact int8 dot product with i32 accumulation (wraps only past 131,072 elements of ±128).
    ///
    /// # Panics
    /// If `a.len() != b.len()`.
    pub fn dot_i8(&self, a: &[i8], b: &[i8]) -> i32 {
        assert_eq!(a.len(), b.len(), "dot_i8: length mismatch");
        (self.dot_i8)(a, b)
    }

    fn sum_sq(&self, a: &[f32]) -> f32 {
        if a.len() <= BLOCK {
            return (self.sum_sq_block)(a);
        }
        a.chunks(BLOCK).map(|x| f64::from((self.sum_sq_block)(x))).sum::<f64>() as f32
    }
}

/// Paths the running CPU supports, fastest first (always ends with [`Isa::Scalar`]).
pub fn available_isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
}

/// The process-wide kernels: chosen on first use from `GLIMPSE_SIMD` (when it names a supported
/// path) or [`Kernels::best`], then cached.
pub fn kernels() -> &'static Kernels {
    static ACTIVE: OnceLock<Kernels> = OnceLock::new();
    ACTIVE.get_or_init(|| {
        std::env::var("GLIMPSE_SIMD")
            .ok()
            .and_then(|v| v.parse::<Isa>().ok())
            .and_then(Kernels::for_isa)
            .unwrap_or_else(Kernels::best)
    })
}

/// The path the free functions use.
pub fn active_isa() -> Isa {
    kernels().isa()
}

/// [`Kernels::dot`] on the active path.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    kernels().dot(a, b)
}

/// [`Kernels::cosine`] on the active path.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    kernels().cosine(a, b)
}

/// [`Kernels::l1_norm`] on the active path.
pub fn l1_norm(a: &[f32]) -> f32 {
    kernels().l1_norm(a)
}

/// [`Kernels::l2_norm`] on the active path.
pub fn l2_norm(a: &[f32]) -> f32 {
    kernels().l2_norm(a)
}

/// [`Kernels::dots`] on the active path.
pub fn dots(matrix: &[f32], vector: &[f32], out: &mut [f32]) -> Result<(), SimdError> {
    kernels().dots(matrix, vector, out)
}

/// [`Kernels::dot_i8`] on the active path.
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    kernels().dot_i8(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic generator (xorshift64*), so the crate needs no `rand`.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn f32(&mut self, signed: bool) -> f32 {
            let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
            if signed {
                2.0 * u - 1.0
            } else {
                u
            }
        }
        fn vec(&mut self, n: usize, signed: bool) -> Vec<f32> {
            (0..n).map(|_| self.f32(signed)).collect()
        }
        fn i8s(&mut self, n: usize) -> Vec<i8> {
            (0..n).map(|_| (self.next() >> 56) as u8 as i8).collect()
        }
    }

    const LENGTHS: [usize; 13] = [0, 1, 3, 7, 8, 15, 16, 17, 33, 100, 1023, 4097, 1088 * 576];

    fn close(got: f32, want: f32, scale: f64, what: &str) {
        let err = (f64::from(got) - f64::from(want)).abs();
        assert!(err <= 1e-5 * scale.max(f64::MIN_POSITIVE), "{what}: got {got}, want {want} (scale {scale})");
    }

    #[test]
    fn every_path_matches_scalar() {
        let scalar = Kernels::scalar();
        let isas = available_isas();
        assert_eq!(isas.last(), Some(&Isa::Scalar));
        eprintln!("SIMD paths tested here: {isas:?}; active: {}", active_isa());
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for &n in &LENGTHS {
            for signed in [false, true] {
                // One extra element so the slices can start one f32 past the allocation start.
                let (a_buf, b_buf) = (rng.vec(n + 1, signed), rng.vec(n + 1, signed));
                for offset in [0, 1] {
                    let (a, b) = (&a_buf[offset..offset + n], &b_buf[offset..offset + n]);
                    let abs_dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x * y).abs()).sum();
                    let abs_sum: f64 = a.iter().map(|x| f64::from(x.abs())).sum();
                    let exact: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
                    close(scalar.dot(a, b), exact as f32, abs_dot, &format!("scalar dot n={n}"));
                    for &isa in &isas {
                        let k = Kernels::for_isa(isa).unwrap();
                        let what = format!("{isa} n={n} signed={signed} offset={offset}");
                        close(k.dot(a, b), scalar.dot(a, b), abs_dot, &format!("dot {what}"));
                        close(k.l1_norm(a), scalar.l1_norm(a), abs_sum, &format!("l1 {what}"));
                        close(k.l2_norm(a), scalar.l2_norm(a), f64::from(scalar.l2_norm(a)), &format!("l2 {what}"));
                        close(k.cosine(a, b), scalar.cosine(a, b), 1.0, &format!("cosine {what}"));
                    }
                }
            }
            let (a, b) = (rng.i8s(n + 1), rng.i8s(n + 1));
            for offset in [0, 1] {
                let (a, b) = (&a[offset..offset + n], &b[offset..offset + n]);
                let want = scalar.dot_i8(a, b);
                for &isa in &isas {
                    assert_eq!(Kernels::for_isa(isa).unwrap().dot_i8(a, b), want, "dot_i8 {isa} n={n}");
                }
            }
        }
    }

    #[test]
    fn dot_i8_extremes_are_exact() {
        for &n in &[16usize, 31, 64, 4096, 131_071] {
            let a = vec![-128i8; n];
            let b = vec![-128i8; n];
            let c = vec![127i8; n];
            for isa in available_isas() {
                let k = Kernels::for_isa(isa).unwrap();
                assert_eq!(k.dot_i8(&a, &b), 16384 * n as i32, "{isa} n={n}");
                assert_eq!(k.dot_i8(&a, &c), -16256 * n as i32, "{isa} n={n}");
            }
        }
    }

    #[test]
    fn dots_is_rowwise_dot_and_checks_shapes() {
        let mut rng = Rng(7);
        let (rows, cols) = (37, 576);
        let m = rng.vec(rows * cols, true);
        let v = rng.vec(cols, true);
        for isa in available_isas() {
            let k = Kernels::for_isa(isa).unwrap();
            let mut out = vec![0.0; rows];
            k.dots(&m, &v, &mut out).unwrap();
            for (r, o) in out.iter().enumerate() {
                assert_eq!(*o, k.dot(&m[r * cols..(r + 1) * cols], &v));
            }
            let mut short = vec![0.0; rows - 1];
            assert_eq!(
                k.dots(&m, &v, &mut short),
                Err(SimdError::Shape { matrix_len: rows * cols, rows: rows - 1, cols })
            );
            let mut none: Vec<f32> = Vec::new();
            assert!(k.dots(&[], &v, &mut none).is_ok());
        }
    }

    #[test]
    fn cosine_edge_cases() {
        assert_eq!(cosine(&[0.0; 5], &[1.0; 5]), 0.0);
        assert!((cosine(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 1.0).abs() < 1e-6);
        assert!((cosine(&[1.0, 0.0], &[0.0, 1.0])).abs() < 1e-7);
        assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(l1_norm(&[-3.0, 4.0]), 7.0);
        assert_eq!(dot(&[], &[]), 0.0);
    }

    #[test]
    fn best_path_is_used_and_forced_scalar_works() {
        assert!(available_isas().contains(&active_isa()));
        assert_eq!(Kernels::for_isa(Isa::Scalar).map(|k| k.isa()), Some(Isa::Scalar));
        assert_eq!("neon-dotprod".parse::<Isa>(), Ok(Isa::NeonDotprod));
        assert!("sse9".parse::<Isa>().is_err());
        #[cfg(target_arch = "x86_64")]
        assert!(Kernels::for_isa(Isa::Neon).is_none());
        #[cfg(target_arch = "aarch64")]
        assert!(Kernels::for_isa(Isa::Avx2Fma).is_none() && Kernels::for_isa(Isa::Neon).is_some());
    }
}
