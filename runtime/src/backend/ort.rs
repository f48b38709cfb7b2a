//! ONNX Runtime backend (cargo feature `ort`). The library is loaded at run time from
//! `ORT_DYLIB_PATH`, an explicit path, or a `libonnxruntime` next to the executable; a missing or
//! mismatched library is an error, never a panic.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ndarray::ArrayD;
use ort::ep::{self, ExecutionProvider};
use ort::session::builder::SessionBuilder;
use ort::session::Session as OrtSession;
use ort::value::{DynValue, Tensor as OrtTensor};

use super::{order_inputs, Backend, Placement, ProviderStatus, Session, Tensor, TensorInfo};
use crate::error::{Error, Result};
use crate::onnx_info::{graph_io, read_proto_by_reference};

const NAME: &str = "ort";

/// Registry entry ([`super::BACKENDS`]).
pub const SPEC: super::BackendSpec = super::BackendSpec {
    name: "ort",
    summary: "ONNX Runtime, loaded at run time (ORT_DYLIB_PATH / --ort-lib); execution providers for GPUs and NPUs",
    feature: Some("ort"),
    compiled: true,
    options: &["ort_library", "threads", "execution_providers", "engine_cache"],
    make: |opts| Ok(Box::new(OrtBackend::new(&OrtOptions::from(opts))?)),
    // the library loads once per process; construction holds no session
    starts: |opts| OrtBackend::new(&OrtOptions::from(opts)).map(drop),
    views_one_by_one: true,
};

impl From<&super::BackendOptions> for OrtOptions {
    fn from(opts: &super::BackendOptions) -> Self {
        OrtOptions {
            library: opts.ort_library.clone(),
            threads: opts.threads,
            execution_providers: opts.execution_providers.clone(),
            engine_cache: opts.engine_cache.clone(),
        }
    }
}

/// How to find and configure ONNX Runtime.
#[derive(Debug, Clone, Default)]
pub struct OrtOptions {
    /// Path of `libonnxruntime.so*` (overrides `ORT_DYLIB_PATH`).
    pub library: Option<PathBuf>,
    /// Intra-op threads (0 = ONNX Runtime's default).
    pub threads: usize,
    /// Execution providers in priority order ([`PROVIDERS`] names); empty = `CPU`.
    pub execution_providers: Vec<String>,
    /// TensorRT engine / timing cache folder (see [`default_engine_cache`]).
    pub engine_cache: Option<PathBuf>,
}

/// Execution providers Glimpse can register, as target profiles name them.
pub const PROVIDERS: [&str; 5] = ["TensorRT", "CUDA", "XNNPACK", "ACL", "CPU"];

/// The ONNX Runtime backend.
#[derive(Debug)]
pub struct OrtBackend {
    threads: usize,
    providers: Vec<String>,
    engine_cache: PathBuf,
}

/// `$XDG_CACHE_HOME/glimpse/tensorrt`, else `~/.cache/glimpse/tensorrt`, else a temp folder.
pub fn default_engine_cache() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("glimpse").join("tensorrt")
}

/// Asks ONNX Runtime for one provider: skipped when the library lacks it, an error kept (not
/// raised) when registration fails, so the part still loads on the providers that remain.
fn register(name: &str, builder: &mut SessionBuilder, engine_cache: &Path) -> ProviderStatus {
    fn go<E: ExecutionProvider>(provider: E, builder: &mut SessionBuilder) -> ProviderStatus {
        match E::is_available() {
            Ok(false) => ProviderStatus::NotInLibrary,
            Err(e) => ProviderStatus::Failed(e.to_string()),
            Ok(true) => match provider.register(builder) {
                Ok(()) => ProviderStatus::Registered,
                Err(e) => ProviderStatus::Failed(e.to_string()),
            },
        }
    }
    let cache = engine_cache.display().to_string();
    match name {
        // fp16 engines: the Jetson profiles run vision in fp16 anyway; the engine and timing caches
        // turn a multi-minute engine build into a load on every later start.
        "TensorRT" => go(
            ep::TensorRT::default()
                .with_fp16(true)
                .with_engine_cache(true)
                .with_engine_cache_path(&cache)
                .with_timing_cache(true)
                .with_timing_cache_path(&cache),
            builder,
        ),
        "CUDA" => go(ep::CUDA::default(), builder),
        "XNNPACK" => go(ep::XNNPACK::default(), builder),
        "ACL" => go(ep::ACL::default(), builder),
        "CPU" => go(ep::CPU::default(), builder),
        other => ProviderStatus::Failed(format!("unknown execution provider `{other}`")),
    }
}

/// The process's ONNX Runtime environment, made by the first backend.
struct Env {
    env: ort::environment::Environment,
    /// The library it was loaded from.
    library: PathBuf,
    /// Whether it has the shared CPU arena ([`register_shared_arena`]).
    shared_arena: bool,
    /// Intra-op threads of its global thread pool (0: ONNX Runtime's default), when it has one.
    pool_threads: Option<usize>,
}

static ENVIRONMENT: OnceLock<std::result::Result<Env, String>> = OnceLock::new();

/// Where the library is looked for, in order.
pub fn library_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        out.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        for name in ["libonnxruntime.so", "libonnxruntime.so.1", "libonnxruntime.dylib", "onnxruntime.dll"] {
            out.push(dir.join(name));
        }
    }
    out
}

/// Registers one CPU arena allocator on the environment, which every session then uses
/// (`session.use_env_allocators`). Without it sessions allocate through glibc malloc (the
/// `ort` crate's CPU provider turns the per-session arena off), whose freed blocks stayed
/// resident in the heaps they came from, so the encoder's activations stayed beside the
/// decoder's: on the real-size SmolVLM-256M shape (fp32, image) the shared arena lowers the
/// peak from 1663 to 1236 MB with the same tokens (docs/benchmarks.md, "Memory"). It extends by
/// what is requested rather than by doubling.
fn register_shared_arena(env: &ort::environment::Environment) -> std::result::Result<(), String> {
    use ort::AsPointer;
    let api = ort::api();
    let check = |st: ort::sys::OrtStatusPtr| -> std::result::Result<(), String> {
        if st.0.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null status returned by the API, released once here; its message is a
        // C string the status owns, copied before the release.
        let msg = unsafe { std::ffi::CStr::from_ptr((api.GetErrorMessage)(st.0)) }.to_string_lossy().into_owned();
        unsafe { (api.ReleaseStatus)(st.0) };
        Err(msg)
    };
    // arena_extend_strategy 1 = kSameAsRequested
    let keys = [c"arena_extend_strategy".as_ptr()];
    let values = [1usize];
    let mut cfg = std::ptr::null_mut();
    let mut info = std::ptr::null_mut();
    // SAFETY: `keys` and `values` have the length passed and outlive the calls; the out
    // pointers are written by the API and released here once registration has copied them
    // (ONNX Runtime keeps its own references); `env` is the live environment.
    unsafe {
        check((api.CreateArenaCfgV2)(keys.as_ptr(), values.as_ptr(), keys.len(), &mut cfg))?;
        let made = check((api.CreateCpuMemoryInfo)(
            ort::sys::OrtAllocatorType::OrtArenaAllocator,
            ort::sys::OrtMemType::OrtMemTypeDefault,
            &mut info,
        ));
        let registered = made.and_then(|()| check((api.CreateAndRegisterAllocator)(env.ptr().cast_mut(), info, cfg)));
        if !info.is_null() {
            (api.ReleaseMemoryInfo)(info);
        }
        (api.ReleaseArenaCfg)(cfg);
        registered
    }
}

impl OrtBackend {
    /// Loads ONNX Runtime (once per process) and returns the backend.
    pub fn new(opts: &OrtOptions) -> Result<Self> {
        let env = ENVIRONMENT.get_or_init(|| {
            let candidates = library_candidates(opts.library.as_deref());
            let Some(lib) = candidates.iter().find(|p| p.is_file()).cloned() else {
                return Err(format!(
                    "libonnxruntime not found (looked at: {}); set ORT_DYLIB_PATH or --ort-lib, e.g. to the onnxruntime==1.31.1 wheel's onnxruntime/capi/libonnxruntime.so.1.31.1",
                    candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ));
            };
            // One intra-op thread pool for every session: with a pool per session, the pool of the
            // stage that just ran keeps spinning while the next stage runs, which cost the staged
            // encoder 3-7% against the monolithic one (docs/benchmarks.md, "Staging overhead").
            let pool = ort::environment::GlobalThreadPoolOptions::default()
                .with_intra_threads(opts.threads)
                .map_err(|e| tracing::warn!("ONNX Runtime: no global thread pool ({e}); a pool per session"))
                .ok();
            let pool_threads = pool.as_ref().map(|_| opts.threads);
            // ort panics on some load failures; keep a panic from escaping as one
            // (the pool options hold no state a panic could leave half-changed).
            let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ort::init_from(&lib).map(|b| {
                    let b = b.with_name("glimpse");
                    match pool {
                        Some(pool) => b.with_global_thread_pool(pool),
                        None => b,
                    }
                    .build()
                })
            }));
            match built {
                Ok(Ok(Ok(env))) => {
                    // without it sessions allocate through malloc (more memory, same answers)
                    let shared_arena = match register_shared_arena(&env) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!("ONNX Runtime: no shared CPU arena ({e}); sessions allocate through malloc");
                            false
                        }
                    };
                    Ok(Env { env, library: lib, shared_arena, pool_threads })
                }
                Ok(Ok(Err(e))) => Err(format!("{}: {e}", lib.display())),
                Ok(Err(e)) => Err(format!("{}: {e}", lib.display())),
                Err(_) => Err(format!("{}: ONNX Runtime failed to load (wrong version? need API 31, onnxruntime >= 1.23)", lib.display())),
            }
        });
        if let Some(bad) = opts.execution_providers.iter().find(|p| !PROVIDERS.contains(&p.as_str())) {
            return Err(Error::invalid("execution provider", bad, format!("expected one of {}", PROVIDERS.join(", "))));
        }
        let providers = if opts.execution_providers.is_empty() {
            vec!["CPU".to_string()]
        } else {
            opts.execution_providers.clone()
        };
        match env {
            Ok(_) => Ok(OrtBackend {
                threads: opts.threads,
                providers,
                engine_cache: opts.engine_cache.clone().unwrap_or_else(default_engine_cache),
            }),
            Err(message) => Err(Error::Backend { backend: NAME.into(), message: message.clone() }),
        }
    }

    /// The library in use, once loaded.
    pub fn library() -> Option<PathBuf> {
        ENVIRONMENT.get().and_then(|e| e.as_ref().ok()).map(|e| e.library.clone())
    }
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn load(&self, onnx_file: &Path, root: &Path, part: &str, hints: &super::LoadHints) -> Result<Box<dyn Session>> {
        // the header and the message with the weights as references: ONNX Runtime maps them
        let (header, mut proto) = read_proto_by_reference(onnx_file, root)?;
        let graph = header.graph.as_ref().ok_or_else(|| Error::OnnxLoad {
            path: onnx_file.to_path_buf(),
            backend: NAME.into(),
            message: "the file has no graph".into(),
        })?;
        let (inputs, outputs) = graph_io(graph);
        drop(header);
        let load_err = |e: ort::Error| Error::OnnxLoad {
            path: onnx_file.to_path_buf(),
            backend: NAME.into(),
            message: e.to_string(),
        };
        let Some(Ok(Env { env, shared_arena, pool_threads, .. })) = ENVIRONMENT.get() else {
            return Err(Error::Backend { backend: NAME.into(), message: "ONNX Runtime is not initialised".into() });
        };
        let mut builder = OrtSession::builder(env).map_err(load_err)?;
        // the environment's pool serves a backend asking for its thread count; another count
        // (a second backend in the process with other --threads) gets a pool of its own
        if *pool_threads != Some(self.threads) {
            builder = builder.with_independent_thread_pool().map_err(|e| load_err(e.into()))?;
            if self.threads > 0 {
                builder = builder.with_intra_threads(self.threads).map_err(|e| load_err(e.into()))?;
            }
        }
        if self.providers.iter().any(|p| p == "TensorRT") {
            std::fs::create_dir_all(&self.engine_cache).map_err(|e| Error::Backend {
                backend: NAME.into(),
                message: format!("TensorRT engine cache {}: {e}", self.engine_cache.display()),
            })?;
        }
        let mut providers = Vec::with_capacity(self.providers.len());
        for name in &self.providers {
            providers.push((name.clone(), register(name, &mut builder, &self.engine_cache)));
        }
        let placement = Placement { backend: NAME.into(), providers };
        // The model goes in as bytes whose large embedded initializers are references into the
        // file (onnx_info::read_proto_by_reference): ONNX Runtime then maps the weights from the file
        // instead of parsing a copy of them with the message and copying them again into
        // tensors (measured in docs/benchmarks.md, "Memory").
        // Locations are rebased on the folder holding every data file (a Hugging Face cache
        // snapshot's files are links into its `blobs/`), which ONNX Runtime then resolves them in.
        let dir = crate::onnx_info::rebase_external_data(&mut proto, onnx_file, root)?
            .unwrap_or_else(|| onnx_file.parent().unwrap_or(Path::new(".")).to_path_buf());
        if hints.last_position_logits && super::rewrite::last_position_logits(&mut proto) {
            tracing::debug!("{}: logits at the last position only", onnx_file.display());
        }
        let bytes = prost::Message::encode_to_vec(&proto);
        drop(proto);
        builder = builder
            .with_config_entry("session.model_external_initializers_file_folder_path", dir.to_string_lossy())
            .map_err(|e| load_err(e.into()))?;
        if *shared_arena {
            builder = builder.with_config_entry("session.use_env_allocators", "1").map_err(|e| load_err(e.into()))?;
        }
        let session = builder.commit_from_memory(&bytes).map_err(load_err)?;
        drop(bytes);
        Ok(Box::new(OrtPart { part: part.to_string(), session: Mutex::new(session), inputs, outputs, placement }))
    }
}

struct OrtPart {
    part: String,
    session: Mutex<OrtSession>,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
    placement: Placement,
}

fn to_value(t: Tensor) -> std::result::Result<DynValue, ort::Error> {
    Ok(match t {
        Tensor::F32(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::I64(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::Bool(a) => OrtTensor::from_array(a)?.into_dyn(),
        Tensor::F16(a) => OrtTensor::from_array(a.mapv(f32::from))?.into_dyn(),
    })
}

fn from_value(v: &DynValue) -> std::result::Result<Tensor, String> {
    use ort::value::TensorElementType as T;
    let ty = v.dtype().tensor_type().ok_or("not a tensor")?;
    let e = |e: ort::Error| e.to_string();
    Ok(match ty {
        T::Float32 => Tensor::F32(v.try_extract_array::<f32>().map_err(e)?.to_owned()),
        T::Int64 => Tensor::I64(v.try_extract_array::<i64>().map_err(e)?.to_owned()),
        T::Bool => Tensor::Bool(v.try_extract_array::<bool>().map_err(e)?.to_owned()),
        T::Int32 => Tensor::I64(v.try_extract_array::<i32>().map_err(e)?.mapv(i64::from)),
        other => return Err(format!("unsupported output type {other:?}")),
    })
}

impl Session for OrtPart {
    fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    fn placement(&self) -> Placement {
        self.placement.clone()
    }

    fn run(&self, inputs: Vec<(&str, Tensor)>) -> Result<Vec<Tensor>> {
        let ordered = order_inputs(&self.part, &self.inputs, inputs)?;
        let err = |message: String| Error::Inference { part: self.part.clone(), backend: NAME.into(), message };
        let mut values = Vec::with_capacity(ordered.len());
        for (info, t) in self.inputs.iter().zip(ordered) {
            let v = to_value(t).map_err(|e| err(format!("input `{}`: {e}", info.name)))?;
            values.push((info.name.clone(), v));
        }
        let mut session = self.session.lock().map_err(|_| err("session lock poisoned".into()))?;
        let outputs = session.run(values).map_err(|e| err(e.to_string()))?;
        self.outputs
            .iter()
            .map(|info| {
                let v = outputs.get(&info.name).ok_or_else(|| err(format!("missing output `{}`", info.name)))?;
                from_value(v).map_err(|m| err(format!("output `{}`: {m}", info.name)))
            })
            .collect()
    }
}

#[allow(dead_code)]
fn _assert_ndarray_compat(a: ArrayD<f32>) -> std::result::Result<OrtTensor<f32>, ort::Error> {
    OrtTensor::from_array(a)
}
