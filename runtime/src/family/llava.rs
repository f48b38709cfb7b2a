//! LLaVA: one image, CLIP-style preprocessing (resize the shortest edge, centre crop, rescale,
//! normalise), and `<image>` expanded to one token per feature row. Mirrors transformers'
//! `CLIPImageProcessor` and `LlavaProcessor`.

use image::RgbImage;

use super::{View, ViewKind, VisionInput};
use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::folder::ModelFolder;
use crate::preprocess::{self, Filter};
use crate::text::TextTokenizer;

const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The LLaVA family.
#[derive(Debug, Clone)]
pub struct Llava {
    image_token_id: i64,
    shortest_edge: Option<usize>,
    crop: Option<(usize, usize)>,
    filter: Filter,
    rescale: f64,
    mean: [f32; 3],
    std: [f32; 3],
    tokens: usize,
    grid: (usize, usize),
}

impl Llava {
    /// Reads the family's settings from the folder.
    pub fn new(folder: &ModelFolder, tokenizer: &TextTokenizer) -> Result<Self> {
        let shortest_edge = if super::flag(folder, "do_resize", true) {
            Some(super::side_setting(folder, &["size.shortest_edge", "size"])?)
        } else {
            None
        };
        let crop = if super::flag(folder, "do_center_crop", true) {
            let h = super::side_setting(folder, &["crop_size.height", "crop_size"])?;
            let w = super::side_setting(folder, &["crop_size.width", "crop_size"])?;
            Some((h, w))
        } else {
            None
        };
        let size = folder.config_usize(&["vision_config.image_size"])?;
        let patch = folder.config_usize(&["vision_config.patch_size"])?;
        if patch == 0 || size % patch != 0 {
            return Err(Error::field(folder.path("config.json"), "vision_config.patch_size", "must divide image_size"));
        }
        let side = size / patch;
        let strategy = folder.config_str("vision_feature_select_strategy").unwrap_or("default");
        let tokens = match strategy {
            "default" => side * side,
            "full" => side * side + 1,
            other => {
                return Err(Error::field(
                    folder.path("config.json"),
                    "vision_feature_select_strategy",
                    format!("unsupported value {other:?} (supported: default, full)"),
                ))
            }
        };
        let grid = if strategy == "default" { (side, side) } else { (1, tokens) };
        Ok(Llava {
            image_token_id: super::image_token_id(folder, tokenizer, "<image>")?,
            shortest_edge,
            crop,
            filter: super::filter(folder, Filter::Bicubic)?,
            rescale: super::rescale(folder),
            mean: super::triple(folder, "image_mean", CLIP_MEAN)?,
            std: super::std_triple(folder, CLIP_STD)?,
            tokens,
            grid,
        })
    }

    pub(crate) fn boxed(folder: &ModelFolder, tokenizer: &TextTokenizer) -> Result<Box<dyn super::Family>> {
        Ok(Box::new(Self::new(folder, tokenizer)?))
    }
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: the shortest edge
/// becomes `size`; returns `(height, width)`.
fn shortest_edge_size(h: usize, w: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if w <= h {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// Centre crop as transformers does (pads with zeros when the image is smaller).
fn center_crop(img: &RgbImage, ch: usize, cw: usize) -> RgbImage {
    let (h, w) = (img.height() as i64, img.width() as i64);
    let top = (h - ch as i64).div_euclid(2);
    let left = (w - cw as i64).div_euclid(2);
    RgbImage::from_fn(cw as u32, ch as u32, |x, y| {
        let (sx, sy) = (x as i64 + left, y as i64 + top);
        if (0..w).contains(&sx) && (0..h).contains(&sy) {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

impl super::Family for Llava {
    fn name(&self) -> &'static str {
        "llava"
    }

    fn encoder_prefix_tokens(&self) -> usize {
        1
    }

    fn image_token_id(&self) -> i64 {
        self.image_token_id
    }

    fn image_placeholder(&self) -> &str {
        "<image>"
    }

    fn preprocess(&self, image: &RgbImage) -> Result<VisionInput> {
        let mut img = image.clone();
        if let Some(size) = self.shortest_edge {
            let (h, w) = shortest_edge_size(img.height() as usize, img.width() as usize, size);
            img = preprocess::resize(&img, w as u32, h as u32, self.filter);
        }
        if let Some((ch, cw)) = self.crop {
            img = center_crop(&img, ch, cw);
        }
        let pixels = preprocess::normalize(&img, self.rescale, &self.mean, &self.std).insert_axis(ndarray::Axis(0));
        Ok(VisionInput {
            tensors: vec![("pixel_values".into(), Tensor::F32(pixels.into_dyn()))],
            views: vec![View {
                kind: ViewKind::Whole,
                tokens: self.tokens,
                grid: self.grid,
                region: [0.0, 0.0, 1.0, 1.0],
            }],
            rows: 0,
            cols: 0,
            anyres: None,
        })
    }

    fn expand_image(&self, _input: &VisionInput, kept: &[usize]) -> String {
        "<image>".repeat(kept.iter().sum())
    }

    fn fallback_prompt(&self, prompt: &str, with_image: bool) -> String {
        let image = if with_image { "<image>\n" } else { "" };
        format!("USER: {image}{prompt} ASSISTANT:")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_keeps_aspect() {
        assert_eq!(shortest_edge_size(40, 48, 32), (32, 38));
        assert_eq!(shortest_edge_size(90, 200, 32), (32, 71));
        assert_eq!(shortest_edge_size(200, 90, 32), (71, 32));
    }

    #[test]
    fn center_crop_takes_the_middle() {
        let img = RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let c = center_crop(&img, 2, 2);
        assert_eq!(c.get_pixel(0, 0).0, [2, 1, 0]);
        let padded = center_crop(&img, 6, 8);
        assert_eq!(padded.get_pixel(0, 1).0, [0, 0, 0]);
        assert_eq!(padded.get_pixel(1, 1).0, [0, 0, 0]);
        assert_eq!(padded.get_pixel(1, 2).0, [0, 1, 0]);
    }
}
