//! Model-part roles, shared by target profiles (dtype preference per part) and the runtime.

use std::fmt;
use std::str::FromStr;

/// The role of a model part. Which file plays it is data (the model folder's manifest,
/// `glimpse-runtime`'s `manifest::Manifest::parts`); target profiles choose dtypes per role. One
/// type for both crates: the runtime re-exports it as `glimpse_runtime::Part`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// Image → `image_features` (post-connector rows ready to splice).
    VisionEncoder,
    /// `input_ids` → `inputs_embeds`.
    EmbedTokens,
    /// The language model with KV cache as I/O (`past_key_values.*` → `present.*`).
    Decoder,
}

impl Part {
    /// All parts, in pipeline order.
    pub const ALL: [Part; 3] = [Part::VisionEncoder, Part::EmbedTokens, Part::Decoder];

    /// The role's name in the manifest (`vision_encoder`, `embed_tokens`, `decoder`).
    pub fn role(self) -> &'static str {
        match self {
            Part::VisionEncoder => "vision_encoder",
            Part::EmbedTokens => "embed_tokens",
            Part::Decoder => "decoder",
        }
    }

    /// File stem the onnx-community layout uses for this role (a manifest may name another); also the key of
    /// a profile's `[dtypes]` table.
    pub fn stem(self) -> &'static str {
        match self {
            Part::VisionEncoder => "vision_encoder",
            Part::EmbedTokens => "embed_tokens",
            Part::Decoder => "decoder_model_merged",
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.stem())
    }
}

impl FromStr for Part {
    type Err = String;

    /// Parses a role name or file stem (`decoder`, `decoder_model_merged`, ...).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Part::ALL.into_iter().find(|p| p.role() == s || p.stem() == s).ok_or_else(|| {
            format!("unknown model part `{s}` (vision_encoder, embed_tokens, decoder / decoder_model_merged)")
        })
    }
}
