//! Typed errors of the runtime. Every variant names the file, field or value at fault so that a
//! user can fix the input without reading the source.

use std::path::PathBuf;

/// Result alias used throughout the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the model folder needs does not exist.
    #[error("{path}: missing {what}")]
    MissingFile { path: PathBuf, what: String },

    /// A file exists but could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file is not valid JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A configuration field is missing or has an unusable value.
    #[error("{path}: field `{field}`: {message}")]
    Field { path: PathBuf, field: String, message: String },

    /// `config.json` names a model family Glimpse does not implement.
    #[error("{path}: unknown model_type {found:?}; supported model types: {supported}")]
    UnknownModelType { path: PathBuf, found: String, supported: String },

    /// The requested dtype variant of a model part is not in the folder.
    #[error("{path}: no `{dtype}` variant of {part}; variants present: {available} (pick per part, e.g. `--dtype {part}={first}`, or `--dtype auto`)", first = available.split(", ").next().unwrap_or("fp32"))]
    MissingVariant { path: PathBuf, part: String, dtype: String, available: String },

    /// An ONNX file names external data outside the model folder.
    #[error(
        "{path}: external data location {location:?} resolves outside the model folder {root}{note}; refusing to load"
    )]
    ExternalDataOutside { path: PathBuf, location: String, root: PathBuf, note: String },

    /// An ONNX file could not be parsed, typed or planned by the backend.
    #[error("{path}: cannot load ONNX model with {backend}: {message}")]
    OnnxLoad { path: PathBuf, backend: String, message: String },

    /// A model file changed on disk after it was loaded, and a plan had to be built from it
    /// again (tract's plans for new input shapes): mixing two files' weights would answer wrong.
    #[error("{path}: the file changed or was removed since it was loaded (a plan for new input shapes is built from it); load the model again")]
    FileChanged { path: PathBuf },

    /// A backend could not be initialised (e.g. its native library is missing).
    #[error("backend {backend}: {message}")]
    Backend { backend: String, message: String },

    /// Running a model part failed.
    #[error("{part}: inference failed with {backend}: {message}")]
    Inference { part: String, backend: String, message: String },

    /// A model part's inputs or outputs do not have the names, types or shapes Glimpse needs.
    #[error("{part}: {message}")]
    ModelInterface { part: String, message: String },

    /// An image could not be read or decoded.
    #[error("{path}: cannot decode image: {message}")]
    Image { path: PathBuf, message: String },

    /// An image is larger than the configured limit.
    #[error("{path}: image is {width}x{height} pixels, over the limit of {limit} (`--max-image-pixels` sets the pixel count; the per-side limit is fixed)")]
    ImageTooLarge { path: PathBuf, width: u32, height: u32, limit: String },

    /// The prompt does not fit in the model's context window.
    #[error("prompt is {tokens} tokens (including {image_tokens} image tokens), the model's context is {context} tokens ({field})")]
    ContextOverflow { tokens: usize, image_tokens: usize, context: usize, field: String },

    /// Tokenizer loading or encoding failed.
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },

    /// The chat template could not be compiled or rendered.
    #[error("chat template from {path}: {message}")]
    Template { path: PathBuf, message: String },

    /// A token-selection method needs a signal the model does not provide.
    #[error("token selection `{method}` needs {signal}, which this model does not provide: {hint}")]
    MissingSignal { method: String, signal: String, hint: String },

    /// The model would not fit in the memory budget.
    #[error("loading needs about {needed} bytes but {limit_from} allows {budget}: {detail}")]
    MemoryBudget { needed: u64, budget: u64, limit_from: String, detail: String },

    /// The observer stopped the request before generation began (see `Observer::cancelled`).
    #[error("the request was cancelled before generation began (after {after})")]
    Cancelled { after: String },

    /// A caller-supplied option has an invalid value.
    #[error("invalid {name} {value:?}: {message}")]
    InvalidArgument { name: String, value: String, message: String },
}

impl Error {
    /// Shorthand for [`Error::Field`].
    pub fn field(path: impl Into<PathBuf>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Field { path: path.into(), field: field.into(), message: message.into() }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(name: impl Into<String>, value: impl ToString, message: impl Into<String>) -> Self {
        Error::InvalidArgument { name: name.into(), value: value.to_string(), message: message.into() }
    }

    /// Whether the error is the request's fault (a bad option, image or prompt) rather than the
    /// model folder's or the backend's: servers answer these with 400.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            Error::InvalidArgument { .. }
                | Error::Image { .. }
                | Error::ImageTooLarge { .. }
                | Error::ContextOverflow { .. }
                | Error::MissingSignal { .. }
        )
    }

    /// Shorthand for [`Error::ModelInterface`].
    pub fn interface(part: impl Into<String>, message: impl Into<String>) -> Self {
        Error::ModelInterface { part: part.into(), message: message.into() }
    }
}
