//! Typed errors of the targets crate.

use std::path::PathBuf;

/// Why a target profile could not be loaded or found.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The TOML text is malformed or a field has a bad value. Names the file and, when it can be
    /// told, the field (dotted path such as `dtypes.vision_encoder`) and the 1-based line.
    #[error("{}", describe_invalid(file, field.as_deref(), *line, message))]
    Invalid {
        /// File name of the profile (`raspberry-pi-5.toml`, or the path given by the user).
        file: String,
        /// Dotted field path, when known.
        field: Option<String>,
        /// 1-based line in the file, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// No profile with that name is registered.
    #[error("unknown target profile `{name}` (available: {available})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// Comma-separated registered names.
        available: String,
    },
    /// A user-supplied profile file could not be read.
    #[error("reading target profile {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn describe_invalid(file: &str, field: Option<&str>, line: Option<usize>, message: &str) -> String {
    let mut s = format!("target profile `{file}`");
    if let Some(field) = field {
        s.push_str(&format!(", field `{field}`"));
    }
    if let Some(line) = line {
        s.push_str(&format!(" (line {line})"));
    }
    s.push_str(": ");
    s.push_str(message);
    s
}

/// Why detection from a root directory failed.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The root given to [`crate::detect::detect_from_root`] is not a readable directory.
    #[error("detection root {path} is not a directory")]
    NotADirectory {
        /// The root.
        path: PathBuf,
    },
}
