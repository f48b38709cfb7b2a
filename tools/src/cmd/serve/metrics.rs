//! `/metrics`: Prometheus text exposition (prometheus-client) of what the server did: requests
//! by route and status, queue depth, cancellations, time to first token and per-token decode
//! time histograms, visual tokens before and after selection, prompt and completion tokens.

use std::sync::Arc;

use glimpse_runtime::GenerationStats;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: String,
    pub status: String,
}

/// The server's counters; cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RouteStatus, Counter>,
    queue_depth: Gauge,
    cancelled: Counter,
    ttft: Histogram,
    decode_token: Histogram,
    request_seconds: Histogram,
    visual: Counter,
    visual_kept: Counter,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    /// Sum and count of answered requests' run times (ms), for Retry-After.
    run_ms: Arc<(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64)>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("glimpse");
        let requests = Family::<RouteStatus, Counter>::default();
        r.register("http_requests", "HTTP requests answered, by route and status", requests.clone());
        let queue_depth = Gauge::default();
        r.register("queue_depth", "Requests waiting for the worker", queue_depth.clone());
        let cancelled = Counter::default();
        r.register("requests_cancelled", "Requests cancelled: client gone or past --timeout", cancelled.clone());
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        r.register("ttft_seconds", "Time to first token of answered requests", ttft.clone());
        let decode_token = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        r.register("decode_token_seconds", "Mean decode time per generated token, per request", decode_token.clone());
        let request_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        r.register("request_seconds", "Time from the worker taking a request to its answer", request_seconds.clone());
        let visual = Counter::default();
        r.register("visual_tokens", "Visual tokens the encoder produced (before selection)", visual.clone());
        let visual_kept = Counter::default();
        r.register("visual_tokens_kept", "Visual tokens that reached the language model", visual_kept.clone());
        let prompt_tokens = Counter::default();
        r.register("prompt_tokens", "Prompt tokens prefilled", prompt_tokens.clone());
        let completion_tokens = Counter::default();
        r.register("completion_tokens", "Tokens generated", completion_tokens.clone());
        Metrics {
            registry: Arc::new(r),
            requests,
            queue_depth,
            cancelled,
            ttft,
            decode_token,
            request_seconds,
            visual,
            visual_kept,
            prompt_tokens,
            completion_tokens,
            run_ms: Arc::default(),
        }
    }

    /// An HTTP response went out.
    pub fn request(&self, route: &str, status: u16) {
        self.requests.get_or_create(&RouteStatus { route: route.into(), status: status.to_string() }).inc();
    }

    /// A request entered the queue.
    pub fn enqueued(&self) {
        self.queue_depth.inc();
    }

    /// A request left the queue (taken by the worker, or refused).
    pub fn dequeued(&self) {
        self.queue_depth.dec();
    }

    /// Requests waiting now.
    pub fn depth(&self) -> i64 {
        self.queue_depth.get()
    }

    pub fn cancelled(&self) {
        self.cancelled.inc();
    }

    /// An answer is complete.
    pub fn answered(&self, s: &GenerationStats) {
        use std::sync::atomic::Ordering::Relaxed;
        self.ttft.observe(s.ttft_ms / 1e3);
        if s.new_tokens > 1 && s.decode_tokens_per_s > 0.0 {
            self.decode_token.observe(1.0 / s.decode_tokens_per_s);
        }
        let run = s.times.total().as_secs_f64();
        self.request_seconds.observe(run);
        self.run_ms.0.fetch_add((run * 1e3) as u64, Relaxed);
        self.run_ms.1.fetch_add(1, Relaxed);
        self.visual.inc_by(s.visual_tokens as u64);
        self.visual_kept.inc_by(s.visual_tokens_kept as u64);
        self.prompt_tokens.inc_by(s.prompt_tokens as u64);
        self.completion_tokens.inc_by(s.new_tokens as u64);
    }

    /// Seconds a refused client should wait: the mean run time times the requests ahead.
    pub fn retry_after_s(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let (sum, n) = (self.run_ms.0.load(Relaxed), self.run_ms.1.load(Relaxed));
        let mean_ms = sum.checked_div(n).unwrap_or(1000);
        let ahead = self.depth().max(0) as u64 + 1;
        (mean_ms.saturating_mul(ahead)).div_ceil(1000).max(1)
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
