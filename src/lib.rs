pub use glimpse_runtime as runtime;
pub use glimpse_targets as targets;
