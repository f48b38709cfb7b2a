//! ONNX Runtime sessions share one intra-op thread pool (issue #14): with a pool per session, the
//! pool of the stage that just ran kept spinning while the next stage ran, and the staged encoder
//! (four sessions) ran 3-7% slower than the monolithic one (one session); with the environment's
//! pool, 0.9% (docs/benchmarks.md, "Staging overhead"). Counted here by the process's threads:
//! sessions of a backend with the environment's thread count add none; a backend asking for
//! another count gets pools of its own, of that size.
//!
//! One test in its own binary: the environment (and its pool) is made by the process's first
//! ONNX Runtime backend, and no other test may start threads meanwhile.

#![cfg(feature = "venv-tests")]

mod common;

use common::{f32_value_info, node, write_graph};

use glimpse::runtime::backend::{self, BackendOptions, LoadHints, Tensor};
use ndarray::{ArrayD, IxDyn};
use tract_onnx::pb;

/// `y = x + x` on `[1, 4096]`.
fn write_model(path: &std::path::Path) {
    let graph = pb::GraphProto {
        name: "add".into(),
        node: vec![node("Add", &["x", "x"], "y")],
        input: vec![f32_value_info("x", &[1, 4096])],
        output: vec![f32_value_info("y", &[1, 4096])],
        ..Default::default()
    };
    write_graph(path, graph);
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").expect("/proc/self/task (Linux)").count()
}

#[test]
fn sessions_share_the_environments_thread_pool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("m.onnx");
    write_model(&file);
    let backend_with = |threads| {
        let opts = BackendOptions { threads, ort_library: Some(common::ort_library()), ..Default::default() };
        backend::by_name("ort", &opts).expect("ort backend")
    };
    let run_sessions = |b: &dyn backend::Backend, n: usize| {
        let sessions: Vec<_> = (0..n)
            .map(|k| b.load(&file, dir.path(), &format!("part{k}"), &LoadHints::default()).expect("load"))
            .collect();
        for s in &sessions {
            let x = Tensor::F32(ArrayD::from_elem(IxDyn(&[1, 4096]), 1.0));
            let out = s.run(vec![("x", x)]).expect("run");
            let Tensor::F32(y) = &out[0] else { panic!("y is not f32") };
            assert!(y.iter().all(|v| *v == 2.0));
        }
        sessions
    };
    // the first backend makes the environment, with a pool of 3 threads (2 workers)
    let shared = backend_with(3);
    let start = threads();
    let kept = run_sessions(shared.as_ref(), 4);
    let added = threads() - start;
    assert_eq!(added, 0, "four sessions of the environment's thread count started {added} threads: a pool each");
    // another count: each session gets a pool of its own (2 threads: 1 worker)
    let own = backend_with(2);
    let start = threads();
    let kept_own = run_sessions(own.as_ref(), 3);
    let added = threads() - start;
    assert!(
        added >= 3,
        "three sessions asking for 2 threads started {added} threads: they did not get their own pools"
    );
    drop((kept, kept_own));
}
