//! Model folders in the Hugging Face / onnx-community layout: `config.json`,
//! `preprocessor_config.json`, `tokenizer.json`, `generation_config.json` and
//! `onnx/<part><suffix>.onnx`, plus the external-data safety check that every backend relies on.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

use crate::error::{Error, Result};

pub use glimpse_targets::Part;

/// Weight/compute dtype variant of an ONNX file, chosen by its file-name suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// No suffix: fp32 export.
    Fp32,
    /// `_fp16`: fp16 weights and compute, fp32 I/O.
    Fp16,
    /// `_int8`: dynamic int8 quantization.
    Int8,
    /// `_uint8`: dynamic uint8 quantization.
    Uint8,
    /// `_quantized`: dynamic quantization (transformers.js default).
    Quantized,
    /// `_q4`: 4-bit MatMulNBits, block 32.
    Q4,
    /// `_q4f16`: q4 then fp16.
    Q4f16,
    /// `_bnb4`: NF4 (listed so folders that have it are described; tract cannot run it).
    Bnb4,
}

impl Dtype {
    /// Every dtype, in the order `glimpse inspect` lists them.
    pub const ALL: [Dtype; 8] =
        [Dtype::Fp32, Dtype::Fp16, Dtype::Int8, Dtype::Uint8, Dtype::Quantized, Dtype::Q4, Dtype::Q4f16, Dtype::Bnb4];

    /// The file-name suffix before `.onnx`.
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::Fp32 => "",
            Dtype::Fp16 => "_fp16",
            Dtype::Int8 => "_int8",
            Dtype::Uint8 => "_uint8",
            Dtype::Quantized => "_quantized",
            Dtype::Q4 => "_q4",
            Dtype::Q4f16 => "_q4f16",
            Dtype::Bnb4 => "_bnb4",
        }
    }

    /// The name users type (`--dtype`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Fp16 => "fp16",
            Dtype::Int8 => "int8",
            Dtype::Uint8 => "uint8",
            Dtype::Quantized => "quantized",
            Dtype::Q4 => "q4",
            Dtype::Q4f16 => "q4f16",
            Dtype::Bnb4 => "bnb4",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Dtype::ALL.into_iter().find(|d| d.name() == s.to_ascii_lowercase()).ok_or_else(|| {
            let names: Vec<_> = Dtype::ALL.iter().map(|d| d.name()).collect();
            Error::invalid("dtype", s, format!("expected one of {}", names.join(", ")))
        })
    }
}

/// An opened model folder: the parsed JSON files and the ONNX files present.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    /// Folder root (canonicalised).
    pub root: PathBuf,
    /// `config.json`.
    pub config: Value,
    /// The image processor's settings: `preprocessor_config.json`, or (transformers v5
    /// `processor.save_pretrained`) the `image_processor` object of `processor_config.json`.
    pub preprocessor: Value,
    /// The file [`ModelFolder::preprocessor`] came from (named in errors).
    pub preprocessor_file: PathBuf,
    /// `generation_config.json`, or an empty object when the folder has none.
    pub generation: Value,
    /// `tokenizer_config.json`, or an empty object when the folder has none.
    pub tokenizer_config: Value,
    /// `processor_config.json`, or an empty object when the folder has none.
    pub processor: Value,
    /// `glimpse.json`, or the default three-part manifest when the folder has none.
    pub manifest: crate::manifest::Manifest,
}

impl ModelFolder {
    /// Opens a model folder, reading every JSON file it needs. Missing required files are
    /// reported by name.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        if !root.is_dir() {
            return Err(Error::MissingFile { path: root.to_path_buf(), what: "model folder".into() });
        }
        let root = root.canonicalize().map_err(|source| Error::Io { path: root.to_path_buf(), source })?;
        let config = read_json(&root.join("config.json"), true)?;
        let generation = read_json(&root.join("generation_config.json"), false)?;
        let tokenizer_config = read_json(&root.join("tokenizer_config.json"), false)?;
        let processor = read_json(&root.join("processor_config.json"), false)?;
        let (preprocessor, preprocessor_file) = image_processor_settings(&root, &processor)?;
        let tokenizer = root.join("tokenizer.json");
        if !tokenizer.is_file() {
            return Err(Error::MissingFile { path: tokenizer, what: "tokenizer".into() });
        }
        let manifest = crate::manifest::Manifest::load(&root)?;
        Ok(ModelFolder {
            root,
            config,
            preprocessor,
            preprocessor_file,
            generation,
            tokenizer_config,
            processor,
            manifest,
        })
    }

    /// Path of a file in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// `config.json`'s `model_type`.
    pub fn model_type(&self) -> Result<&str> {
        self.config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::field(self.path("config.json"), "model_type", "missing or not a string"))
    }

    /// The file a part would have for a dtype (whether or not it exists).
    pub fn part_file(&self, part: Part, dtype: Dtype) -> PathBuf {
        self.root.join("onnx").join(format!("{}{}.onnx", self.manifest.stem(part), dtype.suffix()))
    }

    /// The file of a vision stage (`vision_blocks_0`) for a dtype, whether or not it exists.
    pub fn stage_file(&self, stem: &str, dtype: Dtype) -> PathBuf {
        self.root.join("onnx").join(format!("{stem}{}.onnx", dtype.suffix()))
    }

    /// The dtype variants present for a part.
    pub fn variants(&self, part: Part) -> Vec<Dtype> {
        Dtype::ALL.into_iter().filter(|&d| self.part_file(part, d).is_file()).collect()
    }

    /// The path of a part's variant, or an error listing the variants present.
    pub fn part_path(&self, part: Part, dtype: Dtype) -> Result<PathBuf> {
        let path = self.part_file(part, dtype);
        if path.is_file() {
            return Ok(path);
        }
        // present but not a file: a directory, a FIFO, a dangling or looping symlink
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            let kind = match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => "a directory".to_string(),
                Ok(_) => "not a regular file (a device or pipe)".to_string(),
                Err(e) if meta.file_type().is_symlink() => format!("a symbolic link that does not resolve ({e})"),
                Err(e) => e.to_string(),
            };
            return Err(Error::MissingFile { path, what: format!("ONNX part {part} as a regular file: it is {kind}") });
        }
        let available = self.variants(part);
        if available.is_empty() {
            return Err(Error::MissingFile { path, what: format!("ONNX part {part}") });
        }
        Err(Error::MissingVariant {
            path,
            part: part.to_string(),
            dtype: dtype.to_string(),
            available: available.iter().map(|d| d.name()).collect::<Vec<_>>().join(", "),
        })
    }

    /// Reads a field by dotted path (`text_config.max_position_embeddings`) from `config.json`.
    pub fn config_field(&self, dotted: &str) -> Option<&Value> {
        lookup(&self.config, dotted)
    }

    /// A string setting from `config.json` by dotted path; `None` when absent or not a string.
    pub fn config_str(&self, dotted: &str) -> Option<&str> {
        self.config_field(dotted).and_then(Value::as_str)
    }

    /// A required unsigned integer from `config.json`, trying several dotted paths in order.
    pub fn config_usize(&self, paths: &[&str]) -> Result<usize> {
        json_usize(&self.config, &self.path("config.json"), paths)
    }

    /// A required unsigned integer from the image processor's settings.
    pub fn preprocessor_usize(&self, paths: &[&str]) -> Result<usize> {
        json_usize(&self.preprocessor, &self.preprocessor_file, paths)
    }

    /// The model's context length (`max_position_embeddings` of the text model).
    pub fn context_length(&self) -> Result<(usize, String)> {
        for p in ["text_config.max_position_embeddings", "max_position_embeddings"] {
            if let Some(n) = self.config_field(p).and_then(Value::as_u64) {
                return Ok((n as usize, format!("config.json {p}")));
            }
        }
        Err(Error::field(self.path("config.json"), "text_config.max_position_embeddings", "missing"))
    }

    /// End-of-sequence token ids from `generation_config.json`, falling back to `config.json`.
    pub fn eos_token_ids(&self) -> Vec<i64> {
        for v in [
            self.generation.get("eos_token_id"),
            self.config.get("eos_token_id"),
            lookup(&self.config, "text_config.eos_token_id"),
        ]
        .into_iter()
        .flatten()
        {
            let ids = ids_of(v);
            if !ids.is_empty() {
                return ids;
            }
        }
        Vec::new()
    }
}

fn ids_of(v: &Value) -> Vec<i64> {
    match v {
        Value::Number(n) => n.as_i64().into_iter().collect(),
        Value::Array(a) => a.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

/// Follows a dotted path through JSON objects.
pub fn lookup<'a>(v: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').try_fold(v, |v, key| v.get(key))
}

/// A required unsigned integer from a JSON document, trying several dotted paths.
pub fn json_usize(v: &Value, file: &Path, paths: &[&str]) -> Result<usize> {
    for p in paths {
        if let Some(x) = lookup(v, p) {
            return x
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| Error::field(file, *p, format!("expected a non-negative integer, found {x}")));
        }
    }
    Err(Error::field(file, paths.first().copied().unwrap_or(""), "missing"))
}

/// A required float (or float array) from a JSON document.
pub fn json_f32s(v: &Value, file: &Path, path: &str) -> Result<Vec<f32>> {
    let x = lookup(v, path).ok_or_else(|| Error::field(file, path, "missing"))?;
    let bad = || Error::field(file, path, format!("expected a number or list of numbers, found {x}"));
    match x {
        Value::Number(n) => Ok(vec![n.as_f64().ok_or_else(bad)? as f32]),
        Value::Array(a) => a.iter().map(|e| e.as_f64().map(|f| f as f32).ok_or_else(bad)).collect(),
        _ => Err(bad()),
    }
}

/// The image processor's settings, with transformers' precedence: `preprocessor_config.json`
/// when present, else the `image_processor` object that transformers v5 nests in
/// `processor_config.json`. The error names both files and what each lacked.
fn image_processor_settings(root: &Path, processor: &Value) -> Result<(Value, PathBuf)> {
    let pre = root.join("preprocessor_config.json");
    let proc_file = root.join("processor_config.json");
    match read_json(&pre, false)? {
        Value::Object(m) if !m.is_empty() || pre.is_file() => return Ok((Value::Object(m), pre)),
        _ => {}
    }
    match processor.get("image_processor") {
        Some(v @ Value::Object(_)) => Ok((v.clone(), proc_file)),
        Some(other) => Err(Error::field(proc_file, "image_processor", format!("expected an object, found {other}"))),
        None => {
            let proc_state = if proc_file.is_file() { "has no `image_processor` object" } else { "is absent too" };
            Err(Error::MissingFile {
                path: root.to_path_buf(),
                what: format!(
                    "image processor settings: looked for preprocessor_config.json (absent) and processor_config.json's `image_processor` (the file {proc_state})"
                ),
            })
        }
    }
}

fn read_json(path: &Path, required: bool) -> Result<Value> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| Error::Json { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Value::Object(Default::default())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let what = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            Err(Error::MissingFile { path: path.to_path_buf(), what })
        }
        Err(source) => Err(Error::Io { path: path.to_path_buf(), source }),
    }
}

/// Checks that an ONNX external-data `location` stays inside `root` when resolved against the
/// directory of `onnx_file`. Lexical check first (no absolute paths, no `..` escaping), then a
/// canonical check that also catches symbolic links pointing out of the folder. One exception:
/// a Hugging Face cache snapshot (`models--org--name/snapshots/<rev>/`), whose files are symlinks
/// into the same cache repo's `blobs/`, may resolve there.
pub fn check_external_location(onnx_file: &Path, location: &str, root: &Path) -> Result<PathBuf> {
    let refuse = |note: &str| Error::ExternalDataOutside {
        path: onnx_file.to_path_buf(),
        location: location.to_string(),
        root: root.to_path_buf(),
        note: note.to_string(),
    };
    let loc = Path::new(location);
    if loc.is_absolute() || loc.components().any(|c| matches!(c, Component::Prefix(_) | Component::RootDir)) {
        return Err(refuse(""));
    }
    let base = onnx_file.parent().unwrap_or(Path::new("."));
    let mut resolved = base.to_path_buf();
    for c in loc.components() {
        match c {
            Component::Normal(p) => resolved.push(p),
            // `pop` in the guard climbs one level; failing to climb means leaving the root.
            Component::ParentDir if !resolved.pop() => return Err(refuse("")),
            _ => {}
        }
    }
    let root_c = root.canonicalize().map_err(|source| Error::Io { path: root.to_path_buf(), source })?;
    let lexical_ok = resolved.starts_with(root) || resolved.starts_with(&root_c);
    if !lexical_ok {
        return Err(refuse(""));
    }
    match resolved.canonicalize() {
        Ok(c) if c.starts_with(&root_c) => Ok(c),
        Ok(c) if hf_cache_blobs(&root_c).is_some_and(|blobs| c.parent() == Some(blobs.as_path())) => Ok(c),
        Ok(c) => Err(refuse(&format!(
            " (through a symbolic link to {}; only a Hugging Face cache snapshot may link into its own blobs/)",
            c.display()
        ))),
        Err(_) => Err(Error::MissingFile { path: resolved, what: format!("external data of {}", onnx_file.display()) }),
    }
}

/// The `blobs/` folder of the Hugging Face cache repo when `root` (canonical) is one of its
/// snapshots (`.../models--org--name/snapshots/<rev>`). `blobs` must be a real directory of that
/// repo, not a symlink (which would let a crafted folder name any tree); callers accept only
/// files directly inside it.
pub fn hf_cache_blobs(root: &Path) -> Option<PathBuf> {
    let snapshots = root.parent()?;
    let repo = snapshots.parent()?;
    let is_repo = repo.file_name()?.to_str()?.starts_with("models--");
    if snapshots.file_name()? != "snapshots" || !is_repo {
        return None;
    }
    let blobs = repo.join("blobs");
    let meta = std::fs::symlink_metadata(&blobs).ok()?;
    (meta.is_dir() && !meta.file_type().is_symlink() && blobs.canonicalize().ok()? == blobs).then_some(blobs)
}
