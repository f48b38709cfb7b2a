//! Glimpse runtime: loads vision-language models in the Hugging Face / onnx-community folder
//! layout and answers prompts about images, with a token-selection stage between the vision
//! encoder and the language model so that fewer image tokens can reach the LLM.
//!
//! The pipeline is preprocess → encode → select → splice → prefill → decode
//! ([`pipeline::Pipeline::answer`], one [`Request`] in, an [`Observer`] told of each stage);
//! model families ([`family`]), backends ([`backend`]), selection methods and signals
//! ([`select`]) each sit behind one small trait and one registry. `docs/architecture.md` lists
//! the files each extension point touches.

pub mod api;
pub mod backend;
pub mod calibrate;
pub mod compress;
pub mod cost;
pub mod error;
pub mod eval;
pub mod family;
pub mod folder;
pub mod fuzz;
pub mod generate;
pub mod manifest;
pub mod memory;
pub mod onnx_info;
pub mod pipeline;
pub mod preprocess;
pub mod profile;
pub mod select;
pub mod settings;
pub mod split;
pub mod stream;
pub mod text;

pub use error::{Error, Result};
pub use folder::{Dtype, ModelFolder, Part};
pub use generate::{GenerationOptions, SamplingOptions};
pub use pipeline::{
    Answer, Encoded, EncodedImage, EncoderReduction, GenerationStats, ImageInput, Observer, OnText, Pipeline,
    PipelineOptions, Positions, PrefixCache, Quiet, Request, Role, SkippedTiles, Stage, StageTimes, TileBudget,
    TileSkip, Turn,
};
pub use select::{Budget, Scope, SelectConfig};
pub use stream::{FrameReport, FrameUpdate, Stream, StreamOptions};
