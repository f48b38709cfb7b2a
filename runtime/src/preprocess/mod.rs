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
    /// Largest accepted file, in bytes (checked before reading it).
    pub max_file_bytes: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits { max_pixels: 64 * 1024 * 1024, max_side: 16384, max_file_bytes: 256 * 1024 * 1024 }
    }
}

/// Reads and decodes an image file to 8-bit RGB. Before reading it all: the path must be a
/// regular file within the size limit whose first bytes are a PNG or JPEG signature; then the
/// dimensions are checked from the header, then it is decoded.
pub fn load_image(path: &Path, limits: ImageLimits) -> Result<RgbImage> {
    use std::io::Read;
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile { path: path.to_path_buf(), what: "image".into() },
        _ => Error::Io { path: path.to_path_buf(), source },
    };
    let err = |message: String| Error::Image { path: path.to_path_buf(), message };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(err("not a regular file (a directory, device or pipe cannot be an image)".into()));
    }
    if meta.len() > limits.max_file_bytes {
        return Err(err(format!("file is {} bytes, over the limit of {}", meta.len(), limits.max_file_bytes)));
    }
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut head = [0u8; 8];
    let n = file.read(&mut head).map_err(io)?;
    if sniff(&head[..n]).is_none() {
        return Err(err("unrecognised image format (supported: PNG, JPEG)".into()));
    }
    let mut bytes = head[..n].to_vec();
    file.take(limits.max_file_bytes).read_to_end(&mut bytes).map_err(io)?;
    decode_image(&bytes, path, limits)
}

/// The format a file's first bytes announce, if PNG or JPEG.
pub fn sniff(head: &[u8]) -> Option<image::ImageFormat> {
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(image::ImageFormat::Png)
    } else if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(image::ImageFormat::Jpeg)
    } else {
        None
    }
}

/// Whether a JPEG ends before its main image data does: the segments before the first scan are
/// skipped by their lengths (an EXIF thumbnail's markers are inside them), and the scan data
/// after it must reach an end-of-image marker. Pillow refuses such files ("image file is
/// truncated"); the JPEG decoder would fill the missing part with grey.
fn jpeg_truncated(bytes: &[u8]) -> bool {
    let mut i = 2;
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return true;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        if marker == 0xDA {
            let scan = (i + 2 + len).min(bytes.len());
            return !bytes[scan..].windows(2).any(|w| w == [0xFF, 0xD9]);
        }
        i += 2 + len;
    }
    true
}

/// Decodes image bytes (`path` is used in messages only).
pub fn decode_image(bytes: &[u8], path: &Path, limits: ImageLimits) -> Result<RgbImage> {
    let err = |message: String| Error::Image { path: path.to_path_buf(), message };
    let reader = ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| err(e.to_string()))?;
    match reader.format() {
        None => return Err(err("unrecognised image format (supported: PNG, JPEG)".into())),
        Some(image::ImageFormat::Jpeg) if jpeg_truncated(bytes) => {
            return Err(err("image file is truncated (the JPEG data ends before its end-of-image marker)".into()))
        }
        _ => {}
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
    fn truncated_jpegs_are_recognised() {
        let mut jpeg = Vec::new();
        let img = RgbImage::from_fn(16, 16, |x, y| image::Rgb([(x * 16) as u8, (y * 16) as u8, 7]));
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg).encode_image(&img).unwrap();
        assert!(!jpeg_truncated(&jpeg));
        let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        assert!(jpeg_truncated(&jpeg[..sos + 20]), "header + 20 bytes of scan");
        assert!(jpeg_truncated(&jpeg[..jpeg.len() - 2]));
        let e = decode_image(&jpeg[..sos + 20], Path::new("t.jpg"), ImageLimits::default()).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        assert!(sniff(&jpeg).is_some() && sniff(b"GIF89a").is_none());
    }

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
