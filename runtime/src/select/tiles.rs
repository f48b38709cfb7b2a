//! Tile skipping, the selection that acts before the encoder: the global view is encoded
//! first, every tile is scored from the global tokens over its region (relevance to the prompt
//! plus saliency), and only the best tiles are encoded. The pipeline runs the encoder; this
//! module owns the budget, the scoring and the choice.

use ndarray::{Array1, Array2, ArrayView1, Axis};

use super::{normalized, top_k};
use crate::error::{Error, Result};
use crate::family::{View, ViewKind};

/// How many tiles to encode when skipping tiles before the encoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TileBudget {
    /// Encode this many tiles (0 = the global view alone).
    Count(usize),
    /// Encode this fraction of the tiles (rounded, at least one).
    Ratio(f32),
}

impl std::str::FromStr for TileBudget {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Ok(n) = s.parse::<usize>() {
            return Ok(TileBudget::Count(n));
        }
        match s.parse::<f32>() {
            Ok(r) if r > 0.0 && r <= 1.0 => Ok(TileBudget::Ratio(r)),
            _ => Err(Error::invalid("tiles", s, "expected a tile count or a ratio in (0, 1]")),
        }
    }
}

impl TileBudget {
    /// Tiles to encode out of `n`.
    pub fn of(self, n: usize) -> usize {
        match self {
            TileBudget::Count(c) => c.min(n),
            TileBudget::Ratio(r) => ((r * n as f32).round() as usize).clamp(1, n.max(1)).min(n),
        }
    }
}

/// What stands in for a skipped tile in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SkippedTiles {
    /// Nothing: the tile's image tokens leave the prompt (its marker stays).
    #[default]
    Drop,
    /// The global view's tokens over the tile's region, under the tile's marker.
    Global,
}

impl std::str::FromStr for SkippedTiles {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "drop" => Ok(SkippedTiles::Drop),
            "global" => Ok(SkippedTiles::Global),
            _ => Err(Error::invalid("skipped tiles", s, "expected drop or global")),
        }
    }
}

/// Tile skipping: score tiles from the global view, encode only the best.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileSkip {
    pub budget: TileBudget,
    pub skipped: SkippedTiles,
    /// Weight of prompt relevance in the global view's scores (0: distinctiveness alone, the
    /// default; the encoding then does not depend on the prompt).
    pub relevance: f32,
}

/// Indices of the tile views.
pub fn tile_views(views: &[View]) -> Vec<usize> {
    views.iter().enumerate().filter(|(_, v)| matches!(v.kind, ViewKind::Tile { .. })).map(|(i, _)| i).collect()
}

/// The global view's tokens whose centres fall inside a tile's region.
pub fn covered(tile: &View, global: &View) -> Vec<usize> {
    let (gh, gw) = global.grid;
    let [x0, y0, x1, y1] = tile.region;
    (0..global.tokens)
        .filter(|t| {
            let cx = ((t % gw) as f32 + 0.5) / gw as f32;
            let cy = ((t / gw) as f32 + 0.5) / gh as f32;
            cx >= x0 && cx < x1 && cy >= y0 && cy < y1
        })
        .collect()
}

/// Z-scores (zero when constant).
pub fn zscore(v: &[f32]) -> Vec<f32> {
    let n = v.len().max(1) as f32;
    let mean = v.iter().sum::<f32>() / n;
    let sd = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n).sqrt();
    v.iter().map(|x| if sd > 0.0 { (x - mean) / sd } else { 0.0 }).collect()
}

/// Per-token saliency of feature rows: distance from the mean row.
pub fn distinctiveness(features: &Array2<f32>) -> Vec<f32> {
    let mean = features.mean_axis(Axis(0)).unwrap_or_else(|| Array1::zeros(features.ncols()));
    features.rows().into_iter().map(|r| (&r - &mean).mapv(|x| x * x).sum().sqrt()).collect()
}

/// Per-token scores of the global view: z-scored distinctiveness (distance of a token's
/// features from the view's mean), plus `relevance` × z-scored relevance to the prompt (mean
/// cosine with the prompt's embeddings) when `text` is given.
///
/// Why distinctiveness alone by default (docs/pruning.md, "Fixing tile scoring"): on
/// testbed-smolvlm the prompt relevance of connector outputs to token embeddings points away from
/// the object asked about (region skipping at 0.25 answers 27% of quadrant questions with it,
/// 92% without), and attention received singles out the same few tokens in every picture, so
/// the old relevance + attention score picked the top-right tile for every question.
pub fn global_token_scores(features: &Array2<f32>, text: Option<&Array2<f32>>, relevance: f32) -> Vec<f32> {
    let dist = zscore(&distinctiveness(features));
    match text {
        Some(text) if relevance != 0.0 => {
            let fnorm = normalized(features.view());
            let tnorm = normalized(text.view());
            let rel: Vec<f32> = fnorm.dot(&tnorm.t()).rows().into_iter().map(|r| r.mean().unwrap_or(0.0)).collect();
            dist.into_iter().zip(zscore(&rel)).map(|(a, b)| a + relevance * b).collect()
        }
        _ => dist,
    }
}

/// The tiles to encode (view indices, ascending): the `budget` tiles whose regions score
/// highest on average over the global tokens they cover.
pub fn choose_tiles(views: &[View], global: usize, scores: &[f32], budget: TileBudget) -> Vec<usize> {
    let tiles = tile_views(views);
    let g = &views[global];
    let tile_score: Vec<f32> = tiles
        .iter()
        .map(|&v| {
            let c = covered(&views[v], g);
            if c.is_empty() {
                f32::MIN
            } else {
                c.iter().map(|&t| scores[t]).sum::<f32>() / c.len() as f32
            }
        })
        .collect();
    top_k(ArrayView1::from(&tile_score), budget.of(tiles.len())).into_iter().map(|i| tiles[i]).collect()
}

/// Tile skipping in the registry of encoder-side methods.
pub const SPEC: super::EncoderMethodSpec = super::EncoderMethodSpec {
    name: "tiles",
    flag: "--tiles",
    summary: "encode only the tiles whose regions the global view scores best",
    acts: super::Acts::BeforeEncoder,
    staged: false,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn tile(row: usize, col: usize) -> View {
        crate::select::testutil::quadrant_tile(row, col, 2)
    }

    #[test]
    fn the_best_scored_region_wins_and_budgets_hold() {
        let global = View { kind: ViewKind::Global, tokens: 16, grid: (4, 4), region: [0.0, 0.0, 1.0, 1.0] };
        let views = vec![tile(0, 0), tile(0, 1), tile(1, 0), tile(1, 1), global.clone()];
        assert_eq!(covered(&views[1], &global), vec![2, 3, 6, 7]);
        let mut scores = vec![0.0f32; 16];
        scores[14] = 5.0; // bottom-right quadrant
        assert_eq!(choose_tiles(&views, 4, &scores, TileBudget::Count(1)), vec![3]);
        assert_eq!(choose_tiles(&views, 4, &scores, TileBudget::Count(9)).len(), 4);
        assert!(choose_tiles(&views, 4, &scores, TileBudget::Count(0)).is_empty());
        assert_eq!(TileBudget::Ratio(0.5).of(4), 2);
        assert_eq!(TileBudget::Ratio(0.01).of(4), 1);
    }
}
