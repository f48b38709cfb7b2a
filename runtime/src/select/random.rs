//! `random`: a seeded uniform sample of k rows — the baseline every method must beat.

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;

use super::{Chosen, Method, Rows};
use crate::error::Result;

/// Registry entry ([`super::METHODS`]).
pub const SPEC: super::MethodSpec = super::MethodSpec {
    name: "random",
    summary: "seeded random subset (baseline)",
    uses: "features only",
    params: &["seed"],
    acts: super::Acts::AfterEncoder,
    make: || Box::new(Random),
};

/// Seeded random selection.
#[derive(Debug, Default, Clone, Copy)]
pub struct Random;

impl Method for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn choose(&self, rows: &Rows<'_>, k: usize) -> Result<Chosen> {
        let n = rows.features.nrows();
        // Mix the row count into the seed so views of a per-view selection differ.
        let mut rng = StdRng::seed_from_u64(rows.seed ^ (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Ok(Chosen::keep(sample(&mut rng, n, k).into_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn different_seeds_differ_same_seed_repeats() {
        let f = features(100, 4, 1);
        let mut r = rows(&f);
        let a = Random.choose(&r, 10).unwrap();
        assert_eq!(a, Random.choose(&r, 10).unwrap());
        r.seed = 8;
        assert_ne!(a, Random.choose(&r, 10).unwrap());
    }
}
