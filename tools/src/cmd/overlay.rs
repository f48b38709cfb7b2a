//! `--show-kept`: draws which image regions reached the language model. Patches whose tokens
//! were pruned are dimmed; regions never encoded (skipped tiles, skipped patch groups) are
//! dimmed further and crossed in red; patches that token merging joined are tinted, one colour
//! per merge group.

use std::path::Path;

use anyhow::{Context, Result};
use glimpse_runtime::family::{View, ViewKind};
use glimpse_runtime::pipeline::KeptLayout;
use image::{Rgb, RgbImage};

/// Pixel rectangle `[x0, y0, x1, y1)` of token `t` of a view in an image of `w × h`.
fn cell(view: &View, t: usize, w: u32, h: u32) -> [u32; 4] {
    let (gh, gw) = view.grid;
    let [rx0, ry0, rx1, ry1] = view.region;
    let (r, c) = (t / gw, t % gw);
    let fx = |f: f32| ((rx0 + (rx1 - rx0) * f) * w as f32).round() as u32;
    let fy = |f: f32| ((ry0 + (ry1 - ry0) * f) * h as f32).round() as u32;
    [fx(c as f32 / gw as f32), fy(r as f32 / gh as f32), fx((c + 1) as f32 / gw as f32), fy((r + 1) as f32 / gh as f32)]
}

fn paint(img: &mut RgbImage, [x0, y0, x1, y1]: [u32; 4], f: impl Fn(u32, u32, Rgb<u8>) -> Rgb<u8>) {
    for y in y0..y1.min(img.height()) {
        for x in x0..x1.min(img.width()) {
            let p = *img.get_pixel(x, y);
            img.put_pixel(x, y, f(x, y, p));
        }
    }
}

/// Never encoded: dark with red diagonal hatching.
fn hatch(x: u32, y: u32, p: Rgb<u8>) -> Rgb<u8> {
    if (x + y) % 8 < 2 {
        Rgb([220, 40, 40])
    } else {
        Rgb(p.0.map(|c| (c as f32 * 0.15) as u8))
    }
}

/// Tints every patch of `view` that shares its merge group with another patch, one colour per
/// group (the view's patches form a square grid over its region).
fn tint_merges(img: &mut RgbImage, view: &View, groups: &[u32], w: u32, h: u32) {
    let side = (groups.len() as f64).sqrt().round() as usize;
    if side * side != groups.len() {
        return;
    }
    let mut size = std::collections::BTreeMap::new();
    for &g in groups {
        *size.entry(g).or_insert(0usize) += 1;
    }
    let patch_view = View { tokens: groups.len(), grid: (side, side), ..view.clone() };
    for (p, &g) in groups.iter().enumerate() {
        if g == glimpse_runtime::pipeline::NOT_ENCODED || size.get(&g).copied().unwrap_or(0) < 2 {
            continue;
        }
        let hash = (g as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let colour = [(hash >> 16) as u8 | 0x40, (hash >> 32) as u8 | 0x40, (hash >> 48) as u8 | 0x40];
        paint(img, cell(&patch_view, p, w, h), |_, _, px| {
            Rgb([0, 1, 2].map(|i| ((px.0[i] as u16 + colour[i] as u16) / 2) as u8))
        });
    }
}

/// Writes the overlay of `layout` on `image` to `out` (PNG).
pub fn show_kept(image: &RgbImage, layout: &KeptLayout, out: &Path) -> Result<()> {
    let (w, h) = image.dimensions();
    let mut canvas = image.clone();
    let dim = |k: f32| move |_x: u32, _y: u32, p: Rgb<u8>| Rgb(p.0.map(|c| (c as f32 * k) as u8));
    // Draw tiles when the image was split; otherwise the single view covering the image.
    let tiled =
        layout.views.iter().any(|v| matches!(v.kind, ViewKind::Tile { .. })) || !layout.skipped_tiles.is_empty();
    for (v, (view, kept)) in layout.views.iter().zip(&layout.kept).enumerate() {
        let draw = match view.kind {
            ViewKind::Tile { .. } => true,
            ViewKind::Global | ViewKind::Whole => !tiled,
            // an anyres grid covers the image too, but its last column is newline tokens: the
            // base view (Global) is drawn instead
            ViewKind::Grid => false,
        };
        if !draw {
            continue;
        }
        let mut is_kept = vec![false; view.tokens];
        for &i in kept {
            if let Some(k) = is_kept.get_mut(i) {
                *k = true;
            }
        }
        for (t, k) in is_kept.iter().enumerate() {
            if !k {
                paint(&mut canvas, cell(view, t, w, h), dim(0.3));
            }
        }
        // never encoded: hatched here, or below as a whole tile when the tile was skipped
        let whole_tile_skipped = layout.skipped_tiles.iter().any(|t| t.kind == view.kind);
        if let Some(present) = layout.present.as_ref().and_then(|p| p.get(v)).filter(|_| !whole_tile_skipped) {
            for t in (0..view.tokens).filter(|t| present.binary_search(t).is_err()) {
                paint(&mut canvas, cell(view, t, w, h), hatch);
            }
        }
        if let Some(groups) = layout.merged.get(v).filter(|g| !g.is_empty()) {
            tint_merges(&mut canvas, view, groups, w, h);
        }
    }
    for tile in &layout.skipped_tiles {
        let [rx0, ry0, rx1, ry1] = tile.region;
        let rect = [(rx0 * w as f32) as u32, (ry0 * h as f32) as u32, (rx1 * w as f32) as u32, (ry1 * h as f32) as u32];
        paint(&mut canvas, rect, hatch);
    }
    canvas.save(out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruned_cells_are_dimmed_and_kept_cells_untouched() {
        let img = RgbImage::from_pixel(8, 8, Rgb([200, 200, 200]));
        let view = View { kind: ViewKind::Whole, tokens: 4, grid: (2, 2), region: [0.0, 0.0, 1.0, 1.0] };
        let layout = KeptLayout {
            views: vec![view.clone()],
            kept: vec![vec![0, 3]],
            skipped_tiles: vec![],
            present: None,
            merged: vec![],
        };
        let out = std::env::temp_dir().join(format!("glimpse-overlay-{}.png", std::process::id()));
        show_kept(&img, &layout, &out).unwrap();
        let drawn = image::open(&out).unwrap().to_rgb8();
        let _ = std::fs::remove_file(&out);
        assert_eq!(drawn.get_pixel(1, 1).0, [200, 200, 200]);
        assert_eq!(drawn.get_pixel(6, 1).0, [60, 60, 60]);
        assert_eq!(drawn.get_pixel(6, 6).0, [200, 200, 200]);
        // a token never encoded is hatched; patches merged together are tinted alike
        let layout = KeptLayout {
            views: vec![view],
            kept: vec![vec![0, 1, 2]],
            skipped_tiles: vec![],
            present: Some(vec![vec![0, 1, 2]]),
            merged: vec![vec![0, 1, 1, 2]],
        };
        show_kept(&img, &layout, &out).unwrap();
        let drawn = image::open(&out).unwrap().to_rgb8();
        let _ = std::fs::remove_file(&out);
        assert_eq!(drawn.get_pixel(0, 0).0, [200, 200, 200], "a group of one is not tinted");
        assert_ne!(drawn.get_pixel(6, 1).0, [200, 200, 200], "merged patch tinted");
        assert_eq!(drawn.get_pixel(6, 1).0, drawn.get_pixel(1, 6).0, "one colour per group");
        // pruned (x0.3) and never encoded (x0.15)
        assert_eq!(drawn.get_pixel(5, 5).0, [9, 9, 9], "never encoded: darkened");
        assert_eq!(drawn.get_pixel(4, 4).0, [220, 40, 40], "never encoded: hatched");
    }
}
