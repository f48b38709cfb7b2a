//! `glimpse ask`: one question about one image, answer streamed to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
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
}

pub fn run(args: Args) -> Result<()> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(path)) => super::read_prompt(path)?,
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
            "compressor_placement": pipeline.compressor_placement(),
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
        if let Some(c) = &s.prompt_compression {
            eprintln!(
                "[prompt compressor: text tokens {} -> {} ({} -> {} cl100k) in {:.1} ms]",
                c.text_tokens_before,
                c.text_tokens_after,
                c.cl100k_tokens_before,
                c.cl100k_tokens_after,
                t.prompt_compress.as_secs_f64() * 1e3
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
