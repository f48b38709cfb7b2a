//! `uniform`: stride sampling in raster order — the cheapest spatially even baseline.

use super::{Chosen, Method, Rows};
use crate::error::Result;

/// Registry entry ([`super::METHODS`]).
pub const SPEC: super::MethodSpec = super::MethodSpec {
    name: "uniform",
    summary: "evenly strided tokens in raster order (baseline)",
    uses: "features only",
    params: &[],
    acts: super::Acts::AfterEncoder,
    make: || Box::new(Uniform),
};

/// Evenly strided selection.
#[derive(Debug, Default, Clone, Copy)]
pub struct Uniform;

/// `k` evenly spaced indices in `0..n` (centred in their strides).
pub fn strided(n: usize, k: usize) -> Vec<usize> {
    (0..k).map(|i| (((i as f64 + 0.5) * n as f64 / k as f64) as usize).min(n - 1)).collect()
}

impl Method for Uniform {
    fn name(&self) -> &'static str {
        "uniform"
    }

    fn choose(&self, rows: &Rows<'_>, k: usize) -> Result<Chosen> {
        Ok(Chosen::keep(strided(rows.features.nrows(), k)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stride_is_even_and_unique() {
        assert_eq!(strided(8, 4), vec![1, 3, 5, 7]);
        assert_eq!(strided(10, 3), vec![1, 5, 8]);
        for n in 1..50 {
            for k in 1..=n {
                let s = strided(n, k);
                assert!(s.windows(2).all(|w| w[0] < w[1]), "{n} {k}");
            }
        }
    }
}
