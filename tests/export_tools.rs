//! The Python export tools are tested too: re-export a tiny model with transformers and check
//! it against the committed fixtures (`python -m glimpse_export check`). Needs the venv that
//! `.ci/run` creates from `tools/export/requirements.txt` (or `GLIMPSE_PYTHON` pointing at a
//! Python with those packages); without it this test fails and says how to create it.

mod common;

use std::process::Command;

use common::*;

fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("GLIMPSE_PYTHON") {
        return p.into();
    }
    let venv = repo().join(".venv/bin/python");
    assert!(
        venv.is_file(),
        "{} missing: create it with `python3 -m venv .venv && .venv/bin/pip install -r tools/export/requirements.txt` (or run `bash .ci/run`), or set GLIMPSE_PYTHON",
        venv.display()
    );
    venv
}

#[test]
fn reexported_tiny_model_matches_committed_fixtures() {
    let out = Command::new(python())
        .args(["-m", "glimpse_export", "check", "--model"])
        .arg(model("tiny-smolvlm"))
        .current_dir(repo().join("tools/export"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(out.status.success(), "glimpse_export check failed:\n{stdout}\n{stderr}");
}
