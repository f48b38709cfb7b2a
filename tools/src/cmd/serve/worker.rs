//! The worker thread: owns the pipeline, takes queued requests one at a time, and sends each
//! request's events (text pieces, then the finished answer or an error) back to its handler.
//! A request whose handler is gone (the client disconnected) or whose deadline passed is
//! cancelled at the pipeline's next check.

use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::thread::JoinHandle;
use std::time::Instant;

use glimpse_runtime::api::openai::{self, ApiError, ChatRequest, ImageSource};
use glimpse_runtime::generate::{StopAt, StopReason};
use glimpse_runtime::{
    EncoderReduction, Error, GenerationOptions, GenerationStats, ImageInput, Observer, Pipeline, PipelineOptions,
    Positions, Request, SelectConfig,
};
use glimpse_targets::frame;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;

/// One queued request.
pub struct Job {
    pub chat: ChatRequest,
    /// The image path, already confined to `--allow-dir`.
    pub image_path: Option<PathBuf>,
    /// The request's own selection (from its `glimpse` object).
    pub selection: Option<(SelectConfig, Positions)>,
    /// The request's own tile / region skipping and merging.
    pub reduction: Option<EncoderReduction>,
    pub max_new_tokens: usize,
    pub ignore_eos: bool,
    pub deadline: Instant,
    pub events: UnboundedSender<Event>,
}

/// What the worker tells a request's handler.
pub enum Event {
    /// A final piece of the answer.
    Text(String),
    /// The answer is complete.
    Done(Box<Finished>),
    /// The request failed (nothing more follows).
    Failed(ApiError),
}

/// A complete answer.
pub struct Finished {
    /// The answer, cut before a stop sequence.
    pub text: String,
    pub finish_reason: &'static str,
    pub stats: GenerationStats,
}

/// The loaded model's worker.
pub struct Loaded {
    pub backend: &'static str,
    thread: JoinHandle<()>,
}

impl Loaded {
    /// Waits until the queue is closed and drained.
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Loads the model on a new thread that then serves `queue`; returns once it is loaded.
pub fn start(
    dir: PathBuf,
    options: PipelineOptions,
    queue: Receiver<Job>,
    metrics: Metrics,
    serial: Option<std::fs::File>,
) -> anyhow::Result<Loaded> {
    let (ready, loaded) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new().name("glimpse-worker".into()).spawn(move || {
        let pipeline = match Pipeline::load(&dir, &options) {
            Ok(p) => {
                let _ = ready.send(Ok(p.backend_name()));
                p
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let mut serial = serial.map(|file| Serial { file, seq: 0 });
        for job in queue {
            metrics.dequeued();
            answer(&pipeline, job, &metrics, serial.as_mut());
        }
    })?;
    match loaded.recv() {
        Ok(Ok(backend)) => Ok(Loaded { backend, thread }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e.into())
        }
        Err(_) => {
            let _ = thread.join();
            anyhow::bail!("the worker thread stopped while loading the model")
        }
    }
}

/// Forwards text to the handler; cancels when the handler is gone or the deadline passed.
struct Forward<'a> {
    events: &'a UnboundedSender<Event>,
    deadline: Instant,
    timed_out: bool,
}

impl Observer for Forward<'_> {
    fn text(&mut self, piece: &str) {
        let _ = self.events.send(Event::Text(piece.to_string()));
    }

    fn cancelled(&mut self) -> bool {
        if Instant::now() >= self.deadline {
            self.timed_out = true;
        }
        self.timed_out || self.events.is_closed()
    }
}

/// The 504 of a request past its deadline (the worker's and the handler's).
pub fn timeout_error() -> ApiError {
    ApiError::new(504, "timeout_error", "the request ran past the server's --timeout and was cancelled")
}

/// The serial line answers are framed onto.
struct Serial {
    file: std::fs::File,
    seq: u16,
}

impl Serial {
    /// Writes one frame; a failed write is reported and the server goes on (the HTTP client
    /// still gets its answer).
    fn send(&mut self, kind: frame::Kind, text: &str) {
        use std::io::Write;
        let bytes = frame::encode(kind, self.seq, text);
        self.seq = self.seq.wrapping_add(1);
        if let Err(e) = self.file.write_all(&bytes).and_then(|()| self.file.flush()) {
            eprintln!("glimpse serve: --serial: frame {} not written: {e}", self.seq.wrapping_sub(1));
        }
    }
}

fn answer(pipeline: &Pipeline, job: Job, metrics: &Metrics, serial: Option<&mut Serial>) {
    let mut forward = Forward { events: &job.events, deadline: job.deadline, timed_out: false };
    if forward.cancelled() {
        if forward.timed_out {
            let _ = job.events.send(Event::Failed(timeout_error()));
        }
        metrics.cancelled();
        return;
    }
    let image = match (&job.chat.image, &job.image_path) {
        (_, Some(path)) => ImageInput::Path(path),
        (Some(ImageSource::Bytes(bytes)), None) => ImageInput::Bytes { bytes, name: "image_url" },
        _ => ImageInput::None,
    };
    let mut request = Request::new(&job.chat.prompt).with_history(&job.chat.history).with_image(image);
    if let Some((config, positions)) = &job.selection {
        request = request.with_selection(config.clone(), *positions);
    }
    if let Some(r) = job.reduction {
        request = request.with_reduction(r);
    }
    let opts = GenerationOptions {
        max_new_tokens: job.max_new_tokens,
        sampling: job.chat.sampling,
        ignore_eos: job.ignore_eos,
    };
    let mut stop = match StopAt::new(job.chat.stop.clone(), &mut forward) {
        Ok(s) => s,
        Err(e) => {
            let _ = job.events.send(Event::Failed(ApiError::from_runtime(&e)));
            return;
        }
    };
    let result = pipeline.answer(&request, &opts, &mut stop);
    let hit = stop.hit();
    let text = stop.finish();
    let event = match result {
        _ if forward.timed_out => Some(Event::Failed(timeout_error())),
        // the client went away during generation
        Ok(answer) if answer.stats.stop == StopReason::Cancelled && !hit => None,
        Ok(answer) => {
            metrics.answered(&answer.stats);
            let finish_reason = openai::finish_reason(answer.stats.stop, hit);
            Some(Event::Done(Box::new(Finished { text, finish_reason, stats: answer.stats })))
        }
        // the client went away
        Err(Error::Cancelled { .. }) => None,
        Err(e) => Some(Event::Failed(ApiError::from_runtime(&e))),
    };
    if let (Some(serial), Some(event)) = (serial, &event) {
        match event {
            Event::Done(f) => serial.send(frame::Kind::Answer, &f.text),
            Event::Failed(e) => serial.send(frame::Kind::Error, &e.message),
            Event::Text(_) => {}
        }
    }
    match event {
        Some(event) => {
            let _ = job.events.send(event);
        }
        None => metrics.cancelled(),
    }
}
