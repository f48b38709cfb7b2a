//! What an answer reports: per-stage wall times, token counts, the answer itself, and where the
//! kept visual tokens came from.

use std::time::Duration;

use serde::Serialize;

use super::request::Stage;
use crate::family::View;

/// Wall time of each stage, in milliseconds when serialised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StageTimes {
    #[serde(serialize_with = "ms")]
    pub prompt_compress: Duration,
    #[serde(serialize_with = "ms")]
    pub image_decode: Duration,
    #[serde(serialize_with = "ms")]
    pub preprocess: Duration,
    #[serde(serialize_with = "ms")]
    pub encode: Duration,
    #[serde(serialize_with = "ms")]
    pub select: Duration,
    #[serde(serialize_with = "ms")]
    pub splice: Duration,
    #[serde(serialize_with = "ms")]
    pub prefill: Duration,
    #[serde(serialize_with = "ms")]
    pub decode: Duration,
}

fn ms<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

impl StageTimes {
    /// Time to first token: every stage up to and including prefill.
    pub fn ttft(&self) -> Duration {
        self.prompt_compress
            + self.image_decode
            + self.preprocess
            + self.encode
            + self.select
            + self.splice
            + self.prefill
    }

    /// Sum of all stages.
    pub fn total(&self) -> Duration {
        self.ttft() + self.decode
    }

    /// The time of one stage.
    pub fn get(&self, stage: Stage) -> Duration {
        *self.slot(stage)
    }

    /// Mutable access to one stage's time.
    pub fn slot_mut(&mut self, stage: Stage) -> &mut Duration {
        match stage {
            Stage::PromptCompress => &mut self.prompt_compress,
            Stage::ImageDecode => &mut self.image_decode,
            Stage::Preprocess => &mut self.preprocess,
            Stage::Encode => &mut self.encode,
            Stage::Select => &mut self.select,
            Stage::Splice => &mut self.splice,
            Stage::Prefill => &mut self.prefill,
            Stage::Decode => &mut self.decode,
        }
    }

    fn slot(&self, stage: Stage) -> &Duration {
        match stage {
            Stage::PromptCompress => &self.prompt_compress,
            Stage::ImageDecode => &self.image_decode,
            Stage::Preprocess => &self.preprocess,
            Stage::Encode => &self.encode,
            Stage::Select => &self.select,
            Stage::Splice => &self.splice,
            Stage::Prefill => &self.prefill,
            Stage::Decode => &self.decode,
        }
    }
}

/// What one answer cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenerationStats {
    /// Per-stage wall times.
    pub times: StageTimes,
    /// Time to first token, ms.
    pub ttft_ms: f64,
    /// Prompt length in tokens (image tokens included).
    pub prompt_tokens: usize,
    /// Visual tokens the encoder produced.
    pub visual_tokens: usize,
    /// Visual tokens that reached the language model.
    pub visual_tokens_kept: usize,
    /// Images the encoder ran on (tiles + global view; base view + crops for anyres).
    pub views: usize,
    /// Tokens generated.
    pub new_tokens: usize,
    /// Decode speed over the tokens after the first.
    pub decode_tokens_per_s: f64,
    /// Why generation stopped.
    pub stop: crate::generate::StopReason,
    /// Wall time of each vision-encoder stage run (`vision_embed`, `vision_blocks_K`,
    /// `vision_head`; `vision_encoder` when monolithic), in run order; ms when serialised.
    #[serde(serialize_with = "stage_list")]
    pub encoder_stages: Vec<(String, Duration)>,
    /// What the prompt compressor did, when one is loaded.
    pub prompt_compression: Option<PromptCompressionStats>,
    /// Prompt tokens whose keys and values came from the previous answer's cache instead of
    /// the prefill ([`super::Pipeline::answer_reusing`]; 0 otherwise).
    pub kv_tokens_reused: usize,
}

/// The prompt before and after the prompt compressor.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PromptCompressionStats {
    /// Tokens of the prompt text in the model's tokenizer, before and after (chat template
    /// not included).
    pub text_tokens_before: usize,
    pub text_tokens_after: usize,
    /// The same counted in cl100k, the reference's unit for `rate` and target tokens.
    pub cl100k_tokens_before: usize,
    pub cl100k_tokens_after: usize,
    /// The text that reached the chat template.
    pub prompt: String,
}

fn stage_list<S: serde::Serializer>(v: &[(String, Duration)], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|(n, d)| serde_json::json!({"stage": n, "ms": d.as_secs_f64() * 1e3})))
}

/// A finished answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub text: String,
    pub token_ids: Vec<i64>,
    pub stats: GenerationStats,
    /// Which image regions reached the language model (for `--show-kept`).
    #[serde(skip)]
    pub layout: Option<KeptLayout>,
}

/// Where the kept visual tokens came from: the views that were encoded (or stood in for skipped
/// tiles), the rows kept in each, and the tiles that were never encoded.
#[derive(Debug, Clone, Default)]
pub struct KeptLayout {
    pub views: Vec<View>,
    pub kept: Vec<Vec<usize>>,
    pub skipped_tiles: Vec<View>,
    /// Rows that were encoded (or stood in from the global view) per view, when tile or region
    /// skipping left some never encoded.
    pub present: Option<Vec<Vec<usize>>>,
    /// Token merging's groups per view and patch (see [`super::Encoded::merged`]).
    pub merged: Vec<Vec<u32>>,
}
