//! One module per subcommand, plus the options they share.

pub mod ask;
pub mod inspect;

use std::path::PathBuf;

use glimpse_runtime::preprocess::ImageLimits;
use glimpse_runtime::{Dtype, PipelineOptions};

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
    /// Largest accepted image, in pixels (width × height).
    #[arg(long, default_value_t = ImageLimits::default().max_pixels)]
    pub max_image_pixels: u64,
}

impl ModelArgs {
    /// The pipeline options these arguments describe.
    pub fn pipeline_options(&self) -> PipelineOptions {
        PipelineOptions {
            dtype: self.dtype,
            backend: self.backend.clone(),
            image_limits: ImageLimits { max_pixels: self.max_image_pixels, ..ImageLimits::default() },
            ..PipelineOptions::default()
        }
    }
}
