//! `divprune` (DivPrune, CVPR 2025): diversity as a max-min (k-centre) problem on cosine
//! distance. The first token is the one farthest from its nearest neighbour; each next token
//! maximises its distance to the nearest already-kept token. A running minimum makes the
//! greedy loop O(kN·d) after one N×N similarity pass for the first pick.

use super::{argmax_free, normalized, Chosen, Method, Rows};
use crate::error::Result;

/// Registry entry ([`super::METHODS`]).
pub const SPEC: super::MethodSpec = super::MethodSpec {
    name: "divprune",
    summary: "DivPrune: max-min diversity (k-centre) on feature cosine",
    uses: "features only",
    params: &[],
    acts: super::Acts::AfterEncoder,
    make: || Box::new(DivPrune),
};

/// Max-min diversity selection.
#[derive(Debug, Default, Clone, Copy)]
pub struct DivPrune;

impl Method for DivPrune {
    fn name(&self) -> &'static str {
        "divprune"
    }

    fn choose(&self, rows: &Rows<'_>, k: usize) -> Result<Chosen> {
        let xn = normalized(rows.features);
        let n = xn.nrows();
        // First pick: argmax_j min_{i != j} (1 - cos_ij).
        let sims = xn.dot(&xn.t());
        let first = (0..n)
            .map(|j| {
                let max_sim = (0..n).filter(|&i| i != j).map(|i| sims[[i, j]]).fold(f32::MIN, f32::max);
                (j, 1.0 - max_sim)
            })
            .fold((0, f32::MIN), |best, (j, d)| if d > best.1 { (j, d) } else { best })
            .0;
        let mut taken = vec![false; n];
        taken[first] = true;
        let mut kept = vec![first];
        let mut min_dist: Vec<f32> = (0..n).map(|j| 1.0 - sims[[first, j]]).collect();
        while kept.len() < k {
            let Some(next) = argmax_free(&min_dist, &taken) else { break };
            taken[next] = true;
            kept.push(next);
            for j in 0..n {
                min_dist[j] = min_dist[j].min(1.0 - sims[[next, j]]);
            }
        }
        Ok(Chosen::keep(kept))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use ndarray::array;

    #[test]
    fn picks_one_per_cluster() {
        // Three tight clusters: around +x, +y and -x.
        let f = array![[1.0f32, 0.01], [1.0, -0.01], [0.01, 1.0], [-0.01, 1.0], [-1.0, 0.02], [-1.0, 0.0]];
        let c = DivPrune.choose(&rows(&f), 3).unwrap();
        let clusters: Vec<usize> = c.indices.iter().map(|i| i / 2).collect();
        assert_eq!(clusters, vec![0, 1, 2], "{:?}", c.indices);
    }
}
