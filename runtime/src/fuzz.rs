//! Fuzzing entry points: each [`Target`] takes arbitrary bytes as one file of a model folder (or
//! an image, or an ONNX file) and runs everything that reads it, as loading and answering would,
//! up to the point where ONNX sessions start. Errors are the expected outcome; a panic, abort,
//! hang or runaway allocation is a bug. `fuzz/` drives these under cargo-afl (`.ci/run`), and
//! `tests/fuzz_corpus.rs` replays the committed seeds and every crash ever found.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::family;
use crate::folder::ModelFolder;
use crate::preprocess::{self, ImageLimits};
use crate::text::TextTokenizer;

/// What a fuzz input is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `config.json`: folder, tokenizer and family settings, then preprocessing an image.
    Config,
    /// `preprocessor_config.json`: family settings and preprocessing.
    Preprocessor,
    /// `processor_config.json`: family settings and preprocessing.
    Processor,
    /// `glimpse.json`: the manifest.
    Manifest,
    /// `tokenizer.json`: the tokenizer, encoding and decoding a prompt.
    Tokenizer,
    /// `chat_template.jinja`: rendering a prompt with an image.
    ChatTemplate,
    /// An image file: sniffing, decoding within the limits, preprocessing.
    Image,
    /// `onnx/vision_encoder.onnx`: protobuf header, declared I/O, external-data checks, and the
    /// weights-by-reference rewrite tract's loader decodes.
    Onnx,
    /// An OpenAI chat-completions request body (`glimpse serve`): parsing and checking, the
    /// turns rendered through the chat template and tokenized, a `data:` image decoded and
    /// preprocessed.
    ChatRequest,
}

/// Every target with its name (the fuzz binary's argument and the corpus folder name).
pub const TARGETS: [(&str, Target); 9] = [
    ("config", Target::Config),
    ("preprocessor", Target::Preprocessor),
    ("processor", Target::Processor),
    ("manifest", Target::Manifest),
    ("tokenizer", Target::Tokenizer),
    ("chat_template", Target::ChatTemplate),
    ("image", Target::Image),
    ("onnx", Target::Onnx),
    ("chat_request", Target::ChatRequest),
];

impl std::str::FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TARGETS.iter().find(|(n, _)| *n == s).map(|(_, t)| *t).ok_or_else(|| {
            let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
            Error::invalid("fuzz target", s, format!("expected one of {}", names.join(", ")))
        })
    }
}

impl Target {
    /// The folder file the input replaces (`None`: the input is not a folder file).
    fn file(self) -> Option<&'static str> {
        match self {
            Target::Config => Some("config.json"),
            Target::Preprocessor => Some("preprocessor_config.json"),
            Target::Processor => Some("processor_config.json"),
            Target::Manifest => Some("glimpse.json"),
            Target::Tokenizer => Some("tokenizer.json"),
            Target::ChatTemplate => Some("chat_template.jinja"),
            Target::Image => None,
            Target::Onnx => Some("onnx/vision_encoder.onnx"),
            Target::ChatRequest => None,
        }
    }
}

/// A scratch copy of a model folder's small files, into which each input is written.
pub struct Harness {
    target: Target,
    dir: PathBuf,
    image: image::RgbImage,
}

/// Files of the base folder the harness copies (no ONNX weights: no target loads a session).
const COPIED: [&str; 9] = [
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "glimpse.json",
    "special_tokens_map.json",
];

impl Harness {
    /// Copies `base` (a model folder) into a fresh scratch folder under the system temp dir.
    pub fn new(target: Target, base: &Path) -> Result<Harness> {
        let dir = std::env::temp_dir().join(format!("glimpse-fuzz-{}-{:?}", std::process::id(), target));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(dir.join("onnx")).map_err(io(&dir))?;
        for name in COPIED {
            let from = base.join(name);
            if from.is_file() {
                std::fs::copy(&from, dir.join(name)).map_err(io(&from))?;
            }
        }
        let image = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, 128]));
        Ok(Harness { target, dir, image })
    }

    /// Runs one input. `Err` is a handled rejection; this must never panic.
    pub fn run(&self, data: &[u8]) -> Result<()> {
        if let Some(file) = self.target.file() {
            let path = self.dir.join(file);
            std::fs::write(&path, data).map_err(|source| Error::Io { path, source })?;
        }
        let limits = ImageLimits::default();
        match self.target {
            Target::Manifest => crate::manifest::Manifest::load(&self.dir).map(drop),
            Target::Onnx => {
                let path = self.dir.join("onnx/vision_encoder.onnx");
                crate::onnx_info::describe(&path, &self.dir)?;
                // the wire surgery tract's loader runs on the same bytes
                crate::onnx_info::read_proto_by_reference(&path, &self.dir).map(drop)
            }
            Target::Image => {
                let img = preprocess::decode_image(data, Path::new("fuzz-input"), limits)?;
                self.preprocess(&img)
            }
            Target::Tokenizer | Target::ChatTemplate => {
                let folder = ModelFolder::open(&self.dir)?;
                let tok = TextTokenizer::load(&folder)?;
                let text = tok.render_chat("What is in the image?", true)?.unwrap_or_default();
                let ids = tok.encode(&text)?;
                tok.decode(&ids).map(drop)
            }
            Target::Config | Target::Preprocessor | Target::Processor => self.preprocess(&self.image),
            Target::ChatRequest => {
                use crate::api::openai::{parse_chat_request, ImageSource};
                let req = parse_chat_request(data, limits.max_file_bytes)
                    .map_err(|e| Error::invalid("chat request", e.status, e.message))?;
                let folder = ModelFolder::open(&self.dir)?;
                let tok = TextTokenizer::load(&folder)?;
                let text = tok.render_chat_turns(&req.history, &req.prompt, req.image.is_some())?.unwrap_or_default();
                tok.encode(&text)?;
                match &req.image {
                    Some(ImageSource::Bytes(bytes)) => {
                        let img = preprocess::decode_image(bytes, Path::new("image_url"), limits)?;
                        self.preprocess(&img)
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    fn preprocess(&self, img: &image::RgbImage) -> Result<()> {
        let folder = ModelFolder::open(&self.dir)?;
        let tok = TextTokenizer::load(&folder)?;
        let family = family::for_folder(&folder, &tok)?;
        family.preprocess(img).map(drop)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
