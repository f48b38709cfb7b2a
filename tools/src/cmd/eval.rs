//! `glimpse eval`: accuracy on a question set, with a progress bar. Comma-separated `--prune`,
//! `--keep`, `--tiles`, `--regions` and `--merge` values sweep every combination in one run
//! and print a table (`--markdown` for docs); the encoder column says what acted before or
//! inside the encoder (`all`: nothing; `t2` tiles, `r0.25` regions, `m8` merging).

use std::path::PathBuf;

use anyhow::{Context, Result};
use glimpse_runtime::eval::{evaluate, Accuracy, EvalOptions, EvalReport, EvalSet};
use glimpse_runtime::Pipeline;
use indicatif::{ProgressBar, ProgressStyle};

use super::{ModelArgs, SweepArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Eval set folder (questions.jsonl + images); default: MODEL/eval.
    #[arg(long)]
    pub set: Option<PathBuf>,
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// Evaluate only the first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Most tokens generated per answer.
    #[arg(long, default_value_t = 8)]
    pub max_new_tokens: usize,
    /// Print JSON (with per-question predictions for a single configuration).
    #[arg(long)]
    pub json: bool,
    /// Print a Markdown table (one row per configuration).
    #[arg(long)]
    pub markdown: bool,
    /// Draw accuracy against mean TTFT of every configuration, with the Pareto front, into
    /// this SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

struct Row {
    method: String,
    keep: String,
    /// The reductions before / inside the encoder ([`super::EncoderSide::label`]).
    encoder: String,
    report: EvalReport,
}

pub fn run(args: Args) -> Result<()> {
    let set_dir = args.set.clone().unwrap_or_else(|| args.model.model.join("eval"));
    let set = EvalSet::load(&set_dir).with_context(|| format!("loading eval set {}", set_dir.display()))?;
    let sides = args.sweep.encoder_sides()?;
    let (mut po, applied) = args.model.pipeline_options(&args.sweep.first()?)?;
    let (methods, keeps) = args.sweep.methods_and_keeps(&applied)?;
    glimpse_runtime::settings::check_sweep(&methods, &keeps)?;
    let n = args.limit.map_or(set.questions.len(), |l| l.min(set.questions.len()));
    let opts = EvalOptions { max_new_tokens: args.max_new_tokens, limit: args.limit, keep_predictions: args.json };
    let configs = sides.len() * methods.len() * keeps.len();
    let bar = ProgressBar::new((n * configs) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} answers, {per_sec}, eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for side in &sides {
        args.sweep.apply(*side, &mut po);
        let label = if args.model.fast && !args.sweep.swept() { "fast".to_string() } else { side.label() };
        let mut pipeline = Pipeline::load(&args.model.model, &po)
            .with_context(|| format!("loading model {}", args.model.model.display()))?;
        for m in &methods {
            for &keep in &keeps {
                // `none` ignores the budget, and keeping everything is the same for every method:
                // evaluate each of those once.
                if m == "none" && !keep.is_full() {
                    bar.inc(n as u64);
                    continue;
                }
                if keep.is_full() && m != &methods[0] && rows.iter().any(|r: &Row| r.keep == "1" && r.encoder == label)
                {
                    bar.inc(n as u64);
                    continue;
                }
                pipeline.set_selection(args.sweep.config(m, keep), args.sweep.positions)?;
                bar.set_message(format!("{m} keep {keep} encoder {label}"));
                let done_before = bar.position();
                let report =
                    evaluate(&pipeline, &set, &opts, &mut |done, _| bar.set_position(done_before + done as u64))
                        .with_context(|| format!("evaluating {m} keep {keep}"))?;
                rows.push(Row { method: m.clone(), keep: keep.to_string(), encoder: label.clone(), report });
            }
        }
    }
    bar.finish_and_clear();
    if let Some(path) = &args.plot {
        let points: Vec<super::plot::Point> = rows
            .iter()
            .map(|r| super::plot::Point {
                label: if r.method == "none" {
                    r.encoder.clone()
                } else {
                    format!("{} {} {}", r.encoder, r.method, r.keep)
                },
                ttft_ms: r.report.mean_ttft_ms,
                accuracy: r.report.overall.accuracy * 100.0,
            })
            .collect();
        let title = format!("{}: accuracy vs time to first token", args.model.model.display());
        super::plot::accuracy_vs_ttft(path, &title, &points).with_context(|| format!("plotting {}", path.display()))?;
        // the front in the table order the plot draws it
        for i in super::plot::pareto_front(&points) {
            eprintln!("pareto: {} ({:.1} ms, {:.1}%)", points[i].label, points[i].ttft_ms, points[i].accuracy);
        }
    }
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| serde_json::json!({"prune": r.method, "keep": r.keep, "encoder": r.encoder, "report": r.report}))
            .collect();
        let v = serde_json::json!({
            "model": args.model.model,
            "set": set_dir,
            "dtype": args.model.dtype_label(),
            "backend": po.backend,
            "applied": applied,
            "keep_scope": format!("{:?}", args.sweep.keep_scope),
            "positions": args.sweep.positions,
            "runs": v,
        });
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let types: Vec<String> = rows.first().map(|r| r.report.by_type.keys().cloned().collect()).unwrap_or_default();
    let pct = |a: &Accuracy| format!("{:.1}", a.accuracy * 100.0);
    if args.markdown {
        out!("| method | keep | encoder | tokens | accuracy % [95% CI] | {} | TTFT ms |", types.join(" | "));
        out!("|---|---|---|---|---|{}---|", "---|".repeat(types.len()));
    } else {
        out!("{} ({} questions, dtype {})", args.model.model.display(), n, args.model.dtype_label());
    }
    for r in &rows {
        let o = &r.report.overall;
        let per: Vec<String> = types.iter().map(|t| r.report.by_type.get(t).map(pct).unwrap_or_default()).collect();
        let tokens = format!("{:.0}/{:.0}", r.report.mean_visual_tokens_kept, r.report.mean_visual_tokens);
        let overall = format!("{:.1} [{:.1}, {:.1}]", o.accuracy * 100.0, o.ci95[0] * 100.0, o.ci95[1] * 100.0);
        if args.markdown {
            out!(
                "| {} | {} | {} | {tokens} | {overall} | {} | {:.1} |",
                r.method,
                r.keep,
                r.encoder,
                per.join(" | "),
                r.report.mean_ttft_ms
            );
        } else {
            out!("{:<10} keep {:<5} encoder {:<8} tokens {tokens:<9} overall {overall}", r.method, r.keep, r.encoder);
            for (t, a) in &r.report.by_type {
                out!(
                    "    {t:<12} {:5.1}% [{:.1}, {:.1}] ({}/{})",
                    a.accuracy * 100.0,
                    a.ci95[0] * 100.0,
                    a.ci95[1] * 100.0,
                    a.correct,
                    a.total
                );
            }
            out!("    mean TTFT {:.1} ms", r.report.mean_ttft_ms);
            if let Some((before, after)) = r.report.mean_prompt_text_tokens {
                out!(
                    "    prompt compressor: question text tokens {before:.1} -> {after:.1}, {:.1} ms per question (in TTFT)",
                    r.report.mean_stage_ms.get("prompt_compress").copied().unwrap_or(0.0)
                );
            }
        }
    }
    Ok(())
}
