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
use glimpse_targets::hal::IoLines;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::cmd::robot::SerialOut;

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
    mut serial: Option<SerialOut>,
    mut lines: IoLines,
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
        for job in queue {
            metrics.dequeued();
            // a press while idle is not a stop for this request: sample the trigger once first
            if let Err(e) = lines.poll_trigger() {
                eprintln!("glimpse serve: {e}");
            }
            if let Err(e) = lines.set_busy(true) {
                eprintln!("glimpse serve: {e}");
            }
            answer(&pipeline, job, &metrics, serial.as_mut(), &mut lines);
            if let Err(e) = lines.set_busy(false) {
                eprintln!("glimpse serve: {e}");
            }
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

/// Forwards text to the handler; cancels when the handler is gone, the deadline passed or the
/// trigger input (the robot's stop button) was pressed.
struct Forward<'a> {
    events: &'a UnboundedSender<Event>,
    deadline: Instant,
    timed_out: bool,
    lines: &'a mut IoLines,
    stopped: bool,
}

impl Observer for Forward<'_> {
    fn text(&mut self, piece: &str) {
        let _ = self.events.send(Event::Text(piece.to_string()));
    }

    fn cancelled(&mut self) -> bool {
        if Instant::now() >= self.deadline {
            self.timed_out = true;
        }
        if !self.stopped && self.lines.has_trigger() {
            match self.lines.poll_trigger() {
                Ok(pressed) => self.stopped = pressed,
                Err(e) => eprintln!("glimpse serve: {e}"),
            }
        }
        self.timed_out || self.stopped || self.events.is_closed()
    }
}

/// The 504 of a request past its deadline (the worker's and the handler's).
pub fn timeout_error() -> ApiError {
    ApiError::new(504, "timeout_error", "the request ran past the server's --timeout and was cancelled")
}

/// The error of a request stopped by the trigger input before its answer began (422: clients
/// such as OpenAI's retry 408, 409, 429 and 5xx, and a stop must not be retried).
pub fn stopped_error() -> ApiError {
    ApiError::new(
        422,
        "cancelled_error",
        "stopped by the robot's trigger input (--trigger-gpio) before the answer began",
    )
}

fn answer(pipeline: &Pipeline, job: Job, metrics: &Metrics, serial: Option<&mut SerialOut>, lines: &mut IoLines) {
    let mut forward = Forward { events: &job.events, deadline: job.deadline, timed_out: false, lines, stopped: false };
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
        // the client went away during generation (a stop button's answer is sent, cut short)
        Ok(answer) if answer.stats.stop == StopReason::Cancelled && !hit && !forward.stopped => None,
        Ok(answer) => {
            metrics.answered(&answer.stats);
            let finish_reason = openai::finish_reason(answer.stats.stop, hit);
            Some(Event::Done(Box::new(Finished { text, finish_reason, stats: answer.stats })))
        }
        Err(Error::Cancelled { .. }) if forward.stopped => Some(Event::Failed(stopped_error())),
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
