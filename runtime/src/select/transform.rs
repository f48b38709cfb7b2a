//! Token Transforming (Zeng et al., arXiv 2506.05709) as a training-free merge inside the
//! encoder: token reduction written as a token-matrix transform `X' = T X`, many-to-many. The
//! paper's construction of `T` is not reproduced here (only its abstract was available); this
//! is the form that follows from ToMe's: the same bipartite matching picks the `r` tokens that
//! disappear, but each of them spreads over its `k` most similar surviving B tokens with
//! softmax weights (temperature `tau` on the cosine) instead of joining one. Sizes are carried
//! the same way (`size' = T size`, proportional attention through `ln(size')`), and the
//! transforms compose into one row-stochastic map from the tokens that entered the groups to the
//! current ones, so unmerging gives every original token the weighted mix of the tokens it went
//! into. With `k = 1` it is exactly ToMe.

use ndarray::{Array1, Array2, Array3, Axis};

use super::normalized;
use super::tome::{bipartite_soft_matching, group_keys, MergeConfig, Merger};
use crate::error::Result;
use crate::pipeline::{Between, EncoderHook};

/// Survivors each merged token spreads over.
pub const NEIGHBOURS: usize = 3;
/// Softmax temperature on the cosine similarities.
pub const TAU: f32 = 0.1;

/// The Token Transforming encoder hook.
#[derive(Debug, Clone)]
pub struct TokenTransform {
    config: MergeConfig,
    k: usize,
    tau: f32,
    /// Per view: `[tokens that entered, current tokens]`, rows summing to 1.
    map: Vec<Array2<f32>>,
    size: Vec<Vec<f32>>,
    done: Vec<Vec<usize>>,
}

impl TokenTransform {
    pub fn new(config: MergeConfig) -> Self {
        Self::with(config, NEIGHBOURS, TAU)
    }

    /// With `k` survivors per merged token and temperature `tau`.
    pub fn with(config: MergeConfig, k: usize, tau: f32) -> Self {
        TokenTransform { config, k: k.max(1), tau, map: Vec::new(), size: Vec::new(), done: Vec::new() }
    }

    /// One view's transform `T` `[len, n]` (columns summing to 1) for `keys` `[n, head_dim]`.
    pub fn transform(&self, keys: ndarray::ArrayView2<'_, f32>, r: usize) -> Array2<f32> {
        let n = keys.nrows();
        let m = bipartite_soft_matching(keys, r, self.config.protected);
        let mut t = Array2::<f32>::zeros((m.len, n));
        let unit = normalized(keys);
        // surviving B tokens (odd, not protected), with their destination index
        let b: Vec<usize> = (1..n).step_by(2).filter(|&j| j >= self.config.protected).collect();
        for i in 0..n {
            if !m.merged[i] {
                t[[m.dest[i], i]] = 1.0;
                continue;
            }
            let mut sims: Vec<(f32, usize)> = b.iter().map(|&j| (unit.row(i).dot(&unit.row(j)), j)).collect();
            sims.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
            sims.truncate(self.k);
            let top = sims.first().map_or(0.0, |s| s.0);
            let w: Vec<f32> = sims.iter().map(|(s, _)| ((s - top) / self.tau).exp()).collect();
            let total: f32 = w.iter().sum();
            for ((_, j), wj) in sims.iter().zip(w) {
                t[[m.dest[*j], i]] += wj / total;
            }
        }
        t
    }
}

impl EncoderHook for TokenTransform {
    fn before_groups(&mut self, state: &mut Between) -> Result<()> {
        let (v, n) = (state.hidden.shape()[0], state.hidden.shape()[1]);
        self.map = vec![Array2::eye(n); v];
        self.size = vec![vec![1.0; n]; v];
        Ok(())
    }

    fn after_group(&mut self, index: usize, _layers: [usize; 2], state: &mut Between) -> Result<()> {
        let (views, n, d) = (state.hidden.shape()[0], state.hidden.shape()[1], state.hidden.shape()[2]);
        let keys = group_keys(state, index, self.map.len(), "token transforming")?;
        let r = self.config.r_for(n);
        let ts: Vec<Array2<f32>> = (0..views).map(|v| self.transform(keys.index_axis(Axis(0), v), r)).collect();
        let len = ts.first().map_or(n, |t| t.nrows());
        let mut hidden = Array3::<f32>::zeros((views, len, d));
        let mut bias = Array2::<f32>::zeros((views, len));
        for (v, t) in ts.into_iter().enumerate() {
            let s = Array1::from(self.size[v].clone());
            // size-weighted: x' = T (s ∘ x) / (T s)
            let weighted = &state.hidden.index_axis(Axis(0), v) * &s.view().insert_axis(Axis(1));
            let new_size = t.dot(&s);
            let mut x = t.dot(&weighted);
            for (mut row, &sz) in x.rows_mut().into_iter().zip(new_size.iter()) {
                if sz > 0.0 {
                    row.mapv_inplace(|e| e / sz);
                }
            }
            hidden.index_axis_mut(Axis(0), v).assign(&x);
            bias.row_mut(v).assign(&new_size.mapv(f32::ln));
            // entered -> current: compose with this step (T's columns sum to 1, so rows stay distributions)
            self.map[v] = self.map[v].dot(&t.t());
            self.size[v] = new_size.to_vec();
        }
        state.hidden = hidden;
        state.bias = bias;
        state.keys = None;
        Ok(())
    }

    fn before_head(&mut self, state: &mut Between) -> Result<()> {
        let views = state.hidden.shape()[0];
        if self.map.len() != views {
            return Ok(());
        }
        let mut full = Array3::<f32>::zeros((views, self.map[0].nrows(), state.hidden.shape()[2]));
        for v in 0..views {
            full.index_axis_mut(Axis(0), v).assign(&self.map[v].dot(&state.hidden.index_axis(Axis(0), v)));
            let groups = self.map[v]
                .rows()
                .into_iter()
                .map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0)
                .collect();
            self.done.push(groups);
        }
        state.bias = Array2::zeros((views, full.shape()[1]));
        state.hidden = full;
        Ok(())
    }
}

impl Merger for TokenTransform {
    fn take_groups(&mut self) -> Vec<Vec<usize>> {
        std::mem::take(&mut self.done)
    }
}

/// Token Transforming in the registry of encoder-side methods.
pub const SPEC: super::EncoderMethodSpec = super::EncoderMethodSpec {
    name: "transform",
    flag: "--merge-method transform",
    summary: "Token Transforming: merged tokens spread over their 3 most similar survivors (many-to-many), unmerged before the head",
    acts: super::Acts::InsideEncoder,
    staged: true,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::testutil::features;
    use crate::select::tome::Tome;
    use crate::select::Budget;

    fn run(hook: &mut dyn EncoderHook, hidden: &Array3<f32>, keys: &Array3<f32>) -> (Between, Between) {
        let grid = hidden.shape()[1];
        let mut state =
            Between { hidden: hidden.clone(), bias: Array2::zeros((hidden.shape()[0], grid)), keys: None, grid };
        hook.before_groups(&mut state).unwrap();
        state.keys = Some(keys.clone());
        hook.after_group(0, [0, 1], &mut state).unwrap();
        let merged = state.clone();
        hook.before_head(&mut state).unwrap();
        (merged, state)
    }

    #[test]
    fn one_neighbour_is_exactly_tome() {
        let hidden = Array3::from_shape_fn((2, 32, 4), |(v, t, d)| ((v * 7 + t * 3 + d) % 11) as f32);
        let keys = Array3::from_shape_fn((2, 32, 6), |(v, t, d)| ((v + t * 5 + d * 3) % 7) as f32 - 3.0);
        let config = MergeConfig { r: Budget::Count(9), protected: 0 };
        let (tm, tu) = run(&mut Tome::new(config), &hidden, &keys);
        let (xm, xu) = run(&mut TokenTransform::with(config, 1, TAU), &hidden, &keys);
        let close = |a: &Array3<f32>, b: &Array3<f32>| (a - b).iter().all(|d| d.abs() < 1e-5);
        assert!(close(&tm.hidden, &xm.hidden) && close(&tu.hidden, &xu.hidden));
        assert!((&tm.bias - &xm.bias).iter().all(|d| d.abs() < 1e-5));
    }

    #[test]
    fn mass_is_conserved_and_unmerge_restores_the_grid() {
        let hidden = Array3::from_shape_fn((1, 64, 4), |(_, t, d)| (t * 4 + d) as f32);
        let keys = features(64, 8, 5).insert_axis(Axis(0));
        for r in [Budget::Count(0), Budget::Count(10), Budget::Ratio(0.5)] {
            let mut hook = TokenTransform::new(MergeConfig { r, protected: 1 });
            let (merged, back) = run(&mut hook, &hidden, &keys);
            let total: f32 = merged.bias.row(0).iter().map(|b| b.exp()).sum();
            assert!((total - 64.0).abs() < 1e-3, "{r}: sizes add up to {total}");
            assert_eq!(back.hidden.shape(), &[1, 64, 4]);
            // the CLS-like protected token is untouched
            assert_eq!(back.hidden.slice(ndarray::s![0, 0, ..]), hidden.slice(ndarray::s![0, 0, ..]));
            if r == Budget::Count(0) {
                assert!((&back.hidden - &hidden).iter().all(|d| d.abs() < 1e-4));
            }
            // the map's rows are distributions
            for row in hook.map[0].rows() {
                assert!((row.sum() - 1.0).abs() < 1e-4);
            }
            assert_eq!(hook.take_groups()[0].len(), 64);
        }
    }
}
