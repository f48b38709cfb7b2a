//! The pipeline: preprocess → encode → select → splice → prefill → decode, each stage named and
//! timed, none aware of which backend runs it.

use std::path::Path;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::{Array2, Array3, Axis};
use serde::Serialize;

use crate::backend::{self, Session, Tensor};
use crate::error::{Error, Result};
use crate::family::{self, Family, VisionInput};
use crate::folder::{Dtype, ModelFolder, Part};
use crate::generate::{DecoderIo, GenerationOptions, KvCache, Sampler};
use crate::preprocess::{self, ImageLimits};
use crate::select::{self, Selection, SelectionInput, Selector};
use crate::text::TextTokenizer;

/// How a pipeline is built.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Dtype variant of every part.
    pub dtype: Dtype,
    /// Backend name (`tract`).
    pub backend: String,
    /// Token-selection method name (`none` keeps every token).
    pub selector: String,
    /// Limits on input images.
    pub image_limits: ImageLimits,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            dtype: Dtype::Fp32,
            backend: "tract".into(),
            selector: "none".into(),
            image_limits: ImageLimits::default(),
        }
    }
}

/// Wall time of each stage, in milliseconds when serialised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StageTimes {
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
        self.image_decode + self.preprocess + self.encode + self.select + self.splice + self.prefill
    }

    /// Sum of all stages.
    pub fn total(&self) -> Duration {
        self.ttft() + self.decode
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
    /// Tokens generated.
    pub new_tokens: usize,
    /// Decode speed over the tokens after the first.
    pub decode_tokens_per_s: f64,
}

/// A finished answer.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub text: String,
    pub token_ids: Vec<i64>,
    pub stats: GenerationStats,
}

/// The language-model input after splicing.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Prompt token ids (image runs already sized to the kept rows).
    pub input_ids: Vec<i64>,
    /// Embeddings with image rows written into the image-token positions, `[1, seq, hidden]`.
    pub embeds: Array3<f32>,
    /// Position id of each prompt token.
    pub positions: Vec<i64>,
    /// Visual rows before selection.
    pub visual_tokens: usize,
    /// Visual rows spliced in.
    pub visual_tokens_kept: usize,
}

/// A loaded model ready to answer.
pub struct Pipeline {
    pub folder: ModelFolder,
    pub family: Box<dyn Family>,
    pub tokenizer: TextTokenizer,
    backend_name: &'static str,
    vision: Box<dyn Session>,
    embed: Box<dyn Session>,
    decoder: Box<dyn Session>,
    decoder_io: DecoderIo,
    selector: Box<dyn Selector>,
    eos: Vec<i64>,
    context: (usize, String),
    image_limits: ImageLimits,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("root", &self.folder.root)
            .field("family", &self.family.name())
            .field("backend", &self.backend_name)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Opens a model folder and loads its three parts.
    pub fn load(dir: impl AsRef<Path>, opts: &PipelineOptions) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let tokenizer = TextTokenizer::load(&folder)?;
        let family = family::for_folder(&folder, &tokenizer)?;
        let selector = select::by_name(&opts.selector)?;
        let backend = backend::by_name(&opts.backend)?;
        let load = |part: Part| -> Result<Box<dyn Session>> {
            let path = folder.part_path(part, opts.dtype)?;
            backend.load(&path, &folder.root, part.stem())
        };
        let vision = load(Part::VisionEncoder)?;
        let embed = load(Part::EmbedTokens)?;
        let decoder = load(Part::Decoder)?;
        let decoder_io = DecoderIo::new(decoder.as_ref(), &folder)?;
        let eos = folder.eos_token_ids();
        let context = folder.context_length()?;
        Ok(Pipeline {
            folder,
            family,
            tokenizer,
            backend_name: backend.name(),
            vision,
            embed,
            decoder,
            decoder_io,
            selector,
            eos,
            context,
            image_limits: opts.image_limits,
        })
    }

    /// The backend running the parts.
    pub fn backend_name(&self) -> &'static str {
        self.backend_name
    }

    /// The model's context length in tokens.
    pub fn context_length(&self) -> usize {
        self.context.0
    }

    /// Decodes an image file within the pipeline's limits.
    pub fn load_image(&self, path: &Path) -> Result<RgbImage> {
        preprocess::load_image(path, self.image_limits)
    }

    /// Stage 1: image → encoder inputs and views.
    pub fn preprocess(&self, image: &RgbImage) -> Result<VisionInput> {
        self.family.preprocess(image)
    }

    /// Stage 2: encoder inputs → feature rows `[N, d]` (views concatenated).
    pub fn encode(&self, input: &VisionInput) -> Result<Array2<f32>> {
        let declared = self.vision.inputs();
        let mut given: Vec<(&str, Tensor)> = Vec::new();
        for info in declared {
            let t = input.tensors.iter().find(|(n, _)| *n == info.name).ok_or_else(|| {
                Error::interface(
                    "vision_encoder",
                    format!("the {} preprocessor does not produce input `{}`", self.family.name(), info.name),
                )
            })?;
            given.push((info.name.as_str(), t.1.clone()));
        }
        let outputs = self.vision.run(given)?;
        let idx = self.vision.outputs().iter().position(|o| o.name == "image_features").unwrap_or(0);
        let feats = outputs.into_iter().nth(idx).ok_or_else(|| Error::interface("vision_encoder", "no outputs"))?;
        let feats = feats.into_f32("vision_encoder image_features")?;
        let d = *feats.shape().last().unwrap_or(&0);
        let n = feats.len().checked_div(d).unwrap_or(0);
        if n != input.total_tokens() {
            return Err(Error::interface(
                "vision_encoder",
                format!(
                    "image_features has {n} rows (shape {:?}) but the {} layout expects {}",
                    feats.shape(),
                    self.family.name(),
                    input.total_tokens()
                ),
            ));
        }
        feats.into_shape_with_order((n, d)).map_err(|e| Error::interface("vision_encoder", e.to_string()))
    }

    /// Stage 3: chooses which rows reach the language model.
    pub fn select(&self, features: &Array2<f32>, input: &VisionInput) -> Result<Selection> {
        let sel = self.selector.select(&SelectionInput { features, views: &input.views })?;
        if sel.kept.len() != input.views.len() {
            return Err(Error::interface("select", "selector returned a different number of views"));
        }
        Ok(sel)
    }

    /// Renders the user prompt with the chat template (or the family's fallback).
    pub fn render_prompt(&self, prompt: &str, with_image: bool) -> Result<String> {
        match self.tokenizer.render_chat(prompt, with_image)? {
            Some(s) => Ok(s),
            None => Ok(self.family.fallback_prompt(prompt, with_image)),
        }
    }

    /// Expands the image placeholder of a rendered prompt and tokenizes it.
    pub fn expand_and_tokenize(&self, rendered: &str, image: Option<(&VisionInput, &[usize])>) -> Result<Vec<i64>> {
        let placeholder = self.family.image_placeholder();
        let found = rendered.matches(placeholder).count();
        let text = match image {
            Some((input, kept)) => {
                if found != 1 {
                    return Err(Error::invalid(
                        "prompt",
                        rendered,
                        format!("expected exactly one {placeholder} placeholder for one image, found {found}"),
                    ));
                }
                rendered.replacen(placeholder, &self.family.expand_image(input, kept), 1)
            }
            None => rendered.to_string(),
        };
        self.tokenizer.encode(&text)
    }

    /// Stage 4: tokens → embeddings with the kept image rows written into the image positions.
    pub fn splice(
        &self,
        input_ids: Vec<i64>,
        image_rows: Option<&Array2<f32>>,
        visual_tokens: usize,
    ) -> Result<Prepared> {
        let (context, field) = &self.context;
        let image_id = self.family.image_token_id();
        let n_image = input_ids.iter().filter(|&&t| t == image_id).count();
        if input_ids.len() >= *context {
            return Err(Error::ContextOverflow {
                tokens: input_ids.len(),
                image_tokens: n_image,
                context: *context,
                field: field.clone(),
            });
        }
        let rows = image_rows.map_or(0, |r| r.nrows());
        if rows != n_image {
            return Err(Error::interface(
                "splice",
                format!("{n_image} image tokens in the prompt but {rows} feature rows"),
            ));
        }
        let seq = input_ids.len();
        let ids = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, seq]), input_ids.clone())
            .map_err(|e| Error::interface("embed_tokens", e.to_string()))?;
        let out = self.embed.run(vec![("input_ids", Tensor::I64(ids))])?;
        let embeds = out
            .into_iter()
            .next()
            .ok_or_else(|| Error::interface("embed_tokens", "no outputs"))?
            .into_f32("embed_tokens inputs_embeds")?;
        let hidden = *embeds.shape().last().unwrap_or(&0);
        let mut embeds = embeds
            .into_shape_with_order((1, seq, hidden))
            .map_err(|e| Error::interface("embed_tokens", format!("inputs_embeds: {e}")))?;
        if let Some(rows) = image_rows {
            if rows.ncols() != hidden {
                return Err(Error::interface(
                    "splice",
                    format!("image features have width {} but text embeddings {hidden}", rows.ncols()),
                ));
            }
            let mut next = 0;
            for (pos, &t) in input_ids.iter().enumerate() {
                if t == image_id {
                    embeds.slice_mut(ndarray::s![0, pos, ..]).assign(&rows.index_axis(Axis(0), next));
                    next += 1;
                }
            }
        }
        let positions = (0..seq as i64).collect();
        Ok(Prepared { input_ids, embeds, positions, visual_tokens, visual_tokens_kept: rows })
    }

    /// Stages 1-4 for one prompt and optional image, timing each.
    pub fn prepare(&self, image: Option<&RgbImage>, prompt: &str, times: &mut StageTimes) -> Result<Prepared> {
        let rendered = self.render_prompt(prompt, image.is_some())?;
        match image {
            Some(img) => {
                let t = Instant::now();
                let input = self.preprocess(img)?;
                times.preprocess = t.elapsed();
                let t = Instant::now();
                let feats = self.encode(&input)?;
                times.encode = t.elapsed();
                let t = Instant::now();
                let sel = self.select(&feats, &input)?;
                let kept_rows = sel.gather(&feats, &input.views);
                times.select = t.elapsed();
                let t = Instant::now();
                let ids = self.expand_and_tokenize(&rendered, Some((&input, &sel.counts())))?;
                let prepared = self.splice(ids, Some(&kept_rows), feats.nrows())?;
                times.splice = t.elapsed();
                Ok(prepared)
            }
            None => {
                let t = Instant::now();
                let ids = self.expand_and_tokenize(&rendered, None)?;
                let prepared = self.splice(ids, None, 0)?;
                times.splice = t.elapsed();
                Ok(prepared)
            }
        }
    }

    /// Runs the prefill alone and returns the last position's logits (used by parity tests and
    /// profiling).
    pub fn prefill_logits(&self, prepared: &Prepared) -> Result<ndarray::Array1<f32>> {
        let mut cache = self.decoder_io.empty_cache()?;
        self.decoder_io.step(self.decoder.as_ref(), prepared.embeds.clone(), &prepared.positions, &mut cache)
    }

    /// Stages 5-6: prefill then decode until EOS or the token budget, streaming text pieces.
    pub fn generate(
        &self,
        prepared: Prepared,
        opts: &GenerationOptions,
        times: &mut StageTimes,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Vec<i64>> {
        opts.sampling.validate()?;
        let budget = opts.max_new_tokens.min(self.context.0.saturating_sub(prepared.input_ids.len()));
        let mut sampler = Sampler::new(opts.sampling);
        let mut cache: KvCache = self.decoder_io.empty_cache()?;
        let mut next_pos = prepared.positions.last().map_or(0, |p| p + 1);
        let mut streamer = Streamer::default();
        let mut ids = Vec::new();
        if budget == 0 {
            return Ok(ids);
        }
        let t = Instant::now();
        let logits = self.decoder_io.step(self.decoder.as_ref(), prepared.embeds, &prepared.positions, &mut cache)?;
        let mut token = sampler.sample(logits.as_slice().unwrap_or(&logits.to_vec()));
        times.prefill = t.elapsed();
        let t = Instant::now();
        loop {
            if self.eos.contains(&token) {
                break;
            }
            ids.push(token);
            streamer.push(&self.tokenizer, &ids, on_text)?;
            if ids.len() >= budget {
                break;
            }
            let step_ids = ndarray::ArrayD::from_elem(ndarray::IxDyn(&[1, 1]), token);
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
            let logits = self.decoder_io.step(self.decoder.as_ref(), emb, &[next_pos], &mut cache)?;
            next_pos += 1;
            token = sampler.sample(logits.as_slice().unwrap_or(&logits.to_vec()));
        }
        streamer.finish(&self.tokenizer, &ids, on_text)?;
        times.decode = t.elapsed();
        Ok(ids)
    }

    /// Answers a prompt about an optional image file: every stage, timed, with streaming.
    pub fn ask(
        &self,
        image: Option<&Path>,
        prompt: &str,
        opts: &GenerationOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        let mut times = StageTimes::default();
        let img = match image {
            Some(p) => {
                let t = Instant::now();
                let img = self.load_image(p)?;
                times.image_decode = t.elapsed();
                Some(img)
            }
            None => None,
        };
        self.ask_image(img.as_ref(), prompt, opts, times, on_text)
    }

    /// Like [`Pipeline::ask`] with an already decoded image.
    pub fn ask_image(
        &self,
        image: Option<&RgbImage>,
        prompt: &str,
        opts: &GenerationOptions,
        mut times: StageTimes,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        let prepared = self.prepare(image, prompt, &mut times)?;
        let (prompt_tokens, visual, kept) =
            (prepared.input_ids.len(), prepared.visual_tokens, prepared.visual_tokens_kept);
        let ids = self.generate(prepared, opts, &mut times, on_text)?;
        let text = self.tokenizer.decode(&ids)?;
        let decode_s = times.decode.as_secs_f64();
        let stats = GenerationStats {
            times,
            ttft_ms: times.ttft().as_secs_f64() * 1e3,
            prompt_tokens,
            visual_tokens: visual,
            visual_tokens_kept: kept,
            new_tokens: ids.len(),
            decode_tokens_per_s: if ids.len() > 1 && decode_s > 0.0 { (ids.len() - 1) as f64 / decode_s } else { 0.0 },
        };
        Ok(Answer { text, token_ids: ids, stats })
    }
}

/// Incremental detokenization: emits only text that is final (no dangling partial UTF-8).
#[derive(Debug, Default)]
struct Streamer {
    emitted: String,
}

impl Streamer {
    /// Emits whatever remains, even an incomplete character, once generation has ended.
    fn finish(&mut self, tok: &TextTokenizer, ids: &[i64], on_text: &mut dyn FnMut(&str)) -> Result<()> {
        let text = tok.decode(ids)?;
        if let Some(new) = text.strip_prefix(self.emitted.as_str()) {
            if !new.is_empty() {
                on_text(new);
            }
        }
        self.emitted = text;
        Ok(())
    }

    fn push(&mut self, tok: &TextTokenizer, ids: &[i64], on_text: &mut dyn FnMut(&str)) -> Result<()> {
        let text = tok.decode(ids)?;
        if text.ends_with('\u{fffd}') {
            return Ok(());
        }
        if let Some(new) = text.strip_prefix(self.emitted.as_str()) {
            if !new.is_empty() {
                on_text(new);
                self.emitted = text;
            }
        } else {
            self.emitted = text;
        }
        Ok(())
    }
}
