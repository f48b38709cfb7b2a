//! `glimpse`: the command-line front end. Argument parsing and printing only; every bit of
//! inference lives in the library crates.

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[macro_use]
mod cmd;

/// Glimpse: run vision-language models on small devices, looking at fewer image tokens.
#[derive(Parser, Debug)]
#[command(name = "glimpse", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ask a question about an image; streams the answer.
    Ask(cmd::ask::Args),
    /// Measure accuracy on an eval set (exact match, per question type, 95% CI).
    Eval(cmd::eval::Args),
    /// Time every stage on this device, sweeping keep ratios, methods and backends.
    Profile(cmd::profile::Args),
    /// Write quantized dtype variants (fp16, int8, q4, ...) next to a model's fp32 parts.
    Quantize(cmd::quantize::Args),
    /// Serve the model over an OpenAI-compatible HTTP API (chat completions with images,
    /// streaming, a bounded queue, Prometheus metrics), loaded once.
    Serve(cmd::serve::Args),
    /// Cut a monolithic vision encoder into stages (embed, groups of layers, head), verified
    /// against it before writing.
    Split(cmd::split::Args),
    /// Ask a standing question about every frame of a camera, a video or a folder of frames,
    /// re-encoding only what changed; one JSON line per frame.
    Watch(cmd::watch::Args),
    /// Show the detected device, the target profile in use, and what each profile picks.
    Targets(cmd::targets::Args),
    /// Describe a model folder: family, parts, dtype variants, inputs and outputs.
    Inspect(cmd::inspect::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("GLIMPSE_LOG"))
        .with_writer(std::io::stderr)
        .init();
    // the commands that reduce tokens list the encoder-side registry after their options
    let reduction = cmd::encoder_methods_help();
    let mut command = Cli::command();
    for name in ["ask", "eval", "profile", "serve", "watch"] {
        command = command.mut_subcommand(name, |c| c.after_help(reduction.clone()));
    }
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    let result: Result<()> = match cli.command {
        Command::Ask(a) => cmd::ask::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Profile(a) => cmd::profile::run(a),
        Command::Quantize(a) => cmd::quantize::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Split(a) => cmd::split::run(a),
        Command::Targets(a) => cmd::targets::run(a),
        Command::Watch(a) => cmd::watch::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // the reader went away (`glimpse inspect | head -c1`): nothing left to say to it
        Err(e) if broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Whether an error comes from writing to a closed pipe.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}
