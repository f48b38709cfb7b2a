//! One module per subcommand, plus the options they share.

pub mod ask;
pub mod eval;
pub mod inspect;
pub mod plot;
pub mod profile;

use std::path::PathBuf;

use glimpse_runtime::preprocess::ImageLimits;
use glimpse_runtime::{Budget, Dtype, PipelineOptions, Positions, Scope, SelectConfig};

/// The model folder used when `--model` is not given.
pub const DEFAULT_MODEL: &str = "models/tiny-smolvlm";

/// Options that choose and load a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder in the Hugging Face / onnx-community layout.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Dtype variant of the ONNX parts (fp32, fp16, int8, uint8, quantized, q4, q4f16).
    #[arg(long, default_value = "fp32")]
    pub dtype: Dtype,
    /// Inference backend.
    #[arg(long, default_value = "tract")]
    pub backend: String,
    /// ONNX Runtime library for `--backend ort` (else ORT_DYLIB_PATH, else next to the binary).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Intra-op threads for ONNX Runtime (0 = its default); tract runs single-threaded.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Largest accepted image, in pixels (width × height).
    #[arg(long, default_value_t = ImageLimits::default().max_pixels)]
    pub max_image_pixels: u64,
}

impl ModelArgs {
    /// The pipeline options these arguments describe, with a token-selection setup.
    pub fn pipeline_options(&self, select: &SelectArgs) -> PipelineOptions {
        PipelineOptions {
            dtype: self.dtype,
            backend: self.backend.clone(),
            image_limits: ImageLimits { max_pixels: self.max_image_pixels, ..ImageLimits::default() },
            select: select.config(),
            positions: select.positions,
            backend_options: glimpse_runtime::backend::BackendOptions {
                ort_library: self.ort_lib.clone(),
                threads: self.threads,
            },
        }
    }
}

/// Options of the token-selection (pruning) stage.
#[derive(clap::Args, Debug, Clone)]
pub struct SelectArgs {
    /// Pruning method: none, random, uniform, pool, dart, divprune, todre, cdpruner, vtc-cls, visionzip.
    #[arg(long, default_value = "none")]
    pub prune: String,
    /// Visual tokens to keep: a ratio in (0, 1] (0.25) or a count (64).
    #[arg(long, default_value = "1.0")]
    pub keep: Budget,
    /// Spend the budget over all views together (global) or within each view (per-view).
    #[arg(long, default_value = "global")]
    pub keep_scope: Scope,
    /// Position ids after pruning: contiguous (renumber) or original (keep gaps).
    #[arg(long, default_value = "contiguous")]
    pub positions: Positions,
    /// Seed of seeded methods (random; todre without CLS attention).
    #[arg(long, default_value_t = 0)]
    pub prune_seed: u64,
    /// CDPruner relevance weight λ.
    #[arg(long, default_value_t = 0.5)]
    pub lambda: f32,
}

impl SelectArgs {
    /// No pruning (profile sets its own sweep).
    pub fn default_none() -> Self {
        SelectArgs {
            prune: "none".into(),
            keep: Budget::Ratio(1.0),
            keep_scope: Scope::Global,
            positions: Positions::Contiguous,
            prune_seed: 0,
            lambda: 0.5,
        }
    }

    /// The selection configuration.
    pub fn config(&self) -> SelectConfig {
        SelectConfig {
            method: self.prune.clone(),
            budget: self.keep,
            scope: self.keep_scope,
            seed: self.prune_seed,
            lambda: self.lambda,
        }
    }
}
