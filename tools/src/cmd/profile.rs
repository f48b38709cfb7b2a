//! `glimpse profile`: every stage timed on this device, over keep ratios, methods and backends.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use glimpse_runtime::backend;
use glimpse_runtime::calibrate::{calibrate, Calibration};
use glimpse_runtime::profile::{peak_rss_bytes, profile, ProfileOptions, ProfileRow};
use glimpse_runtime::Pipeline;
use indicatif::{ProgressBar, ProgressStyle};

use super::{list, ModelArgs, SweepArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image to answer about.
    #[arg(long, default_value = "models/images/wide.png")]
    pub image: PathBuf,
    /// Prompt.
    #[arg(long, default_value = "What is in the image?", conflicts_with = "prompt_file")]
    pub prompt: String,
    /// Read the prompt from a file (`-`: standard input), e.g. a long context to time the
    /// prompt compressor against the prefill it saves; at most 16 MiB.
    #[arg(long, value_name = "PATH")]
    pub prompt_file: Option<PathBuf>,
    /// Comma-separated backends to run side by side (e.g. tract,ort).
    #[arg(long = "backends", default_value = "")]
    pub backends: String,
    /// Comma-separated dtype variants to run side by side (e.g. fp32,int8,q4); overrides --dtype.
    #[arg(long = "dtypes", default_value = "")]
    pub dtypes: String,
    /// Comma-separated vision encoder forms to run side by side (monolithic,staged); overrides
    /// --encoder.
    #[arg(long = "encoders", default_value = "")]
    pub encoders: String,
    /// Comma-separated ways to run an image's views side by side (batch,one-by-one); overrides
    /// --views.
    #[arg(long = "view-runs", default_value = "")]
    pub view_runs: String,
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// Untimed runs before measuring each configuration.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs per configuration.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Tokens decoded per run (EOS ignored so every run decodes the same count).
    #[arg(long, default_value_t = 8)]
    pub new_tokens: usize,
    /// Measure GEMM throughput and memory bandwidth first, and report efficiency against them.
    #[arg(long)]
    pub calibrate: bool,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the rows as CSV.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Draw latency by stage against keep ratio (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let prompt = match &args.prompt_file {
        Some(path) => super::read_prompt(path)?,
        None => args.prompt.clone(),
    };
    let (_, applied) = args.model.pipeline_options(&args.sweep.first()?)?;
    let backends = if args.backends.is_empty() { vec![applied.backend.value.clone()] } else { list(&args.backends) };
    let (methods, keeps) = args.sweep.methods_and_keeps(&applied)?;
    glimpse_runtime::settings::check_sweep(&methods, &keeps)?;
    if methods.is_empty() || keeps.is_empty() {
        bail!("--prune and --keep need at least one value each");
    }
    let opts = ProfileOptions { warmup: args.warmup, runs: args.runs.max(1), new_tokens: args.new_tokens };
    let (_, backend_opts) = args.model.settle(None, None)?;
    let sides = args.sweep.encoder_sides()?;
    let encoders = sweep_or(&args.encoders, args.model.encoder)?;
    let view_runs = sweep_or(&args.view_runs, args.model.views)?;
    let dtypes: Vec<super::DtypeArg> = sweep_or(&args.dtypes, args.model.dtype.clone())?;
    let total = dtypes.len()
        * encoders.len()
        * view_runs.len()
        * backends.len()
        * sides.len()
        * methods.len()
        * keeps.len()
        * (opts.warmup + opts.runs);
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} runs {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    let mut calibrations: Vec<Calibration> = Vec::new();
    let mut model_bytes = 0;
    let mut realsize = false;
    let mut placements = std::collections::BTreeMap::new();
    let mut configs = Vec::new();
    // each configuration's load: what every part cost in resident memory
    let mut loads = Vec::new();
    for d in &dtypes {
        for &encoder in &encoders {
            for &views in &view_runs {
                for b in &backends {
                    for &t in &sides {
                        configs.push((d.clone(), encoder, views, b, t));
                    }
                }
            }
        }
    }
    for (dtype, encoder, views, b, side) in configs {
        let model_args = super::ModelArgs { dtype, encoder, views, ..args.model.clone() };
        let model_args = super::ModelArgs { backend: Some(b.clone()), ..model_args };
        let (mut po, _) = model_args.pipeline_options(&args.sweep.first()?)?;
        args.sweep.apply(side, &mut po);
        let mut pipeline = Pipeline::load(&args.model.model, &po)
            .with_context(|| format!("loading {} with backend {b}", args.model.model.display()))?;
        placements.insert(
            b.clone(),
            pipeline
                .placements()
                .into_iter()
                .map(|(p, pl)| (p.stem().to_string(), pl))
                .chain(pipeline.compressor_placement().map(|pl| ("prompt_compressor".to_string(), pl)))
                .collect::<std::collections::BTreeMap<_, _>>(),
        );
        let dtypes = pipeline.parts().iter().map(|(_, d)| d.name()).collect::<Vec<_>>();
        let load_dtype = match dtypes.first() {
            Some(first) if dtypes.iter().all(|x| x == first) => first.to_string(),
            _ => dtypes.join("/"),
        };
        loads.push(serde_json::json!({
            "backend": b,
            "dtype": load_dtype,
            "encoder": if pipeline.encoder_is_staged() { "staged" } else { "monolithic" },
            "parts": pipeline.load_memory(),
        }));
        realsize = pipeline.folder.manifest.is_realsize();
        model_bytes =
            pipeline.parts().iter().map(|&(p, d)| glimpse_runtime::profile::part_bytes(&pipeline, p, d)).sum();
        let cal = if args.calibrate && !calibrations.iter().any(|c: &Calibration| &c.backend == b) {
            bar.set_message(format!("calibrating {b}"));
            let be = backend::by_name(b, &backend_opts)?;
            let c = calibrate(be.as_ref()).context("calibration")?;
            calibrations.push(c.clone());
            Some(c)
        } else {
            calibrations.iter().find(|c| &c.backend == b).cloned()
        };
        for m in &methods {
            for &keep in &keeps {
                bar.set_message(format!("{b} {m} {keep}"));
                pipeline.set_selection(args.sweep.config(m, keep), args.sweep.positions)?;
                let mut row = profile(&pipeline, &args.image, &prompt, &opts, cal.as_ref(), &mut || bar.inc(1))
                    .with_context(|| format!("profiling {b} {m} keep {keep}"))?;
                row.reduction = if args.model.fast && !args.sweep.swept() { "fast".to_string() } else { side.label() };
                rows.push(row);
            }
        }
    }
    bar.finish_and_clear();
    let peak = peak_rss_bytes();
    if let Some(path) = &args.csv {
        write_csv(path, &rows).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        super::plot::latency_vs_keep(path, &rows).with_context(|| format!("plotting {}", path.display()))?;
    }
    let note = if realsize {
        "random-weight real-size model: timings are real, answers and accuracy are meaningless"
    } else {
        "timings only; use glimpse eval for accuracy"
    };
    if args.json {
        let v = serde_json::json!({
            "model": args.model.model,
            "dtype": if args.dtypes.is_empty() { args.model.dtype_label() } else { args.dtypes.clone() },
            "image": args.image,
            "prompt": if args.prompt_file.is_some() { serde_json::json!({"file": args.prompt_file}) } else { serde_json::json!(args.prompt) },
            "warmup": opts.warmup,
            "runs": opts.runs,
            "new_tokens": opts.new_tokens,
            "model_bytes": model_bytes,
            "peak_rss_bytes": peak,
            "loads": loads,
            "note": note,
            "calibration": calibrations,
            "placement": placements,
            "rows": rows,
        });
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_table(&rows);
    print_memory(&loads, &rows)?;
    out!(
        "model {:.1} MB on disk; peak RSS {:.1} MB; {} timed runs after {} warm-up; {note}",
        model_bytes as f64 / 1e6,
        peak.unwrap_or(0) as f64 / 1e6,
        opts.runs,
        opts.warmup
    );
    for (b, parts) in &placements {
        let text: Vec<String> = parts.iter().map(|(p, pl)| format!("{p}: {pl}")).collect();
        out!("placement {b}: {}", text.join("; "));
    }
    for c in &calibrations {
        out!(
            "calibration {}: GEMM {:.1} GFLOP/s ({}x{}x{}), memory read {:.1} GB/s ({} threads)",
            c.backend,
            c.gemm_gflops,
            c.gemm_shape[0],
            c.gemm_shape[1],
            c.gemm_shape[2],
            c.bandwidth_gb_s,
            c.bandwidth_threads
        );
    }
    Ok(())
}

/// Resident memory: per part loaded (file size, what the load kept, its transient peak above
/// the RSS before it), then per stage of each configuration's first run (peak while it ran).
fn print_memory(loads: &[serde_json::Value], rows: &[ProfileRow]) -> Result<()> {
    let mb = |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |b| format!("{:.0}", b / 1e6));
    for l in loads {
        let parts: Vec<String> = l["parts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{} {} MB file, +{} kept, +{} peak",
                    p["part"].as_str().unwrap_or("?"),
                    mb(&p["file_bytes"]),
                    mb(&p["kept_bytes"]),
                    mb(&p["transient_bytes"])
                )
            })
            .collect();
        if parts.is_empty() {
            continue;
        }
        let after = l["parts"].as_array().and_then(|p| p.last()).map(|p| mb(&p["rss_after"])).unwrap_or_default();
        let s = |k: &str| l[k].as_str().unwrap_or("?").to_string();
        out!(
            "memory load {} {} {}: {}; RSS after load {after} MB",
            s("backend"),
            s("dtype"),
            s("encoder"),
            parts.join("; ")
        );
    }
    for r in rows {
        if r.memory.is_empty() {
            continue;
        }
        let stages: Vec<String> =
            r.memory.iter().map(|m| format!("{} {:.0}", m.stage, m.peak_bytes as f64 / 1e6)).collect();
        out!("memory peak MB per stage, {} {} {} {}: {}", r.backend, r.dtype, r.method, r.keep, stages.join(", "));
    }
    Ok(())
}

/// A comma-separated sweep flag's values, or `single` when the flag is empty.
fn sweep_or<T: std::str::FromStr>(values: &str, single: T) -> Result<Vec<T>>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    if values.is_empty() {
        return Ok(vec![single]);
    }
    Ok(list(values).iter().map(|v| v.parse()).collect::<Result<_, _>>()?)
}

fn print_table(rows: &[ProfileRow]) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<7} {:<6} {:<5} {:<10} {:>5} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "backend",
        "dtype",
        "enc",
        "method",
        "keep",
        "tokens",
        "preproc",
        "encode",
        "select",
        "splice",
        "prefill",
        "TTFT",
        "decode/s",
        "e2e",
        "gap%"
    );
    for r in rows {
        let m = |k: &str| r.stages.get(k).map_or(0.0, |s| s.median_ms);
        let _ = writeln!(
            out,
            "{:<7} {:<6} {:<5} {:<10} {:>5} {:>9} {:>9.1} {:>9.1} {:>8.2} {:>8.2} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>6.2}",
            r.backend,
            r.dtype,
            format!("{}{}", if r.encoder == "staged" { "stg" } else { "mono" }, if r.views_run == "batch" { "" } else { "/1" }),
            if r.reduction == "all" { r.method.clone() } else { format!("{} {}", r.method, r.reduction) },
            r.keep,
            format!("{}/{}", r.visual_tokens_kept, r.visual_tokens),
            m("preprocess"),
            m("encode"),
            m("select"),
            m("splice"),
            m("prefill"),
            m("ttft"),
            r.decode_tokens_per_s,
            m("end_to_end"),
            r.accounting_gap * 100.0
        );
    }
    for r in rows {
        if let Some(c) = &r.prompt_compression {
            let _ = writeln!(
                out,
                "{} {} {}: prompt compressor {:.1} ms (in TTFT), text tokens {} -> {}, prompt {} tokens",
                r.backend,
                r.method,
                r.keep,
                r.stages.get("prompt_compress").map_or(0.0, |s| s.median_ms),
                c.text_tokens_before,
                c.text_tokens_after,
                r.prompt_tokens
            );
        }
    }
    let _ = writeln!(out, "(median ms over the timed runs; min/max in --json)");
}

fn write_csv(path: &std::path::Path, rows: &[ProfileRow]) -> Result<()> {
    let stages = [
        "prompt_compress",
        "image_decode",
        "preprocess",
        "encode",
        "encode_per_view",
        "select",
        "splice",
        "prefill",
        "ttft",
        "decode",
        "end_to_end",
    ];
    let mut s = String::from(
        "backend,dtype,encoder,views_run,reduction,method,keep,views,visual_tokens,visual_tokens_kept,prompt_tokens,new_tokens",
    );
    for st in stages {
        s.push_str(&format!(",{st}_median_ms,{st}_min_ms,{st}_max_ms"));
    }
    s.push_str(",decode_tokens_per_s,prefill_gflops,encode_gflops,decode_gb_s\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            r.backend,
            r.dtype,
            r.encoder,
            r.views_run,
            r.reduction,
            r.method,
            r.keep,
            r.views,
            r.visual_tokens,
            r.visual_tokens_kept,
            r.prompt_tokens,
            r.new_tokens
        ));
        for st in stages {
            let sp = r.stages.get(st).copied().unwrap_or(glimpse_runtime::profile::Spread {
                median_ms: 0.0,
                min_ms: 0.0,
                max_ms: 0.0,
            });
            s.push_str(&format!(",{:.4},{:.4},{:.4}", sp.median_ms, sp.min_ms, sp.max_ms));
        }
        s.push_str(&format!(
            ",{:.3},{:.3},{:.3},{:.3}\n",
            r.decode_tokens_per_s, r.efficiency.prefill_gflops, r.efficiency.encode_gflops, r.efficiency.decode_gb_s
        ));
    }
    std::fs::write(path, s)?;
    Ok(())
}
