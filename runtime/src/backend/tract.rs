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
        Ok(TractBackend { executor, threads })
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
    make: |opts| Ok(Box::new(TractBackend::new(opts.threads)?)),
    starts: |_| Ok(()),
    views_one_by_one: true,
};

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn load(&self, onnx_file: &Path, root: &Path, part: &str, hints: &super::LoadHints) -> Result<Box<dyn Session>> {
        let load_err =
            |message: String| Error::OnnxLoad { path: onnx_file.to_path_buf(), backend: NAME.into(), message };
        let (header, mut proto) = read_proto_by_reference(onnx_file, root)?;
        let graph = header.graph.as_ref().ok_or_else(|| load_err("the file has no graph".into()))?;
        let (inputs, outputs) = graph_io(graph);
        let block_quant = uses_op(graph, "MatMulNBits");
        drop(header);
        let data_dir = crate::onnx_info::rebase_external_data(&mut proto, onnx_file, root)?;
        let mut rewrites = super::rewrite::for_tract(&mut proto);
        if hints.last_position_logits && super::rewrite::last_position_logits(&mut proto) {
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
        let mut skip: Vec<String> = if block_quant { vec![MERGE_AXES_PASS.to_string()] } else { Vec::new() };
        let model = loop {
            let typed = parse(&proto, dir, hints, onnx_file)?.into_typed().map_err(analyse_err)?;
            match optimize_skipping(typed, &skip) {
                Ok(m) => break m,
                Err(e) => match failing_pass(&e) {
                    Some(pass) if !skip.contains(&pass) && skip.len() < MAX_SKIPPED_PASSES => skip.push(pass),
                    _ => return Err(analyse_err(e)),
                },
            }
        };
        drop(proto);
        if !skip.is_empty() {
            tracing::debug!("{}: tract optimizer passes skipped: {}", onnx_file.display(), skip.join(", "));
        }
        let plan = model.into_runnable().map_err(analyse_err)?;
        Ok(Box::new(TractSession { part: part.to_string(), plan, inputs, outputs, executor: self.executor.clone() }))
    }
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
    plan: Arc<TypedSimplePlan>,
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

    fn run(&self, inputs: Vec<(&str, HostTensor)>) -> Result<Vec<HostTensor>> {
        let ordered = order_inputs(&self.part, &self.inputs, inputs)?;
        let values: TVec<TValue> = ordered.into_iter().map(|t| to_tract(t).into_tvalue()).collect();
        let infer_err = |message: String| Error::Inference { part: self.part.clone(), backend: NAME.into(), message };
        let outs = tract_linalg::multithread::multithread_tract_scope(self.executor.clone(), || self.plan.run(values))
            .map_err(|e| infer_err(format!("{e:#}")))?;
        outs.into_iter()
            .zip(&self.outputs)
            .map(|(v, info)| from_tract(v.into_tensor()).map_err(|m| infer_err(format!("output `{}`: {m}", info.name))))
            .collect()
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
