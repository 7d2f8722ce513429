//! [`RevocationListener`]: follows the key service's event stream (`GET /v1/events`,
//! Server-Sent Events) and invalidates a [`CachedVerifier`] by key id.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http::header::{ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use super::Verifier;
use super::cached::{CachedVerifier, Shared};
use super::http::{DEFAULT_CONNECT_TIMEOUT, Endpoint, KeyServiceUrls, RemoteConfigError, bearer, describe, endpoints};

/// Default interval at which the key service sends heartbeats: 15 s. The stream is
/// declared dead when nothing arrives for twice this long.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
/// Default first reconnect delay bound: 100 ms.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Default largest reconnect delay bound: 30 s.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Default longest SSE line, and longest event data: 64 KiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;

/// A connection that lasted this long resets the backoff; shorter ones keep growing it,
/// so a key service that accepts and drops at once is not hammered (and the cache is
/// not dropped in a tight loop).
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How often a quiet stream checks that the verifier still exists.
const LIVENESS_TICK: Duration = Duration::from_secs(1);

/// Follows the key service's event stream and keeps a [`CachedVerifier`] honest.
///
/// - `revoked`, `updated` and `rotated` events (data `{"key_id": "..."}`) invalidate
///   that key id at once; an event of these kinds whose data cannot be read drops the
///   whole cache instead (logged at `warn`, counted in `invalidation_failures` and
///   `keygate_events_invalidation_failures_total`): a failed invalidation is never
///   ignored.
/// - `reset` drops the whole cache; `alert`, heartbeats, comments and unknown events
///   are only signs of life.
/// - **Gaps.** Every time a connection is established the whole cache is dropped,
///   because events sent while disconnected are lost (the first connection too: the
///   cache may hold verdicts from before the subscription). A stream silent for twice
///   the heartbeat interval (default 2 × 15 s) counts as lost.
/// - **Reconnects** use exponential backoff with full jitter: a random delay between 0
///   and `min(max_backoff, initial_backoff × 2^n)` (defaults 100 ms and 30 s), where `n`
///   counts failures since the last connection that stayed up 10 s. Failing to connect
///   moves to the next URL; a stream lost after connecting retries the same URL first.
/// - **Stopping.** The task ends when this handle is dropped or
///   [`shutdown`](Self::shutdown), or when every clone of the verifier is gone (it only
///   holds a weak reference). Lines longer than 64 KiB end the connection.
///
/// While disconnected the cache keeps serving under its TTL and stale-if-error rules.
///
/// Metrics: the gauge `keygate_events_connected` (0 or 1) and the counters
/// `keygate_events_reconnects_total`, `keygate_events_connect_failures_total`,
/// `keygate_events_invalidations_total` and `keygate_events_invalidation_failures_total`.
///
/// ```no_run
/// use keygate::{CachedVerifier, HttpVerifier, verify::RevocationListener};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let token = std::env::var("KEYGATE_SERVICE_TOKEN")?;
/// let cache = CachedVerifier::new(HttpVerifier::builder("http://keys:7000").service_token(&token).build()?);
/// let listener = RevocationListener::builder("http://keys:7000", &token).spawn(&cache)?;
/// // ... serve requests with `cache`; keep `listener` alive as long as the cache.
/// # drop(listener); Ok(()) }
/// ```
pub struct RevocationListener {
    state: Arc<State>,
    stop: Option<watch::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Counters of a [`RevocationListener`], read with [`RevocationListener::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerStats {
    /// Whether a stream is open right now.
    pub connected: bool,
    /// Connections established, the first included.
    pub connects: u64,
    /// Connections established after the first (each one followed a gap).
    pub reconnects: u64,
    /// Connection attempts that failed (refused, bad status, timeout).
    pub connect_failures: u64,
    /// Invalidations applied from `revoked`, `updated` and `rotated` events.
    pub invalidations: u64,
    /// Times the whole cache was dropped (connections, `reset`, unreadable events).
    pub cache_drops: u64,
    /// Events that should have invalidated a key id but could not be read.
    pub invalidation_failures: u64,
}

#[derive(Default)]
struct State {
    connected: AtomicBool,
    connects: AtomicU64,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    invalidations: AtomicU64,
    cache_drops: AtomicU64,
    invalidation_failures: AtomicU64,
    endpoint: AtomicUsize,
}

struct Config {
    client: reqwest::Client,
    endpoints: Box<[Endpoint]>,
    auth: HeaderValue,
    heartbeat_interval: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    max_line_bytes: usize,
}

impl RevocationListener {
    /// Starts a builder for the key service at `urls` (one or several replicas), with
    /// the same service token as the verifier. Defaults: heartbeat interval 15 s,
    /// backoff 100 ms to 30 s, lines up to 64 KiB, connect timeout 500 ms.
    pub fn builder(urls: impl KeyServiceUrls, service_token: impl Into<String>) -> RevocationListenerBuilder {
        RevocationListenerBuilder {
            urls: urls.into_urls(),
            token: Zeroizing::new(service_token.into()),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            client: None,
        }
    }

    /// Whether a stream is open right now.
    pub fn is_connected(&self) -> bool {
        self.state.connected.load(Ordering::Acquire)
    }

    /// Connections established after the first one.
    pub fn reconnects(&self) -> u64 {
        self.state.reconnects.load(Ordering::Relaxed)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ListenerStats {
        let s = &self.state;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ListenerStats {
            connected: s.connected.load(Ordering::Acquire),
            connects: get(&s.connects),
            reconnects: get(&s.reconnects),
            connect_failures: get(&s.connect_failures),
            invalidations: get(&s.invalidations),
            cache_drops: get(&s.cache_drops),
            invalidation_failures: get(&s.invalidation_failures),
        }
    }

    /// Position (from 0) of the URL followed or tried last.
    pub fn current_endpoint(&self) -> usize {
        self.state.endpoint.load(Ordering::Relaxed)
    }

    /// Whether the task has ended (shut down, or the verifier is gone).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the task and waits for it to end.
    pub async fn shutdown(mut self) {
        self.stop.take();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RevocationListener {
    fn drop(&mut self) {
        // Dropping the sender wakes the task, which ends at its next poll.
        self.stop.take();
    }
}

impl fmt::Debug for RevocationListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevocationListener").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

/// Builds a [`RevocationListener`]; see [`RevocationListener::builder`].
#[must_use]
pub struct RevocationListenerBuilder {
    urls: Vec<String>,
    token: Zeroizing<String>,
    heartbeat_interval: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    max_line_bytes: usize,
    connect_timeout: Duration,
    client: Option<reqwest::Client>,
}

impl fmt::Debug for RevocationListenerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevocationListenerBuilder")
            .field("urls", &self.urls.len())
            .field("service_token", &"<redacted>")
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .finish_non_exhaustive()
    }
}

impl RevocationListenerBuilder {
    /// The key service's heartbeat interval (default 15 s); nothing received for twice
    /// this long ends the connection.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Reconnect delay bounds (defaults 100 ms and 30 s).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Longest SSE line, and longest event data (default 64 KiB).
    pub fn max_line_bytes(mut self, bytes: usize) -> Self {
        self.max_line_bytes = bytes.max(64);
        self
    }

    /// Connect timeout (default 500 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Uses this reqwest client instead of building one. It must not set a total
    /// request timeout, which would cut the stream.
    pub fn client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Spawns the listener on the current Tokio runtime, invalidating `cache`.
    pub fn spawn<V: Verifier>(self, cache: &CachedVerifier<V>) -> Result<RevocationListener, RemoteConfigError> {
        let endpoints = endpoints(self.urls, "/v1/events")?;
        let auth = bearer(Some(self.token.as_str()))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| RemoteConfigError::NoRuntime)?;
        let client = match self.client {
            Some(client) => client,
            None => reqwest::Client::builder()
                .connect_timeout(self.connect_timeout)
                .tcp_keepalive(Duration::from_secs(15))
                .user_agent(concat!("keygate/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| RemoteConfigError::Client(e.to_string()))?,
        };
        let config = Config {
            client,
            endpoints,
            auth,
            heartbeat_interval: self.heartbeat_interval,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            max_line_bytes: self.max_line_bytes,
        };
        let state = Arc::new(State::default());
        let (stop_tx, stop_rx) = watch::channel(());
        let task = runtime.spawn(run(cache.downgrade(), config, Arc::clone(&state), stop_rx));
        Ok(RevocationListener { state, stop: Some(stop_tx), task: Some(task) })
    }
}

/// How one connection ended.
enum Ended {
    /// The verifier is gone: stop.
    VerifierGone,
    /// No stream was established.
    NotConnected(String),
    /// A stream was up for `lasted`, then broke.
    Lost { lasted: Duration, why: String },
}

async fn run<V: Verifier>(cache: Weak<Shared<V>>, config: Config, state: Arc<State>, mut stop: watch::Receiver<()>) {
    let n = config.endpoints.len();
    let mut index = 0;
    let mut failures: u32 = 0;
    loop {
        if cache.strong_count() == 0 {
            break;
        }
        state.endpoint.store(index, Ordering::Relaxed);
        let endpoint = &config.endpoints[index];
        let ended = tokio::select! {
            _ = stop.changed() => break,
            ended = follow(&cache, &config, &state, endpoint) => ended,
        };
        set_connected(&state, false);
        match ended {
            Ended::VerifierGone => break,
            Ended::NotConnected(why) => {
                state.connect_failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("keygate_events_connect_failures_total").increment(1);
                tracing::warn!(endpoint = %endpoint.label, error = %why, "event stream: could not connect");
                index = (index + 1) % n;
            }
            Ended::Lost { lasted, why } => {
                tracing::warn!(endpoint = %endpoint.label, error = %why, "event stream lost; the cache falls back to its TTL until reconnected");
                if lasted >= STABLE_AFTER {
                    failures = 0;
                }
            }
        }
        let delay = backoff(config.initial_backoff, config.max_backoff, failures);
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    set_connected(&state, false);
    tracing::debug!("event stream listener stopped");
}

fn set_connected(state: &State, connected: bool) {
    state.connected.store(connected, Ordering::Release);
    metrics::gauge!("keygate_events_connected").set(if connected { 1.0 } else { 0.0 });
}

/// Full jitter: uniform in `[0, min(max, initial × 2^failures)]`.
fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    let cap = initial.saturating_mul(1u32 << failures.min(20)).min(max);
    let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    let random = getrandom::u64().unwrap_or_else(|_| u64::from(Instant::now().elapsed().subsec_nanos()));
    Duration::from_millis(random % cap_ms.saturating_add(1))
}

async fn follow<V: Verifier>(cache: &Weak<Shared<V>>, config: &Config, state: &State, endpoint: &Endpoint) -> Ended {
    let dead_after = config.heartbeat_interval.saturating_mul(2);
    let request = config
        .client
        .get(endpoint.url.clone())
        .header(AUTHORIZATION, config.auth.clone())
        .header(ACCEPT, "text/event-stream")
        .header(CACHE_CONTROL, "no-cache")
        .send();
    let mut response = match tokio::time::timeout(dead_after, request).await {
        Err(_) => return Ended::NotConnected(format!("no answer within {dead_after:?}")),
        Ok(Err(e)) => return Ended::NotConnected(describe(&e)),
        Ok(Ok(r)) => r,
    };
    if response.status() != reqwest::StatusCode::OK {
        return Ended::NotConnected(format!("HTTP {}", response.status()));
    }
    let is_sse = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
    if !is_sse {
        return Ended::NotConnected("the answer is not text/event-stream".into());
    }

    let Some(shared) = cache.upgrade() else { return Ended::VerifierGone };
    let connects = state.connects.fetch_add(1, Ordering::Relaxed) + 1;
    // Whatever happened before this point was not heard: start from an empty cache.
    shared.core.invalidate_all();
    drop(shared);
    state.cache_drops.fetch_add(1, Ordering::Relaxed);
    set_connected(state, true);
    if connects > 1 {
        state.reconnects.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keygate_events_reconnects_total").increment(1);
        tracing::warn!(endpoint = %endpoint.label, "event stream reconnected after a gap: dropped the whole cache");
    } else {
        tracing::info!(endpoint = %endpoint.label, "event stream connected");
    }

    let connected_at = Instant::now();
    let mut last_seen = connected_at;
    let mut parser = SseParser::new(config.max_line_bytes);
    let mut events = Vec::new();
    loop {
        let chunk = match tokio::time::timeout(LIVENESS_TICK.min(dead_after), response.chunk()).await {
            Err(_) => {
                if cache.strong_count() == 0 {
                    return Ended::VerifierGone;
                }
                if last_seen.elapsed() >= dead_after {
                    let why = format!("nothing received for {dead_after:?} (heartbeat missed)");
                    return Ended::Lost { lasted: connected_at.elapsed(), why };
                }
                continue;
            }
            Ok(Err(e)) => return Ended::Lost { lasted: connected_at.elapsed(), why: describe(&e) },
            Ok(Ok(None)) => return Ended::Lost { lasted: connected_at.elapsed(), why: "closed by the server".into() },
            Ok(Ok(Some(chunk))) => chunk,
        };
        last_seen = Instant::now();
        if let Err(why) = parser.feed(&chunk, &mut events) {
            return Ended::Lost { lasted: connected_at.elapsed(), why };
        }
        for event in events.drain(..) {
            let Some(shared) = cache.upgrade() else { return Ended::VerifierGone };
            apply(&shared, state, &event).await;
        }
    }
}

#[derive(serde::Deserialize)]
struct KeyIdData {
    key_id: String,
}

async fn apply<V: Verifier>(shared: &Shared<V>, state: &State, event: &SseEvent) {
    match event.event.as_str() {
        kind @ ("revoked" | "updated" | "rotated") => {
            match serde_json::from_str::<KeyIdData>(&event.data).ok().filter(|d| !d.key_id.is_empty()) {
                Some(data) => {
                    let removed = shared.core.invalidate_key_id(&data.key_id).await;
                    state.invalidations.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("keygate_events_invalidations_total").increment(1);
                    tracing::debug!(event = kind, key_id = %data.key_id, removed, "event stream: invalidated");
                }
                None => {
                    // We know a key changed but not which: only dropping everything is safe.
                    state.invalidation_failures.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("keygate_events_invalidation_failures_total").increment(1);
                    tracing::warn!(event = kind, "event stream: unreadable event data; dropping the whole cache");
                    shared.core.invalidate_all();
                    state.cache_drops.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        "reset" => {
            tracing::info!("event stream: reset; dropping the whole cache");
            shared.core.invalidate_all();
            state.cache_drops.fetch_add(1, Ordering::Relaxed);
        }
        other => tracing::trace!(event = other, "event stream: ignored event"),
    }
}

/// One dispatched Server-Sent Event.
#[derive(Debug, PartialEq, Eq)]
struct SseEvent {
    event: String,
    data: String,
}

/// A bounded, incremental parser for the `text/event-stream` format (fields `event`
/// and `data`; `id` and `retry` are ignored, comments are heartbeats). Lines end with
/// CRLF, LF or CR, split across chunks in any way.
struct SseParser {
    max_line: usize,
    line: Vec<u8>,
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    fn new(max_line: usize) -> Self {
        Self { max_line, line: Vec::new(), after_cr: false, event: String::new(), data: String::new(), has_data: false }
    }

    fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), String> {
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' => self.end_line(out)?,
                b'\r' => {
                    self.after_cr = true;
                    self.end_line(out)?;
                }
                _ => {
                    if self.line.len() >= self.max_line {
                        return Err(format!("an event-stream line is longer than {} bytes", self.max_line));
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) -> Result<(), String> {
        if self.line.is_empty() {
            // Unlike browsers we also dispatch named events without data: a `reset`
            // must not be lost to a formality.
            if self.has_data || !self.event.is_empty() {
                let event = if self.event.is_empty() { "message".to_owned() } else { std::mem::take(&mut self.event) };
                out.push(SseEvent { event, data: std::mem::take(&mut self.data) });
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
            return Ok(());
        }
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => {
                self.event.clear();
                self.event.push_str(value);
            }
            "data" => {
                if self.data.len() + value.len() + 1 > self.max_line {
                    return Err(format!("an event's data is longer than {} bytes", self.max_line));
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<SseEvent> {
        let mut parser = SseParser::new(1024);
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            parser.feed(chunk, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn parses_events_split_anywhere() {
        let input = b": hello\n\nevent: revoked\ndata: {\"key_id\":\"k1\"}\n\n\
                      event:reset\r\n\r\nid: 7\r\nevent: rotated\rdata: a\rdata: b\r\r: ping\n\ndata: plain\n\n";
        let expected = vec![
            SseEvent { event: "revoked".into(), data: "{\"key_id\":\"k1\"}".into() },
            SseEvent { event: "reset".into(), data: String::new() },
            SseEvent { event: "rotated".into(), data: "a\nb".into() },
            SseEvent { event: "message".into(), data: "plain".into() },
        ];
        for piece in [1, 2, 3, 7, input.len()] {
            assert_eq!(parse_in_pieces(input, piece), expected, "piece {piece}");
        }
    }

    #[test]
    fn long_lines_are_refused() {
        let mut parser = SseParser::new(64);
        let mut out = Vec::new();
        assert!(parser.feed(&[b'a'; 65], &mut out).is_err());
        let mut parser = SseParser::new(64);
        let many = "data: 0123456789\n".repeat(10);
        assert!(parser.feed(many.as_bytes(), &mut out).is_err());
    }

    #[test]
    fn backoff_is_bounded() {
        for failures in [0, 1, 5, 40, u32::MAX] {
            let d = backoff(Duration::from_millis(100), Duration::from_secs(30), failures);
            assert!(d <= Duration::from_secs(30));
        }
        assert!(backoff(Duration::from_millis(100), Duration::from_secs(30), 0) <= Duration::from_millis(100));
    }
}
