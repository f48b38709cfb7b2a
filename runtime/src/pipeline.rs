//! The pipeline: preprocess → encode → select → splice → prefill → decode, each stage named and
//! timed, none aware of which backend runs it.

use std::path::Path;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::{Array2, Array3, Axis};
use serde::Serialize;

use crate::backend::{self, Session, Tensor};
use crate::error::{Error, Result};
use crate::family::{self, Family, View, ViewKind, VisionInput};
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
    /// Skip whole tiles before the encoder (tiled families only).
    pub tiles: Option<TileSkip>,
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
            positions: Positions::Original,
            tiles: None,
            image_limits: ImageLimits::default(),
        }
    }
}

/// Position-id policy after pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Renumber 0..n over the pruned sequence.
    Contiguous,
    /// Keep each token's position in the unpruned sequence (gaps where tokens were dropped), as
    /// DART and FastV do. The default: RoPE decoders read where a token was from its position
    /// (on testbed-llava at keep 0.25, DART holds 97% of full accuracy this way, 69% renumbered).
    #[default]
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

/// How many tiles to encode when skipping tiles before the encoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TileBudget {
    /// Encode this many tiles (0 = the global view alone).
    Count(usize),
    /// Encode this fraction of the tiles (rounded, at least one).
    Ratio(f32),
}

impl std::str::FromStr for TileBudget {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Ok(n) = s.parse::<usize>() {
            return Ok(TileBudget::Count(n));
        }
        match s.parse::<f32>() {
            Ok(r) if r > 0.0 && r <= 1.0 => Ok(TileBudget::Ratio(r)),
            _ => Err(Error::invalid("tiles", s, "expected a tile count or a ratio in (0, 1]")),
        }
    }
}

/// What stands in for a skipped tile in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SkippedTiles {
    /// Nothing: the tile and its marker disappear.
    #[default]
    Drop,
    /// The global view's tokens over the tile's region, under the tile's marker.
    Global,
}

impl std::str::FromStr for SkippedTiles {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "drop" => Ok(SkippedTiles::Drop),
            "global" => Ok(SkippedTiles::Global),
            _ => Err(Error::invalid("skipped tiles", s, "expected drop or global")),
        }
    }
}

/// Tile skipping: score tiles from the global view, encode only the best.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileSkip {
    pub budget: TileBudget,
    pub skipped: SkippedTiles,
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
    /// Images the encoder ran on (tiles + global view; base view + crops for anyres).
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
    /// Images the encoder ran on (0 without an image).
    pub views: usize,
    /// What was kept where (None without an image).
    pub layout: Option<KeptLayout>,
}

/// An image preprocessed and encoded once (see [`Pipeline::encode_image`]), with the measured
/// preprocess and encode times.
#[derive(Debug, Clone)]
pub struct EncodedImage {
    input: VisionInput,
    encoded: Encoded,
    preprocess: Duration,
    encode: Duration,
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
    tiles: Option<TileSkip>,
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
        if opts.tiles.is_some() && !family.splits_into_tiles() {
            // LLaVA has one view; LLaVA-OneVision's anyres crops are packed into one grid, which
            // tile skipping does not handle yet.
            return Err(Error::invalid(
                "tile skipping (--tiles)",
                family.name(),
                "needs a family that splits images into tiles plus a global view (idefics3 / smolvlm with image splitting)",
            ));
        }
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
            tiles: opts.tiles,
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

    /// Where each part runs (backend, execution providers and what became of each).
    pub fn placements(&self) -> [(Part, crate::backend::Placement); 3] {
        [
            (Part::VisionEncoder, self.vision.placement()),
            (Part::EmbedTokens, self.embed.placement()),
            (Part::Decoder, self.decoder.placement()),
        ]
    }

    /// Tile skipping in effect, if any.
    pub fn tile_skip(&self) -> Option<TileSkip> {
        self.tiles
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
        let total = input.encoder_rows();
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
        let features = match &input.anyres {
            None => features,
            Some(layout) => {
                let newline = take("image_newline")
                    .ok_or_else(|| {
                        Error::interface(
                            "vision_encoder",
                            "anyres packing needs the `image_newline` output (export with `python -m glimpse_export`)",
                        )
                    })?
                    .into_f32("vision_encoder image_newline")?;
                let newline = newline.into_shape_with_order(d).map_err(|e| {
                    Error::interface("vision_encoder", format!("image_newline must have {d} values: {e}"))
                })?;
                layout.pack(features.view(), newline.view())?
            }
        };
        let signals = self.read_signals(&mut take, input)?;
        Ok(Encoded { features, signals })
    }

    /// Reshapes the extra encoder outputs named in `glimpse.json` into per-row signals.
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
                    // [views, layers, tokens] -> [views * tokens, layers]
                    let a = t.into_shape_with_order((views, width, per)).map_err(bad)?;
                    let a = a.permuted_axes([0, 2, 1]).as_standard_layout().to_owned();
                    signals.cls_attention = Some(a.into_shape_with_order((total, width)).map_err(bad)?);
                }
                "attention_received" => signals.attention_received = Some(t.into_shape_with_order(total).map_err(bad)?),
                "keys" => signals.keys = Some(t.into_shape_with_order((total, width)).map_err(bad)?),
                _ => {}
            }
        }
        Ok(signals)
    }

    /// Stage 2 with tile skipping: encodes the global view, scores every tile's region from it
    /// (relevance of the global tokens to the prompt plus their saliency), encodes only the best
    /// tiles, and returns the reduced input with its features. Skipped tiles vanish or are
    /// represented by the global tokens over their region.
    pub fn encode_skipping_tiles(
        &self,
        input: &VisionInput,
        prompt: &str,
        skip: TileSkip,
    ) -> Result<(VisionInput, Encoded)> {
        let tiles: Vec<usize> = input
            .views
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v.kind, ViewKind::Tile { .. }))
            .map(|(i, _)| i)
            .collect();
        let Some(g) = input.views.iter().position(|v| v.kind == ViewKind::Global) else {
            return Ok((input.clone(), self.encode(input)?));
        };
        if tiles.is_empty() {
            return Ok((input.clone(), self.encode(input)?));
        }
        let global_in = input.subset(&[g]);
        let global = self.encode(&global_in)?;
        let gview = &input.views[g];
        let scores = self.global_token_scores(&global, prompt)?;
        let covered = |tile: &View| -> Vec<usize> {
            let (gh, gw) = gview.grid;
            let [x0, y0, x1, y1] = tile.region;
            (0..gview.tokens)
                .filter(|t| {
                    let cx = ((t % gw) as f32 + 0.5) / gw as f32;
                    let cy = ((t / gw) as f32 + 0.5) / gh as f32;
                    cx >= x0 && cx < x1 && cy >= y0 && cy < y1
                })
                .collect()
        };
        let tile_score: Vec<f32> = tiles
            .iter()
            .map(|&v| {
                let c = covered(&input.views[v]);
                if c.is_empty() {
                    f32::MIN
                } else {
                    c.iter().map(|&t| scores[t]).sum::<f32>() / c.len() as f32
                }
            })
            .collect();
        let k = match skip.budget {
            TileBudget::Count(n) => n.min(tiles.len()),
            TileBudget::Ratio(r) => ((r * tiles.len() as f32).round() as usize).clamp(1, tiles.len()),
        };
        let chosen: Vec<usize> =
            crate::select::top_k(ndarray::ArrayView1::from(&tile_score), k).into_iter().map(|i| tiles[i]).collect();
        let encoded_tiles = if chosen.is_empty() { None } else { Some(self.encode(&input.subset(&chosen))?) };
        // Assemble views in the original order with their feature rows.
        let mut views = Vec::new();
        let mut parts: Vec<(&Encoded, Vec<usize>)> = Vec::new();
        let mut tile_row = 0;
        for (i, view) in input.views.iter().enumerate() {
            if i == g {
                views.push(view.clone());
                parts.push((&global, (0..gview.tokens).collect()));
            } else if chosen.contains(&i) {
                let enc =
                    encoded_tiles.as_ref().ok_or_else(|| Error::interface("tiles", "chosen tiles not encoded"))?;
                views.push(view.clone());
                parts.push((enc, (tile_row..tile_row + view.tokens).collect()));
                tile_row += view.tokens;
            } else if skip.skipped == SkippedTiles::Global {
                let rows = covered(view);
                let (gh, gw) = gview.grid;
                let side_w = ((view.region[2] - view.region[0]) * gw as f32).round().max(1.0) as usize;
                let grid = if rows.len() % side_w == 0 { (rows.len() / side_w, side_w) } else { (1, rows.len()) };
                let _ = gh;
                views.push(View { tokens: rows.len(), grid, ..view.clone() });
                parts.push((&global, rows));
            }
        }
        let mut features = Vec::new();
        let mut signals: Vec<Signals> = Vec::new();
        for (enc, rows) in &parts {
            features.push(enc.features.select(ndarray::Axis(0), rows));
            signals.push(enc.signals.select_rows(rows));
        }
        let views_f: Vec<_> = features.iter().map(|f| f.view()).collect();
        let features =
            ndarray::concatenate(ndarray::Axis(0), &views_f).map_err(|e| Error::interface("tiles", e.to_string()))?;
        let signals = concat_signals(&signals);
        let mut frames: Vec<usize> = chosen.clone();
        frames.push(g);
        let mut reduced = input.subset(&frames);
        reduced.views = views;
        Ok((reduced, Encoded { features, signals }))
    }

    /// Per-token scores of the global view: z-scored relevance to the prompt (cosine with the
    /// prompt's embeddings) plus z-scored saliency (attention received when exported, else the
    /// distance from the mean feature).
    fn global_token_scores(&self, global: &Encoded, prompt: &str) -> Result<Vec<f32>> {
        let f = &global.features;
        let z = |v: Vec<f32>| -> Vec<f32> {
            let n = v.len().max(1) as f32;
            let mean = v.iter().sum::<f32>() / n;
            let sd = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n).sqrt();
            v.iter().map(|x| if sd > 0.0 { (x - mean) / sd } else { 0.0 }).collect()
        };
        let fnorm = crate::select::normalized(f.view());
        let text = crate::select::normalized(self.text_embeddings(prompt)?.view());
        let relevance: Vec<f32> = fnorm.dot(&text.t()).rows().into_iter().map(|r| r.mean().unwrap_or(0.0)).collect();
        let saliency: Vec<f32> = match &global.signals.attention_received {
            Some(a) if a.len() == f.nrows() => a.to_vec(),
            _ => {
                let mean = f.mean_axis(ndarray::Axis(0)).unwrap_or_else(|| ndarray::Array1::zeros(f.ncols()));
                f.rows().into_iter().map(|r| (&r - &mean).mapv(|x| x * x).sum().sqrt()).collect()
            }
        };
        Ok(z(relevance).into_iter().zip(z(saliency)).map(|(a, b)| a + b).collect())
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
        Ok(Prepared { input_ids, embeds, positions, visual_tokens, visual_tokens_kept: rows, views: 0, layout: None })
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
        let original_views = input.views.clone();
        let original_tokens = input.total_tokens();
        times.preprocess = lap.take();
        let (input, encoded) = match self.tiles {
            Some(skip) if input.rows * input.cols > 0 => self.encode_skipping_tiles(&input, prompt, skip)?,
            _ => {
                let encoded = self.encode(&input)?;
                (input, encoded)
            }
        };
        times.encode = lap.take();
        self.select_and_splice(
            &rendered,
            render_time,
            &input,
            &encoded,
            original_views,
            original_tokens,
            prompt,
            times,
            lap,
        )
    }

    /// Preprocesses and encodes an image once, to ask several prompts about it with
    /// [`Pipeline::ask_encoded`] (`glimpse eval` asks about eight questions per picture). Not
    /// available with tile skipping, whose choice of tiles depends on the prompt.
    pub fn encode_image(&self, image: &RgbImage) -> Result<EncodedImage> {
        if self.tiles.is_some() {
            return Err(Error::invalid(
                "tile skipping",
                "on",
                "the tiles encoded depend on the prompt, so one encoding cannot serve several prompts; use ask_image",
            ));
        }
        let started = Instant::now();
        let input = self.preprocess(image)?;
        let preprocess = started.elapsed();
        let started = Instant::now();
        let encoded = self.encode(&input)?;
        Ok(EncodedImage { input, encoded, preprocess, encode: started.elapsed() })
    }

    /// Like [`Pipeline::prepare`] for an image encoded by [`Pipeline::encode_image`]: selection,
    /// splice and timing as usual; the preprocess and encode times are the ones measured when the
    /// image was encoded, so time to first token stays that of a fresh image.
    pub fn prepare_encoded(&self, image: &EncodedImage, prompt: &str, times: &mut StageTimes) -> Result<Prepared> {
        let mut lap = Lap::start();
        let rendered = self.render_prompt(prompt, true)?;
        let render_time = lap.take();
        times.preprocess = image.preprocess;
        times.encode = image.encode;
        let views = image.input.views.clone();
        let tokens = image.input.total_tokens();
        self.select_and_splice(&rendered, render_time, &image.input, &image.encoded, views, tokens, prompt, times, lap)
    }

    /// Token selection and splice after the encoder (the second half of [`Pipeline::prepare`]).
    #[allow(clippy::too_many_arguments)]
    fn select_and_splice(
        &self,
        rendered: &str,
        render_time: Duration,
        input: &VisionInput,
        encoded: &Encoded,
        original_views: Vec<View>,
        original_tokens: usize,
        prompt: &str,
        times: &mut StageTimes,
        mut lap: Lap,
    ) -> Result<Prepared> {
        let sel = self.select(encoded, input, prompt)?;
        let kept_rows = sel.gather(&encoded.features, &input.views);
        times.select = lap.take();
        let ids = self.expand_and_tokenize(rendered, Some((input, &sel.counts())))?;
        let positions = match self.positions {
            Positions::Contiguous => None,
            Positions::Original => Some(original_positions(&ids, self.family.image_token_id(), input, &sel)?),
        };
        let mut prepared = self.splice(ids, Some(&kept_rows), original_tokens, positions)?;
        prepared.views = input.encoder_views();
        let skipped_tiles = original_views
            .into_iter()
            .filter(|o| {
                matches!(o.kind, ViewKind::Tile { .. })
                    && !input.views.iter().any(|v| v.kind == o.kind && v.tokens == o.tokens)
            })
            .collect();
        prepared.layout = Some(KeptLayout { views: input.views.clone(), kept: sel.kept.clone(), skipped_tiles });
        drop((sel, kept_rows));
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
        self.answer(prepared, opts, times, on_text)
    }

    /// [`Pipeline::ask_image`] for an image encoded once by [`Pipeline::encode_image`].
    pub fn ask_encoded(
        &self,
        image: &EncodedImage,
        prompt: &str,
        opts: &GenerationOptions,
        mut times: StageTimes,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        let prepared = self.prepare_encoded(image, prompt, &mut times)?;
        self.answer(prepared, opts, times, on_text)
    }

    /// Prefill, decode and the answer's statistics.
    fn answer(
        &self,
        prepared: Prepared,
        opts: &GenerationOptions,
        mut times: StageTimes,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        let (prompt_tokens, visual, kept, views) =
            (prepared.input_ids.len(), prepared.visual_tokens, prepared.visual_tokens_kept, prepared.views);
        let layout = prepared.layout.clone();
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
        Ok(Answer { text, token_ids: ids, stats, layout })
    }
}

/// Concatenates per-row signals of consecutive row groups (a signal missing in any is dropped).
fn concat_signals(parts: &[Signals]) -> Signals {
    fn cat2(parts: Vec<Option<&Array2<f32>>>) -> Option<Array2<f32>> {
        let views: Option<Vec<_>> = parts.into_iter().map(|p| p.map(|a| a.view())).collect();
        views.and_then(|v| ndarray::concatenate(ndarray::Axis(0), &v).ok())
    }
    let received: Option<Vec<_>> = parts.iter().map(|p| p.attention_received.as_ref().map(|a| a.view())).collect();
    Signals {
        cls_attention: cat2(parts.iter().map(|p| p.cls_attention.as_ref()).collect()),
        attention_received: received.and_then(|v| ndarray::concatenate(ndarray::Axis(0), &v).ok()),
        keys: cat2(parts.iter().map(|p| p.keys.as_ref()).collect()),
        text: None,
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
        let input = VisionInput { tensors: vec![], views: vec![view(4), view(3)], rows: 0, cols: 0, anyres: None };
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
