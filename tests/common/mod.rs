//! Shared helpers for the integration tests: paths of the committed models and the fixture
//! files that `tools/export` records from transformers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

/// Repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A committed model folder.
pub fn model(name: &str) -> PathBuf {
    repo().join("models").join(name)
}

/// Backends the checks run on: tract, and ONNX Runtime (one thread) where the venv provides it
/// (the `venv-tests` feature).
pub fn backends() -> Vec<glimpse::runtime::PipelineOptions> {
    #[allow(unused_mut)]
    let mut v = vec![glimpse::runtime::PipelineOptions::default()];
    #[cfg(feature = "venv-tests")]
    v.push(glimpse::runtime::PipelineOptions {
        backend: "ort".into(),
        backend_options: glimpse::runtime::backend::BackendOptions {
            ort_library: Some(ort_library()),
            threads: 1,
            ..Default::default()
        },
        ..Default::default()
    });
    v
}

/// The ONNX Runtime library for the ort backend tests: `ORT_DYLIB_PATH`, else the export venv's
/// onnxruntime==1.31.1 wheel (`.ci/run` creates it); without either the calling test fails and says
/// how to get one.
pub fn ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return p.into();
    }
    // whichever python3.X the venv was made with
    let lib = repo().join(".venv/lib");
    let found = std::fs::read_dir(&lib).into_iter().flatten().flatten().find_map(|e| {
        let p = e.path().join("site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1");
        (e.file_name().to_string_lossy().starts_with("python3") && p.is_file()).then_some(p)
    });
    found.unwrap_or_else(|| {
        panic!(
            "no ONNX Runtime library: set ORT_DYLIB_PATH or create the venv with `python3 -m venv .venv && .venv/bin/pip install -r tools/export/requirements.txt` (`bash .ci/run` does) so that {}/python3.*/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 exists",
            lib.display()
        )
    })
}

/// The tiny models with transformers fixtures.
pub const TINY_MODELS: [&str; 3] = ["tiny-smolvlm", "tiny-llava", "tiny-llava-onevision"];

/// One recorded case of `fixtures/fixtures.json`.
pub struct Case {
    pub dir: PathBuf,
    pub json: Value,
}

impl Case {
    pub fn name(&self) -> &str {
        self.json["name"].as_str().expect("case name")
    }
    pub fn image(&self) -> PathBuf {
        self.dir.join(self.json["image"].as_str().expect("case image"))
    }
    pub fn prompt(&self) -> &str {
        self.json["prompt"].as_str().expect("case prompt")
    }
    pub fn ints(&self, key: &str) -> Vec<i64> {
        self.json[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} missing"))
            .iter()
            .map(|v| v.as_i64().expect("int"))
            .collect()
    }
    pub fn layout(&self) -> Option<(usize, usize)> {
        let l = &self.json["layout"];
        if l.is_null() {
            return None;
        }
        Some((l["rows"].as_u64().expect("rows") as usize, l["cols"].as_u64().expect("cols") as usize))
    }
    pub fn has_tensor(&self, key: &str) -> bool {
        !self.json["tensors"][key].is_null()
    }
    pub fn f32(&self, key: &str) -> ArrayD<f32> {
        let (bytes, shape) = self.raw(key, "f32");
        let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        ArrayD::from_shape_vec(IxDyn(&shape), v).expect("fixture shape")
    }
    pub fn bools(&self, key: &str) -> ArrayD<bool> {
        let (bytes, shape) = self.raw(key, "u8");
        ArrayD::from_shape_vec(IxDyn(&shape), bytes.iter().map(|&b| b != 0).collect()).expect("fixture shape")
    }
    fn raw(&self, key: &str, dtype: &str) -> (Vec<u8>, Vec<usize>) {
        let t = &self.json["tensors"][key];
        assert_eq!(t["dtype"].as_str(), Some(dtype), "{key} dtype");
        let shape: Vec<usize> =
            t["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim") as usize).collect();
        let path = self.dir.join(t["file"].as_str().expect("file"));
        (std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())), shape)
    }
}

/// The recorded cases of a model folder.
pub fn cases(model_dir: &Path) -> (String, Vec<Case>) {
    let dir = model_dir.join("fixtures");
    let path = dir.join("fixtures.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: Value = serde_json::from_str(&text).expect("fixtures.json parses");
    let family = json["family"].as_str().expect("family").to_string();
    let cases =
        json["cases"].as_array().expect("cases").iter().map(|c| Case { dir: dir.clone(), json: c.clone() }).collect();
    (family, cases)
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Mean absolute difference.
pub fn mean_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let sum: f64 = a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs() as f64).sum();
    (sum / a.len().max(1) as f64) as f32
}

/// Copies a model folder into a fresh temporary directory so a test can damage it.
pub fn temp_copy(model_dir: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(model_dir, tmp.path());
    tmp
}

/// Copies a folder recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

/// The declared f32 tensor `name` of fixed shape `dims`, for graphs the tests build.
pub fn f32_value_info(name: &str, dims: &[i64]) -> tract_onnx::pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    use tract_onnx::pb;
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension { value: Some(Value::DimValue(d)), ..Default::default() })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One node of a graph the tests build: `op` on `inputs`, writing `output`.
pub fn node(op: &str, inputs: &[&str], output: &str) -> tract_onnx::pb::NodeProto {
    tract_onnx::pb::NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

/// Writes `graph` as an ONNX file (IR 8, opset 17) at `path`.
pub fn write_graph(path: &Path, graph: tract_onnx::pb::GraphProto) {
    use prost::Message;
    use tract_onnx::pb;
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(graph),
        ..Default::default()
    };
    std::fs::write(path, model.encode_to_vec()).expect("write model");
}
