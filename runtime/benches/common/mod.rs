//! What the interleaved benches (`stages`, `plans`) share: their environment settings, the
//! repository root, and the median they report.

use std::path::PathBuf;

/// `key` from the environment, else `default`.
pub fn env(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

/// `key` from the environment parsed, else `default`; a bad value stops the bench naming it.
pub fn parsed<T: std::str::FromStr>(key: &str, default: &str) -> T {
    env(key, default).parse().unwrap_or_else(|_| panic!("{key}: not a valid value"))
}

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Whether `cargo test --benches` only asks for the list of benchmarks (none to run).
pub fn listing() -> bool {
    std::env::args().any(|a| a == "--list")
}

/// The repository root (models and images are named relative to it).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}
