//! Token merging inside the encoder (ToMe, Bolya et al., ICLR 2023; facebookresearch/ToMe
//! `tome/merge.py`): between groups of a staged encoder's layers, bipartite soft matching on the
//! head-averaged keys of the group's last layer merges the `r` most similar pairs of tokens by
//! size-weighted mean; the next groups attend proportionally (`ln(size)` added to the attention
//! logits through the groups' bias input); before the head every merged token is copied back to
//! all the patches it absorbed (unmerge), so any connector — pixel shuffle included — gets its
//! full grid.
//!
//! Difference from the paper: ToMe merges between a block's attention and its MLP; the stages
//! cut between whole layers, so here the merge follows the MLP of a group's last layer.

use ndarray::{Array1, Array2, Array3, ArrayView2, Axis};

use super::{normalized, Budget};
use crate::error::{Error, Result};
use crate::pipeline::{Between, EncoderHook};

/// One step of bipartite soft matching on one view: which tokens survive and where every current
/// token goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Matching {
    /// For every current token, its index among the merged tokens.
    pub dest: Vec<usize>,
    /// Tokens after the merge.
    pub len: usize,
    /// Whether each current token was merged away (an A token that joined its match).
    pub merged: Vec<bool>,
}

/// Bipartite soft matching (ToMe's `bipartite_soft_matching`): tokens alternate into sets A
/// (even) and B (odd); every A token's most similar B token (cosine of `metric` rows) is its
/// match; the `r` A tokens with the best matches merge into them. `protected` leading tokens
/// (CLS) never merge. At most half the unprotected tokens merge per step. Survivors keep their
/// order (unmerged A and all of B, by original index).
pub fn bipartite_soft_matching(metric: ArrayView2<'_, f32>, r: usize, protected: usize) -> Matching {
    let n = metric.nrows();
    let r = r.min(n.saturating_sub(protected) / 2);
    if r == 0 || n < 2 {
        return Matching { dest: (0..n).collect(), len: n, merged: vec![false; n] };
    }
    let m = normalized(metric);
    let a: Vec<usize> = (0..n).step_by(2).collect();
    let b: Vec<usize> = (1..n).step_by(2).collect();
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(a.len());
    for &i in &a {
        if i < protected {
            best.push((f32::NEG_INFINITY, 0));
            continue;
        }
        let row = m.row(i);
        let mut top = (f32::NEG_INFINITY, 0usize);
        for (j, &bj) in b.iter().enumerate() {
            if bj < protected {
                continue;
            }
            let s = row.dot(&m.row(bj));
            if s > top.0 {
                top = (s, j);
            }
        }
        best.push(top);
    }
    let mut order: Vec<usize> = (0..a.len()).collect();
    order.sort_by(|&x, &y| best[y].0.total_cmp(&best[x].0).then(x.cmp(&y)));
    let mut merged = vec![false; a.len()];
    for &x in order.iter().take(r) {
        merged[x] = true;
    }
    // survivors in original order
    let mut dest = vec![usize::MAX; n];
    let mut next = 0;
    for (t, d) in dest.iter_mut().enumerate() {
        let is_merged_a = t % 2 == 0 && merged[t / 2];
        if !is_merged_a {
            *d = next;
            next += 1;
        }
    }
    for (x, &i) in a.iter().enumerate() {
        if merged[x] {
            dest[i] = dest[b[best[x].1]];
        }
    }
    let mut merged_away = vec![false; n];
    for (x, &i) in a.iter().enumerate() {
        merged_away[i] = merged[x];
    }
    Matching { dest, len: next, merged: merged_away }
}

/// Applies a matching: size-weighted means of `x` `[n, d]` and the summed sizes.
pub fn merge_weighted(x: ArrayView2<'_, f32>, size: &[f32], m: &Matching) -> (Array2<f32>, Vec<f32>) {
    let mut sum = Array2::<f32>::zeros((m.len, x.ncols()));
    let mut new_size = vec![0.0f32; m.len];
    for (t, &d) in m.dest.iter().enumerate() {
        sum.row_mut(d).scaled_add(size[t], &x.row(t));
        new_size[d] += size[t];
    }
    for (mut row, &s) in sum.rows_mut().into_iter().zip(&new_size) {
        if s > 0.0 {
            row.mapv_inplace(|v| v / s);
        }
    }
    (sum, new_size)
}

/// The keys a merging hook matches on after group `index`, once it has seen the embed stage of
/// the `views` it now runs on; errors name the method (`what`) and the group.
pub(crate) fn group_keys<'a>(state: &'a Between, index: usize, views: usize, what: &str) -> Result<&'a Array3<f32>> {
    if views != state.hidden.shape()[0] {
        return Err(Error::interface(what, "the hook saw no embed stage for these views"));
    }
    state.keys.as_ref().ok_or_else(|| {
        Error::interface(
            format!("vision_blocks_{index}"),
            format!("{what} needs the group's `keys` output (re-run `glimpse split` or the export)"),
        )
    })
}

/// Merging as configured: how many tokens per group boundary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MergeConfig {
    /// Tokens merged away per view after each group but the last: a count, or a fraction of the
    /// tokens entering the boundary (at most half of them).
    pub r: Budget,
    /// Leading tokens that never merge (LLaVA's CLS).
    pub protected: usize,
}

impl MergeConfig {
    /// Tokens to merge away at a boundary that `n` tokens reach (the matching caps it at half).
    pub fn r_for(&self, n: usize) -> usize {
        match self.r {
            Budget::Count(c) => c,
            Budget::Ratio(f) => (f as f64 * n as f64).round() as usize,
        }
    }
}

/// Parses a merge amount: `0` / `none` (no merging), a count of tokens per group boundary
/// (`8`), or a fraction of the tokens entering it in (0, 0.5] (`0.25`).
pub fn parse_r(s: &str) -> Result<Option<Budget>> {
    if s == "none" || s == "0" {
        return Ok(None);
    }
    if let Ok(c) = s.parse::<usize>() {
        return Ok(Some(Budget::Count(c)));
    }
    match s.parse::<f32>() {
        Ok(f) if f > 0.0 && f <= 0.5 => Ok(Some(Budget::Ratio(f))),
        _ => Err(Error::invalid("merge", s, "expected 0, a token count, or a fraction in (0, 0.5]")),
    }
}

/// A token-merging encoder hook: ToMe, or Token Transforming. The pipeline takes each run's
/// merge groups from it for `--show-kept`.
pub trait Merger: EncoderHook {
    /// For every view of every run since the last call, in run order: for each token that
    /// entered the groups, the merged token that holds most of it.
    fn take_groups(&mut self) -> Vec<Vec<usize>>;
}

impl Merger for Tome {
    fn take_groups(&mut self) -> Vec<Vec<usize>> {
        std::mem::take(&mut self.done)
    }
}

/// The merging methods `--merge-method` chooses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMethod {
    /// ToMe: each merged token joins one match ([`Tome`]).
    #[default]
    Tome,
    /// Token Transforming: each merged token spreads over its most similar survivors
    /// ([`super::transform::TokenTransform`]).
    Transform,
}

impl std::str::FromStr for MergeMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tome" => Ok(MergeMethod::Tome),
            "transform" => Ok(MergeMethod::Transform),
            _ => Err(Error::invalid("merge method", s, "expected tome or transform")),
        }
    }
}

impl MergeMethod {
    /// The configured hook.
    pub fn hook(self, config: MergeConfig) -> Box<dyn Merger> {
        match self {
            MergeMethod::Tome => Box::new(Tome::new(config)),
            MergeMethod::Transform => Box::new(super::transform::TokenTransform::new(config)),
        }
    }
}

/// The ToMe encoder hook. Tracks, per view, which merged token every token entering the first
/// group became ("sources"), and unmerges before the head.
#[derive(Debug, Clone)]
pub struct Tome {
    config: MergeConfig,
    /// Per view: for each token entering the groups, its current index.
    source: Vec<Vec<usize>>,
    size: Vec<Vec<f32>>,
    start: usize,
    /// Sources of every view of every finished run, in run order (for `--show-kept`).
    done: Vec<Vec<usize>>,
}

impl Tome {
    pub fn new(config: MergeConfig) -> Self {
        Tome { config, source: Vec::new(), size: Vec::new(), start: 0, done: Vec::new() }
    }

    /// Per view, the merged token each token entering the groups ended in (after the run).
    pub fn sources(&self) -> &[Vec<usize>] {
        &self.source
    }
}

impl EncoderHook for Tome {
    fn before_groups(&mut self, state: &mut Between) -> Result<()> {
        let (v, n) = (state.hidden.shape()[0], state.hidden.shape()[1]);
        self.source = vec![(0..n).collect(); v];
        self.size = vec![vec![1.0; n]; v];
        self.start = n;
        Ok(())
    }

    fn after_group(&mut self, index: usize, _layers: [usize; 2], state: &mut Between) -> Result<()> {
        let n = state.hidden.shape()[1];
        let keys = group_keys(state, index, self.source.len(), "token merging")?;
        let r = self.config.r_for(n);
        let views = state.hidden.shape()[0];
        let mut merged: Vec<(Array2<f32>, Vec<f32>, Matching)> = Vec::with_capacity(views);
        for vi in 0..views {
            let m = bipartite_soft_matching(keys.index_axis(Axis(0), vi), r, self.config.protected);
            let (x, s) = merge_weighted(state.hidden.index_axis(Axis(0), vi), &self.size[vi], &m);
            merged.push((x, s, m));
        }
        let len = merged.first().map_or(n, |m| m.2.len);
        if merged.iter().any(|m| m.2.len != len) {
            return Err(Error::interface("token merging", "views merged to different lengths"));
        }
        let d = state.hidden.shape()[2];
        let mut hidden = Array3::<f32>::zeros((views, len, d));
        let mut bias = Array2::<f32>::zeros((views, len));
        for (vi, (x, s, m)) in merged.into_iter().enumerate() {
            hidden.index_axis_mut(Axis(0), vi).assign(&x);
            bias.row_mut(vi).assign(&Array1::from_iter(s.iter().map(|v| v.ln())));
            for src in self.source[vi].iter_mut() {
                *src = m.dest[*src];
            }
            self.size[vi] = s;
        }
        state.hidden = hidden;
        state.bias = bias;
        state.keys = None;
        Ok(())
    }

    fn before_head(&mut self, state: &mut Between) -> Result<()> {
        self.done.extend(self.source.iter().cloned());
        if self.source.is_empty() || state.hidden.shape()[1] == self.start {
            return Ok(());
        }
        let (views, d) = (state.hidden.shape()[0], state.hidden.shape()[2]);
        let mut full = Array3::<f32>::zeros((views, self.start, d));
        for vi in 0..views {
            for (t, &cur) in self.source[vi].iter().enumerate() {
                full.slice_mut(ndarray::s![vi, t, ..]).assign(&state.hidden.slice(ndarray::s![vi, cur, ..]));
            }
        }
        state.hidden = full;
        state.bias = Array2::zeros((views, self.start));
        Ok(())
    }
}

/// ToMe in the registry of encoder-side methods.
pub const SPEC: super::EncoderMethodSpec = super::EncoderMethodSpec {
    name: "tome",
    flag: "--merge",
    summary: "merge the r most similar tokens between layer groups (ToMe), unmerged before the head",
    acts: super::Acts::InsideEncoder,
    staged: true,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::testutil::features;

    #[test]
    fn matching_merges_exactly_r_and_covers_every_token_once() {
        let metric = features(64, 8, 3);
        for r in [0, 1, 7, 32, 100] {
            let m = bipartite_soft_matching(metric.view(), r, 0);
            assert_eq!(m.len, 64 - r.min(32), "r {r}");
            assert_eq!(m.dest.len(), 64);
            assert!(m.dest.iter().all(|&d| d < m.len));
            // every merged token has at least one source; survivors stay in order
            let mut seen = vec![false; m.len];
            for &d in &m.dest {
                seen[d] = true;
            }
            assert!(seen.iter().all(|&s| s));
            // B tokens (odd) always survive, in increasing order
            let b: Vec<usize> = (1..64).step_by(2).map(|t| m.dest[t]).collect();
            assert!(b.windows(2).all(|w| w[0] < w[1]));
        }
        // a protected CLS never merges and nothing merges into it
        let m = bipartite_soft_matching(metric.view(), 32, 1);
        assert_eq!(m.dest.iter().filter(|&&d| d == m.dest[0]).count(), 1);
        assert_eq!(m.dest[0], 0);
    }

    #[test]
    fn identical_tokens_merge_first_with_weighted_means() {
        // tokens 0 and 1 identical, 2 and 3 orthogonal to everything
        let metric = ndarray::arr2(&[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]);
        let m = bipartite_soft_matching(metric.view(), 1, 0);
        assert_eq!(m.dest, vec![0, 0, 1, 2]);
        let x = ndarray::arr2(&[[2.0f32], [4.0], [7.0], [9.0]]);
        let (y, s) = merge_weighted(x.view(), &[3.0, 1.0, 1.0, 1.0], &m);
        assert_eq!(s, vec![4.0, 1.0, 1.0]);
        assert_eq!(y.column(0).to_vec(), vec![2.5, 7.0, 9.0]);
    }

    #[test]
    fn r_zero_is_the_identity_and_unmerge_restores_the_grid() {
        let hidden = Array3::from_shape_fn((2, 16, 4), |(v, t, d)| (v * 100 + t * 4 + d) as f32);
        let keys = Array3::from_shape_fn((2, 16, 4), |(v, t, d)| ((v + t * 7 + d * 3) % 5) as f32);
        for r in [Budget::Count(0), Budget::Count(3), Budget::Ratio(0.5)] {
            let mut tome = Tome::new(MergeConfig { r, protected: 0 });
            let mut state = Between { hidden: hidden.clone(), bias: Array2::zeros((2, 16)), keys: None, grid: 16 };
            tome.before_groups(&mut state).unwrap();
            state.keys = Some(keys.clone());
            tome.after_group(0, [0, 1], &mut state).unwrap();
            let left = state.hidden.shape()[1];
            let want = match r {
                Budget::Count(c) => 16 - c,
                Budget::Ratio(_) => 8,
            };
            assert_eq!(left, want);
            assert_eq!(state.bias.dim(), (2, left));
            // sizes sum to the tokens that entered: exp(bias) adds up to 16 per view
            for v in 0..2 {
                let total: f32 = state.bias.row(v).iter().map(|b| b.exp()).sum();
                assert!((total - 16.0).abs() < 1e-4);
            }
            tome.before_head(&mut state).unwrap();
            assert_eq!(state.hidden.shape(), &[2, 16, 4]);
            if r == Budget::Count(0) {
                assert_eq!(state.hidden, hidden);
            }
            // every source maps to a valid merged token
            assert!(tome.sources().iter().all(|s| s.len() == 16 && s.iter().all(|&c| c < left)));
        }
    }

    #[test]
    fn merge_amounts_parse() {
        assert_eq!(parse_r("0").unwrap(), None);
        assert_eq!(parse_r("8").unwrap(), Some(Budget::Count(8)));
        assert_eq!(parse_r("0.25").unwrap(), Some(Budget::Ratio(0.25)));
        assert!(parse_r("0.75").is_err() && parse_r("x").is_err() && parse_r("-1").is_err());
    }

    #[test]
    fn merging_without_keys_names_the_group() {
        let mut tome = Tome::new(MergeConfig { r: Budget::Count(2), protected: 0 });
        let mut state = Between { hidden: Array3::zeros((1, 8, 2)), bias: Array2::zeros((1, 8)), keys: None, grid: 8 };
        tome.before_groups(&mut state).unwrap();
        let err = tome.after_group(2, [2, 3], &mut state).unwrap_err();
        assert!(err.to_string().contains("vision_blocks_2"), "{err}");
    }
}
