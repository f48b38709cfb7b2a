//! `glimpse watch`: a standing prompt over camera frames, a video or a folder of frames, one
//! JSON line per frame (answer, TTFT, views re-encoded, tokens reused) and a summary line. The
//! reuse between frames is the library's [`glimpse_runtime::Stream`]; with `--expect` the
//! frames, prompts and right answers come from a scene sequence (`tools/export scenestream`)
//! and the summary gives the accuracy.

mod source;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use glimpse_runtime::eval::{normalize_answer, Accuracy};
use glimpse_runtime::preprocess::ImageLimits;
use glimpse_runtime::{GenerationOptions, Pipeline, Quiet, Stream, StreamOptions};
use serde::Deserialize;

use super::robot::{RobotArgs, TRIGGER_POLL};
use super::{ModelArgs, SelectArgs};
use glimpse_targets::frame::Kind;
use source::Source;

/// What is reused between frames.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Encoder features of unchanged views and the KV cache of the unchanged prompt prefix.
    All,
    /// Encoder features only.
    Features,
    /// The KV cache of the prompt prefix only.
    Prefix,
    /// Nothing: every frame is encoded and prefilled whole.
    None,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["frames", "video", "camera", "expect"])))]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    /// The standing question asked about every frame.
    #[arg(long, required_unless_present = "expect")]
    pub prompt: Option<String>,
    /// A folder of frames (PNG or JPEG), taken in name order.
    #[arg(long, value_name = "DIR")]
    pub frames: Option<PathBuf>,
    /// A video file, decoded by ffmpeg.
    #[arg(long, value_name = "FILE")]
    pub video: Option<PathBuf>,
    /// A V4L2 camera (`/dev/video0`), read through ffmpeg; runs until interrupted or
    /// `--max-frames`.
    #[arg(long, value_name = "DEVICE")]
    pub camera: Option<PathBuf>,
    /// A scene sequence's `sequence.jsonl` (frame, prompt, answer per line; from `tools/export
    /// scenestream`): its frames with each of its prompts, scored.
    #[arg(long, value_name = "FILE", conflicts_with = "prompt")]
    pub expect: Option<PathBuf>,
    /// Frames per second taken from a video or camera (default: every frame).
    #[arg(long)]
    pub fps: Option<f64>,
    /// The ffmpeg program for `--video` and `--camera`.
    #[arg(long, default_value = "ffmpeg")]
    pub ffmpeg: PathBuf,
    /// Stop after this many frames (per prompt with `--expect`).
    #[arg(long)]
    pub max_frames: Option<usize>,
    /// What is reused between frames.
    #[arg(long, value_enum, default_value_t = Reuse::All)]
    pub reuse: Reuse,
    /// A view whose pixels changed by at most this much (largest mean absolute change over a
    /// 16 x 16 grid of cells, in the model's normalised pixel units) keeps its features.
    #[arg(long, default_value_t = StreamOptions::default().change_threshold)]
    pub change_threshold: f32,
    /// Time-to-first-token budget per frame, ms: changed views beyond what the measured stage
    /// costs allow keep their old features until a later frame.
    #[arg(long, value_name = "MS")]
    pub max_latency: Option<u64>,
    /// Most tokens to generate per frame.
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// The robot's serial line and GPIO lines.
    #[command(flatten)]
    pub robot: RobotArgs,
}

/// One line of a scene sequence.
#[derive(Debug, Deserialize)]
struct Expected {
    frame: PathBuf,
    prompt: String,
    answer: String,
}

/// A standing prompt with its frames and their right answers.
type Scored = (String, Vec<(PathBuf, String)>);

/// The prompts of a sequence file, in order, each with its frames and answers.
fn read_expected(path: &Path) -> Result<Vec<Scored>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut out: Vec<Scored> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let e: Expected = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not a sequence entry", path.display(), i + 1))?;
        let frame = dir.join(&e.frame);
        match out.iter_mut().find(|(p, _)| *p == e.prompt) {
            Some((_, frames)) => frames.push((frame, e.answer)),
            None => out.push((e.prompt, vec![(frame, e.answer)])),
        }
    }
    if out.is_empty() {
        bail!("{} holds no sequence entries", path.display());
    }
    Ok(out)
}

/// Totals over the frames of a run.
#[derive(Default)]
struct Totals {
    frames: usize,
    ttft_ms: Vec<f64>,
    views: usize,
    views_encoded: usize,
    kv_reused: usize,
    prompt_tokens: usize,
    correct: usize,
    scored: usize,
    met: usize,
    budgeted: usize,
}

pub fn run(args: Args) -> Result<()> {
    // the robot's lines first: a wrong device is named before the model is loaded
    let mut serial = args.robot.serial("watch")?;
    let mut lines = args.robot.lines()?;
    let (options, applied) = args.model.pipeline_options(&args.select)?;
    let pipeline = Pipeline::load(&args.model.model, &options)
        .with_context(|| format!("loading model {}", args.model.model.display()))?;
    let stream_opts = StreamOptions {
        change_threshold: args.change_threshold,
        reuse_features: matches!(args.reuse, Reuse::All | Reuse::Features),
        reuse_prefix: matches!(args.reuse, Reuse::All | Reuse::Prefix),
        max_latency: args.max_latency.map(Duration::from_millis),
    };
    let gen = GenerationOptions { max_new_tokens: args.max_new_tokens, ..Default::default() };
    let limits = ImageLimits { max_pixels: args.model.max_image_pixels, ..ImageLimits::default() };
    // (prompt, frames, right answers when known)
    let runs: Vec<(String, Source, Vec<Option<String>>)> = match (&args.expect, &args.prompt) {
        (Some(file), _) => read_expected(file)?
            .into_iter()
            .map(|(prompt, frames)| {
                let (paths, answers): (Vec<PathBuf>, Vec<String>) = frames.into_iter().unzip();
                (prompt, Source::files(paths, limits), answers.into_iter().map(Some).collect())
            })
            .collect(),
        (None, Some(prompt)) => {
            let source = if let Some(dir) = &args.frames {
                Source::files(source::folder_images(dir)?, limits)
            } else if let Some(video) = &args.video {
                Source::ffmpeg(&args.ffmpeg, video, false, args.fps, limits)?
            } else if let Some(cam) = &args.camera {
                Source::ffmpeg(&args.ffmpeg, cam, true, args.fps, limits)?
            } else {
                bail!("give --frames, --video, --camera or --expect");
            };
            vec![(prompt.clone(), source, Vec::new())]
        }
        (None, None) => bail!("give --prompt (or --expect)"),
    };
    let mut totals = Totals::default();
    for (prompt, mut source, answers) in runs {
        let mut stream = Stream::new(&pipeline, &prompt, stream_opts)?;
        let mut k = 0;
        while args.max_frames.is_none_or(|m| k < m) {
            // with a trigger input, each activation answers one frame (the newest from a camera)
            lines.wait_trigger(TRIGGER_POLL, || false)?;
            let Some(frame) = source.next_frame()? else { break };
            lines.set_busy(true)?;
            let result = stream.frame(&frame.image, &gen, &mut Quiet);
            lines.set_busy(false)?;
            if let Some(serial) = &mut serial {
                match &result {
                    Ok(r) => serial.send(Kind::Answer, r.answer.text.trim()),
                    Err(e) => serial.send(Kind::Error, &e.to_string()),
                }
            }
            let r = result.with_context(|| format!("answering about {}", frame.name))?;
            let s = &r.answer.stats;
            let expected = answers.get(k).cloned().flatten();
            let correct = expected.as_ref().map(|e| normalize_answer(&r.answer.text) == normalize_answer(e));
            totals.frames += 1;
            totals.ttft_ms.push(s.ttft_ms);
            totals.views += r.update.views;
            totals.views_encoded += r.update.views_encoded;
            totals.kv_reused += s.kv_tokens_reused;
            totals.prompt_tokens += s.prompt_tokens;
            if let Some(c) = correct {
                totals.scored += 1;
                totals.correct += usize::from(c);
            }
            if let Some(met) = r.deadline_met {
                totals.budgeted += 1;
                totals.met += usize::from(met);
            }
            let line = serde_json::json!({
                "frame": r.update.index,
                "source": frame.name,
                "prompt": prompt,
                "answer": r.answer.text.trim(),
                "expected": expected,
                "correct": correct,
                "ttft_ms": s.ttft_ms,
                "encode_ms": s.times.encode.as_secs_f64() * 1e3,
                "prefill_ms": s.times.prefill.as_secs_f64() * 1e3,
                "views": r.update.views,
                "views_changed": r.update.views_changed,
                "views_encoded": r.update.views_encoded,
                "views_reused": r.update.views_reused,
                "views_deferred": r.update.views_deferred,
                "prompt_tokens": s.prompt_tokens,
                "kv_tokens_reused": s.kv_tokens_reused,
                "predicted_ttft_ms": r.update.predicted_ttft_ms,
                "deadline_met": r.deadline_met,
            });
            out!("{line}");
            k += 1;
        }
    }
    let mut sorted = totals.ttft_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let mean = if sorted.is_empty() { 0.0 } else { sorted.iter().sum::<f64>() / sorted.len() as f64 };
    let summary = serde_json::json!({"summary": {
        "model": pipeline.folder.root,
        "backend": pipeline.backend_name(),
        "applied": applied,
        "reuse": format!("{:?}", args.reuse).to_lowercase(),
        "change_threshold": (f64::from(args.change_threshold) * 1e6).round() / 1e6,
        "max_latency_ms": args.max_latency,
        "frames": totals.frames,
        "mean_ttft_ms": mean,
        "median_ttft_ms": sorted.get(sorted.len() / 2),
        "views": totals.views,
        "views_encoded": totals.views_encoded,
        "prompt_tokens": totals.prompt_tokens,
        "kv_tokens_reused": totals.kv_reused,
        "accuracy": (totals.scored > 0).then(|| Accuracy::new(totals.correct, totals.scored)),
        "deadlines_met": (totals.budgeted > 0).then_some(BTreeMap::from([("met", totals.met), ("of", totals.budgeted)])),
    }});
    out!("{summary}");
    Ok(())
}
