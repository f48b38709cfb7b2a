//! The pipeline: preprocess → encode → select → splice → prefill → decode, each stage named and
//! timed, none aware of which backend runs it. [`Pipeline::answer`] is the one entry point: it
//! takes a [`Request`] and reports to an [`Observer`]; the stages live with the modules that own
//! them (encode here in `encode`, selection in [`crate::select`], prompt expansion and splice in
//! `prompt`, the decode loop in [`crate::generate`]).

mod answer;
mod encode;
mod options;
mod prompt;
mod request;
mod reuse;
mod stats;
pub(crate) mod vision;

use std::path::Path;
use std::time::Duration;

use image::RgbImage;

use crate::backend::{self, Placement, Session};
use crate::error::{Error, Result};
use crate::family::{self, Family, VisionInput};
use crate::folder::{Dtype, ModelFolder, Part};
use crate::generate::DecoderIo;
use crate::preprocess::{self, ImageLimits};
use crate::select::{SelectConfig, Selector};
use crate::text::TextTokenizer;

pub use crate::select::regions::RegionSkip;
pub use crate::select::tiles::{SkippedTiles, TileBudget, TileSkip};
pub use encode::{Encoded, NOT_ENCODED};
pub use options::{fast_preset, EncoderReduction, Fast, PipelineOptions, Positions, PromptCompression, ViewRun};
pub use prompt::{original_positions, Prepared};
pub use request::{ImageInput, Observer, OnText, Quiet, Request, Role, Stage, Turn};
pub use reuse::PrefixCache;
pub use stats::{Answer, GenerationStats, KeptLayout, PromptCompressionStats, StageTimes};
pub use vision::{
    Between, Chain, EncoderForm, EncoderHook, Group, NoReduction, VisionEncoder, VisionRun, REDUCTION_STAGE,
};

/// An image preprocessed and encoded once (see [`Pipeline::encode_image`]), with the measured
/// preprocess and encode times.
#[derive(Debug, Clone)]
pub struct EncodedImage {
    pub(crate) input: VisionInput,
    pub(crate) encoded: Encoded,
    pub(crate) preprocess: Duration,
    pub(crate) encode: Duration,
}

fn part_dtype(dtypes: &[(Part, Dtype)], part: Part) -> Dtype {
    dtypes.iter().find(|(p, _)| *p == part).map_or(Dtype::Fp32, |(_, d)| *d)
}

/// The staged encoder's files `(stem, path)` in run order when `form` asks for them and the
/// folder has them (`Auto`: when listed, present for `dtype` and carrying the manifest's signals).
fn staged_files(
    folder: &ModelFolder,
    dtype: Dtype,
    form: EncoderForm,
) -> Result<Option<Vec<(String, std::path::PathBuf)>>> {
    let stages = match (&folder.manifest.stages, form) {
        (_, EncoderForm::Monolithic) => return Ok(None),
        (None, EncoderForm::Auto) => return Ok(None),
        (None, EncoderForm::Staged) => {
            return Err(Error::field(
                folder.path("glimpse.json"),
                "stages",
                "the folder lists no staged vision encoder (make one with `glimpse split --model DIR`)",
            ))
        }
        (Some(s), _) => s,
    };
    // signals come from the monolithic encoder's extra outputs, which the stages do not carry
    if form == EncoderForm::Auto && !folder.manifest.signals.is_empty() {
        return Ok(None);
    }
    let files: Vec<_> = stages
        .stems()
        .into_iter()
        .map(|stem| (format!("{stem}{}", dtype.suffix()), folder.stage_file(stem, dtype)))
        .collect();
    match files.iter().find(|(_, p)| !p.is_file()) {
        None => Ok(Some(files)),
        Some(_) if form == EncoderForm::Auto => Ok(None),
        Some((_, p)) => Err(Error::MissingFile { path: p.clone(), what: format!("vision stage ({dtype})") }),
    }
}

/// How many input shapes tract plans for exactly, per encoder stage (0: the plan for symbolic
/// shapes only). Views run the encoder one at a time on the full grid, so without region
/// skipping every stage sees one shape; merging alone keeps it one per group (a fixed share of a
/// fixed count). Under region skipping the layer groups see the global view's count and the
/// tiles' one: with a budget per tile (`per-view`) the tiles keep as many tokens each and run
/// the groups and head as one batch, so groups and head see two shapes (global view, tiles);
/// single-view families see one count per image; a budget shared across tiles gives a count per
/// tile and image (symbolic groups). Tiles are batched only on encoders whose view is small
/// ([`batches_tiles`]); otherwise they run one at a time and the head sees one shape. A server's
/// requests choose their own reductions (their tiles run one at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PlanShapes {
    embed: usize,
    groups: usize,
    head: usize,
}

fn plan_shapes(opts: &PipelineOptions, tiled: bool, small_views: bool) -> PlanShapes {
    let shapes = |embed, groups, head| PlanShapes { embed, groups, head };
    match &opts.regions {
        _ if opts.stages_for_requests => shapes(0, 0, 1),
        None => shapes(1, 1, 1),
        Some(skip) if tiled && skip.scope == crate::select::Scope::PerView => {
            shapes(1, 2, if small_views { 2 } else { 1 })
        }
        Some(_) if !tiled => shapes(1, 2, 1),
        Some(_) => shapes(1, 0, 1),
    }
}

/// Largest residual stream of one full view (`patches × hidden` f32) whose tiles run the layer
/// groups as one batch. Batching removes a call per tile and stage, which pays where calls are
/// short: testbed-smolvlm (256 × 96, 96 KiB per view) --fast encode 17.5-18.1 -> 16.1-16.5 ms;
/// on SmolVLM-256M's views (1024 × 768, 3 MiB) the batch ran 11% slower than the tiles one at a
/// time (encode 1906-1952 vs 2148-2151 ms, tract, 2 threads; docs/benchmarks.md).
const BATCH_TILES_BELOW: usize = 512 * 1024;

/// Whether the folder's vision encoder is small enough per view to batch tiles
/// ([`BATCH_TILES_BELOW`]); `false` when its config does not say.
fn batches_tiles(folder: &ModelFolder) -> bool {
    let get = |key: &str| folder.config_usize(&[&format!("vision_config.{key}")]).ok();
    match (get("hidden_size"), get("image_size"), get("patch_size")) {
        (Some(hidden), Some(side), Some(patch)) => view_is_small(hidden, side, patch),
        _ => false,
    }
}

/// Whether a view of `side` pixels in `patch`-pixel patches of `hidden` features is below
/// [`BATCH_TILES_BELOW`].
fn view_is_small(hidden: usize, side: usize, patch: usize) -> bool {
    patch > 0 && (side / patch).pow(2).saturating_mul(hidden).saturating_mul(4) <= BATCH_TILES_BELOW
}

/// What the family allows of a reduction (the pipeline's at load, a request's own before it
/// runs): tiles need tiled images, regions patch-grid views, one of the two.
fn fits_family(family: &dyn Family, r: &EncoderReduction) -> Result<()> {
    if r.tiles.is_some() && !family.splits_into_tiles() {
        // LLaVA has one view; LLaVA-OneVision's anyres crops are packed into one grid, which
        // tile skipping does not handle yet.
        return Err(Error::invalid(
            "tile skipping (--tiles)",
            family.name(),
            "needs a family that splits images into tiles plus a global view (idefics3 / smolvlm with image splitting)",
        ));
    }
    if r.regions.is_some() && !family.patch_grid_views() {
        return Err(Error::invalid(
            "region skipping (--regions)",
            family.name(),
            "needs views whose tokens are a grid over their patches (idefics3, llava); LLaVA-OneVision packs its crops",
        ));
    }
    if r.regions.is_some_and(|r| r.skipped == SkippedTiles::Global) && !family.splits_into_tiles() {
        return Err(Error::invalid(
            "skipped tiles (--skipped-tiles)",
            "global",
            "stand-ins come from the global view of a tiled image; this family has one view",
        ));
    }
    if r.regions.is_some() && r.tiles.is_some() {
        return Err(Error::invalid(
            "region skipping (--regions)",
            "with --tiles",
            "region skipping already chooses within and across tiles; use one of the two",
        ));
    }
    Ok(())
}

/// A loaded model ready to answer.
pub struct Pipeline {
    pub folder: ModelFolder,
    pub family: Box<dyn Family>,
    pub tokenizer: TextTokenizer,
    backend_name: &'static str,
    vision: VisionEncoder,
    /// The staged encoder for reduced runs when `vision` is the monolithic one (region skipping
    /// and merging need stages; full views still run `vision`, which carries the signals).
    staged: Option<VisionEncoder>,
    /// Run the encoder one view at a time.
    per_view: bool,
    /// Under a per-tile region budget, run the tiles' kept tokens through the groups and head as
    /// one batch (they keep as many each): a call per stage instead of one per tile, whose fixed
    /// cost dominates small encoders. Set where the stages were planned for that shape
    /// ([`PlanShapes`]); a server's request reductions run tiles one at a time.
    batch_tiles: bool,
    embed: Box<dyn Session>,
    decoder: Box<dyn Session>,
    decoder_io: DecoderIo,
    selector: Selector,
    positions: Positions,
    /// Tile / region skipping and merging every request gets unless it brings its own.
    reduction: EncoderReduction,
    dtypes: Vec<(Part, Dtype)>,
    signal_outputs: Vec<(String, String)>,
    eos: Vec<i64>,
    context: (usize, String),
    image_limits: ImageLimits,
    /// The prompt compressor and its settings, when prompts are shortened first.
    compressor: Option<(crate::compress::PromptCompressor, crate::compress::CompressOptions)>,
    /// What each file's load cost in resident memory, in load order (empty off Linux).
    load_memory: Vec<crate::memory::LoadMemory>,
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
    /// Opens a model folder and loads the parts its manifest lists.
    pub fn load(dir: impl AsRef<Path>, opts: &PipelineOptions) -> Result<Self> {
        let folder = ModelFolder::open(dir)?;
        let tokenizer = TextTokenizer::load(&folder)?;
        let family = family::for_folder(&folder, &tokenizer)?;
        let preset;
        let vision_dtype =
            opts.part_dtypes.iter().find(|(p, _)| *p == Part::VisionEncoder).map_or(opts.dtype, |(_, d)| *d);
        let has_stages = folder
            .manifest
            .stages
            .as_ref()
            .is_some_and(|s| s.stems().iter().all(|stem| folder.stage_file(stem, vision_dtype).is_file()));
        let opts = match opts.fast {
            Fast::Off => opts,
            _ if opts.regions.is_some() || opts.merge.is_some() || opts.tiles.is_some() => opts,
            Fast::WhereStaged if !has_stages => opts,
            fast => {
                if !has_stages {
                    return Err(Error::field(
                        folder.path("glimpse.json"),
                        "stages",
                        format!(
                            "--fast ({fast:?}) needs a staged vision encoder for {vision_dtype} (make one with `glimpse split --model DIR`)"
                        ),
                    ));
                }
                let (regions, merge) = fast_preset(family.splits_into_tiles(), family.patch_grid_views());
                preset = PipelineOptions { regions, merge, ..opts.clone() };
                &preset
            }
        };
        let reduction = EncoderReduction {
            tiles: opts.tiles,
            regions: opts.regions,
            merge: opts.merge,
            merge_method: opts.merge_method,
        };
        fits_family(family.as_ref(), &reduction)?;
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
        let dtypes: Vec<(Part, Dtype)> = manifest
            .parts
            .iter()
            .map(|e| (e.role, opts.part_dtypes.iter().find(|(p, _)| *p == e.role).map_or(opts.dtype, |(_, d)| *d)))
            .collect();
        // every file resolved and the memory budget checked before a backend starts or loads
        let paths: Vec<(Part, std::path::PathBuf)> =
            dtypes.iter().map(|&(part, dtype)| Ok((part, folder.part_path(part, dtype)?))).collect::<Result<_>>()?;
        // the compressor's folder is checked (manifest, tokenizer) and counted before any load
        let (compressor_file, compressor_onnx) = match &opts.prompt_compression {
            Some(c) => {
                c.options.check()?;
                let manifest = crate::compress::CompressorManifest::load(&c.dir)?;
                let onnx = c.dir.join(&manifest.onnx);
                (vec![(format!("prompt compressor {}", onnx.display()), crate::memory::file_bytes(&onnx))], onnx)
            }
            None => (Vec::new(), std::path::PathBuf::new()),
        };
        let mut shapes = plan_shapes(opts, family.splits_into_tiles(), batches_tiles(&folder));
        let batch_tiles = shapes.head == 2;
        let vision_dtype = part_dtype(&dtypes, Part::VisionEncoder);
        let staged = staged_files(&folder, vision_dtype, opts.encoder)?;
        let check = |extra: &[(String, u64)]| {
            crate::memory::check(&folder, &dtypes, extra, opts.max_memory.as_ref(), &opts.backend)
        };
        // tract keeps a plan (packed weights) per shape: a second shape holds the groups (and the
        // head, for batched tiles) twice (region skipping runs the stages, loaded beside a
        // monolithic encoder if need be); where that does not fit but one copy does, those
        // stages keep their plan for symbolic shapes
        let groups_twice = shapes.groups > 1 && opts.backend == "tract" && !opts.backend_options.symbolic_plans;
        match groups_twice.then(|| staged_files(&folder, vision_dtype, EncoderForm::Staged)).transpose()?.flatten() {
            Some(files) => {
                let last = if shapes.head > 1 { files.len() } else { files.len().saturating_sub(1) };
                let bytes = files[1..last].iter().map(|(_, p)| crate::memory::file_bytes(p)).sum::<u64>();
                let mut twice = compressor_file.clone();
                twice.push(("a second tract plan of the vision layer groups (region skipping)".into(), bytes));
                if let Err(e) = check(&twice) {
                    check(&compressor_file)?;
                    tracing::info!("the layer groups keep tract's plan for symbolic shapes: {e}");
                    shapes.groups = 0;
                    if shapes.head > 1 {
                        shapes.head = 0;
                    }
                }
            }
            None => check(&compressor_file)?,
        }
        let backend = backend::by_name(&opts.backend, &opts.backend_options)?;
        let load_memory = std::cell::RefCell::new(Vec::new());
        // every file's load goes through here, so each one's resident cost is measured
        let load_file = |path: &Path, stem: &str, hints: &crate::backend::LoadHints| -> Result<Box<dyn Session>> {
            let (session, m) =
                crate::memory::measure_load(stem, path, || backend.load(path, &folder.root, stem, hints));
            load_memory.borrow_mut().extend(m);
            session
        };
        let load = |part: Part| -> Result<Box<dyn Session>> {
            let path = paths.iter().find(|(p, _)| *p == part).map(|(_, path)| path).ok_or_else(|| {
                Error::field(folder.path("glimpse.json"), "parts", format!("no part with role `{}`", part.role()))
            })?;
            let hints = match part {
                Part::VisionEncoder => family.encoder_hints().repeated_shapes(1),
                Part::EmbedTokens | Part::Decoder => crate::generate::text_hints(),
            };
            load_file(path, part.stem(), &hints)
        };
        let load_staged = |files: Vec<(String, std::path::PathBuf)>| -> Result<VisionEncoder> {
            let stages = manifest.stages.as_ref().ok_or_else(|| Error::interface("vision stages", "none listed"))?;
            let (hints, head_hints) = (
                family.encoder_hints().repeated_shapes(shapes.embed),
                family.head_hints().repeated_shapes(shapes.head),
            );
            let none = crate::backend::LoadHints::default().repeated_shapes(shapes.groups);
            let mut sessions = Vec::with_capacity(files.len());
            for (k, (stem, path)) in files.iter().enumerate() {
                let h = match k {
                    0 => &hints,
                    k if k + 1 == files.len() => &head_hints,
                    _ => &none,
                };
                sessions.push(load_file(path, stem, h)?);
            }
            let head = sessions.pop().ok_or_else(|| Error::interface("vision stages", "no head"))?;
            let mut rest = sessions.into_iter();
            let embed = rest.next().ok_or_else(|| Error::interface("vision stages", "no embed stage"))?;
            let groups = rest.zip(&stages.blocks).map(|(session, b)| Group { session, layers: b.layers }).collect();
            let v = VisionEncoder::Staged { embed, groups, head };
            let stems: Vec<&str> = files.iter().map(|(s, _)| s.as_str()).collect();
            v.check(&stems)?;
            Ok(v)
        };
        // The decoder (the largest part of most VLMs) loads first: a load's transient peak then
        // comes while little else is resident (docs/benchmarks.md, "Memory").
        let decoder = load(Part::Decoder)?;
        let embed = load(Part::EmbedTokens)?;
        let vision = match staged {
            None => VisionEncoder::Monolithic(load(Part::VisionEncoder)?),
            Some(files) => load_staged(files)?,
        };
        let reduces = opts.regions.is_some() || opts.merge.is_some() || opts.stages_for_requests;
        let groups = manifest.stages.as_ref().map_or(0, |s| s.blocks.len());
        if opts.merge.is_some() && groups < 2 {
            return Err(Error::field(
                folder.path("glimpse.json"),
                "stages.blocks",
                format!(
                    "token merging acts between groups of layers and the staged encoder has {groups}: split it into more (`glimpse split --model DIR --groups 4 --force`)"
                ),
            ));
        }
        let staged = if reduces && !vision.is_staged() {
            let files = staged_files(&folder, vision_dtype, EncoderForm::Staged)?
                .ok_or_else(|| Error::interface("vision stages", "none listed"))?;
            Some(load_staged(files)?)
        } else {
            None
        };
        family.check_encoder(vision.outputs())?;
        for (signal, output) in &signal_outputs {
            if !vision.outputs().iter().any(|o| &o.name == output) {
                return Err(Error::interface(
                    "vision_encoder",
                    format!("glimpse.json names output `{output}` for signal `{signal}`, which the encoder lacks"),
                ));
            }
        }
        let decoder_io = DecoderIo::new(decoder.as_ref(), &folder)?;
        pool_fits(&opts.select, &decoder_io)?;
        let per_view = match opts.views {
            ViewRun::Batch => false,
            ViewRun::OneByOne => true,
            ViewRun::Auto => backend::spec(backend.name()).is_some_and(|s| s.views_one_by_one),
        };
        let eos = folder.eos_token_ids();
        let context = folder.context_length()?;
        let compressor = match &opts.prompt_compression {
            Some(c) => {
                let (loaded, m) = crate::memory::measure_load("prompt_compressor", &compressor_onnx, || {
                    crate::compress::PromptCompressor::load(&c.dir, backend.as_ref())
                });
                load_memory.borrow_mut().extend(m);
                Some((loaded?, c.options.clone()))
            }
            None => None,
        };
        let load_memory = load_memory.into_inner();
        Ok(Pipeline {
            folder,
            family,
            tokenizer,
            backend_name: backend.name(),
            vision,
            staged,
            per_view,
            batch_tiles,
            embed,
            decoder,
            decoder_io,
            selector,
            positions: opts.positions,
            reduction,
            dtypes,
            signal_outputs,
            eos,
            context,
            image_limits: opts.image_limits,
            compressor,
            load_memory,
        })
    }

    /// What each file's load cost in resident memory (kept and transient), in load order:
    /// `glimpse profile` reports it per part; empty where the OS does not say (not Linux).
    pub fn load_memory(&self) -> &[crate::memory::LoadMemory] {
        &self.load_memory
    }

    /// The prompt compressor in use and its settings, if any.
    pub fn prompt_compressor(&self) -> Option<&(crate::compress::PromptCompressor, crate::compress::CompressOptions)> {
        self.compressor.as_ref()
    }

    /// The dtype variant loaded for a part.
    pub fn part_dtype(&self, part: Part) -> Dtype {
        part_dtype(&self.dtypes, part)
    }

    /// Whether the encoder runs an image's views one at a time (else as one batch).
    pub fn encodes_views_one_by_one(&self) -> bool {
        self.per_view
    }

    /// Per vision encoder session (monolithic, or embed, groups, head; then the stages loaded
    /// beside a monolithic encoder for reductions), the input shapes the backend planned it for
    /// exactly ([`crate::backend::LoadHints::repeated_shapes`]): on tract every part but the
    /// groups of layers under a region budget shared across tiles (whose counts vary); empty
    /// lists for plans for symbolic shapes.
    pub fn encoder_fixed_plans(&self) -> Vec<Vec<String>> {
        let mut plans = self.vision.fixed_plans();
        plans.extend(self.staged.iter().flat_map(VisionEncoder::fixed_plans));
        plans
    }

    /// Whether the vision encoder runs as stages (`docs/stages.md`).
    pub fn encoder_is_staged(&self) -> bool {
        self.vision.is_staged()
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

    /// Where the prompt compressor runs, when one is loaded.
    pub fn compressor_placement(&self) -> Option<Placement> {
        self.compressor.as_ref().map(|(c, _)| c.placement())
    }

    /// Tile skipping in effect, if any.
    pub fn tile_skip(&self) -> Option<TileSkip> {
        self.reduction.tiles
    }

    /// Region skipping in effect, if any.
    pub fn region_skip(&self) -> Option<RegionSkip> {
        self.reduction.regions
    }

    /// Token merging in the encoder in effect (tokens per group boundary), if any.
    pub fn merge(&self) -> Option<crate::select::Budget> {
        self.reduction.merge
    }

    /// Whether any reduction acts before or inside the encoder (tiles, regions, merging).
    pub fn reduces_encoder(&self) -> bool {
        self.reduction().is_active()
    }

    /// The pipeline's encoder-side reduction (what requests get unless they bring their own).
    pub fn reduction(&self) -> EncoderReduction {
        self.reduction
    }

    /// Checks that this pipeline can run `r` (a request's own reduction): what the family
    /// allows (as at load), regions and merging need the staged encoder loaded, merging at
    /// least two groups of layers.
    pub fn check_reduction(&self, r: &EncoderReduction) -> Result<()> {
        fits_family(self.family.as_ref(), r)?;
        if r.needs_stages() && self.staged.is_none() && !self.vision.is_staged() {
            return Err(Error::invalid(
                "reduction",
                "regions/merge",
                "region skipping and merging need the staged encoder loaded: start the server with `--request-reduction` (or with --regions / --merge)",
            ));
        }
        let groups = self.folder.manifest.stages.as_ref().map_or(0, |s| s.blocks.len());
        if r.merge.is_some() && groups < 2 {
            return Err(Error::invalid(
                "merge",
                format!("{groups} groups"),
                "token merging acts between groups of layers: split the encoder into more (`glimpse split --groups 4`)",
            ));
        }
        Ok(())
    }

    /// Whether the tokens encoded depend on the prompt (tile or region skipping guided by the
    /// global view), so one encoding cannot serve several prompts.
    pub fn encoding_depends_on_prompt(&self) -> bool {
        self.family.splits_into_tiles() && self.score_relevance() != 0.0
    }

    /// Weight of prompt relevance in the global view's tile / region scores (0 without either).
    fn score_relevance(&self) -> f32 {
        self.reduction.relevance()
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
        pool_fits(&config, &self.decoder_io)?;
        self.selector = Selector::new(config)?;
        self.positions = positions;
        Ok(())
    }

    /// The token-selection configuration in use.
    pub fn selection(&self) -> &SelectConfig {
        self.selector.config()
    }
}

/// Pooled summary rows (`SelectConfig::pool`) stand for many rows each and need proportional
/// attention: without the decoder's `attention_bias` input they would get one row's share, which
/// measured no better than not pooling (docs/pruning.md), so that is refused, not run silently.
pub(crate) fn pool_fits(config: &SelectConfig, io: &DecoderIo) -> Result<()> {
    if config.pool > 0 && !io.has_attention_bias() {
        return Err(Error::invalid(
            "pool-dropped",
            config.pool,
            format!(
                "decoder_model_merged.onnx has no `{}` input, which pooled rows need (proportional attention); testbeds get it from `python -m glimpse_export export-testbed --model DIR --decoder-only --attention-bias`",
                crate::generate::ATTENTION_BIAS
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_small_views_batch_their_tiles() {
        // testbed-smolvlm: 16 x 16 patches of 96 features; SmolVLM-256M: 32 x 32 of 768
        assert!(view_is_small(96, 128, 8));
        assert!(!view_is_small(768, 512, 16));
        assert!(!view_is_small(96, 128, 0), "a zero patch size never batches");
    }
}
