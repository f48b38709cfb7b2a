//! `glimpse watch` end to end on the default model: JSON lines per frame with what was reused,
//! a scored scene sequence (`--expect`), and a video decoded by ffmpeg answering as its frames
//! do (ffmpeg is installed by `.ci/run`; that test is in the `venv-tests` feature with the
//! others that need `.ci/run`'s installs).

#[cfg(feature = "venv-tests")]
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn glimpse() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_glimpse"));
    c.current_dir(repo());
    c
}

const Q: &str = "What number is written?";

/// A temporary folder with frames 0000.png.. : the scene, the scene again, the scene with a
/// white square in its top-left corner, and the scene again.
fn frames(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("glimpse-watch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let scene = image::open(repo().join("models/images/scene.png")).expect("scene").to_rgb8();
    let mut moved = scene.clone();
    for y in 4..10 {
        for x in 4..10 {
            moved.put_pixel(x, y, image::Rgb([255, 255, 255]));
        }
    }
    for (i, img) in [&scene, &scene, &moved, &scene].iter().enumerate() {
        img.save(dir.join(format!("{i:04}.png"))).expect("save frame");
    }
    dir
}

/// Runs `glimpse watch ARGS`, returning the frame lines and the summary.
fn watch(args: &[&str]) -> (Vec<Value>, Value) {
    let out = glimpse().arg("watch").args(args).output().expect("run glimpse watch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "glimpse watch failed: {stderr}");
    let mut lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let summary = lines.pop().expect("a summary line");
    (lines, summary["summary"].clone())
}

#[test]
fn watch_reencodes_only_what_changed_and_reports_it_per_frame() {
    let dir = frames("reuse");
    let d = dir.to_str().expect("path");
    let (lines, summary) = watch(&["--frames", d, "--prompt", Q, "--max-new-tokens", "4"]);
    assert_eq!(lines.len(), 4);
    let views = lines[0]["views"].as_u64().expect("views");
    let enc: Vec<u64> = lines.iter().map(|l| l["views_encoded"].as_u64().expect("views_encoded")).collect();
    assert_eq!(enc[0], views);
    assert_eq!(enc[1], 0, "an identical frame encodes nothing");
    assert!(enc[2] > 0 && enc[2] < views, "the corner's views only: {enc:?}");
    assert_eq!(enc[3], enc[2]);
    assert!(lines[1]["kv_tokens_reused"].as_u64() > Some(0));
    // every frame answers as `glimpse watch --reuse none` (a fresh encode and prefill) does
    let (fresh, fresh_summary) = watch(&["--frames", d, "--prompt", Q, "--max-new-tokens", "4", "--reuse", "none"]);
    for (a, b) in lines.iter().zip(&fresh) {
        assert_eq!(a["answer"], b["answer"], "{a}\n{b}");
        assert_eq!(b["views_encoded"].as_u64(), Some(views));
    }
    assert_eq!(summary["frames"], 4);
    assert_eq!(summary["views_encoded"].as_u64(), Some(enc.iter().sum::<u64>()));
    assert_eq!(fresh_summary["kv_tokens_reused"], 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn watch_scores_a_scene_sequence() {
    let dir = frames("expect");
    let seq = dir.join("sequence.jsonl");
    let mut text = String::new();
    for i in 0..4 {
        text.push_str(&format!(
            "{{\"frame\": \"{i:04}.png\", \"index\": {i}, \"prompt\": \"{Q}\", \"answer\": \"49\"}}\n"
        ));
    }
    for i in 0..2 {
        text.push_str(&format!(
            "{{\"frame\": \"{i:04}.png\", \"index\": {i}, \"prompt\": \"How many circles are there?\", \"answer\": \"one\"}}\n"
        ));
    }
    std::fs::write(&seq, text).expect("write sequence");
    let (lines, summary) = watch(&["--expect", seq.to_str().expect("path"), "--max-new-tokens", "4"]);
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[4]["prompt"], "How many circles are there?");
    assert_eq!(lines[4]["frame"], 0, "each prompt is its own stream");
    let correct = lines.iter().filter(|l| l["correct"] == true).count() as u64;
    assert_eq!(summary["accuracy"]["total"], 6);
    assert_eq!(summary["accuracy"]["correct"].as_u64(), Some(correct));
    assert!(lines[..4].iter().all(|l| l["correct"] == true), "the scene's number is 49: {lines:?}");
    // a bad line names the file and line
    std::fs::write(&seq, "{\"frame\": 3}\n").expect("write");
    let out = glimpse().args(["watch", "--expect"]).arg(&seq).output().expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sequence.jsonl line 1"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn watch_errors_name_what_is_wrong() {
    let out = glimpse().args(["watch", "--prompt", Q, "--frames", "/nonexistent-frames"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-frames"));
    let out = glimpse().args(["watch", "--prompt", Q, "--video", "/nonexistent.mp4"]).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.mp4 is not a file"));
    let out = glimpse()
        .args(["watch", "--prompt", Q, "--frames", "models/images", "--change-threshold", "nan"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("change threshold"));
}

/// Encodes `dir`'s frames losslessly (FFV1 in Matroska) with ffmpeg.
#[cfg(feature = "venv-tests")]
fn video_of(dir: &Path) -> PathBuf {
    let video = dir.join("clip.mkv");
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y", "-framerate", "2", "-i"])
        .arg(dir.join("%04d.png"))
        .args(["-c:v", "ffv1", "-pix_fmt", "bgr0"])
        .arg(&video)
        .status()
        .expect("ffmpeg is needed for this test (.ci/run installs it: apt-get install ffmpeg)");
    assert!(status.success(), "ffmpeg could not write the test video");
    video
}

#[cfg(feature = "venv-tests")]
#[test]
fn a_video_through_ffmpeg_answers_as_its_frames_do() {
    let dir = frames("video");
    let video = video_of(&dir);
    let d = dir.to_str().expect("path");
    let (from_frames, _) = watch(&["--frames", d, "--prompt", Q, "--max-new-tokens", "4"]);
    let (from_video, summary) =
        watch(&["--video", video.to_str().expect("path"), "--prompt", Q, "--max-new-tokens", "4"]);
    assert_eq!(from_video.len(), 4);
    for (a, b) in from_frames.iter().zip(&from_video) {
        assert_eq!(a["answer"], b["answer"]);
        assert_eq!(a["views_encoded"], b["views_encoded"], "lossless frames change exactly as the PNGs do");
    }
    assert_eq!(from_video[1]["source"], "frame 1");
    assert_eq!(summary["frames"], 4);
    let (two, _) = watch(&["--video", video.to_str().expect("path"), "--prompt", Q, "--max-frames", "2"]);
    assert_eq!(two.len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}
