//! `globalcom2` (GlobalCom2, AAAI 2026) for tiled images: the global view ("thumbnail") decides
//! how much of each tile survives. Thumbnail tokens are scored by attention (CLS attention for
//! CLIP towers, attention received for SigLIP); each tile's score `S_c` is the share of thumbnail
//! attention falling in its region (in percent), `σ = softmax((S_c − max S)/10)`, and the tile keeps
//! `r_c = r·(1 + σ_c − mean σ)` (capped at 1) of its tokens, ranked by its own normalised attention
//! plus the normalised thumbnail attention over it. The thumbnail keeps its top `r·N`. Views that
//! are not tiles (single-view models) fall back to attention top-k.

use ndarray::{Array1, ArrayView1};

use super::{missing, top_k, Budget, Method, Rows, Selection, SelectionInput};
use crate::error::Result;
use crate::family::{View, ViewKind};

/// Thumbnail-guided per-tile budgets.
#[derive(Debug, Default, Clone, Copy)]
pub struct GlobalCom2;

fn l2_normalized(v: ArrayView1<'_, f32>) -> Array1<f32> {
    let n = v.dot(&v).sqrt();
    if n > 0.0 {
        v.mapv(|x| x / n)
    } else {
        v.to_owned()
    }
}

/// The thumbnail token (index into the global view's grid) covering a tile token.
fn thumbnail_token(tile: &View, global: &View, t: usize) -> usize {
    let (th, tw) = tile.grid;
    let (gh, gw) = global.grid;
    let [x0, y0, x1, y1] = tile.region;
    let fx = x0 + (x1 - x0) * ((t % tw) as f32 + 0.5) / tw as f32;
    let fy = y0 + (y1 - y0) * ((t / tw) as f32 + 0.5) / th as f32;
    let gx = ((fx * gw as f32) as usize).min(gw - 1);
    let gy = ((fy * gh as f32) as usize).min(gh - 1);
    gy * gw + gx
}

/// Per-view attention scores from the signals (CLS attention summed over layers, else
/// attention received).
fn view_scores(input: &SelectionInput<'_>) -> Option<Vec<Array1<f32>>> {
    let s = input.signals;
    let flat: Array1<f32> = match (s.get("cls_attention"), s.get("attention_received")) {
        (Some(cls), _) => cls.sum_axis(ndarray::Axis(1)),
        (None, Some(r)) => r.column(0).to_owned(),
        (None, None) => return None,
    };
    let mut out = Vec::with_capacity(input.views.len());
    let mut offset = 0;
    for v in input.views {
        out.push(flat.slice(ndarray::s![offset..offset + v.tokens]).to_owned());
        offset += v.tokens;
    }
    Some(out)
}

impl Method for GlobalCom2 {
    fn name(&self) -> &'static str {
        "globalcom2"
    }

    fn choose(&self, rows: &Rows<'_>, k: usize) -> Result<Chosen> {
        let score = rows.cls().or_else(|| rows.received()).ok_or_else(no_signal)?;
        Ok(Chosen::keep(top_k(score.view(), k)))
    }

    fn select_views(&self, input: &SelectionInput<'_>, budget: Budget) -> Option<Result<Selection>> {
        Some(select(input, budget))
    }
}

use super::Chosen;

/// Registry entry ([`super::METHODS`]).
pub const SPEC: super::MethodSpec = super::MethodSpec {
    name: "globalcom2",
    summary: "GlobalCom2: the thumbnail's attention sets each tile's budget",
    uses: "cls_attention | attention_received",
    params: &[],
    acts: super::Acts::AfterEncoder,
    make: || Box::new(GlobalCom2),
};

fn no_signal() -> crate::error::Error {
    missing(
        "globalcom2",
        "attention signals (glimpse_cls_attention or glimpse_attention_received)",
        "export the model with `python -m glimpse_export` and its pruning-signals option",
    )
}

fn select(input: &SelectionInput<'_>, budget: Budget) -> Result<Selection> {
    let scores = view_scores(input).ok_or_else(no_signal)?;
    let views = input.views;
    let n: usize = views.iter().map(|v| v.tokens).sum();
    let ratio = match budget {
        Budget::Ratio(r) => r as f64,
        Budget::Count(c) => c as f64 / n.max(1) as f64,
    }
    .min(1.0);
    let global = views.iter().position(|v| v.kind == ViewKind::Global);
    let tiles: Vec<usize> =
        views.iter().enumerate().filter(|(_, v)| matches!(v.kind, ViewKind::Tile { .. })).map(|(i, _)| i).collect();
    let mut kept = vec![Vec::new(); views.len()];
    let caps: Vec<usize> = views.iter().map(|v| v.tokens).collect();
    let k = budget.of(n);
    let (Some(g), false) = (global, tiles.is_empty()) else {
        // Not a tiled image: attention top-k per view.
        let exact: Vec<f64> = views.iter().map(|v| ratio * v.tokens as f64).collect();
        for (v, q) in allocate(&exact, &caps, k).into_iter().enumerate() {
            kept[v] = top_k(scores[v].view(), q);
        }
        return Ok(Selection { kept, ..Default::default() });
    };
    let thumb = &scores[g];
    let total: f32 = thumb.iter().map(|x| x.max(0.0)).sum::<f32>().max(f32::MIN_POSITIVE);
    // Share (percent) of thumbnail attention over each tile's region.
    let mut s_c = vec![0.0f64; tiles.len()];
    for (ci, &v) in tiles.iter().enumerate() {
        let mut covered = vec![false; views[g].tokens];
        for t in 0..views[v].tokens {
            covered[thumbnail_token(&views[v], &views[g], t)] = true;
        }
        s_c[ci] = covered.iter().zip(thumb.iter()).filter(|(c, _)| **c).map(|(_, x)| x.max(0.0) as f64).sum::<f64>()
            / total as f64
            * 100.0;
    }
    let max = s_c.iter().cloned().fold(f64::MIN, f64::max);
    let exps: Vec<f64> = s_c.iter().map(|s| ((s - max) / 10.0).exp()).collect();
    let z: f64 = exps.iter().sum();
    let sigma: Vec<f64> = exps.iter().map(|e| e / z).collect();
    let mean = 1.0 / tiles.len() as f64;
    // each view's exact share (thumbnail r·N, tile c r_c·N_c), then whole tokens adding up to k
    let mut exact = vec![0.0f64; views.len()];
    exact[g] = ratio * views[g].tokens as f64;
    for (ci, &v) in tiles.iter().enumerate() {
        exact[v] = (ratio * (1.0 + sigma[ci] - mean)).min(1.0) * views[v].tokens as f64;
    }
    let quota = allocate(&exact, &caps, k);
    kept[g] = top_k(thumb.view(), quota[g]);
    for &v in &tiles {
        let own = l2_normalized(scores[v].view());
        let up: Array1<f32> = (0..views[v].tokens).map(|t| thumb[thumbnail_token(&views[v], &views[g], t)]).collect();
        let combined = own + l2_normalized(up.view());
        kept[v] = top_k(combined.view(), quota[v]);
    }
    Ok(Selection { kept, ..Default::default() })
}

/// Whole-token quotas adding up to exactly `k` (capped by each view's size): start from the
/// rounded shares, then add to the views furthest below their share and take from those
/// furthest above it. Every view keeps one token when `k` allows.
pub fn allocate(exact: &[f64], caps: &[usize], k: usize) -> Vec<usize> {
    let k = k.min(caps.iter().sum());
    let floor = usize::from(k >= caps.len());
    let mut q: Vec<usize> =
        exact.iter().zip(caps).map(|(e, &c)| (e.round().max(0.0) as usize).clamp(floor.min(c), c)).collect();
    let gap = |i: usize, q: &[usize]| exact[i] - q[i] as f64;
    while q.iter().sum::<usize>() < k {
        let Some(i) = (0..q.len()).filter(|&i| q[i] < caps[i]).max_by(|&a, &b| gap(a, &q).total_cmp(&gap(b, &q)))
        else {
            break;
        };
        q[i] += 1;
    }
    while q.iter().sum::<usize>() > k {
        let Some(i) = (0..q.len()).filter(|&i| q[i] > floor).min_by(|&a, &b| gap(a, &q).total_cmp(&gap(b, &q))) else {
            break;
        };
        q[i] -= 1;
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::{SelectConfig, Selector, Signals};
    use ndarray::Array2;

    fn tile(row: usize, col: usize) -> View {
        crate::select::testutil::quadrant_tile(row, col, 4)
    }

    /// 2 x 2 tiles + thumbnail; the thumbnail's attention sits on its top-right quadrant (tile 0,1).
    fn quadrant_scene() -> (Vec<View>, Signals, Array2<f32>) {
        let views = vec![
            tile(0, 0),
            tile(0, 1),
            tile(1, 0),
            tile(1, 1),
            View { kind: ViewKind::Global, tokens: 16, grid: (4, 4), region: [0.0, 0.0, 1.0, 1.0] },
        ];
        let mut received = Array1::from_elem(80, 1.0f32);
        for t in [2, 3, 6, 7] {
            received[64 + t] = 40.0;
        }
        let mut signals = Signals::default();
        signals.insert("attention_received", received.insert_axis(ndarray::Axis(1)));
        (views, signals, Array2::from_elem((80, 4), 1.0f32))
    }

    #[test]
    fn budgets_are_kept_exactly() {
        let (views, signals, f) = quadrant_scene();
        for budget in [Budget::Count(2), Budget::Count(5), Budget::Count(63), Budget::Count(79), Budget::Ratio(0.3)] {
            let cfg = SelectConfig { method: "globalcom2".into(), budget, ..Default::default() };
            let sel = Selector::new(cfg)
                .unwrap()
                .select(&SelectionInput { features: &f, views: &views, signals: &signals })
                .unwrap();
            assert_eq!(sel.total(), budget.of(80), "{budget}");
        }
        assert_eq!(allocate(&[10.4, 0.2, 5.6], &[16, 16, 16], 16), vec![10, 1, 5]);
        assert_eq!(allocate(&[3.0, 3.0], &[2, 16], 6), vec![2, 4]);
    }

    #[test]
    fn the_tile_the_thumbnail_looks_at_keeps_the_most() {
        let (views, signals, f) = quadrant_scene();
        let cfg = SelectConfig { method: "globalcom2".into(), budget: Budget::Ratio(0.25), ..Default::default() };
        let sel = Selector::new(cfg)
            .unwrap()
            .select(&SelectionInput { features: &f, views: &views, signals: &signals })
            .unwrap();
        let counts = sel.counts();
        assert!(counts[1] > counts[0] && counts[1] > counts[2] && counts[1] > counts[3], "{counts:?}");
        assert_eq!(counts[4], 4, "thumbnail keeps r·N");
        assert_eq!(thumbnail_token(&views[1], &views[4], 0), 2);
    }
}
