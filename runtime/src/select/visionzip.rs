//! `visionzip` (VisionZip, CVPR 2025): keep the dominant tokens — those the CLS token attends to
//! most at layer -2, or for encoders without CLS (SigLIP) those receiving the most attention —
//! and merge the rest into a few contextual tokens: targets are spread uniformly over the
//! leftovers, every other leftover joins its most similar target by key cosine.
//!
//! VisionZip merges inside the vision tower as `target + mean(assigned)`; Glimpse merges the
//! projected features the LLM sees, where that sum would double the norm, so a contextual token
//! is the plain mean of its target and the tokens assigned to it.

use ndarray::Axis;

use super::{missing, normalized, top_k, Chosen, Method, Rows};
use crate::error::Result;

/// Registry entry ([`super::METHODS`]).
pub const SPEC: super::MethodSpec = super::MethodSpec {
    name: "visionzip",
    summary: "VisionZip: dominant tokens by attention + merged contextual tokens",
    uses: "cls_attention | attention_received, keys",
    params: &[],
    acts: super::Acts::AfterEncoder,
    make: || Box::new(VisionZip),
};

/// Dominant + contextual selection.
#[derive(Debug, Default, Clone, Copy)]
pub struct VisionZip;

/// Dominant/contextual split of the paper (54 + 10 of 64).
fn split(k: usize) -> (usize, usize) {
    if k < 2 {
        return (k, 0);
    }
    let contextual = ((k as f64 * 10.0 / 64.0).round() as usize).clamp(1, k - 1);
    (k - contextual, contextual)
}

impl Method for VisionZip {
    fn name(&self) -> &'static str {
        "visionzip"
    }

    fn choose(&self, rows: &Rows<'_>, k: usize) -> Result<Chosen> {
        let score = rows.cls_last().or_else(|| rows.received()).ok_or_else(|| {
            missing(
                "visionzip",
                "CLS attention or attention received (glimpse_cls_attention / glimpse_attention_received)",
                "export the model with `python -m glimpse_export` and its pruning-signals option",
            )
        })?;
        let keys = rows.keys().ok_or_else(|| {
            missing("visionzip", "encoder keys (glimpse_keys)", "export the model with the pruning-signals option")
        })?;
        let n = rows.features.nrows();
        let (n_dom, n_ctx) = split(k);
        let dominant = top_k(score.view(), n_dom);
        let mut is_dom = vec![false; n];
        for &i in &dominant {
            is_dom[i] = true;
        }
        let leftovers: Vec<usize> = (0..n).filter(|&i| !is_dom[i]).collect();
        let mut chosen = Chosen::keep(dominant);
        if n_ctx == 0 || leftovers.is_empty() {
            return Ok(chosen);
        }
        let targets: Vec<usize> =
            super::uniform::strided(leftovers.len(), n_ctx).into_iter().map(|i| leftovers[i]).collect();
        let kn = normalized(keys.view());
        let tk = kn.select(Axis(0), &targets);
        let mut groups: Vec<Vec<usize>> = targets.iter().map(|&t| vec![t]).collect();
        for &i in &leftovers {
            if targets.contains(&i) {
                continue;
            }
            let sims = tk.dot(&kn.row(i));
            groups[crate::generate::argmax(sims.as_slice().unwrap_or(&sims.to_vec()))].push(i);
        }
        for (t, members) in targets.iter().zip(&groups) {
            if let Some(mean) = rows.features.select(Axis(0), members).mean_axis(Axis(0)) {
                chosen.replaced.push((*t, mean));
            }
        }
        chosen.indices.extend(&targets);
        chosen.indices.sort_unstable();
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use ndarray::{array, Array1, Array2};

    #[test]
    fn split_follows_the_paper() {
        assert_eq!(split(64), (54, 10));
        assert_eq!(split(128), (108, 20));
        assert_eq!(split(1), (1, 0));
        assert_eq!(split(2), (1, 1));
    }

    #[test]
    fn dominant_kept_rest_merged_by_key() {
        // 8 tokens; 0 is dominant. Keys put tokens 1-4 together and 5-7 together.
        let f = Array2::from_shape_fn((8, 1), |(i, _)| i as f32);
        let keys =
            array![[1.0f32, 0.0], [0.0, 1.0], [0.0, 1.0], [0.1, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.1], [1.0, 0.0]];
        let mut r = rows(&f);
        r.signals.insert(
            "cls_attention",
            Array1::from_vec(vec![9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]).insert_axis(Axis(1)),
        );
        r.signals.insert("keys", keys);
        // k = 3 splits into 2 dominant + 1 contextual: dominant 0 and (tie, lowest index) 1;
        // the single target is the middle leftover, 5, and every other leftover merges into it.
        let c = VisionZip.choose(&r, 3).unwrap();
        assert_eq!(c.indices, vec![0, 1, 5]);
        let merged: Vec<(usize, f32)> = c.replaced.iter().map(|(i, m)| (*i, m[0])).collect();
        assert_eq!(merged, vec![(5, (5. + 2. + 3. + 4. + 6. + 7.) / 6.)]);
        // With a budget of 10 there are 2 contextual targets, each the mean of its key cluster.
        let f = Array2::from_shape_fn((16, 1), |(i, _)| i as f32);
        let keys = Array2::from_shape_fn((16, 2), |(i, j)| if (i < 12) == (j == 0) { 1.0 } else { 0.0 });
        let mut r = rows(&f);
        r.signals.insert(
            "cls_attention",
            Array1::from_shape_fn(16, |i| if i < 8 { 10.0 - i as f32 } else { 0.0 }).insert_axis(Axis(1)),
        );
        r.signals.insert("keys", keys);
        let c = VisionZip.choose(&r, 10).unwrap();
        assert_eq!(c.indices.len(), 10);
        assert!((0..8).all(|i| c.indices.contains(&i)), "{:?}", c.indices);
        for (t, m) in &c.replaced {
            let cluster: Vec<f32> = (8..16).filter(|&i| (i < 12) == (*t < 12)).map(|i| i as f32).collect();
            assert_eq!(m[0], cluster.iter().sum::<f32>() / cluster.len() as f32, "target {t}");
        }
    }
}
