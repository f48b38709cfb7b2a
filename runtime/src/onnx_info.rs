//! Backend-independent facts about an ONNX file, read from its protobuf (tract-onnx's generated
//! types serve as the parser): declared inputs and outputs, parameter counts, operators, and the
//! external-data safety check.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tract_onnx::pb;
use tract_onnx::prelude::Framework;

use crate::backend::{Dim, ElemType, TensorInfo};
use crate::error::{Error, Result};
use crate::folder::check_external_location;

/// Summary of one ONNX file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OnnxSummary {
    /// Declared inputs.
    #[serde(serialize_with = "infos")]
    pub inputs: Vec<TensorInfo>,
    /// Declared outputs.
    #[serde(serialize_with = "infos")]
    pub outputs: Vec<TensorInfo>,
    /// Number of weight elements (initializers), external data included.
    pub parameters: u64,
    /// Operator counts by `domain::type`.
    pub operators: BTreeMap<String, usize>,
    /// Opset imports, `domain -> version`.
    pub opsets: BTreeMap<String, i64>,
}

fn infos<S: serde::Serializer>(v: &[TensorInfo], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|i| i.to_string()))
}

/// Parses an ONNX file's protobuf, refusing corrupt bytes and external data outside `root`.
pub fn read_proto(path: &Path, root: &Path) -> Result<pb::ModelProto> {
    if !path.is_file() {
        return Err(Error::MissingFile { path: path.to_path_buf(), what: "ONNX file".into() });
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        return Err(Error::OnnxLoad {
            path: path.to_path_buf(),
            backend: "onnx parser".into(),
            message: "the file is empty (0 bytes)".into(),
        });
    }
    let proto = tract_onnx::onnx().proto_model_for_path(path).map_err(|e| Error::OnnxLoad {
        path: path.to_path_buf(),
        backend: "onnx parser".into(),
        message: format!("not a valid ONNX protobuf: {e}"),
    })?;
    let graph = proto.graph.as_ref().ok_or_else(|| Error::OnnxLoad {
        path: path.to_path_buf(),
        backend: "onnx parser".into(),
        message: "the file has no graph".into(),
    })?;
    check_graph_external_data(graph, path, root)?;
    Ok(proto)
}

/// Describes an ONNX file without building an execution plan.
pub fn describe(path: &Path, root: &Path) -> Result<OnnxSummary> {
    let proto = read_proto(path, root)?;
    let graph = proto.graph.as_ref().expect("checked by read_proto");
    let (inputs, outputs) = graph_io(graph);
    let mut operators = BTreeMap::new();
    count_ops(graph, &mut operators);
    let parameters = graph.initializer.iter().map(|t| t.dims.iter().map(|&d| d.max(0) as u64).product::<u64>()).sum();
    let opsets = proto
        .opset_import
        .iter()
        .map(|o| (if o.domain.is_empty() { "ai.onnx".to_string() } else { o.domain.clone() }, o.version))
        .collect();
    Ok(OnnxSummary { inputs, outputs, parameters, operators, opsets })
}

/// Whether any node of `graph` (or of its subgraphs) is `op_type`.
pub fn uses_op(graph: &pb::GraphProto, op_type: &str) -> bool {
    let mut ops = BTreeMap::new();
    count_ops(graph, &mut ops);
    ops.keys().any(|k| k.rsplit("::").next() == Some(op_type))
}

fn count_ops(graph: &pb::GraphProto, ops: &mut BTreeMap<String, usize>) {
    for node in &graph.node {
        let domain = if node.domain.is_empty() { "ai.onnx" } else { node.domain.as_str() };
        *ops.entry(format!("{domain}::{}", node.op_type)).or_default() += 1;
        for attr in &node.attribute {
            if let Some(g) = &attr.g {
                count_ops(g, ops);
            }
            for g in &attr.graphs {
                count_ops(g, ops);
            }
        }
    }
}

/// Declared inputs (excluding initializers listed as inputs, as old exporters did) and outputs.
pub fn graph_io(graph: &pb::GraphProto) -> (Vec<TensorInfo>, Vec<TensorInfo>) {
    let inits: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs = graph.input.iter().filter(|v| !inits.contains(v.name.as_str())).map(value_info).collect();
    let outputs = graph.output.iter().map(value_info).collect();
    (inputs, outputs)
}

fn value_info(v: &pb::ValueInfoProto) -> TensorInfo {
    use pb::tensor_proto::DataType;
    use pb::tensor_shape_proto::dimension::Value as D;
    use pb::type_proto::Value as T;
    let (elem, shape) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(T::TensorType(tt)) => {
            let elem = match DataType::try_from(tt.elem_type) {
                Ok(DataType::Float) => ElemType::F32,
                Ok(DataType::Float16) => ElemType::F16,
                Ok(DataType::Int64) => ElemType::I64,
                Ok(DataType::Int32) => ElemType::I32,
                Ok(DataType::Bool) => ElemType::Bool,
                Ok(DataType::Uint8) => ElemType::U8,
                _ => ElemType::Other("unsupported"),
            };
            let shape = tt
                .shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .enumerate()
                        .map(|(i, d)| match &d.value {
                            Some(D::DimValue(n)) if *n >= 0 => Dim::Fixed(*n as usize),
                            Some(D::DimParam(p)) => Dim::Symbol(p.clone()),
                            _ => Dim::Symbol(format!("d{i}")),
                        })
                        .collect()
                })
                .unwrap_or_default();
            (elem, shape)
        }
        None => (ElemType::Other("untyped"), Vec::new()),
    };
    TensorInfo { name: v.name.clone(), elem, shape }
}

/// Refuses external-data locations that leave the model folder, in the graph and any subgraph.
/// Every external-data tensor of a graph and its subgraphs: initializers and tensor attributes
/// (`Constant` values).
fn external_tensors(g: &mut pb::GraphProto) -> Vec<&mut pb::TensorProto> {
    fn walk<'a>(g: &'a mut pb::GraphProto, out: &mut Vec<&'a mut pb::TensorProto>) {
        out.extend(g.initializer.iter_mut().filter(|t| t.external_data.iter().any(|kv| kv.key == "location")));
        for node in &mut g.node {
            for attr in &mut node.attribute {
                out.extend(attr.t.iter_mut().filter(|t| t.external_data.iter().any(|kv| kv.key == "location")));
                out.extend(attr.tensors.iter_mut().filter(|t| t.external_data.iter().any(|kv| kv.key == "location")));
                if let Some(sub) = attr.g.as_mut() {
                    walk(sub, out);
                }
                for sub in &mut attr.graphs {
                    walk(sub, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(g, &mut out);
    out
}

/// Points every external-data `location` of a model at its resolved file, relative to the
/// deepest folder holding them all, and returns that folder: backends that resolve locations
/// against one directory (tract) then read the same files the check allowed, also when they are
/// symlinks into a Hugging Face cache's `blobs/`. `None` when the model has no external data.
pub fn rebase_external_data(proto: &mut pb::ModelProto, onnx_file: &Path, root: &Path) -> Result<Option<PathBuf>> {
    let Some(g) = proto.graph.as_mut() else { return Ok(None) };
    let mut tensors = external_tensors(g);
    let mut files = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let loc = t.external_data.iter().find(|kv| kv.key == "location").map(|kv| kv.value.clone()).unwrap_or_default();
        files.push(check_external_location(onnx_file, &loc, root)?);
    }
    let Some(mut base) = files.first().and_then(|f| f.parent()).map(Path::to_path_buf) else { return Ok(None) };
    for f in &files {
        while !f.starts_with(&base) {
            if !base.pop() {
                return Err(Error::OnnxLoad {
                    path: onnx_file.to_path_buf(),
                    backend: "tract".into(),
                    message: "external data files share no folder".into(),
                });
            }
        }
    }
    for (t, f) in tensors.iter_mut().zip(&files) {
        let rel = f.strip_prefix(&base).unwrap_or(f).to_string_lossy().into_owned();
        if let Some(kv) = t.external_data.iter_mut().find(|kv| kv.key == "location") {
            kv.value = rel;
        }
    }
    Ok(Some(base))
}

/// Checks every external-data location of a graph (initializers, tensor attributes, subgraphs).
pub fn check_graph_external_data(graph: &pb::GraphProto, onnx_file: &Path, root: &Path) -> Result<()> {
    let check = |t: &pb::TensorProto| -> Result<()> {
        match t.external_data.iter().find(|kv| kv.key == "location") {
            Some(loc) => check_external_location(onnx_file, &loc.value, root).map(drop),
            None => Ok(()),
        }
    };
    for t in &graph.initializer {
        check(t)?;
    }
    for node in &graph.node {
        for attr in &node.attribute {
            attr.t.iter().chain(&attr.tensors).try_for_each(check)?;
            if let Some(g) = &attr.g {
                check_graph_external_data(g, onnx_file, root)?;
            }
            for g in &attr.graphs {
                check_graph_external_data(g, onnx_file, root)?;
            }
        }
    }
    Ok(())
}
