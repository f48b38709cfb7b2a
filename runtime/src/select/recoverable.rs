//! `recoverable` (Recoverable Compression, Chen et al., AAAI 2025): two views of importance pick
//! the kept set, and nothing is simply thrown away.
//!
//! 1. Visual importance: the CLS token's attention at layer -2 (attention received for encoders
//!    without CLS). Text relevance: mean cosine of each token with the prompt's embeddings (the
//!    paper uses CLIP's text tower; Glimpse's features live in the language model's space, so its
//!    own token embeddings play that part, as in CDPruner and DART here).
//! 2. Keep counts from outliers: the paper keeps the outliers of each score; with Glimpse's fixed
//!    budget `k`, the outlier counts (`> Q3 + 1.5·IQR`) split `k` between the two scores.
//! 3. The union — top visual tokens, then the most relevant of the rest — stays in raster order.
//! 4. Every dropped token is merged into its most similar kept token (key cosine, else feature
//!    cosine), PruMerge-style: a kept token becomes the attention-weighted mean of itself and
//!    the tokens assigned to it.

use ndarray::{Array1, Axis};

use super::{missing, normalized, top_k, Chosen, Method, Needs, Rows};
use crate::error::Result;

/// Registry entry ([`super::METHODS`]).
pub const SPEC: super::MethodSpec = super::MethodSpec {
    name: "recoverable",
    summary: "Recoverable Compression: CLS attention + prompt relevance pick, the rest merged in",
    uses: "cls_attention | attention_received, text, keys (optional)",
    params: &[],
    acts: super::Acts::AfterEncoder,
    make: || Box::new(Recoverable),
};

/// Visual + text-guided selection with merging of the dropped tokens.
#[derive(Debug, Default, Clone, Copy)]
pub struct Recoverable;

/// Number of upper outliers (`> Q3 + 1.5·IQR`, quartiles by linear interpolation).
pub fn upper_outliers(v: &Array1<f32>) -> usize {
    let mut s: Vec<f32> = v.to_vec();
    if s.len() < 4 {
        return 0;
    }
    s.sort_by(f32::total_cmp);
    let q = |p: f32| {
        let x = p * (s.len() - 1) as f32;
        let (lo, frac) = (x.floor() as usize, x.fract());
        s[lo] + (s[(lo + 1).min(s.len() - 1)] - s[lo]) * frac
    };
    let (q1, q3) = (q(0.25), q(0.75));
    let fence = q3 + 1.5 * (q3 - q1);
    s.iter().filter(|&&x| x > fence).count()
}

/// How many of `k` go to the visual score given the two outlier counts (at least one each when
/// `k >= 2`).
fn split(k: usize, visual_outliers: usize, text_outliers: usize) -> usize {
    if k < 2 {
        return k;
    }
    let total = visual_outliers + text_outliers;
    let share = if total == 0 { 0.5 } else { visual_outliers as f64 / total as f64 };
    ((k as f64 * share).round() as usize).clamp(1, k - 1)
}

impl Method for Recoverable {
    fn name(&self) -> &'static str {
        "recoverable"
    }

    fn needs(&self) -> Needs {
        Needs { text: true }
    }

    fn choose(&self, rows: &Rows<'_>, k: usize) -> Result<Chosen> {
        let attention = rows.cls_last().or_else(|| rows.received()).ok_or_else(|| {
            missing(
                "recoverable",
                "CLS attention or attention received (glimpse_cls_attention / glimpse_attention_received)",
                "export the model with `python -m glimpse_export` and its pruning-signals option",
            )
        })?;
        let text = rows.text.ok_or_else(|| {
            missing("recoverable", "text embeddings of the prompt", "run through the pipeline, which embeds the prompt")
        })?;
        let n = rows.features.nrows();
        let xn = normalized(rows.features);
        let relevance: Array1<f32> =
            xn.dot(&normalized(text).t()).mean_axis(Axis(1)).unwrap_or_else(|| Array1::zeros(n));
        let k_visual = split(k, upper_outliers(&attention), upper_outliers(&relevance));
        let mut kept = top_k(attention.view(), k_visual);
        let mut is_kept = vec![false; n];
        for &i in &kept {
            is_kept[i] = true;
        }
        let mut rest: Vec<usize> = (0..n).filter(|&i| !is_kept[i]).collect();
        rest.sort_by(|&a, &b| relevance[b].total_cmp(&relevance[a]).then(a.cmp(&b)));
        for &i in rest.iter().take(k - kept.len()) {
            is_kept[i] = true;
            kept.push(i);
        }
        let mut chosen = Chosen::keep(kept);
        // merge every dropped token into its nearest kept token
        let space = rows.keys().map_or_else(|| xn.clone(), |keys| normalized(keys.view()));
        let targets = space.select(Axis(0), &chosen.indices);
        let weight = |i: usize| attention[i].max(0.0);
        let mut sums: Vec<(Array1<f32>, f32)> =
            chosen.indices.iter().map(|&i| (rows.features.row(i).mapv(|x| x * weight(i)), weight(i))).collect();
        let mut merged_any = vec![false; chosen.indices.len()];
        for j in (0..n).filter(|&j| !is_kept[j]) {
            let sims = targets.dot(&space.row(j));
            let t = crate::generate::argmax(sims.as_slice().unwrap_or(&sims.to_vec()));
            sums[t].0.scaled_add(weight(j), &rows.features.row(j));
            sums[t].1 += weight(j);
            merged_any[t] = true;
        }
        for (slot, (&i, (sum, w))) in chosen.indices.iter().zip(sums).enumerate() {
            if merged_any[slot] && w > 0.0 {
                chosen.replaced.push((i, sum / w));
            }
        }
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use ndarray::{array, Array2};

    #[test]
    fn outliers_use_the_iqr_fence() {
        assert_eq!(upper_outliers(&array![1.0, 1.0, 1.0, 1.0, 1.0, 9.0]), 1);
        assert_eq!(upper_outliers(&array![1.0, 2.0, 3.0, 4.0]), 0);
        assert_eq!(split(10, 3, 1), 8);
        assert_eq!(split(10, 0, 0), 5);
        assert_eq!(split(2, 5, 0), 1, "both scores keep at least one");
    }

    #[test]
    fn keeps_the_attended_and_the_relevant_and_merges_the_rest() {
        // token 0: attended; token 3: looks like the prompt; the others are dropped and merged
        let f = array![[1.0f32, 0.0], [0.9, 0.1], [0.2, 0.3], [0.0, 1.0], [0.1, 0.9]];
        let mut r = rows(&f);
        r.signals.insert("cls_attention", array![[5.0], [1.0], [1.0], [1.0], [1.0]]);
        let t = array![[0.0f32, 1.0]];
        r.text = Some(t.view());
        let c = Recoverable.choose(&r, 2).unwrap();
        assert_eq!(c.indices, vec![0, 3]);
        // token 1 joins 0 (similar feature), tokens 2 and 4 join 3; weights are attentions
        let merged: std::collections::BTreeMap<usize, Array1<f32>> = c.replaced.into_iter().collect();
        let want0 = (&f.row(0) * 5.0 + f.row(1)) / 6.0;
        let want3 = (&f.row(3) + &f.row(2) + f.row(4)) / 3.0;
        assert!((&merged[&0] - &want0).iter().all(|d| d.abs() < 1e-6), "{:?}", merged[&0]);
        assert!((&merged[&3] - &want3).iter().all(|d| d.abs() < 1e-6), "{:?}", merged[&3]);
    }

    #[test]
    fn needs_attention_and_text() {
        let f = Array2::<f32>::ones((4, 2));
        let e = Recoverable.choose(&rows(&f), 2).unwrap_err().to_string();
        assert!(e.contains("attention"), "{e}");
    }
}
