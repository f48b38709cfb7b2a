//! Model families. Each family turns an image into the encoder's pixel tensors plus a layout of
//! views (tiles, global view), and knows how its prompt stands for an image. One file per
//! family, registered in [`FAMILIES`].

use image::RgbImage;

use ndarray::Array2;

use crate::backend::{NamedOutputs, Tensor};
use crate::error::{Error, Result};
use crate::folder::ModelFolder;
use crate::text::TextTokenizer;

pub mod anyres;
pub mod idefics3;
pub mod llava;
pub mod llava_onevision;

/// What part of the image a view covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewKind {
    /// One tile of a split image (0-based row and column).
    Tile { row: usize, col: usize },
    /// The downscaled whole image that follows the tiles (SmolVLM's `<global-img>`).
    Global,
    /// The whole image as the only view (LLaVA).
    Whole,
    /// All crops of an anyres image stitched into one grid, padding removed; the grid's last
    /// column holds the `image_newline` token that ends each row (LLaVA-OneVision).
    Grid,
}

/// One encoder view and the run of feature rows it produces.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct View {
    /// Which part of the image.
    pub kind: ViewKind,
    /// Feature rows the encoder emits for this view.
    pub tokens: usize,
    /// The rows laid out as a `(rows, cols)` patch grid in raster order.
    pub grid: (usize, usize),
    /// Covered region of the original image, `[x0, y0, x1, y1]` in 0..1.
    pub region: [f32; 4],
}

/// The first row of every view in the views' concatenated rows.
pub fn view_starts(views: &[View]) -> Vec<usize> {
    views
        .iter()
        .scan(0, |acc, v| {
            let s = *acc;
            *acc += v.tokens;
            Some(s)
        })
        .collect()
}

/// Encoder inputs for one image and the view layout the features will follow.
#[derive(Debug, Clone)]
pub struct VisionInput {
    /// Named encoder inputs (`pixel_values`, optionally `pixel_attention_mask`).
    pub tensors: Vec<(String, Tensor)>,
    /// Views in the order the encoder emits their features.
    pub views: Vec<View>,
    /// Tile grid rows (0 when the image was not split).
    pub rows: usize,
    /// Tile grid columns (0 when the image was not split).
    pub cols: usize,
    /// How the encoder's rows are packed into the views' rows (LLaVA-OneVision); `None` when
    /// the encoder emits the views' rows directly.
    pub anyres: Option<anyres::AnyresLayout>,
}

impl VisionInput {
    /// The encoder input for a subset of the views (frames), e.g. the global view alone or the
    /// tiles chosen by tile skipping. Tensors with one entry per view on axis 1 are sliced.
    pub fn subset(&self, frames: &[usize]) -> VisionInput {
        let n = self.views.len();
        // the image inputs ([batch, views, ...]); others pass through
        let tensors = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let sliced = matches!(t, Tensor::F32(_) | Tensor::Bool(_)) && t.shape().len() > 1 && t.shape()[1] == n;
                (name.clone(), if sliced { t.select(1, frames) } else { t.clone() })
            })
            .collect();
        VisionInput {
            tensors,
            views: frames.iter().map(|&f| self.views[f].clone()).collect(),
            rows: self.rows,
            cols: self.cols,
            anyres: self.anyres.clone(),
        }
    }

    /// The tensors a model part declares as inputs, by name, in its order; an error names the
    /// first one the preprocessor does not produce.
    pub fn inputs_for<'a>(
        &'a self,
        declared: &'a [crate::backend::TensorInfo],
        family: &str,
    ) -> Result<Vec<(&'a str, Tensor)>> {
        declared
            .iter()
            .map(|info| {
                let (_, t) = self.tensors.iter().find(|(n, _)| *n == info.name).ok_or_else(|| {
                    Error::interface(
                        "vision_encoder",
                        format!("the {family} preprocessor does not produce input `{}`", info.name),
                    )
                })?;
                Ok((info.name.as_str(), t.clone()))
            })
            .collect()
    }

    /// Total feature rows over all views.
    pub fn total_tokens(&self) -> usize {
        self.views.iter().map(|v| v.tokens).sum()
    }

    /// Images the encoder runs on: one per view, or with anyres the base view and every crop.
    pub fn encoder_views(&self) -> usize {
        self.anyres.as_ref().map_or(self.views.len(), |a| 1 + a.crops.0 * a.crops.1)
    }

    /// Feature rows the encoder emits for this input (before any anyres packing).
    pub fn encoder_rows(&self) -> usize {
        self.anyres.as_ref().map_or_else(|| self.total_tokens(), anyres::AnyresLayout::encoder_rows)
    }
}

/// A VLM family: preprocessing and prompt conventions.
pub trait Family: Send + Sync {
    /// The family name (`idefics3`, `llava`, `llava_onevision`).
    fn name(&self) -> &'static str;
    /// The id of the token whose positions receive image features.
    fn image_token_id(&self) -> i64;
    /// The placeholder that stands for one image in the rendered chat prompt.
    fn image_placeholder(&self) -> &str;
    /// Turns an RGB image into encoder inputs and views.
    fn preprocess(&self, image: &RgbImage) -> Result<VisionInput>;
    /// The text that replaces one placeholder, given the rows kept for each view.
    fn expand_image(&self, input: &VisionInput, kept: &[usize]) -> String;
    /// The prompt used when the folder has no chat template.
    fn fallback_prompt(&self, prompt: &str, with_image: bool) -> String;
    /// The visual tokens an image of `width × height` will become, when the family can tell
    /// without preprocessing it: the pipeline checks them against the context before allocating
    /// the encoder's input.
    fn planned_tokens(&self, _width: u32, _height: u32) -> Option<usize> {
        None
    }
    /// Checks, when the folder loads, that the vision encoder (with the folder's other files)
    /// gives the family what it needs, so a folder that cannot answer fails at load, not at the
    /// first question.
    fn check_encoder(&self, _outputs: &[crate::backend::TensorInfo]) -> Result<()> {
        Ok(())
    }
    /// What the folder fixes about the vision encoder's inputs (batch, tile size), for
    /// backends that analyse shapes before running (exports with dynamic height/width).
    fn encoder_hints(&self) -> crate::backend::LoadHints {
        crate::backend::LoadHints::default()
    }
    /// The axis of the encoder's image inputs that indexes views (Idefics3's
    /// `pixel_values [batch, views, 3, H, W]`: 1; `[views, 3, H, W]`: 0).
    fn views_axis(&self) -> usize {
        0
    }
    /// What the folder fixes about a staged encoder's head input (`docs/stages.md`), for
    /// backends that analyse shapes before running: its token count when the connector needs it.
    fn head_hints(&self) -> crate::backend::LoadHints {
        crate::backend::LoadHints::default()
    }
    /// Whether large images become tiles plus a global view, which tile skipping needs.
    fn splits_into_tiles(&self) -> bool {
        false
    }
    /// Whether every view's LLM tokens are a grid over its patches (square groups of patches,
    /// one group per token), which region skipping needs; LLaVA-OneVision's crops are packed.
    fn patch_grid_views(&self) -> bool {
        true
    }
    /// Tokens before the patches in the staged encoder's residual stream (CLIP's CLS: 1), which
    /// region skipping and token merging always keep.
    fn encoder_prefix_tokens(&self) -> usize {
        0
    }
    /// After the encoder: turns its rows `[encoder_rows, d]` into the views' rows, reading any
    /// extra encoder output it needs (LLaVA-OneVision stitches and unpads anyres crops and adds
    /// `image_newline` rows). The default passes the rows through.
    fn pack(&self, _input: &VisionInput, features: Array2<f32>, _outputs: &mut NamedOutputs) -> Result<Array2<f32>> {
        Ok(features)
    }
}

type Constructor = fn(&ModelFolder, &TextTokenizer) -> Result<Box<dyn Family>>;

/// Registered families: the `model_type` values each accepts and its constructor.
pub const FAMILIES: &[(&[&str], Constructor)] = &[
    (&["idefics3", "smolvlm"], idefics3::Idefics3::boxed),
    (&["llava"], llava::Llava::boxed),
    (&["llava_onevision"], llava_onevision::LlavaOnevision::boxed),
];

/// Every supported `model_type`.
pub fn supported_model_types() -> Vec<&'static str> {
    FAMILIES.iter().flat_map(|(names, _)| names.iter().copied()).collect()
}

/// The family for a folder's `model_type`, or an error listing the supported ones.
pub fn for_folder(folder: &ModelFolder, tokenizer: &TextTokenizer) -> Result<Box<dyn Family>> {
    let model_type = folder.model_type()?;
    for (names, make) in FAMILIES {
        if names.contains(&model_type) {
            return make(folder, tokenizer);
        }
    }
    Err(Error::UnknownModelType {
        path: folder.path("config.json"),
        found: model_type.to_string(),
        supported: supported_model_types().join(", "),
    })
}

/// Largest image side (pixels) a preprocessor setting may ask for: far above any real model,
/// small enough that what it implies can be allocated.
pub const MAX_SETTING_SIDE: usize = 8192;

/// A required image size setting from the image processor's settings, in `1..=MAX_SETTING_SIDE`.
pub(crate) fn side_setting(folder: &ModelFolder, paths: &[&str]) -> Result<usize> {
    let file = &folder.preprocessor_file;
    let v = crate::folder::json_usize(&folder.preprocessor, file, paths)?;
    let field = paths.iter().find(|p| crate::folder::lookup(&folder.preprocessor, p).is_some()).unwrap_or(&paths[0]);
    if v == 0 || v > MAX_SETTING_SIDE {
        return Err(Error::field(file, *field, format!("{v} is not an image size in 1..={MAX_SETTING_SIDE} pixels")));
    }
    Ok(v)
}

/// `image_std`: three finite, positive values (a zero would divide every pixel by zero).
pub(crate) fn std_triple(folder: &ModelFolder, default: [f32; 3]) -> Result<[f32; 3]> {
    let v = triple(folder, "image_std", default)?;
    if v.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
        return Err(Error::field(
            &folder.preprocessor_file,
            "image_std",
            format!("{v:?}: every value must be finite and positive"),
        ));
    }
    Ok(v)
}

/// Reads `image_mean`/`image_std` as three floats.
pub(crate) fn triple(folder: &ModelFolder, field: &str, default: [f32; 3]) -> Result<[f32; 3]> {
    if folder.preprocessor.get(field).is_none() {
        return Ok(default);
    }
    let file = folder.preprocessor_file.clone();
    let v = crate::folder::json_f32s(&folder.preprocessor, &file, field)?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::field(file, field, format!("{v:?}: values must be finite")));
    }
    match v.as_slice() {
        [a] => Ok([*a; 3]),
        [a, b, c] => Ok([*a, *b, *c]),
        _ => Err(Error::field(file, field, format!("expected 1 or 3 values, found {}", v.len()))),
    }
}

/// Reads the resample filter code (`resample`), defaulting to `default`.
pub(crate) fn filter(folder: &ModelFolder, default: crate::preprocess::Filter) -> Result<crate::preprocess::Filter> {
    match folder.preprocessor.get("resample") {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => v.as_u64().and_then(crate::preprocess::Filter::from_pil_code).ok_or_else(|| {
            Error::field(
                folder.preprocessor_file.clone(),
                "resample",
                format!("unsupported resample filter {v} (supported: 1 lanczos, 2 bilinear, 3 bicubic)"),
            )
        }),
    }
}

/// Reads a boolean preprocessor flag.
pub(crate) fn flag(folder: &ModelFolder, field: &str, default: bool) -> bool {
    folder.preprocessor.get(field).and_then(serde_json::Value::as_bool).unwrap_or(default)
}

/// Reads the rescale factor (default 1/255).
pub(crate) fn rescale(folder: &ModelFolder) -> f64 {
    folder.preprocessor.get("rescale_factor").and_then(serde_json::Value::as_f64).unwrap_or(1.0 / 255.0)
}

/// The image token id from `config.json` (any of the names transformers uses), else from the
/// tokenizer's vocabulary.
pub(crate) fn image_token_id(folder: &ModelFolder, tokenizer: &TextTokenizer, token: &str) -> Result<i64> {
    for key in ["image_token_id", "image_token_index"] {
        if let Some(id) = folder.config.get(key).and_then(serde_json::Value::as_i64) {
            return Ok(id);
        }
    }
    tokenizer.token_id(token).ok_or_else(|| {
        Error::field(
            folder.path("config.json"),
            "image_token_id",
            format!("missing, and the tokenizer has no {token:?}"),
        )
    })
}
