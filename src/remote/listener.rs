//! [`RevocationListener`]: follows the key service's event stream (`GET /v1/events`,
//! Server-Sent Events) and invalidates a [`CachedVerifier`] by key id.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::StreamExt;
use http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::remote::{
    DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_BACKOFF, Endpoint, KeyServiceUrls, Remote, RemoteConfigError, RemoteSettings,
    Ticket, answered_by, backoff, describe, remote_builder_methods,
};
use crate::verify::Verifier;
use crate::verify::cached::{CachedVerifier, Shared};
use crate::wire::{self, EventName, KeyChanged};

/// Default interval at which the key service sends heartbeats: 15 s. The stream is
/// declared dead when nothing arrives for twice this long.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
/// Default largest event on the stream (all of its lines together): 64 KiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;

/// A connection that lasted this long resets the backoff; shorter ones keep growing it,
/// so a key service that accepts and drops at once is not hammered (and the cache is
/// not dropped in a tight loop).
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How often a quiet stream checks that the verifier still exists.
const LIVENESS_TICK: Duration = Duration::from_secs(1);

/// Follows the key service's event stream and keeps a [`CachedVerifier`] honest.
///
/// The events are those of [`wire`](crate::wire#events-get-v1events).
///
/// - `revoked`, `updated` and `rotated` events (data `{"key_id": "..."}`) invalidate
///   that key id at once; an event of these kinds whose data cannot be read
///   revalidates the whole cache instead (logged at `warn`, counted in `invalidation_failures` and
///   `keygate_events_invalidation_failures_total`): a failed invalidation is never
///   ignored.
/// - `reset` revalidates the whole cache ([`CachedVerifier::revalidate_all`]): with
///   [`HttpVerifier`](crate::HttpVerifier), no verdict held is served again until the
///   key service confirms it, in background batches at a bounded rate (or within the
///   cache's [`serve_during_revalidation`](crate::CachedVerifierBuilder::serve_during_revalidation)
///   window); with a verifier that cannot verify by digest, the cache is dropped.
///   `alert`, heartbeats, comments and unknown events are only signs of life.
/// - **Gaps and resumption.** The listener remembers the last event id it saw (the
///   change log id the key service puts on every change, or the stream's
///   `keygate-events-position` until one arrives) and reconnects with
///   `Last-Event-ID`: a key service that resumes the stream (it answers with
///   `keygate-events-resumed`) replays what was missed, in order, before going live,
///   so the cache is **kept** across the reconnect, to another replica of the same
///   database too. The whole cache is revalidated when a connection is established
///   without resumption: the first one (the cache may hold verdicts from before the
///   subscription), one to a key service that sends no ids (an older one) or that
///   refused the id (it then also sends `reset`, `expired` or `future`). A stream
///   silent for twice the heartbeat interval (default 2 × 15 s) counts as lost.
///   [`ListenerStats`] counts `resumes` and `resets`.
/// - **Reconnects** use exponential backoff with jitter: a random delay between half
///   and all of `min(max_backoff, initial_backoff × 2^n)` (defaults 100 ms and 5 s), where `n`
///   counts failures since the last connection that stayed up 10 s. Failing to connect
///   (refused, timed out, an HTTP status other than 200, a redirect included: it is
///   never followed) moves to the next URL; a stream lost after connecting retries the
///   same URL first. A 401 with the token read from a
///   [`service_token_file`](RevocationListenerBuilder::service_token_file) reads the
///   file again and, if it holds a new token, reconnects at once with it (a stream
///   closed because its token was revoked comes back on the new one).
/// - **Stopping.** The task ends when this handle is dropped or
///   [`shutdown`](Self::shutdown), or when every clone of the verifier is gone (it only
///   holds a weak reference). An event longer than 64 KiB (all its lines together)
///   ends the connection.
///
/// While disconnected the cache keeps serving under its TTL and stale-if-error rules,
/// exactly as before resumption existed: what changed meanwhile is applied when the
/// stream resumes (within one round trip of reconnecting), or the cache is dropped.
///
/// Metrics: the gauge `keygate_events_connected` (0 or 1) and the counters
/// `keygate_events_reconnects_total`, `keygate_events_resumes_total`,
/// `keygate_events_connect_failures_total`,
/// `keygate_events_invalidations_total` and `keygate_events_invalidation_failures_total`.
///
/// ```no_run
/// use keygate::{CachedVerifier, HttpVerifier, RevocationListener};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let token = std::env::var("KEYGATE_SERVICE_TOKEN")?;
/// let cache = CachedVerifier::new(HttpVerifier::builder("http://keys:7000").service_token(&token).build()?);
/// let listener = RevocationListener::builder("http://keys:7000").service_token(&token).spawn(&cache)?;
/// // ... serve requests with `cache`; keep `listener` alive as long as the cache.
/// # drop(listener); Ok(()) }
/// ```
#[must_use = "the listener stops when dropped"]
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
    /// Times the whole cache was revalidated, or dropped (connections not resumed,
    /// `reset`, unreadable events).
    pub cache_drops: u64,
    /// Events that should have invalidated a key id but could not be read.
    pub invalidation_failures: u64,
    /// Connections that resumed from the last event id: the cache was kept.
    pub resumes: u64,
    /// `reset` events received (each revalidated the cache).
    pub resets: u64,
    /// The last event id seen (what the next connection resumes from); `None` before
    /// the first, or after a key service that sends no ids.
    pub last_event_id: Option<u64>,
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
    resumes: AtomicU64,
    resets: AtomicU64,
    /// The last event id seen; [`NO_ID`] for none.
    last_event_id: AtomicU64,
    endpoint: AtomicUsize,
}

/// [`State::last_event_id`] when there is none (ids are at most `i64::MAX`).
const NO_ID: u64 = u64::MAX;

impl State {
    fn new() -> Self {
        Self { last_event_id: AtomicU64::new(NO_ID), ..Self::default() }
    }

    fn last_event_id(&self) -> Option<u64> {
        Some(self.last_event_id.load(Ordering::Relaxed)).filter(|&id| id != NO_ID)
    }

    fn set_last_event_id(&self, id: Option<u64>) {
        self.last_event_id.store(id.unwrap_or(NO_ID), Ordering::Relaxed);
    }
}

struct Config {
    remote: Remote,
    heartbeat_interval: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    max_line_bytes: usize,
}

impl RevocationListener {
    /// Starts a builder for the key service at `urls` (one or several replicas, at most
    /// 64). Set the same service token as the verifier's with
    /// [`service_token`](RevocationListenerBuilder::service_token). Defaults: heartbeat
    /// interval 15 s, backoff 100 ms to 5 s, events up to 64 KiB, connect timeout 500 ms.
    pub fn builder(urls: impl KeyServiceUrls) -> RevocationListenerBuilder {
        RevocationListenerBuilder {
            remote: RemoteSettings::new(urls),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
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
            resumes: get(&s.resumes),
            resets: get(&s.resets),
            last_event_id: s.last_event_id(),
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
#[derive(Debug)]
pub struct RevocationListenerBuilder {
    remote: RemoteSettings,
    heartbeat_interval: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    max_line_bytes: usize,
}

impl RevocationListenerBuilder {
    remote_builder_methods!();

    /// The key service's heartbeat interval (default 15 s); nothing received for twice
    /// this long ends the connection.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Reconnect delay bounds (defaults 100 ms and 5 s).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Largest event, all of its lines together (default 64 KiB); a longer one ends
    /// the connection. The bound is applied to the bytes before they are parsed, so the
    /// parser never buffers more than this plus one network read.
    pub fn max_line_bytes(mut self, bytes: usize) -> Self {
        self.max_line_bytes = bytes.max(64);
        self
    }

    /// Spawns the listener on the current Tokio runtime, invalidating `cache`. A client
    /// given with [`client`](Self::client) must not set a total request timeout, which
    /// would cut the stream.
    pub fn spawn<V: Verifier>(self, cache: &CachedVerifier<V>) -> Result<RevocationListener, RemoteConfigError> {
        let remote = self.remote.build(wire::EVENTS_PATH, None, Some(Duration::from_secs(15)))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| RemoteConfigError::NoRuntime)?;
        let config = Config {
            remote,
            heartbeat_interval: self.heartbeat_interval,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            max_line_bytes: self.max_line_bytes,
        };
        let state = Arc::new(State::new());
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
    /// 401: the token this ticket stands for was refused.
    Refused(Ticket),
    /// A stream was up for `lasted`, then broke.
    Lost { lasted: Duration, why: String },
}

async fn run<V: Verifier>(cache: Weak<Shared<V>>, config: Config, state: Arc<State>, mut stop: watch::Receiver<()>) {
    let endpoints = &config.remote.endpoints;
    let mut index = endpoints.pick(0, 0).unwrap_or(0);
    let mut failures: u32 = 0;
    loop {
        if cache.strong_count() == 0 {
            break;
        }
        state.endpoint.store(index, Ordering::Relaxed);
        let endpoint = endpoints.get(index);
        let ended = tokio::select! {
            _ = stop.changed() => break,
            ended = follow(&cache, &config, &state, endpoint) => ended,
        };
        set_connected(&state, false);
        match ended {
            Ended::VerifierGone => break,
            Ended::Refused(ticket) => {
                state.connect_failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("keygate_events_connect_failures_total").increment(1);
                if config.remote.auth.refused(ticket).await {
                    tracing::info!(endpoint = %endpoint.label, "event stream: service token refused; reconnecting with the new one from the token file");
                    continue;
                }
                tracing::error!(endpoint = %endpoint.label, "event stream: key service refused the service token");
                endpoints.mark_down(index);
                index = endpoints.pick(index + 1, 0).unwrap_or(0);
            }
            Ended::NotConnected(why) => {
                state.connect_failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("keygate_events_connect_failures_total").increment(1);
                tracing::warn!(endpoint = %endpoint.label, error = %why, "event stream: could not connect");
                endpoints.mark_down(index);
                index = endpoints.pick(index + 1, 0).unwrap_or(0);
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

/// Why the byte stream under the SSE parser ended in error.
#[derive(Debug)]
enum StreamError {
    Transfer(reqwest::Error),
    TooLong(usize),
    NotUtf8,
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transfer(e) => f.write_str(&describe(e)),
            Self::TooLong(max) => write!(f, "an event is longer than {max} bytes"),
            Self::NotUtf8 => f.write_str("the stream is not UTF-8"),
        }
    }
}

/// Counts the bytes of the event being received (its lines, without their ends) and
/// refuses the stream once one exceeds the bound: `eventsource-stream` buffers an event
/// until it is complete and has no bound of its own. Lines end with CRLF, LF or CR; an
/// empty line ends an event.
///
/// It also refuses bytes that are not UTF-8: the parser keeps everything after an
/// invalid byte, waiting for a character that never completes, and would grow without
/// bound and stop yielding events while the bytes still look like signs of life. And
/// it removes the byte order mark a stream may start with: the parser's own removal
/// slices the mark's first byte off and panics, which would end the listener's task.
pub(crate) struct EventBound {
    max: usize,
    event: usize,
    line: usize,
    after_cr: bool,
    /// The start of a character split between reads (at most 3 bytes).
    partial: [u8; 4],
    partial_len: usize,
    /// Bytes of the stream's first 3 that were a byte order mark's.
    bom: usize,
}

/// What the parser reads before the stream: an empty line, which is no event, so that
/// its first text never starts with a byte order mark (see [`EventBound`]).
pub(crate) const PARSER_START: &[u8] = b"\n";

const BOM: &[u8] = b"\xef\xbb\xbf";

impl EventBound {
    pub(crate) fn new(max: usize) -> Self {
        EventBound { max, event: 0, line: 0, after_cr: false, partial: [0; 4], partial_len: 0, bom: 0 }
    }

    /// Checks a read and returns what the parser gets of it: all of it, less the byte
    /// order mark at the start of the stream.
    fn pass(&mut self, chunk: bytes::Bytes) -> Result<bytes::Bytes, StreamError> {
        self.check(&chunk)?;
        if self.bom == BOM.len() {
            return Ok(chunk);
        }
        // The mark's bytes are held back until all three are seen: `EF BB BB` is a
        // character, not a mark.
        let held = self.bom;
        let mut i = 0;
        while self.bom < BOM.len() && i < chunk.len() {
            if chunk[i] != BOM[self.bom] {
                self.bom = BOM.len();
                if held == 0 {
                    return Ok(chunk);
                }
                let mut out = bytes::BytesMut::with_capacity(held + chunk.len());
                out.extend_from_slice(&BOM[..held]);
                out.extend_from_slice(&chunk);
                return Ok(out.freeze());
            }
            self.bom += 1;
            i += 1;
        }
        Ok(chunk.slice(i..))
    }

    fn check(&mut self, chunk: &[u8]) -> Result<(), StreamError> {
        self.check_utf8(chunk)?;
        for &b in chunk {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            if b == b'\n' || b == b'\r' {
                self.after_cr = b == b'\r';
                if self.line == 0 {
                    self.event = 0;
                }
                self.line = 0;
            } else {
                self.line += 1;
                self.event += 1;
                if self.event > self.max {
                    return Err(StreamError::TooLong(self.max));
                }
            }
        }
        Ok(())
    }

    fn check_utf8(&mut self, chunk: &[u8]) -> Result<(), StreamError> {
        let mut rest = chunk;
        // First finish the character the last read ended inside of.
        while self.partial_len > 0 {
            let Some((&b, tail)) = rest.split_first() else { return Ok(()) };
            rest = tail;
            self.partial[self.partial_len] = b;
            self.partial_len += 1;
            match std::str::from_utf8(&self.partial[..self.partial_len]) {
                Ok(_) => self.partial_len = 0,
                Err(e) if e.error_len().is_some() => return Err(StreamError::NotUtf8),
                Err(_) => {}
            }
        }
        match std::str::from_utf8(rest) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(StreamError::NotUtf8),
            Err(e) => {
                // Cut inside a character (1 to 3 bytes): the next read completes it.
                let tail = &rest[e.valid_up_to()..];
                self.partial[..tail.len()].copy_from_slice(tail);
                self.partial_len = tail.len();
                Ok(())
            }
        }
    }
}

#[cfg(fuzzing)]
impl EventBound {
    pub(crate) fn accepts(&mut self, chunk: &[u8]) -> Option<Vec<u8>> {
        self.pass(bytes::Bytes::copy_from_slice(chunk)).ok().map(Vec::from)
    }
}

async fn follow<V: Verifier>(cache: &Weak<Shared<V>>, config: &Config, state: &State, endpoint: &Endpoint) -> Ended {
    let dead_after = config.heartbeat_interval.saturating_mul(2);
    let (request, ticket) = config.remote.request(reqwest::Method::GET, endpoint).await;
    let mut request = request.header(ACCEPT, "text/event-stream").header(CACHE_CONTROL, "no-cache");
    let resume_from = state.last_event_id();
    if let Some(id) = resume_from {
        request = request.header(wire::LAST_EVENT_ID_HEADER, id.to_string());
    }
    let request = request.send();
    let response = match tokio::time::timeout(dead_after, request).await {
        Err(_) => return Ended::NotConnected(format!("no answer within {dead_after:?}")),
        Ok(Err(e)) => return Ended::NotConnected(describe(&e)),
        Ok(Ok(r)) => r,
    };
    if response.status() == reqwest::StatusCode::UNAUTHORIZED && answered_by(&response, endpoint) {
        return Ended::Refused(ticket);
    }
    if response.status() != reqwest::StatusCode::OK {
        let redirect = if response.status().is_redirection() { " (redirects are not followed)" } else { "" };
        return Ended::NotConnected(format!("HTTP {}{redirect}", response.status()));
    }
    if !answered_by(&response, endpoint) {
        return Ended::NotConnected("the answer came from another URL (redirected)".into());
    }
    let is_sse = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
    if !is_sse {
        return Ended::NotConnected("the answer is not text/event-stream".into());
    }

    let header_id =
        |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).and_then(wire::parse_event_id);
    let resumed = resume_from.is_some() && header_id(wire::EVENTS_RESUMED_HEADER) == resume_from;
    let position = header_id(wire::EVENTS_POSITION_HEADER);

    let Some(shared) = cache.upgrade() else { return Ended::VerifierGone };
    let connects = state.connects.fetch_add(1, Ordering::Relaxed) + 1;
    // The key service answers: lookups need not wait for the circuit's next probe.
    shared.core.circuit.close("the event stream connected");
    if resumed {
        // The key service replays what was missed before anything live: the cache stays.
        state.resumes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keygate_events_resumes_total").increment(1);
    } else {
        // Whatever happened before this point was not heard: nothing held is trusted
        // until confirmed again.
        shared.revalidate_all();
        state.cache_drops.fetch_add(1, Ordering::Relaxed);
        state.set_last_event_id(position);
    }
    drop(shared);
    set_connected(state, true);
    if connects > 1 {
        state.reconnects.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keygate_events_reconnects_total").increment(1);
        match resume_from {
            _ if resumed => {
                tracing::info!(endpoint = %endpoint.label, after = resume_from, "event stream resumed after a gap: the cache is kept")
            }
            Some(_) => {
                tracing::warn!(endpoint = %endpoint.label, "event stream reconnected but not resumed: dropped the whole cache")
            }
            None => {
                tracing::warn!(endpoint = %endpoint.label, "event stream reconnected after a gap (no event id to resume from): dropped the whole cache")
            }
        }
    } else {
        tracing::info!(endpoint = %endpoint.label, resumed, "event stream connected");
    }

    let connected_at = Instant::now();
    // Any byte is a sign of life, comments (the usual heartbeat) included, although the
    // parser never yields those: liveness is measured below the parser.
    let last_seen_ms = AtomicU64::new(0);
    let mut bound = EventBound::new(config.max_line_bytes);
    let bytes = response.bytes_stream().map(|chunk| {
        let chunk = chunk.map_err(StreamError::Transfer)?;
        last_seen_ms.store(u64::try_from(connected_at.elapsed().as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
        bound.pass(chunk)
    });
    let start = futures_util::stream::once(std::future::ready(Ok(bytes::Bytes::from_static(PARSER_START))));
    let mut events = std::pin::pin!(start.chain(bytes).eventsource());
    loop {
        let lost = |why: String| Ended::Lost { lasted: connected_at.elapsed(), why };
        let event = match tokio::time::timeout(LIVENESS_TICK.min(dead_after), events.next()).await {
            Err(_) => {
                if cache.strong_count() == 0 {
                    return Ended::VerifierGone;
                }
                let silent =
                    connected_at.elapsed().saturating_sub(Duration::from_millis(last_seen_ms.load(Ordering::Relaxed)));
                if silent >= dead_after {
                    return lost(format!("nothing received for {dead_after:?} (heartbeat missed)"));
                }
                continue;
            }
            Ok(None) => return lost("closed by the server".into()),
            Ok(Some(Err(EventStreamError::Transport(e)))) => return lost(e.to_string()),
            Ok(Some(Err(e))) => return lost(format!("not an event stream: {e}")),
            Ok(Some(Ok(event))) => event,
        };
        let Some(shared) = cache.upgrade() else { return Ended::VerifierGone };
        apply(&shared, state, &event).await;
        // After applying: a reconnect resumes after what took effect.
        if let Some(id) = wire::parse_event_id(&event.id) {
            state.set_last_event_id(Some(id));
        }
    }
}

async fn apply<V: Verifier>(shared: &Arc<Shared<V>>, state: &State, event: &Event) {
    match EventName::parse(&event.event) {
        Some(EventName::Key(kind)) => {
            match serde_json::from_str::<KeyChanged>(&event.data).ok().filter(|d| !d.key_id.is_empty()) {
                Some(data) => {
                    let removed = shared.core.invalidate_key_id(&data.key_id).await;
                    state.invalidations.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("keygate_events_invalidations_total").increment(1);
                    tracing::debug!(event = kind.name(), key_id = %data.key_id, removed, "event stream: invalidated");
                }
                None => {
                    // We know a key changed but not which: only dropping everything is safe.
                    state.invalidation_failures.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("keygate_events_invalidation_failures_total").increment(1);
                    tracing::warn!(
                        event = kind.name(),
                        "event stream: unreadable event data; revalidating the whole cache"
                    );
                    shared.revalidate_all();
                    state.cache_drops.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Some(EventName::Reset) => {
            tracing::info!("event stream: reset; revalidating the whole cache");
            shared.revalidate_all();
            state.cache_drops.fetch_add(1, Ordering::Relaxed);
            state.resets.fetch_add(1, Ordering::Relaxed);
        }
        _ => tracing::trace!(event = %event.event, "event stream: ignored event"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_in_pieces(input: &[u8], piece: usize, max: usize) -> Result<(), ()> {
        let mut bound = EventBound::new(max);
        input.chunks(piece).try_for_each(|chunk| bound.check(chunk)).map_err(|_| ())
    }

    #[test]
    fn the_event_bound_counts_one_event_at_a_time() {
        let many_events = "event: revoked\r\ndata: 0123456789\r\n\r\n".repeat(50);
        let long_event = "data: 0123456789\n".repeat(50) + "\n";
        for piece in [1, 2, 7, 4096] {
            assert!(check_in_pieces(many_events.as_bytes(), piece, 64).is_ok(), "piece {piece}");
            assert!(check_in_pieces(long_event.as_bytes(), piece, 64).is_err(), "piece {piece}");
            assert!(check_in_pieces(&[b'a'; 65], piece, 64).is_err(), "piece {piece}");
            assert!(check_in_pieces(b"data: a\r\rdata: b\r\r", piece, 8).is_ok(), "piece {piece}");
        }
    }

    /// The events the parser yields from `input` read `piece` bytes at a time, behind
    /// the bound as in `follow`.
    async fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<Event> {
        let mut bound = EventBound::new(1024);
        let reads: Vec<_> = input.chunks(piece).map(|c| bound.pass(bytes::Bytes::copy_from_slice(c))).collect();
        let start = futures_util::stream::once(std::future::ready(Ok(bytes::Bytes::from_static(PARSER_START))));
        let events = start.chain(futures_util::stream::iter(reads)).eventsource();
        events.filter_map(|e| std::future::ready(e.ok())).collect().await
    }

    // Found by `fuzz/fuzz_targets/sse.rs`: a stream starting with a byte order mark made
    // `eventsource-stream` slice inside it and panic, which ended the listener's task.
    #[tokio::test]
    async fn a_byte_order_mark_is_dropped_without_reaching_the_parser() {
        let stream = "\u{feff}event: revoked\ndata: {\"key_id\":\"k\"}\n\n: x\n\n";
        for piece in [1, 2, 3, 4, 64] {
            let events = parse_in_pieces(stream.as_bytes(), piece).await;
            assert_eq!(events.len(), 1, "piece {piece}");
            assert_eq!((events[0].event.as_str(), events[0].data.as_str()), ("revoked", "{\"key_id\":\"k\"}"));
        }
        // Only the first mark is one; a second is text (a field name here), and no panic.
        let events = parse_in_pieces("\u{feff}\u{feff}data: a\n\ndata: b\n\n".as_bytes(), 2).await;
        assert_eq!(events.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(), ["b"]);
        // Found by the target too: the start of a mark that turns out to be another
        // character (`EF BB BB`) is given back, not dropped.
        for piece in [1, 2, 3] {
            let events = parse_in_pieces("\u{fefb}: c\ndata: x\n\n".as_bytes(), piece).await;
            assert_eq!(events.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(), ["x"], "piece {piece}");
        }
        let events = parse_in_pieces(&include_bytes!("../../fuzz/regressions/sse-partial-mark")[3..], 2).await;
        assert!(events.is_empty());
        // The crash input itself (after the target's three bytes of settings).
        let events = parse_in_pieces(&include_bytes!("../../fuzz/regressions/sse-bom")[3..], 1).await;
        assert_eq!(events.len(), 1);
    }

    #[test]
    fn the_event_bound_refuses_bytes_that_are_not_utf8() {
        // Characters of 2, 3 and 4 bytes, cut anywhere, pass.
        let text = "data: {\"key_id\":\"clé ✓ 🔑\"}\n\n".repeat(3);
        for piece in 1..8 {
            assert!(check_in_pieces(text.as_bytes(), piece, 64).is_ok(), "piece {piece}");
        }
        // One bad byte ends the stream, wherever the reads are cut: the parser would
        // otherwise hold everything after it and never yield another event.
        let mut bad = b"data: a\xff\n\n".to_vec();
        bad.extend_from_slice(b"event: revoked\ndata: {\"key_id\":\"k\"}\n\n");
        for stream in [&bad[..], b"data: \xe2\x82\n\n", b"\xc3\xc3", b"data: \xed\xa0\x80\n\n"] {
            for piece in 1..8 {
                assert!(check_in_pieces(stream, piece, 64).is_err(), "piece {piece}: {stream:?}");
            }
        }
    }
}
