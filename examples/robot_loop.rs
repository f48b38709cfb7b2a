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
//!
//! `cargo test --example robot_loop` (and `cargo test --workspace`) runs the loop's test below.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use glimpse::runtime::{FrameReport, GenerationOptions, Pipeline, PipelineOptions, Quiet, Stream, StreamOptions};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, frames, prompt, budget_ms] = args.as_slice() else {
        bail!("usage: robot_loop MODEL_DIR FRAMES_DIR PROMPT BUDGET_MS");
    };
    let budget = Duration::from_millis(budget_ms.parse().context("BUDGET_MS must be a whole number of ms")?);
    run(Path::new(model), Path::new(frames), prompt, budget, |path, report| {
        // act on the answer: here, print it
        let s = &report.answer.stats;
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
    })
}

/// The loop: load the model once, then answer `prompt` about every frame in `frames` (sorted
/// by name), handing each answer to `act` as soon as it is ready.
fn run(
    model: &Path,
    frames: &Path,
    prompt: &str,
    budget: Duration,
    mut act: impl FnMut(&Path, &FrameReport),
) -> Result<()> {
    let pipeline =
        Pipeline::load(model, &PipelineOptions::default()).with_context(|| format!("loading {}", model.display()))?;
    let options = StreamOptions { max_latency: Some(budget), ..StreamOptions::default() };
    let mut stream = Stream::new(&pipeline, prompt, options)?;
    let gen = GenerationOptions { max_new_tokens: 8, ..GenerationOptions::default() };

    let mut paths: Vec<PathBuf> = std::fs::read_dir(frames)
        .with_context(|| format!("reading {}", frames.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg"))
        .collect();
    paths.sort();
    for path in paths {
        // the camera callback of a real robot: one frame, decoded to RGB
        let frame = pipeline.load_image(&path)?;
        let report = stream.frame(&frame, &gen, &mut Quiet)?;
        act(&path, &report);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop on the default model: three frames (the scene, the scene again, the scene with a
    /// corner changed) are answered in order, the repeated frame encodes no view, the changed
    /// one only some, and every answer reads the scene's number.
    #[test]
    fn the_robot_loop_answers_every_frame_reencoding_only_what_changed() {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::temp_dir().join(format!("glimpse-robot-loop-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let scene = image::open(repo.join("models/images/scene.png")).expect("scene").to_rgb8();
        let mut moved = scene.clone();
        for y in 4..10 {
            for x in 4..10 {
                moved.put_pixel(x, y, image::Rgb([255, 255, 255]));
            }
        }
        for (i, img) in [&scene, &scene, &moved].iter().enumerate() {
            img.save(dir.join(format!("{i:04}.png"))).expect("save frame");
        }
        let mut seen = Vec::new();
        run(&repo.join("models/testbed-smolvlm"), &dir, "What number is written?", Duration::from_secs(60), |p, r| {
            seen.push((p.to_path_buf(), r.update.views, r.update.views_encoded, r.answer.text.clone(), r.deadline_met))
        })
        .expect("the loop runs");
        assert_eq!(seen.len(), 3);
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "frames in name order");
        let (views, first, again, changed) = (seen[0].1, seen[0].2, seen[1].2, seen[2].2);
        assert_eq!(first, views, "the first frame is encoded whole");
        assert_eq!(again, 0, "a repeated frame encodes nothing");
        assert!(changed > 0 && changed < views, "only the corner's views: {changed}/{views}");
        assert!(seen.iter().all(|s| s.3.contains("49")), "{seen:?}");
        assert!(seen.iter().all(|s| s.4.is_some()), "a budget was given, so each frame says whether it met it");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
