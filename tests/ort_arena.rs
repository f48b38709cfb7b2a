//! ONNX Runtime sessions share one CPU arena (issue #20). The `ort` crate's CPU provider turns
//! each session's own arena off, so runs allocated through glibc malloc, whose freed memory
//! stayed resident in the pieces and per-thread heaps it came from: on the real-size
//! SmolVLM-256M shape the encoder's activations stayed beside the decoder's (peak 1663 MB; with
//! the shared arena 1236 MB, docs/benchmarks.md "Memory"). Two parts whose run needs a 64 MiB
//! intermediate are run one after the other: the shared arena keeps one such block, which the
//! second run reuses. Without an arena nothing would stay (malloc returns a block that large);
//! with an arena per session two would.
//!
//! One test in its own binary, so no other test's allocations share the process's RSS.

#![cfg(feature = "venv-tests")]

mod common;

use common::{f32_value_info, node, write_graph};

use glimpse::runtime::backend::{self, BackendOptions, LoadHints, Tensor};
use glimpse::runtime::memory::{release_free, rss_bytes};
use ndarray::{ArrayD, IxDyn};
use tract_onnx::pb;

const SIDE: i64 = 4096;
const INTERMEDIATE_BYTES: f64 = (SIDE * SIDE * 4) as f64;

/// `y = ReduceSum(Expand(x, [SIDE, SIDE]))`: a scalar out of a SIDE x SIDE f32 intermediate.
fn write_model(path: &std::path::Path) {
    let shape = pb::TensorProto {
        name: "shape".into(),
        dims: vec![2],
        data_type: 7,
        int64_data: vec![SIDE, SIDE],
        ..Default::default()
    };
    let mut sum = node("ReduceSum", &["big"], "y");
    sum.attribute = vec![pb::AttributeProto { name: "keepdims".into(), r#type: 2, i: 0, ..Default::default() }];
    let graph = pb::GraphProto {
        name: "expand_sum".into(),
        node: vec![node("Expand", &["x", "shape"], "big"), sum],
        initializer: vec![shape],
        input: vec![f32_value_info("x", &[1, 1])],
        output: vec![f32_value_info("y", &[])],
        ..Default::default()
    };
    write_graph(path, graph);
}

#[test]
fn sessions_share_one_cpu_arena() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("m.onnx");
    write_model(&file);
    let opts = BackendOptions { threads: 1, ort_library: Some(common::ort_library()), ..Default::default() };
    let backend = backend::by_name("ort", &opts).expect("ort backend");
    let a = backend.load(&file, dir.path(), "a", &LoadHints::default()).expect("load a");
    let b = backend.load(&file, dir.path(), "b", &LoadHints::default()).expect("load b");
    release_free();
    let before = rss_bytes().expect("VmRSS (Linux)") as f64;
    for (name, part) in [("a", &a), ("b", &b)] {
        let x = Tensor::F32(ArrayD::from_elem(IxDyn(&[1, 1]), 1.0));
        let out = part.run(vec![("x", x)]).expect("run");
        let Tensor::F32(y) = &out[0] else { panic!("y is not f32") };
        let want = (SIDE * SIDE) as f32;
        assert_eq!(y.iter().next().copied(), Some(want), "part {name} computes the sum");
    }
    release_free();
    let added = rss_bytes().expect("VmRSS") as f64 - before;
    let mib = |b: f64| b / f64::from(1 << 20);
    println!("two runs added {:.1} MiB for a {:.1} MiB intermediate each", mib(added), mib(INTERMEDIATE_BYTES));
    assert!(
        added > 0.5 * INTERMEDIATE_BYTES && added < 1.5 * INTERMEDIATE_BYTES,
        "two sessions run one after the other left {:.1} MiB for a {:.1} MiB intermediate each: one block is the \
         shared arena; none means no arena is used, two an arena per session",
        mib(added),
        mib(INTERMEDIATE_BYTES)
    );
}
