//! The prefill + decode loop with streaming: one prefill over the spliced prompt, then one
//! decoder step per token until an end-of-sequence token, the token budget or the context ends,
//! each final piece of text passed to the observer as it appears.

use std::time::Instant;

use ndarray::{Array3, ArrayD, IxDyn};

use super::{DecoderIo, GenerationOptions, KvCache, Sampler};
use crate::backend::{Session, Tensor};
use crate::error::{Error, Result};
use crate::pipeline::{Observer, Stage, StageTimes};
use crate::text::TextTokenizer;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    #[default]
    Eos,
    /// `max_new_tokens` were generated.
    MaxNewTokens,
    /// The context was full.
    Context,
    /// The observer stopped generation (client gone, deadline, stop sequence).
    Cancelled,
}

/// What the loop needs from a loaded model.
pub struct Generator<'a> {
    pub io: &'a DecoderIo,
    pub decoder: &'a dyn Session,
    pub embed: &'a dyn Session,
    pub tokenizer: &'a TextTokenizer,
    pub eos: &'a [i64],
    /// Context length in tokens.
    pub context: usize,
}

impl Generator<'_> {
    /// Prefill on `embeds` `[1, seq, hidden]` at `positions`, then decode; records the prefill
    /// and decode times (each reported to the observer as it ends) and returns the token ids.
    pub fn run(
        &self,
        embeds: Array3<f32>,
        positions: &[i64],
        key_bias: Option<&[f32]>,
        opts: &GenerationOptions,
        times: &mut StageTimes,
        obs: &mut dyn Observer,
    ) -> Result<(Vec<i64>, StopReason)> {
        let cache = self.io.empty_cache()?;
        let (ids, reason, _) = self.run_from(cache, embeds, positions, key_bias, opts, times, obs)?;
        Ok((ids, reason))
    }

    /// [`Generator::run`] continuing from `cache`, which holds the prompt's first tokens
    /// (`embeds` and `positions` are the rest of it); returns the cache as generation left it
    /// (prompt then generated tokens), for a later prompt that shares a prefix with this one.
    #[allow(clippy::too_many_arguments)]
    pub fn run_from(
        &self,
        mut cache: KvCache,
        embeds: Array3<f32>,
        positions: &[i64],
        key_bias: Option<&[f32]>,
        opts: &GenerationOptions,
        times: &mut StageTimes,
        obs: &mut dyn Observer,
    ) -> Result<(Vec<i64>, StopReason, KvCache)> {
        let started = Instant::now();
        opts.sampling.validate()?;
        if positions.is_empty() {
            return Err(Error::interface("decoder_model_merged", "a prefill needs at least one new token"));
        }
        let room = self.context.saturating_sub(cache.len() + positions.len());
        let budget = opts.max_new_tokens.min(room);
        let limit = if opts.max_new_tokens <= room { StopReason::MaxNewTokens } else { StopReason::Context };
        let mut ids = Vec::new();
        if budget == 0 {
            return Ok((ids, limit, cache));
        }
        let mut sampler = Sampler::new(opts.sampling);
        let mut next_pos = positions.last().map_or(0, |p| p + 1);
        let mut streamer = Streamer::default();
        let logits = self.io.step_biased(self.decoder, embeds, positions, key_bias, &mut cache)?;
        let mut token = sampler.sample(logits.as_slice().unwrap_or(&logits.to_vec()));
        times.prefill = started.elapsed();
        obs.stage(Stage::Prefill, times.prefill);
        let started = Instant::now();
        let reason = loop {
            if !opts.ignore_eos && self.eos.contains(&token) {
                break StopReason::Eos;
            }
            ids.push(token);
            streamer.push(self.tokenizer, &ids, obs)?;
            if ids.len() >= budget {
                break limit;
            }
            if obs.cancelled() {
                break StopReason::Cancelled;
            }
            let step_ids = ArrayD::from_elem(IxDyn(&[1, 1]), token);
            let out = self.embed.run(vec![("input_ids", Tensor::I64(step_ids))])?;
            let emb = out
                .into_iter()
                .next()
                .ok_or_else(|| Error::interface("embed_tokens", "no outputs"))?
                .into_f32("embed_tokens")?;
            let hidden = *emb.shape().last().unwrap_or(&0);
            let emb = emb
                .into_shape_with_order((1, 1, hidden))
                .map_err(|e| Error::interface("embed_tokens", e.to_string()))?;
            let logits = self.io.step(self.decoder, emb, &[next_pos], &mut cache)?;
            next_pos += 1;
            token = sampler.sample(logits.as_slice().unwrap_or(&logits.to_vec()));
        };
        streamer.finish(self.tokenizer, &ids, obs)?;
        times.decode = started.elapsed();
        Ok((ids, reason, cache))
    }
}

/// Incremental detokenization: emits only text that is final (no dangling partial UTF-8).
#[derive(Debug, Default)]
struct Streamer {
    emitted: String,
}

impl Streamer {
    /// Emits whatever remains, even an incomplete character, once generation has ended.
    fn finish(&mut self, tok: &TextTokenizer, ids: &[i64], obs: &mut dyn Observer) -> Result<()> {
        let text = tok.decode(ids)?;
        if let Some(new) = text.strip_prefix(self.emitted.as_str()) {
            if !new.is_empty() {
                obs.text(new);
            }
        }
        self.emitted = text;
        Ok(())
    }

    fn push(&mut self, tok: &TextTokenizer, ids: &[i64], obs: &mut dyn Observer) -> Result<()> {
        let text = tok.decode(ids)?;
        if text.ends_with('\u{fffd}') {
            return Ok(());
        }
        if let Some(new) = text.strip_prefix(self.emitted.as_str()) {
            if !new.is_empty() {
                obs.text(new);
                self.emitted = text;
            }
        } else {
            self.emitted = text;
        }
        Ok(())
    }
}
