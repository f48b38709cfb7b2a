//! `glimpse split`: the staged vision encoder from a monolithic one, by graph surgery verified
//! before writing (`glimpse_runtime::split`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use glimpse_runtime::split::{self, SplitOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder whose `onnx/vision_encoder*.onnx` is split.
    #[arg(long)]
    pub model: PathBuf,
    /// Number of equal groups of encoder layers.
    #[arg(long, default_value_t = 2, conflicts_with = "at")]
    pub groups: usize,
    /// Layers where a new group starts, comma-separated (`--at 4,8`: layers 0-3, 4-7, 8-).
    #[arg(long, value_delimiter = ',')]
    pub at: Vec<usize>,
    /// Which variant of the vision encoder to split (fp32, fp16, int8, q4, ...); the stages get
    /// its file suffix.
    #[arg(long, default_value = "fp32")]
    pub dtype: glimpse_runtime::Dtype,
    /// Backends that must reproduce the monolithic output with the stages (those that cannot
    /// start are reported and skipped; at least one must run).
    #[arg(long, value_delimiter = ',', default_value = "tract,ort")]
    pub verify_on: Vec<String>,
    /// ONNX Runtime library for verifying on `ort` (else ORT_DYLIB_PATH).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Replace stages glimpse.json already lists with other layer groups.
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let opts = SplitOptions {
        groups: args.groups,
        at: args.at.clone(),
        dtype: args.dtype,
        backends: args.verify_on.clone(),
        backend_options: glimpse_runtime::backend::BackendOptions {
            ort_library: args.ort_lib.clone(),
            ..Default::default()
        },
        force: args.force,
    };
    let report = split::split(&args.model, &opts).with_context(|| format!("splitting {}", args.model.display()))?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    out!("{}: {} encoder layers, groups {:?}", report.source.display(), report.layers, report.groups);
    for f in &report.files {
        out!("  wrote onnx/{}.onnx ({} nodes, {} bytes)", f.stem, f.nodes, f.bytes);
    }
    match &report.mask {
        Some(m) => out!("  attention mask `{m}` replaced by each group's attention_bias input"),
        None => out!("  attention_bias added before each layer's Softmax"),
    }
    if !report.keys {
        out!("  no key projection found (or no vision_config.num_attention_heads): groups output no `keys`");
    }
    for v in &report.verified {
        out!(
            "  verified on {}: max abs diff {:.2e} (tolerance {:.0e}); groups ran on {} of {} tokens",
            v.backend,
            v.max_abs_diff,
            v.tolerance,
            v.fewer_tokens,
            v.grid
        );
    }
    for (b, why) in &report.skipped {
        out!("  not verified on {b}: {why}");
    }
    Ok(())
}
