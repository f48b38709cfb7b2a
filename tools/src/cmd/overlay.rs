//! `--show-kept`: draws which image regions reached the language model. Patches whose tokens
//! were pruned are dimmed; tiles that were never encoded are dimmed further and crossed in red.

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

/// Writes the overlay of `layout` on `image` to `out` (PNG).
pub fn show_kept(image: &RgbImage, layout: &KeptLayout, out: &Path) -> Result<()> {
    let (w, h) = image.dimensions();
    let mut canvas = image.clone();
    let dim = |k: f32| move |_x: u32, _y: u32, p: Rgb<u8>| Rgb(p.0.map(|c| (c as f32 * k) as u8));
    // Draw tiles when the image was split; otherwise the single view covering the image.
    let tiled =
        layout.views.iter().any(|v| matches!(v.kind, ViewKind::Tile { .. })) || !layout.skipped_tiles.is_empty();
    for (view, kept) in layout.views.iter().zip(&layout.kept) {
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
    }
    for tile in &layout.skipped_tiles {
        let [rx0, ry0, rx1, ry1] = tile.region;
        let rect = [(rx0 * w as f32) as u32, (ry0 * h as f32) as u32, (rx1 * w as f32) as u32, (ry1 * h as f32) as u32];
        paint(&mut canvas, rect, |x, y, p| {
            if (x + y) % 8 < 2 {
                Rgb([220, 40, 40])
            } else {
                Rgb(p.0.map(|c| (c as f32 * 0.15) as u8))
            }
        });
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
        let layout = KeptLayout { views: vec![view], kept: vec![vec![0, 3]], skipped_tiles: vec![], present: None };
        let out = std::env::temp_dir().join(format!("glimpse-overlay-{}.png", std::process::id()));
        show_kept(&img, &layout, &out).unwrap();
        let drawn = image::open(&out).unwrap().to_rgb8();
        let _ = std::fs::remove_file(&out);
        assert_eq!(drawn.get_pixel(1, 1).0, [200, 200, 200]);
        assert_eq!(drawn.get_pixel(6, 1).0, [60, 60, 60]);
        assert_eq!(drawn.get_pixel(6, 6).0, [200, 200, 200]);
    }
}
