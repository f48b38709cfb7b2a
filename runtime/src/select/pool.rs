//! `pool`: 2-D average pooling on each view's patch grid (LLaVolta style). Each pooled cell is
//! represented by its top-left token, carrying the cell's mean feature, so raster order and
//! positions stay meaningful.

use ndarray::Axis;

use super::{Chosen, Method, Rows};
use crate::error::Result;

/// Registry entry ([`super::METHODS`]).
pub const SPEC: super::MethodSpec = super::MethodSpec {
    name: "pool",
    summary: "2-D average pooling of each view's patch grid (baseline)",
    uses: "features only",
    params: &[],
    acts: super::Acts::AfterEncoder,
    make: || Box::new(Pool),
};

/// Average pooling to a smaller grid.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pool;

/// Adaptive pooling bounds as torch's `adaptive_avg_pool`: cell `i` of `out` covers
/// `[floor(i·n/out), ceil((i+1)·n/out))`.
fn bounds(n: usize, out: usize, i: usize) -> (usize, usize) {
    (i * n / out, ((i + 1) * n).div_ceil(out))
}

/// The pooled grid `(gh, gw)` with `gh·gw >= k` closest to the view's aspect ratio.
fn pooled_grid(h: usize, w: usize, k: usize) -> (usize, usize) {
    let mut best = (h, w);
    let mut best_cost = f64::MAX;
    for gh in 1..=h {
        let gw = k.div_ceil(gh);
        if gw > w {
            continue;
        }
        let waste = (gh * gw - k) as f64;
        let aspect = ((gh as f64 / gw as f64) / (h as f64 / w as f64)).ln().abs();
        let cost = waste * 10.0 + aspect;
        if cost < best_cost {
            best_cost = cost;
            best = (gh, gw);
        }
    }
    best
}

impl Method for Pool {
    fn name(&self) -> &'static str {
        "pool"
    }

    fn per_view_only(&self) -> bool {
        true
    }

    fn choose(&self, rows: &Rows<'_>, k: usize) -> Result<Chosen> {
        let n = rows.features.nrows();
        let (h, w) = match rows.grid {
            Some((h, w)) if h * w == n => (h, w),
            _ => (1, n),
        };
        let (gh, gw) = pooled_grid(h, w, k);
        let mut cells = Vec::with_capacity(gh * gw);
        for ci in 0..gh {
            for cj in 0..gw {
                let (r0, r1) = bounds(h, gh, ci);
                let (c0, c1) = bounds(w, gw, cj);
                let members: Vec<usize> = (r0..r1).flat_map(|r| (c0..c1).map(move |c| r * w + c)).collect();
                cells.push(members);
            }
        }
        // Drop surplus cells evenly so exactly k remain.
        let keep = super::uniform::strided(cells.len(), k);
        let mut chosen = Chosen::default();
        let mut used = std::collections::BTreeSet::new();
        for ci in keep {
            let members = &cells[ci];
            // Overlapping adaptive cells can share a top-left token; take the first unused one.
            let Some(&rep) = members.iter().find(|m| !used.contains(*m)) else { continue };
            used.insert(rep);
            let mean = rows.features.select(Axis(0), members).mean_axis(Axis(0));
            if let Some(mean) = mean {
                chosen.replaced.push((rep, mean));
            }
            chosen.indices.push(rep);
        }
        // Fill (rarely needed) from unused tokens in raster order.
        let mut i = 0;
        while chosen.indices.len() < k && i < n {
            if used.insert(i) {
                chosen.indices.push(i);
            }
            i += 1;
        }
        chosen.indices.sort_unstable();
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use ndarray::Array2;

    #[test]
    fn two_by_two_pooling_averages_cells() {
        let f = Array2::from_shape_fn((16, 1), |(i, _)| i as f32);
        let mut r = rows(&f);
        r.grid = Some((4, 4));
        let c = Pool.choose(&r, 4).unwrap();
        assert_eq!(c.indices, vec![0, 2, 8, 10]);
        let means: Vec<f32> = c.replaced.iter().map(|(_, m)| m[0]).collect();
        assert_eq!(means, vec![(0. + 1. + 4. + 5.) / 4., (2. + 3. + 6. + 7.) / 4., 10.5, 12.5]);
    }

    #[test]
    fn odd_budgets_are_exact() {
        let f = features(64, 3, 1);
        let mut r = rows(&f);
        r.grid = Some((8, 8));
        for k in 1..64 {
            let c = Pool.choose(&r, k).unwrap();
            assert_eq!(c.indices.len(), k, "k = {k}");
            assert!(c.indices.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
