//! Inference backends. A backend turns an ONNX file into a [`Session`] that runs named tensors;
//! nothing above this module knows which backend runs a part.

use std::fmt;
use std::path::Path;

use half::f16;
use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};

#[cfg(feature = "ort")]
pub mod ort;
pub mod rewrite;
pub mod tract;

/// Element type of a model input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    F32,
    F16,
    I64,
    I32,
    Bool,
    U8,
    /// Anything else, by name.
    Other(&'static str),
}

impl fmt::Display for ElemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElemType::F32 => f.write_str("f32"),
            ElemType::F16 => f.write_str("f16"),
            ElemType::I64 => f.write_str("i64"),
            ElemType::I32 => f.write_str("i32"),
            ElemType::Bool => f.write_str("bool"),
            ElemType::U8 => f.write_str("u8"),
            ElemType::Other(s) => f.write_str(s),
        }
    }
}

/// One dimension of a declared input or output shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A symbolic size (the ONNX `dim_param`), resolved at run time.
    Symbol(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(s) => f.write_str(s),
        }
    }
}

/// Name, element type and declared shape of a model input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub elem: ElemType,
    pub shape: Vec<Dim>,
}

impl TensorInfo {
    /// The fixed size of an axis, if the model declares one.
    pub fn fixed(&self, axis: usize) -> Option<usize> {
        match self.shape.get(axis) {
            Some(Dim::Fixed(n)) => Some(*n),
            _ => None,
        }
    }
}

impl fmt::Display for TensorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        write!(f, "{}: {}[{}]", self.name, self.elem, dims.join(", "))
    }
}

/// A host tensor passed to or returned by a backend.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    F32(ArrayD<f32>),
    F16(ArrayD<f16>),
    I64(ArrayD<i64>),
    Bool(ArrayD<bool>),
}

impl Tensor {
    /// Shape of the tensor.
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::F16(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
            Tensor::Bool(a) => a.shape(),
        }
    }

    /// Element type.
    pub fn elem(&self) -> ElemType {
        match self {
            Tensor::F32(_) => ElemType::F32,
            Tensor::F16(_) => ElemType::F16,
            Tensor::I64(_) => ElemType::I64,
            Tensor::Bool(_) => ElemType::Bool,
        }
    }

    /// The entries at `index` along `axis` (`ndarray`'s `select`), whatever the element type.
    pub fn select(&self, axis: usize, index: &[usize]) -> Tensor {
        let axis = ndarray::Axis(axis);
        match self {
            Tensor::F32(a) => Tensor::F32(a.select(axis, index)),
            Tensor::F16(a) => Tensor::F16(a.select(axis, index)),
            Tensor::I64(a) => Tensor::I64(a.select(axis, index)),
            Tensor::Bool(a) => Tensor::Bool(a.select(axis, index)),
        }
    }

    /// An all-zero tensor of a float element type (used for empty KV caches).
    pub fn zeros(elem: ElemType, shape: &[usize]) -> Result<Tensor> {
        match elem {
            ElemType::F32 => Ok(Tensor::F32(ArrayD::zeros(IxDyn(shape)))),
            ElemType::F16 => Ok(Tensor::F16(ArrayD::from_elem(IxDyn(shape), f16::ZERO))),
            other => Err(Error::invalid("KV cache element type", other, "expected f32 or f16")),
        }
    }

    /// The tensor as f32 (f16 is widened), or an error naming `what`.
    pub fn into_f32(self, what: &str) -> Result<ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Ok(a),
            Tensor::F16(a) => Ok(a.mapv(f32::from)),
            other => Err(Error::interface(what, format!("expected a float tensor, found {}", other.elem()))),
        }
    }
}

/// A session's outputs by declared name, each taken at most once.
#[derive(Debug)]
pub struct NamedOutputs {
    named: Vec<(String, Option<Tensor>)>,
}

impl NamedOutputs {
    /// Pairs outputs with the names a session declares (in declared order).
    pub fn new(declared: &[TensorInfo], tensors: Vec<Tensor>) -> Self {
        NamedOutputs { named: declared.iter().map(|o| o.name.clone()).zip(tensors.into_iter().map(Some)).collect() }
    }

    /// Takes the output called `name`, if declared and not taken yet.
    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        self.named.iter_mut().find(|(n, _)| n == name).and_then(|(_, t)| t.take())
    }

    /// The first declared output's name.
    pub fn first_name(&self) -> Option<String> {
        self.named.first().map(|(n, _)| n.clone())
    }
}

/// What became of one execution provider asked for when a part was loaded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum ProviderStatus {
    /// Registered with the session: the part's nodes it supports run there.
    Registered,
    /// The loaded library was built without it (e.g. the CPU-only PyPI wheel and `CUDA`).
    NotInLibrary,
    /// The library has it but registration failed (missing driver, CUDA/TensorRT libraries ...).
    Failed(String),
}

/// Where a loaded part runs: the backend, and for ONNX Runtime each execution provider asked for,
/// in priority order, with what became of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Placement {
    pub backend: String,
    pub providers: Vec<(String, ProviderStatus)>,
}

impl Placement {
    /// A backend that runs everything on the CPU itself (tract).
    pub fn cpu(backend: &str) -> Placement {
        Placement { backend: backend.into(), providers: vec![("CPU".into(), ProviderStatus::Registered)] }
    }

    /// The provider that runs the part: the first registered one (ONNX Runtime assigns each node
    /// to the first registered provider that supports it, the CPU provider taking the rest).
    pub fn primary(&self) -> &str {
        self.providers.iter().find(|(_, s)| *s == ProviderStatus::Registered).map_or("CPU", |(n, _)| n.as_str())
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.backend, self.primary())?;
        let notes: Vec<String> = self
            .providers
            .iter()
            .filter_map(|(n, s)| match s {
                ProviderStatus::Registered => None,
                ProviderStatus::NotInLibrary => Some(format!("{n}: not in this ONNX Runtime library")),
                ProviderStatus::Failed(why) => Some(format!("{n}: failed ({why})")),
            })
            .collect();
        if !notes.is_empty() {
            write!(f, " [{}]", notes.join("; "))?;
        }
        Ok(())
    }
}

/// A loaded model part ready to run.
pub trait Session: Send + Sync {
    /// Declared inputs, in model order.
    fn inputs(&self) -> &[TensorInfo];
    /// Declared outputs, in model order.
    fn outputs(&self) -> &[TensorInfo];
    /// Runs the part. `inputs` must name every declared input; outputs come back in declared
    /// order.
    fn run(&self, inputs: Vec<(&str, Tensor)>) -> Result<Vec<Tensor>>;
    /// Where the part runs.
    fn placement(&self) -> Placement;
    /// The input shapes the backend holds a plan for exactly (`name [d0, d1, ...]` per input,
    /// joined by `; `; one entry per plan, most recent last); empty where it runs one plan for
    /// symbolic shapes or plans every run itself (ONNX Runtime). Reported by `glimpse profile`.
    fn fixed_plans(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Facts the model folder knows about a part's inputs, for backends that analyse shapes ahead
/// of time (tract): input name, axis, and its size as a number or an expression over symbols
/// (`1`, `32`, `S`, `P+S`). Inputs or axes the file fixes already, or lacks, are left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadHints {
    pub dims: Vec<(String, usize, String)>,
    /// The part's `logits` output is read at the last position only (the decoder): both
    /// backends then compute the final projection for that position alone
    /// ([`rewrite::last_position_logits`]), instead of a `[seq, vocab]` matrix (845 MB for a
    /// 1391-token prompt on Qwen2's 151,936-token vocabulary) of which one row is used.
    pub last_position_logits: bool,
    /// How many distinct input shapes the part sees run after run (the vision encoder's parts:
    /// one, a view's full grid or a fixed share of it); 0 when they change from run to run (the
    /// decoder's sequence and past, region skipping's token counts). A backend that plans for fixed
    /// shapes (tract) keeps up to this many plans for exact shapes instead of its plan for
    /// symbolic ones, which run faster, at the cost of a build on each shape's first run.
    pub repeated_shapes: usize,
}

impl LoadHints {
    /// Adds one axis fact.
    pub fn dim(mut self, input: &str, axis: usize, value: impl ToString) -> Self {
        self.dims.push((input.to_string(), axis, value.to_string()));
        self
    }

    /// Declares that the part's input shapes repeat: at most `n` distinct ones.
    pub fn repeated_shapes(mut self, n: usize) -> Self {
        self.repeated_shapes = n;
        self
    }

    /// Marks the part's `logits` as read at the last position only.
    pub fn last_position_logits(mut self) -> Self {
        self.last_position_logits = true;
        self
    }
}

/// Whether a hint's input pattern names `input` (`past_key_values.*` matches by prefix).
pub fn hint_matches(pattern: &str, input: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => input.starts_with(prefix),
        None => pattern == input,
    }
}

/// A way of running ONNX files.
pub trait Backend: Send + Sync {
    /// Short name used in messages and `--backend`.
    fn name(&self) -> &'static str;
    /// Loads one ONNX file. `root` is the model folder, which external data must stay inside;
    /// `hints` are facts about the inputs a backend may use to analyse the graph.
    fn load(&self, onnx_file: &Path, root: &Path, part: &str, hints: &LoadHints) -> Result<Box<dyn Session>>;
}

/// Options that select and configure a backend.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// ONNX Runtime library path (`--ort-lib`); `ORT_DYLIB_PATH` otherwise.
    pub ort_library: Option<std::path::PathBuf>,
    /// Intra-op threads for backends that take a count (0 = backend default).
    pub threads: usize,
    /// ONNX Runtime execution providers in priority order (`TensorRT`, `CUDA`, `XNNPACK`, `ACL`,
    /// `CPU`); empty means the CPU provider. tract ignores them.
    pub execution_providers: Vec<String>,
    /// Folder for TensorRT engine and timing caches (building engines takes minutes on a Jetson;
    /// the cache makes later loads fast). `None`: `$XDG_CACHE_HOME` or `~/.cache` + `glimpse/tensorrt`.
    pub engine_cache: Option<std::path::PathBuf>,
    /// tract: one plan for symbolic shapes for every part, even where its shapes repeat
    /// ([`LoadHints::repeated_shapes`]): what ran before fixed-shape plans, kept to compare
    /// against (`runtime/benches/plans.rs`).
    pub symbolic_plans: bool,
}

/// A registered backend: its name, what it is, the cargo feature that compiles it in, the
/// [`BackendOptions`] fields it reads, and its constructor.
#[derive(Clone, Copy)]
pub struct BackendSpec {
    pub name: &'static str,
    /// One line for `--help` and `glimpse targets`.
    pub summary: &'static str,
    /// Cargo feature of `glimpse-runtime` that compiles it (`None`: always built).
    pub feature: Option<&'static str>,
    /// Whether this build contains it.
    pub compiled: bool,
    /// `BackendOptions` fields it reads.
    pub options: &'static [&'static str],
    pub make: fn(&BackendOptions) -> Result<Box<dyn Backend>>,
    /// Whether it can start with these options, without building it (ONNX Runtime: its library
    /// loads; tract: always). Target profiles use it to pick their first usable backend.
    pub starts: fn(&BackendOptions) -> Result<()>,
    /// Whether it encodes an image's views faster one at a time than as one batch (measured on
    /// the real-size SmolVLM-256M shape, docs/benchmarks.md); `--views auto` follows it.
    pub views_one_by_one: bool,
}

impl BackendSpec {
    /// The one-line help: what it is and the options it reads.
    pub fn help(&self) -> String {
        if self.options.is_empty() {
            self.summary.to_string()
        } else {
            format!("{} (options: {})", self.summary, self.options.join(", "))
        }
    }
}

impl fmt::Debug for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendSpec")
            .field("name", &self.name)
            .field("compiled", &self.compiled)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "ort")]
const ORT: BackendSpec = ort::SPEC;
/// ONNX Runtime in a build without the `ort` feature: listed, not constructible.
#[cfg(not(feature = "ort"))]
const ORT: BackendSpec = BackendSpec {
    name: "ort",
    summary: "ONNX Runtime (not in this build: compile glimpse-runtime with feature `ort`)",
    feature: Some("ort"),
    compiled: false,
    options: &[],
    make: |_| Err(Error::invalid("backend", "ort", "this build lacks the `ort` feature")),
    starts: |_| Err(Error::invalid("backend", "ort", "this build lacks the `ort` feature")),
    views_one_by_one: false,
};

/// The registry, in the order `--help` lists them: one line per backend.
pub const BACKENDS: &[BackendSpec] = &[tract::SPEC, ORT];

/// Backend names this build can run.
pub fn available() -> Vec<&'static str> {
    BACKENDS.iter().filter(|b| b.compiled).map(|b| b.name).collect()
}

/// The registered backend called `name` (compiled in or not).
pub fn spec(name: &str) -> Option<&'static BackendSpec> {
    BACKENDS.iter().find(|b| b.name == name)
}

/// Whether the backend registered under `name` can start with `opts`.
pub fn can_start(name: &str, opts: &BackendOptions) -> Result<()> {
    match spec(name) {
        Some(b) if b.compiled => (b.starts)(opts),
        _ => by_name(name, opts).map(drop),
    }
}

/// The backend registered under `name`, constructed with `opts`.
pub fn by_name(name: &str, opts: &BackendOptions) -> Result<Box<dyn Backend>> {
    match spec(name) {
        Some(b) if b.compiled => (b.make)(opts),
        Some(b) => Err(Error::invalid(
            "backend",
            name,
            format!("this build lacks it (cargo feature `{}`)", b.feature.unwrap_or("?")),
        )),
        None => Err(Error::invalid(
            "backend",
            name,
            format!("available backends in this build: {}", available().join(", ")),
        )),
    }
}

/// Orders named inputs as a session declares them, failing on missing or unknown names.
pub fn order_inputs(part: &str, declared: &[TensorInfo], mut given: Vec<(&str, Tensor)>) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(declared.len());
    for info in declared {
        let pos = given
            .iter()
            .position(|(n, _)| *n == info.name)
            .ok_or_else(|| Error::interface(part, format!("input `{}` was not provided", info.name)))?;
        let (_, t) = given.swap_remove(pos);
        if t.elem() != info.elem {
            return Err(Error::interface(
                part,
                format!("input `{}` expects {} but got {}", info.name, info.elem, t.elem()),
            ));
        }
        out.push(t);
    }
    if let Some((name, _)) = given.first() {
        return Err(Error::interface(part, format!("model has no input named `{name}`")));
    }
    Ok(out)
}
