//! Compressor models: a second kind of model folder that shortens a request before the VLM sees
//! it. A compressor folder holds its ONNX file, `compressor.json` (role, kind, I/O names, what it
//! was trained for), its `tokenizer.json` and `export_info.json`; `tools/export`'s
//! `export-compressor` writes them. The first kind is LLMLingua-2 prompt compression
//! ([`llmlingua2`]): a token classifier whose keep probabilities decide which words of the text
//! prompt survive; visual tokens are untouched.

pub mod llmlingua2;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

pub use llmlingua2::{CompressOptions, Compressed, PromptCompressor};

/// The manifest file of a compressor folder.
pub const MANIFEST: &str = "compressor.json";

/// `compressor.json`, typed. Unknown fields are ignored (newer exporters may add some).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct CompressorManifest {
    pub manifest_version: u32,
    /// What the compressor acts on: `prompt` (text) now, `visual` later.
    pub role: String,
    /// The algorithm that reads the model's output: `llmlingua2`.
    pub kind: String,
    /// The ONNX file, relative to the folder.
    pub onnx: String,
    /// The tokenizer file, relative to the folder.
    #[serde(default = "default_tokenizer")]
    pub tokenizer: String,
    /// Rows the model takes at most, special tokens included.
    pub max_seq_len: usize,
    /// The model's vocabulary: must equal the tokenizer's.
    pub vocab_size: usize,
    /// Index of the "keep" class in the logits' last axis.
    pub keep_label: usize,
    /// The LLMLingua-2 reference's conventions for this tokenizer.
    pub llmlingua: LinguaConventions,
}

fn default_tokenizer() -> String {
    "tokenizer.json".into()
}

/// How llmlingua's LLMLingua-2 path treats this model's tokens (recorded by the export from the
/// reference package; tools/export/glimpse_export/compressor/ALGORITHM.md).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct LinguaConventions {
    /// `sentencepiece` (XLM-RoBERTa, words start with `▁`) or `wordpiece` (BERT, continuations
    /// start with `##`).
    pub word_rule: String,
    /// The row's start, end and padding tokens as the reference feeds them.
    pub dataset_tokens: BTreeMap<String, DatasetToken>,
    /// Tokens that are not words (special tokens).
    pub skip_tokens: Vec<String>,
    /// Placeholder tokens for force tokens that are not one token (`[NEW{i}]`).
    pub force_token_names: ForceTokenNames,
    /// Tokens a chunk may end at.
    pub chunk_end_tokens: Vec<String>,
}

/// One of the row tokens the reference adds (`[CLS]`, `[SEP]`, `[PAD]`).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct DatasetToken {
    pub token: String,
    pub id: i64,
}

/// `[NEW{i}]` placeholders: their format and how many the tokenizer holds.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct ForceTokenNames {
    pub format: String,
    pub count: usize,
}

impl CompressorManifest {
    /// Reads and checks `DIR/compressor.json`: its role and kind must be ones Glimpse runs, and
    /// the files it names must be in the folder.
    pub fn load(dir: &Path) -> Result<CompressorManifest> {
        let path = dir.join(MANIFEST);
        if !path.is_file() {
            return Err(Error::MissingFile { path, what: "compressor manifest (is this a compressor folder?)".into() });
        }
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let m: CompressorManifest =
            serde_json::from_str(&text).map_err(|source| Error::Json { path: path.clone(), source })?;
        if m.role != "prompt" {
            return Err(Error::field(
                &path,
                "role",
                format!("{:?}: Glimpse runs prompt compressors (`prompt`)", m.role),
            ));
        }
        if m.kind != "llmlingua2" {
            return Err(Error::field(
                &path,
                "kind",
                format!("{:?}: the prompt compressor kinds are `llmlingua2`", m.kind),
            ));
        }
        if !matches!(m.llmlingua.word_rule.as_str(), "sentencepiece" | "wordpiece") {
            return Err(Error::field(
                &path,
                "llmlingua.word_rule",
                format!("{:?}: expected `sentencepiece` or `wordpiece`", m.llmlingua.word_rule),
            ));
        }
        for key in ["cls", "sep"] {
            if !m.llmlingua.dataset_tokens.contains_key(key) {
                return Err(Error::field(&path, format!("llmlingua.dataset_tokens.{key}"), "missing"));
            }
        }
        if m.max_seq_len < 3 {
            return Err(Error::field(&path, "max_seq_len", format!("{} leaves no room for text", m.max_seq_len)));
        }
        if m.keep_label > 1 {
            return Err(Error::field(&path, "keep_label", format!("{}: the classifier has two labels", m.keep_label)));
        }
        for (field, file) in [("onnx", &m.onnx), ("tokenizer", &m.tokenizer)] {
            let p =
                confined(dir, file).ok_or_else(|| Error::field(&path, field, format!("{file:?} leaves the folder")))?;
            if !p.is_file() {
                return Err(Error::MissingFile { path: p, what: format!("the {field} file compressor.json names") });
            }
        }
        Ok(m)
    }
}

/// Loads the folder's tokenizer and checks that its vocabulary is the model's (`vocab_size`): a
/// tokenizer from another model would feed the classifier ids it was not trained on.
pub fn load_tokenizer(dir: &Path, manifest: &CompressorManifest) -> Result<tokenizers::Tokenizer> {
    let mpath = dir.join(MANIFEST);
    let tpath = dir.join(&manifest.tokenizer);
    let tokenizer = crate::text::read_tokenizer(&tpath)?;
    let vocab = tokenizer.get_vocab_size(true);
    if vocab != manifest.vocab_size {
        return Err(Error::field(
            &mpath,
            "vocab_size",
            format!("{} but {} has {vocab} tokens: not this model's tokenizer", manifest.vocab_size, tpath.display()),
        ));
    }
    Ok(tokenizer)
}

/// `dir/rel` when `rel` is a plain relative path inside the folder.
fn confined(dir: &Path, rel: &str) -> Option<PathBuf> {
    let p = Path::new(rel);
    let plain = p.components().all(|c| matches!(c, std::path::Component::Normal(_)));
    plain.then(|| dir.join(p))
}
