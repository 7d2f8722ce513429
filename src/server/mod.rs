//! The reference key service (feature `server`): the other side of keygate's wire
//! protocol ([`wire`](crate::wire)), as a library and as the binary `keygate-server`.
//!
//! It issues, stores, rotates, revokes and verifies keys; stores only `SHA-256(key)`
//! and a display prefix (`kg_3fA9`); expands roles into effective scopes on verify;
//! keeps an append-only audit log; pushes invalidations to middlewares over
//! Server-Sent Events ([`EventHub`]); aggregates usage per key and minute and per key,
//! route and hour, and prunes it ([`RetentionConfig`]); raises anomaly and
//! expiring-soon alerts ([`AlertConfig`]), enforces a maximum key age
//! ([`RotationPolicy`]) and pushes alerts and key lifecycle events to webhooks
//! ([`WebhookConfig`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use keygate::server::{AdminClient, KeyServer, NewKey};
//!
//! let server = KeyServer::builder()
//!     .database("sqlite::memory:")
//!     .service_token("svc")
//!     .admin_token("adm")
//!     .listen("127.0.0.1:0".parse()?)
//!     .start()
//!     .await?;
//! let admin = AdminClient::new(server.url(), "adm")?;
//! let created = admin
//!     .create_key(NewKey { owner: "acme".into(), name: "ci".into(), scopes: vec!["reports:read".into()], ..Default::default() })
//!     .await?;
//! println!("{} (shown once)", created.key.expose_secret());
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! **Rotation** keeps the key id: `POST /v1/keys/{id}/rotate` adds a new secret to the
//! same key, and the previous secrets keep working until now + `grace_s` (verify then
//! reports that time as `expires_at`, so no cache outlives it). One id per key means
//! audit, usage and invalidation (`rotated`, by key id) follow the key across rotations.
//!
//! **Verdict precedence**: `REVOKED`, then `DISABLED`, then `EXPIRED`.
//!
//! # Webhooks
//!
//! `POST /v1/webhooks {"url", "events"?, "description"?}` (admin token;
//! [`AdminClient::create_webhook`], CLI `keygate-server webhooks add`) adds an endpoint
//! and answers its signing secret once; `GET /v1/webhooks`, `GET|DELETE
//! /v1/webhooks/{id}` and `GET /v1/webhooks/{id}/deliveries?limit=&before=` (a
//! [`DeliveryPage`] of [`WebhookDelivery`], newest first, at most
//! [`MAX_DELIVERIES_PAGE`]) manage them. URLs: `http` or `https`, no credentials, at
//! most [`MAX_WEBHOOK_URL_LEN`] bytes. Adding and removing are audited.
//!
//! The events are `key.created`, `key.rotated`, `key.revoked`, `key.disabled`,
//! `key.enabled`, `key.expiring`, `key.expired` (by the rotation policy) and
//! `alert.<kind>` for every other alert, as JSON
//! `{"id", "type", "created_at", "data"}` with no key material. Each is written to an
//! outbox in the transaction of its change (one row per endpoint that wants it) and
//! delivered by a background worker, signed ([`SIGNATURE_HEADER`], with a verification
//! snippet), retried with backoff, bounded per endpoint and never redirected: see
//! [`WebhookConfig`]. Expiring-soon alerts are [`AlertConfig::expiring_within`]; the
//! maximum key age and expiry after it, [`RotationPolicy`].
//!
//! # Usage
//!
//! `POST /v1/usage` (service token) takes an [`AggregateBatch`](crate::AggregateBatch),
//! told apart by its `batch_id`, or the older raw [`UsageBatch`](crate::UsageBatch) of
//! events, which is aggregated here into the same rows. Both are stored per key and
//! minute, and per key, hour, route, method and outcome, each row with its requests,
//! allowed and denied, responses by status class and a mergeable
//! [`LatencyHistogram`](crate::LatencyHistogram); merges are exact under any number of
//! concurrent batches and replicas. What is checked:
//!
//! | check | when it fails |
//! | --- | --- |
//! | body at most [`AGGREGATE_BODY_LIMIT`] (16 MiB; raw: [`USAGE_BODY_LIMIT`], 4 MiB) | 413 |
//! | at most [`MAX_AGGREGATE_ROWS`] rows and [`MAX_AGGREGATE_NETWORKS`] networks (20 000 each; raw: [`MAX_USAGE_EVENTS`] events) | 400 `too_many_rows`, `too_many_networks`, `too_many_events` |
//! | `batch_id` is 32 lowercase hex digits | 400 `invalid_batch_id` |
//! | each row: `requests` = `latency.count` = the sum of `status`; `minute` a multiple of 60 | 400 `invalid_row`, naming the row |
//! | each network as [`network_of`](crate::network_of) writes it | 400 `invalid_network` |
//! | a row's minute in `[now −` [`MAX_USAGE_AGE`] `(24 h), now +` [`MAX_USAGE_AHEAD`] `(5 min)]`; `route` 1 to [`MAX_USAGE_ROUTE_LEN`] bytes and `method` 1 to 32, no control characters | the row is not stored; its requests are answered as `refused` and counted |
//! | a row's key id is one of this service's keys | not stored; answered as `unknown` and counted |
//! | a row has a key id | not stored per key; answered as `unattributed` and counted |
//!
//! Rows repeated in a batch are merged; counters saturate. The answer is `202`
//! [`UsageAccepted`](crate::wire::UsageAccepted) with the requests stored. A batch id is
//! written in the transaction that adds its rows and kept
//! [`USAGE_BATCH_ID_RETENTION`] (25 h): the same batch again, later or at the same time
//! through another replica, adds nothing and is answered `"duplicate": true` with the
//! first copy's count. `last_used_at` moves to the rows' `last_at_ms`; alerts are
//! evaluated from the rows and networks ([`AlertConfig`]).
//!
//! `GET /v1/usage?key_id=|owner=&since=&until=&group_by=minute|hour|day|route` (admin
//! token; [`AdminClient::usage_report`], CLI `keygate-server usage`) answers a
//! [`UsageReport`]: one key, or the sum over an owner's keys; `since` and `until` in RFC
//! 3339 (default: the 24 hours before now), widened to whole buckets; buckets with
//! requests, allowed, denied, status classes, latency sum, p50 / p90 / p99 and max. `hour`
//! and `day` read the rolled-up hour rows and the minute rows not rolled up yet; `route`
//! reads the per-route hour rows. Bounds: at most [`MAX_USAGE_BUCKETS`] buckets (10 080),
//! [`MAX_USAGE_SPAN`] (400 days), [`MAX_USAGE_ROWS`] stored rows read (1 000 000) and
//! [`MAX_USAGE_ROUTES`] route groups (10 000); beyond, 400. The server prunes usage
//! itself: see [`RetentionConfig`] (also for the storage cost per key and day).
//!
//! **Replicas.** With feature `postgres`, several key-service processes share one
//! PostgreSQL database ([`PostgresStore`], chosen by a `postgres://` URL): each
//! change is sent to the others with `NOTIFY` in its transaction, and each replica's
//! event stream carries the changes made through every replica (see [`EventHub`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

// Module order from the bottom up; each imports only modules before it: text, model,
// events, store, error, validate, usage, report, auth, alerts, retention, webhooks,
// policy, client, state, webhook_api, api (and this one, which builds and starts the
// service).
mod alerts;
mod api;
mod auth;
mod client;
mod error;
mod events;
mod model;
mod policy;
mod report;
mod retention;
mod state;
mod store;
mod text;
mod usage;
mod validate;
mod webhook_api;
mod webhooks;

pub use alerts::AlertConfig;
pub use api::{BODY_LIMIT, JsonBody, MAX_USAGE_EVENTS, USAGE_BODY_LIMIT, router};
pub use auth::{Admin, Service};
pub use client::{AdminClient, ClientError, CreatedKey};
pub use client::{CreatedWebhook, DeliveryPage};
pub use error::{ApiError, ServerError};
pub use events::EventHub;
pub use model::{AuditRecord, KeyInfo, KeyPatch, NewKey, RoleInfo, UsageBucket, UsageGroupBy, UsageQuery, UsageReport};
pub use policy::{POLICY_ACTOR, RotationPolicy};
pub use report::{MAX_USAGE_BUCKETS, MAX_USAGE_ROUTES, MAX_USAGE_ROWS, MAX_USAGE_SPAN};
pub use retention::RetentionConfig;
pub use state::{ServerState, ServerStats};
#[cfg(feature = "postgres")]
pub use store::PostgresStore;
pub use store::{DeliveryState, RetentionReport, SqliteStore, Store, StoreError, WebhookDelivery, WebhookEndpoint};
pub use usage::{
    AGGREGATE_BODY_LIMIT, MAX_AGGREGATE_NETWORKS, MAX_AGGREGATE_ROWS, MAX_USAGE_AGE, MAX_USAGE_AHEAD,
    MAX_USAGE_ROUTE_LEN, USAGE_BATCH_ID_RETENTION,
};
pub use webhook_api::{MAX_DELIVERIES_PAGE, MAX_WEBHOOK_URL_LEN};
pub use webhooks::{EVENT_ID_HEADER, SIGNATURE_HEADER, WebhookConfig};

use auth::Tokens;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// Default heartbeat interval on `GET /v1/events`.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// Default per-subscriber event buffer.
pub const DEFAULT_EVENT_BUFFER: usize = 1024;
/// Default prefix of issued keys.
pub const DEFAULT_KEY_PREFIX: &str = "kg";
/// How long starting waits for the feed of other replicas' changes to connect.
const FEED_START_WAIT: Duration = Duration::from_secs(5);

/// Builds and starts a key service. See the [module docs](self).
#[must_use]
pub struct KeyServer {
    database: String,
    store: Option<Store>,
    service_token: Option<String>,
    admin_token: Option<String>,
    listen: SocketAddr,
    key_prefix: String,
    heartbeat: Duration,
    event_buffer: usize,
    alerts: AlertConfig,
    retention: RetentionConfig,
    webhooks: WebhookConfig,
    rotation: RotationPolicy,
}

impl std::fmt::Debug for KeyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyServer")
            .field("listen", &self.listen)
            .field("key_prefix", &self.key_prefix)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

impl KeyServer {
    /// Defaults: database `sqlite::memory:`, listen `127.0.0.1:7700`, key prefix `kg`,
    /// heartbeat 15 s, event buffer 1 024 per subscriber, [`AlertConfig::default`],
    /// [`RetentionConfig::default`], [`WebhookConfig::default`], no
    /// [`RotationPolicy`], and tokens generated at start when not given (read
    /// them from [`RunningKeyServer`]).
    pub fn builder() -> Self {
        Self {
            database: "sqlite::memory:".into(),
            store: None,
            service_token: None,
            admin_token: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            key_prefix: DEFAULT_KEY_PREFIX.into(),
            heartbeat: DEFAULT_HEARTBEAT,
            event_buffer: DEFAULT_EVENT_BUFFER,
            alerts: AlertConfig::default(),
            retention: RetentionConfig::default(),
            webhooks: WebhookConfig::default(),
            rotation: RotationPolicy::default(),
        }
    }

    /// The database URL: `sqlite://path` (created if missing), `sqlite::memory:`, or
    /// with feature `postgres`, `postgres://...`: several replicas may share one
    /// PostgreSQL database (or one schema of it, chosen with `?options=-c
    /// search_path=<schema>`), and each hears about the others' changes.
    pub fn database(mut self, url: impl Into<String>) -> Self {
        self.database = url.into();
        self
    }

    /// Uses an already open store ([`SqliteStore`],
    /// `PostgresStore`) instead of [`database`](Self::database).
    pub fn store(mut self, store: impl Into<Store>) -> Self {
        self.store = Some(store.into());
        self
    }

    /// The token middlewares send to verify, report usage and follow events.
    pub fn service_token(mut self, token: impl Into<String>) -> Self {
        self.service_token = Some(token.into());
        self
    }

    /// The token of the admin API.
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(token.into());
        self
    }

    /// Where to listen (port 0 picks a free one).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Prefix of issued keys (`[a-z][a-z0-9]{0,15}`, default `kg`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Heartbeat interval of `GET /v1/events` (default 15 s).
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// Events buffered per subscriber before it is told to `reset` (default 1 024).
    pub fn event_buffer(mut self, events: usize) -> Self {
        self.event_buffer = events;
        self
    }

    /// Alert thresholds.
    pub fn alerts(mut self, config: AlertConfig) -> Self {
        self.alerts = config;
        self
    }

    /// How long usage is kept and how often it is pruned (default
    /// [`RetentionConfig::default`]: minute rows 7 days, hour rows 90 days, a pass every
    /// 5 minutes).
    pub fn retention(mut self, config: RetentionConfig) -> Self {
        self.retention = config;
        self
    }

    /// How webhooks are delivered (default [`WebhookConfig::default`]: retries for up
    /// to 24 hours or 20 attempts, 10 000 pending deliveries per endpoint).
    pub fn webhooks(mut self, config: WebhookConfig) -> Self {
        self.webhooks = config;
        self
    }

    /// The maximum key age per environment or owner, and whether keys past it expire
    /// (default: no maximum). Keys are swept every [`AlertConfig::sweep_interval`].
    pub fn rotation_policy(mut self, policy: RotationPolicy) -> Self {
        self.rotation = policy;
        self
    }

    fn tokens(&mut self) -> Result<(String, String), ServerError> {
        let gen_token = |prefix: &str| {
            crate::key::ApiKey::generate(prefix)
                .map(|k| k.expose_secret().to_owned())
                .map_err(|e| ServerError::Config(e.to_string()))
        };
        let service = match self.service_token.take() {
            Some(t) => t,
            None => gen_token("kgsvc")?,
        };
        let admin = match self.admin_token.take() {
            Some(t) => t,
            None => gen_token("kgadmin")?,
        };
        for (name, t) in [("service", &service), ("admin", &admin)] {
            if t.len() < 3 || t.len() > 1024 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ServerError::Config(format!(
                    "the {name} token must be 3 to 1024 visible ASCII characters"
                )));
            }
        }
        if service == admin {
            return Err(ServerError::Config("the service and admin tokens must differ".into()));
        }
        Ok((service, admin))
    }

    /// Opens the store and builds the shared state, without listening: for embedding
    /// [`router`] into another server. Returns the state and the (service, admin) tokens.
    pub async fn build(mut self) -> Result<(ServerState, String, String), ServerError> {
        crate::key::validate_prefix(&self.key_prefix)
            .map_err(|e| ServerError::Config(format!("key prefix `{}`: {e}", self.key_prefix)))?;
        self.retention.validate().map_err(ServerError::Config)?;
        self.webhooks.validate().map_err(ServerError::Config)?;
        self.rotation.validate().map_err(ServerError::Config)?;
        let (service, admin) = self.tokens()?;
        let store = match self.store.take() {
            Some(s) => s,
            None => open_store(&self.database).await?,
        };
        tracing::debug!(
            key_prefix = %self.key_prefix,
            heartbeat = ?self.heartbeat,
            event_buffer = self.event_buffer,
            "key service configured"
        );
        let hub = EventHub::new(self.event_buffer, self.heartbeat);
        let store = store.reporting_to(Arc::new(hub.clone())).with_webhook_queue(self.webhooks.max_pending);
        let feed = store.follow_changes();
        if let Some(feed) = &feed {
            // Serving before the feed listens would let another replica's change slip by
            // unnoticed; a feed that is late publishes `reset` when it connects.
            if !feed.wait_connected(FEED_START_WAIT).await {
                tracing::warn!("the feed of other replicas' changes is not connected yet; starting anyway");
            }
        }
        let retention_counters = Arc::new(retention::RetentionCounters::default());
        let retention_task = self.retention.enabled.then(|| {
            retention::RetentionTask::spawn(store.clone(), self.retention.clone(), Arc::clone(&retention_counters))
        });
        let webhook_counters = Arc::new(webhooks::WebhookCounters::default());
        let webhook_worker = if self.webhooks.enabled {
            let worker =
                webhooks::WebhookWorker::spawn(store.clone(), self.webhooks.clone(), Arc::clone(&webhook_counters))
                    .map_err(|e| ServerError::Config(format!("webhook HTTP client: {e}")))?;
            Some(worker)
        } else {
            None
        };
        let sweep_counters = Arc::new(policy::SweepCounters::default());
        let sweep_task = policy::SweepTask::spawn(
            store.clone(),
            self.alerts.clone(),
            self.rotation.clone(),
            Arc::clone(&sweep_counters),
        );
        let state = ServerState {
            inner: Arc::new(state::StateInner {
                store,
                tokens: Tokens::new(&service, &admin),
                hub,
                stats: state::Stats::default(),
                alerts: self.alerts.clone(),
                key_prefix: self.key_prefix.clone(),
                feed,
                retention: self.retention.clone(),
                retention_counters,
                _retention_task: retention_task,
                webhook_counters,
                _webhook_worker: webhook_worker,
                sweep_counters,
                _sweep_task: sweep_task,
            }),
        };
        Ok((state, service, admin))
    }

    /// Opens the store, runs migrations, binds and starts serving in the background.
    pub async fn start(self) -> Result<RunningKeyServer, ServerError> {
        let listen = self.listen;
        let (state, service_token, admin_token) = self.build().await?;
        let listener =
            tokio::net::TcpListener::bind(listen).await.map_err(|source| ServerError::Bind { addr: listen, source })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: listen, source })?;
        let app = router(state.clone()).layer(tower_http::trace::TraceLayer::new_for_http());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let hub = state.inner.hub.clone();
        let task = tokio::spawn(async move {
            let stop = async move {
                let _ = stop_rx.await;
                // Event streams never end on their own: end them so that the graceful
                // shutdown does not wait for them.
                hub.disconnect_all();
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                tracing::error!(error = %e, "key service stopped with an error");
            }
        });
        tracing::info!(%addr, "key service listening");
        Ok(RunningKeyServer { addr, state, stop: Some(stop_tx), task: Some(task), service_token, admin_token })
    }
}

/// A key service serving in the background. Dropping it starts a graceful shutdown;
/// [`shutdown`](Self::shutdown) also waits for it.
pub struct RunningKeyServer {
    addr: SocketAddr,
    state: ServerState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    service_token: String,
    admin_token: String,
}

impl std::fmt::Debug for RunningKeyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningKeyServer").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl RunningKeyServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ServerStats {
        self.state.stats()
    }

    /// The shared state (store, event hub).
    pub fn state(&self) -> &ServerState {
        &self.state
    }

    /// The service token (configured or generated).
    pub fn service_token(&self) -> &str {
        &self.service_token
    }

    /// The admin token (configured or generated).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Ends every open `GET /v1/events` stream now; subscribers may reconnect.
    pub fn disconnect_event_streams(&self) {
        self.state.inner.hub.disconnect_all();
    }

    /// Waits for `signal`, then shuts down gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }

    /// Stops accepting connections, ends event streams, lets in-flight requests finish
    /// (for up to 10 s) and returns.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(10), &mut task).await.is_err() {
                tracing::warn!("graceful shutdown timed out; aborting open connections");
                task.abort();
            }
        }
        tracing::info!(addr = %self.addr, "key service stopped");
    }
}

impl Drop for RunningKeyServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Opens the store a URL names (`sqlite://path`, `sqlite::memory:`, and with feature
/// `postgres`, `postgres://...` or `postgresql://...`) and runs its migrations.
async fn open_store(url: &str) -> Result<Store, ServerError> {
    if url.starts_with("sqlite:") {
        return Ok(store::SqliteStore::open(url).await?.into());
    }
    #[cfg(feature = "postgres")]
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(store::PostgresStore::open(url).await?.into());
    }
    let scheme = url.split(':').next().unwrap_or_default();
    Err(ServerError::UnsupportedDatabase(format!("{scheme}:…")))
}
