//! `glimpse-fuzz TARGET`: one cargo-afl fuzz target per `glimpse_runtime::fuzz::Target`, reading
//! inputs from AFL. The harness folder is a copy of `models/tiny-smolvlm` (or `$GLIMPSE_FUZZ_BASE`).

use std::path::PathBuf;

use glimpse_runtime::fuzz::{Harness, Target};

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let target: Target = match name.parse() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("glimpse-fuzz: {e}");
            std::process::exit(2);
        }
    };
    let base = std::env::var_os("GLIMPSE_FUZZ_BASE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-smolvlm"));
    let harness = match Harness::new(target, &base) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("glimpse-fuzz: {e}");
            std::process::exit(2);
        }
    };
    afl::fuzz!(|data: &[u8]| {
        let _ = harness.run(data);
    });
}
