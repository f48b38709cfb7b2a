//! The `glimpse` binary end to end on the committed default model.

use std::path::PathBuf;
use std::process::Command;

/// Repository root (this crate lives in `tools/`).
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model(name: &str) -> PathBuf {
    repo().join("models").join(name)
}

const TINY_MODELS: [&str; 2] = ["tiny-smolvlm", "tiny-llava"];

/// The `glimpse` binary cargo built for these tests, run from the repository root.
fn glimpse() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_glimpse"));
    c.current_dir(repo());
    c
}

/// README's first command: the default model (testbed-smolvlm) reads the number in the sample
/// scene (`scenes.py`, seed 900002: "49"; greedy, so the answer is deterministic).
#[test]
fn ask_streams_tokens_and_stats() {
    let out = glimpse()
        .args(["ask", "--image", "models/images/scene.png", "--prompt", "What number is written?"])
        .output()
        .expect("run glimpse");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "glimpse ask failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "49", "{stderr}");
    assert!(stderr.contains("TTFT") && stderr.contains("visual tokens"), "{stderr}");
}

#[test]
fn ask_json_parses_and_accounts_tokens() {
    for name in TINY_MODELS {
        let dir = model(name);
        let out = glimpse()
            .args([
                "ask",
                "--json",
                "--max-new-tokens",
                "5",
                "--prompt",
                "What is in the image?",
                "--image",
                "models/images/wide.png",
                "--model",
            ])
            .arg(&dir)
            .output()
            .expect("run glimpse");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
        let ids = v["token_ids"].as_array().expect("token_ids");
        assert!(ids.len() <= 5);
        assert_eq!(v["stats"]["new_tokens"].as_u64(), Some(ids.len() as u64));
        assert!(v["stats"]["visual_tokens"].as_u64().unwrap_or(0) > 0);
        for stage in ["preprocess", "encode", "select", "splice", "prefill", "decode"] {
            assert!(v["stats"]["times"][stage].as_f64().is_some(), "{name}: stage {stage} missing");
        }
        assert!(v["answer"].is_string());
    }
}

/// `ask --prompt-compressor`: the long prompt reaching the model is the compressor's output
/// (fewer text tokens, reported with the compressor's time), and a folder that is not a
/// compressor is refused by name.
#[test]
fn ask_compresses_the_prompt_with_a_compressor_folder() {
    let prompt = "Please look at the picture carefully, think about every object in it, and then tell me, \
                  in one word only, what number is written in the middle of the scene?";
    let out = glimpse()
        .args(["ask", "--json", "--max-new-tokens", "3", "--image", "models/images/scene.png", "--prompt", prompt])
        .args(["--prompt-compressor", "models/tiny-lingua-xlmr", "--prompt-rate", "0.5"])
        .output()
        .expect("run glimpse");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let c = &v["stats"]["prompt_compression"];
    let (before, after) = (c["text_tokens_before"].as_u64().unwrap(), c["text_tokens_after"].as_u64().unwrap());
    assert!(after < before && after > 0, "{c}");
    assert!(c["cl100k_tokens_after"].as_u64() < c["cl100k_tokens_before"].as_u64(), "{c}");
    assert!(v["stats"]["times"]["prompt_compress"].as_f64().is_some_and(|ms| ms > 0.0));
    let kept = c["prompt"].as_str().unwrap();
    assert!(!kept.is_empty() && kept.len() < prompt.len());
    // llmlingua's force_tokens / force_reserve_digit: the words they name always survive
    let forced = "Count the 42 shapes near 7 corners, then say: which side is the red one on? Answer in one word.";
    let out = glimpse()
        .args(["ask", "--json", "--max-new-tokens", "2", "--prompt", forced, "--prompt-target-tokens", "6"])
        .args(["--prompt-compressor", "models/tiny-lingua-xlmr", "--prompt-force-tokens", "?,:"])
        .arg("--prompt-force-digits")
        .output()
        .expect("run glimpse");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let kept = v["stats"]["prompt_compression"]["prompt"].as_str().unwrap();
    for w in ["42", "7", "?", ":"] {
        assert!(kept.contains(w), "{w} forced but missing from {kept:?}");
    }
    assert!(kept.len() < forced.len(), "{kept:?}");
    let out = glimpse()
        .args(["ask", "--prompt", "Hi", "--prompt-compressor", "models/tiny-llava"])
        .output()
        .expect("run glimpse");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("compressor.json") && err.contains("tiny-llava"), "{err}");
}

/// `inspect` on a compressor folder describes it (role, vocabulary, the classifier's I/O) and
/// refuses one whose tokenizer is not the model's, naming the field.
#[test]
fn inspect_describes_compressor_folders() {
    let out =
        glimpse().args(["inspect", "--json", "--model", "models/tiny-lingua-bert"]).output().expect("run glimpse");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["role"], "prompt");
    assert_eq!(v["kind"], "llmlingua2");
    assert_eq!(v["word_rule"], "wordpiece");
    let inputs = v["onnx"]["summary"]["inputs"].to_string();
    assert!(inputs.contains("input_ids") && inputs.contains("attention_mask"), "{inputs}");
    let tmp = std::env::temp_dir().join(format!("glimpse-inspect-compressor-{}", std::process::id()));
    std::fs::create_dir_all(tmp.join("onnx")).expect("temp folder");
    std::fs::copy(model("tiny-lingua-bert").join("compressor.json"), tmp.join("compressor.json")).unwrap();
    std::fs::copy(model("tiny-lingua-bert").join("onnx/model.onnx"), tmp.join("onnx/model.onnx")).unwrap();
    // the XLM-R tokenizer in the BERT folder: 526 tokens, not 525
    std::fs::copy(model("tiny-lingua-xlmr").join("tokenizer.json"), tmp.join("tokenizer.json")).unwrap();
    let out = glimpse().args(["inspect", "--model"]).arg(&tmp).output().expect("run glimpse");
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vocab_size") && err.contains("526"), "{err}");
}

#[test]
fn inspect_lists_parts_and_io() {
    let out = glimpse().args(["inspect", "--json", "--model", "models/tiny-llava"]).output().expect("run glimpse");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["family"], "llava");
    let parts = v["parts"].as_array().expect("parts");
    assert_eq!(parts.len(), 3);
    for p in parts {
        let variants = p["variants"].as_array().expect("variants");
        assert_eq!(variants[0]["dtype"], "fp32");
        assert!(variants[0]["summary"]["parameters"].as_u64().unwrap_or(0) > 0);
    }
    let decoder = &parts[2]["variants"][0]["summary"];
    let inputs: Vec<&str> = decoder["inputs"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(inputs.iter().any(|s| s.starts_with("past_key_values.0.key")), "{inputs:?}");
}

#[test]
fn errors_are_reported_not_panics() {
    let out =
        glimpse().args(["ask", "--model", "models/does-not-exist", "--prompt", "hi"]).output().expect("run glimpse");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error:") && stderr.contains("does-not-exist"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_missing_onnx_runtime_library_is_an_error_not_a_panic() {
    let out = glimpse()
        .args(["ask", "--backend", "ort", "--ort-lib", "/nonexistent/libonnxruntime.so", "--prompt", "hi"])
        .env_remove("ORT_DYLIB_PATH")
        .output()
        .expect("run glimpse");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("libonnxruntime not found") && stderr.contains("/nonexistent"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn profile_json_accounts_for_every_stage() {
    let out = glimpse()
        .args(["profile", "--json", "--runs", "5", "--warmup", "1", "--new-tokens", "4", "--prune", "none,dart"])
        .args(["--keep", "1.0,0.5", "--model", "models/tiny-smolvlm", "--image", "models/images/wide.png"])
        .output()
        .expect("run glimpse");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4, "2 methods x 2 keep ratios");
    assert!(v["model_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(v["peak_rss_bytes"].as_u64().unwrap_or(0) > 0);
    for r in rows {
        let stages = &r["stages"];
        for s in [
            "image_decode",
            "preprocess",
            "encode",
            "encode_per_view",
            "select",
            "splice",
            "prefill",
            "ttft",
            "decode",
            "stage_sum",
            "end_to_end",
        ] {
            for k in ["median_ms", "min_ms", "max_ms"] {
                assert!(stages[s][k].as_f64().is_some(), "stage {s} lacks {k}");
            }
            assert!(stages[s]["min_ms"].as_f64() <= stages[s]["max_ms"].as_f64());
        }
        // Stage times add up to the end-to-end time (the rest is prompt rendering and
        // detokenisation) within 5%.
        let gap = r["accounting_gap"].as_f64().expect("gap");
        assert!(gap < 0.05, "stages miss {:.1}% of end to end", gap * 100.0);
        assert_eq!(r["new_tokens"].as_u64(), Some(4), "EOS is ignored while profiling");
        let kept = r["visual_tokens_kept"].as_u64().unwrap();
        let total = r["visual_tokens"].as_u64().unwrap();
        let want = if r["method"] == "dart" && r["keep"] == "0.5" { total / 2 } else { total };
        assert_eq!(kept, want, "{r}");
        assert!(r["efficiency"]["prefill_flops"].as_f64().unwrap_or(0.0) > 0.0);
    }
}

/// A reader that goes away (`glimpse inspect | head -c1`) ends the command quietly; a full disk
/// is an error naming stdout. Neither panics.
#[test]
fn closed_and_full_stdout_are_handled() {
    let tiny = model("tiny-llava");
    let tiny = tiny.to_str().expect("path");
    let set = repo().join("models/testbed-llava/eval");
    let set = set.to_str().expect("path");
    let commands: [&[&str]; 3] = [
        &["inspect", "--model", tiny],
        &["targets"],
        &["eval", "--model", "models/testbed-llava", "--set", set, "--limit", "2"],
    ];
    for args in commands {
        let mut child = glimpse()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{args:?} with a closed pipe: {stderr}");
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
        let out = glimpse().args(args).stdout(full).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(1), "{args:?} on a full disk: {stderr}");
        assert!(stderr.contains("writing to stdout") && stderr.contains("No space left"), "{args:?}: {stderr}");
    }
}

/// Options that would silently do nothing are errors that say what to add; a prompt can come
/// from a file or standard input.
#[test]
fn no_op_options_are_errors_and_prompts_come_from_files() {
    let set = repo().join("models/testbed-llava/eval");
    let set = set.to_str().expect("path");
    // a fixed profile: what is a no-op depends on the profile's own pruning
    let base = ["eval", "--target", "generic", "--model", "models/testbed-llava", "--set", set, "--limit", "1"];
    for (extra, want) in [
        (&["--keep", "0.5"][..], "--prune"),
        (&["--keep", "1.0,0.5,0.25"][..], "--prune"),
        (&["--prune", "dart,bogus"][..], "bogus"),
        (&["--prune", "dart"][..], "--keep"),
        (&["--threads", "100000"][..], "logical CPUs"),
        (&["--fast", "--region-scope", "per-view"][..], "--region-scope"),
        (&["--merge-method", "transform"][..], "--merge-method"),
    ] {
        let out = glimpse().args(base).args(extra).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} should fail");
        assert!(stderr.contains(want) && !stderr.contains("panicked"), "{extra:?}: {stderr}");
    }
    // one method with its budget settles (the first budget below 1 for a method other than none),
    // and the encoder-side flags and the preset run through eval
    for extra in [
        &["--prune", "dart", "--keep", "0.25"][..],
        &["--prune", "dart,none", "--keep", "1,0.25"][..],
        &["--fast"][..],
        &["--regions", "0.5", "--merge", "0,0.25"][..],
    ] {
        let out = glimpse().args(base).args(extra).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {stderr}");
    }
    let mut child = glimpse()
        .args([
            "ask",
            "--target",
            "generic",
            "--backend",
            "tract",
            "--image",
            "models/images/scene.png",
            "--prompt-file",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"What number is written?").expect("write prompt");
    }
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "49");
}

/// `quantize` checks its input files itself: a zero-byte part is a message, not a traceback.
#[test]
fn quantize_refuses_an_empty_part_with_a_message() {
    let tmp = tempfile_dir("quantize");
    let dir = tmp.join("tiny-llava");
    copy_dir(&model("tiny-llava"), &dir);
    std::fs::write(dir.join("onnx/embed_tokens.onnx"), b"").expect("truncate");
    let out = glimpse().args(["quantize", "--to", "int8", "--model"]).arg(&dir).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("embed_tokens.onnx") && stderr.contains("empty") && !stderr.contains("Traceback"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A fresh folder for one test (tests run in parallel threads of one process).
fn tempfile_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("glimpse-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp");
    d
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

/// `inspect` reports a LLaVA-OneVision folder that cannot supply `image_newline` (neither an
/// encoder output nor config.json), which loading would refuse.
#[test]
fn inspect_reports_a_folder_that_cannot_load() {
    let tmp = tempfile_dir("inspect");
    let dir = tmp.join("ov");
    copy_dir(&model("compat/llava-onevision-no-newline"), &dir);
    let out = glimpse().args(["inspect", "--json", "--model"]).arg(&dir).output().expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "config.json supplies it: {v}");
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("image_newline");
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    let out = glimpse().args(["inspect", "--json", "--model"]).arg(&dir).output().expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let problems = v["problems"].as_array().cloned().unwrap_or_default();
    assert!(problems.iter().any(|p| p.as_str().is_some_and(|s| s.contains("image_newline"))), "{v}");
    // a part variant that is a directory is listed too, not left out silently
    std::fs::create_dir(dir.join("onnx/decoder_model_merged_fp16.onnx")).unwrap();
    let out = glimpse().args(["inspect", "--json", "--model"]).arg(&dir).output().expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let problems = v["problems"].as_array().cloned().unwrap_or_default();
    assert!(problems.iter().any(|p| p.as_str().is_some_and(|s| s.contains("directory"))), "{v}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `--max-memory` takes units and refuses what it cannot parse.
#[test]
fn max_memory_takes_units() {
    let run = |v: &str| {
        glimpse()
            .args(["ask", "--model", "models/tiny-llava", "--prompt", "hi", "--max-memory", v])
            .output()
            .expect("run")
    };
    let out = run("100K");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--max-memory allows 102400"), "{stderr}");
    assert!(run("1G").status.success());
    let out = run("1.5Q");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
}

/// `--help` shows every registered method with where it acts, what it reads and its knobs, and
/// every backend with its options; `inspect` describes the manifest's signals.
#[test]
fn registries_drive_help_and_inspect() {
    let out = glimpse().args(["ask", "--help"]).output().expect("run");
    let help = String::from_utf8_lossy(&out.stdout);
    for want in ["recoverable:", "globalcom2:", "after the encoder", "reads text", "knobs: lambda", "options: threads"]
    {
        assert!(help.contains(want), "{want} missing from ask --help");
    }
    // the encoder-side registry, on every command that reduces tokens
    for command in ["ask", "eval", "profile"] {
        let out = glimpse().args([command, "--help"]).output().expect("run");
        let help = String::from_utf8_lossy(&out.stdout);
        for want in
            ["--tiles", "tiles:", "--regions", "regions:", "--merge", "tome:", "transform:", "inside the encoder"]
        {
            assert!(help.contains(want), "{want} missing from {command} --help");
        }
    }
    let out = glimpse().args(["inspect", "--json", "--model", "models/testbed-llava"]).output().expect("run");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let signals = v["signals"].as_array().expect("signals");
    assert_eq!(signals.len(), 3, "{v}");
    assert!(signals.iter().all(|s| s["what"].as_str().is_some_and(|w| w != "unknown signal")), "{v}");
}

/// `eval` and `profile` take the same `--prompt-compressor` flags as `ask`: eval reports the
/// questions' text tokens before and after and the stage's mean time; profile times the
/// `prompt_compress` stage inside TTFT and the prompt reaching the model is shorter.
#[test]
fn eval_and_profile_run_the_prompt_compressor() {
    let set = repo().join("models/testbed-llava/eval");
    let set = set.to_str().expect("path");
    let out = glimpse()
        .args(["eval", "--json", "--model", "models/testbed-llava", "--set", set, "--limit", "3"])
        .args(["--prompt-compressor", "models/tiny-lingua-bert", "--prompt-rate", "0.6"])
        .output()
        .expect("run glimpse");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let report = &v["runs"][0]["report"];
    let tokens = report["mean_prompt_text_tokens"].as_array().expect("mean_prompt_text_tokens");
    assert!(tokens[1].as_f64() < tokens[0].as_f64(), "{report}");
    assert!(report["mean_stage_ms"]["prompt_compress"].as_f64().is_some_and(|ms| ms > 0.0), "{report}");
    let long = std::env::temp_dir().join(format!("glimpse-cli-{}-long-prompt.txt", std::process::id()));
    let text =
        "The robot arm should pick up the red cube next to the blue bowl, then place it on the shelf. ".repeat(6);
    std::fs::write(&long, &text).expect("write prompt");
    let profile = |extra: &[&str]| -> serde_json::Value {
        let out = glimpse()
            .args(["profile", "--json", "--runs", "1", "--warmup", "0", "--new-tokens", "2"])
            .args(["--model", "models/tiny-smolvlm", "--image", "models/images/wide.png", "--prompt-file"])
            .arg(&long)
            .args(extra)
            .output()
            .expect("run glimpse");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("valid JSON")
    };
    let plain = profile(&[]);
    let compressed = profile(&["--prompt-compressor", "models/tiny-lingua-xlmr", "--prompt-rate", "0.5"]);
    let _ = std::fs::remove_file(&long);
    let (p, c) = (&plain["rows"][0], &compressed["rows"][0]);
    assert!(c["prompt_tokens"].as_u64() < p["prompt_tokens"].as_u64(), "{p} {c}");
    let stage = |r: &serde_json::Value, s: &str| r["stages"][s]["median_ms"].as_f64().unwrap_or(-1.0);
    assert!(stage(c, "prompt_compress") > 0.0 && stage(c, "ttft") >= stage(c, "prompt_compress"), "{c}");
    assert_eq!(stage(p, "prompt_compress"), 0.0, "{p}");
    assert!(p["prompt_compression"].is_null());
    let pc = &c["prompt_compression"];
    assert!(pc["text_tokens_after"].as_u64() < pc["text_tokens_before"].as_u64(), "{pc}");
    let placement = compressed["placement"].as_object().expect("placement");
    assert!(placement.values().all(|b| b["prompt_compressor"].is_object()), "{placement:?}");
}
