//! What the routes share: [`ServerState`], its counters, and the wiring of the store's
//! change notes into the event hub.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::FromRequestParts;
use http::request::Parts;

use super::alerts::AlertConfig;
use super::auth::{Admin, Service, Tokens, check};
use super::error::ApiError;
use super::events::{ChangeNote, EventHub};
use super::store::{ChangeFeed, ChangeSink, Store};

/// Counters of a running key service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// `POST /v1/keys/verify` requests handled (past token check).
    pub verify_calls: u64,
    /// Verify answers `valid: true`.
    pub verify_valid: u64,
    /// Verify answers `valid: false`.
    pub verify_invalid: u64,
    /// Usage batches stored.
    pub usage_batches: u64,
    /// Usage events stored.
    pub usage_events: u64,
    /// Usage events without a key id (counted, not stored per key).
    pub usage_unattributed: u64,
    /// Events middlewares reported as dropped.
    pub usage_dropped_reported: u64,
    /// SSE events published.
    pub events_published: u64,
    /// SSE streams open now.
    pub event_subscribers: u64,
    /// Alerts raised.
    pub alerts_raised: u64,
    /// Changes made through other replicas and forwarded to this one's event streams
    /// (a store shared by several replicas only).
    pub events_forwarded: u64,
    /// Whether the feed of other replicas' changes is connected (always `false` for a
    /// store only one replica uses).
    pub change_feed_connected: bool,
    /// Times the feed of other replicas' changes reconnected (each followed by `reset`).
    pub change_feed_reconnects: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub verify_calls: AtomicU64,
    pub verify_valid: AtomicU64,
    pub verify_invalid: AtomicU64,
    pub usage_batches: AtomicU64,
    pub usage_events: AtomicU64,
    pub usage_unattributed: AtomicU64,
    pub usage_dropped_reported: AtomicU64,
    pub alerts_raised: AtomicU64,
}

/// Everything the routes share: store, tokens, event hub, counters, settings.
/// Cheap to clone.
#[derive(Clone)]
pub struct ServerState {
    pub(crate) inner: Arc<StateInner>,
}

pub(crate) struct StateInner {
    pub store: Store,
    pub tokens: Tokens,
    pub hub: EventHub,
    pub stats: Stats,
    pub alerts: AlertConfig,
    pub key_prefix: String,
    /// Other replicas' changes, forwarded into `hub`; stops when the state is dropped.
    pub feed: Option<ChangeFeed>,
}

impl ServerState {
    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The event hub behind `GET /v1/events`.
    pub fn events(&self) -> &EventHub {
        &self.inner.hub
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ServerStats {
        let s = &self.inner.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let feed = self.inner.feed.as_ref().map(ChangeFeed::stats).unwrap_or_default();
        ServerStats {
            verify_calls: get(&s.verify_calls),
            verify_valid: get(&s.verify_valid),
            verify_invalid: get(&s.verify_invalid),
            usage_batches: get(&s.usage_batches),
            usage_events: get(&s.usage_events),
            usage_unattributed: get(&s.usage_unattributed),
            usage_dropped_reported: get(&s.usage_dropped_reported),
            events_published: self.inner.hub.published(),
            event_subscribers: self.inner.hub.subscribers(),
            alerts_raised: get(&s.alerts_raised),
            events_forwarded: feed.forwarded,
            change_feed_connected: feed.connected,
            change_feed_reconnects: feed.reconnects,
        }
    }
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

/// The local subscribers hear what the store committed.
impl ChangeSink for EventHub {
    fn publish(&self, note: &ChangeNote) {
        note.publish(self);
    }

    fn listening(&self) -> bool {
        self.subscribers() > 0
    }
}

impl FromRequestParts<ServerState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ServerState) -> Result<Self, Self::Rejection> {
        check(parts, &state.inner.tokens.admin).map(|()| Admin)
    }
}

impl FromRequestParts<ServerState> for Service {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ServerState) -> Result<Self, Self::Rejection> {
        check(parts, &state.inner.tokens.service).map(|()| Service)
    }
}
