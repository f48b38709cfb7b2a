//! `dart` (DART, EMNLP 2025, embedding-level "edge" variant): pick pivot tokens by the L1 norm
//! of their embeddings — the top image tokens plus, when the prompt's embeddings are given, the
//! top text tokens — then give each pivot an equal share of the remaining budget, filled with the
//! image tokens LEAST similar (cosine) to it. Keeps pivots and their least-duplicated tokens.

use ndarray::{ArrayView1, Axis};

use super::{normalized, top_k, Chosen, Method, Needs, Rows};
use crate::error::Result;

/// Registry entry ([`super::METHODS`]).
pub const SPEC: super::MethodSpec = super::MethodSpec {
    name: "dart",
    summary: "DART: L1-norm pivots (image + prompt), keep the tokens least similar to them",
    uses: "text",
    params: &[],
    acts: super::Acts::AfterEncoder,
    make: || Box::new(Dart::default()),
};

/// DART duplication-aware selection.
#[derive(Debug, Clone, Copy)]
pub struct Dart {
    /// Image pivots (paper: 4; capped by k).
    pub image_pivots: usize,
    /// Text pivots taken from the prompt embeddings (paper: 4; 0 disables).
    pub text_pivots: usize,
}

impl Default for Dart {
    fn default() -> Self {
        Dart { image_pivots: 4, text_pivots: 4 }
    }
}

fn l1(v: ArrayView1<'_, f32>) -> f32 {
    v.iter().map(|x| x.abs()).sum()
}

impl Method for Dart {
    fn name(&self) -> &'static str {
        "dart"
    }

    fn needs(&self) -> Needs {
        Needs { text: self.text_pivots > 0 }
    }

    fn choose(&self, rows: &Rows<'_>, k: usize) -> Result<Chosen> {
        let x = rows.features;
        let n = x.nrows();
        let norms = x.map_axis(Axis(1), l1);
        let image_pivots = top_k(norms.view(), self.image_pivots.min(k).max(1));
        let xn = normalized(x);
        let mut pivot_vecs: Vec<ndarray::Array1<f32>> = image_pivots.iter().map(|&i| xn.row(i).to_owned()).collect();
        if let (Some(text), true) = (rows.text, self.text_pivots > 0) {
            let tn = normalized(text);
            let tnorms = text.map_axis(Axis(1), l1);
            for t in top_k(tnorms.view(), self.text_pivots.min(text.nrows())) {
                pivot_vecs.push(tn.row(t).to_owned());
            }
        }
        let mut taken = vec![false; n];
        for &p in &image_pivots {
            taken[p] = true;
        }
        let remaining = k - image_pivots.len();
        let per = remaining / pivot_vecs.len();
        let extra = remaining % pivot_vecs.len();
        let mut kept = image_pivots.clone();
        for (pi, pv) in pivot_vecs.iter().enumerate() {
            let quota = per + usize::from(pi < extra);
            if quota == 0 {
                continue;
            }
            let sims = xn.dot(pv);
            let mut order: Vec<usize> = (0..n).filter(|&i| !taken[i]).collect();
            order.sort_by(|&a, &b| sims[a].total_cmp(&sims[b]).then(a.cmp(&b)));
            for &i in order.iter().take(quota) {
                taken[i] = true;
                kept.push(i);
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
    fn keeps_pivot_and_the_token_least_like_it() {
        // Token 0 has the largest L1 norm (pivot); token 3 is opposite to it; 1 and 2 duplicate it.
        let f = array![[3.0f32, 0.0], [1.0, 0.1], [1.0, -0.1], [-1.0, 0.0], [0.0, 1.0]];
        let r = rows(&f);
        let d = Dart { image_pivots: 1, text_pivots: 0 };
        assert_eq!(d.choose(&r, 2).unwrap().indices, vec![0, 3]);
        assert_eq!(d.choose(&r, 3).unwrap().indices, vec![0, 3, 4]);
    }

    #[test]
    fn text_pivots_steer_the_choice() {
        let f = array![[3.0f32, 0.0], [0.0, 1.0], [0.0, -1.0], [0.5, 0.5]];
        let text = array![[0.0f32, 1.0]];
        let mut r = rows(&f);
        r.text = Some(text.view());
        let d = Dart { image_pivots: 1, text_pivots: 1 };
        // The image pivot (token 0) takes a token orthogonal to it (1 and 2 tie; lower index wins);
        // the text pivot (0, 1) then takes the token least like it, 2, instead of the mixed 3.
        let c = d.choose(&r, 3).unwrap();
        assert_eq!(c.indices, vec![0, 1, 2]);
    }
}
