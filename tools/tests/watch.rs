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

/// `--max-latency MS` on the CLI: a 1 ms budget cannot fit any encoding, so the first frame is
/// encoded whole (nothing is cached), the changed frame defers its changed views and says it
/// missed its deadline, and the summary records the budget.
#[test]
fn watch_max_latency_defers_what_does_not_fit() {
    let dir = frames("latency");
    let d = dir.to_str().expect("path");
    let (lines, summary) = watch(&["--frames", d, "--prompt", Q, "--max-new-tokens", "2", "--max-latency", "1"]);
    assert_eq!(lines.len(), 4);
    let views = lines[0]["views"].as_u64().expect("views");
    assert_eq!(lines[0]["views_encoded"].as_u64(), Some(views), "nothing cached yet: {}", lines[0]);
    let changed = &lines[2];
    assert!(changed["views_changed"].as_u64() > Some(0), "{changed}");
    assert_eq!(changed["views_encoded"], 0, "{changed}");
    assert_eq!(changed["views_deferred"], changed["views_changed"], "{changed}");
    assert_eq!(changed["deadline_met"], false, "{changed}");
    assert!(changed["predicted_ttft_ms"].as_f64() > Some(1.0), "{changed}");
    assert_eq!(summary["max_latency_ms"], 1, "{summary}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `watch --serial FILE`: every frame's answer goes out as one frame of the documented format
/// (glimpse_targets::frame), in order, with sequence numbers from 0. A regular file stands in
/// for the serial device here (the pseudo-terminal case is `serve`'s test in tools/tests/serve.rs).
#[test]
fn watch_writes_each_answer_to_the_serial_line() {
    use glimpse_targets::frame::{Decoder, Kind};
    let dir = frames("serial");
    let line = dir.join("ttyFAKE");
    std::fs::write(&line, b"").expect("create the line");
    let (lines, _) = watch(&[
        "--frames",
        dir.to_str().expect("path"),
        "--prompt",
        Q,
        "--max-new-tokens",
        "4",
        "--serial",
        line.to_str().expect("path"),
    ]);
    let bytes = std::fs::read(&line).expect("read the line");
    let mut decoder = Decoder::default();
    let frames: Vec<_> = bytes.iter().flat_map(|&b| decoder.push(b)).collect();
    assert_eq!(frames.len(), lines.len(), "one frame per answer: {frames:?}");
    for (i, (f, l)) in frames.iter().zip(&lines).enumerate() {
        assert_eq!((f.kind, f.seq as usize), (Kind::Answer as u8, i), "{f:?}");
        assert_eq!(Some(f.text.as_str()), l["answer"].as_str(), "{f:?} vs {l}");
    }
    // a serial line that cannot be opened is named, before the model is loaded
    let out = glimpse()
        .args(["watch", "--prompt", Q, "--frames", "models/images", "--serial", "/nonexistent/ttyS9"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--serial /nonexistent/ttyS9"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// GPIO lines that do not exist are refused with the flag and the chip named, on `watch` and
/// `serve` alike, and a malformed spec says what the form is.
#[cfg(all(feature = "gpio", target_os = "linux"))]
#[test]
fn gpio_flags_name_what_is_wrong() {
    for (cmd, extra) in [("watch", &["--prompt", Q, "--frames", "models/images"][..]), ("serve", &["--port", "0"][..])]
    {
        let out = glimpse().arg(cmd).args(extra).args(["--busy-gpio", "/nonexistent-chip:3"]).output().expect("run");
        assert!(!out.status.success(), "{cmd}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--busy-gpio") && stderr.contains("/nonexistent-chip"), "{cmd}: {stderr}");
        let out = glimpse().arg(cmd).args(extra).args(["--trigger-gpio", "gpiochip0"]).output().expect("run");
        assert!(!out.status.success(), "{cmd}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--trigger-gpio") && stderr.contains("CHIP:LINE"), "{cmd}: {stderr}");
    }
}

/// `tools/export scenestream` end to end: the generator's own checks pass (two runs
/// byte-identical, background bit-exact, every answer valid), `glimpse watch --expect` reads
/// its sequence, the trained testbed answers most frames right, and a frame the generator
/// reports as unchanged encodes no view.
#[cfg(feature = "venv-tests")]
#[test]
fn a_generated_scene_sequence_is_watched_and_scored() {
    let py = repo().join(".venv/bin/python");
    assert!(
        py.is_file(),
        "no venv: `.ci/run` creates it (python3 -m venv .venv; pip install -r tools/export/requirements.txt)"
    );
    let out_dir = std::env::temp_dir().join(format!("glimpse-scenestream-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = Command::new(&py)
        .current_dir(repo().join("tools/export"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["-m", "glimpse_export", "scenestream", "--testbed", "smolvlm", "--frames", "12", "--seed", "9300000"])
        .arg("--out")
        .arg(&out_dir)
        .arg("--check")
        .output()
        .expect("run python -m glimpse_export scenestream");
    assert!(out.status.success(), "scenestream failed: {}", String::from_utf8_lossy(&out.stderr));
    let res: Value = serde_json::from_slice(&out.stdout).expect("scenestream prints JSON");
    assert!(res["check"].as_str().is_some_and(|c| c.starts_with("ok")), "{res}");
    assert_eq!(res["rows"], 48, "{res}");
    let info: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("sequence_info.json")).expect("info"))
        .expect("json");
    let unchanged: Vec<usize> = info["per_frame"]
        .as_array()
        .expect("per_frame")
        .iter()
        .enumerate()
        .filter(|(_, r)| r["changed_pixels"] == 0)
        .map(|(i, _)| i)
        .collect();
    let seq = out_dir.join("sequence.jsonl");
    let (lines, summary) = watch(&["--expect", seq.to_str().expect("path"), "--max-new-tokens", "4"]);
    assert_eq!(lines.len(), 48);
    let (correct, total) = (summary["accuracy"]["correct"].as_u64(), summary["accuracy"]["total"].as_u64());
    assert_eq!(total, Some(48));
    assert!(correct >= Some(36), "the testbed answers at least 75% of the frames: {summary}");
    for l in &lines {
        let frame = l["frame"].as_u64().expect("frame") as usize;
        if unchanged.contains(&frame) {
            assert_eq!(l["views_encoded"], 0, "frame {frame} did not change: {l}");
        }
    }
    assert!(summary["views_encoded"].as_u64() < summary["views"].as_u64(), "views are reused: {summary}");
    let _ = std::fs::remove_dir_all(&out_dir);
}
