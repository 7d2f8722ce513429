//! `GET /v1/events`: Server-Sent Events that tell middlewares what to forget.
//!
//! | event | data | sent when |
//! | --- | --- | --- |
//! | `revoked` | `{"key_id"}` | a key was revoked |
//! | `updated` | `{"key_id"}` | a key's scopes, roles, disabled flag, meta, expiry, name or rate limit changed, or a role it holds was redefined |
//! | `rotated` | `{"key_id"}` | a key got a new secret (the old one's `expires_at` is now the end of the grace) |
//! | `reset` | `{"reason"}` | drop every cached verdict: this subscriber fell behind (`lagged`) or a change touched too many keys to list (`bulk`) |
//! | `alert` | an [`Alert`] | the usage of a key looks anomalous |
//! | `heartbeat` | `{"at"}` | every 15 s by default, so that a silent dead connection is noticed |
//!
//! A stream opens with the SSE comment `: keygate events v1`. Events are published after
//! the change's transaction committed. Each subscriber reads from a bounded broadcast
//! buffer (1 024 events by default); one that falls behind gets `reset` instead of
//! silently losing invalidations.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::response::sse::Event;
use futures_util::Stream;
use serde_json::json;
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::model::Alert;

/// What changed about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyEvent {
    /// `revoked`.
    Revoked,
    /// `updated`.
    Updated,
    /// `rotated`.
    Rotated,
}

impl KeyEvent {
    /// The SSE event name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::Updated => "updated",
            Self::Rotated => "rotated",
        }
    }
}

#[derive(Debug)]
struct Published {
    name: &'static str,
    data: String,
}

/// Fans events out to every connected `GET /v1/events` stream.
#[derive(Debug, Clone)]
pub struct EventHub {
    inner: Arc<HubInner>,
}

#[derive(Debug)]
struct HubInner {
    tx: broadcast::Sender<Arc<Published>>,
    close: watch::Sender<u64>,
    heartbeat: Duration,
    subscribers: AtomicU64,
    published: AtomicU64,
}

impl EventHub {
    /// A hub whose subscribers each buffer up to `capacity` events and get a heartbeat
    /// every `heartbeat`.
    pub fn new(capacity: usize, heartbeat: Duration) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        let (close, _) = watch::channel(0);
        Self {
            inner: Arc::new(HubInner {
                tx,
                close,
                heartbeat,
                subscribers: AtomicU64::new(0),
                published: AtomicU64::new(0),
            }),
        }
    }

    /// Publishes a key event.
    pub fn key(&self, kind: KeyEvent, key_id: &str) {
        self.send(kind.name(), json!({ "key_id": key_id }).to_string());
    }

    /// Tells every subscriber to drop its whole cache.
    pub fn reset(&self, reason: &str) {
        self.send("reset", json!({ "reason": reason }).to_string());
    }

    /// Publishes an alert.
    pub fn alert(&self, alert: &Alert) {
        match serde_json::to_string(alert) {
            Ok(data) => self.send("alert", data),
            Err(e) => tracing::error!(error = %e, "cannot serialize alert"),
        }
    }

    fn send(&self, name: &'static str, data: String) {
        self.inner.published.fetch_add(1, Ordering::Relaxed);
        // No receiver is not an error: nobody is listening yet.
        let _ = self.inner.tx.send(Arc::new(Published { name, data }));
    }

    /// Ends every open stream (subscribers reconnect and, after the gap, drop their caches).
    pub fn disconnect_all(&self) {
        self.inner.close.send_modify(|generation| *generation += 1);
    }

    /// Streams currently open.
    pub fn subscribers(&self) -> u64 {
        self.inner.subscribers.load(Ordering::Relaxed)
    }

    /// Events published since start.
    pub fn published(&self) -> u64 {
        self.inner.published.load(Ordering::Relaxed)
    }

    /// A new subscriber's stream. It is subscribed when this returns, so an event
    /// published afterwards reaches it.
    pub fn subscribe(&self) -> impl Stream<Item = Result<Event, Infallible>> + Send + use<> {
        let mut close = self.inner.close.subscribe();
        close.mark_unchanged();
        let mut ticker = tokio::time::interval_at(Instant::now() + self.inner.heartbeat, self.inner.heartbeat);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        self.inner.subscribers.fetch_add(1, Ordering::Relaxed);
        let state = Subscriber {
            rx: self.inner.tx.subscribe(),
            close,
            ticker,
            greeted: false,
            _guard: Guard(self.inner.clone()),
        };
        futures_util::stream::unfold(state, |mut st| async move {
            let event = st.next().await?;
            Some((Ok(event), st))
        })
    }
}

struct Guard(Arc<HubInner>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Subscriber {
    rx: broadcast::Receiver<Arc<Published>>,
    close: watch::Receiver<u64>,
    ticker: tokio::time::Interval,
    greeted: bool,
    _guard: Guard,
}

impl Subscriber {
    async fn next(&mut self) -> Option<Event> {
        if !self.greeted {
            self.greeted = true;
            return Some(Event::default().comment("keygate events v1"));
        }
        tokio::select! {
            biased;
            _ = self.close.changed() => None,
            msg = self.rx.recv() => match msg {
                Ok(p) => Some(Event::default().event(p.name).data(&p.data)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event subscriber fell behind; telling it to reset");
                    Some(Event::default().event("reset").data(json!({ "reason": "lagged", "missed": missed }).to_string()))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            },
            _ = self.ticker.tick() => {
                let at = super::store::rfc3339(Some(time::OffsetDateTime::now_utc()));
                Some(Event::default().event("heartbeat").data(json!({ "at": at }).to_string()))
            }
        }
    }
}
