//! `glimpse ask`: one question about one image, answer streamed to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use glimpse_runtime::compress::{CompressOptions, PromptCompressor};
use glimpse_runtime::{GenerationOptions, ImageInput, Observer, Pipeline, Request, SamplingOptions};

use super::{ModelArgs, SelectArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Image file (PNG or JPEG). Without it the model answers from text alone.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// The question.
    #[arg(long, required_unless_present = "prompt_file", conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the question from a file (`-`: standard input), for prompts too long for an
    /// argument; at most 16 MiB.
    #[arg(long, value_name = "PATH")]
    pub prompt_file: Option<PathBuf>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Draw which image regions reached the model (kept tokens, skipped tiles) into this PNG.
    #[arg(long)]
    pub show_kept: Option<PathBuf>,
    /// Print one JSON object (answer, token ids, stats) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Shorten the text prompt first with this LLMLingua-2 compressor folder
    /// (`python -m glimpse_export export-compressor`; docs/compressors.md). Image tokens are untouched.
    #[arg(long, value_name = "DIR")]
    pub prompt_compressor: Option<PathBuf>,
    /// With --prompt-compressor: fraction of the prompt's tokens to keep, in (0, 1].
    #[arg(long, default_value_t = 0.5, requires = "prompt_compressor")]
    pub prompt_rate: f64,
    /// With --prompt-compressor: keep about this many (cl100k) tokens instead of --prompt-rate.
    #[arg(long, requires = "prompt_compressor")]
    pub prompt_target_tokens: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(path)) => read_prompt(path)?,
        (None, None) => anyhow::bail!("give --prompt or --prompt-file"),
    };
    let (options, applied) = args.model.pipeline_options(&args.select)?;
    let pipeline = Pipeline::load(&args.model.model, &options)
        .with_context(|| format!("loading model {}", args.model.model.display()))?;
    let opts = GenerationOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingOptions {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        ignore_eos: false,
    };
    let compression = match &args.prompt_compressor {
        Some(dir) => {
            let backend = glimpse_runtime::backend::by_name(&options.backend, &options.backend_options)?;
            let compressor = PromptCompressor::load(dir, backend.as_ref())
                .with_context(|| format!("loading prompt compressor {}", dir.display()))?;
            let copts = CompressOptions {
                rate: args.prompt_rate,
                target_tokens: args.prompt_target_tokens,
                ..Default::default()
            };
            let c = compressor.compress(&prompt, &copts).context("compressing the prompt")?;
            let before = pipeline.expand_and_tokenize(&prompt, None)?.len();
            let after = pipeline.expand_and_tokenize(&c.text, None)?.len();
            Some((c, before, after))
        }
        None => None,
    };
    let prompt = compression.as_ref().map_or(prompt.clone(), |(c, _, _)| c.text.clone());
    let compression_report = compression.as_ref().map(|(c, before, after)| {
        serde_json::json!({
            "compressor": args.prompt_compressor,
            "text_tokens_before": before,
            "text_tokens_after": after,
            "cl100k_tokens_before": c.origin_tokens,
            "cl100k_tokens_after": c.compressed_tokens,
            "ms": c.took.as_secs_f64() * 1e3,
            "prompt": c.text,
        })
    });
    let mut stdout = std::io::stdout().lock();
    let request = Request::new(&prompt).with_image(args.image.as_deref().map_or(ImageInput::None, ImageInput::Path));
    let mut out = Stdout { out: &mut stdout, stream: !args.json };
    let answer = pipeline.answer(&request, &opts, &mut out).context("answering")?;
    if let (Some(out), Some(layout), Some(path)) = (&args.show_kept, &answer.layout, &args.image) {
        // decoded again for the drawing only, after the timed answer
        let img = pipeline.load_image(path).context("reading the image")?;
        super::overlay::show_kept(&img, layout, out)?;
    }
    if args.json {
        let v = serde_json::json!({
            "model": pipeline.folder.root,
            "family": pipeline.family.name(),
            "backend": pipeline.backend_name(),
            "applied": applied,
            "placement": pipeline.placements().iter().map(|(p, pl)| (p.stem().to_string(), pl.clone())).collect::<std::collections::BTreeMap<_, _>>(),
            "answer": answer.text,
            "token_ids": answer.token_ids,
            "stats": answer.stats,
            "prompt_compression": compression_report,
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(stdout)?;
        let s = &answer.stats;
        let t = &s.times;
        eprintln!(
            "[{} tokens in {:.1} ms TTFT; visual tokens {}/{}; prompt {} tokens; decode {:.1} tok/s; preprocess {:.1} ms, encode {:.1} ms, select {:.1} ms, splice {:.1} ms, prefill {:.1} ms, decode {:.1} ms]",
            s.new_tokens,
            s.ttft_ms,
            s.visual_tokens_kept,
            s.visual_tokens,
            s.prompt_tokens,
            s.decode_tokens_per_s,
            t.preprocess.as_secs_f64() * 1e3,
            t.encode.as_secs_f64() * 1e3,
            t.select.as_secs_f64() * 1e3,
            t.splice.as_secs_f64() * 1e3,
            t.prefill.as_secs_f64() * 1e3,
            t.decode.as_secs_f64() * 1e3,
        );
        if let Some((c, before, after)) = &compression {
            eprintln!(
                "[prompt compressor: text tokens {before} -> {after} ({} -> {} cl100k) in {:.1} ms]",
                c.origin_tokens,
                c.compressed_tokens,
                c.took.as_secs_f64() * 1e3
            );
        }
        if pipeline.backend_name() != "tract" {
            let parts: Vec<String> = pipeline.placements().iter().map(|(p, pl)| format!("{p}: {pl}")).collect();
            eprintln!("[placement: {}]", parts.join("; "));
        }
    }
    Ok(())
}

/// Streams the answer to stdout (a closed pipe ends the stream quietly; the answer is still
/// computed and the exit status reports write errors at the end).
struct Stdout<'a, W: Write> {
    out: &'a mut W,
    stream: bool,
}

impl<W: Write> Observer for Stdout<'_, W> {
    fn text(&mut self, piece: &str) {
        if self.stream {
            let _ = write!(self.out, "{piece}");
            let _ = self.out.flush();
        }
    }
}

/// Largest prompt read from a file or standard input.
const MAX_PROMPT_BYTES: u64 = 16 << 20;

/// The prompt from a file, or standard input for `-`, as UTF-8 within [`MAX_PROMPT_BYTES`].
fn read_prompt(path: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let stdin = path == std::path::Path::new("-");
    let what = if stdin { "standard input".to_string() } else { path.display().to_string() };
    let reader: Box<dyn Read> = if stdin {
        Box::new(std::io::stdin().lock())
    } else {
        let meta = std::fs::metadata(path).with_context(|| format!("reading the prompt from {what}"))?;
        anyhow::ensure!(meta.is_file(), "prompt file {what} is not a regular file");
        Box::new(std::fs::File::open(path).with_context(|| format!("reading the prompt from {what}"))?)
    };
    let mut bytes = Vec::new();
    reader
        .take(MAX_PROMPT_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading the prompt from {what}"))?;
    anyhow::ensure!(bytes.len() as u64 <= MAX_PROMPT_BYTES, "prompt from {what} is over {MAX_PROMPT_BYTES} bytes");
    String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("prompt from {what} is not UTF-8: {e}"))
}
