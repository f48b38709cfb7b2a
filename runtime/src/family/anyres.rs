//! "anyres" feature packing (LLaVA-NeXT / LLaVA-OneVision): the encoder sees a base view plus a
//! grid of crops, and the language model sees the base view's rows followed by the crops stitched
//! into one feature grid, with the padding rows or columns removed, downsampled when it is larger
//! than `anyres_max_N` crops' worth, and one `image_newline` row closing every grid row. The
//! geometry depends only on the image size, so the family computes it in preprocessing
//! ([`AnyresLayout`]) and the pipeline applies it to the encoder output ([`AnyresLayout::pack`]).
//! Mirrors transformers' `get_anyres_image_grid_shape`, `unpad_image` and
//! `LlavaOnevisionModel.pack_image_features`.

use ndarray::{s, Array2, ArrayView1, ArrayView2};

use crate::error::{Error, Result};

/// How one image's encoder rows become the rows the language model receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnyresLayout {
    /// Feature rows per crop (`side * side`); the base view comes first and has as many.
    pub side: usize,
    /// Crops per grid column and per grid row: `(rows, cols)`.
    pub crops: (usize, usize),
    /// Rows kept of the stitched `crops.0 * side` rows after unpadding (`start..end`).
    pub rows: (usize, usize),
    /// Columns kept of the stitched `crops.1 * side` columns after unpadding (`start..end`).
    pub cols: (usize, usize),
    /// Grid size after the `anyres_max_N` downsampling: `(rows, cols)`; equal to the unpadded
    /// size when no downsampling applies.
    pub out: (usize, usize),
}

impl AnyresLayout {
    /// The layout for an image of `(height, width)` pixels resized into a grid of `crops` crops,
    /// `side` feature rows per crop side, and at most `max_crops` crops' worth of grid tokens.
    pub fn new(image: (usize, usize), crops: (usize, usize), side: usize, max_crops: usize) -> AnyresLayout {
        let (h, w) = (image.0 as f64, image.1 as f64);
        let (gh, gw) = (crops.0 * side, crops.1 * side);
        let (mut rows, mut cols) = ((0, gh), (0, gw));
        // unpad_image: the resized image sits centred in the grid; drop the padding bands.
        if w / h > gw as f64 / gh as f64 {
            let new_h = round7(h * (gw as f64 / w)) as usize;
            let pad = gh.saturating_sub(new_h) / 2;
            rows = (pad, gh - pad);
        } else {
            let new_w = round7(w * (gh as f64 / h)) as usize;
            let pad = gw.saturating_sub(new_w) / 2;
            cols = (pad, gw - pad);
        }
        let (ch, cw) = (rows.1 - rows.0, cols.1 - cols.0);
        let ratio = ((ch * cw) as f64 / (max_crops * side * side) as f64).sqrt();
        let out = if ratio > 1.1 {
            (py_floordiv(ch as f64, ratio) as usize, py_floordiv(cw as f64, ratio) as usize)
        } else {
            (ch, cw)
        };
        AnyresLayout { side, crops, rows, cols, out }
    }

    /// Encoder rows this layout consumes: the base view and every crop.
    pub fn encoder_rows(&self) -> usize {
        (1 + self.crops.0 * self.crops.1) * self.side * self.side
    }

    /// Rows the language model receives: the base view, then the grid with a newline per row.
    pub fn packed_rows(&self) -> usize {
        self.side * self.side + self.out.0 * (self.out.1 + 1)
    }

    /// Packs encoder rows `[encoder_rows, d]` (base view first, then crops in raster order) into
    /// `[packed_rows, d]`, ending each grid row with `newline`.
    pub fn pack(&self, features: ArrayView2<f32>, newline: ArrayView1<f32>) -> Result<Array2<f32>> {
        let d = features.ncols();
        if features.nrows() != self.encoder_rows() || newline.len() != d {
            return Err(Error::interface(
                "vision_encoder",
                format!(
                    "anyres packing expects {} feature rows and a newline of width {d}, got {} rows and {}",
                    self.encoder_rows(),
                    features.nrows(),
                    newline.len()
                ),
            ));
        }
        let per = self.side * self.side;
        let (ch, cw) = (self.rows.1 - self.rows.0, self.cols.1 - self.cols.0);
        // Stitch the unpadded grid: grid row r, col c lives in crop (r / side, c / side).
        let mut grid = Array2::<f32>::zeros((ch * cw, d));
        for r in 0..ch {
            let gr = r + self.rows.0;
            for c in 0..cw {
                let gc = c + self.cols.0;
                let crop = (gr / self.side) * self.crops.1 + gc / self.side;
                let src = per * (1 + crop) + (gr % self.side) * self.side + gc % self.side;
                grid.row_mut(r * cw + c).assign(&features.row(src));
            }
        }
        let grid = if self.out != (ch, cw) { bilinear(&grid, (ch, cw), self.out) } else { grid };
        let (oh, ow) = self.out;
        let mut out = Array2::<f32>::zeros((self.packed_rows(), d));
        out.slice_mut(s![..per, ..]).assign(&features.slice(s![..per, ..]));
        for r in 0..oh {
            let base = per + r * (ow + 1);
            out.slice_mut(s![base..base + ow, ..]).assign(&grid.slice(s![r * ow..(r + 1) * ow, ..]));
            out.row_mut(base + ow).assign(&newline);
        }
        Ok(out)
    }
}

/// Python's `round(x, 7)` for the non-negative sizes it is used on here.
fn round7(x: f64) -> f64 {
    (x * 1e7).round() / 1e7
}

/// Python's float floor division `a // b` (CPython `float_floor_div`), bit for bit: the grid size
/// after downsampling must equal the processor's token count.
fn py_floordiv(a: f64, b: f64) -> f64 {
    let m = a % b;
    let mut div = (a - m) / b;
    if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
        div -= 1.0;
    }
    if div == 0.0 {
        return 0.0f64.copysign(a / b);
    }
    let mut f = div.floor();
    if div - f > 0.5 {
        f += 1.0;
    }
    f
}

/// `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` over a row-major
/// `[h * w, d]` grid.
fn bilinear(grid: &Array2<f32>, from: (usize, usize), to: (usize, usize)) -> Array2<f32> {
    let d = grid.ncols();
    let axis = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|i| {
                let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (src as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                let l1 = src - i0 as f32;
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let (ys, xs) = (axis(from.0, to.0), axis(from.1, to.1));
    let mut out = Array2::<f32>::zeros((to.0 * to.1, d));
    for (oy, &(y0, y1, wy0, wy1)) in ys.iter().enumerate() {
        for (ox, &(x0, x1, wx0, wx1)) in xs.iter().enumerate() {
            let at = |y: usize, x: usize| grid.row(y * from.1 + x);
            let (a, b, c, e) = (at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1));
            let mut row = out.row_mut(oy * to.1 + ox);
            for k in 0..d {
                row[k] = wy0 * (wx0 * a[k] + wx1 * b[k]) + wy1 * (wx0 * c[k] + wx1 * e[k]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floordiv_matches_python() {
        // Values checked with CPython: 16 // (4/3) == 12.0, 8 // 2.0 == 4.0, 7 // 2.5 == 2.0.
        assert_eq!(py_floordiv(16.0, (256.0f64 / 144.0).sqrt()), 12.0);
        assert_eq!(py_floordiv(8.0, 2.0), 4.0);
        assert_eq!(py_floordiv(7.0, 2.5), 2.0);
    }

    #[test]
    fn layout_unpads_and_downsamples_like_the_processor() {
        // tiny-llava-onevision's cases (side 4): processor token counts 70, 152 and 172.
        let small = AnyresLayout::new((40, 48), (2, 2), 4, 9);
        assert_eq!((small.rows, small.cols, small.out), ((1, 7), (0, 8), (6, 8)));
        assert_eq!(small.packed_rows(), 70);
        assert_eq!(AnyresLayout::new((90, 200), (2, 4), 4, 9).packed_rows(), 152);
        let scene = AnyresLayout::new((256, 256), (4, 4), 4, 9);
        assert_eq!(scene.out, (12, 12));
        assert_eq!(scene.packed_rows(), 172);
    }

    #[test]
    fn pack_places_crops_and_newlines() {
        // side 1, 1 x 2 crops, no unpadding: rows = [base, crop0, crop1] -> [base, crop0, crop1, nl].
        let layout = AnyresLayout { side: 1, crops: (1, 2), rows: (0, 1), cols: (0, 2), out: (1, 2) };
        let feats = Array2::from_shape_vec((3, 1), vec![7.0, 1.0, 2.0]).expect("shape");
        let nl = ndarray::arr1(&[-1.0f32]);
        let packed = layout.pack(feats.view(), nl.view()).expect("pack");
        assert_eq!(packed.column(0).to_vec(), vec![7.0, 1.0, 2.0, -1.0]);
        assert!(layout.pack(feats.slice(s![..2, ..]), nl.view()).is_err());
    }

    #[test]
    fn bilinear_halving_averages_pairs() {
        let grid = Array2::from_shape_vec((4, 1), vec![0.0, 2.0, 4.0, 6.0]).expect("shape");
        let out = bilinear(&grid, (1, 4), (1, 2));
        assert_eq!(out.column(0).to_vec(), vec![1.0, 5.0]);
    }
}
