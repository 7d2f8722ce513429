//! What the routes share: [`ServerState`], its counters, and the wiring of the store's
//! change notes into the event hub.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::FromRequestParts;
use http::request::Parts;

use super::alerts::AlertConfig;
use super::auth::{Admin, Service, TokenTable, TokenTask};
use super::error::ApiError;
use super::events::{ChangeNote, EventHub};
use super::meters::Meters;
use super::policy::{SweepCounters, SweepTask};
use super::retention::{RetentionConfig, RetentionCounters, RetentionTask, run_pass};
use super::store::{ChangeFeed, ChangeSink, RetentionReport, Store, StoreError};
use super::token::TokenKind;
use super::webhooks::{WebhookCounters, WebhookWorker};

/// Counters of a running key service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// `POST /v1/keys/verify` requests handled (past token check).
    pub verify_calls: u64,
    /// Verifications refused at once (503 `overloaded`) because
    /// `max_concurrent_verifies` were in progress.
    pub verify_shed: u64,
    /// `POST /v1/keys/verify-batch` requests handled (past token check and shedding).
    pub verify_batches: u64,
    /// Digests in the batches counted by `verify_batches`.
    pub verify_batch_digests: u64,
    /// Verify answers `valid: true` (single and batched).
    pub verify_valid: u64,
    /// Verify answers `valid: false` (single and batched).
    pub verify_invalid: u64,
    /// Usage batches applied (aggregate and raw; not the duplicates).
    pub usage_batches: u64,
    /// Raw usage events received in applied batches.
    pub usage_events: u64,
    /// Aggregate rows received in applied batches.
    pub usage_rows: u64,
    /// Requests stored per key (from aggregate rows and raw events alike).
    pub usage_requests: u64,
    /// Aggregate batches whose id had been applied before: answered, nothing added.
    pub usage_duplicates: u64,
    /// Rows (or raw events' rows) refused because their minute is outside the accepted
    /// window ([`MAX_USAGE_AGE`](super::MAX_USAGE_AGE), [`MAX_USAGE_AHEAD`](super::MAX_USAGE_AHEAD)).
    pub usage_rows_refused: u64,
    /// Requests in those refused rows.
    pub usage_requests_refused: u64,
    /// Requests with a key id that is not one of this service's keys (not stored).
    pub usage_unknown: u64,
    /// Requests without a key id (counted, not stored per key).
    pub usage_unattributed: u64,
    /// Requests middlewares reported as dropped (never delivered).
    pub usage_dropped_reported: u64,
    /// Requests middlewares reported as folded into overflow rows (counted, less detail).
    pub usage_overflowed_reported: u64,
    /// Client networks middlewares reported as not kept.
    pub usage_networks_dropped_reported: u64,
    /// Retention passes completed.
    pub retention_passes: u64,
    /// Retention passes that failed (the next one tries again).
    pub retention_failures: u64,
    /// Minute rows rolled up into hour rows.
    pub retention_minutes_rolled_up: u64,
    /// Hour rows deleted after their retention.
    pub retention_hours_deleted: u64,
    /// Applied batch ids forgotten.
    pub retention_batch_ids_deleted: u64,
    /// SSE events published.
    pub events_published: u64,
    /// SSE streams open now.
    pub event_subscribers: u64,
    /// SSE streams refused because the subscriber cap was reached.
    pub event_subscribers_refused: u64,
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
    /// Webhook deliveries answered with a 2xx (by this replica).
    pub webhook_delivered: u64,
    /// Webhook attempts that failed (each retried, or given up on).
    pub webhook_attempts_failed: u64,
    /// Webhook deliveries given up on (too many attempts, or too old).
    pub webhook_failed: u64,
    /// Keys expired by the rotation policy.
    pub keys_expired_by_policy: u64,
    /// Credit reconciliation passes run, failed ones included (feature `redis`).
    pub credits_reconcile_passes: u64,
    /// Keys whose `remaining` a reconciliation pass wrote from Redis.
    pub credits_reconciled_keys: u64,
    /// Owners whose `remaining` a reconciliation pass wrote from Redis.
    pub credits_reconciled_owners: u64,
    /// Reconciliation passes stopped because Redis did not answer.
    pub credits_reconcile_redis_errors: u64,
    /// Reconciliation passes stopped by a store failure.
    pub credits_reconcile_store_errors: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub verify_calls: AtomicU64,
    pub verify_shed: AtomicU64,
    pub verify_batches: AtomicU64,
    pub verify_batch_digests: AtomicU64,
    pub verify_valid: AtomicU64,
    pub verify_invalid: AtomicU64,
    pub usage_batches: AtomicU64,
    pub usage_events: AtomicU64,
    pub usage_rows: AtomicU64,
    pub usage_requests: AtomicU64,
    pub usage_duplicates: AtomicU64,
    pub usage_rows_refused: AtomicU64,
    pub usage_requests_refused: AtomicU64,
    pub usage_unknown: AtomicU64,
    pub usage_unattributed: AtomicU64,
    pub usage_dropped_reported: AtomicU64,
    pub usage_overflowed_reported: AtomicU64,
    pub usage_networks_dropped_reported: AtomicU64,
    pub alerts_raised: AtomicU64,
}

impl Stats {
    /// Adds `n` to a counter, saturating: counts a middleware reports are not trusted
    /// not to overflow.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some(c.saturating_add(n)));
        }
    }
}

/// Everything the routes share: store, tokens, event hub, counters, settings.
/// Cheap to clone.
#[derive(Clone)]
pub struct ServerState {
    pub(crate) inner: Arc<StateInner>,
}

pub(crate) struct StateInner {
    pub store: Store,
    /// The tokens accepted now (see `auth`).
    pub tokens: Arc<TokenTable>,
    /// Keeps `tokens` in step with the store; stops when the state is dropped.
    pub _token_task: Option<TokenTask>,
    pub hub: EventHub,
    pub stats: Stats,
    pub alerts: AlertConfig,
    pub key_prefix: String,
    /// Environments whose keys get a prefix of their own.
    pub env_prefixes: std::collections::BTreeMap<String, String>,
    /// Other replicas' changes, forwarded into `hub`; stops when the state is dropped.
    pub feed: Option<ChangeFeed>,
    pub retention: RetentionConfig,
    pub retention_counters: Arc<RetentionCounters>,
    /// Background retention passes; stop when the state is dropped.
    pub _retention_task: Option<RetentionTask>,
    /// The metrics recorder (off unless `KeyServer::metrics_listen` was set); the store
    /// shares it.
    pub meters: Arc<Meters>,
    pub webhook_counters: Arc<WebhookCounters>,
    /// One permit per verification in progress (see `KeyServer::max_concurrent_verifies`).
    pub verify_slots: tokio::sync::Semaphore,
    /// Webhook URLs on internal addresses accepted (`KeyServer::allow_internal_webhooks`).
    pub allow_internal_webhooks: bool,
    /// GitHub secret scanning reports (`KeyServer::secret_scanning`); `None`: off.
    pub leaks: Option<super::leaks::Leaks>,
    /// Webhook deliveries; stop when the state is dropped.
    pub _webhook_worker: Option<WebhookWorker>,
    pub sweep_counters: Arc<SweepCounters>,
    /// Expiring-soon alerts and the rotation policy; stop when the state is dropped.
    pub _sweep_task: SweepTask,
    pub reconcile_counters: Arc<super::reconcile::ReconcileCounters>,
    /// Whether the credit reconciler runs (its series are shown only then).
    pub reconciling: bool,
    /// The credit reconciler; stops when the state is dropped.
    #[cfg(feature = "redis")]
    pub _reconcile_task: Option<super::reconcile::ReconcileTask>,
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

    /// Runs one usage retention pass now, besides the background ones (see
    /// [`RetentionConfig`]); safe while other passes run, here or on other replicas.
    pub async fn run_retention(&self) -> Result<RetentionReport, StoreError> {
        run_pass(&self.inner.store, &self.inner.retention, &self.inner.retention_counters).await
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ServerStats {
        let s = &self.inner.stats;
        let r = &self.inner.retention_counters;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let feed = self.inner.feed.as_ref().map(ChangeFeed::stats).unwrap_or_default();
        ServerStats {
            verify_calls: get(&s.verify_calls),
            verify_shed: get(&s.verify_shed),
            verify_batches: get(&s.verify_batches),
            verify_batch_digests: get(&s.verify_batch_digests),
            verify_valid: get(&s.verify_valid),
            verify_invalid: get(&s.verify_invalid),
            usage_batches: get(&s.usage_batches),
            usage_events: get(&s.usage_events),
            usage_rows: get(&s.usage_rows),
            usage_requests: get(&s.usage_requests),
            usage_duplicates: get(&s.usage_duplicates),
            usage_rows_refused: get(&s.usage_rows_refused),
            usage_requests_refused: get(&s.usage_requests_refused),
            usage_unknown: get(&s.usage_unknown),
            usage_unattributed: get(&s.usage_unattributed),
            usage_dropped_reported: get(&s.usage_dropped_reported),
            usage_overflowed_reported: get(&s.usage_overflowed_reported),
            usage_networks_dropped_reported: get(&s.usage_networks_dropped_reported),
            retention_passes: get(&r.passes),
            retention_failures: get(&r.failures),
            retention_minutes_rolled_up: get(&r.minutes_rolled_up),
            retention_hours_deleted: get(&r.hours_deleted),
            retention_batch_ids_deleted: get(&r.batch_ids_deleted),
            events_published: self.inner.hub.published(),
            event_subscribers: self.inner.hub.subscribers(),
            event_subscribers_refused: self.inner.hub.refused(),
            alerts_raised: get(&s.alerts_raised) + get(&self.inner.sweep_counters.alerts_raised),
            events_forwarded: feed.forwarded,
            change_feed_connected: feed.connected,
            change_feed_reconnects: feed.reconnects,
            webhook_delivered: get(&self.inner.webhook_counters.delivered),
            webhook_attempts_failed: get(&self.inner.webhook_counters.attempts_failed),
            webhook_failed: get(&self.inner.webhook_counters.failed),
            keys_expired_by_policy: get(&self.inner.sweep_counters.expired_by_policy),
            credits_reconcile_passes: get(&self.inner.reconcile_counters.passes),
            credits_reconciled_keys: get(&self.inner.reconcile_counters.keys),
            credits_reconciled_owners: get(&self.inner.reconcile_counters.owners),
            credits_reconcile_redis_errors: get(&self.inner.reconcile_counters.redis_errors),
            credits_reconcile_store_errors: get(&self.inner.reconcile_counters.store_errors),
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
    fn publish(&self, note: &ChangeNote, id: Option<u64>) {
        self.change(note, id);
    }

    fn position(&self) -> u64 {
        EventHub::position(self)
    }

    fn skip_to(&self, id: u64) {
        self.advance_to(id);
    }
}

impl FromRequestParts<ServerState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ServerState) -> Result<Self, Self::Rejection> {
        state.inner.tokens.authenticate(parts, TokenKind::Admin).map(Admin::new)
    }
}

impl FromRequestParts<ServerState> for Service {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ServerState) -> Result<Self, Self::Rejection> {
        state.inner.tokens.authenticate(parts, TokenKind::Service).map(Service::new)
    }
}
