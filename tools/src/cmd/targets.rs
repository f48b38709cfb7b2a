//! `glimpse targets`: what this device is, which target profile Glimpse will use, and what each
//! profile would choose.

use std::path::PathBuf;

use anyhow::Result;
use glimpse_runtime::ModelFolder;
use glimpse_targets::{detect, detect_from_root, profiles};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Use this profile instead of the detected one.
    #[arg(long)]
    pub target: Option<String>,
    /// Show the per-part dtypes `--dtype auto` would pick for this model folder.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The backend `--dtype auto` picks for (tract and ONNX Runtime rank dtypes differently).
    #[arg(long, default_value = "tract", value_parser = super::backend_values())]
    pub backend: String,
    /// Detect from a directory tree holding proc/ and etc/ files (for testing).
    #[arg(long, hide = true)]
    pub root: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let detected = match &args.root {
        Some(root) => detect_from_root(root)?,
        None => detect(),
    };
    let chosen = match &args.target {
        Some(name) => glimpse_targets::Profile::by_name(name)?,
        None => detected.choose_profile(),
    };
    let folder = args.model.as_ref().map(ModelFolder::open).transpose()?;
    let backend = args.backend.as_str();
    let mut table = Vec::new();
    for p in profiles() {
        let picks = match &folder {
            Some(f) => match glimpse_runtime::settings::auto_dtypes(f, p, backend) {
                Ok(v) => v.iter().map(|(part, d)| format!("{part}={d}")).collect::<Vec<_>>().join(" "),
                Err(e) => format!("unavailable: {e}"),
            },
            None => glimpse_targets::Part::ALL
                .iter()
                .map(|part| format!("{}={}", part.stem(), p.dtypes_for(backend).for_part(*part).join("|")))
                .collect::<Vec<_>>()
                .join(" "),
        };
        table.push((p, picks));
    }
    if args.json {
        let v = serde_json::json!({
            "detected": detected,
            "profile": chosen,
            "backend": backend,
            "dtype_auto": table.iter().map(|(p, picks)| serde_json::json!({"profile": p.name, "choice": picks})).collect::<Vec<_>>(),
        });
        out!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    out!("{detected}");
    out!("\nusing profile: {chosen}");
    out!(
        "\n{:<18} {}",
        "profile",
        if folder.is_some() {
            format!("--dtype auto picks ({backend})")
        } else {
            format!("dtype preference per part ({backend})")
        }
    );
    for (p, picks) in table {
        let mark = if p.name == chosen.name { "*" } else { " " };
        out!("{mark}{:<17} {picks}", p.name);
    }
    Ok(())
}
