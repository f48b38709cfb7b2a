//! Replays the fuzz corpus (`fuzz/seeds/TARGET/`, the inputs cargo-afl starts from, and
//! `fuzz/regressions/TARGET/`, every crash or hang it ever found) through the same harness the
//! fuzzer drives (`glimpse_runtime::fuzz`): none may panic; the seeds taken from tiny-smolvlm
//! itself must load; and truncated copies of every seed must be handled too.

mod common;

use common::*;
use glimpse::runtime::fuzz::{Harness, TARGETS};

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    v.sort();
    v
}

#[test]
fn the_fuzz_corpus_is_handled_without_panics() {
    for (name, target) in TARGETS {
        let harness = Harness::new(target, &model("tiny-smolvlm")).expect("harness");
        let seeds = files(&repo().join("fuzz/seeds").join(name));
        assert!(!seeds.is_empty(), "no seeds for fuzz target {name}");
        let regressions = files(&repo().join("fuzz/regressions").join(name));
        for path in seeds.iter().chain(&regressions) {
            let data = std::fs::read(path).expect("read");
            let result = harness.run(&data);
            let own = path.file_name().is_some_and(|f| f.to_string_lossy().starts_with("tiny-smolvlm"));
            if own {
                assert!(result.is_ok(), "{name}: {} is tiny-smolvlm's own file: {result:?}", path.display());
            }
            // every crash found so far was a malformed folder file: now an error naming it
            if regressions.contains(path) && name == "tokenizer" {
                let e = result.expect_err("a malformed tokenizer.json").to_string();
                assert!(e.contains("tokenizer.json"), "{}: {e}", path.display());
            }
            for cut in [0, 1, data.len() / 2, data.len().saturating_sub(1)] {
                let _ = harness.run(&data[..cut.min(data.len())]);
            }
        }
    }
}
