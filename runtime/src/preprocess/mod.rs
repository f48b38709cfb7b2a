//! Image loading and the building blocks shared by the families' preprocessors (each family's
//! own recipe lives in its family file).

use std::path::Path;

use image::{ImageReader, RgbImage};
use ndarray::{Array3, ArrayViewMut3};

use crate::error::{Error, Result};

pub mod resample;

pub use resample::{resize, Filter};

/// Limits applied before an image is decoded, so a hostile or huge file cannot exhaust memory.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    /// Largest accepted width × height.
    pub max_pixels: u64,
    /// Largest accepted width or height.
    pub max_side: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits { max_pixels: 64 * 1024 * 1024, max_side: 16384 }
    }
}

/// Reads and decodes an image file to 8-bit RGB, checking its size from the header first.
pub fn load_image(path: &Path, limits: ImageLimits) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile { path: path.to_path_buf(), what: "image".into() },
        _ => Error::Io { path: path.to_path_buf(), source },
    })?;
    decode_image(&bytes, path, limits)
}

/// Decodes image bytes (`path` is used in messages only).
pub fn decode_image(bytes: &[u8], path: &Path, limits: ImageLimits) -> Result<RgbImage> {
    let err = |message: String| Error::Image { path: path.to_path_buf(), message };
    let reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| err(e.to_string()))?;
    if reader.format().is_none() {
        return Err(err("unrecognised image format (supported: PNG, JPEG)".into()));
    }
    let (w, h) = reader.into_dimensions().map_err(|e| err(e.to_string()))?;
    if w == 0 || h == 0 {
        return Err(err(format!("image has zero size {w}x{h}")));
    }
    if w > limits.max_side || h > limits.max_side || (w as u64) * (h as u64) > limits.max_pixels {
        return Err(Error::ImageTooLarge {
            path: path.to_path_buf(),
            width: w,
            height: h,
            limit: format!("{} pixels and {} per side", limits.max_pixels, limits.max_side),
        });
    }
    let mut reader =
        ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| err(e.to_string()))?;
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l.max_alloc = Some(limits.max_pixels.saturating_mul(16));
    reader.limits(l);
    let img = reader.decode().map_err(|e| err(e.to_string()))?;
    Ok(if img.color().has_alpha() { composite_on_white(&img.to_rgba8()) } else { img.to_rgb8() })
}

/// Flattens an RGBA image onto white with Pillow's `alpha_composite` arithmetic, as
/// transformers' `convert_to_rgb` does.
pub fn composite_on_white(img: &image::RgbaImage) -> RgbImage {
    const BITS: u32 = 7;
    let shiftdiv255 = |a: u32| ((a >> 8) + a) >> 8;
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let p = img.get_pixel(x, y).0;
        let a = p[3] as u32;
        let coef1 = a << BITS;
        let coef2 = (255 - a) << BITS;
        let mut out = [0u8; 3];
        for c in 0..3 {
            let t = p[c] as u32 * coef1 + 255 * coef2;
            out[c] = (shiftdiv255(t + (0x80 << BITS)) >> BITS) as u8;
        }
        image::Rgb(out)
    })
}

/// Crops `[x0, x1) × [y0, y1)` (clamped to the image).
pub fn crop(img: &RgbImage, x0: u32, y0: u32, x1: u32, y1: u32) -> RgbImage {
    let x1 = x1.min(img.width());
    let y1 = y1.min(img.height());
    image::imageops::crop_imm(img, x0, y0, x1.saturating_sub(x0), y1.saturating_sub(y0)).to_image()
}

/// Writes `(pixel * rescale - mean) / std` into a `[3, H, W]` view, as transformers' rescale
/// (in f64, cast to f32) followed by normalize (in f32) does.
pub fn normalize_into(img: &RgbImage, rescale: f64, mean: &[f32; 3], std: &[f32; 3], mut out: ArrayViewMut3<f32>) {
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            let v = (p.0[c] as f64 * rescale) as f32;
            out[[c, y as usize, x as usize]] = (v - mean[c]) / std[c];
        }
    }
}

/// Normalises an image into a new `[3, H, W]` array.
pub fn normalize(img: &RgbImage, rescale: f64, mean: &[f32; 3], std: &[f32; 3]) -> Array3<f32> {
    let mut out = Array3::zeros((3, img.height() as usize, img.width() as usize));
    normalize_into(img, rescale, mean, std, out.view_mut());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compositing_keeps_opaque_and_whitens_transparent() {
        let img = image::RgbaImage::from_fn(3, 1, |x, _| match x {
            0 => image::Rgba([10, 20, 30, 255]),
            1 => image::Rgba([10, 20, 30, 0]),
            _ => image::Rgba([0, 0, 0, 128]),
        });
        let out = composite_on_white(&img);
        assert_eq!(out.get_pixel(0, 0).0, [10, 20, 30]);
        assert_eq!(out.get_pixel(1, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(2, 0).0, [127, 127, 127]);
    }
}
