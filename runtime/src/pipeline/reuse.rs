//! Reuse between requests that share most of their input, as a camera stream's frames do
//! ([`crate::stream::Stream`]): feature rows of views whose pixels did not change, and the
//! language model's KV cache over the prompt prefix that did not change.

use ndarray::{s, Array2, ArrayView2, Axis};

use super::encode::assemble;
use super::{Encoded, Observer, Pipeline, Prepared, StageTimes};
use crate::error::Result;
use crate::family::{view_starts, VisionInput};
use crate::generate::{GenerationOptions, KvCache, StopReason};

/// The last prompt a [`PrefixCache`] saw, with the decoder's cache after answering it.
#[derive(Debug)]
struct Seen {
    embeds: Array2<f32>,
    positions: Vec<i64>,
    bias: Vec<f32>,
    kv: KvCache,
}

impl Seen {
    /// How many leading tokens of a new prompt equal this one's (same embedding bits, position
    /// and attention bias), so their keys and values are the same in a causal decoder.
    fn common_prefix(&self, embeds: ArrayView2<'_, f32>, positions: &[i64], bias: &[f32]) -> usize {
        let n = self.positions.len().min(positions.len()).min(embeds.nrows()).min(self.embeds.nrows());
        (0..n)
            .take_while(|&i| {
                self.positions[i] == positions[i]
                    && self.bias.get(i) == bias.get(i)
                    && self.embeds.row(i) == embeds.row(i)
            })
            .count()
    }
}

/// The decoder's KV cache of the previous answer, kept so that the next prompt prefills only
/// from the first token that differs ([`Pipeline::answer_reusing`]). Empty at first.
#[derive(Debug, Default)]
pub struct PrefixCache {
    seen: Option<Seen>,
}

impl PrefixCache {
    /// Forgets the cached prompt (the next answer prefills everything).
    pub fn clear(&mut self) {
        self.seen = None;
    }

    /// Tokens of the cached prompt (0 when empty).
    pub fn prompt_tokens(&self) -> usize {
        self.seen.as_ref().map_or(0, |s| s.positions.len())
    }
}

impl Pipeline {
    /// Prefill (from the first token that differs from the cached prompt) and decode; returns
    /// the tokens, why generation stopped and how many prompt tokens came from the cache. The
    /// cache then holds this prompt. The last prompt token is always prefilled, for its logits.
    pub(crate) fn generate_reusing(
        &self,
        prepared: Prepared,
        opts: &GenerationOptions,
        times: &mut StageTimes,
        obs: &mut dyn Observer,
        cache: &mut PrefixCache,
    ) -> Result<(Vec<i64>, StopReason, usize)> {
        let seq = prepared.positions.len();
        let embeds = prepared.embeds.index_axis(Axis(0), 0).to_owned();
        let bias = prepared.key_bias.clone().unwrap_or_else(|| vec![0.0; seq]);
        let (kv, shared) = match cache.seen.take() {
            Some(seen) => {
                let shared = seen
                    .common_prefix(embeds.view(), &prepared.positions, &bias)
                    .min(seq.saturating_sub(1))
                    .min(seen.kv.len());
                let mut kv = seen.kv;
                kv.truncate(shared);
                (kv, shared)
            }
            None => (self.decoder_io.empty_cache()?, 0),
        };
        let rest = prepared.embeds.slice(s![.., shared.., ..]).to_owned();
        let rest_bias = prepared.key_bias.as_ref().map(|b| b[shared.min(b.len())..].to_vec());
        let (ids, stop, kv) = self.generator().run_from(
            kv,
            rest,
            &prepared.positions[shared..],
            rest_bias.as_deref(),
            opts,
            times,
            obs,
        )?;
        cache.seen = Some(Seen { embeds, positions: prepared.positions, bias, kv });
        Ok((ids, stop, shared))
    }

    /// The encoding of `input` built from `previous` (an encoding of an earlier frame with the
    /// same view layout) for every view except `reencode`, which run through the encoder. With
    /// every view re-encoded it equals [`Pipeline::encode`].
    pub(crate) fn encode_reusing(
        &self,
        input: &VisionInput,
        previous: &Encoded,
        reencode: &[usize],
    ) -> Result<Encoded> {
        let mut order: Vec<usize> = reencode.iter().copied().filter(|&v| v < input.views.len()).collect();
        order.sort_unstable();
        order.dedup();
        if order.len() == input.views.len() {
            return self.encode(input);
        }
        let fresh = if order.is_empty() { None } else { Some(self.encode(&input.subset(&order))?) };
        let starts = view_starts(&input.views);
        let mut old_rows = Vec::new();
        let mut new_rows = Vec::new();
        let mut at = 0;
        for (v, view) in input.views.iter().enumerate() {
            match order.binary_search(&v) {
                Ok(_) => {
                    new_rows.extend((0..view.tokens).map(|t| (starts[v] + t, at + t)));
                    at += view.tokens;
                }
                Err(_) => old_rows.extend((0..view.tokens).map(|t| (starts[v] + t, starts[v] + t))),
            }
        }
        let mut picks = vec![(previous, old_rows)];
        if let Some(f) = &fresh {
            picks.push((f, new_rows));
        }
        let mut out = assemble(input, &picks)?;
        out.stages = fresh.map(|f| f.stages).unwrap_or_default();
        Ok(out)
    }
}
