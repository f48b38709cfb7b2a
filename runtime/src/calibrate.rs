//! The machine's limits, measured: GEMM throughput through the backend's own matmul (a one-node
//! ONNX model run like any model part) and memory read bandwidth. Profiling reports prefill and
//! decode efficiency against these.

use std::time::Instant;

use ndarray::Array2;
use prost::Message;
use serde::Serialize;
use tract_onnx::pb;

use crate::backend::{Backend, Tensor};
use crate::error::{Error, Result};

/// Measured limits.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// Backend whose matmul was timed.
    pub backend: String,
    /// `[m, k, n]` of the timed GEMM.
    pub gemm_shape: [usize; 3],
    /// Best GEMM throughput, GFLOP/s.
    pub gemm_gflops: f64,
    /// Best read bandwidth over all threads, GB/s.
    pub bandwidth_gb_s: f64,
    /// Threads used for the bandwidth test.
    pub bandwidth_threads: usize,
}

/// A one-node ONNX model computing `c = a · b` with `b` `[k, n]` stored as a weight.
pub fn matmul_model(k: usize, n: usize) -> Vec<u8> {
    let b: Vec<u8> = (0..k * n).flat_map(|i| (((i * 7919) % 1000) as f32 / 1000.0 - 0.5).to_le_bytes()).collect();
    let vi = |name: &str, dims: Vec<pb::tensor_shape_proto::Dimension>| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim: dims }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    use pb::tensor_shape_proto::dimension::Value as D;
    let dim = |v: D| pb::tensor_shape_proto::Dimension { value: Some(v), ..Default::default() };
    let graph = pb::GraphProto {
        name: "glimpse_calibration".into(),
        node: vec![pb::NodeProto {
            op_type: "MatMul".into(),
            input: vec!["a".into(), "b".into()],
            output: vec!["c".into()],
            name: "matmul".into(),
            ..Default::default()
        }],
        initializer: vec![pb::TensorProto {
            name: "b".into(),
            dims: vec![k as i64, n as i64],
            data_type: pb::tensor_proto::DataType::Float as i32,
            raw_data: b,
            ..Default::default()
        }],
        input: vec![vi("a", vec![dim(D::DimParam("m".into())), dim(D::DimValue(k as i64))])],
        output: vec![vi("c", vec![dim(D::DimParam("m".into())), dim(D::DimValue(n as i64))])],
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 18 }],
        graph: Some(graph),
        producer_name: "glimpse".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Times the backend's matmul on `[m, k] · [k, n]`; best GFLOP/s over `runs`.
pub fn gemm_gflops(backend: &dyn Backend, m: usize, k: usize, n: usize, runs: usize) -> Result<f64> {
    let dir = std::env::temp_dir().join(format!("glimpse-calibrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io { path: dir.clone(), source })?;
    let path = dir.join("matmul.onnx");
    std::fs::write(&path, matmul_model(k, n)).map_err(|source| Error::Io { path: path.clone(), source })?;
    let session = backend.load(&path, &dir, "calibration_matmul", &crate::backend::LoadHints::default());
    let _ = std::fs::remove_dir_all(&dir);
    let session = session?;
    let a = Array2::from_shape_fn((m, k), |(i, j)| ((i + j) % 13) as f32 / 13.0).into_dyn();
    let mut best = f64::MAX;
    for r in 0..runs + 1 {
        let t = Instant::now();
        let out = session.run(vec![("a", Tensor::F32(a.clone()))])?;
        let dt = t.elapsed().as_secs_f64();
        if out.first().map(|o| o.shape() != [m, n]).unwrap_or(true) {
            return Err(Error::interface("calibration", "matmul returned the wrong shape"));
        }
        if r > 0 {
            best = best.min(dt);
        }
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// Best read bandwidth (GB/s) summing a buffer of `bytes` with `threads` threads.
pub fn bandwidth_gb_s(bytes: usize, threads: usize, runs: usize) -> f64 {
    let n = bytes / 4;
    let data: Vec<f32> = (0..n).map(|i| (i % 251) as f32).collect();
    let threads = threads.max(1);
    let chunk = n.div_ceil(threads);
    let mut best = f64::MAX;
    let mut sink = 0.0f32;
    for _ in 0..runs {
        let t = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = data
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        let mut acc = [0.0f32; 8];
                        for block in c.chunks_exact(8) {
                            for (a, x) in acc.iter_mut().zip(block) {
                                *a += x;
                            }
                        }
                        acc.iter().sum::<f32>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        best = best.min(t.elapsed().as_secs_f64());
        sink += total;
    }
    std::hint::black_box(sink);
    bytes as f64 / best / 1e9
}

/// Runs both measurements.
pub fn calibrate(backend: &dyn Backend) -> Result<Calibration> {
    let (m, k, n) = (512, 1024, 1024);
    let gemm = gemm_gflops(backend, m, k, n, 5)?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let bw = bandwidth_gb_s(256 << 20, threads, 5);
    Ok(Calibration {
        backend: backend.name().into(),
        gemm_shape: [m, k, n],
        gemm_gflops: gemm,
        bandwidth_gb_s: bw,
        bandwidth_threads: threads,
    })
}
