//! The pipeline: preprocess → encode → select → splice → prefill → decode, each stage named and
//! timed, none aware of which backend runs it. [`Pipeline::answer`] is the one entry point: it
//! takes a [`Request`] and reports to an [`Observer`]; the stages live with the modules that own
//! them (encode here in `encode`, selection in [`crate::select`], prompt expansion and splice in
//! `prompt`, the decode loop in [`crate::generate`]).

mod encode;
mod options;
mod prompt;
mod request;
mod stats;

use std::path::Path;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::Array2;

use crate::backend::{self, Placement, Session};
use crate::error::{Error, Result};
use crate::family::{self, Family, ViewKind, VisionInput};
use crate::folder::{Dtype, ModelFolder, Part};
use crate::generate::{DecoderIo, GenerationOptions, Generator, StopReason};
use crate::preprocess::{self, ImageLimits};
use crate::select::{SelectConfig, Selection, SelectionInput, Selector};
use crate::text::TextTokenizer;

pub use crate::select::tiles::{SkippedTiles, TileBudget, TileSkip};
pub use encode::Encoded;
pub use options::{PipelineOptions, Positions};
pub use prompt::{original_positions, Prepared};
pub use request::{ImageInput, Observer, OnText, Quiet, Request, Stage};
pub use stats::{Answer, GenerationStats, KeptLayout, StageTimes};

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
    dtypes: Vec<(Part, Dtype)>,
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

/// Sets a stage's time and tells the observer.
fn record(times: &mut StageTimes, stage: Stage, took: Duration, obs: &mut dyn Observer) {
    *times.slot_mut(stage) = took;
    obs.stage(stage, took);
}

/// Per-request state: the prompt's text embeddings are computed at most once, whichever stage
/// (tile scoring, a text-guided method) asks first.
struct Scratch<'a> {
    prompt: &'a str,
    text: Option<Array2<f32>>,
}

impl Pipeline {
    /// Opens a model folder and loads the parts its manifest lists.
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
        let manifest = &folder.manifest;
        let signal_outputs: Vec<(String, String)> =
            manifest.signals.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (signal, _) in &signal_outputs {
            if crate::select::signals::spec(signal).is_none() {
                let known: Vec<_> = crate::select::signals::SIGNALS.iter().map(|s| s.name).collect();
                return Err(Error::field(
                    folder.path("glimpse.json"),
                    format!("signals.{signal}"),
                    format!("unknown signal (known: {})", known.join(", ")),
                ));
            }
        }
        let backend = backend::by_name(&opts.backend, &opts.backend_options)?;
        let dtypes: Vec<(Part, Dtype)> = manifest
            .parts
            .iter()
            .map(|e| (e.role, opts.part_dtypes.iter().find(|(p, _)| *p == e.role).map_or(opts.dtype, |(_, d)| *d)))
            .collect();
        let load = |part: Part| -> Result<Box<dyn Session>> {
            let dtype = dtypes.iter().find(|(p, _)| *p == part).map_or(opts.dtype, |(_, d)| *d);
            let path = folder.part_path(part, dtype)?;
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
        self.dtypes.iter().find(|(p, _)| *p == part).map_or(Dtype::Fp32, |(_, d)| *d)
    }

    /// The parts loaded, with their dtype variants, in pipeline order.
    pub fn parts(&self) -> &[(Part, Dtype)] {
        &self.dtypes
    }

    /// Where each part runs (backend, execution providers and what became of each).
    pub fn placements(&self) -> Vec<(Part, Placement)> {
        vec![
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

    /// Image → encoder inputs and views.
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

    /// Answers one request: every stage in order, each timed and reported to `obs`, the answer
    /// streamed to `obs` as it is generated.
    pub fn answer(&self, req: &Request<'_>, opts: &GenerationOptions, obs: &mut dyn Observer) -> Result<Answer> {
        let custom = match &req.selection {
            Some((config, positions)) => Some((Selector::new(config.clone())?, *positions)),
            None => None,
        };
        let (selector, positions) = custom.as_ref().map_or((&self.selector, self.positions), |(s, p)| (s, *p));
        let mut times = StageTimes::default();
        let mut scratch = Scratch { prompt: req.prompt, text: None };
        let decoded;
        let image = match req.image {
            ImageInput::None => None,
            ImageInput::Path(path) => {
                let started = Instant::now();
                decoded = self.load_image(path)?;
                record(&mut times, Stage::ImageDecode, started.elapsed(), obs);
                Some(&decoded)
            }
            ImageInput::Decoded(img) => Some(img),
            ImageInput::Encoded(_) => None,
        };
        let started = Instant::now();
        let rendered = self.render_prompt(req.prompt, !matches!(req.image, ImageInput::None))?;
        let render_time = started.elapsed();
        let prepared = match (req.image, image) {
            (ImageInput::None, _) => {
                let started = Instant::now();
                let ids = self.expand_and_tokenize(&rendered, None)?;
                let prepared = self.splice(ids, None, 0, None)?;
                record(&mut times, Stage::Splice, render_time + started.elapsed(), obs);
                prepared
            }
            (ImageInput::Encoded(e), _) => {
                record(&mut times, Stage::Preprocess, e.preprocess, obs);
                record(&mut times, Stage::Encode, e.encode, obs);
                let tokens = e.input.total_tokens();
                let views = e.input.views.clone();
                self.select_and_splice(
                    &rendered,
                    render_time,
                    &e.input,
                    &e.encoded,
                    views,
                    tokens,
                    selector,
                    positions,
                    &mut scratch,
                    &mut times,
                    obs,
                )?
            }
            (_, Some(img)) => {
                let started = Instant::now();
                let input = self.preprocess(img)?;
                record(&mut times, Stage::Preprocess, started.elapsed(), obs);
                let original_views = input.views.clone();
                let original_tokens = input.total_tokens();
                let started = Instant::now();
                let (input, encoded) = match self.tiles {
                    Some(skip) if input.rows * input.cols > 0 => {
                        let text = self.scratch_text(&mut scratch)?.clone();
                        self.encode_skipping_tiles(&input, &text, skip)?
                    }
                    _ => {
                        let encoded = self.encode(&input)?;
                        (input, encoded)
                    }
                };
                record(&mut times, Stage::Encode, started.elapsed(), obs);
                self.select_and_splice(
                    &rendered,
                    render_time,
                    &input,
                    &encoded,
                    original_views,
                    original_tokens,
                    selector,
                    positions,
                    &mut scratch,
                    &mut times,
                    obs,
                )?
            }
            (_, None) => return Err(Error::interface("pipeline", "image input without an image")),
        };
        let (prompt_tokens, visual, kept, views) =
            (prepared.input_ids.len(), prepared.visual_tokens, prepared.visual_tokens_kept, prepared.views);
        let layout = prepared.layout.clone();
        let (ids, stop) = self.generate(prepared, opts, &mut times, obs)?;
        let started = Instant::now();
        let text = self.tokenizer.decode(&ids)?;
        times.decode += started.elapsed();
        obs.stage(Stage::Decode, times.decode);
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
            stop,
        };
        Ok(Answer { text, token_ids: ids, stats, layout })
    }

    /// [`Pipeline::answer`] for the common case: an optional image file, text streamed to a
    /// closure.
    pub fn ask(
        &self,
        image: Option<&Path>,
        prompt: &str,
        opts: &GenerationOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Answer> {
        let req = Request::new(prompt).with_image(image.map_or(ImageInput::None, ImageInput::Path));
        self.answer(&req, opts, &mut OnText(on_text))
    }

    /// Preprocesses and encodes an image once, to ask several prompts about it with
    /// [`ImageInput::Encoded`] (`glimpse eval` asks about eight questions per picture). Not
    /// available with tile skipping, whose choice of tiles depends on the prompt.
    pub fn encode_image(&self, image: &RgbImage) -> Result<EncodedImage> {
        if self.tiles.is_some() {
            return Err(Error::invalid(
                "tile skipping",
                "on",
                "the tiles encoded depend on the prompt, so one encoding cannot serve several prompts",
            ));
        }
        let started = Instant::now();
        let input = self.preprocess(image)?;
        let preprocess = started.elapsed();
        let started = Instant::now();
        let encoded = self.encode(&input)?;
        Ok(EncodedImage { input, encoded, preprocess, encode: started.elapsed() })
    }

    /// The prompt's text embeddings, computed on first use within a request.
    fn scratch_text<'s>(&self, scratch: &'s mut Scratch<'_>) -> Result<&'s Array2<f32>> {
        if scratch.text.is_none() {
            scratch.text = Some(self.text_embeddings(scratch.prompt)?);
        }
        scratch.text.as_ref().ok_or_else(|| Error::interface("pipeline", "text embeddings"))
    }

    /// Chooses which rows reach the language model; computes the prompt's text embeddings
    /// first when the method needs them.
    pub fn select(&self, encoded: &Encoded, input: &VisionInput, prompt: &str) -> Result<Selection> {
        let mut scratch = Scratch { prompt, text: None };
        self.select_with(&self.selector, encoded, input, &mut scratch)
    }

    fn select_with(
        &self,
        selector: &Selector,
        encoded: &Encoded,
        input: &VisionInput,
        scratch: &mut Scratch<'_>,
    ) -> Result<Selection> {
        let mut signals = encoded.signals.clone();
        if selector.needs().text {
            signals.text = Some(self.scratch_text(scratch)?.clone());
        }
        let sel =
            selector.select(&SelectionInput { features: &encoded.features, views: &input.views, signals: &signals })?;
        if sel.kept.len() != input.views.len() {
            return Err(Error::interface("select", "selector returned a different number of views"));
        }
        Ok(sel)
    }

    /// Selection, prompt expansion and splice after the encoder.
    #[allow(clippy::too_many_arguments)]
    fn select_and_splice(
        &self,
        rendered: &str,
        render_time: Duration,
        input: &VisionInput,
        encoded: &Encoded,
        original_views: Vec<family::View>,
        original_tokens: usize,
        selector: &Selector,
        positions: Positions,
        scratch: &mut Scratch<'_>,
        times: &mut StageTimes,
        obs: &mut dyn Observer,
    ) -> Result<Prepared> {
        let started = Instant::now();
        let sel = self.select_with(selector, encoded, input, scratch)?;
        let kept_rows = sel.gather(&encoded.features, &input.views);
        times.select = started.elapsed();
        obs.stage(Stage::Select, times.select);
        let started = Instant::now();
        let ids = self.expand_and_tokenize(rendered, Some((input, &sel.counts())))?;
        let positions = match positions {
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
        times.splice = render_time + started.elapsed();
        obs.stage(Stage::Splice, times.splice);
        Ok(prepared)
    }

    /// Runs the prefill alone and returns the last position's logits (used by parity tests and
    /// profiling).
    pub fn prefill_logits(&self, prepared: &Prepared) -> Result<ndarray::Array1<f32>> {
        let mut cache = self.decoder_io.empty_cache()?;
        self.decoder_io.step(self.decoder.as_ref(), prepared.embeds.clone(), &prepared.positions, &mut cache)
    }

    /// Prefill then decode until EOS, the token budget or the context, streaming to `obs`.
    pub fn generate(
        &self,
        prepared: Prepared,
        opts: &GenerationOptions,
        times: &mut StageTimes,
        obs: &mut dyn Observer,
    ) -> Result<(Vec<i64>, StopReason)> {
        let generator = Generator {
            io: &self.decoder_io,
            decoder: self.decoder.as_ref(),
            embed: self.embed.as_ref(),
            tokenizer: &self.tokenizer,
            eos: &self.eos,
            context: self.context.0,
        };
        generator.run(prepared.embeds, &prepared.positions, opts, times, obs)
    }
}
