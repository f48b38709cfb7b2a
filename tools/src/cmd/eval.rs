//! `glimpse eval`: accuracy on a question set, with a progress bar.

use std::path::PathBuf;

use anyhow::{Context, Result};
use glimpse_runtime::eval::{evaluate, EvalOptions, EvalSet};
use glimpse_runtime::Pipeline;
use indicatif::{ProgressBar, ProgressStyle};

use super::{ModelArgs, SelectArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Eval set folder (questions.jsonl + images); default: MODEL/eval.
    #[arg(long)]
    pub set: Option<PathBuf>,
    /// Evaluate only the first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Most tokens generated per answer.
    #[arg(long, default_value_t = 8)]
    pub max_new_tokens: usize,
    /// Print the report as JSON (with per-question predictions).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let set_dir = args.set.clone().unwrap_or_else(|| args.model.model.join("eval"));
    let set = EvalSet::load(&set_dir).with_context(|| format!("loading eval set {}", set_dir.display()))?;
    let pipeline = Pipeline::load(&args.model.model, &args.model.pipeline_options(&args.select)?)
        .with_context(|| format!("loading model {}", args.model.model.display()))?;
    let opts = EvalOptions { max_new_tokens: args.max_new_tokens, limit: args.limit, keep_predictions: args.json };
    let n = args.limit.map_or(set.questions.len(), |l| l.min(set.questions.len()));
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} questions, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report =
        evaluate(&pipeline, &set, &opts, &mut |done, _| bar.set_position(done as u64)).context("evaluating")?;
    bar.finish_and_clear();
    let cfg = pipeline.selection();
    if args.json {
        let v = serde_json::json!({
            "model": pipeline.folder.root,
            "set": set_dir,
            "dtype": args.model.dtype_label(),
            "prune": cfg.method,
            "keep": cfg.budget.to_string(),
            "keep_scope": format!("{:?}", cfg.scope),
            "report": report,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let pct = |a: &glimpse_runtime::eval::Accuracy| {
        format!(
            "{:5.1}% [{:.1}, {:.1}] ({}/{})",
            a.accuracy * 100.0,
            a.ci95[0] * 100.0,
            a.ci95[1] * 100.0,
            a.correct,
            a.total
        )
    };
    println!(
        "{}  prune {} keep {} ({:?})  dtype {}",
        pipeline.folder.root.display(),
        cfg.method,
        cfg.budget,
        cfg.scope,
        args.model.dtype_label()
    );
    println!("overall        {}", pct(&report.overall));
    for (kind, acc) in &report.by_type {
        println!("{kind:<14} {}", pct(acc));
    }
    println!(
        "visual tokens  {:.1} kept of {:.1}; mean TTFT {:.1} ms",
        report.mean_visual_tokens_kept, report.mean_visual_tokens, report.mean_ttft_ms
    );
    Ok(())
}
