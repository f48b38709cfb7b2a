//! `glimpse quantize`: writes onnx-community dtype variants next to a model's fp32 parts by
//! driving the export package (`python -m glimpse_export quantize`, which uses
//! onnxruntime.quantization and ONNX float16 conversion).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder whose `onnx/*.onnx` fp32 parts are quantized.
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated variants: fp16, int8, uint8, quantized, q4, q4f16.
    #[arg(long)]
    pub to: String,
    /// Comma-separated parts (default: all three).
    #[arg(long)]
    pub parts: Option<String>,
    /// Python with the export requirements (default: $GLIMPSE_PYTHON, else the repo's .venv, else python3).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Folder holding the `glimpse_export` package (default: $GLIMPSE_EXPORT_DIR, else the source tree's tools/export).
    #[arg(long)]
    pub export_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    for v in args.to.split(',') {
        let d: glimpse_runtime::Dtype = v.trim().parse()?;
        if matches!(d, glimpse_runtime::Dtype::Fp32 | glimpse_runtime::Dtype::Bnb4) {
            bail!("--to {v}: choose among fp16, int8, uint8, quantized, q4, q4f16");
        }
    }
    if !args.model.join("onnx").is_dir() {
        bail!("{}: no onnx/ folder to quantize", args.model.display());
    }
    // check the inputs here, so a bad file is a message, not a Python traceback
    let default_parts = glimpse_runtime::Part::ALL.map(|p| p.stem()).join(",");
    for stem in args.parts.as_deref().unwrap_or(&default_parts).split(',').map(str::trim) {
        let path = args.model.join("onnx").join(format!("{stem}.onnx"));
        glimpse_runtime::onnx_info::read_header(&path, &args.model)
            .with_context(|| format!("checking {} before quantizing", path.display()))?;
    }
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("export");
    let export_dir =
        args.export_dir.or_else(|| std::env::var_os("GLIMPSE_EXPORT_DIR").map(PathBuf::from)).unwrap_or(source.clone());
    let venv = source.join("../../.venv/bin/python");
    let python = args.python.or_else(|| std::env::var_os("GLIMPSE_PYTHON").map(PathBuf::from)).unwrap_or_else(|| {
        if venv.is_file() {
            venv
        } else {
            PathBuf::from("python3")
        }
    });
    let model = args.model.canonicalize().with_context(|| format!("{}", args.model.display()))?;
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "glimpse_export", "quantize", "--model"]).arg(&model).args(["--to", &args.to]);
    if let Some(p) = &args.parts {
        cmd.args(["--parts", p]);
    }
    cmd.env("PYTHONPATH", &export_dir).env("HF_HUB_OFFLINE", "1");
    let status = cmd.status().with_context(|| format!("running {}", python.display()))?;
    if !status.success() {
        bail!("{} -m glimpse_export quantize failed ({status})", python.display());
    }
    Ok(())
}
