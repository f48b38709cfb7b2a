//! `cdpruner` (CDPruner, NeurIPS 2025; OpenVINO GenAI variant): relevance of each visual token to
//! the instruction, measured with the language model's own embeddings of the prompt tokens, is
//! combined with feature similarity in a DPP kernel `L = λ·(r rᵀ)∘S + (1-λ)·S`, and k tokens are
//! chosen by fast greedy MAP inference (Chen et al. 2018): relevant and mutually diverse.

use ndarray::{Array1, Array2, Axis};

use super::{missing, normalized, Chosen, Method, Needs, Rows};
use crate::error::Result;

/// Registry entry ([`super::METHODS`]).
pub const SPEC: super::MethodSpec = super::MethodSpec {
    name: "cdpruner",
    summary: "CDPruner: greedy DPP over prompt relevance x feature similarity",
    uses: "text",
    params: &["lambda"],
    acts: super::Acts::AfterEncoder,
    make: || Box::new(CdPruner),
};

/// Conditional-DPP selection.
#[derive(Debug, Default, Clone, Copy)]
pub struct CdPruner;

/// Greedy MAP for a DPP with kernel `l` (symmetric PSD): picks up to `k` indices.
pub fn greedy_map(l: &Array2<f32>, k: usize, fallback_order: &[usize]) -> Vec<usize> {
    let n = l.nrows();
    let mut d2: Vec<f64> = (0..n).map(|i| l[[i, i]] as f64).collect();
    let mut c: Vec<Vec<f64>> = Vec::with_capacity(k);
    let mut taken = vec![false; n];
    let mut kept = Vec::with_capacity(k);
    while kept.len() < k {
        let mut j = None;
        for i in 0..n {
            if !taken[i] && j.is_none_or(|b: usize| d2[i] > d2[b]) {
                j = Some(i);
            }
        }
        let Some(j) = j else { break };
        if d2[j] <= 1e-10 {
            // The kernel is exhausted (rank deficient): fill by relevance order.
            for &i in fallback_order {
                if kept.len() == k {
                    break;
                }
                if !taken[i] {
                    taken[i] = true;
                    kept.push(i);
                }
            }
            break;
        }
        let dj = d2[j].sqrt();
        let e: Vec<f64> = (0..n)
            .map(|i| {
                let dot: f64 = c.iter().map(|ci| ci[j] * ci[i]).sum();
                (l[[j, i]] as f64 - dot) / dj
            })
            .collect();
        for i in 0..n {
            d2[i] -= e[i] * e[i];
        }
        c.push(e);
        taken[j] = true;
        kept.push(j);
    }
    kept
}

impl Method for CdPruner {
    fn name(&self) -> &'static str {
        "cdpruner"
    }

    fn needs(&self) -> Needs {
        Needs { text: true }
    }

    fn choose(&self, rows: &Rows<'_>, k: usize) -> Result<Chosen> {
        let text = rows.text.ok_or_else(|| {
            missing(
                "cdpruner",
                "text embeddings of the prompt",
                "run through the pipeline, which embeds the instruction with embed_tokens",
            )
        })?;
        let xn = normalized(rows.features);
        let tn = normalized(text);
        // Relevance: mean cosine to the instruction tokens, min-max normalised to [0, 1].
        let rel: Array1<f32> = xn.dot(&tn.t()).mean_axis(Axis(1)).unwrap_or_else(|| Array1::zeros(xn.nrows()));
        let (lo, hi) = rel.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let r = if hi > lo { rel.mapv(|v| (v - lo) / (hi - lo)) } else { Array1::ones(rel.len()) };
        let s = xn.dot(&xn.t());
        let lambda = rows.lambda.clamp(0.0, 1.0);
        let n = s.nrows();
        let l = Array2::from_shape_fn((n, n), |(i, j)| lambda * r[i] * r[j] * s[[i, j]] + (1.0 - lambda) * s[[i, j]]);
        let mut by_relevance: Vec<usize> = (0..n).collect();
        by_relevance.sort_by(|&a, &b| r[b].total_cmp(&r[a]).then(a.cmp(&b)));
        Ok(Chosen::keep(greedy_map(&l, k, &by_relevance)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use ndarray::array;

    #[test]
    fn map_prefers_diverse_items() {
        // Items 0 and 1 are duplicates; 2 is orthogonal.
        let l = array![[1.0f32, 0.99, 0.0], [0.99, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let mut got = greedy_map(&l, 2, &[0, 1, 2]);
        got.sort();
        assert!(got == vec![0, 2] || got == vec![1, 2], "{got:?}");
    }

    #[test]
    fn relevance_breaks_ties_toward_the_prompt() {
        // Four orthogonal tokens; the prompt looks like token 2.
        let f = array![[1.0f32, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]];
        let t = array![[0.0f32, 0.0, 1.0, 0.1]];
        let mut r = rows(&f);
        r.text = Some(t.view());
        r.lambda = 1.0;
        assert_eq!(CdPruner.choose(&r, 1).unwrap().indices, vec![2]);
    }
}
