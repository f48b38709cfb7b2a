//! A loaded part keeps one copy of its weights (issue #20). A one-MatMul model whose weight is
//! 64 MiB, stored embedded in the ONNX file and as external data, is loaded by every backend;
//! the resident memory the load adds must stay under 1.3x the weight: a second full copy (the
//! parsed protobuf, unpacked weights beside packed ones, freed heap kept resident) would be 2x.
//!
//! One test in its own binary, so no other test's allocations share the process's RSS.

mod common;

use common::{f32_value_info, node, write_graph};

use std::path::Path;

use glimpse::runtime::backend::{self, BackendOptions, LoadHints, Tensor};
use glimpse::runtime::memory::{release_free, rss_bytes};
use ndarray::{ArrayD, IxDyn};
use tract_onnx::pb;

const K: usize = 2048;
const N: usize = 8192;
const WEIGHT_BYTES: usize = K * N * 4;

fn weight(k: usize, n: usize) -> f32 {
    ((k * 31 + n * 17) % 13) as f32 * 0.01
}

/// Writes `dir/m.onnx`: y = x · w, w `[K, N]` embedded, or in `m.onnx.data` when `external`.
fn write_model(dir: &Path, external: bool) {
    let mut raw = Vec::with_capacity(WEIGHT_BYTES);
    for k in 0..K {
        for n in 0..N {
            raw.extend_from_slice(&weight(k, n).to_le_bytes());
        }
    }
    let mut w =
        pb::TensorProto { name: "w".into(), dims: vec![K as i64, N as i64], data_type: 1, ..Default::default() };
    if external {
        std::fs::write(dir.join("m.onnx.data"), &raw).expect("write external data");
        let kv = |k: &str, v: String| pb::StringStringEntryProto { key: k.into(), value: v };
        w.external_data =
            vec![kv("location", "m.onnx.data".into()), kv("offset", "0".into()), kv("length", raw.len().to_string())];
        w.data_location = Some(1);
    } else {
        w.raw_data = raw;
    }
    let graph = pb::GraphProto {
        name: "matmul".into(),
        node: vec![node("MatMul", &["x", "w"], "y")],
        initializer: vec![w],
        input: vec![f32_value_info("x", &[1, K as i64])],
        output: vec![f32_value_info("y", &[1, N as i64])],
        ..Default::default()
    };
    write_graph(&dir.join("m.onnx"), graph);
}

fn backends() -> Vec<(&'static str, BackendOptions)> {
    #[allow(unused_mut)]
    let mut v = vec![("tract", BackendOptions { threads: 1, ..Default::default() })];
    #[cfg(feature = "venv-tests")]
    v.push(("ort", BackendOptions { threads: 1, ort_library: Some(common::ort_library()), ..Default::default() }));
    v
}

#[test]
fn a_loaded_part_keeps_one_copy_of_its_weights() {
    let mb = |b: i64| b as f64 / (1 << 20) as f64;
    let mut report = Vec::new();
    for external in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        write_model(dir.path(), external);
        let file = dir.path().join("m.onnx");
        for (name, opts) in backends() {
            let backend = backend::by_name(name, &opts).expect("backend");
            release_free();
            let before = rss_bytes().expect("VmRSS (Linux)") as i64;
            let session = backend.load(&file, dir.path(), "m", &LoadHints::default()).expect("load");
            release_free();
            let kept = rss_bytes().expect("VmRSS") as i64 - before;
            // the part still computes x · w (x = 1: column sums)
            let x = Tensor::F32(ArrayD::from_elem(IxDyn(&[1, K]), 1.0));
            let out = session.run(vec![("x", x)]).expect("run");
            let Tensor::F32(y) = &out[0] else { panic!("y is not f32") };
            for n in [0, 1, N / 2, N - 1] {
                let want: f32 = (0..K).map(|k| weight(k, n)).sum();
                assert!(
                    (y[[0, n]] - want).abs() < 1e-2 * want.abs().max(1.0),
                    "{name}: y[{n}] {} vs {want}",
                    y[[0, n]]
                );
            }
            let where_ = if external { "external data" } else { "embedded" };
            report.push(format!(
                "{name} {where_}: kept {:.1} MiB for a {:.1} MiB weight",
                mb(kept),
                mb(WEIGHT_BYTES as i64)
            ));
            assert!(
                (kept as f64) < 1.3 * WEIGHT_BYTES as f64,
                "{name}, weight {where_}: the load kept {:.1} MiB for a {:.1} MiB weight (a second copy?)",
                mb(kept),
                mb(WEIGHT_BYTES as i64)
            );
            drop(session);
            drop(backend);
        }
    }
    println!("{}", report.join("\n"));
}
