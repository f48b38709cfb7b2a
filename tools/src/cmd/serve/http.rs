//! The HTTP side: routes, request checking, queueing, and turning the worker's events into
//! OpenAI responses or server-sent-event streams. Every refusal is an OpenAI-style JSON error.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use futures_util::StreamExt;
use glimpse_runtime::api::openai::{self, ApiError, Ids, ImageSource};
use glimpse_runtime::{EncoderReduction, Positions, SelectConfig};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::worker::{timeout_error, Event, Job};
use super::Shared;
use crate::cmd::SelectArgs;

/// Extra time a handler waits past a request's deadline for the worker's own timeout answer
/// (the worker notices at its next check; a long encoder run can delay that).
const GRACE: Duration = Duration::from_secs(2);

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(shared.clone(), count))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(shared)
}

/// Counts every response by route and status.
async fn count(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    s.metrics.request(&route, response.status().as_u16());
    response
}

/// An OpenAI error response (429 carries Retry-After).
fn error_response(e: &ApiError, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, Json(e.body())).into_response();
    if let Some(s) = retry_after {
        if let Ok(v) = s.to_string().parse() {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

async fn not_found(req: Request) -> Response {
    let e = ApiError::new(404, "not_found_error", format!("no route {} {}", req.method(), req.uri().path()));
    error_response(&e, None)
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": s.model_id, "object": "model", "created": 0, "owned_by": "glimpse"}],
    }))
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render()).into_response()
}

async fn chat(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    match chat_inner(&s, &headers, body).await {
        Ok(r) => r,
        Err(e) => {
            let retry = (e.status == 429).then(|| s.metrics.retry_after_s());
            error_response(&e, retry)
        }
    }
}

fn worker_gone() -> ApiError {
    ApiError::new(500, "server_error", "the worker stopped before answering")
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

async fn chat_inner(s: &Shared, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let received = Instant::now();
    let too_large = || {
        ApiError::new(
            413,
            "invalid_request_error",
            format!("the request body is over {} bytes (--max-body-mib) or could not be read", s.body_limit),
        )
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let bytes = read_body(body, s.body_limit, declared).await.ok_or_else(too_large)?;
    let chat = openai::parse_chat_request(&bytes, s.max_image_bytes)?;
    let image_path = match &chat.image {
        Some(ImageSource::Path(p)) => Some(openai::confine(p, &s.allow_dirs, "image_url")?),
        _ => None,
    };
    let own = match &chat.glimpse {
        Some(o) => glimpse_options(o, s)?,
        None => RequestOptions::default(),
    };
    let deadline = received + s.timeout;
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    let (stream, include_usage) = (chat.stream, chat.include_usage);
    let max_new_tokens = chat.max_tokens.unwrap_or(s.max_tokens);
    let job = Job {
        chat,
        image_path,
        selection: own.selection,
        reduction: own.reduction,
        max_new_tokens,
        ignore_eos: own.ignore_eos,
        deadline,
        events,
    };
    s.metrics.enqueued();
    if let Err(e) = s.jobs.try_send(job) {
        s.metrics.dequeued();
        return Err(match e {
            std::sync::mpsc::TrySendError::Full(_) => ApiError::new(
                429,
                "rate_limit_error",
                format!("the server is busy: {} requests are already waiting (--queue); retry later", s.queue),
            ),
            std::sync::mpsc::TrySendError::Disconnected(_) => worker_gone(),
        });
    }
    let created = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let ids = Ids {
        id: format!("chatcmpl-{created:x}{:06}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        created,
        model: s.model_id.clone(),
    };
    let wait_until = tokio::time::Instant::from_std(deadline + GRACE);
    if stream {
        sse(rx, ids, include_usage, wait_until).await
    } else {
        whole(rx, ids, wait_until).await
    }
}

/// Most bytes of an oversized body read and thrown away before answering 413, so that the
/// client, still sending, reads the answer instead of a reset connection.
const DRAIN: u64 = 64 << 20;

/// The body if it fits in `limit` bytes; `None` (after draining up to [`DRAIN`] bytes of it)
/// if it does not or cannot be read.
async fn read_body(body: Body, limit: usize, declared: Option<u64>) -> Option<Vec<u8>> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    let mut seen: u64 = 0;
    let mut over = declared.is_some_and(|n| n > limit as u64);
    if !over {
        out.reserve(declared.map_or(0, |n| n as usize));
    }
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.ok()?;
        seen += chunk.len() as u64;
        if over || seen > limit as u64 {
            over = true;
            out = Vec::new();
            if seen > DRAIN {
                return None;
            }
        } else {
            out.extend_from_slice(&chunk);
        }
    }
    (!over).then_some(out)
}

/// The answer as one `chat.completion` body.
async fn whole(mut rx: UnboundedReceiver<Event>, ids: Ids, until: tokio::time::Instant) -> Result<Response, ApiError> {
    loop {
        match tokio::time::timeout_at(until, rx.recv()).await {
            Err(_) => return Err(timeout_error()),
            Ok(None) => return Err(worker_gone()),
            Ok(Some(Event::Text(_))) => {}
            Ok(Some(Event::Failed(e))) => return Err(e),
            Ok(Some(Event::Done(f))) => {
                return Ok(Json(openai::completion(&ids, &f.text, f.finish_reason, &f.stats)).into_response())
            }
        }
    }
}

struct Streaming {
    rx: UnboundedReceiver<Event>,
    first: Option<Event>,
    ids: Ids,
    include_usage: bool,
    until: tokio::time::Instant,
    started: bool,
    done: bool,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// The answer as server-sent `chat.completion.chunk`s ending with `[DONE]`. A request that
/// fails before its first piece gets a plain error response instead of a stream.
async fn sse(
    mut rx: UnboundedReceiver<Event>,
    ids: Ids,
    include_usage: bool,
    until: tokio::time::Instant,
) -> Result<Response, ApiError> {
    let first = match tokio::time::timeout_at(until, rx.recv()).await {
        Err(_) => return Err(timeout_error()),
        Ok(None) => return Err(worker_gone()),
        Ok(Some(Event::Failed(e))) => return Err(e),
        Ok(Some(e)) => e,
    };
    let state = Streaming { rx, first: Some(first), ids, include_usage, until, started: false, done: false };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        let mut out = Vec::new();
        if !st.started {
            st.started = true;
            out.push(data(&openai::chunk(&st.ids, json!({"role": "assistant", "content": ""}), None, None)));
        }
        let event = match st.first.take() {
            Some(e) => Some(e),
            None => match tokio::time::timeout_at(st.until, st.rx.recv()).await {
                Ok(e) => e,
                Err(_) => Some(Event::Failed(timeout_error())),
            },
        };
        match event {
            Some(Event::Text(t)) => out.push(data(&openai::chunk(&st.ids, json!({"content": t}), None, None))),
            Some(Event::Done(f)) => {
                out.push(data(&openai::chunk(&st.ids, json!({}), Some(f.finish_reason), Some(&f.stats))));
                if st.include_usage {
                    out.push(data(&openai::usage_chunk(&st.ids, &f.stats)));
                }
                out.push(SseEvent::default().data("[DONE]"));
                st.done = true;
            }
            Some(Event::Failed(e)) => {
                out.push(data(&e.body()));
                st.done = true;
            }
            None => {
                out.push(data(&worker_gone().body()));
                st.done = true;
            }
        }
        Some((out, st))
    })
    .flat_map(|events| futures_util::stream::iter(events.into_iter().map(Ok::<_, Infallible>)));
    Ok(Sse::new(stream).into_response())
}

/// A request's `glimpse` object read as `glimpse ask`'s selection flags (one definition: keys
/// are the flag names, `keep` → `--keep`, `pool_dropped` → `--pool-dropped`); `prune` and
/// `keep` default to the server's, and so does the encoder-side reduction unless the object
/// names `tiles`, `regions` or `merge`. Also `ignore_eos`.
/// A request's own settings from its `glimpse` object.
#[derive(Default)]
struct RequestOptions {
    selection: Option<(SelectConfig, Positions)>,
    reduction: Option<EncoderReduction>,
    ignore_eos: bool,
}

fn glimpse_options(obj: &Map<String, Value>, s: &Shared) -> Result<RequestOptions, ApiError> {
    #[derive(clap::Parser)]
    #[command(no_binary_name = true)]
    struct RequestSelect {
        #[command(flatten)]
        select: SelectArgs,
    }
    let mut argv = Vec::new();
    let mut ignore_eos = false;
    for (key, v) in obj {
        let param = format!("glimpse.{key}");
        if key == "ignore_eos" {
            ignore_eos = v.as_bool().ok_or_else(|| ApiError::invalid(&param, "must be true or false"))?;
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        match v {
            Value::Bool(true) => argv.push(flag),
            Value::Bool(false) => {}
            Value::String(x) => argv.extend([flag, x.clone()]),
            Value::Number(n) => argv.extend([flag, n.to_string()]),
            _ => return Err(ApiError::invalid(param, "must be a string, a number or a boolean")),
        }
    }
    if argv.is_empty() {
        return Ok(RequestOptions { ignore_eos, ..Default::default() });
    }
    let parsed = RequestSelect::try_parse_from(&argv).map_err(|e| {
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or("invalid option").trim_start_matches("error: ").to_string();
        ApiError::invalid("glimpse", format!("{first} (keys are glimpse ask's selection flags: prune, keep, ...)"))
    })?;
    let select = parsed.select;
    // the encoder-side flags replace the server's only when the request names one of them
    let reduction = if select.encoder_side() {
        Some(select.reduction().map_err(|e| ApiError::invalid("glimpse", e.to_string()))?)
    } else {
        None
    };
    let method = select.prune.clone().unwrap_or_else(|| s.default_prune.clone());
    let budget = select.keep.unwrap_or(s.default_keep);
    Ok(RequestOptions { selection: Some((select.config(method, budget), select.positions)), reduction, ignore_eos })
}
