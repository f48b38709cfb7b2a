//! One module per subcommand, plus the options they share.

pub mod ask;
pub mod eval;
pub mod inspect;
pub mod overlay;
pub mod plot;
pub mod profile;
pub mod quantize;
pub mod targets;

use std::path::PathBuf;

use glimpse_runtime::preprocess::ImageLimits;
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
    /// `auto` to pick per part from the target profile among the files present.
    #[arg(long, default_value = "fp32")]
    pub dtype: DtypeArg,
    /// Target profile for `--dtype auto` (default: detected; see `glimpse targets`).
    #[arg(long)]
    pub target: Option<String>,
    /// Inference backend.
    #[arg(long, default_value = "tract")]
    pub backend: String,
    /// ONNX Runtime library for `--backend ort` (else ORT_DYLIB_PATH, else next to the binary).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Intra-op threads for ONNX Runtime (0 = its default); tract runs single-threaded.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
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
}

/// `--dtype`: one variant for every part, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeArg {
    Auto,
    Fixed(Dtype),
}

impl std::str::FromStr for DtypeArg {
    type Err = glimpse_runtime::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(DtypeArg::Auto);
        }
        s.parse().map(DtypeArg::Fixed)
    }
}

/// The target profile named by `--target`, or the detected one.
pub fn target_profile(name: Option<&str>) -> anyhow::Result<&'static glimpse_targets::Profile> {
    Ok(match name {
        Some(n) => glimpse_targets::Profile::by_name(n)?,
        None => glimpse_targets::detect().choose_profile(),
    })
}

/// Per-part dtypes a profile picks among the variants present in a model folder.
pub fn auto_dtypes(
    folder: &glimpse_runtime::ModelFolder,
    profile: &glimpse_targets::Profile,
    backend: &str,
) -> anyhow::Result<Vec<(glimpse_runtime::Part, Dtype)>> {
    let backend = target_backend(backend)?;
    let mut out = Vec::new();
    for part in glimpse_runtime::Part::ALL {
        let present: Vec<&str> = folder.variants(part).iter().map(|d| d.name()).collect();
        let tpart: glimpse_targets::ModelPart = part.stem().parse().map_err(anyhow::Error::msg)?;
        let chosen = profile.choose_dtype(tpart, backend, &present).ok_or_else(|| {
            anyhow::anyhow!(
                "target {} prefers {:?} for {part} with {backend} but the folder has only {:?}",
                profile.name,
                profile.dtypes_for(backend).for_part(tpart),
                present
            )
        })?;
        out.push((part, chosen.parse()?));
    }
    Ok(out)
}

/// The target-profile backend for a `--backend` name.
pub fn target_backend(name: &str) -> anyhow::Result<glimpse_targets::Backend> {
    match name {
        "tract" => Ok(glimpse_targets::Backend::Tract),
        "ort" => Ok(glimpse_targets::Backend::Ort),
        other => anyhow::bail!("unknown backend `{other}` (tract, ort)"),
    }
}

impl ModelArgs {
    /// Backend settings: `--ep` or else the target profile's execution providers (tract ignores them).
    pub fn backend_options(&self) -> anyhow::Result<glimpse_runtime::backend::BackendOptions> {
        let execution_providers = if self.ep.is_empty() {
            target_profile(self.target.as_deref())?.execution_providers.iter().map(|p| p.name().to_string()).collect()
        } else {
            self.ep.clone()
        };
        Ok(glimpse_runtime::backend::BackendOptions {
            ort_library: self.ort_lib.clone(),
            threads: self.threads,
            execution_providers,
            engine_cache: self.trt_cache.clone(),
        })
    }

    /// A short description of the dtype choice for reports.
    pub fn dtype_label(&self) -> String {
        match self.dtype {
            DtypeArg::Auto => "auto".into(),
            DtypeArg::Fixed(d) => d.name().into(),
        }
    }

    /// The pipeline options these arguments describe, with a token-selection setup.
    pub fn pipeline_options(&self, select: &SelectArgs) -> anyhow::Result<PipelineOptions> {
        let (dtype, part_dtypes) = match self.dtype {
            DtypeArg::Fixed(d) => (d, Vec::new()),
            DtypeArg::Auto => {
                let folder = glimpse_runtime::ModelFolder::open(&self.model)?;
                let profile = target_profile(self.target.as_deref())?;
                (Dtype::Fp32, auto_dtypes(&folder, profile, &self.backend)?)
            }
        };
        Ok(PipelineOptions {
            dtype,
            part_dtypes,
            backend: self.backend.clone(),
            image_limits: ImageLimits { max_pixels: self.max_image_pixels, ..ImageLimits::default() },
            select: select.config(),
            positions: select.positions,
            tiles: select.tiles.map(|budget| TileSkip { budget, skipped: select.skipped_tiles }),
            backend_options: self.backend_options()?,
        })
    }
}

/// `--prune` values: every method of the selection registry, with its one-line summary.
pub fn prune_values() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        glimpse_runtime::select::METHODS.iter().map(|m| clap::builder::PossibleValue::new(m.name).help(m.summary)),
    )
}

/// Options of the token-selection (pruning) stage.
#[derive(clap::Args, Debug, Clone)]
pub struct SelectArgs {
    /// Token-selection method between encoder and LLM (from the selection registry; `--help` lists
    /// each with what it does).
    #[arg(long, default_value = "none", value_parser = prune_values())]
    pub prune: String,
    /// Visual tokens to keep: a ratio in (0, 1] (0.25) or a count (64).
    #[arg(long, default_value = "1.0")]
    pub keep: Budget,
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
    /// Skip tiles before the encoder: encode only this many (or this fraction) of the tiles, chosen
    /// from the global view (tiled models such as SmolVLM).
    #[arg(long)]
    pub tiles: Option<TileBudget>,
    /// What replaces a skipped tile: drop (nothing) or global (its share of the global view).
    #[arg(long, default_value = "drop")]
    pub skipped_tiles: SkippedTiles,
}

impl SelectArgs {
    /// No pruning (profile sets its own sweep).
    pub fn default_none() -> Self {
        SelectArgs {
            prune: "none".into(),
            keep: Budget::Ratio(1.0),
            keep_scope: Scope::Global,
            positions: Positions::Original,
            prune_seed: 0,
            lambda: 0.5,
            tiles: None,
            skipped_tiles: SkippedTiles::Drop,
        }
    }

    /// The selection configuration.
    pub fn config(&self) -> SelectConfig {
        SelectConfig {
            method: self.prune.clone(),
            budget: self.keep,
            scope: self.keep_scope,
            seed: self.prune_seed,
            lambda: self.lambda,
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
    #[arg(long, default_value = "none", value_delimiter = ',', value_parser = prune_values())]
    pub prune: Vec<String>,
    /// Keep budgets: ratios or counts (comma-separated to sweep), e.g. 1.0,0.5,0.25.
    #[arg(long, default_value = "1.0")]
    pub keep: String,
    /// Budget scope: global or per-view.
    #[arg(long, default_value = "global")]
    pub keep_scope: Scope,
    /// Position ids after pruning: contiguous (renumber) or original (keep gaps).
    #[arg(long, default_value = "original")]
    pub positions: Positions,
    /// Seed of seeded methods.
    #[arg(long, default_value_t = 0)]
    pub prune_seed: u64,
    /// Tiles to encode (counts or ratios, comma-separated to sweep; `all` = no skipping).
    #[arg(long, default_value = "all")]
    pub tiles: String,
    /// What replaces a skipped tile: drop or global.
    #[arg(long, default_value = "drop")]
    pub skipped_tiles: SkippedTiles,
}

impl SweepArgs {
    /// The methods swept.
    pub fn methods(&self) -> Vec<String> {
        self.prune.clone()
    }

    /// The keep budgets swept.
    pub fn keeps(&self) -> anyhow::Result<Vec<Budget>> {
        Ok(list(&self.keep).iter().map(|k| k.parse()).collect::<Result<_, _>>()?)
    }

    /// The tile budgets swept (`None` = no skipping).
    pub fn tile_budgets(&self) -> anyhow::Result<Vec<Option<TileBudget>>> {
        tile_budgets(&self.tiles)
    }

    /// Tile skipping for one swept tile budget.
    pub fn tile_skip(&self, tile: Option<TileBudget>) -> Option<TileSkip> {
        tile.map(|budget| TileSkip { budget, skipped: self.skipped_tiles })
    }

    /// The selection of one swept configuration.
    pub fn config(&self, method: &str, keep: Budget) -> SelectConfig {
        SelectConfig {
            method: method.to_string(),
            budget: keep,
            scope: self.keep_scope,
            seed: self.prune_seed,
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
