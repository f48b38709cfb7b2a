//! The default backend: tract, pure Rust, no native dependencies. Each ONNX file becomes one
//! optimized plan with symbolic sequence/past/tile dims resolved at run time.

use std::path::Path;

use tract_onnx::prelude::*;

use super::{order_inputs, Backend, Placement, Session, Tensor as HostTensor, TensorInfo};
use crate::error::{Error, Result};
use crate::onnx_info::{graph_io, read_proto_by_reference, uses_op};

/// tract backend (default).
#[derive(Debug, Default, Clone)]
pub struct TractBackend {
    executor: tract_linalg::multithread::Executor,
    threads: usize,
    symbolic_plans: bool,
}

impl TractBackend {
    /// A backend whose plans run on `threads` threads (0: every logical CPU; 1: inline, no pool).
    /// Matrix products split over output panels, so results do not depend on the count.
    pub fn new(threads: usize) -> Result<Self> {
        use tract_linalg::multithread::Executor;
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let executor = if threads > 1 {
            std::panic::catch_unwind(|| Executor::multithread_with_name(threads, "glimpse-tract")).map_err(|_| {
                Error::Backend { backend: NAME.into(), message: format!("could not start a pool of {threads} threads") }
            })?
        } else {
            Executor::SingleThread
        };
        Ok(TractBackend { executor, threads, symbolic_plans: false })
    }

    /// A backend that keeps one plan for symbolic shapes for every part
    /// ([`super::BackendOptions::symbolic_plans`]).
    pub fn with_symbolic_plans(mut self, on: bool) -> Self {
        self.symbolic_plans = on;
        self
    }

    /// Threads its plans run on.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

const NAME: &str = "tract";

/// Registry entry ([`super::BACKENDS`]).
pub const SPEC: super::BackendSpec = super::BackendSpec {
    name: NAME,
    summary: "tract: pure Rust, no native dependency, CPU, --threads N",
    feature: None,
    compiled: true,
    options: &["threads"],
    make: |opts| Ok(Box::new(TractBackend::new(opts.threads)?.with_symbolic_plans(opts.symbolic_plans))),
    starts: |_| Ok(()),
    views_one_by_one: true,
};

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn load(&self, onnx_file: &Path, root: &Path, part: &str, hints: &super::LoadHints) -> Result<Box<dyn Session>> {
        Ok(Box::new(self.open(onnx_file, root, part, hints)?))
    }
}

impl TractBackend {
    fn open(&self, onnx_file: &Path, root: &Path, part: &str, hints: &super::LoadHints) -> Result<TractSession> {
        let mut source = Source {
            file: onnx_file.to_path_buf(),
            root: root.to_path_buf(),
            hints: hints.clone(),
            skip: Vec::new(),
            stamp: stamp(onnx_file),
        };
        let (header, proto) = read_proto_by_reference(onnx_file, root)?;
        let graph = header.graph.as_ref().ok_or_else(|| Error::OnnxLoad {
            path: onnx_file.to_path_buf(),
            backend: NAME.into(),
            message: "the file has no graph".into(),
        })?;
        let (inputs, outputs) = graph_io(graph);
        let block_quant = uses_op(graph, "MatMulNBits");
        drop(header);
        if block_quant {
            source.skip.push(MERGE_AXES_PASS.to_string());
        }
        let plan = source.plan(proto, None)?;
        let cap = if self.symbolic_plans { 0 } else { hints.repeated_shapes };
        let plans = Plans { source, entries: vec![(None, plan)], cap, fixed_failed: false };
        Ok(TractSession {
            part: part.to_string(),
            plans: std::sync::Mutex::new(plans),
            inputs,
            outputs,
            executor: self.executor.clone(),
        })
    }
}

/// Where a session's plans come from: the file and the facts it was loaded with, so that a plan
/// for other input shapes can be built from it later (the file's weights are not kept in memory
/// for that: it is read again).
struct Source {
    file: std::path::PathBuf,
    root: std::path::PathBuf,
    hints: super::LoadHints,
    /// Optimizer passes that failed on this graph (skipped on every later build).
    skip: Vec<String>,
    /// Length and modification time at load: a later build refuses a file changed since.
    stamp: Option<(u64, std::time::SystemTime)>,
}

fn stamp(file: &Path) -> Option<(u64, std::time::SystemTime)> {
    let m = std::fs::metadata(file).ok()?;
    Some((m.len(), m.modified().ok()?))
}

impl Source {
    /// The file's message, read again; refuses a file changed since load.
    fn read(&self) -> Result<tract_onnx::pb::ModelProto> {
        if stamp(&self.file) != self.stamp {
            return Err(Error::FileChanged { path: self.file.clone() });
        }
        Ok(read_proto_by_reference(&self.file, &self.root)?.1)
    }

    /// Parses, analyses and optimises the file's message into a plan: for the shapes the hints
    /// leave symbolic (`None`), or for these input shapes exactly.
    fn plan(
        &mut self,
        mut proto: tract_onnx::pb::ModelProto,
        shapes: Option<&[(String, Vec<usize>)]>,
    ) -> Result<Arc<TypedSimplePlan>> {
        let onnx_file = self.file.as_path();
        let load_err =
            |message: String| Error::OnnxLoad { path: onnx_file.to_path_buf(), backend: NAME.into(), message };
        let data_dir = crate::onnx_info::rebase_external_data(&mut proto, onnx_file, &self.root)?;
        let mut rewrites = super::rewrite::for_tract(&mut proto);
        if self.hints.last_position_logits && super::rewrite::last_position_logits(&mut proto) {
            rewrites.push("logits at the last position only");
        }
        if !rewrites.is_empty() {
            tracing::debug!("{}: rewrote {}", onnx_file.display(), rewrites.join(", "));
        }
        let dir = data_dir.as_deref().or(onnx_file.parent()).and_then(Path::to_str);
        let analyse_err = |e: TractError| {
            load_err(format!("tract could not analyse the graph: {e:#} (ONNX Runtime may run it: `--backend ort`; docs/compatibility.md)"))
        };
        // Optimised from a fresh parse of the message on every try: a pass that fails is skipped
        // on the next one, and no unoptimised copy of the weights is kept beside the plan for the
        // retry (the message holds only references to them).
        let skipped = self.skip.len();
        let model = loop {
            let mut parsed = parse(&proto, dir, &self.hints, onnx_file)?;
            if let Some(shapes) = shapes {
                fix_input_shapes(&mut parsed, shapes).map_err(|e| load_err(format!("fixing input shapes: {e:#}")))?;
            }
            let typed = parsed.into_typed().map_err(analyse_err)?;
            match optimize_skipping(typed, &self.skip) {
                Ok(m) => break m,
                Err(e) => match failing_pass(&e) {
                    Some(pass) if !self.skip.contains(&pass) && self.skip.len() < MAX_SKIPPED_PASSES => {
                        self.skip.push(pass)
                    }
                    _ => return Err(analyse_err(e)),
                },
            }
        };
        drop(proto);
        if self.skip.len() > skipped {
            tracing::debug!("{}: tract optimizer passes skipped: {}", onnx_file.display(), self.skip.join(", "));
        }
        model.into_runnable().map_err(analyse_err)
    }
}

/// Sets every input's shape to the one given for its name, keeping its element type.
fn fix_input_shapes(
    model: &mut tract_onnx::prelude::InferenceModel,
    shapes: &[(String, Vec<usize>)],
) -> TractResult<()> {
    for ix in 0..model.inputs.len() {
        let name = model.nodes[model.inputs[ix].node].name.clone();
        let Some((_, shape)) = shapes.iter().find(|(n, _)| *n == name) else { continue };
        let mut fact = model.input_fact(ix)?.clone();
        fact.shape = shape.iter().copied().collect();
        model.set_input_fact(ix, fact)?;
    }
    Ok(())
}

/// Every input's name and shape, in the graph's input order: what a fixed-shape plan is for.
type ShapeKey = Vec<(String, Vec<usize>)>;

/// A session's plans and where they come from: the one for symbolic shapes built at load,
/// then, where the part's input shapes repeat ([`super::LoadHints::repeated_shapes`]), one per
/// distinct input shape, most recently used last. tract picks its matrix kernels and fuses element-wise ops only where the
/// sizes are known: on SigLIP's layers a plan for a fixed token count runs 1.5-1.8x faster than
/// the symbolic one (docs/benchmarks.md, "Plans for fixed shapes").
struct Plans {
    /// What a new plan is built from (under the same lock: one build at a time).
    source: Source,
    entries: Vec<(Option<ShapeKey>, Arc<TypedSimplePlan>)>,
    /// Fixed-shape plans kept at most (0: the symbolic plan only).
    cap: usize,
    /// A fixed-shape build failed once: the symbolic plan serves from then on.
    fixed_failed: bool,
}

/// Gives tract the facts the folder knows before it analyses the graph: an axis declared
/// symbolic (or unknown) becomes the hinted size or expression. Exports with dynamic image
/// height/width, or with transformers' own attention-mask code (whose shapes multiply the
/// sequence symbols), analyse once batch, tile size and `total = past + sequence` are known.
fn apply_hints(model: &mut tract_onnx::prelude::InferenceModel, hints: &super::LoadHints) -> TractResult<()> {
    let inputs: Vec<String> = model.inputs.iter().map(|o| model.nodes[o.node].name.clone()).collect();
    for (pattern, axis, expr) in &hints.dims {
        for (ix, _) in inputs.iter().enumerate().filter(|(_, n)| super::hint_matches(pattern, n)) {
            apply_hint(model, ix, *axis, expr)?;
        }
    }
    Ok(())
}

fn apply_hint(model: &mut tract_onnx::prelude::InferenceModel, ix: usize, axis: usize, expr: &str) -> TractResult<()> {
    {
        let mut fact = model.input_fact(ix)?.clone();
        let fixed = match fact.shape.dim(axis) {
            None => return Ok(()),
            Some(tract_onnx::tract_hir::infer::GenericFactoid::Only(d)) => d.to_i64().is_ok(),
            Some(_) => false,
        };
        if fixed {
            return Ok(());
        }
        let value = model.symbols.parse_tdim(expr)?;
        fact.shape.set_dim(axis, value);
        model.set_input_fact(ix, fact)?;
    }
    Ok(())
}

/// The codegen pass tract 0.23.9 gets wrong on block-quantized (`MatMulNBits`, q4) weights.
const MERGE_AXES_PASS: &str = "MergeConsecutiveSameRoleAxes";

/// Most optimizer passes skipped before giving up on a graph.
const MAX_SKIPPED_PASSES: usize = 4;

/// Parses the message (external data resolved in `dir`) into tract's inference model with the
/// folder's hints applied.
fn parse(
    proto: &tract_onnx::pb::ModelProto,
    dir: Option<&str>,
    hints: &super::LoadHints,
    onnx_file: &Path,
) -> Result<tract_onnx::prelude::InferenceModel> {
    let load_err = |message: String| Error::OnnxLoad { path: onnx_file.to_path_buf(), backend: NAME.into(), message };
    // Intermediate value_info written by other tools (e.g. ORT shape inference during
    // quantization) can name the same length with unrelated symbols (`total_sequence_length`
    // vs `sequence_length + past_sequence_length`); tract infers those shapes itself.
    let framework = tract_onnx::onnx().with_ignore_value_info(true);
    let parsed = framework.parse(proto, dir).map_err(|e| load_err(format!("{e:#}")))?;
    if !parsed.unresolved_inputs.is_empty() {
        return Err(load_err(format!("unresolved inputs {:?}", parsed.unresolved_inputs)));
    }
    let mut model = parsed.model;
    apply_hints(&mut model, hints).map_err(|e| load_err(format!("applying input facts: {e:#}")))?;
    Ok(model)
}

fn optimize_skipping(mut model: TypedModel, skip: &[String]) -> TractResult<TypedModel> {
    use tract_onnx::tract_core::optim::Optimizer;
    for mut optimizer in [Optimizer::declutter(), Optimizer::codegen()] {
        optimizer.passes.retain(|p| !skip.contains(&pass_name(&format!("{p:?}"))));
        model.optimize_with_session(&mut optimizer.session())?;
    }
    Ok(model)
}

/// A pass's name from its debug form (`FoldUniformMask(60)` -> `FoldUniformMask`).
fn pass_name(debug: &str) -> String {
    debug.split(['(', ' ', '{']).next().unwrap_or(debug).to_string()
}

/// The pass an optimizer error names (`running pass FoldUniformMask(60): ...`).
fn failing_pass(e: &TractError) -> Option<String> {
    let text = format!("{e:#}");
    let rest = text.split("running pass ").nth(1)?;
    Some(pass_name(rest.split(':').next()?))
}

struct TractSession {
    part: String,
    plans: std::sync::Mutex<Plans>,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
    executor: tract_linalg::multithread::Executor,
}

impl Session for TractSession {
    fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    fn placement(&self) -> Placement {
        Placement::cpu(NAME)
    }

    fn fixed_plans(&self) -> Vec<String> {
        let Ok(plans) = self.plans.lock() else { return Vec::new() };
        let show = |key: &[(String, Vec<usize>)]| {
            key.iter().map(|(n, shape)| format!("{n} {shape:?}")).collect::<Vec<_>>().join("; ")
        };
        plans.entries.iter().filter_map(|(k, _)| k.as_deref().map(show)).collect()
    }

    fn run(&self, inputs: Vec<(&str, HostTensor)>) -> Result<Vec<HostTensor>> {
        let ordered = order_inputs(&self.part, &self.inputs, inputs)?;
        let shapes: ShapeKey =
            self.inputs.iter().zip(&ordered).map(|(info, t)| (info.name.clone(), t.shape().to_vec())).collect();
        let plan = self.plan_for(shapes)?;
        let infer_err = |message: String| Error::Inference { part: self.part.clone(), backend: NAME.into(), message };
        let executor = self.executor.clone();
        let run = move || -> Result<Vec<HostTensor>> {
            let values: TVec<TValue> = ordered.into_iter().map(|t| to_tract(t).into_tvalue()).collect();
            let outs = tract_linalg::multithread::multithread_tract_scope(executor, || {
                plan.spawn()?.run_plan_with_eval(values, eval_node)
            })
            .map_err(|e| infer_err(format!("{e:#}")))?;
            outs.into_iter()
                .zip(&self.outputs)
                .map(|(v, info)| {
                    from_tract(v.into_tensor()).map_err(|m| infer_err(format!("output `{}`: {m}", info.name)))
                })
                .collect()
        };
        // On a pool, the whole plan runs on one of its threads: each product then splits from
        // inside the pool instead of waking it from outside and sleeping until it is done, a
        // cross-thread hand-off per node that made small parts slower on 2 threads than on 1
        // (docs/benchmarks.md, "The plan runs inside the thread pool").
        match &self.executor {
            tract_linalg::multithread::Executor::MultiThread(pool) => pool.install(run),
            _ => run(),
        }
    }
}

impl TractSession {
    /// The plan for these input shapes: a fixed-shape plan where the part's shapes repeat (built
    /// on first use, least recently used dropped past the cap), else the symbolic one.
    fn plan_for(&self, shapes: ShapeKey) -> Result<Arc<TypedSimplePlan>> {
        let lock_err = || Error::Inference {
            part: self.part.clone(),
            backend: NAME.into(),
            message: "a run panicked while building a plan".into(),
        };
        let mut plans = self.plans.lock().map_err(|_| lock_err())?;
        if plans.cap == 0 || plans.fixed_failed {
            if let Some((_, plan)) = plans.entries.iter().find(|(k, _)| k.is_none()) {
                return Ok(plan.clone());
            }
        }
        if let Some(ix) = plans.entries.iter().position(|(k, _)| k.as_ref() == Some(&shapes)) {
            let entry = plans.entries.remove(ix);
            let plan = entry.1.clone();
            plans.entries.push(entry);
            return Ok(plan);
        }
        if plans.cap > 0 && !plans.fixed_failed {
            // room first, so that the new plan's build is the only extra copy of the weights
            plans.entries.retain(|(k, _)| k.is_some());
            while plans.entries.len() >= plans.cap {
                plans.entries.remove(0);
            }
            crate::memory::release_free();
            let built = plans.source.read().and_then(|proto| plans.source.plan(proto, Some(&shapes)));
            // the build's parse and unpacked copies are freed: give their pages back before the run
            crate::memory::release_free();
            match built {
                Ok(plan) => {
                    plans.entries.push((Some(shapes), plan.clone()));
                    return Ok(plan);
                }
                Err(e @ Error::FileChanged { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!("{}: no plan for input shapes {shapes:?}, running the symbolic one: {e}", self.part);
                    plans.fixed_failed = true;
                    plans.entries.clear();
                }
            }
        }
        let proto = plans.source.read()?;
        let plan = plans.source.plan(proto, None)?;
        plans.entries.push((None, plan.clone()));
        Ok(plan)
    }
}

/// Runs one node of a plan as tract does, then clears the upper halves of the vector registers.
/// tract's x86_64 assembly kernels return with them dirty, and legacy-SSE code that follows them
/// on the thread (glibc's `cosf` / `sinf` in rotary embeddings, tract's scalar and symbolic-
/// dimension ops) then pays a state transition: the rotary `Cos` of a 156-token testbed prefill
/// took 0.65 ms after a matrix product and 0.01 ms with the registers cleared (docs/benchmarks.md,
/// "Kernel choice, mask sums and plans under region skipping").
fn eval_node<F, O>(
    ctx: &tract_onnx::tract_core::plan::EvalContext,
    state: Option<&mut (dyn tract_onnx::tract_core::ops::OpState + 'static)>,
    node: &tract_onnx::tract_core::model::Node<F, O>,
    inputs: TVec<TValue>,
) -> TractResult<TVec<TValue>>
where
    F: Fact + Clone + 'static,
    O: std::fmt::Debug + std::fmt::Display + AsRef<dyn Op> + AsMut<dyn Op> + Clone + 'static,
{
    let out = tract_onnx::tract_core::plan::eval(ctx, state, node, inputs);
    clear_vector_upper();
    out
}

/// `vzeroupper` where the CPU has AVX; nothing elsewhere. Public for the per-node profiler
/// (`runtime/examples/nodeprof.rs`), which must run nodes as the session does.
pub fn clear_vector_upper() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        #[target_feature(enable = "avx")]
        unsafe fn vzeroupper() {
            std::arch::x86_64::_mm256_zeroupper();
        }
        // SAFETY: the CPU has AVX (checked above), which is all the instruction needs
        unsafe { vzeroupper() }
    }
}

fn to_tract(t: HostTensor) -> Tensor {
    match t {
        HostTensor::F32(a) => a.into(),
        HostTensor::F16(a) => a.into(),
        HostTensor::I64(a) => a.into(),
        HostTensor::Bool(a) => a.into(),
    }
}

fn from_tract(t: Tensor) -> std::result::Result<HostTensor, String> {
    let dt = t.datum_type();
    let conv = |e: TractError| format!("{e:#}");
    Ok(match dt {
        DatumType::F32 => HostTensor::F32(t.into_plain_array::<f32>().map_err(conv)?),
        DatumType::F16 => HostTensor::F16(t.into_plain_array::<half::f16>().map_err(conv)?),
        DatumType::I64 => HostTensor::I64(t.into_plain_array::<i64>().map_err(conv)?),
        DatumType::Bool => HostTensor::Bool(t.into_plain_array::<bool>().map_err(conv)?),
        DatumType::I32 => {
            HostTensor::I64(t.cast_to::<i64>().map_err(conv)?.into_owned().into_plain_array::<i64>().map_err(conv)?)
        }
        other => return Err(format!("unsupported output type {other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LoadHints;

    fn tiny() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-smolvlm")
    }

    fn stream(views: usize, tokens: usize) -> Vec<(&'static str, HostTensor)> {
        let x = ndarray::ArrayD::from_shape_fn(vec![views, tokens, 32], |ix| {
            ((ix[0] * 131 + ix[1] * 17 + ix[2] * 7) % 23) as f32 / 11.0 - 1.0
        });
        vec![
            ("hidden_states", HostTensor::F32(x)),
            ("attention_bias", HostTensor::F32(ndarray::ArrayD::zeros(vec![views, tokens]))),
        ]
    }

    fn outputs(s: &dyn Session, views: usize, tokens: usize) -> Vec<ndarray::ArrayD<f32>> {
        s.run(stream(views, tokens))
            .unwrap()
            .into_iter()
            .map(|t| match t {
                HostTensor::F32(a) => a,
                other => panic!("unexpected output {:?}", other.elem()),
            })
            .collect()
    }

    fn load(hints: &LoadHints, root: &Path, file: &Path) -> TractSession {
        TractBackend::new(1).unwrap().open(file, root, "vision_blocks_0", hints).unwrap()
    }

    fn session_plans(s: &TractSession) -> Vec<Option<Vec<usize>>> {
        let plans = s.plans.lock().unwrap();
        plans.entries.iter().map(|(k, _)| k.as_ref().map(|k| k[0].1.clone())).collect()
    }

    #[test]
    fn fixed_shape_plans_equal_the_symbolic_plan_and_keep_at_most_the_cap() {
        let root = tiny();
        let file = root.join("onnx/vision_blocks_0.onnx");
        let symbolic = load(&LoadHints::default(), &root, &file);
        let fixed = load(&LoadHints::default().repeated_shapes(2), &root, &file);
        for (views, tokens) in [(1, 64), (1, 20), (2, 64), (1, 64)] {
            let a = outputs(&symbolic, views, tokens);
            let b = outputs(&fixed, views, tokens);
            for (a, b) in a.iter().zip(&b) {
                assert_eq!(a.shape(), b.shape());
                let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(diff <= 1e-5, "{views}x{tokens}: fixed-shape plan differs by {diff}");
            }
        }
        // symbolic sessions keep their one plan; the fixed one keeps the two most recent shapes
        assert_eq!(session_plans(&symbolic), vec![None]);
        assert_eq!(session_plans(&fixed), vec![Some(vec![2, 64, 32]), Some(vec![1, 64, 32])]);
    }

    #[test]
    fn a_file_changed_after_load_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vision_blocks_0.onnx");
        std::fs::copy(tiny().join("onnx/vision_blocks_0.onnx"), &file).unwrap();
        let s = load(&LoadHints::default().repeated_shapes(1), dir.path(), &file);
        outputs(&s, 1, 64);
        // same length, new modification time: a rebuild from it would mix two models
        let bytes = std::fs::read(&file).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, &bytes).unwrap();
        let Err(e) = s.run(stream(1, 20)) else { panic!("a changed file must be refused") };
        let e = e.to_string();
        assert!(e.contains("vision_blocks_0.onnx") && e.contains("changed or was removed since it was loaded"), "{e}");
    }
}
