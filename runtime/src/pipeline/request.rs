//! What one call of [`super::Pipeline::answer`] takes (a [`Request`]) and who hears about it
//! while it runs (an [`Observer`]: stage timings as each stage ends, streamed text).

use std::path::Path;
use std::time::Duration;

use image::RgbImage;
use serde::Serialize;

use super::{EncodedImage, EncoderReduction};
use crate::select::SelectConfig;

use super::Positions;

/// The image of a request, in whatever form the caller has it.
#[derive(Debug, Clone, Copy, Default)]
pub enum ImageInput<'a> {
    /// Text only.
    #[default]
    None,
    /// An image file, decoded within the pipeline's limits (timed as `image_decode`).
    Path(&'a Path),
    /// An already decoded image.
    Decoded(&'a RgbImage),
    /// The bytes of an image file as received (e.g. a base64 data URL of an HTTP request),
    /// decoded within the pipeline's limits (timed as `image_decode`); `name` labels errors.
    Bytes { bytes: &'a [u8], name: &'a str },
    /// An image preprocessed and encoded once ([`super::Pipeline::encode_image`]); its measured
    /// preprocess and encode times are reported again, so time to first token stays that of a
    /// fresh image.
    Encoded(&'a EncodedImage),
}

/// Who said an earlier turn of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role's name in chat templates.
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// An earlier text turn of a conversation, rendered through the chat template before the
/// request's own prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub text: String,
}

/// One question: the prompt, the image, and per-request selection settings.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    /// The user's question (the last user turn); the prompt compressor shortens this text.
    pub prompt: &'a str,
    /// Earlier turns (system prompt, previous questions and answers), text only; they need a
    /// chat template in the model folder.
    pub history: &'a [Turn],
    pub image: ImageInput<'a>,
    /// Token selection for this request only (method, budget, positions); `None` uses the
    /// pipeline's.
    pub selection: Option<(SelectConfig, Positions)>,
    /// Tile / region skipping and merging for this request only; `None` uses the pipeline's.
    pub reduction: Option<EncoderReduction>,
}

impl<'a> Request<'a> {
    /// A text-only request.
    pub fn new(prompt: &'a str) -> Self {
        Request { prompt, ..Default::default() }
    }

    /// The same request about an image.
    pub fn with_image(mut self, image: ImageInput<'a>) -> Self {
        self.image = image;
        self
    }

    /// The same request after earlier turns of a conversation.
    pub fn with_history(mut self, history: &'a [Turn]) -> Self {
        self.history = history;
        self
    }

    /// The same request with its own reduction before and inside the encoder.
    pub fn with_reduction(mut self, reduction: EncoderReduction) -> Self {
        self.reduction = Some(reduction);
        self
    }

    /// The same request with its own token selection.
    pub fn with_selection(mut self, config: SelectConfig, positions: Positions) -> Self {
        self.selection = Some((config, positions));
        self
    }
}

/// The named stages, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The prompt compressor shortening the text prompt (when one is loaded).
    PromptCompress,
    ImageDecode,
    Preprocess,
    Encode,
    Select,
    Splice,
    Prefill,
    Decode,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 8] = [
        Stage::PromptCompress,
        Stage::ImageDecode,
        Stage::Preprocess,
        Stage::Encode,
        Stage::Select,
        Stage::Splice,
        Stage::Prefill,
        Stage::Decode,
    ];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Stage::PromptCompress => "prompt_compress",
            Stage::ImageDecode => "image_decode",
            Stage::Preprocess => "preprocess",
            Stage::Encode => "encode",
            Stage::Select => "select",
            Stage::Splice => "splice",
            Stage::Prefill => "prefill",
            Stage::Decode => "decode",
        }
    }
}

/// Hears about a request while it runs. Every method has a no-op default.
pub trait Observer {
    /// A stage finished and took `took` (stages that do not run for a request are not reported).
    fn stage(&mut self, _stage: Stage, _took: Duration) {}
    /// A piece of the answer became final (pieces concatenate to the answer text).
    fn text(&mut self, _piece: &str) {}
    /// Asked between stages and after every generated token: `true` stops the request. Before
    /// generation starts that is [`crate::Error::Cancelled`]; during it, the answer so far with
    /// [`crate::generate::StopReason::Cancelled`] (a client that went away, a deadline, a stop
    /// sequence).
    fn cancelled(&mut self) -> bool {
        false
    }
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Observer for Quiet {}

/// An observer that passes streamed text to a closure.
pub struct OnText<F: FnMut(&str)>(pub F);

impl<F: FnMut(&str)> Observer for OnText<F> {
    fn text(&mut self, piece: &str) {
        (self.0)(piece)
    }
}
