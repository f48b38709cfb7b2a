//! Backend-independent facts about an ONNX file: declared inputs and outputs, parameter counts,
//! operators, and the external-data safety check.
//!
//! They come from the file's *header* ([`read_header`]): the protobuf decoded through a memory
//! map into types that leave out every weight field, so no weight byte is read or copied (a
//! 1 GB encoder costs a few MB of graph structure). The full message ([`read_proto`]) is decoded
//! only where a consumer needs the weights too: tract's parser and `glimpse split`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tract_onnx::pb;
use tract_onnx::prelude::Framework;

use crate::backend::{Dim, ElemType, TensorInfo};
use crate::error::{Error, Result};
use crate::folder::check_external_location;

/// The ONNX messages with only the fields Glimpse reads (same field numbers as `onnx.proto`).
/// prost skips the others, weights included, by advancing past them in the map: their pages
/// are never touched.
pub mod header {
    use tract_onnx::pb;

    /// `ModelProto`: opsets and the graph.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Model {
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<pb::OperatorSetIdProto>,
        #[prost(message, optional, tag = "7")]
        pub graph: Option<Graph>,
    }

    /// `GraphProto`: nodes, initializers (without data), declared inputs and outputs.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Graph {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<Node>,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<Tensor>,
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<pb::ValueInfoProto>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<pb::ValueInfoProto>,
    }

    /// `NodeProto`: name, operator, the attributes that can hold tensors or subgraphs, and the
    /// metadata where torch's dynamo exporter records each node's module scope (field 9, which
    /// tract's generated types predate).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Node {
        #[prost(string, tag = "3")]
        pub name: String,
        #[prost(message, repeated, tag = "9")]
        pub metadata_props: Vec<pb::StringStringEntryProto>,
        #[prost(string, tag = "4")]
        pub op_type: String,
        #[prost(string, tag = "7")]
        pub domain: String,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<Attribute>,
    }

    /// `AttributeProto`: tensor and graph values only.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Attribute {
        #[prost(message, optional, tag = "5")]
        pub t: Option<Tensor>,
        #[prost(message, optional, tag = "6")]
        pub g: Option<Graph>,
        #[prost(message, repeated, tag = "10")]
        pub tensors: Vec<Tensor>,
        #[prost(message, repeated, tag = "11")]
        pub graphs: Vec<Graph>,
    }

    /// `TensorProto` without its data: name, shape and where external data lives.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tensor {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(message, repeated, tag = "13")]
        pub external_data: Vec<pb::StringStringEntryProto>,
    }
}

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

fn parse_error(path: &Path, message: String) -> Error {
    Error::OnnxLoad { path: path.to_path_buf(), backend: "onnx parser".into(), message }
}

/// The file mapped read-only, after checking it is a regular, non-empty file.
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    if !path.is_file() {
        return Err(Error::MissingFile { path: path.to_path_buf(), what: "ONNX file".into() });
    }
    let file = std::fs::File::open(path).map_err(|e| parse_error(path, format!("cannot open: {e}")))?;
    if file.metadata().is_ok_and(|m| m.len() == 0) {
        return Err(parse_error(path, "the file is empty (0 bytes)".into()));
    }
    // SAFETY: the map is read-only and lives only while it is decoded, which copies what it
    // keeps; as for tract's own loader, the file must not be truncated while it is read.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| parse_error(path, format!("cannot map: {e}")))
}

/// The header decoded from a file's bytes, with its graph and external data checked.
fn decode_header(path: &Path, root: &Path, bytes: &[u8]) -> Result<header::Model> {
    use prost::Message;
    let model =
        header::Model::decode(bytes).map_err(|e| parse_error(path, format!("not a valid ONNX protobuf: {e}")))?;
    let graph = model.graph.as_ref().ok_or_else(|| parse_error(path, "the file has no graph".into()))?;
    check_graph_external_data(graph, path, root)?;
    Ok(model)
}

/// Reads an ONNX file's header (graph structure without weight data), refusing corrupt bytes,
/// a file without a graph and external data outside `root`.
pub fn read_header(path: &Path, root: &Path) -> Result<header::Model> {
    decode_header(path, root, &map_file(path)?)
}

/// Parses an ONNX file's whole protobuf, weights included, after [`read_header`]'s checks.
pub fn read_proto(path: &Path, root: &Path) -> Result<pb::ModelProto> {
    read_header(path, root)?;
    let proto = tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|e| parse_error(path, format!("not a valid ONNX protobuf: {e}")))?;
    if proto.graph.is_none() {
        return Err(parse_error(path, "the file has no graph".into()));
    }
    Ok(proto)
}

/// Parses an ONNX file for a backend that reads external data itself, from one mapping of the
/// file: its header (checked as by [`read_header`]) and its protobuf, in which every embedded
/// initializer of at least [`BY_REFERENCE_MIN_BYTES`] is an external-data reference into the
/// ONNX file itself (its offset and length there), so the message holds no copy of the weights
/// and the backend reads each one straight into its own tensor.
pub fn read_proto_by_reference(path: &Path, root: &Path) -> Result<(header::Model, pb::ModelProto)> {
    use prost::Message;
    let map = map_file(path)?;
    let header = decode_header(path, root, &map)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| parse_error(path, "the file name is not UTF-8".into()))?;
    let small = wire::weights_by_reference(&map, name)
        .map_err(|e| parse_error(path, format!("not a valid ONNX protobuf: {e}")))?;
    drop(map);
    let proto =
        pb::ModelProto::decode(&small[..]).map_err(|e| parse_error(path, format!("not a valid ONNX protobuf: {e}")))?;
    if proto.graph.is_none() {
        return Err(parse_error(path, "the file has no graph".into()));
    }
    Ok((header, proto))
}

/// Embedded initializers smaller than this stay in the message (a reference costs a file
/// mapping when it is read).
pub const BY_REFERENCE_MIN_BYTES: usize = 64 * 1024;

/// Protobuf wire-format surgery on an ONNX `ModelProto`, field numbers from `onnx.proto`.
mod wire {
    use std::ops::Range;

    const VARINT: u64 = 0;
    const FIXED64: u64 = 1;
    const LEN: u64 = 2;
    const FIXED32: u64 = 5;

    /// One field of a message: its number and wire type, where the whole field starts, and
    /// its payload (the value bytes; for length-delimited fields, the bytes after the length).
    struct Field {
        number: u64,
        wire: u64,
        start: usize,
        payload: Range<usize>,
    }

    fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *buf.get(*pos).ok_or("truncated varint")?;
            *pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn put_len(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
        put_varint(out, number << 3 | LEN);
        put_varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }

    /// The fields of the message in `buf[range]`.
    fn fields(buf: &[u8], range: Range<usize>) -> Result<Vec<Field>, String> {
        let mut out = Vec::new();
        let mut pos = range.start;
        while pos < range.end {
            let start = pos;
            let key = varint(buf, &mut pos)?;
            let (number, wire) = (key >> 3, key & 7);
            let payload = match wire {
                VARINT => {
                    let from = pos;
                    varint(buf, &mut pos)?;
                    from..pos
                }
                FIXED64 => pos..pos + 8,
                FIXED32 => pos..pos + 4,
                LEN => {
                    let len = usize::try_from(varint(buf, &mut pos)?).map_err(|_| "length too large")?;
                    pos..pos.checked_add(len).ok_or("length overflows")?
                }
                w => return Err(format!("wire type {w} in field {number}")),
            };
            if payload.end > range.end {
                return Err(format!("field {number} runs past the end of its message"));
            }
            pos = payload.end;
            out.push(Field { number, wire, start, payload });
        }
        Ok(out)
    }

    /// `ModelProto` with its graph's large embedded initializers turned into references into
    /// `file_name` (the file `buf` was read from).
    pub fn weights_by_reference(buf: &[u8], file_name: &str) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for f in fields(buf, 0..buf.len())? {
            if f.number == 7 && f.wire == LEN {
                put_len(&mut out, 7, &graph(buf, f.payload, file_name)?);
            } else {
                out.extend_from_slice(&buf[f.start..f.payload.end]);
            }
        }
        Ok(out)
    }

    /// `GraphProto` (field 5: initializer).
    fn graph(buf: &[u8], range: Range<usize>, file_name: &str) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for f in fields(buf, range)? {
            if f.number == 5 && f.wire == LEN {
                put_len(&mut out, 5, &tensor(buf, f.payload, file_name)?);
            } else {
                out.extend_from_slice(&buf[f.start..f.payload.end]);
            }
        }
        Ok(out)
    }

    /// `TensorProto`: `raw_data` (9) becomes `external_data` (13: location, offset, length)
    /// with `data_location` (14) EXTERNAL, when it is large and the tensor is not external
    /// already.
    fn tensor(buf: &[u8], range: Range<usize>, file_name: &str) -> Result<Vec<u8>, String> {
        let fields = fields(buf, range.clone())?;
        let raw = fields.iter().find(|f| f.number == 9 && f.wire == LEN).map(|f| f.payload.clone());
        let external = fields.iter().any(|f| f.number == 13 || f.number == 14);
        let Some(raw) = raw.filter(|r| r.len() >= super::BY_REFERENCE_MIN_BYTES && !external) else {
            return Ok(buf[range].to_vec());
        };
        let mut out = Vec::new();
        for f in fields.iter().filter(|f| !(f.number == 9 && f.wire == LEN)) {
            out.extend_from_slice(&buf[f.start..f.payload.end]);
        }
        for (key, value) in
            [("location", file_name.to_string()), ("offset", raw.start.to_string()), ("length", raw.len().to_string())]
        {
            let mut entry = Vec::new();
            put_len(&mut entry, 1, key.as_bytes());
            put_len(&mut entry, 2, value.as_bytes());
            put_len(&mut out, 13, &entry);
        }
        put_varint(&mut out, 14 << 3 | VARINT);
        put_varint(&mut out, 1);
        Ok(out)
    }

    #[cfg(test)]
    mod tests {
        use prost::Message;
        use tract_onnx::pb;

        fn model(raw: Vec<u8>) -> pb::ModelProto {
            let t = pb::TensorProto {
                name: "w".into(),
                dims: vec![raw.len() as i64 / 4],
                data_type: 1,
                raw_data: raw,
                ..Default::default()
            };
            let small = pb::TensorProto {
                name: "b".into(),
                dims: vec![1],
                data_type: 1,
                raw_data: vec![0, 0, 128, 63],
                ..Default::default()
            };
            pb::ModelProto {
                ir_version: 8,
                graph: Some(pb::GraphProto { name: "g".into(), initializer: vec![t, small], ..Default::default() }),
                ..Default::default()
            }
        }

        #[test]
        fn large_initializers_become_references_to_their_bytes_in_the_file() {
            let raw: Vec<u8> = (0..super::super::BY_REFERENCE_MIN_BYTES as u32 * 2).map(|i| (i % 251) as u8).collect();
            let bytes = model(raw.clone()).encode_to_vec();
            let out = super::weights_by_reference(&bytes, "m.onnx").unwrap();
            assert!(out.len() < 1024, "the weights left the message: {} bytes", out.len());
            let p = pb::ModelProto::decode(&out[..]).unwrap();
            let g = p.graph.unwrap();
            let (w, b) = (&g.initializer[0], &g.initializer[1]);
            assert!(w.raw_data.is_empty());
            assert_eq!(w.data_location, Some(1));
            let kv = |k: &str| w.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone()).unwrap();
            assert_eq!(kv("location"), "m.onnx");
            let (off, len): (usize, usize) = (kv("offset").parse().unwrap(), kv("length").parse().unwrap());
            assert_eq!(&bytes[off..off + len], &raw[..], "the reference points at the weight's own bytes");
            assert_eq!((w.dims.clone(), w.name.as_str()), (vec![raw.len() as i64 / 4], "w"));
            assert_eq!(b.raw_data, vec![0, 0, 128, 63], "small initializers stay embedded");
        }

        #[test]
        fn corrupt_messages_are_errors_not_panics() {
            let bytes = model(vec![1; 70_000]).encode_to_vec();
            for cut in [1, 7, 100, bytes.len() / 2, bytes.len() - 1] {
                assert!(super::weights_by_reference(&bytes[..cut], "m.onnx").is_err(), "cut at {cut}");
            }
            assert!(super::weights_by_reference(&[0x0b], "m.onnx").is_err(), "group wire type");
        }
    }
}

/// Describes an ONNX file without building an execution plan (or reading its weights).
pub fn describe(path: &Path, root: &Path) -> Result<OnnxSummary> {
    let model = read_header(path, root)?;
    let graph = model.graph.as_ref().ok_or_else(|| parse_error(path, "the file has no graph".into()))?;
    let (inputs, outputs) = graph_io(graph);
    let mut operators = BTreeMap::new();
    count_ops(graph, &mut operators);
    // saturating: a corrupt file may declare dims whose product overflows
    let parameters = graph
        .initializer
        .iter()
        .map(|t| t.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d.max(0) as u64)))
        .fold(0u64, u64::saturating_add);
    let opsets = model
        .opset_import
        .iter()
        .map(|o| (if o.domain.is_empty() { "ai.onnx".to_string() } else { o.domain.clone() }, o.version))
        .collect();
    Ok(OnnxSummary { inputs, outputs, parameters, operators, opsets })
}

/// Whether any node of `graph` (or of its subgraphs) is `op_type`.
pub fn uses_op(graph: &header::Graph, op_type: &str) -> bool {
    let mut ops = BTreeMap::new();
    count_ops(graph, &mut ops);
    ops.keys().any(|k| k.rsplit("::").next() == Some(op_type))
}

fn count_ops(graph: &header::Graph, ops: &mut BTreeMap<String, usize>) {
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
pub fn graph_io(graph: &header::Graph) -> (Vec<TensorInfo>, Vec<TensorInfo>) {
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
                    backend: "onnx parser".into(),
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
pub fn check_graph_external_data(graph: &header::Graph, onnx_file: &Path, root: &Path) -> Result<()> {
    let check = |t: &header::Tensor| -> Result<()> {
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

#[cfg(test)]
mod tests {
    use prost::Message;
    use tract_onnx::pb;

    /// A corrupt file whose declared dims overflow a u64 product is described, not a panic
    /// (the cargo-afl `onnx` target found it: overflow checks are on in fuzz builds); the
    /// count saturates instead of wrapping to a small, wrong number.
    #[test]
    fn overflowing_dims_saturate_the_parameter_count() {
        let huge = pb::TensorProto { name: "w".into(), dims: vec![1 << 40, 1 << 40, 1 << 40], ..Default::default() };
        let model = pb::ModelProto {
            ir_version: 8,
            graph: Some(pb::GraphProto {
                name: "g".into(),
                initializer: vec![huge.clone(), huge],
                ..Default::default()
            }),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, model.encode_to_vec()).unwrap();
        let summary = super::describe(&path, dir.path()).unwrap();
        assert_eq!(summary.parameters, u64::MAX);
    }
}
