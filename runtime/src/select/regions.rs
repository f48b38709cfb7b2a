//! Region skipping, the selection that acts before the encoder's blocks: only the patches of
//! the kept *patch groups* — the patches that become one language-model token after the
//! connector (scale × scale patches under Idefics3's pixel shuffle, one patch for LLaVA) — run
//! through the transformer layers of a staged encoder; the head gets the full grid back and the
//! dropped groups' output tokens never reach the language model (or the global view's tokens
//! over their region stand in, as `--skipped-tiles global` does for whole tiles).
//!
//! Which groups: on tiled families the global view is encoded first; every tile token scores
//! the distinctiveness of the global token over its region
//! ([`super::tiles::global_token_scores`]) plus the saliency of its own patch embeddings (the
//! embed stage of every tile runs first, batched, before any choice), so that what the global
//! view cannot show (SmolVLM's one-patch digits) can still be chosen; on single-view families
//! (LLaVA) the patch-embedding saliency alone, inside [`PatchKeep`].

use ndarray::{Array1, Array2, Array3, ArrayView1, Axis};

use super::{top_k, Budget, Scope};
use crate::error::{Error, Result};
use crate::family::{View, ViewKind};
use crate::pipeline::{Between, EncoderHook};

/// Region skipping as configured: how many tile tokens (LLM tokens) are encoded, over which
/// views, and what stands in for the others.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegionSkip {
    /// Tokens to encode: a fraction of the tiles' tokens (of the view's, single-view), or a count.
    pub budget: Budget,
    /// One choice over every tile's tokens together, or the same budget within each tile.
    pub scope: Scope,
    /// What replaces the tokens never encoded.
    pub skipped: super::tiles::SkippedTiles,
    /// Weight of prompt relevance in the global view's scores (0 by default, see
    /// [`super::tiles::global_token_scores`]).
    pub relevance: f32,
    /// On tiled families, the global view's own patch groups to encode, chosen by patch
    /// saliency (`Ratio(1.0)`: all of it, the default). Its dropped tokens score lowest for the
    /// tiles under them and never reach the language model.
    pub global: Budget,
}

/// The global token whose cell holds the centre of token `t` of `tile`.
pub fn global_token_over(tile: &View, global: &View, t: usize) -> usize {
    let (th, tw) = tile.grid;
    let (gh, gw) = global.grid;
    let [x0, y0, x1, y1] = tile.region;
    let (r, c) = (t / tw.max(1), t % tw.max(1));
    let cx = x0 + (x1 - x0) * (c as f32 + 0.5) / tw.max(1) as f32;
    let cy = y0 + (y1 - y0) * (r as f32 + 0.5) / th.max(1) as f32;
    let gc = ((cx * gw as f32) as usize).min(gw.saturating_sub(1));
    let gr = ((cy * gh as f32) as usize).min(gh.saturating_sub(1));
    gr * gw + gc
}

/// The global view's scores carried to every token of `tile` (the score of the global token
/// over its centre).
pub fn prior_of(tile: &View, global: &View, global_scores: &[f32]) -> Vec<f32> {
    (0..tile.tokens).map(|t| global_scores.get(global_token_over(tile, global, t)).copied().unwrap_or(0.0)).collect()
}

/// The tile tokens to encode, per view (ascending; every view that is not a tile keeps all its
/// tokens): the best-scored `budget` tokens (`scores[v]`, one per token of tile `v`), over all
/// tiles together or within each tile.
pub fn choose_regions(views: &[View], scores: &[Vec<f32>], budget: Budget, scope: Scope) -> Vec<Vec<usize>> {
    let is_tile = |v: &View| matches!(v.kind, ViewKind::Tile { .. });
    let mut out: Vec<Vec<usize>> =
        views.iter().map(|v| if is_tile(v) { Vec::new() } else { (0..v.tokens).collect() }).collect();
    let tiles: Vec<usize> = (0..views.len()).filter(|&v| is_tile(&views[v])).collect();
    let score = |v: usize, t: usize| scores.get(v).and_then(|s| s.get(t)).copied().unwrap_or(0.0);
    match scope {
        Scope::PerView => {
            for &v in &tiles {
                let s: Vec<f32> = (0..views[v].tokens).map(|t| score(v, t)).collect();
                out[v] = top_k(ArrayView1::from(&s), budget.of(views[v].tokens));
            }
        }
        Scope::Global => {
            let owner: Vec<(usize, usize)> =
                tiles.iter().flat_map(|&v| (0..views[v].tokens).map(move |t| (v, t))).collect();
            let all: Vec<f32> = owner.iter().map(|&(v, t)| score(v, t)).collect();
            for i in top_k(ArrayView1::from(&all), budget.of(all.len())) {
                let (v, t) = owner[i];
                out[v].push(t);
            }
        }
    }
    out
}

/// How the patch tokens of one view map onto its language-model tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchLayout {
    /// Tokens before the patches (LLaVA's CLS), always kept.
    pub prefix: usize,
    /// Side of the square of patches that becomes one LLM token.
    pub scale: usize,
    /// LLM token grid `(rows, cols)`.
    pub grid: (usize, usize),
}

impl PatchLayout {
    /// The layout of `hidden` tokens per view for a view of `grid` LLM tokens with `prefix`
    /// leading non-patch tokens; an error when the patches are not `scale² × grid` for an integer scale.
    pub fn new(hidden: usize, prefix: usize, grid: (usize, usize)) -> Result<Self> {
        let cells = grid.0 * grid.1;
        let patches = hidden.saturating_sub(prefix);
        let per = patches.checked_div(cells).unwrap_or(0);
        let scale = (per as f64).sqrt().round() as usize;
        if cells == 0 || scale == 0 || scale * scale * cells != patches {
            return Err(Error::interface(
                "region skipping",
                format!("{hidden} encoder tokens ({prefix} before the patches) do not tile an LLM grid of {grid:?}"),
            ));
        }
        Ok(PatchLayout { prefix, scale, grid })
    }

    /// The encoder token indices (prefix first, then the patches of each kept LLM token in
    /// raster order), ascending.
    pub fn patches_of(&self, kept: &[usize]) -> Vec<usize> {
        let side = self.grid.1 * self.scale;
        let mut out: Vec<usize> = (0..self.prefix).collect();
        for &t in kept {
            let (r, c) = (t / self.grid.1, t % self.grid.1);
            for i in 0..self.scale {
                for j in 0..self.scale {
                    out.push(self.prefix + (r * self.scale + i) * side + c * self.scale + j);
                }
            }
        }
        out[self.prefix..].sort_unstable();
        out
    }

    /// The LLM token each patch (encoder token past the prefix) belongs to.
    pub fn token_of(&self, patch: usize) -> usize {
        let side = self.grid.1 * self.scale;
        let (r, c) = (patch / side, patch % side);
        (r / self.scale) * self.grid.1 + c / self.scale
    }
}

/// Which LLM tokens of the view a [`PatchKeep`] run keeps.
#[derive(Debug, Clone, PartialEq)]
pub enum Keep {
    /// These tokens (chosen from the global view).
    Tokens(Vec<usize>),
    /// The most salient patch groups of the view's own embeddings, this many.
    Salient(Budget),
}

/// The encoder hook of region skipping for one view, or a batch of views that keep as many
/// tokens each (the tiles of an image under a per-tile budget): before the blocks it keeps only
/// the patches of the kept LLM tokens (and the prefix); before the head it puts them back into
/// the embedded full grid, so the head's connector sees a full grid. The output tokens of the
/// dropped groups are then dropped by the pipeline ([`PatchKeep::kept`]).
#[derive(Debug, Clone)]
pub struct PatchKeep {
    /// One per view of the batch.
    keep: Vec<Keep>,
    prefix: usize,
    grid: (usize, usize),
    kept: Vec<Vec<usize>>,
    entered: Vec<Vec<usize>>,
    patches: usize,
    state: Option<(Array3<f32>, Vec<Vec<usize>>)>,
}

impl PatchKeep {
    /// Keeps `keep` of a view of `grid` LLM tokens whose encoder tokens start with `prefix`
    /// non-patch tokens.
    pub fn new(keep: Keep, prefix: usize, grid: (usize, usize)) -> Self {
        Self::batch(vec![keep], prefix, grid)
    }

    /// [`PatchKeep::new`] for a batch of views of the same grid, `keep[v]` for view `v`; the run
    /// fails unless every view keeps the same number of tokens (the batch is one tensor).
    pub fn batch(keep: Vec<Keep>, prefix: usize, grid: (usize, usize)) -> Self {
        PatchKeep { keep, prefix, grid, kept: Vec::new(), entered: Vec::new(), patches: 0, state: None }
    }

    /// The LLM tokens the first view kept (known after the run's embed stage).
    pub fn kept(&self) -> &[usize] {
        self.kept_of(0)
    }

    /// The LLM tokens view `v` of the batch kept (after the run's embed stage).
    pub fn kept_of(&self, v: usize) -> &[usize] {
        self.kept.get(v).map_or(&[], Vec::as_slice)
    }

    /// Patches of the view (after the run): scale² per LLM token.
    pub fn layout_patches(&self) -> usize {
        self.patches
    }

    /// The encoder tokens (prefix included) of the first view that entered the groups,
    /// ascending (after the run).
    pub fn entered(&self) -> &[usize] {
        self.entered_of(0)
    }

    /// [`PatchKeep::entered`] for view `v` of the batch.
    pub fn entered_of(&self, v: usize) -> &[usize] {
        self.entered.get(v).map_or(&[], Vec::as_slice)
    }
}

/// Per-LLM-token saliency of the patch embeddings `[tokens, d]` (prefix excluded): the mean over
/// a token's patches of their distance from the view's mean patch embedding.
pub fn embedding_saliency(hidden: &Array2<f32>, layout: &PatchLayout) -> Vec<f32> {
    let patches = hidden.slice(ndarray::s![layout.prefix.., ..]);
    let mean = patches.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(hidden.ncols()));
    let cells = layout.grid.0 * layout.grid.1;
    let mut out = vec![0.0f32; cells];
    for (p, row) in patches.rows().into_iter().enumerate() {
        let d = (&row - &mean).mapv(|x| x * x).sum().sqrt();
        if let Some(o) = out.get_mut(layout.token_of(p)) {
            *o += d;
        }
    }
    out
}

impl EncoderHook for PatchKeep {
    fn before_groups(&mut self, state: &mut Between) -> Result<()> {
        let views = state.hidden.shape()[0];
        if views != self.keep.len() {
            return Err(Error::interface(
                "region skipping",
                format!("{views} views entered the groups for {} kept-token lists", self.keep.len()),
            ));
        }
        let layout = PatchLayout::new(state.grid, self.prefix, self.grid)?;
        self.patches = state.grid - self.prefix;
        let cells = self.grid.0 * self.grid.1;
        let mut kept = Vec::with_capacity(views);
        for (v, keep) in self.keep.iter().enumerate() {
            kept.push(match keep {
                Keep::Tokens(t) => {
                    if let Some(bad) = t.iter().find(|&&i| i >= cells) {
                        return Err(Error::interface(
                            "region skipping",
                            format!("token {bad} outside a view of {cells}"),
                        ));
                    }
                    t.clone()
                }
                Keep::Salient(budget) => {
                    let view = state.hidden.index_axis(Axis(0), v).to_owned();
                    let s = embedding_saliency(&view, &layout);
                    top_k(ArrayView1::from(&s), budget.of(cells))
                }
            });
        }
        let idx: Vec<Vec<usize>> = kept.iter().map(|k| layout.patches_of(k)).collect();
        let len = idx.first().map_or(0, Vec::len);
        if idx.iter().any(|i| i.len() != len) {
            return Err(Error::interface("region skipping", "views batched together keep different token counts"));
        }
        let full = std::mem::replace(&mut state.hidden, Array3::zeros((views, 0, 0)));
        let mut hidden = Array3::<f32>::zeros((views, len, full.shape()[2]));
        for (v, ix) in idx.iter().enumerate() {
            hidden.index_axis_mut(Axis(0), v).assign(&full.index_axis(Axis(0), v).select(Axis(0), ix));
        }
        state.hidden = hidden;
        state.bias = Array2::zeros((views, len));
        self.kept = kept;
        self.entered.clone_from(&idx);
        self.state = Some((full, idx));
        Ok(())
    }

    fn before_head(&mut self, state: &mut Between) -> Result<()> {
        let Some((mut full, idx)) = self.state.take() else { return Ok(()) };
        let len = idx.first().map_or(0, Vec::len);
        if state.hidden.shape()[0] != idx.len() || state.hidden.shape()[1] != len {
            return Err(Error::interface(
                "region skipping",
                format!("{:?} tokens came back for {} views of {len} kept", state.hidden.shape(), idx.len()),
            ));
        }
        for (v, ix) in idx.iter().enumerate() {
            let back = state.hidden.index_axis(Axis(0), v);
            let mut view = full.index_axis_mut(Axis(0), v);
            for (k, &i) in ix.iter().enumerate() {
                view.index_axis_mut(Axis(0), i).assign(&back.index_axis(Axis(0), k));
            }
        }
        state.hidden = full;
        state.bias = Array2::zeros((idx.len(), state.grid));
        Ok(())
    }
}

/// Region skipping in the registry of encoder-side methods.
pub const SPEC: super::EncoderMethodSpec = super::EncoderMethodSpec {
    name: "regions",
    flag: "--regions",
    summary: "run the encoder's layers only on the patch groups scored best (global view, or patch saliency)",
    acts: super::Acts::BeforeEncoder,
    staged: true,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::testutil::quadrant_tile;

    #[test]
    fn layouts_map_patches_to_tokens_and_back() {
        // Idefics3: 16×16 patches, pixel shuffle 2 -> 8×8 tokens
        let l = PatchLayout::new(256, 0, (8, 8)).unwrap();
        assert_eq!(l.scale, 2);
        assert_eq!(l.patches_of(&[0]), vec![0, 1, 16, 17]);
        assert_eq!(l.patches_of(&[9]), vec![34, 35, 50, 51]);
        for p in 0..256 {
            assert!(l.patches_of(&[l.token_of(p)]).contains(&p));
        }
        // LLaVA: CLS + 12×12 patches, one patch per token
        let l = PatchLayout::new(145, 1, (12, 12)).unwrap();
        assert_eq!((l.scale, l.patches_of(&[3, 0])), (1, vec![0, 1, 4]));
        assert!(PatchLayout::new(200, 0, (8, 8)).is_err());
    }

    #[test]
    fn budgets_hold_and_the_best_region_wins() {
        let global = View { kind: ViewKind::Global, tokens: 16, grid: (4, 4), region: [0.0, 0.0, 1.0, 1.0] };
        let views = vec![
            quadrant_tile(0, 0, 4),
            quadrant_tile(0, 1, 4),
            quadrant_tile(1, 0, 4),
            quadrant_tile(1, 1, 4),
            global.clone(),
        ];
        // each global token covers 2×2 tokens of a 4×4 tile
        assert_eq!(global_token_over(&views[3], &global, 0), 10);
        assert_eq!(global_token_over(&views[3], &global, 15), 15);
        let mut global_scores = vec![0.0f32; 16];
        global_scores[15] = 5.0;
        let scores: Vec<Vec<f32>> = views.iter().map(|v| prior_of(v, &global, &global_scores)).collect();
        let kept = choose_regions(&views, &scores, Budget::Count(4), Scope::Global);
        assert_eq!(kept[3], vec![10, 11, 14, 15]);
        assert!(kept[0].is_empty() && kept[1].is_empty() && kept[2].is_empty());
        assert_eq!(kept[4].len(), 16);
        for r in [0.25f32, 0.5, 1.0] {
            let kept = choose_regions(&views, &scores, Budget::Ratio(r), Scope::PerView);
            for v in kept.iter().take(4) {
                assert_eq!(v.len(), (16.0 * r).round() as usize);
                assert!(v.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }

    #[test]
    fn keeping_everything_restores_the_grid_unchanged() {
        let hidden = Array3::from_shape_fn((1, 256, 3), |(_, t, d)| (t * 3 + d) as f32);
        let mut state = Between { hidden: hidden.clone(), bias: Array2::zeros((1, 256)), keys: None, grid: 256 };
        let mut hook = PatchKeep::new(Keep::Tokens(vec![1, 5]), 0, (8, 8));
        hook.before_groups(&mut state).unwrap();
        assert_eq!(state.hidden.shape(), &[1, 8, 3]);
        assert_eq!(state.bias.dim(), (1, 8));
        state.hidden.mapv_inplace(|x| x + 1000.0);
        hook.before_head(&mut state).unwrap();
        assert_eq!(state.hidden.shape(), &[1, 256, 3]);
        for p in 0..256 {
            let changed = [2, 3, 18, 19, 10, 11, 26, 27].contains(&p);
            assert_eq!(state.hidden[[0, p, 0]] - hidden[[0, p, 0]], if changed { 1000.0 } else { 0.0 }, "patch {p}");
        }
        let mut all = PatchKeep::new(Keep::Salient(Budget::Ratio(1.0)), 0, (8, 8));
        let mut state = Between { hidden: hidden.clone(), bias: Array2::zeros((1, 256)), keys: None, grid: 256 };
        all.before_groups(&mut state).unwrap();
        all.before_head(&mut state).unwrap();
        assert_eq!(state.hidden, hidden);
        assert_eq!(all.kept().len(), 64);
    }
}
