//! LLaVA-OneVision: "anyres" preprocessing. The image is resized (aspect kept) into the grid
//! resolution from `image_grid_pinpoints` that keeps the most of it, padded to that resolution,
//! cut into encoder-sized crops, and preceded by the whole image squashed to one crop (the base
//! view). The encoder returns every crop's rows unpacked plus `image_newline`; the pipeline packs
//! them with this image's [`AnyresLayout`] (unpad, `anyres_max_N` downsampling, a newline per grid
//! row). `<image>` expands to one token per packed row. Mirrors transformers'
//! `LlavaOnevisionImageProcessor`, `LlavaOnevisionProcessor` and
//! `LlavaOnevisionModel.pack_image_features`.

use image::RgbImage;
use ndarray::Array4;

use super::anyres::AnyresLayout;
use super::{View, ViewKind, VisionInput};
use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::folder::ModelFolder;
use crate::preprocess::{self, Filter};
use crate::text::TextTokenizer;

/// Where the `image_newline` vector may come from, for the error when neither has it.
const NO_NEWLINE: &str = "anyres packing needs the image_newline vector: neither a vision encoder output `image_newline` (python -m glimpse_export writes one) nor an `image_newline` list in config.json (optimum-intel's convention) is present";

/// The LLaVA-OneVision family.
#[derive(Debug, Clone)]
pub struct LlavaOnevision {
    image_token_id: i64,
    /// Encoder input side in pixels (`size.height`).
    crop: usize,
    /// Feature rows per crop side (`image_size / patch_size`).
    side: usize,
    /// Candidate grid resolutions `(height, width)` in pixels.
    pinpoints: Vec<(usize, usize)>,
    /// `N` of `anyres_max_N`: the grid is downsampled above N crops' worth of tokens.
    max_crops: usize,
    filter: Filter,
    rescale: f64,
    mean: [f32; 3],
    std: [f32; 3],
    /// `image_newline` from `config.json`, where optimum-intel's OpenVINO export keeps it
    /// (`model.config.image_newline = model.model.image_newline.tolist()`); used when the vision
    /// encoder has no `image_newline` output (transformers.js-style folders).
    newline: Option<Vec<f32>>,
}

impl LlavaOnevision {
    /// Reads the family's settings from the folder.
    pub fn new(folder: &ModelFolder, tokenizer: &TextTokenizer) -> Result<Self> {
        let config = folder.path("config.json");
        let crop = super::side_setting(folder, &["size.height", "size.shortest_edge"])?;
        let size = folder.config_usize(&["vision_config.image_size"])?;
        let patch = folder.config_usize(&["vision_config.patch_size"])?;
        // SigLIP's patch convolution floors: 384 px at patch 14 gives 27 x 27 rows (the last 6 px unused).
        if patch == 0 || patch > size || crop != size {
            return Err(Error::field(
                &config,
                "vision_config.image_size",
                format!("{size} must be at least patch_size ({patch}) and equal the processor's size ({crop})"),
            ));
        }
        let strategy = folder.config_str("vision_feature_select_strategy").unwrap_or("full");
        if strategy != "full" {
            return Err(Error::field(
                &config,
                "vision_feature_select_strategy",
                format!("{strategy:?} is not supported for llava_onevision (supported: full)"),
            ));
        }
        let aspect = folder.config_str("vision_aspect_ratio").unwrap_or("anyres_max_9");
        let max_crops =
            aspect.strip_prefix("anyres_max_").and_then(|n| n.parse::<usize>().ok()).filter(|&n| n > 0).ok_or_else(
                || Error::field(&config, "vision_aspect_ratio", format!("{aspect:?} (supported: anyres_max_N)")),
            )?;
        let pinpoints = pinpoints(folder)?;
        Ok(LlavaOnevision {
            image_token_id: super::image_token_id(folder, tokenizer, "<image>")?,
            crop,
            side: size / patch,
            pinpoints,
            max_crops,
            filter: super::filter(folder, Filter::Bicubic)?,
            rescale: super::rescale(folder),
            mean: super::triple(folder, "image_mean", [0.5; 3])?,
            std: super::std_triple(folder, [0.5; 3])?,
            newline: match folder.config.get("image_newline") {
                None => None,
                Some(_) => Some(crate::folder::json_f32s(&folder.config, &config, "image_newline")?),
            },
        })
    }

    pub(crate) fn boxed(folder: &ModelFolder, tokenizer: &TextTokenizer) -> Result<Box<dyn super::Family>> {
        Ok(Box::new(Self::new(folder, tokenizer)?))
    }
}

/// `image_grid_pinpoints` from the preprocessor (or model) config: `[[height, width], ...]` in
/// pixels, all positive.
fn pinpoints(folder: &ModelFolder) -> Result<Vec<(usize, usize)>> {
    let (value, file) = match folder.preprocessor.get("image_grid_pinpoints") {
        Some(v) => (v, folder.preprocessor_file.clone()),
        None => (
            folder.config.get("image_grid_pinpoints").ok_or_else(|| {
                Error::field(
                    folder.path("config.json"),
                    "image_grid_pinpoints",
                    "missing (here and in the preprocessor)",
                )
            })?,
            folder.path("config.json"),
        ),
    };
    let bad = || Error::field(&file, "image_grid_pinpoints", "expected a non-empty list of [height, width] pairs");
    let list = value.as_array().filter(|a| !a.is_empty()).ok_or_else(bad)?;
    list.iter()
        .map(|p| match p.as_array().map(|a| a.iter().map(serde_json::Value::as_u64).collect::<Vec<_>>()) {
            Some(v) if v.len() == 2 && v.iter().all(|x| matches!(x, Some(n) if *n > 0)) => {
                Ok((v[0].unwrap_or(1) as usize, v[1].unwrap_or(1) as usize))
            }
            _ => Err(bad()),
        })
        .collect()
}

/// transformers' `select_best_resolution`: the pinpoint that keeps the most of the image when it
/// is scaled to fit, then the one that wastes the least. `(height, width)` in and out.
fn select_best_resolution(image: (usize, usize), pinpoints: &[(usize, usize)]) -> (usize, usize) {
    let (oh, ow) = (image.0 as f64, image.1 as f64);
    let mut best = pinpoints[0];
    let (mut max_effective, mut min_wasted) = (0i64, i64::MAX);
    for &(h, w) in pinpoints {
        let scale = (w as f64 / ow).min(h as f64 / oh);
        let (dw, dh) = ((ow * scale) as i64, (oh * scale) as i64);
        let effective = (dw * dh).min((image.0 * image.1) as i64);
        let wasted = (w * h) as i64 - effective;
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = (h, w);
        }
    }
    best
}

/// transformers' `get_patch_output_size`: the image scaled to fit `target`, aspect kept.
fn fit_size(image: (usize, usize), target: (usize, usize)) -> (usize, usize) {
    let (oh, ow) = (image.0 as f64, image.1 as f64);
    let (th, tw) = target;
    let (sw, sh) = (tw as f64 / ow, th as f64 / oh);
    if sw < sh {
        (((oh * sw).ceil() as usize).min(th), tw)
    } else {
        (th, ((ow * sh).ceil() as usize).min(tw))
    }
}

impl super::Family for LlavaOnevision {
    fn name(&self) -> &'static str {
        "llava_onevision"
    }

    fn patch_grid_views(&self) -> bool {
        false
    }

    fn image_token_id(&self) -> i64 {
        self.image_token_id
    }

    fn image_placeholder(&self) -> &str {
        "<image>"
    }

    fn preprocess(&self, image: &RgbImage) -> Result<VisionInput> {
        let (h, w) = (image.height() as usize, image.width() as usize);
        let (bh, bw) = select_best_resolution((h, w), &self.pinpoints);
        let (rh, rw) = fit_size((h, w), (bh, bw));
        let resized = preprocess::resize(image, rw as u32, rh as u32, self.filter);
        // Centre the resized image on a black canvas of the grid resolution (np.pad with zeros).
        let (top, left) = ((bh - rh) / 2, (bw - rw) / 2);
        let mut canvas = RgbImage::new(bw as u32, bh as u32);
        image::imageops::replace(&mut canvas, &resized, left as i64, top as i64);
        let crops = (bh.div_ceil(self.crop), bw.div_ceil(self.crop));
        let n = 1 + crops.0 * crops.1;
        let c = self.crop;
        let mut pixels = Array4::<f32>::zeros((n, 3, c, c));
        let base = preprocess::resize(image, c as u32, c as u32, self.filter);
        preprocess::normalize_into(
            &base,
            self.rescale,
            &self.mean,
            &self.std,
            pixels.index_axis_mut(ndarray::Axis(0), 0),
        );
        for r in 0..crops.0 {
            for col in 0..crops.1 {
                let tile =
                    image::imageops::crop_imm(&canvas, (col * c) as u32, (r * c) as u32, c as u32, c as u32).to_image();
                let tile = if tile.dimensions() == (c as u32, c as u32) {
                    tile
                } else {
                    // a partial crop at the edge (pinpoints not multiples of the crop): as transformers
                    // resizes every patch to the encoder size
                    preprocess::resize(&tile, c as u32, c as u32, self.filter)
                };
                let idx = 1 + r * crops.1 + col;
                preprocess::normalize_into(
                    &tile,
                    self.rescale,
                    &self.mean,
                    &self.std,
                    pixels.index_axis_mut(ndarray::Axis(0), idx),
                );
            }
        }
        let layout = AnyresLayout::new((h, w), crops, self.side, self.max_crops);
        let (gh, gw) = layout.out;
        let views = vec![
            View {
                kind: ViewKind::Global,
                tokens: self.side * self.side,
                grid: (self.side, self.side),
                region: [0.0, 0.0, 1.0, 1.0],
            },
            View { kind: ViewKind::Grid, tokens: gh * (gw + 1), grid: (gh, gw + 1), region: [0.0, 0.0, 1.0, 1.0] },
        ];
        Ok(VisionInput {
            tensors: vec![("pixel_values".into(), Tensor::F32(pixels.into_dyn()))],
            views,
            rows: 0,
            cols: 0,
            anyres: Some(layout),
        })
    }

    fn expand_image(&self, _input: &VisionInput, kept: &[usize]) -> String {
        "<image>".repeat(kept.iter().sum())
    }

    fn pack(
        &self,
        input: &VisionInput,
        features: ndarray::Array2<f32>,
        outputs: &mut crate::backend::NamedOutputs,
    ) -> Result<ndarray::Array2<f32>> {
        let Some(layout) = &input.anyres else { return Ok(features) };
        let d = features.ncols();
        let newline = match (outputs.take("image_newline"), &self.newline) {
            (Some(t), _) => t.into_f32("vision_encoder image_newline")?,
            (None, Some(v)) => ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[v.len()]), v.clone())
                .map_err(|e| Error::interface("config.json", e.to_string()))?,
            (None, None) => return Err(Error::interface("vision_encoder", NO_NEWLINE)),
        };
        let newline = newline
            .into_shape_with_order(d)
            .map_err(|e| Error::interface("vision_encoder", format!("image_newline must have {d} values: {e}")))?;
        layout.pack(features.view(), newline.view())
    }

    fn check_encoder(&self, outputs: &[crate::backend::TensorInfo]) -> Result<()> {
        if self.newline.is_none() && !outputs.iter().any(|o| o.name == "image_newline") {
            return Err(Error::interface("vision_encoder", NO_NEWLINE));
        }
        Ok(())
    }

    fn fallback_prompt(&self, prompt: &str, with_image: bool) -> String {
        let image = if with_image { "<image>" } else { "" };
        format!("<|im_start|>user {image}\n{prompt}<|im_end|><|im_start|>assistant\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(max: usize, step: usize) -> Vec<(usize, usize)> {
        (1..=max).flat_map(|h| (1..=max).map(move |w| (h * step, w * step))).collect()
    }

    #[test]
    fn best_resolution_matches_transformers() {
        // Values from transformers' select_best_resolution on the tiny model's pinpoints.
        let p = grid(4, 32);
        assert_eq!(select_best_resolution((40, 48), &p), (64, 64));
        assert_eq!(select_best_resolution((90, 200), &p), (64, 128));
        assert_eq!(select_best_resolution((50, 200), &p), (32, 128));
        assert_eq!(select_best_resolution((256, 256), &p), (128, 128));
    }

    #[test]
    fn fit_size_keeps_aspect() {
        assert_eq!(fit_size((90, 200), (64, 128)), (58, 128));
        assert_eq!(fit_size((40, 48), (64, 64)), (54, 64));
    }
}
