//! Generation: the decoder with its KV cache kept as model I/O (`past_key_values.*` in,
//! `present.*` out), token sampling (greedy, temperature, top-k, top-p, seeded), and the
//! prefill + decode loop with streaming ([`stream`]).

pub mod stop;
pub mod stream;

pub use stop::{StopAt, MAX_STOPS};
pub use stream::{Generator, StopReason};

use ndarray::{Array1, Array3, ArrayD, Axis, IxDyn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::backend::{ElemType, Session, Tensor};
use crate::error::{Error, Result};
use crate::folder::ModelFolder;

/// What every text part's inputs share: batch 1, `S` new tokens, `P` cached ones, and an
/// attention mask over all `P + S` (so graphs that build their own causal mask from it, as
/// transformers' exports do, can be analysed ahead of time).
pub fn text_hints() -> crate::backend::LoadHints {
    crate::backend::LoadHints::default()
        .dim("input_ids", 0, 1)
        .dim("input_ids", 1, "S")
        .dim("inputs_embeds", 0, 1)
        .dim("inputs_embeds", 1, "S")
        .dim("position_ids", 0, 1)
        .dim("position_ids", 1, "S")
        .dim("past_key_values.*", 0, 1)
        .dim("past_key_values.*", 2, "P")
        .dim("attention_mask", 0, 1)
        .dim("attention_mask", 1, "P+S")
        .last_position_logits()
}

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SamplingOptions {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to p (1 = off).
    pub top_p: f32,
    /// Seed of the sampler's random generator.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingOptions {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::invalid("temperature", self.temperature, "must be a finite number >= 0"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid("top_p", self.top_p, "must be in (0, 1]"));
        }
        Ok(())
    }
}

/// Options of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GenerationOptions {
    /// Upper bound on generated tokens (also bounded by the context).
    pub max_new_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingOptions,
    /// Keep generating past end-of-sequence tokens (profiling a fixed number of decode steps).
    pub ignore_eos: bool,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        GenerationOptions { max_new_tokens: 64, sampling: SamplingOptions::default(), ignore_eos: false }
    }
}

/// Chooses tokens from logits.
#[derive(Debug)]
pub struct Sampler {
    opts: SamplingOptions,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from the options.
    pub fn new(opts: SamplingOptions) -> Self {
        Sampler { opts, rng: StdRng::seed_from_u64(opts.seed) }
    }

    /// The next token id.
    pub fn sample(&mut self, logits: &[f32]) -> i64 {
        if self.opts.temperature == 0.0 {
            return argmax(logits) as i64;
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.opts.top_k > 0 {
            idx.truncate(self.opts.top_k);
        }
        let t = self.opts.temperature;
        let max = logits[idx[0]] / t;
        let mut probs: Vec<f32> = idx.iter().map(|&i| (logits[i] / t - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.opts.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.opts.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (p, &i) in probs.iter().zip(&idx) {
            if r < *p {
                return i as i64;
            }
            r -= p;
        }
        idx[probs.len() - 1] as i64
    }
}

/// Index of the largest value (first one on ties, as torch.argmax).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// The decoder's KV cache: one tensor per `past_key_values.*` input, in declared order.
#[derive(Debug, Clone)]
pub struct KvCache {
    tensors: Vec<Tensor>,
    len: usize,
    /// Additive attention bias of each cached key (fed again at every step; see
    /// [`DecoderIo::step_biased`]).
    bias: Vec<f32>,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the first `len` tokens (keys, values and their biases), dropping the rest: a
    /// causal decoder's cache for a prompt's prefix is the prefix of its cache for the prompt.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let keep: Vec<usize> = (0..len).collect();
        for t in &mut self.tensors {
            if t.shape().len() > 2 {
                *t = t.select(2, &keep);
            }
        }
        self.bias.truncate(len);
        self.len = len;
    }
}

/// How a decoder file's inputs and outputs map onto a generation step.
#[derive(Debug, Clone)]
pub struct DecoderIo {
    embeds_elem: ElemType,
    past: Vec<String>,
    present_index: Vec<usize>,
    logits_index: usize,
    kv_elem: ElemType,
    kv_heads: usize,
    head_dim: usize,
    has_use_cache_branch: bool,
    logits_to_keep: Option<String>,
    has_position_ids: bool,
    has_attention_bias: bool,
}

const PART: &str = "decoder_model_merged";

/// The optional decoder input `[1, P+S]` f32 added to every query's attention logit for each
/// key (tools/export writes it for the testbeds with `--attention-bias`).
pub const ATTENTION_BIAS: &str = "attention_bias";

impl DecoderIo {
    /// Reads the decoder's interface from its declared inputs/outputs; KV shapes and dtype come
    /// from the input metadata, falling back to `config.json`.
    pub fn new(session: &dyn Session, folder: &ModelFolder) -> Result<Self> {
        let inputs = session.inputs();
        let outputs = session.outputs();
        let find_in = |name: &str| inputs.iter().find(|i| i.name == name);
        let embeds = find_in("inputs_embeds").ok_or_else(|| Error::interface(PART, "no `inputs_embeds` input"))?;
        if find_in("attention_mask").is_none() {
            return Err(Error::interface(PART, "no `attention_mask` input"));
        }
        let logits_index = outputs
            .iter()
            .position(|o| o.name == "logits")
            .ok_or_else(|| Error::interface(PART, "no `logits` output"))?;
        let past_infos: Vec<_> = inputs.iter().filter(|i| i.name.starts_with("past_key_values.")).collect();
        let mut present_index = Vec::new();
        for p in &past_infos {
            let suffix = &p.name["past_key_values.".len()..];
            let wanted = [format!("present.{suffix}"), format!("present_key_values.{suffix}")];
            let idx = outputs.iter().position(|o| wanted.contains(&o.name)).ok_or_else(|| {
                Error::interface(PART, format!("input `{}` has no matching `present.{suffix}` output", p.name))
            })?;
            present_index.push(idx);
        }
        let (kv_elem, kv_heads, head_dim) = match past_infos.first() {
            Some(info) => {
                let heads = match info.fixed(1) {
                    Some(h) => h,
                    None => folder.config_usize(&["text_config.num_key_value_heads", "num_key_value_heads"])?,
                };
                let dim = match info.fixed(3) {
                    Some(d) => d,
                    None => {
                        let hidden = folder.config_usize(&["text_config.hidden_size", "hidden_size"])?;
                        let h = folder.config_usize(&["text_config.num_attention_heads", "num_attention_heads"])?;
                        folder.config_usize(&["text_config.head_dim", "head_dim"]).unwrap_or(hidden / h.max(1))
                    }
                };
                (info.elem, heads, dim)
            }
            None => (ElemType::F32, 0, 0),
        };
        Ok(DecoderIo {
            embeds_elem: embeds.elem,
            past: past_infos.iter().map(|i| i.name.clone()).collect(),
            present_index,
            logits_index,
            kv_elem,
            kv_heads,
            head_dim,
            has_use_cache_branch: find_in("use_cache_branch").is_some(),
            logits_to_keep: ["num_logits_to_keep", "logits_to_keep"]
                .into_iter()
                .find(|n| find_in(n).is_some())
                .map(str::to_string),
            has_position_ids: find_in("position_ids").is_some(),
            has_attention_bias: find_in(ATTENTION_BIAS).is_some(),
        })
    }

    /// An empty cache (past length 0).
    pub fn empty_cache(&self) -> Result<KvCache> {
        let tensors = self
            .past
            .iter()
            .map(|_| Tensor::zeros(self.kv_elem, &[1, self.kv_heads, 0, self.head_dim]))
            .collect::<Result<_>>()?;
        Ok(KvCache { tensors, len: 0, bias: Vec::new() })
    }

    /// Whether the decoder takes a per-key additive attention bias (`attention_bias`), which
    /// pooled summary rows need for proportional attention.
    pub fn has_attention_bias(&self) -> bool {
        self.has_attention_bias
    }

    /// Runs the decoder on `embeds` `[1, seq, hidden]` at `positions`, appending to `cache`,
    /// and returns the logits of the last position.
    pub fn step(
        &self,
        session: &dyn Session,
        embeds: Array3<f32>,
        positions: &[i64],
        cache: &mut KvCache,
    ) -> Result<Array1<f32>> {
        self.step_biased(session, embeds, positions, None, cache)
    }

    /// [`DecoderIo::step`] where each new token's key gets an additive attention bias (`None`:
    /// 0 for all). The bias stays with the cached keys. A non-zero bias on a decoder without the
    /// `attention_bias` input is an error, never silently dropped.
    pub fn step_biased(
        &self,
        session: &dyn Session,
        embeds: Array3<f32>,
        positions: &[i64],
        key_bias: Option<&[f32]>,
        cache: &mut KvCache,
    ) -> Result<Array1<f32>> {
        let seq = embeds.shape()[1];
        if positions.len() != seq {
            return Err(Error::interface(PART, format!("{} positions for {seq} embeddings", positions.len())));
        }
        if let Some(b) = key_bias {
            if b.len() != seq {
                return Err(Error::interface(PART, format!("{} attention biases for {seq} embeddings", b.len())));
            }
            if !self.has_attention_bias && b.iter().any(|&x| x != 0.0) {
                return Err(Error::interface(
                    PART,
                    format!("weighted (pooled) tokens need the decoder's `{ATTENTION_BIAS}` input, which it lacks"),
                ));
            }
        }
        let total = cache.len + seq;
        let embeds = match self.embeds_elem {
            ElemType::F16 => Tensor::F16(embeds.mapv(half::f16::from_f32).into_dyn()),
            _ => Tensor::F32(embeds.into_dyn()),
        };
        let mut inputs: Vec<(&str, Tensor)> =
            vec![("inputs_embeds", embeds), ("attention_mask", Tensor::I64(ArrayD::from_elem(IxDyn(&[1, total]), 1)))];
        if self.has_position_ids {
            let pos = ArrayD::from_shape_vec(IxDyn(&[1, seq]), positions.to_vec())
                .map_err(|e| Error::interface(PART, e.to_string()))?;
            inputs.push(("position_ids", Tensor::I64(pos)));
        }
        let mut bias = std::mem::take(&mut cache.bias);
        if self.has_attention_bias {
            match key_bias {
                Some(b) => bias.extend_from_slice(b),
                None => bias.resize(total, 0.0),
            }
            let t = ArrayD::from_shape_vec(IxDyn(&[1, total]), bias.clone())
                .map_err(|e| Error::interface(PART, e.to_string()))?;
            inputs.push((ATTENTION_BIAS, Tensor::F32(t)));
        }
        if self.has_use_cache_branch {
            inputs.push(("use_cache_branch", Tensor::Bool(ArrayD::from_elem(IxDyn(&[1]), cache.len > 0))));
        }
        if let Some(name) = &self.logits_to_keep {
            inputs.push((name.as_str(), Tensor::I64(ArrayD::from_elem(IxDyn(&[]), 1))));
        }
        let past = std::mem::take(&mut cache.tensors);
        for (name, t) in self.past.iter().zip(past) {
            inputs.push((name.as_str(), t));
        }
        let mut outputs = session.run(inputs)?;
        let mut present = Vec::with_capacity(self.present_index.len());
        for &i in &self.present_index {
            present.push(std::mem::replace(&mut outputs[i], Tensor::Bool(ArrayD::from_elem(IxDyn(&[0]), false))));
        }
        cache.tensors = present;
        cache.len = total;
        cache.bias = bias;
        let logits =
            std::mem::replace(&mut outputs[self.logits_index], Tensor::Bool(ArrayD::from_elem(IxDyn(&[0]), false)))
                .into_f32("logits")?;
        if logits.ndim() != 3 || logits.shape()[1] == 0 {
            return Err(Error::interface(
                PART,
                format!("logits have shape {:?}, expected [1, seq, vocab]", logits.shape()),
            ));
        }
        let last = logits.shape()[1] - 1;
        logits
            .index_axis(Axis(0), 0)
            .index_axis(Axis(0), last)
            .to_owned()
            .into_dimensionality::<ndarray::Ix1>()
            .map_err(|e| Error::interface(PART, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = Sampler::new(SamplingOptions::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeded_sampling_repeats() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let mut s = Sampler::new(SamplingOptions { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 3 });
        assert_eq!(s.sample(&logits), argmax(&logits) as i64);
        let opts = SamplingOptions { temperature: 0.8, top_k: 10, top_p: 0.9, seed: 42 };
        let a: Vec<i64> = {
            let mut s = Sampler::new(opts);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<i64> = {
            let mut s = Sampler::new(opts);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        // top-k keeps only the 10 best.
        let mut sorted: Vec<usize> = (0..50).collect();
        sorted.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
        let allowed: Vec<i64> = sorted[..10].iter().map(|&i| i as i64).collect();
        assert!(a.iter().all(|t| allowed.contains(t)));
    }

    #[test]
    fn tiny_top_p_picks_the_most_likely() {
        let logits = [0.0f32, 5.0, 1.0, 2.0];
        let mut s = Sampler::new(SamplingOptions { temperature: 1.0, top_k: 0, top_p: 0.01, seed: 9 });
        for _ in 0..10 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn bad_sampling_options_are_rejected() {
        assert!(SamplingOptions { temperature: -1.0, ..Default::default() }.validate().is_err());
        assert!(SamplingOptions { top_p: 0.0, ..Default::default() }.validate().is_err());
    }
}
