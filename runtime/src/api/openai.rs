//! OpenAI chat completions (`POST /v1/chat/completions`): the request body parsed and checked
//! into a [`ChatRequest`] the pipeline can answer, and the response, stream-chunk and error
//! bodies built from an answer. Only what the pipeline can honour is accepted: a field it would
//! have to ignore (tools, `n > 1`, penalties, logprobs, …) is refused by name, never dropped
//! silently.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::generate::{SamplingOptions, StopReason, MAX_STOPS};
use crate::pipeline::{GenerationStats, Role, Turn};

/// Most messages in one request.
pub const MAX_MESSAGES: usize = 1024;

/// A request the API refuses, or an answer that failed, as OpenAI's error body says it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// OpenAI's error `type` (`invalid_request_error`, `rate_limit_error`, …).
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code (`context_length_exceeded`, …).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 naming the field at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    /// Any status with its error type and message.
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into(), param: None, code: None }
    }

    /// The same error with a code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The error of a failed answer: the request's fault is a 400, anything else a 500.
    pub fn from_runtime(e: &crate::Error) -> Self {
        match e {
            crate::Error::ContextOverflow { .. } => {
                ApiError::invalid("messages", e.to_string()).with_code("context_length_exceeded")
            }
            e if e.is_request_error() => ApiError::new(400, "invalid_request_error", e.to_string()),
            e => ApiError::new(500, "server_error", e.to_string()),
        }
    }

    /// `{"error": {message, type, param, code}}`.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

type ApiResult<T> = std::result::Result<T, ApiError>;

/// The image of a request, as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// Decoded from a base64 `data:` URL.
    Bytes(Vec<u8>),
    /// A local file (`file://` URL or bare path); the server allows it only under `--allow-dir`
    /// ([`confine`]).
    Path(PathBuf),
}

/// A parsed, checked chat-completions request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The `model` the client named (answered by the one loaded model whatever it says).
    pub model: String,
    /// Earlier turns: system prompt, previous questions and answers (text only).
    pub history: Vec<Turn>,
    /// The last user message's text parts, joined by newlines.
    pub prompt: String,
    /// The last user message's image, at most one.
    pub image: Option<ImageSource>,
    /// `max_completion_tokens` or `max_tokens`; `None`: up to the context.
    pub max_tokens: Option<usize>,
    /// temperature (OpenAI's default 1), top_p, seed (random when absent).
    pub sampling: SamplingOptions,
    pub stop: Vec<String>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
    /// The `glimpse` extension object (per-request token selection), as sent.
    pub glimpse: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    model: String,
    messages: Vec<WireMessage>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    stop: Option<StopField>,
    n: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    glimpse: Option<Map<String, Value>>,
    // accepted with their default values only (anything else would be ignored silently)
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    logprobs: Option<bool>,
    // carry no meaning for a local server
    user: Option<Value>,
    metadata: Option<Value>,
    store: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
    include_obfuscation: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMessage {
    role: String,
    content: Option<Content>,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ImageUrl {
    Object {
        url: String,
        #[allow(dead_code)]
        detail: Option<String>,
    },
    Bare(String),
}

/// Parses and checks a request body. Every refusal names the field (`messages[2].content`,
/// `temperature`, …) and says what would be accepted.
pub fn parse_chat_request(body: &[u8], max_image_bytes: u64) -> ApiResult<ChatRequest> {
    let wire: Wire = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid("body", format!("the request body is not a valid chat-completions request: {e}"))
    })?;
    let _ = (&wire.user, &wire.metadata, &wire.store);
    if let Some(n) = wire.n {
        if n != 1 {
            return Err(ApiError::invalid("n", format!("n = {n}: only one choice per request is generated")));
        }
    }
    for (name, v) in [("frequency_penalty", wire.frequency_penalty), ("presence_penalty", wire.presence_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(name, format!("{name} is not supported (only 0)")));
        }
    }
    if wire.logprobs == Some(true) {
        return Err(ApiError::invalid("logprobs", "logprobs are not returned"));
    }
    let max_tokens = match (wire.max_completion_tokens, wire.max_tokens) {
        (Some(0), _) | (None, Some(0)) => {
            return Err(ApiError::invalid("max_tokens", "must be at least 1"));
        }
        (Some(n), _) | (None, Some(n)) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        (None, None) => None,
    };
    let temperature = wire.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("temperature", format!("temperature {temperature} is outside [0, 2]")));
    }
    let top_p = wire.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", format!("top_p {top_p} is outside (0, 1]")));
    }
    let seed = match wire.seed {
        Some(s) => s as u64,
        None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
    };
    let stop = match wire.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid("stop", format!("{} stop sequences: at most {MAX_STOPS}", stop.len())));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "a stop sequence cannot be empty"));
    }
    let (include_usage, _) = match &wire.stream_options {
        Some(o) => (o.include_usage.unwrap_or(false), o.include_obfuscation),
        None => (false, None),
    };
    let stream = wire.stream.unwrap_or(false);
    if wire.stream_options.is_some() && !stream {
        return Err(ApiError::invalid("stream_options", "stream_options is only allowed with stream: true"));
    }
    let (history, prompt, image) = messages(wire.messages, max_image_bytes)?;
    Ok(ChatRequest {
        model: wire.model,
        history,
        prompt,
        image,
        max_tokens,
        sampling: SamplingOptions { temperature: temperature as f32, top_k: 0, top_p: top_p as f32, seed },
        stop,
        stream,
        include_usage,
        glimpse: wire.glimpse,
    })
}

/// The turns before the last message, the last (user) message's text and its image.
fn messages(list: Vec<WireMessage>, max_image_bytes: u64) -> ApiResult<(Vec<Turn>, String, Option<ImageSource>)> {
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "at least one message is needed"));
    }
    if list.len() > MAX_MESSAGES {
        return Err(ApiError::invalid("messages", format!("{} messages: at most {MAX_MESSAGES}", list.len())));
    }
    let last = list.len() - 1;
    let mut history = Vec::new();
    let mut prompt = String::new();
    let mut image = None;
    for (i, m) in list.into_iter().enumerate() {
        let at = format!("messages[{i}]");
        let _ = &m.name;
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid(
                    format!("{at}.role"),
                    format!("role {other:?} is not supported (system, developer, user, assistant)"),
                ))
            }
        };
        if i == last && role != Role::User {
            return Err(ApiError::invalid(format!("{at}.role"), "the last message must be the user's"));
        }
        let parts = match m.content {
            None => return Err(ApiError::invalid(format!("{at}.content"), "a message needs content")),
            Some(Content::Text(t)) => vec![Part::Text { text: t }],
            Some(Content::Parts(p)) => p,
        };
        let mut texts = Vec::new();
        for (j, part) in parts.into_iter().enumerate() {
            match part {
                Part::Text { text } => texts.push(text),
                Part::ImageUrl { image_url } => {
                    let field = format!("{at}.content[{j}].image_url");
                    if i != last {
                        return Err(ApiError::invalid(
                            field,
                            "images are accepted in the last user message only (one image per request)",
                        ));
                    }
                    if image.is_some() {
                        return Err(ApiError::invalid(field, "one image per request"));
                    }
                    let url = match image_url {
                        ImageUrl::Object { url, .. } | ImageUrl::Bare(url) => url,
                    };
                    image = Some(image_source(&url, &field, max_image_bytes)?);
                }
            }
        }
        let text = texts.join("\n");
        if i == last {
            if text.trim().is_empty() && image.is_none() {
                return Err(ApiError::invalid(
                    format!("{at}.content"),
                    "the user message has neither text nor an image",
                ));
            }
            prompt = text;
        } else {
            history.push(Turn { role, text });
        }
    }
    Ok((history, prompt, image))
}

/// A `data:` URL's image bytes, or a local path; remote URLs are refused.
fn image_source(url: &str, field: &str, max_bytes: u64) -> ApiResult<ImageSource> {
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else {
            return Err(ApiError::invalid(field, "a data: URL needs a comma before its data"));
        };
        let Some(media) = meta.strip_suffix(";base64") else {
            return Err(ApiError::invalid(field, "only base64 data: URLs are accepted (data:image/png;base64,...)"));
        };
        if !matches!(media, "" | "image/png" | "image/jpeg" | "image/jpg") {
            return Err(ApiError::invalid(
                field,
                format!("media type {media:?} is not supported (image/png, image/jpeg)"),
            ));
        }
        // checked before decoding: base64 holds 3 bytes per 4 characters
        if (data.len() as u64 / 4).saturating_mul(3) > max_bytes {
            return Err(ApiError::new(
                413,
                "invalid_request_error",
                format!("{field}: the image is over {max_bytes} bytes"),
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim_end())
            .map_err(|e| ApiError::invalid(field, format!("the data: URL is not valid base64: {e}")))?;
        return Ok(ImageSource::Bytes(bytes));
    }
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(ImageSource::Path(PathBuf::from(path)));
    }
    if url.contains("://") {
        return Err(ApiError::invalid(
            field,
            "remote image URLs are not fetched: send the image as a base64 data: URL (or a local path under --allow-dir)",
        ));
    }
    if url.is_empty() {
        return Err(ApiError::invalid(field, "the image URL is empty"));
    }
    Ok(ImageSource::Path(PathBuf::from(url)))
}

/// The path of a local image if it lies under one of `allowed` (already canonical), resolved
/// (links followed) first so that `..` or a link cannot lead out.
pub fn confine(path: &Path, allowed: &[PathBuf], field: &str) -> ApiResult<PathBuf> {
    if allowed.is_empty() {
        return Err(ApiError::invalid(
            field,
            "local image paths are refused: the server was started without --allow-dir (send a base64 data: URL)",
        )
        .with_code("path_not_allowed"));
    }
    let real = path.canonicalize().map_err(|e| ApiError::invalid(field, format!("{}: {e}", path.display())))?;
    if allowed.iter().any(|dir| real.starts_with(dir)) {
        Ok(real)
    } else {
        Err(ApiError::new(403, "permission_error", format!("{field}: {} is outside every --allow-dir", path.display()))
            .with_code("path_not_allowed"))
    }
}

/// OpenAI's `finish_reason` of an answer: `stop` (end of sequence or a stop sequence) or
/// `length` (the token budget or the context ran out).
pub fn finish_reason(stop: StopReason, hit_stop_sequence: bool) -> &'static str {
    match stop {
        StopReason::Eos => "stop",
        StopReason::Cancelled if hit_stop_sequence => "stop",
        StopReason::MaxNewTokens | StopReason::Context | StopReason::Cancelled => "length",
    }
}

/// The `usage` object.
pub fn usage(stats: &GenerationStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
    })
}

/// What identifies one completion in every body and chunk.
#[derive(Debug, Clone)]
pub struct Ids {
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
}

/// The `chat.completion` body; `glimpse` carries the kept-token counts and stage times.
pub fn completion(ids: &Ids, text: &str, finish: &str, stats: &GenerationStats) -> Value {
    json!({
        "id": ids.id,
        "object": "chat.completion",
        "created": ids.created,
        "model": ids.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "finish_reason": finish,
            "logprobs": null,
        }],
        "usage": usage(stats),
        "glimpse": glimpse_report(stats),
    })
}

/// One `chat.completion.chunk`: a delta (`role` in the first, `content` after) or the last
/// one with its `finish_reason` (and the `glimpse` report).
pub fn chunk(ids: &Ids, delta: Value, finish: Option<&str>, stats: Option<&GenerationStats>) -> Value {
    let mut v = json!({
        "id": ids.id,
        "object": "chat.completion.chunk",
        "created": ids.created,
        "model": ids.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
    });
    if let (Some(s), Some(map)) = (stats, v.as_object_mut()) {
        map.insert("glimpse".into(), glimpse_report(s));
    }
    v
}

/// The chunk before `[DONE]` when `include_usage` was asked: no choices, the usage.
pub fn usage_chunk(ids: &Ids, stats: &GenerationStats) -> Value {
    json!({
        "id": ids.id,
        "object": "chat.completion.chunk",
        "created": ids.created,
        "model": ids.model,
        "choices": [],
        "usage": usage(stats),
    })
}

/// The `glimpse` object of a response: visual tokens before/after selection, views encoded,
/// time to first token and every stage's time in ms, the stop reason.
pub fn glimpse_report(stats: &GenerationStats) -> Value {
    let stages: Map<String, Value> = crate::pipeline::Stage::ALL
        .iter()
        .map(|s| (s.name().to_string(), json!(stats.times.get(*s).as_secs_f64() * 1e3)))
        .collect();
    json!({
        "visual_tokens": stats.visual_tokens,
        "visual_tokens_kept": stats.visual_tokens_kept,
        "views": stats.views,
        "ttft_ms": stats.ttft_ms,
        "stage_ms": stages,
        "stop": stats.stop,
        "prompt_compression": stats.prompt_compression,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> ApiResult<ChatRequest> {
        parse_chat_request(v.to_string().as_bytes(), 1 << 20)
    }

    #[test]
    fn a_conversation_with_an_image_becomes_history_prompt_and_bytes() {
        let r = parse(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                    {"type": "text", "text": "How many?"}]}],
            "max_tokens": 7, "temperature": 0, "seed": 3, "stop": "\n", "stream": true,
            "stream_options": {"include_usage": true}
        }))
        .unwrap();
        assert_eq!(r.history.len(), 3);
        assert_eq!(r.history[0], Turn { role: Role::System, text: "Be brief.".into() });
        assert_eq!(r.prompt, "How many?");
        assert_eq!(r.image, Some(ImageSource::Bytes(vec![0x89, b'P', b'N', b'G', 13, 10])));
        assert_eq!((r.max_tokens, r.sampling.temperature, r.sampling.seed), (Some(7), 0.0, 3));
        assert_eq!(r.stop, vec!["\n".to_string()]);
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let base = |extra: Value| {
            let mut v = json!({"model": "m", "messages": [{"role": "user", "content": "q"}]});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            parse(v).unwrap_err()
        };
        assert_eq!(base(json!({"n": 2})).param.as_deref(), Some("n"));
        assert_eq!(base(json!({"temperature": 3})).param.as_deref(), Some("temperature"));
        assert_eq!(base(json!({"top_p": 0})).param.as_deref(), Some("top_p"));
        assert_eq!(base(json!({"stop": ["a", "b", "c", "d", "e"]})).param.as_deref(), Some("stop"));
        assert_eq!(base(json!({"max_tokens": 0})).param.as_deref(), Some("max_tokens"));
        assert!(base(json!({"tools": []})).message.contains("tools"));
        assert_eq!(base(json!({"frequency_penalty": 0.5})).param.as_deref(), Some("frequency_penalty"));
        let img = |url: &str, last: bool| {
            let part = json!([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "q"}]);
            let msgs = if last {
                json!([{"role": "user", "content": part}])
            } else {
                json!([{"role": "user", "content": part}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}])
            };
            parse(json!({"model": "m", "messages": msgs})).unwrap_err()
        };
        assert!(img("https://example.com/a.png", true).message.contains("remote image URLs"));
        assert!(img("data:image/png;base64,@@@", true).message.contains("base64"));
        assert!(img("data:image/webp;base64,AAAA", true).message.contains("image/webp"));
        assert!(img("data:image/png;base64,AAAA", false).message.contains("last user message"));
        assert_eq!(img("data:image/png;base64,AAAA", false).param.as_deref(), Some("messages[0].content[0].image_url"));
        let e = parse(json!({"model": "m", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[1].role"));
        assert!(parse_chat_request(b"{not json", 1 << 20).unwrap_err().message.contains("not a valid"));
        assert_eq!(parse(json!({"model": "m", "messages": []})).unwrap_err().param.as_deref(), Some("messages"));
    }

    #[test]
    fn big_images_are_refused_before_decoding() {
        let data = "A".repeat(4000);
        let body = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{data}")}}]}]});
        let e = parse_chat_request(body.to_string().as_bytes(), 1000).unwrap_err();
        assert_eq!(e.status, 413);
    }

    #[test]
    fn local_paths_stay_under_the_allowed_folders() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("a.png");
        std::fs::write(&inside, b"x").unwrap();
        let allowed = vec![dir.path().canonicalize().unwrap()];
        assert!(confine(&inside, &allowed, "f").is_ok());
        assert_eq!(confine(&inside, &[], "f").unwrap_err().status, 400);
        let escape = dir.path().join("..").join(dir.path().file_name().unwrap()).join("..");
        assert_eq!(confine(&escape, &allowed, "f").unwrap_err().status, 403);
    }
}
