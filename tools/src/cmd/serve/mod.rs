//! `glimpse serve`: the model loaded once behind an OpenAI-compatible HTTP API (axum + tokio).
//!
//! One worker thread owns the pipeline and answers one request at a time (`worker`); HTTP
//! handlers parse and check requests with the library's parser
//! (`glimpse_runtime::api::openai`), queue them in a bounded queue (full: 429 with
//! `Retry-After`), and stream the worker's events back (`http`). `/metrics` is Prometheus text
//! (`metrics`). A client that goes away cancels its request; SIGINT/SIGTERM stop accepting,
//! let in-flight requests finish, then exit.

mod http;
mod metrics;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use super::robot::RobotArgs;
use super::{ModelArgs, SelectArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The selection every request gets unless its `glimpse` object gives its own.
    #[command(flatten)]
    pub select: SelectArgs,
    /// Address to listen on (loopback by default: put a reverse proxy in front to expose it).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port to listen on (0: any free port; the one taken is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests that may wait while one is answered; more get HTTP 429 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Largest request body in MiB (base64 images included); larger ones get HTTP 413.
    #[arg(long, default_value_t = 32)]
    pub max_body_mib: usize,
    /// Seconds a request may take from arrival (queue wait included) before it is cancelled
    /// with HTTP 504.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Folder whose image files requests may name by path (`file://` or a bare path); without
    /// it only base64 `data:` URLs are accepted. Repeatable.
    #[arg(long, value_name = "DIR")]
    pub allow_dir: Vec<PathBuf>,
    /// Most tokens to generate when a request gives no `max_tokens`.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Load the staged encoder beside the monolithic one so that a request's `glimpse` object
    /// can ask for its own `regions` / `merge` (the encoder's weights are held twice).
    #[arg(long)]
    pub request_reduction: bool,
    /// The robot's serial line and GPIO lines.
    #[command(flatten)]
    pub robot: RobotArgs,
    /// The model id `/v1/models` lists and responses carry (default: the folder's name).
    #[arg(long)]
    pub model_id: Option<String>,
}

/// What the handlers share.
pub(crate) struct Shared {
    pub jobs: std::sync::mpsc::SyncSender<worker::Job>,
    pub metrics: metrics::Metrics,
    pub model_id: String,
    pub allow_dirs: Vec<PathBuf>,
    pub body_limit: usize,
    pub max_image_bytes: u64,
    pub timeout: Duration,
    pub max_tokens: usize,
    pub queue: usize,
    /// The server's settled `--prune` and `--keep`: a request's `glimpse` object changes them
    /// only if it names them.
    pub default_prune: String,
    pub default_keep: glimpse_runtime::Budget,
}

pub fn run(args: Args) -> Result<()> {
    let (mut options, applied) = args.model.pipeline_options(&args.select)?;
    options.stages_for_requests = args.request_reduction;
    let allow_dirs = args
        .allow_dir
        .iter()
        .map(|d| d.canonicalize().with_context(|| format!("--allow-dir {}", d.display())))
        .collect::<Result<Vec<_>>>()?;
    if args.timeout == 0 {
        anyhow::bail!("--timeout must be at least 1 second");
    }
    let model_id = match &args.model_id {
        Some(id) => id.clone(),
        None => args.model.model.file_name().map_or("glimpse".into(), |n| n.to_string_lossy().into_owned()),
    };
    let max_image_bytes = options.image_limits.max_file_bytes;
    let (default_prune, default_keep) = (options.select.method.clone(), options.select.budget);
    // the pipeline is built on the worker thread that owns it; load errors come back here
    let (jobs, queue) = std::sync::mpsc::sync_channel(args.queue);
    let metrics = metrics::Metrics::new();
    let serial = args.robot.serial("serve")?;
    let lines = args.robot.lines()?;
    let loaded = worker::start(args.model.model.clone(), options, queue, metrics.clone(), serial, lines)
        .with_context(|| format!("loading model {}", args.model.model.display()))?;
    let shared = Arc::new(Shared {
        jobs,
        metrics,
        model_id,
        allow_dirs,
        body_limit: args.max_body_mib.saturating_mul(1 << 20),
        max_image_bytes,
        timeout: Duration::from_secs(args.timeout),
        max_tokens: args.max_tokens,
        queue: args.queue,
        default_prune,
        default_keep,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let addr = SocketAddr::new(args.host, args.port);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
        let bound = listener.local_addr()?;
        eprintln!(
            "glimpse serve: listening on http://{bound} (model {}, {} backend, selection {} keep {}, queue {})",
            shared.model_id, loaded.backend, applied.prune.value, applied.keep.value, args.queue
        );
        axum::serve(listener, http::router(shared.clone()))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving")?;
        anyhow::Ok(())
    })?;
    // every connection is done: the queue's sender goes, the worker drains and stops
    drop(runtime);
    loaded.join();
    eprintln!("glimpse serve: stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    eprintln!("glimpse serve: stopping: no new connections; in-flight requests finish");
}
