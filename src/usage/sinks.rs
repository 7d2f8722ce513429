//! Simple sinks: a log line per event, and a bounded channel for tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tracing::Level;

use super::{DecidedRequest, UsageEvent, UsageSink};

/// Logs every event through `tracing` (target `keygate::usage`), as structured fields:
/// `key_id`, `owner`, `outcome`, `method`, `route`, `status`, `latency_ms`, `client_ip`,
/// `request_id`. Events never carry a key, so neither does the log.
///
/// Logs at INFO by default; see [`level`](Self::level). Whether `record` blocks depends
/// on the subscriber: a non-blocking writer (`tracing-appender`) keeps it from waiting on I/O.
///
/// ```
/// let sink = keygate::TracingSink::new().level(tracing::Level::DEBUG);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct TracingSink {
    level: Level,
}

impl Default for TracingSink {
    fn default() -> Self {
        Self { level: Level::INFO }
    }
}

impl TracingSink {
    /// A sink that logs at INFO.
    pub fn new() -> Self {
        Self::default()
    }

    /// The level to log at. Default INFO.
    #[must_use]
    pub fn level(mut self, level: Level) -> Self {
        self.level = level;
        self
    }
}

macro_rules! log_event {
    ($level:expr, $e:expr) => {
        tracing::event!(
            target: "keygate::usage",
            $level,
            key_id = $e.key_id().map(|k| &**k),
            owner = $e.owner().map(|o| &**o),
            outcome = $e.outcome().as_str(),
            method = $e.method().as_str(),
            route = $e.route(),
            status = $e.status(),
            latency_ms = $e.latency().as_secs_f64() * 1000.0,
            client_ip = $e.client_ip().map(tracing::field::display),
            request_id = $e.request_id(),
            "usage"
        )
    };
}

impl UsageSink for TracingSink {
    fn record(&self, event: &DecidedRequest<'_>) {
        // `tracing` wants a constant level per call site.
        match self.level {
            Level::ERROR => log_event!(Level::ERROR, event),
            Level::WARN => log_event!(Level::WARN, event),
            Level::INFO => log_event!(Level::INFO, event),
            Level::DEBUG => log_event!(Level::DEBUG, event),
            Level::TRACE => log_event!(Level::TRACE, event),
        }
    }
}

/// Sends every event into a bounded Tokio channel; drops (and counts) when it is full or
/// the receiver is gone. Meant for tests and for consumers that want events one by one.
///
/// ```
/// use keygate::ChannelSink;
///
/// let (sink, mut events) = ChannelSink::new(1_024);
/// // layer = ApiKeyLayer::new(verifier).usage(sink.clone());
/// assert!(events.try_recv().is_err());
/// assert_eq!(sink.dropped(), 0);
/// ```
#[derive(Debug, Clone)]
pub struct ChannelSink {
    tx: mpsc::Sender<UsageEvent>,
    dropped: Arc<AtomicU64>,
}

impl ChannelSink {
    /// A sink holding at most `capacity` events (at least 1) until the receiver takes them.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<UsageEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx, dropped: Arc::new(AtomicU64::new(0)) }, rx)
    }

    /// Events dropped because the channel was full or closed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl UsageSink for ChannelSink {
    fn record(&self, request: &DecidedRequest<'_>) {
        if self.tx.try_send(request.to_event()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
