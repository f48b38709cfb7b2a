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
use crate::select::{SelectConfig, Selection, SelectionInput, Selector, Signals};
use crate::text::TextTokenizer;

/// How a pipeline is built.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Dtype variant of every part not listed in `part_dtypes`.
    pub dtype: Dtype,
    /// Per-part overrides (e.g. chosen by a target profile for `--dtype auto`).
    pub part_dtypes: Vec<(Part, Dtype)>,
    /// Backend name (`tract`, `ort`).
    pub backend: String,
    /// Backend settings (ONNX Runtime library, threads).
    pub backend_options: backend::BackendOptions,
    /// Token selection (method, budget, scope); the default keeps every token.
    pub select: SelectConfig,
    /// Position ids of the tokens after pruned image tokens.
    pub positions: Positions,
    /// Limits on input images.
    pub image_limits: ImageLimits,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            dtype: Dtype::Fp32,
            part_dtypes: Vec::new(),
            backend: "tract".into(),
            backend_options: backend::BackendOptions::default(),
            select: SelectConfig::default(),
            positions: Positions::Contiguous,
            image_limits: ImageLimits::default(),
        }
    }
}

/// Position-id policy after pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Renumber 0..n over the pruned sequence.
    #[default]
    Contiguous,
    /// Keep each token's position in the unpruned sequence (gaps where tokens were dropped), as
    /// DART and FastV do.
    Original,
}

impl std::str::FromStr for Positions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "contiguous" => Ok(Positions::Contiguous),
            "original" => Ok(Positions::Original),
            _ => Err(Error::invalid("positions", s, "expected original or contiguous")),
        }
    }
}

/// Encoder output: feature rows and any pruning signals the export added.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Feature rows `[N, d]`, views concatenated.
    pub features: Array2<f32>,
    /// Signals read from the extra outputs named in `glimpse.json` (text is added later).
    pub signals: Signals,
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
    /// Encoder views (tiles + global view) of the image.
    pub views: usize,
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
    /// Encoder views of the image (0 without one).
    pub views: usize,
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
    selector: Selector,
    positions: Positions,
    dtypes: [Dtype; 3],
    signal_outputs: Vec<(String, String)>,
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
        let selector = Selector::new(opts.select.clone())?;
        let signal_outputs = read_signal_names(&folder)?;
        let backend = backend::by_name(&opts.backend, &opts.backend_options)?;
        let dtype_of = |part: Part| opts.part_dtypes.iter().find(|(p, _)| *p == part).map_or(opts.dtype, |(_, d)| *d);
        let dtypes = Part::ALL.map(dtype_of);
        let load = |part: Part| -> Result<Box<dyn Session>> {
            let path = folder.part_path(part, dtype_of(part))?;
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
            positions: opts.positions,
            dtypes,
            signal_outputs,
            eos,
            context,
            image_limits: opts.image_limits,
        })
    }

    /// The dtype variant loaded for a part.
    pub fn part_dtype(&self, part: Part) -> Dtype {
        self.dtypes[Part::ALL.iter().position(|p| *p == part).unwrap_or(0)]
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

    /// Replaces the token-selection configuration (e.g. to sweep keep ratios without reloading).
    pub fn set_selection(&mut self, config: SelectConfig, positions: Positions) -> Result<()> {
        self.selector = Selector::new(config)?;
        self.positions = positions;
        Ok(())
    }

    /// The token-selection configuration in use.
    pub fn selection(&self) -> &SelectConfig {
        self.selector.config()
    }

    /// Stage 2: encoder inputs → feature rows `[N, d]` (views concatenated) plus signals.
    pub fn encode(&self, input: &VisionInput) -> Result<Encoded> {
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
        let mut named: Vec<(String, Option<Tensor>)> =
            self.vision.outputs().iter().map(|o| o.name.clone()).zip(outputs.into_iter().map(Some)).collect();
        let first = named.first().map(|(n, _)| n.clone()).unwrap_or_default();
        let mut take = |name: &str| named.iter_mut().find(|(n, _)| n == name).and_then(|(_, t)| t.take());
        let feats = take("image_features")
            .or_else(|| take(&first))
            .ok_or_else(|| Error::interface("vision_encoder", "no outputs"))?
            .into_f32("vision_encoder image_features")?;
        let d = *feats.shape().last().unwrap_or(&0);
        let n = feats.len().checked_div(d).unwrap_or(0);
        let total = input.total_tokens();
        if n != total {
            return Err(Error::interface(
                "vision_encoder",
                format!(
                    "image_features has {n} rows (shape {:?}) but the {} layout expects {total}",
                    feats.shape(),
                    self.family.name(),
                ),
            ));
        }
        let features =
            feats.into_shape_with_order((n, d)).map_err(|e| Error::interface("vision_encoder", e.to_string()))?;
        let signals = self.read_signals(&mut take, input)?;
        Ok(Encoded { features, signals })
    }

    /// Reshapes the extra encoder outputs named in `glimpse.json` into per-view signals.
    fn read_signals(&self, take: &mut dyn FnMut(&str) -> Option<Tensor>, input: &VisionInput) -> Result<Signals> {
        let total = input.total_tokens();
        let views = input.views.len();
        let per = input.views.first().map_or(0, |v| v.tokens);
        let mut signals = Signals::default();
        for (signal, output) in &self.signal_outputs {
            let t = take(output)
                .ok_or_else(|| {
                    Error::interface(
                        "vision_encoder",
                        format!("glimpse.json names output `{output}`, which the model lacks"),
                    )
                })?
                .into_f32(output)?;
            let shape = t.shape().to_vec();
            let bad = |e: ndarray::ShapeError| {
                Error::interface("vision_encoder", format!("signal `{output}` has shape {shape:?}: {e}"))
            };
            let width = t.len().checked_div(total).unwrap_or(0);
            match signal.as_str() {
                "cls_attention" => {
                    signals.cls_attention = Some(t.into_shape_with_order((views, width, per)).map_err(bad)?)
                }
                "attention_received" => {
                    signals.attention_received = Some(t.into_shape_with_order((views, per)).map_err(bad)?)
                }
                "keys" => signals.keys = Some(t.into_shape_with_order((views, per, width)).map_err(bad)?),
                _ => {}
            }
        }
        Ok(signals)
    }

    /// Stage 3: chooses which rows reach the language model; computes the prompt's text
    /// embeddings first when the method needs them.
    pub fn select(&self, encoded: &Encoded, input: &VisionInput, prompt: &str) -> Result<Selection> {
        let mut signals = encoded.signals.clone();
        if self.selector.needs().text {
            signals.text = Some(self.text_embeddings(prompt)?);
        }
        let sel = self.selector.select(&SelectionInput {
            features: &encoded.features,
            views: &input.views,
            signals: &signals,
        })?;
        if sel.kept.len() != input.views.len() {
            return Err(Error::interface("select", "selector returned a different number of views"));
        }
        Ok(sel)
    }

    /// The language model's input embeddings of the raw prompt tokens, `[m, d]`.
    pub fn text_embeddings(&self, prompt: &str) -> Result<Array2<f32>> {
        let mut ids = self.tokenizer.encode_plain(prompt)?;
        if ids.is_empty() {
            ids.push(0);
        }
        let m = ids.len();
        let ids = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[1, m]), ids)
            .map_err(|e| Error::interface("embed_tokens", e.to_string()))?;
        let out = self.embed.run(vec![("input_ids", Tensor::I64(ids))])?;
        let e = out.into_iter().next().ok_or_else(|| Error::interface("embed_tokens", "no outputs"))?;
        let e = e.into_f32("embed_tokens")?;
        let d = *e.shape().last().unwrap_or(&0);
        e.into_shape_with_order((m, d)).map_err(|e| Error::interface("embed_tokens", e.to_string()))
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
        positions: Option<Vec<i64>>,
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
        let positions = positions.unwrap_or_else(|| (0..seq as i64).collect());
        if positions.len() != seq {
            return Err(Error::interface("splice", format!("{} positions for {seq} tokens", positions.len())));
        }
        Ok(Prepared { input_ids, embeds, positions, visual_tokens, visual_tokens_kept: rows, views: 0 })
    }

    /// Stages 1-4 for one prompt and optional image, timing each. Times are laps of one clock,
    /// so everything between two stage boundaries is counted (prompt rendering goes to splice).
    pub fn prepare(&self, image: Option<&RgbImage>, prompt: &str, times: &mut StageTimes) -> Result<Prepared> {
        let mut lap = Lap::start();
        let rendered = self.render_prompt(prompt, image.is_some())?;
        let render_time = lap.take();
        let Some(img) = image else {
            let ids = self.expand_and_tokenize(&rendered, None)?;
            let prepared = self.splice(ids, None, 0, None)?;
            times.splice = render_time + lap.take();
            return Ok(prepared);
        };
        let input = self.preprocess(img)?;
        times.preprocess = lap.take();
        let encoded = self.encode(&input)?;
        times.encode = lap.take();
        let sel = self.select(&encoded, &input, prompt)?;
        let kept_rows = sel.gather(&encoded.features, &input.views);
        times.select = lap.take();
        let ids = self.expand_and_tokenize(&rendered, Some((&input, &sel.counts())))?;
        let positions = match self.positions {
            Positions::Contiguous => None,
            Positions::Original => Some(original_positions(&ids, self.family.image_token_id(), &input, &sel)?),
        };
        let mut prepared = self.splice(ids, Some(&kept_rows), encoded.features.nrows(), positions)?;
        prepared.views = input.views.len();
        drop((input, encoded, sel, kept_rows));
        times.splice = render_time + lap.take();
        Ok(prepared)
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
        let mut lap = Lap::start();
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
        let logits = self.decoder_io.step(self.decoder.as_ref(), prepared.embeds, &prepared.positions, &mut cache)?;
        let mut token = sampler.sample(logits.as_slice().unwrap_or(&logits.to_vec()));
        times.prefill = lap.take();
        loop {
            if !opts.ignore_eos && self.eos.contains(&token) {
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
        drop(cache);
        times.decode = lap.take();
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
        let (prompt_tokens, visual, kept, views) =
            (prepared.input_ids.len(), prepared.visual_tokens, prepared.visual_tokens_kept, prepared.views);
        let ids = self.generate(prepared, opts, &mut times, on_text)?;
        let t = Instant::now();
        let text = self.tokenizer.decode(&ids)?;
        times.decode += t.elapsed();
        let decode_s = times.decode.as_secs_f64();
        let stats = GenerationStats {
            times,
            ttft_ms: times.ttft().as_secs_f64() * 1e3,
            prompt_tokens,
            visual_tokens: visual,
            visual_tokens_kept: kept,
            views,
            new_tokens: ids.len(),
            decode_tokens_per_s: if ids.len() > 1 && decode_s > 0.0 { (ids.len() - 1) as f64 / decode_s } else { 0.0 },
        };
        Ok(Answer { text, token_ids: ids, stats })
    }
}

/// Reads `glimpse.json`'s `signals` map (signal name → extra encoder output), if present.
fn read_signal_names(folder: &ModelFolder) -> Result<Vec<(String, String)>> {
    let path = folder.path("glimpse.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let bytes = std::fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| Error::Json { path: path.clone(), source })?;
    let Some(map) = v.get("signals").and_then(serde_json::Value::as_object) else { return Ok(Vec::new()) };
    map.iter()
        .map(|(k, out)| {
            out.as_str()
                .map(|o| (k.clone(), o.to_string()))
                .ok_or_else(|| Error::field(&path, format!("signals.{k}"), "expected an output name"))
        })
        .collect()
}

/// Position ids of a pruned sequence in the unpruned one: every token keeps the position it had
/// before image tokens were dropped (gaps where they were).
pub fn original_positions(ids: &[i64], image_id: i64, input: &VisionInput, sel: &Selection) -> Result<Vec<i64>> {
    // For the j-th kept image token (view v, index i): the tokens dropped before it are all drops
    // of earlier views plus the drops of view v with a smaller index.
    let mut dropped_before_view = Vec::with_capacity(input.views.len());
    let mut acc = 0i64;
    for (view, kept) in input.views.iter().zip(&sel.kept) {
        dropped_before_view.push(acc);
        acc += (view.tokens - kept.len()) as i64;
    }
    let kept: Vec<(usize, usize, usize)> = sel
        .kept
        .iter()
        .enumerate()
        .flat_map(|(v, k)| k.iter().enumerate().map(move |(rank, &i)| (v, i, rank)))
        .collect();
    let mut out = Vec::with_capacity(ids.len());
    let mut shift = 0i64;
    let mut next = 0usize;
    for (p, &t) in ids.iter().enumerate() {
        if t == image_id {
            let &(v, i, rank) =
                kept.get(next).ok_or_else(|| Error::interface("splice", "more image tokens than kept rows"))?;
            next += 1;
            shift = dropped_before_view[v] + (i - rank) as i64;
            out.push(p as i64 + shift);
            // After the last kept token of a view, the view's trailing drops also precede what follows.
            if kept.get(next).is_none_or(|&(nv, _, _)| nv != v) {
                shift = dropped_before_view[v] + (input.views[v].tokens - sel.kept[v].len()) as i64;
            }
        } else {
            out.push(p as i64 + shift);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::{View, ViewKind};

    fn view(n: usize) -> View {
        View { kind: ViewKind::Whole, tokens: n, grid: (1, n), region: [0.0, 0.0, 1.0, 1.0] }
    }

    #[test]
    fn original_positions_leave_gaps_where_tokens_were_dropped() {
        const I: i64 = 9;
        // Unpruned: [t0, I, I, I, I, t5, I, I, I, t42] with views of 4 and 3 tokens.
        let input = VisionInput { tensors: vec![], views: vec![view(4), view(3)], rows: 0, cols: 0 };
        let sel = Selection { kept: vec![vec![1, 3], vec![0]], ..Default::default() };
        let ids = vec![0, I, I, 5, I, 42];
        let pos = original_positions(&ids, I, &input, &sel).unwrap();
        assert_eq!(pos, vec![0, 2, 4, 5, 6, 9]);
        // Keeping everything gives 0..n.
        let all = Selection::all(&input.views);
        let ids = vec![0, I, I, I, I, 5, I, I, I, 42];
        assert_eq!(original_positions(&ids, I, &input, &all).unwrap(), (0..10).collect::<Vec<i64>>());
    }
}

/// A stopwatch whose laps tile time with no gaps.
struct Lap(Instant);

impl Lap {
    fn start() -> Self {
        Lap(Instant::now())
    }

    /// Time since the previous lap (or the start), and starts the next lap.
    fn take(&mut self) -> Duration {
        let now = Instant::now();
        let d = now - self.0;
        self.0 = now;
        d
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
