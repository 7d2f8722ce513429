//! `GET /v1/events`: Server-Sent Events that tell middlewares what to forget.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::response::sse::Event;
use futures_util::Stream;
use serde_json::Value;
use serde_json::json;
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::model::Alert;
use crate::wire::{EVENTS_GREETING, EventName, Heartbeat, KeyChanged, ResetData};

/// An event's data as JSON. The wire types hold strings and numbers only, which always
/// serialize.
fn data(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// A change touching more keys than this (a role held by many keys) publishes one
/// `reset` instead of one `updated` per key, so that it cannot overflow subscribers'
/// buffers.
pub const MAX_EVENTS_PER_CHANGE: usize = 256;

pub(crate) use crate::wire::KeyEvent;

#[derive(Debug)]
struct Published {
    name: &'static str,
    data: String,
}

/// Fans events out to every connected `GET /v1/events` stream.
///
/// | event | data | sent when |
/// | --- | --- | --- |
/// | `revoked` | `{"key_id"}` | a key was revoked |
/// | `updated` | `{"key_id"}` | a key's scopes, roles, disabled flag, meta, expiry, name or rate limit changed, or a role it holds was redefined |
/// | `rotated` | `{"key_id"}` | a key got a new secret (the old one's `expires_at` is now the end of the grace) |
/// | `reset` | `{"reason"}` | drop every cached verdict: this subscriber fell behind (`lagged`) or a change touched too many keys to list (`bulk`) |
/// | `alert` | an [`Alert`] | the usage of a key looks anomalous, it expires soon, or it is past its maximum age |
/// | `heartbeat` | `{"at"}` | every 15 s by default, so that a silent dead connection is noticed |
///
/// At most [`max_subscribers`](Self::max_subscribers) streams are open at once (default
/// [`DEFAULT_MAX_EVENT_SUBSCRIBERS`], 1 000); the route answers 503 past it.
///
/// A stream opens with the SSE comment `: keygate events v1`. Events are published after
/// the change's transaction committed. Each subscriber reads from a bounded broadcast
/// buffer (1 024 events by default); one that falls behind gets `reset` instead of
/// silently losing invalidations.
///
/// **Several replicas.** A store shared by several key-service processes (PostgreSQL)
/// also hands every change to the others: the store's feed forwards the changes made
/// through other replicas into this replica's hub, so a middleware following any
/// replica hears about all of them. A replica publishes its own changes at once and
/// skips its own notes when they come back. When the feed loses its connection to the
/// database, it reconnects with backoff and then publishes `reset` (`{"reason": "gap"}`):
/// what was missed in between cannot be known.
///
/// The hub decides nothing: the store says which notes a change makes (one `updated` per
/// key a role change touches, or one `reset` above 256 keys) and hands
/// them over once its transaction committed.
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
    max_subscribers: u64,
    refused: AtomicU64,
    published: AtomicU64,
}

/// Default cap on the streams one hub serves at once.
pub const DEFAULT_MAX_EVENT_SUBSCRIBERS: u64 = 1000;

impl EventHub {
    /// A hub whose subscribers each buffer up to `capacity` events and get a heartbeat
    /// every `heartbeat`, serving at most [`DEFAULT_MAX_EVENT_SUBSCRIBERS`] streams
    /// through [`try_subscribe`](Self::try_subscribe).
    pub fn new(capacity: usize, heartbeat: Duration) -> Self {
        Self::with_max_subscribers(capacity, heartbeat, DEFAULT_MAX_EVENT_SUBSCRIBERS)
    }

    /// Like [`new`](Self::new), with at most `max_subscribers` streams through
    /// [`try_subscribe`](Self::try_subscribe).
    pub fn with_max_subscribers(capacity: usize, heartbeat: Duration, max_subscribers: u64) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        let (close, _) = watch::channel(0);
        Self {
            inner: Arc::new(HubInner {
                tx,
                close,
                heartbeat,
                subscribers: AtomicU64::new(0),
                max_subscribers,
                refused: AtomicU64::new(0),
                published: AtomicU64::new(0),
            }),
        }
    }

    /// Publishes a key event.
    pub fn key(&self, kind: KeyEvent, key_id: &str) {
        self.send(kind.name(), data(&KeyChanged { key_id: key_id.to_owned() }));
    }

    /// Tells every subscriber to drop its whole cache.
    pub fn reset(&self, reason: &str) {
        self.send(EventName::Reset.name(), data(&ResetData { reason: reason.to_owned(), missed: None }));
    }

    /// Publishes an alert.
    pub fn alert(&self, alert: &Alert) {
        match serde_json::to_string(alert) {
            Ok(data) => self.send(EventName::Alert.name(), data),
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

    /// The cap of [`try_subscribe`](Self::try_subscribe).
    pub fn max_subscribers(&self) -> u64 {
        self.inner.max_subscribers
    }

    /// A new subscriber's stream, or `None` when [`max_subscribers`](Self::max_subscribers)
    /// streams are open already. A stream counts until it is dropped.
    pub fn try_subscribe(&self) -> Option<impl Stream<Item = Result<Event, Infallible>> + Send + use<>> {
        self.try_subscribe_until(None)
    }

    /// [`try_subscribe`](Self::try_subscribe), for a stream that also ends when `revoked`
    /// turns `true` (the subscriber's token was revoked).
    pub(crate) fn try_subscribe_until(
        &self,
        revoked: Option<watch::Receiver<bool>>,
    ) -> Option<impl Stream<Item = Result<Event, Infallible>> + Send + use<>> {
        let max = self.inner.max_subscribers;
        // Taken before the stream exists, so that concurrent requests cannot overshoot.
        let taken =
            self.inner.subscribers.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
        if taken.is_err() {
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.stream(revoked))
    }

    /// Streams [`try_subscribe`](Self::try_subscribe) refused since start.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Events published since start.
    pub fn published(&self) -> u64 {
        self.inner.published.load(Ordering::Relaxed)
    }

    /// A new subscriber's stream. It is subscribed when this returns, so an event
    /// published afterwards reaches it. It is never refused, but it is counted: streams
    /// opened here take room that [`try_subscribe`](Self::try_subscribe) then lacks.
    pub fn subscribe(&self) -> impl Stream<Item = Result<Event, Infallible>> + Send + use<> {
        self.inner.subscribers.fetch_add(1, Ordering::AcqRel);
        self.stream(None)
    }

    /// The stream of a subscriber already counted; it also ends when `revoked` turns
    /// `true` (the subscriber's token was revoked).
    fn stream(
        &self,
        revoked: Option<watch::Receiver<bool>>,
    ) -> impl Stream<Item = Result<Event, Infallible>> + Send + use<> {
        let mut close = self.inner.close.subscribe();
        close.mark_unchanged();
        let mut ticker = tokio::time::interval_at(Instant::now() + self.inner.heartbeat, self.inner.heartbeat);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let state = Subscriber {
            rx: self.inner.tx.subscribe(),
            close,
            revoked,
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
        self.0.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Subscriber {
    rx: broadcast::Receiver<Arc<Published>>,
    close: watch::Receiver<u64>,
    revoked: Option<watch::Receiver<bool>>,
    ticker: tokio::time::Interval,
    greeted: bool,
    _guard: Guard,
}

impl Subscriber {
    async fn next(&mut self) -> Option<Event> {
        if !self.greeted {
            self.greeted = true;
            return Some(Event::default().comment(EVENTS_GREETING));
        }
        if self.revoked.as_ref().is_some_and(|r| *r.borrow()) {
            return None;
        }
        let revoked_rx = &mut self.revoked;
        let revoked = async move {
            match revoked_rx {
                // A sender gone (the token table dropped) ends the stream too.
                Some(r) => {
                    let _ = r.wait_for(|revoked| *revoked).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = self.close.changed() => None,
            () = revoked => None,
            msg = self.rx.recv() => match msg {
                Ok(p) => Some(Event::default().event(p.name).data(&p.data)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event subscriber fell behind; telling it to reset");
                    let reset = ResetData { reason: "lagged".to_owned(), missed: Some(missed) };
                    Some(Event::default().event(EventName::Reset.name()).data(data(&reset)))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            },
            _ = self.ticker.tick() => {
                let beat = Heartbeat { at: time::OffsetDateTime::now_utc() };
                Some(Event::default().event(EventName::Heartbeat.name()).data(data(&beat)))
            }
        }
    }
}

// ---- fan-out between replicas

/// One committed change subscribers must hear about, as the store hands it over and as
/// replicas tell each other (for example in a PostgreSQL `NOTIFY`
/// payload): `{"origin": "<replica>", "event": "revoked", "key_id": "..."}`, `{"origin",
/// "event": "reset", "reason"}` or `{"origin", "event": "alert", "alert": {...}}`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ChangeNote {
    /// A key was revoked, updated or rotated.
    Key(KeyEvent, String),
    /// Drop every cached verdict.
    Reset(String),
    /// An alert was raised.
    Alert(Box<Alert>),
    /// A service or admin token was created or revoked: reload the tokens. Not an
    /// event of the stream.
    Tokens,
}

impl ChangeNote {
    /// The note as JSON, tagged with the replica it comes from and the time it is sent
    /// (`sent_at_ms`, Unix milliseconds: what the receivers' fan-out lag is measured from).
    pub(crate) fn encode(&self, origin: &str) -> String {
        let mut v = match self {
            Self::Key(kind, key_id) => json!({ "origin": origin, "event": kind.name(), "key_id": key_id }),
            Self::Reset(reason) => json!({ "origin": origin, "event": EventName::Reset.name(), "reason": reason }),
            Self::Alert(alert) => json!({ "origin": origin, "event": EventName::Alert.name(), "alert": alert }),
            Self::Tokens => json!({ "origin": origin, "event": TOKENS_EVENT }),
        };
        v["sent_at_ms"] = json!(unix_ms_now());
        v.to_string()
    }

    /// Reads a note written by [`encode`](Self::encode): its origin and the note.
    /// Key ids and reasons are checked, so that a foreign payload cannot inject
    /// arbitrary text into SSE streams.
    #[cfg(test)]
    pub(crate) fn decode(payload: &str) -> Result<(String, Self), String> {
        Self::decode_timed(payload).map(|(origin, note, _)| (origin, note))
    }

    /// [`decode`](Self::decode), with the note's `sent_at_ms` when it has one (notes of
    /// older replicas do not).
    pub(crate) fn decode_timed(payload: &str) -> Result<(String, Self, Option<i64>), String> {
        let v: Value = serde_json::from_str(payload).map_err(|e| format!("not JSON: {e}"))?;
        let sent_at_ms = v.get("sent_at_ms").and_then(Value::as_i64);
        let text = |field: &str| v.get(field).and_then(Value::as_str).ok_or_else(|| format!("no `{field}`"));
        let origin = text("origin")?.to_owned();
        let event = text("event")?;
        let note = match event {
            name if name == EventName::Reset.name() => {
                let reason = text("reason")?;
                let ok = !reason.is_empty()
                    && reason.len() <= 32
                    && reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                Self::Reset(if ok { reason.to_owned() } else { "remote".to_owned() })
            }
            TOKENS_EVENT => Self::Tokens,
            name if name == EventName::Alert.name() => {
                let alert = v.get("alert").cloned().ok_or("no `alert`")?;
                Self::Alert(Box::new(serde_json::from_value(alert).map_err(|e| format!("bad alert: {e}"))?))
            }
            other => {
                let kind =
                    KeyEvent::parse(other).ok_or_else(|| format!("unknown event `{}`", super::text::shown(other)))?;
                let key_id = text("key_id")?;
                if !looks_like_key_id(key_id) {
                    return Err(format!("bad key id `{}`", super::text::shown(key_id)));
                }
                Self::Key(kind, key_id.to_owned())
            }
        };
        Ok((origin, note, sent_at_ms))
    }

    /// Publishes the note to `hub`'s subscribers.
    pub(crate) fn publish(&self, hub: &EventHub) {
        match self {
            Self::Key(kind, key_id) => hub.key(*kind, key_id),
            Self::Reset(reason) => hub.reset(reason),
            Self::Alert(alert) => hub.alert(alert),
            Self::Tokens => {}
        }
    }
}

/// The note name of [`ChangeNote::Tokens`].
const TOKENS_EVENT: &str = "tokens";

/// Now, in Unix milliseconds.
pub(crate) fn unix_ms_now() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Whether `id` has the shape of a key id (`key_` + base62, at most 64 characters).
pub(crate) fn looks_like_key_id(id: &str) -> bool {
    id.len() <= 64 && id.starts_with("key_") && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_foreign_payloads_are_checked() {
        let note = ChangeNote::Key(KeyEvent::Revoked, "key_abc".into());
        assert_eq!(ChangeNote::decode(&note.encode("r1")).unwrap(), ("r1".into(), note));
        assert_eq!(ChangeNote::decode(&ChangeNote::Tokens.encode("r3")).unwrap(), ("r3".into(), ChangeNote::Tokens));
        let reset = ChangeNote::Reset("bulk".into());
        assert_eq!(ChangeNote::decode(&reset.encode("r2")).unwrap(), ("r2".into(), reset));
        let odd = r#"{"origin":"x","event":"reset","reason":"a\nevent: revoked"}"#;
        assert_eq!(ChangeNote::decode(odd).unwrap().1, ChangeNote::Reset("remote".into()));
        for bad in [
            "",
            "nope",
            r#"{"event":"revoked","key_id":"key_a"}"#,
            r#"{"origin":"x","event":"revoked","key_id":"key_a\ndata: x"}"#,
            r#"{"origin":"x","event":"revoked"}"#,
            r#"{"origin":"x","event":"deleted","key_id":"key_a"}"#,
            r#"{"origin":"x","event":"alert","alert":{}}"#,
        ] {
            assert!(ChangeNote::decode(bad).is_err(), "{bad}");
        }
    }
}
