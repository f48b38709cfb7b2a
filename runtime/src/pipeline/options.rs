//! How a pipeline is built ([`PipelineOptions`]) and the position-id policy after pruning.

use serde::Serialize;

use crate::backend;
use crate::error::{Error, Result};
use crate::folder::{Dtype, Part};
use crate::preprocess::ImageLimits;
use crate::select::regions::RegionSkip;
use crate::select::tiles::TileSkip;
use crate::select::{Budget, SelectConfig};

/// Token reduction before and inside the vision encoder: tile or region skipping and token
/// merging. The pipeline has one (from its options); a request may bring its own
/// ([`super::Request::with_reduction`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EncoderReduction {
    /// Skip whole tiles before the encoder (tiled families only).
    pub tiles: Option<TileSkip>,
    /// Run the encoder's layers only on the best patch groups (needs stages).
    pub regions: Option<RegionSkip>,
    /// Tokens merged per view after each group of encoder layers (needs stages).
    pub merge: Option<Budget>,
    /// How merged tokens combine.
    pub merge_method: crate::select::tome::MergeMethod,
}

impl EncoderReduction {
    /// Whether anything is reduced.
    pub fn is_active(&self) -> bool {
        self.tiles.is_some() || self.regions.is_some() || self.merge.is_some()
    }

    /// Whether it needs the staged encoder (regions and merging act between its groups).
    pub fn needs_stages(&self) -> bool {
        self.regions.is_some() || self.merge.is_some()
    }

    /// Weight of prompt relevance in the global view's tile / region scores (0 without either).
    pub fn relevance(&self) -> f32 {
        self.regions.map(|r| r.relevance).or(self.tiles.map(|t| t.relevance)).unwrap_or(0.0)
    }
}

/// How a pipeline is built.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Dtype variant of every part not listed in `part_dtypes`.
    pub dtype: Dtype,
    /// Per-part overrides (e.g. chosen by a target profile for `--dtype auto`).
    pub part_dtypes: Vec<(Part, Dtype)>,
    /// Backend name (`tract`, `ort`).
    pub backend: String,
    /// Backend settings (ONNX Runtime library, threads).
    pub backend_options: backend::BackendOptions,
    /// Token selection (method, budget, scope); the default keeps every token.
    pub select: SelectConfig,
    /// Position ids of the tokens after pruned image tokens.
    pub positions: Positions,
    /// Skip whole tiles before the encoder (tiled families only).
    pub tiles: Option<TileSkip>,
    /// Run the encoder's layers only on the best patch groups (needs stages).
    pub regions: Option<RegionSkip>,
    /// Token merging: tokens merged per view after each group of encoder layers (needs stages).
    pub merge: Option<Budget>,
    /// How merged tokens combine: ToMe (one match) or Token Transforming (many-to-many).
    pub merge_method: crate::select::tome::MergeMethod,
    /// The `--fast` preset: fills `regions` and `merge` when neither they nor `tiles` are set.
    pub fast: Fast,
    /// Limits on input images.
    pub image_limits: ImageLimits,
    /// Memory budget checked before loading (`None`: what the machine has free).
    pub max_memory: Option<crate::memory::MemoryLimit>,
    /// Monolithic or staged vision encoder.
    pub encoder: super::EncoderForm,
    /// Whether the encoder runs all views of an image as one batch or one view at a time.
    pub views: ViewRun,
    /// Shorten every request's text prompt with a prompt compressor first (timed as the
    /// `prompt_compress` stage); `None`: prompts reach the model as given.
    pub prompt_compression: Option<PromptCompression>,
    /// Also load the staged encoder beside a monolithic one, so that requests can bring their
    /// own region skipping or merging ([`super::Request::with_reduction`]); costs the
    /// encoder's weights a second time.
    pub stages_for_requests: bool,
}

/// A prompt compressor folder and how hard it compresses (`glimpse ask --prompt-compressor`).
#[derive(Debug, Clone)]
pub struct PromptCompression {
    /// The compressor folder (`compressor.json`, docs/compressors.md).
    pub dir: std::path::PathBuf,
    /// Rate or target tokens, force tokens and digits.
    pub options: crate::compress::CompressOptions,
}

/// The `--fast` preset: the combination of reductions before and inside the encoder measured
/// best on the testbeds (docs/pruning.md, "The --fast preset").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fast {
    #[default]
    Off,
    /// On; an error on a folder without a staged encoder (`glimpse split` makes one).
    On,
    /// On where the folder has a staged encoder, else off (a target profile's default).
    WhereStaged,
}

/// What `--fast` turns on for a family: on tiled families (SmolVLM) region skipping at 0.35 of
/// each tile's tokens and 0.5 of the global view's (by patch saliency) plus ToMe merging a
/// quarter of the tokens after every group of layers (testbed-smolvlm: 89.2% of questions
/// against 92.4% full, 2.4x sooner on tract; fresh scenes 86.8% against 90.1%, 2.3x); a budget
/// per tile keeps one token count per tile, which tract plans for exactly (docs/pruning.md, "The
/// --fast preset"). On single-view families (LLaVA) region skipping at 0.3 by patch saliency,
/// without merging (testbed-llava: 93.5% against 95.6%, 3.8x sooner; merging cost it 6 points
/// there). OneVision (packed crops): merging only, unmeasured on a testbed.
pub fn fast_preset(tiled: bool, patch_grid: bool) -> (Option<RegionSkip>, Option<Budget>) {
    let regions = |r: f32, scope: crate::select::Scope, global: f32| RegionSkip {
        budget: Budget::Ratio(r),
        scope,
        skipped: crate::select::tiles::SkippedTiles::Drop,
        relevance: 0.0,
        global: Budget::Ratio(global),
    };
    use crate::select::Scope::{Global, PerView};
    match (tiled, patch_grid) {
        (true, _) => (Some(regions(0.35, PerView, 0.5)), Some(Budget::Ratio(0.25))),
        (false, true) => (Some(regions(0.3, Global, 1.0)), None),
        (false, false) => (None, Some(Budget::Ratio(0.25))),
    }
}

/// How the vision encoder runs an image's views (tiles, crops).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewRun {
    /// What the backend runs faster ([`crate::backend::BackendSpec::views_one_by_one`], measured
    /// in docs/benchmarks.md).
    #[default]
    Auto,
    /// All views in one run (batch axis = views).
    Batch,
    /// One run per view, outputs concatenated (the same rows).
    OneByOne,
}

impl std::str::FromStr for ViewRun {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(ViewRun::Auto),
            "batch" => Ok(ViewRun::Batch),
            "one-by-one" => Ok(ViewRun::OneByOne),
            _ => Err(Error::invalid("views", s, "expected auto, batch or one-by-one")),
        }
    }
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            dtype: Dtype::Fp32,
            part_dtypes: Vec::new(),
            backend: "tract".into(),
            backend_options: backend::BackendOptions::default(),
            select: SelectConfig::default(),
            positions: Positions::Original,
            tiles: None,
            regions: None,
            merge: None,
            merge_method: crate::select::tome::MergeMethod::Tome,
            fast: Fast::Off,
            image_limits: ImageLimits::default(),
            max_memory: None,
            encoder: super::EncoderForm::Auto,
            views: ViewRun::Auto,
            prompt_compression: None,
            stages_for_requests: false,
        }
    }
}

/// Position-id policy after pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Renumber 0..n over the pruned sequence.
    Contiguous,
    /// Keep each token's position in the unpruned sequence (gaps where tokens were dropped), as
    /// DART and FastV do. The default: RoPE decoders read where a token was from its position
    /// (on testbed-llava at keep 0.25, DART holds 97% of full accuracy this way, 69% renumbered).
    #[default]
    Original,
}

impl std::str::FromStr for Positions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "contiguous" => Ok(Positions::Contiguous),
            "original" => Ok(Positions::Original),
            _ => Err(Error::invalid("positions", s, "expected original or contiguous")),
        }
    }
}
