//! One module per subcommand, plus the options they share.

/// `println!` that returns the write error instead of panicking (a closed pipe, a full disk);
/// `main` ends quietly on a closed pipe and reports any other write error.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        anyhow::Context::context(writeln!(std::io::stdout().lock(), $($arg)*), "writing to stdout")?
    }};
}

pub mod ask;
pub mod eval;
pub mod inspect;
pub mod overlay;
pub mod plot;
pub mod profile;
pub mod quantize;
pub mod robot;
pub mod serve;
pub mod split;
pub mod targets;
pub mod watch;

use std::path::PathBuf;

use glimpse_runtime::backend::BackendOptions;
use glimpse_runtime::pipeline::{Fast, RegionSkip};
use glimpse_runtime::preprocess::ImageLimits;
use glimpse_runtime::select::tome;
use glimpse_runtime::settings::{self, Applied, Asked};
use glimpse_runtime::{
    Budget, Dtype, PipelineOptions, Positions, Scope, SelectConfig, SkippedTiles, TileBudget, TileSkip,
};

/// The model folder used when `--model` is not given.
pub const DEFAULT_MODEL: &str = "models/testbed-smolvlm";

/// Options that choose and load a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model folder in the Hugging Face / onnx-community layout.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Dtype variant of the ONNX parts (fp32, fp16, int8, uint8, quantized, q4, q4f16), or
    /// `auto` to pick per part from the target profile among the files present; per part with
    /// PART=DTYPE, comma-separated (`decoder=int8,vision_encoder=fp32`; parts not named get the
    /// default, fp32 unless one is given: `auto,decoder=q4`).
    #[arg(long, default_value = "fp32")]
    pub dtype: DtypeArg,
    /// Target profile whose defaults apply: backend, threads, execution providers, pruning and
    /// `--dtype auto` (default: detected; see `glimpse targets`). Flags override it.
    #[arg(long)]
    pub target: Option<String>,
    /// Inference backend (default: the first of the target profile's backends that starts).
    #[arg(long, value_parser = backend_values())]
    pub backend: Option<String>,
    /// ONNX Runtime library for `--backend ort` (else ORT_DYLIB_PATH, else next to the binary).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Threads per backend (tract's matrix products, ONNX Runtime's intra-op pool); default:
    /// the target profile's; 0 = every logical CPU (tract) / ONNX Runtime's own default.
    #[arg(long)]
    pub threads: Option<usize>,
    /// ONNX Runtime execution providers in priority order, comma-separated (TensorRT, CUDA,
    /// XNNPACK, ACL, CPU); default: the target profile's list. Providers the library lacks are
    /// skipped and reported.
    #[arg(long, value_delimiter = ',')]
    pub ep: Vec<String>,
    /// TensorRT engine cache folder (default: ~/.cache/glimpse/tensorrt).
    #[arg(long)]
    pub trt_cache: Option<PathBuf>,
    /// Largest accepted image, in pixels (width × height).
    #[arg(long, default_value_t = ImageLimits::default().max_pixels)]
    pub max_image_pixels: u64,
    /// Memory budget for the model, in bytes or with a unit (`1.5G`, `800M`); checked before
    /// loading against the parts' size (default: the target profile's `[memory]` share of the
    /// machine's memory, else the cgroup limit or MemAvailable).
    #[arg(long, value_parser = parse_bytes)]
    pub max_memory: Option<u64>,
    /// Vision encoder form: `staged` runs the stages glimpse.json lists (vision_embed, groups of
    /// layers, vision_head; made by the export or `glimpse split`), `monolithic` the single
    /// vision_encoder file, `auto` the stages when the folder has them for the dtype.
    #[arg(long, default_value = "auto")]
    pub encoder: glimpse_runtime::pipeline::EncoderForm,
    /// How the encoder runs an image's views: `batch` (one run), `one-by-one`, or `auto` (what
    /// the backend runs faster, measured in docs/benchmarks.md).
    #[arg(long, default_value = "auto")]
    pub views: glimpse_runtime::pipeline::ViewRun,
    /// The preset measured best on the testbeds (docs/pruning.md; needs stages): tiled models
    /// (SmolVLM) region skipping 0.35 per tile (global view 0.5) + merging 0.25, single-view (LLaVA) region skipping 0.3,
    /// LLaVA-OneVision merging 0.25. Any of --tiles, --regions or --merge (even 0) replaces it.
    /// Default: the target profile's.
    #[arg(long)]
    pub fast: bool,
    #[command(flatten)]
    pub compress: CompressArgs,
}

/// The prompt compressor: shortens each text prompt before the chat template (docs/compressors.md).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CompressArgs {
    /// Shorten the text prompt first with this LLMLingua-2 compressor folder
    /// (`python -m glimpse_export export-compressor`; docs/compressors.md). Image tokens are
    /// untouched; the time is the `prompt_compress` stage.
    #[arg(long, value_name = "DIR")]
    pub prompt_compressor: Option<PathBuf>,
    /// With --prompt-compressor: fraction of the prompt's (cl100k) tokens to keep, in (0, 1].
    #[arg(long, default_value_t = 0.5, requires = "prompt_compressor")]
    pub prompt_rate: f64,
    /// With --prompt-compressor: keep about this many (cl100k) tokens instead of --prompt-rate.
    #[arg(long, requires = "prompt_compressor")]
    pub prompt_target_tokens: Option<usize>,
    /// With --prompt-compressor: tokens always kept, comma-separated (`\n` for a newline), as
    /// llmlingua's `force_tokens`.
    #[arg(long, value_delimiter = ',', requires = "prompt_compressor")]
    pub prompt_force_tokens: Vec<String>,
    /// With --prompt-compressor: keep every word with a digit (llmlingua's `force_reserve_digit`).
    #[arg(long, requires = "prompt_compressor")]
    pub prompt_force_digits: bool,
    /// With --prompt-compressor: drop a force token repeated with no kept word between
    /// (llmlingua's `drop_consecutive`).
    #[arg(long, requires = "prompt_compressor")]
    pub prompt_drop_consecutive: bool,
}

impl CompressArgs {
    /// The pipeline's prompt compression, when a compressor is given.
    pub fn config(&self) -> Option<glimpse_runtime::pipeline::PromptCompression> {
        self.prompt_compressor.as_ref().map(|dir| glimpse_runtime::pipeline::PromptCompression {
            dir: dir.clone(),
            options: glimpse_runtime::compress::CompressOptions {
                rate: self.prompt_rate,
                target_tokens: self.prompt_target_tokens,
                force_tokens: self.prompt_force_tokens.iter().map(|t| t.replace("\\n", "\n")).collect(),
                force_digits: self.prompt_force_digits,
                drop_consecutive: self.prompt_drop_consecutive,
            },
        })
    }
}

/// `--dtype`: a default (a dtype or `auto`) and per-part overrides (`decoder=int8`).
pub type DtypeArg = settings::DtypeRequest;

/// A byte count: a number, optionally with K, M or G (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'B' => 1,
                _ => return Err(format!("`{s}`: unknown unit (K, M or G)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("`{s}`: expected a byte count like 1.5G"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("`{s}`: must be positive"));
    }
    Ok((v * mult as f64) as u64)
}

/// `--backend` values: the backend registry (those compiled into this build).
pub fn backend_values() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        glimpse_runtime::backend::BACKENDS
            .iter()
            .filter(|b| b.compiled)
            .map(|b| clap::builder::PossibleValue::new(b.name).help(b.help())),
    )
}

impl ModelArgs {
    /// What these flags ask for, with a selection's `--prune` / `--keep` (`None` = not given).
    pub fn asked(&self, prune: Option<String>, keep: Option<Budget>) -> Asked {
        Asked {
            target: self.target.clone(),
            backend: self.backend.clone(),
            threads: self.threads,
            prune,
            keep,
            execution_providers: self.ep.clone(),
            fast: self.fast.then_some(true),
            max_memory: self.max_memory,
        }
    }

    /// Backend settings these flags give before the profile is applied.
    fn base_backend_options(&self) -> glimpse_runtime::backend::BackendOptions {
        glimpse_runtime::backend::BackendOptions {
            ort_library: self.ort_lib.clone(),
            engine_cache: self.trt_cache.clone(),
            ..Default::default()
        }
    }

    /// Settles flags against the target profile (see `glimpse_runtime::settings`).
    pub fn settle(&self, prune: Option<String>, keep: Option<Budget>) -> anyhow::Result<(Applied, BackendOptions)> {
        Ok(settings::settle(&self.asked(prune, keep), &self.base_backend_options())?)
    }

    /// A short description of the dtype choice for reports.
    pub fn dtype_label(&self) -> String {
        self.dtype.to_string()
    }

    /// The pipeline options these arguments describe for one selection, and what was applied.
    pub fn pipeline_options(&self, select: &SelectArgs) -> anyhow::Result<(PipelineOptions, Applied)> {
        let (applied, backend_options) = self.settle(select.prune.clone(), select.keep)?;
        // explicit encoder-side flags replace the preset; knobs that only tune them need them
        let explicit = select.encoder_side();
        if !explicit {
            let tuned = [
                (select.region_scope != Scope::Global, "--region-scope"),
                (select.skipped_tiles != SkippedTiles::Drop, "--skipped-tiles"),
                (select.region_relevance != 0.0, "--region-relevance"),
                (!select.global_regions.is_full(), "--global-regions"),
                (select.merge_method != tome::MergeMethod::Tome, "--merge-method"),
            ];
            if let Some((_, flag)) = tuned.iter().find(|(on, _)| *on) {
                let with = if self.fast { "--fast uses its own settings" } else { "nothing uses it" };
                anyhow::bail!(
                    "{flag} tunes --tiles / --regions / --merge, and none is given ({with}): add the flag it tunes"
                );
            }
        }
        let (dtype, part_dtypes) = if self.dtype.default.is_none() {
            let folder = glimpse_runtime::ModelFolder::open(&self.model)?;
            let (profile, _) = settings::profile(Some(&applied.profile.value))?;
            settings::resolve_dtypes(&self.dtype, &folder, profile, &applied.backend.value)?
        } else {
            (self.dtype.default.unwrap_or(Dtype::Fp32), self.dtype.parts.clone())
        };
        let config = select.config(applied.prune.value.clone(), applied.keep.value.parse()?);
        let reduction = select.reduction()?;
        let opts = PipelineOptions {
            dtype,
            part_dtypes,
            backend: applied.backend.value.clone(),
            image_limits: ImageLimits { max_pixels: self.max_image_pixels, ..ImageLimits::default() },
            select: config,
            positions: select.positions,
            tiles: reduction.tiles,
            regions: reduction.regions,
            merge: reduction.merge,
            merge_method: reduction.merge_method,
            fast: if explicit { Fast::Off } else { applied.fast_mode() },
            backend_options,
            max_memory: applied.max_memory.value.clone(),
            encoder: self.encoder,
            views: self.views,
            prompt_compression: self.compress.config(),
            stages_for_requests: false,
        };
        Ok((opts, applied))
    }
}

/// The help text listing every encoder-side method of the registry (`ENCODER_METHODS`): its
/// flag, where it acts, what it does, whether it needs the staged encoder.
pub fn encoder_methods_help() -> String {
    let mut s = String::from(
        "Before and inside the encoder (compose with --prune and each other, but --tiles or --regions, not both):\n",
    );
    for m in glimpse_runtime::select::ENCODER_METHODS {
        let stages = if m.staged { "; needs stages (glimpse split)" } else { "" };
        s.push_str(&format!("  {:<26} {}: {} ({}{stages})\n", m.flag, m.name, m.summary, m.acts.name()));
    }
    s
}

/// `--prune` values: every method of the selection registry, with its one-line summary.
pub fn prune_values() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        glimpse_runtime::select::METHODS.iter().map(|m| clap::builder::PossibleValue::new(m.name).help(m.help())),
    )
}

impl SelectArgs {
    /// The selection these flags describe, with the method and budget as settled.
    pub fn config(&self, method: String, budget: Budget) -> SelectConfig {
        SelectConfig {
            method,
            budget,
            scope: self.keep_scope,
            seed: self.prune_seed,
            lambda: self.lambda,
            pool: self.pool_dropped,
        }
    }

    /// The encoder-side reduction these flags describe (`--tiles`, `--regions`, `--merge` and
    /// the knobs that tune them).
    pub fn reduction(&self) -> anyhow::Result<glimpse_runtime::EncoderReduction> {
        Ok(glimpse_runtime::EncoderReduction {
            tiles: self.tiles.map(|budget| TileSkip {
                budget,
                skipped: self.skipped_tiles,
                relevance: self.region_relevance,
            }),
            regions: self.regions.map(|budget| RegionSkip {
                budget,
                scope: self.region_scope,
                skipped: self.skipped_tiles,
                relevance: self.region_relevance,
                global: self.global_regions,
            }),
            merge: self.merge.as_deref().map(tome::parse_r).transpose()?.flatten(),
            merge_method: self.merge_method,
        })
    }

    /// Whether any encoder-side reduction (`--tiles`, `--regions`, `--merge`) is asked for.
    pub fn encoder_side(&self) -> bool {
        self.tiles.is_some() || self.regions.is_some() || self.merge.is_some()
    }
}

/// Options of the token-selection (pruning) stage.
#[derive(clap::Args, Debug, Clone)]
pub struct SelectArgs {
    /// Token-selection method between encoder and LLM (from the selection registry; `--help` lists
    /// each with what it does).
    /// Default: the target profile's pruning.
    #[arg(long, value_parser = prune_values())]
    pub prune: Option<String>,
    /// Visual tokens to keep: a ratio in (0, 1] (0.25) or a count (64); default: the target
    /// profile's when its method is used, else 1 (everything).
    #[arg(long)]
    pub keep: Option<Budget>,
    /// Spend the budget over all views together (global) or within each view (per-view).
    #[arg(long, default_value = "global")]
    pub keep_scope: Scope,
    /// Position ids after pruning: contiguous (renumber) or original (keep gaps).
    #[arg(long, default_value = "original")]
    pub positions: Positions,
    /// Seed of seeded methods (random; todre without CLS attention).
    #[arg(long, default_value_t = 0)]
    pub prune_seed: u64,
    /// CDPruner relevance weight λ.
    #[arg(long, default_value_t = 0.5)]
    pub lambda: f32,
    /// Pool the rows --prune drops into this many summary tokens per view (counted in --keep),
    /// each weighted by the rows it stands for (proportional attention; needs a decoder with an
    /// `attention_bias` input). Keeps pruned answers stopping: docs/pruning.md. 0 = off.
    #[arg(long, default_value_t = 0)]
    pub pool_dropped: usize,
    /// Skip tiles before the encoder: encode only this many (or this fraction) of the tiles, chosen
    /// from the global view (tiled models such as SmolVLM).
    #[arg(long)]
    pub tiles: Option<TileBudget>,
    /// What replaces a skipped tile or region: drop (nothing) or global (its share of the global
    /// view).
    #[arg(long, default_value = "drop")]
    pub skipped_tiles: SkippedTiles,
    /// Region skipping before the encoder's layers (needs stages, `glimpse split`): encode only
    /// this fraction (or count) of the tiles' tokens, chosen from the global view; single-view
    /// models (LLaVA) keep their most salient patches.
    #[arg(long)]
    pub regions: Option<Budget>,
    /// Region budget over all tiles together (global) or within each tile (per-view).
    #[arg(long, default_value = "global")]
    pub region_scope: Scope,
    /// Weight of prompt relevance in the global view's tile and region scores (0: the
    /// distinctiveness of the global tokens alone; measured in docs/pruning.md).
    #[arg(long, default_value_t = 0.0)]
    pub region_relevance: f32,
    /// With --regions on tiled models: the fraction (or count) of the global view's own patch
    /// groups to encode, chosen by patch saliency (1 = all).
    #[arg(long, default_value = "1")]
    pub global_regions: Budget,
    /// Token merging inside the encoder (needs stages; --merge-method picks how): tokens merged
    /// per view after each group of layers, a count (8) or a fraction (0.25, at most 0.5); 0 = off.
    #[arg(long)]
    pub merge: Option<String>,
    /// How merged tokens combine: tome (each joins its most similar match) or transform (Token
    /// Transforming: spread over the 3 most similar survivors).
    #[arg(long, default_value = "tome")]
    pub merge_method: tome::MergeMethod,
}

impl SelectArgs {
    /// No pruning (eval and profile sweep their own).
    pub fn default_none() -> Self {
        SelectArgs {
            prune: Some("none".into()),
            keep: Some(Budget::Ratio(1.0)),
            keep_scope: Scope::Global,
            positions: Positions::Original,
            prune_seed: 0,
            lambda: 0.5,
            pool_dropped: 0,
            tiles: None,
            skipped_tiles: SkippedTiles::Drop,
            regions: None,
            region_scope: Scope::Global,
            region_relevance: 0.0,
            global_regions: Budget::Ratio(1.0),
            merge: None,
            merge_method: tome::MergeMethod::Tome,
        }
    }
}

/// Splits a comma-separated option value, dropping empty items.
pub fn list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(str::to_string).collect()
}

/// Token-selection settings that `eval` and `profile` sweep: comma-separated `--prune`, `--keep`
/// and `--tiles` run every combination in one run.
#[derive(clap::Args, Debug, Clone)]
pub struct SweepArgs {
    /// Token-selection methods, comma-separated to sweep (from the selection registry; `--help`
    /// lists each with what it does).
    /// Default: the target profile's pruning.
    #[arg(long, value_delimiter = ',', value_parser = prune_values())]
    pub prune: Vec<String>,
    /// Keep budgets: ratios or counts (comma-separated to sweep), e.g. 1.0,0.5,0.25; default: the
    /// target profile's when its method is used, else 1.
    #[arg(long)]
    pub keep: Option<String>,
    /// Budget scope: global or per-view.
    #[arg(long, default_value = "global")]
    pub keep_scope: Scope,
    /// Position ids after pruning: contiguous (renumber) or original (keep gaps).
    #[arg(long, default_value = "original")]
    pub positions: Positions,
    /// Seed of seeded methods.
    #[arg(long, default_value_t = 0)]
    pub prune_seed: u64,
    /// Pool the rows --prune drops into this many summary tokens per view (counted in --keep),
    /// each weighted by the rows it stands for (proportional attention; needs a decoder with an
    /// `attention_bias` input). Keeps pruned answers stopping: docs/pruning.md. 0 = off.
    #[arg(long, default_value_t = 0)]
    pub pool_dropped: usize,
    /// Tiles to encode (counts or ratios, comma-separated to sweep; `all` = no skipping).
    #[arg(long, default_value = "all")]
    pub tiles: String,
    /// What replaces a skipped tile or region: drop or global.
    #[arg(long, default_value = "drop")]
    pub skipped_tiles: SkippedTiles,
    /// Region budgets before the encoder's layers (fractions or counts of the tiles' tokens,
    /// comma-separated to sweep; `all` = no region skipping; needs stages).
    #[arg(long, default_value = "all")]
    pub regions: String,
    /// Region budget scope: global or per-view.
    #[arg(long, default_value = "global")]
    pub region_scope: Scope,
    /// Weight of prompt relevance in the global view's tile and region scores.
    #[arg(long, default_value_t = 0.0)]
    pub region_relevance: f32,
    /// With --regions on tiled models: the global view's own patch groups to encode (1 = all).
    #[arg(long, default_value = "1")]
    pub global_regions: Budget,
    /// Merge amounts per group boundary (comma-separated to sweep; 0 = off; needs stages).
    #[arg(long, default_value = "0")]
    pub merge: String,
    /// Merge methods to sweep, comma-separated (tome, transform).
    #[arg(long, default_value = "tome", value_delimiter = ',')]
    pub merge_method: Vec<tome::MergeMethod>,
}

/// One swept configuration of the reductions before and inside the encoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderSide {
    pub tiles: Option<TileBudget>,
    pub regions: Option<Budget>,
    pub merge: Option<Budget>,
    pub merge_method: tome::MergeMethod,
}

impl EncoderSide {
    /// Its label in reports: `all` without reduction, else `t2`, `r0.25`, `m8` joined by `+`.
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = self.tiles {
            parts.push(format!("t{}", tile_label(Some(t))));
        }
        if let Some(r) = self.regions {
            parts.push(format!("r{r}"));
        }
        if let Some(m) = self.merge {
            let tag = if self.merge_method == tome::MergeMethod::Transform { "tt" } else { "m" };
            parts.push(format!("{tag}{m}"));
        }
        if parts.is_empty() {
            "all".into()
        } else {
            parts.join("+")
        }
    }
}

impl SweepArgs {
    /// Whether any encoder-side value is swept (else `--fast` may fill the one row).
    pub fn swept(&self) -> bool {
        self.tiles != "all" || self.regions != "all" || self.merge != "0"
    }

    /// Every combination of the swept tile, region and merge values (tile and region skipping
    /// never together).
    pub fn encoder_sides(&self) -> anyhow::Result<Vec<EncoderSide>> {
        let tiles = self.tile_budgets()?;
        let regions: Vec<Option<Budget>> = list(&self.regions)
            .iter()
            .map(|r| if r == "all" { Ok(None) } else { r.parse().map(Some) })
            .collect::<Result<_, _>>()?;
        let merges: Vec<Option<Budget>> =
            list(&self.merge).iter().map(|m| tome::parse_r(m)).collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for &t in &tiles {
            for &r in &regions {
                for &m in &merges {
                    // region skipping already chooses within and across tiles: no combination
                    if t.is_some() && r.is_some() {
                        continue;
                    }
                    // without merging the method does not matter: one side
                    let methods = if m.is_some() { self.merge_method.clone() } else { vec![tome::MergeMethod::Tome] };
                    for merge_method in methods {
                        out.push(EncoderSide { tiles: t, regions: r, merge: m, merge_method });
                    }
                }
            }
        }
        Ok(out)
    }

    /// Sets one swept encoder-side configuration on pipeline options (the sweep's values, not
    /// `--fast`'s, decide every row: a row without reduction is the unreduced baseline).
    pub fn apply(&self, side: EncoderSide, po: &mut PipelineOptions) {
        if self.swept() {
            po.fast = Fast::Off;
        }
        po.tiles = self.tile_skip(side.tiles);
        po.regions = side.regions.map(|budget| RegionSkip {
            budget,
            scope: self.region_scope,
            skipped: self.skipped_tiles,
            relevance: self.region_relevance,
            global: self.global_regions,
        });
        po.merge = side.merge;
        po.merge_method = side.merge_method;
    }

    /// The methods and keep budgets swept: the flags, or the target profile's pruning (as
    /// `applied` says) where a flag is absent.
    pub fn methods_and_keeps(&self, applied: &Applied) -> anyhow::Result<(Vec<String>, Vec<Budget>)> {
        let methods = if self.prune.is_empty() { vec![applied.prune.value.clone()] } else { self.prune.clone() };
        let keeps = match &self.keep {
            Some(k) => list(k).iter().map(|k| k.parse()).collect::<Result<_, _>>()?,
            None => vec![applied.keep.value.parse()?],
        };
        Ok((methods, keeps))
    }

    /// The flags' `--prune` / `--keep` as a single selection, for settling against the profile
    /// (the first value of each; sweeps use [`SweepArgs::methods_and_keeps`]).
    pub fn first(&self) -> anyhow::Result<SelectArgs> {
        // with methods given, the sweep's own pairs are checked (settings::check_sweep); what
        // settles against the profile is the first method with a budget it can use (keep 1 for
        // `none`, else the first budget below 1), so `--prune dart --keep 0.25` settles
        let keeps: Vec<Budget> = match &self.keep {
            Some(k) => list(k).iter().map(|k| k.parse()).collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let keep = match self.prune.first().map(String::as_str) {
            None => keeps.first().copied(),
            Some("none") => keeps.iter().copied().find(Budget::is_full),
            Some(_) => keeps.iter().copied().find(|k| !k.is_full()).or(keeps.first().copied()),
        };
        // without a swept reduction the knobs that tune one are checked like ask's flags
        let none = SelectArgs::default_none();
        let swept = self.swept();
        Ok(SelectArgs {
            prune: self.prune.first().cloned(),
            keep,
            keep_scope: self.keep_scope,
            positions: self.positions,
            prune_seed: self.prune_seed,
            pool_dropped: self.pool_dropped,
            region_scope: if swept { none.region_scope } else { self.region_scope },
            skipped_tiles: if swept { none.skipped_tiles } else { self.skipped_tiles },
            region_relevance: if swept { none.region_relevance } else { self.region_relevance },
            global_regions: if swept { none.global_regions } else { self.global_regions },
            merge_method: match self.merge_method.as_slice() {
                [m] if !swept => *m,
                [_, _, ..] if !swept => tome::MergeMethod::Transform,
                _ => none.merge_method,
            },
            ..none
        })
    }

    /// The tile budgets swept (`None` = no skipping).
    pub fn tile_budgets(&self) -> anyhow::Result<Vec<Option<TileBudget>>> {
        tile_budgets(&self.tiles)
    }

    /// Tile skipping for one swept tile budget.
    pub fn tile_skip(&self, tile: Option<TileBudget>) -> Option<TileSkip> {
        tile.map(|budget| TileSkip { budget, skipped: self.skipped_tiles, relevance: self.region_relevance })
    }

    /// The selection of one swept configuration.
    pub fn config(&self, method: &str, keep: Budget) -> SelectConfig {
        SelectConfig {
            method: method.to_string(),
            budget: keep,
            scope: self.keep_scope,
            seed: self.prune_seed,
            pool: self.pool_dropped,
            ..Default::default()
        }
    }
}

/// Parses a comma-separated `--tiles` value; `all` means no tile skipping.
pub fn tile_budgets(s: &str) -> anyhow::Result<Vec<Option<TileBudget>>> {
    Ok(list(s).iter().map(|t| if t == "all" { Ok(None) } else { t.parse().map(Some) }).collect::<Result<_, _>>()?)
}

/// The label of a tile budget in reports (`all` without skipping).
pub fn tile_label(t: Option<TileBudget>) -> String {
    match t {
        None => "all".into(),
        Some(TileBudget::Count(n)) => n.to_string(),
        Some(TileBudget::Ratio(r)) => r.to_string(),
    }
}

/// Largest prompt read from a file or standard input.
const MAX_PROMPT_BYTES: u64 = 16 << 20;

/// The prompt from a file, or standard input for `-`, as UTF-8 within [`MAX_PROMPT_BYTES`].
pub fn read_prompt(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::Read;
    let stdin = path == std::path::Path::new("-");
    let what = if stdin { "standard input".to_string() } else { path.display().to_string() };
    let reader: Box<dyn Read> = if stdin {
        Box::new(std::io::stdin().lock())
    } else {
        let meta = std::fs::metadata(path).with_context(|| format!("reading the prompt from {what}"))?;
        anyhow::ensure!(meta.is_file(), "prompt file {what} is not a regular file");
        Box::new(std::fs::File::open(path).with_context(|| format!("reading the prompt from {what}"))?)
    };
    let mut bytes = Vec::new();
    reader
        .take(MAX_PROMPT_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading the prompt from {what}"))?;
    anyhow::ensure!(bytes.len() as u64 <= MAX_PROMPT_BYTES, "prompt from {what} is over {MAX_PROMPT_BYTES} bytes");
    String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("prompt from {what} is not UTF-8: {e}"))
}
