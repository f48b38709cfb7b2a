//! The `glimpse` binary end to end on the committed default model.

mod common;

use std::process::Command;

use common::*;

fn glimpse() -> Command {
    // The binary lives in the workspace target dir next to this test's own executable.
    let mut exe = std::env::current_exe().expect("test exe");
    exe.pop();
    if exe.ends_with("deps") {
        exe.pop();
    }
    let bin = exe.join(format!("glimpse{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "{} not built: run `cargo test --workspace` (builds every binary)", bin.display());
    let mut c = Command::new(bin);
    c.current_dir(repo());
    c
}

#[test]
fn ask_streams_tokens_and_stats() {
    let out = glimpse()
        .args([
            "ask",
            "--image",
            "models/images/small.png",
            "--prompt",
            "What is in the image?",
            "--max-new-tokens",
            "8",
        ])
        .output()
        .expect("run glimpse");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "glimpse ask failed: {stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty(), "no answer printed");
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
