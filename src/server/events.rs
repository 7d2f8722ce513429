//! `GET /v1/events`: Server-Sent Events that tell middlewares what to forget.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::response::sse::Event;
use futures_util::Stream;
use futures_util::future::BoxFuture;
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
    /// The change log id (`id:`), for the changes that are logged.
    id: Option<u64>,
    name: &'static str,
    data: String,
}

impl Published {
    fn event(&self) -> Event {
        let event = Event::default().event(self.name).data(&self.data);
        match self.id {
            Some(id) => event.id(id.to_string()),
            None => event,
        }
    }
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
/// **Ids and resumption.** Every change that affects verification (`revoked`,
/// `updated`, `rotated`, and the `reset` of a change too large to list, `bulk`) is a row
/// of the store's change log, written in the change's transaction, and carries its row
/// id as the SSE `id:`. Ids only grow, in commit order; on PostgreSQL they come from
/// one sequence every replica shares, so an id means the same change on every replica.
/// `alert`, `heartbeat` and the `reset`s a stream makes itself (`lagged`, `gap`,
/// `expired`, ...) carry no id: they are not changes of a verdict, and an SSE client
/// keeps the last id it saw across them, so they cannot move a resume point.
///
/// A stream opened with `Last-Event-ID: <id>` is resumed: it first replays, from the
/// log, every change after that id, in order, then goes live. It subscribes to the
/// live changes *before* reading the log and skips the live ones at or below the last
/// id replayed, so nothing falls between the two and nothing comes twice. Its response
/// carries `keygate-events-resumed: <id>`. An id that cannot be resumed gets `reset`
/// first, then the live changes: `expired` (older than the log's retention: changes
/// after it were deleted), `future` (above every id the log handed out: another
/// deployment's, or a restored database), `bad_id` (not a decimal number). Every
/// stream's response carries `keygate-events-position: <id>`: it delivers every change
/// after that id (the resumed id, or the newest this replica had published when it
/// opened), which a subscriber keeps as its resume point until the first event with an
/// id arrives. The log is kept for 24 hours and at most 100 000 rows by default
/// ([`RetentionConfig`](super::RetentionConfig)).
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
/// also hands every change to the others: each change's `NOTIFY` carries its log id,
/// and every replica's feed publishes the logged changes (its own replica's too, which
/// therefore reach its subscribers a `NOTIFY` later than they commit) in id order, so
/// the ids a stream shows only grow. A middleware following any replica hears about
/// every change and can resume on any other. Notes that are not logged (alerts, token
/// changes) are published by their own replica at once, and skipped when they come
/// back. When the feed loses its connection to the database, it reconnects with
/// backoff and then catches up from the log; only when the log no longer holds what
/// it missed does it publish `reset` (`{"reason": "gap"}`).
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
    /// The newest change log id published; taken while publishing one, so that ids go
    /// out in order.
    position: Mutex<u64>,
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
                position: Mutex::new(0),
            }),
        }
    }

    /// Publishes a key event (with no id: see the type's docs for the logged ones).
    pub fn key(&self, kind: KeyEvent, key_id: &str) {
        self.change(&ChangeNote::Key(kind, key_id.to_owned()), None);
    }

    /// Tells every subscriber to drop its whole cache.
    pub fn reset(&self, reason: &str) {
        self.send(None, EventName::Reset.name(), reset_data(reason));
    }

    /// Publishes an alert.
    pub fn alert(&self, alert: &Alert) {
        self.change(&ChangeNote::Alert(Box::new(alert.clone())), None);
    }

    /// Publishes a committed change, with its change log id if it has one. A logged
    /// change at or below the newest id published is a duplicate and is skipped.
    pub(crate) fn change(&self, note: &ChangeNote, id: Option<u64>) {
        if let Some((name, data)) = note.wire() {
            self.send(id, name, data);
        }
    }

    /// The newest change log id published (0 for none).
    pub(crate) fn position(&self) -> u64 {
        *self.inner.position.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the position up to `id` without publishing: where the log stood when this
    /// hub started, or what a `reset` skipped.
    pub(crate) fn advance_to(&self, id: u64) {
        let mut position = self.inner.position.lock().unwrap_or_else(PoisonError::into_inner);
        *position = (*position).max(id);
    }

    fn send(&self, id: Option<u64>, name: &'static str, data: String) {
        let published = Arc::new(Published { id, name, data });
        let Some(id) = id else {
            self.inner.published.fetch_add(1, Ordering::Relaxed);
            // No receiver is not an error: nobody is listening yet.
            let _ = self.inner.tx.send(published);
            return;
        };
        // Held while sending: two publishers cannot swap the order of their ids.
        let mut position = self.inner.position.lock().unwrap_or_else(PoisonError::into_inner);
        if id <= *position {
            return;
        }
        *position = id;
        self.inner.published.fetch_add(1, Ordering::Relaxed);
        let _ = self.inner.tx.send(published);
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
        self.try_subscribe_until(None).map(|s| s.live())
    }

    /// [`try_subscribe`](Self::try_subscribe), for a stream that also ends when `revoked`
    /// turns `true` (the subscriber's token was revoked), and that may replay the log
    /// first (see [`Subscription::start`]).
    pub(crate) fn try_subscribe_until(&self, revoked: Option<watch::Receiver<bool>>) -> Option<Subscription> {
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
        self.stream(None).live()
    }

    /// The subscription of a subscriber already counted; it also ends when `revoked`
    /// turns `true` (the subscriber's token was revoked).
    fn stream(&self, revoked: Option<watch::Receiver<bool>>) -> Subscription {
        let mut close = self.inner.close.subscribe();
        close.mark_unchanged();
        let mut ticker = tokio::time::interval_at(Instant::now() + self.inner.heartbeat, self.inner.heartbeat);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let rx = self.inner.tx.subscribe();
        // Read after subscribing: a change published in between is both received and at
        // or below the position, and skipped.
        let position = self.position();
        Subscription {
            position,
            sub: Subscriber {
                rx,
                close,
                revoked,
                ticker,
                greeted: false,
                prelude: VecDeque::new(),
                replay: None,
                skip_through: position,
                _guard: Guard(self.inner.clone()),
            },
        }
    }
}

/// Reads the change log: up to a page of the changes with ids above the one given,
/// oldest first (an empty page at the end).
pub(crate) type FetchChanges =
    Arc<dyn Fn(u64) -> BoxFuture<'static, Result<Vec<(u64, ChangeNote)>, String>> + Send + Sync>;

/// Where a stream starts, decided from its `Last-Event-ID` by [`start_from`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// No `Last-Event-ID`: live changes only.
    Fresh,
    /// Replay the changes after this id, then go live.
    Resume(u64),
    /// `reset` with this reason, then live changes.
    Refuse(&'static str),
}

/// How a stream with `Last-Event-ID: last_event_id` starts, given the ids the log holds
/// (`oldest`, `None` for an empty log) and the newest id ever handed out: resumed when
/// every change after it is still in the log.
pub(crate) fn start_from(last_event_id: &str, oldest: Option<u64>, newest: u64) -> Start {
    let Some(id) = crate::wire::parse_event_id(last_event_id) else {
        return Start::Refuse("bad_id");
    };
    if id > newest {
        return Start::Refuse("future");
    }
    // The log keeps its newest row, so an empty one has never held any: nothing missed.
    match oldest {
        Some(oldest) if id.saturating_add(1) < oldest => Start::Refuse("expired"),
        _ => Start::Resume(id),
    }
}

/// A subscriber taken (counted, subscribed to the live changes), not yet a stream.
pub(crate) struct Subscription {
    position: u64,
    sub: Subscriber,
}

impl Subscription {
    /// The newest change log id published when it subscribed.
    pub(crate) fn position(&self) -> u64 {
        self.position
    }

    /// Live changes only, after [`position`](Self::position).
    fn live(self) -> impl Stream<Item = Result<Event, Infallible>> + Send + use<> {
        self.start(Start::Fresh, None)
    }

    /// The stream: for [`Start::Resume`], the changes `fetch` reads after the id first.
    pub(crate) fn start(
        self,
        start: Start,
        fetch: Option<FetchChanges>,
    ) -> impl Stream<Item = Result<Event, Infallible>> + Send + use<> {
        let mut sub = self.sub;
        match (start, fetch) {
            (Start::Resume(after), Some(fetch)) => {
                sub.skip_through = after;
                sub.replay = Some(Replay { fetch, after, page: VecDeque::new(), done: false });
            }
            (Start::Resume(_), None) => sub.prelude.push_back(reset_event("unavailable")),
            (Start::Refuse(reason), _) => sub.prelude.push_back(reset_event(reason)),
            (Start::Fresh, _) => {}
        }
        futures_util::stream::unfold(sub, |mut st| async move {
            let event = st.next().await?;
            Some((Ok(event), st))
        })
    }
}

/// A replay in progress.
struct Replay {
    fetch: FetchChanges,
    /// The last id replayed (or the resumed one).
    after: u64,
    page: VecDeque<(u64, ChangeNote)>,
    done: bool,
}

fn reset_data(reason: &str) -> String {
    data(&ResetData { reason: reason.to_owned(), missed: None })
}

fn reset_event(reason: &str) -> Event {
    Event::default().event(EventName::Reset.name()).data(reset_data(reason))
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
    /// Sent before anything else (a refused resumption's `reset`).
    prelude: VecDeque<Event>,
    replay: Option<Replay>,
    /// Live changes with ids up to this one were replayed (or predate the stream).
    skip_through: u64,
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
        if let Some(event) = self.prelude.pop_front() {
            return Some(event);
        }
        while let Some(replay) = &mut self.replay {
            if self.close.has_changed().unwrap_or(true) || self.revoked.as_ref().is_some_and(|r| *r.borrow()) {
                return None;
            }
            if let Some((id, note)) = replay.page.pop_front() {
                replay.after = id;
                self.skip_through = id;
                match note.wire() {
                    Some((name, data)) => return Some(Published { id: Some(id), name, data }.event()),
                    None => continue,
                }
            }
            if replay.done {
                self.replay = None;
                break;
            }
            match (replay.fetch)(replay.after).await {
                Ok(page) if page.is_empty() => replay.done = true,
                Ok(page) => replay.page = page.into(),
                Err(why) => {
                    tracing::warn!(error = %why, "cannot read the change log to resume a stream; telling it to reset");
                    self.replay = None;
                    return Some(reset_event("unavailable"));
                }
            }
        }
        loop {
            if let Some(event) = self.live().await? {
                return Some(event);
            }
        }
    }

    /// The next live event; `Some(None)` for a change replayed already.
    async fn live(&mut self) -> Option<Option<Event>> {
        let skip_through = self.skip_through;
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
                Ok(p) if p.id.is_some_and(|id| id <= skip_through) => Some(None),
                Ok(p) => Some(Some(p.event())),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event subscriber fell behind; telling it to reset");
                    let reset = ResetData { reason: "lagged".to_owned(), missed: Some(missed) };
                    Some(Some(Event::default().event(EventName::Reset.name()).data(data(&reset))))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            },
            _ = self.ticker.tick() => {
                let beat = Heartbeat { at: time::OffsetDateTime::now_utc() };
                Some(Some(Event::default().event(EventName::Heartbeat.name()).data(data(&beat))))
            }
        }
    }
}

// ---- fan-out between replicas

/// One committed change subscribers must hear about, as the store hands it over and as
/// replicas tell each other (for example in a PostgreSQL `NOTIFY`
/// payload): `{"origin": "<replica>", "event": "revoked", "key_id": "...", "id"?: n}`,
/// `{"origin", "event": "reset", "reason", "id"?}` or `{"origin", "event": "alert",
/// "alert": {...}}`, where `id` is the change's log id (logged changes only).
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
    pub(crate) fn encode(&self, origin: &str, id: Option<u64>) -> String {
        let mut v = match self {
            Self::Key(kind, key_id) => json!({ "origin": origin, "event": kind.name(), "key_id": key_id }),
            Self::Reset(reason) => json!({ "origin": origin, "event": EventName::Reset.name(), "reason": reason }),
            Self::Alert(alert) => json!({ "origin": origin, "event": EventName::Alert.name(), "alert": alert }),
            Self::Tokens => json!({ "origin": origin, "event": TOKENS_EVENT }),
        };
        v["sent_at_ms"] = json!(unix_ms_now());
        if let Some(id) = id {
            v["id"] = json!(id);
        }
        v.to_string()
    }

    /// Reads a note written by [`encode`](Self::encode): its origin and the note.
    /// Key ids and reasons are checked, so that a foreign payload cannot inject
    /// arbitrary text into SSE streams.
    #[cfg(test)]
    pub(crate) fn decode(payload: &str) -> Result<(String, Self), String> {
        Self::decode_full(payload).map(|d| (d.origin, d.note))
    }

    /// [`decode`](Self::decode), with the note's `sent_at_ms` and log id when it has
    /// them (notes of older replicas do not).
    pub(crate) fn decode_full(payload: &str) -> Result<Decoded, String> {
        let v: Value = serde_json::from_str(payload).map_err(|e| format!("not JSON: {e}"))?;
        let sent_at_ms = v.get("sent_at_ms").and_then(Value::as_i64);
        let id = match v.get("id") {
            None => None,
            Some(id) => Some(id.as_u64().ok_or("`id` is not a number")?),
        };
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
        Ok(Decoded { origin, note, sent_at_ms, id })
    }

    /// The SSE event name and data of the note; `None` for a note that is no event.
    pub(crate) fn wire(&self) -> Option<(&'static str, String)> {
        match self {
            Self::Key(kind, key_id) => Some((kind.name(), data(&KeyChanged { key_id: key_id.clone() }))),
            Self::Reset(reason) => Some((EventName::Reset.name(), reset_data(reason))),
            Self::Alert(alert) => match serde_json::to_string(alert) {
                Ok(data) => Some((EventName::Alert.name(), data)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot serialize alert");
                    None
                }
            },
            Self::Tokens => None,
        }
    }
}

/// A note as [`ChangeNote::decode_full`] read it.
#[derive(Debug)]
pub(crate) struct Decoded {
    /// The replica that sent it.
    pub(crate) origin: String,
    pub(crate) note: ChangeNote,
    /// When it was sent (Unix ms), if it says.
    pub(crate) sent_at_ms: Option<i64>,
    /// Its change log id, for a logged change.
    pub(crate) id: Option<u64>,
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
    use futures_util::StreamExt;

    use super::*;

    #[test]
    fn a_last_event_id_resumes_only_inside_the_log() {
        // The log holds ids 11 to 20 (1 to 10 were pruned).
        let (oldest, newest) = (Some(11), 20);
        assert_eq!(start_from("10", oldest, newest), Start::Resume(10), "11 on is kept: nothing lost");
        assert_eq!(start_from("15", oldest, newest), Start::Resume(15));
        assert_eq!(start_from("20", oldest, newest), Start::Resume(20), "up to date");
        assert_eq!(start_from("9", oldest, newest), Start::Refuse("expired"), "10 was pruned");
        assert_eq!(start_from("0", oldest, newest), Start::Refuse("expired"));
        assert_eq!(start_from("21", oldest, newest), Start::Refuse("future"));
        assert_eq!(start_from(&u64::MAX.to_string(), oldest, newest), Start::Refuse("future"));
        for garbage in ["", "abc", "-1", "+5", "1.5", " 7", "12a", "0x10", "99999999999999999999999", "１２"] {
            assert_eq!(start_from(garbage, oldest, newest), Start::Refuse("bad_id"), "{garbage:?}");
        }
        // A log that never held anything: only 0 is known.
        assert_eq!(start_from("0", None, 0), Start::Resume(0));
        assert_eq!(start_from("1", None, 0), Start::Refuse("future"));
        // Everything but the newest row pruned.
        assert_eq!(start_from("19", Some(20), 20), Start::Resume(19));
        assert_eq!(start_from("18", Some(20), 20), Start::Refuse("expired"));
    }

    /// The text of a stream's events until it goes quiet, without heartbeats.
    async fn drain(stream: impl Stream<Item = Result<Event, Infallible>>) -> Vec<String> {
        let mut stream = std::pin::pin!(stream);
        let mut seen = Vec::new();
        while let Ok(Some(Ok(event))) = tokio::time::timeout(Duration::from_millis(100), stream.next()).await {
            seen.push(format!("{event:?}"));
        }
        seen
    }

    fn key(id: &str) -> ChangeNote {
        ChangeNote::Key(KeyEvent::Revoked, id.into())
    }

    #[tokio::test]
    async fn a_resumed_stream_replays_then_goes_live_without_gap_or_duplicate() {
        let hub = EventHub::new(64, Duration::from_secs(3600));
        hub.change(&key("key_old"), Some(1));
        let sub = hub.try_subscribe_until(None).unwrap();
        assert_eq!(sub.position(), 1);
        // Published after the subscription: received live, and also in the log below.
        hub.change(&key("key_b"), Some(2));
        hub.change(&key("key_c"), Some(3));
        hub.change(&key("key_c"), Some(3)); // a duplicate (a feed catching up) is skipped
        let log = Arc::new(vec![(1, key("key_old")), (2, key("key_b")), (3, key("key_c"))]);
        let fetch: FetchChanges = Arc::new(move |after| {
            let page: Vec<_> = log.iter().filter(|(id, _)| *id > after).take(1).cloned().collect();
            Box::pin(async move { Ok(page) })
        });
        let stream = sub.start(Start::Resume(1), Some(fetch));
        hub.change(&key("key_d"), Some(4));
        let seen = drain(stream).await;
        let ids: Vec<_> = seen
            .iter()
            .filter_map(|e| e.split("id: ").nth(1).map(|rest| rest.split('\\').next().unwrap().to_owned()))
            .collect();
        assert_eq!(ids, ["2", "3", "4"], "{seen:?}");
        assert!(seen.iter().all(|e| !e.contains("key_old")), "{seen:?}");
    }

    #[tokio::test]
    async fn a_refused_resumption_starts_with_reset_then_live() {
        let hub = EventHub::new(64, Duration::from_secs(3600));
        hub.advance_to(30);
        let sub = hub.try_subscribe_until(None).unwrap();
        let stream = sub.start(Start::Refuse("expired"), None);
        hub.change(&key("key_x"), Some(31));
        hub.change(&key("key_y"), Some(30)); // at or below the position: skipped
        let seen = drain(stream).await;
        assert_eq!(seen.len(), 3, "{seen:?}"); // greeting, reset, key_x
        assert!(seen[1].contains("reset") && seen[1].contains("expired"), "{seen:?}");
        assert!(seen[2].contains("key_x") && seen[2].contains("id: 31"), "{seen:?}");
    }

    #[test]
    fn notes_round_trip_and_foreign_payloads_are_checked() {
        let note = ChangeNote::Key(KeyEvent::Revoked, "key_abc".into());
        assert_eq!(ChangeNote::decode(&note.encode("r1", None)).unwrap(), ("r1".into(), note.clone()));
        assert_eq!(ChangeNote::decode_full(&note.encode("r1", Some(42))).unwrap().id, Some(42));
        assert_eq!(ChangeNote::decode_full(&note.encode("r1", None)).unwrap().id, None);
        assert_eq!(
            ChangeNote::decode(&ChangeNote::Tokens.encode("r3", None)).unwrap(),
            ("r3".into(), ChangeNote::Tokens)
        );
        let reset = ChangeNote::Reset("bulk".into());
        assert_eq!(ChangeNote::decode(&reset.encode("r2", Some(7))).unwrap(), ("r2".into(), reset));
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
            r#"{"origin":"x","event":"revoked","key_id":"key_a","id":"7"}"#,
            r#"{"origin":"x","event":"revoked","key_id":"key_a","id":-1}"#,
        ] {
            assert!(ChangeNote::decode(bad).is_err(), "{bad}");
        }
    }
}
