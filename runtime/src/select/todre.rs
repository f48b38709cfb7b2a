//! `todre` (ToDRE stage 1, 2505.18757): start from a pivot — the token with the highest CLS
//! attention when the encoder exports it, else a seeded random token — then greedily add the
//! token with the smallest summed cosine similarity to everything kept (max-sum diversity).
//! Stage 2 (dropping all visual KV deep in the LLM) needs LLM internals and is not done here.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{normalized, Chosen, Method, Rows};
use crate::error::Result;

/// Registry entry ([`super::METHODS`]).
pub const SPEC: super::MethodSpec = super::MethodSpec {
    name: "todre",
    summary: "ToDRE: max-sum diversity from a CLS-attention (else seeded) pivot",
    uses: "features, cls_attention (optional)",
    params: &["seed"],
    acts: super::Acts::AfterEncoder,
    make: || Box::new(ToDre),
};

/// Max-sum diversity selection.
#[derive(Debug, Default, Clone, Copy)]
pub struct ToDre;

impl Method for ToDre {
    fn name(&self) -> &'static str {
        "todre"
    }

    fn choose(&self, rows: &Rows<'_>, k: usize) -> Result<Chosen> {
        let xn = normalized(rows.features);
        let n = xn.nrows();
        let pivot = match &rows.cls() {
            Some(cls) => crate::generate::argmax(cls.as_slice().unwrap_or(&cls.to_vec())),
            None => StdRng::seed_from_u64(rows.seed ^ n as u64).random_range(0..n),
        };
        let mut taken = vec![false; n];
        taken[pivot] = true;
        let mut kept = vec![pivot];
        let mut sum_sim = xn.dot(&xn.row(pivot));
        while kept.len() < k {
            let mut best: Option<usize> = None;
            for j in 0..n {
                if !taken[j] && best.is_none_or(|b| sum_sim[j] < sum_sim[b]) {
                    best = Some(j);
                }
            }
            let Some(next) = best else { break };
            taken[next] = true;
            kept.push(next);
            sum_sim += &xn.dot(&xn.row(next));
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
    fn starts_at_the_cls_pivot_then_goes_far() {
        let f = array![[1.0f32, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.0, 1.0]];
        let mut r = rows(&f);
        r.signals.insert("cls_attention", array![[0.0], [5.0], [0.0], [0.0]]);
        assert_eq!(ToDre.choose(&r, 2).unwrap().indices, vec![1, 2]);
    }
}
