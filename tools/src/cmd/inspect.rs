//! `glimpse inspect`: what a model folder holds, without running it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use glimpse_runtime::onnx_info::describe;
use glimpse_runtime::{family, text::TextTokenizer, ModelFolder, Part};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder in the Hugging Face / onnx-community layout, or a compressor folder
    /// (`compressor.json`).
    #[arg(long, default_value = super::DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.model.join(glimpse_runtime::compress::MANIFEST).exists() {
        return inspect_compressor(&args);
    }
    let folder = ModelFolder::open(&args.model).with_context(|| format!("opening {}", args.model.display()))?;
    let tokenizer = TextTokenizer::load(&folder)?;
    let fam = family::for_folder(&folder, &tokenizer)?;
    let (context, _) = folder.context_length()?;
    let mut parts = Vec::new();
    // what would stop the folder from loading, found without loading it
    let mut problems: Vec<String> = Vec::new();
    for part in Part::ALL {
        // a variant that exists but is no regular file (directory, FIFO, broken or looping link)
        for dtype in glimpse_runtime::Dtype::ALL {
            let path = folder.part_file(part, dtype);
            if std::fs::symlink_metadata(&path).is_ok() && !path.is_file() {
                if let Err(e) = folder.part_path(part, dtype) {
                    problems.push(e.to_string());
                }
            }
        }
        let mut variants = Vec::new();
        for dtype in folder.variants(part) {
            let path = folder.part_file(part, dtype);
            let summary = describe(&path, &folder.root).with_context(|| format!("reading {}", path.display()))?;
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if part == Part::VisionEncoder {
                if let Err(e) = fam.check_encoder(&summary.outputs) {
                    problems.push(format!("{} ({}): {e}", part.stem(), dtype.name()));
                }
            }
            variants.push(serde_json::json!({
                "dtype": dtype.name(),
                "file": path.strip_prefix(&folder.root).unwrap_or(&path),
                "bytes": bytes,
                "summary": summary,
            }));
        }
        parts.push(serde_json::json!({ "part": part.stem(), "variants": variants }));
    }
    // pruning signals the manifest names, described by the signal registry
    let signals: Vec<serde_json::Value> = folder
        .manifest
        .signals
        .iter()
        .map(|(name, output)| {
            let what = glimpse_runtime::select::signals::spec(name).map_or("unknown signal", |s| s.summary);
            serde_json::json!({"signal": name, "output": output, "what": what})
        })
        .collect();
    let report = serde_json::json!({
        "model": folder.root,
        "model_type": folder.model_type()?,
        "family": fam.name(),
        "image_token_id": fam.image_token_id(),
        "context_length": context,
        "eos_token_ids": folder.eos_token_ids(),
        "chat_template": tokenizer.has_chat_template(),
        "parts": parts,
        "signals": signals,
        "problems": problems,
    });
    if args.json {
        out!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    out!("model        {}", folder.root.display());
    out!("model_type   {} (family {})", folder.model_type()?, fam.name());
    out!("context      {context} tokens; image token id {}; eos {:?}", fam.image_token_id(), folder.eos_token_ids());
    out!("chat template {}", if tokenizer.has_chat_template() { "yes" } else { "no (family fallback)" });
    for s in &signals {
        out!(
            "signal       {} from output {}: {}",
            s["signal"].as_str().unwrap_or_default(),
            s["output"].as_str().unwrap_or_default(),
            s["what"].as_str().unwrap_or_default()
        );
    }
    for p in &problems {
        out!("problem      {p}");
    }
    for part in &parts {
        let name = part["part"].as_str().unwrap_or_default();
        let variants = part["variants"].as_array().cloned().unwrap_or_default();
        if variants.is_empty() {
            out!("\n{name}: MISSING");
            continue;
        }
        for v in variants {
            let s = &v["summary"];
            out!(
                "\n{name} [{}] {} ({:.2} MB, {} parameters)",
                v["dtype"].as_str().unwrap_or_default(),
                v["file"].as_str().unwrap_or_default(),
                v["bytes"].as_f64().unwrap_or(0.0) / 1e6,
                s["parameters"]
            );
            for (label, key) in [("in ", "inputs"), ("out", "outputs")] {
                for io in s[key].as_array().into_iter().flatten() {
                    out!("  {label} {}", io.as_str().unwrap_or_default());
                }
            }
        }
    }
    Ok(())
}

/// A compressor folder (`compressor.json`): its manifest, tokenizer and classifier, checked as
/// loading would check them.
fn inspect_compressor(args: &Args) -> Result<()> {
    use glimpse_runtime::compress::{load_tokenizer, CompressorManifest};
    let dir = &args.model;
    let manifest = CompressorManifest::load(dir).with_context(|| format!("opening {}", dir.display()))?;
    let tokenizer = load_tokenizer(dir, &manifest)?;
    let onnx = dir.join(&manifest.onnx);
    let summary = describe(&onnx, dir).with_context(|| format!("reading {}", onnx.display()))?;
    let bytes = std::fs::metadata(&onnx).map(|m| m.len()).unwrap_or(0);
    let report = serde_json::json!({
        "compressor": dir,
        "role": manifest.role,
        "kind": manifest.kind,
        "vocab_size": tokenizer.get_vocab_size(true),
        "max_seq_len": manifest.max_seq_len,
        "word_rule": manifest.llmlingua.word_rule,
        "onnx": {"file": manifest.onnx, "bytes": bytes, "summary": summary},
    });
    if args.json {
        out!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    out!("compressor   {}", dir.display());
    out!("role         {} ({}): shortens the text prompt; image tokens untouched", manifest.role, manifest.kind);
    out!(
        "tokenizer    {} tokens, {} words; rows of at most {}",
        tokenizer.get_vocab_size(true),
        manifest.llmlingua.word_rule,
        manifest.max_seq_len
    );
    let s = &report["onnx"]["summary"];
    out!("\nclassifier {} ({:.2} MB, {} parameters)", manifest.onnx, bytes as f64 / 1e6, s["parameters"]);
    for (label, key) in [("in ", "inputs"), ("out", "outputs")] {
        for io in s[key].as_array().into_iter().flatten() {
            out!("  {label} {}", io.as_str().unwrap_or_default());
        }
    }
    Ok(())
}
