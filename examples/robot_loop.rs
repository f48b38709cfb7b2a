//! A robot-style control loop on the library: frames in, answers out, under a latency budget.
//!
//! The model is loaded once; a [`Stream`] asks one standing question about every frame and
//! re-encodes only the views that changed since the last one. Frames come from a folder here
//! (a robot would hand over camera frames the same way, as `RgbImage`s); each answer is acted
//! on (printed) as soon as it is ready, with whether it met the budget.
//!
//! ```text
//! cargo run --release --example robot_loop -- models/testbed-smolvlm FRAMES_DIR "Is there a red circle?" 300
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use glimpse::runtime::{GenerationOptions, Pipeline, PipelineOptions, Quiet, Stream, StreamOptions};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, frames, prompt, budget_ms] = args.as_slice() else {
        bail!("usage: robot_loop MODEL_DIR FRAMES_DIR PROMPT BUDGET_MS");
    };
    let budget = Duration::from_millis(budget_ms.parse().context("BUDGET_MS must be a whole number of ms")?);
    let pipeline = Pipeline::load(model, &PipelineOptions::default()).with_context(|| format!("loading {model}"))?;
    let options = StreamOptions { max_latency: Some(budget), ..StreamOptions::default() };
    let mut stream = Stream::new(&pipeline, prompt, options)?;
    let gen = GenerationOptions { max_new_tokens: 8, ..GenerationOptions::default() };

    let mut paths: Vec<PathBuf> = std::fs::read_dir(frames)
        .with_context(|| format!("reading {frames}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg"))
        .collect();
    paths.sort();
    for path in paths {
        // the camera callback of a real robot: one frame, decoded to RGB
        let frame = pipeline.load_image(&path)?;
        let report = stream.frame(&frame, &gen, &mut Quiet)?;
        let s = &report.answer.stats;
        // act on the answer: here, print it
        println!(
            "{}: {:>8} | TTFT {:6.1} ms ({}) | views encoded {}/{} | prompt tokens reused {}/{}",
            path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
            report.answer.text.trim(),
            s.ttft_ms,
            if report.deadline_met == Some(true) { "in budget" } else { "over budget" },
            report.update.views_encoded,
            report.update.views,
            s.kv_tokens_reused,
            s.prompt_tokens,
        );
    }
    Ok(())
}
