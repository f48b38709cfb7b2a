//! Pillow-compatible resampling of 8-bit RGB images.
//!
//! transformers' image processors resize through `PIL.Image.resize`, so matching Pillow's
//! arithmetic (separable filter, horizontal pass first, 22-bit fixed-point coefficients, 8-bit
//! intermediate) is what makes our `pixel_values` equal theirs rather than merely close.

use image::RgbImage;

/// Resampling filters, named as in Pillow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR` (triangle, support 1).
    Bilinear,
    /// `Image.BICUBIC` (Keys cubic, a = -0.5, support 2).
    Bicubic,
    /// `Image.LANCZOS` (Lanczos-3).
    Lanczos,
}

impl Filter {
    /// The filter for a Pillow / transformers `resample` integer (`PILImageResampling`).
    pub fn from_pil_code(code: u64) -> Option<Filter> {
        match code {
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            1 => Some(Filter::Lanczos),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point filter taps for one output axis: for each output index the first input index,
/// the tap count, and `ksize` coefficients.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
}

fn precompute(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.eval((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..ksize {
            let v = if x < n && ww != 0.0 {
                k[x] / ww
            } else if x < n {
                k[x]
            } else {
                0.0
            };
            let f = v * (1u64 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 { (-0.5 + f) as i32 } else { (0.5 + f) as i32 };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, kk }
}

#[inline]
fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes like `PIL.Image.resize((width, height), resample=filter)`; returns a copy when the
/// size is unchanged, as Pillow does.
pub fn resize(src: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (w0, h0) = (src.width() as usize, src.height() as usize);
    let (w1, h1) = (width.max(1) as usize, height.max(1) as usize);
    if (w0, h0) == (w1, h1) {
        return src.clone();
    }
    let horiz = precompute(w0, w1, filter);
    let vert = precompute(h0, h1, filter);
    let mut data: Vec<u8> = src.as_raw().clone();
    let (mut cur_w, mut cur_h) = (w0, h0);
    let mut vbounds = vert.bounds.clone();

    if w1 != w0 {
        // Rows the vertical pass will read, as Pillow restricts the horizontal pass to them.
        let first = vbounds[0].0;
        let last = vbounds[h1 - 1].0 + vbounds[h1 - 1].1;
        let rows = if h1 != h0 { first..last } else { 0..h0 };
        if h1 != h0 {
            for b in &mut vbounds {
                b.0 -= first;
            }
        }
        let mut out = vec![0u8; w1 * rows.len() * 3];
        for (yo, yi) in rows.clone().enumerate() {
            let row = &data[yi * w0 * 3..(yi + 1) * w0 * 3];
            for xx in 0..w1 {
                let (xmin, n) = horiz.bounds[xx];
                let k = &horiz.kk[xx * horiz.ksize..xx * horiz.ksize + n];
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (i, &kv) in k.iter().enumerate() {
                    let p = (xmin + i) * 3;
                    for c in 0..3 {
                        acc[c] += row[p + c] as i64 * kv as i64;
                    }
                }
                let o = (yo * w1 + xx) * 3;
                for c in 0..3 {
                    out[o + c] = clip8(acc[c]);
                }
            }
        }
        data = out;
        cur_w = w1;
        cur_h = rows.len();
    }
    if h1 != h0 {
        let mut out = vec![0u8; cur_w * h1 * 3];
        for (yy, &(ymin, n)) in vbounds.iter().enumerate() {
            let k = &vert.kk[yy * vert.ksize..yy * vert.ksize + n];
            for xx in 0..cur_w {
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (i, &kv) in k.iter().enumerate() {
                    let p = ((ymin + i) * cur_w + xx) * 3;
                    for c in 0..3 {
                        acc[c] += data[p + c] as i64 * kv as i64;
                    }
                }
                let o = (yy * cur_w + xx) * 3;
                for c in 0..3 {
                    out[o + c] = clip8(acc[c]);
                }
            }
        }
        data = out;
        cur_h = h1;
    }
    debug_assert_eq!((cur_w, cur_h), (w1, h1));
    RgbImage::from_raw(w1 as u32, h1 as u32, data).unwrap_or_else(|| RgbImage::new(w1 as u32, h1 as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([10, 200, 77]));
        for f in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            for (w, h) in [(64, 64), (10, 5), (37, 50), (100, 23)] {
                let out = resize(&img, w, h, f);
                assert_eq!(out.dimensions(), (w, h));
                assert!(out.pixels().all(|p| p.0 == [10, 200, 77]), "{f:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn same_size_is_a_copy() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 3]));
        assert_eq!(resize(&img, 5, 4, Filter::Lanczos), img);
    }
}
