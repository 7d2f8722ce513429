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
//! ([`WebhookConfig`]). With feature `redis` it reconciles the credits a fleet-wide
//! engine counts in Redis back into the store
//! ([`reconcile_credits`](KeyServer::reconcile_credits)).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use keygate::client::{AdminClient, NewKey};
//! use keygate::server::KeyServer;
//!
//! let admin_token = std::env::var("KEYGATE_ADMIN_TOKEN")?; // at least 32 characters
//! let server = KeyServer::builder()
//!     .database("sqlite::memory:")
//!     .service_token(std::env::var("KEYGATE_SERVICE_TOKEN")?)
//!     .admin_token(&admin_token)
//!     .listen("127.0.0.1:0".parse()?)
//!     .start()
//!     .await?;
//! let admin = AdminClient::new(server.url(), &admin_token)?;
//! let created = admin
//!     .create_key(NewKey { owner: "acme".into(), name: "ci".into(), scopes: vec!["reports:read".into()], ..Default::default() })
//!     .await?;
//! println!("{} (shown once)", created.key.expose_secret());
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! The admin API's types ([`NewKey`](crate::client::NewKey), [`KeyInfo`](crate::client::KeyInfo),
//! [`UsageReport`](crate::client::UsageReport), ...) and its client are in
//! [`client`](crate::client), which this feature includes.
//!
//! **Rotation** keeps the key id: `POST /v1/keys/{id}/rotate` adds a new secret to the
//! same key, and the previous secrets keep working until now + `grace_s` (verify then
//! reports that time as `expires_at`, so no cache outlives it). One id per key means
//! audit, usage and invalidation (`rotated`, by key id) follow the key across rotations.
//!
//! **Verdict precedence**: `REVOKED`, then `DISABLED`, then `EXPIRED`.
//!
//! # OpenAPI
//!
//! `GET /openapi.json` (no token: the document holds no secrets and nothing of the
//! instance) answers the OpenAPI 3.1 document of every route of [`router`], generated
//! from the handlers and the types they read and answer (the admin types of
//! [`client`](crate::client), the [`wire`](crate::wire) types): parameters, request
//! bodies, each status a route answers with its body (refusals are
//! [`ErrorBody`](crate::wire::ErrorBody)), and per route the security scheme it takes,
//! `admin_token` or `service_token` (both HTTP bearer). The repository keeps a copy as
//! `docs/openapi.json`, which `tests/server_openapi.rs` checks against the served one
//! (`KEYGATE_UPDATE_OPENAPI=1 cargo test --all-features --test server_openapi`
//! rewrites it), besides validating the real answers of every route against it.
//!
//! # Tokens
//!
//! Callers authenticate with `Authorization: Bearer <token>`: a **service** token for
//! `POST /v1/keys/verify`, `POST /v1/usage` and `GET /v1/events`, an **admin** token for
//! everything else. Tokens are records of the store ([`TokenInfo`](crate::client::TokenInfo): id, unique name,
//! kind, created / last-used / revoked times; only the SHA-256 digest of the token is
//! kept), several active at once, at most [`MAX_ACTIVE_TOKENS`]:
//!
//! | route | what |
//! | --- | --- |
//! | `POST /v1/tokens {"kind", "name"}` | `201` [`CreatedToken`](crate::client::CreatedToken): the token, shown this once (`kgs_` / `kga_` + 43 base62, 256 bits) |
//! | `GET /v1/tokens` | `{"tokens": [...]}`: this replica's bootstrap tokens, then every stored one (active ones first, then the revoked); never a token or a digest |
//! | `POST /v1/tokens/{id}/revoke` | the token, revoked; idempotent. `409` for the last active admin token (so operators cannot lock themselves out) and for bootstrap tokens |
//!
//! The name of the admin token that made a change is its audit actor ([`Admin::actor`]);
//! creating and revoking tokens are audited too (`token.create`, `token.revoke`).
//!
//! Each replica checks tokens against a table in memory, comparing the presented
//! token's digest with every active one in constant time. The table is reloaded at once
//! after a change made through this replica (before the answer), when a change note of
//! another replica arrives on PostgreSQL, when that feed reconnects, and
//! every [`TOKEN_SYNC_INTERVAL`] (30 s) in any case. A revoked service token's open event
//! streams are closed. When each token was last used is noted in memory and written
//! every 30 s and at shutdown, never on the request path.
//!
//! **Bootstrap tokens**, [`KeyServer::service_token`] and [`KeyServer::admin_token`]
//! (the binary's `KEYGATE_SERVICE_TOKEN` / `KEYGATE_ADMIN_TOKEN`, `--service-token-file` /
//! `--admin-token-file`), must be at least [`MIN_TOKEN_LEN`] (32) characters; they act as
//! the tokens named [`BOOTSTRAP_SERVICE`] and [`BOOTSTRAP_ADMIN`], are not stored and
//! cannot be revoked through the API. A persistent database that holds no active admin
//! token, with none configured, does not start ([`ServerError::NoAdminToken`]): create
//! the first one with `keygate-server tokens create --kind admin --name ops --database
//! <url>` ([`create_token_offline`]). Only on `sqlite::memory:` are the tokens not
//! configured generated (read them from [`RunningKeyServer`]).
//!
//! **Admin input.** A key's roles must be defined (`PUT /v1/roles/{name}`) before it
//! holds them: an unknown role is 400 `unknown_role`. A key needs a scope or a role,
//! unless the request sets `allow_empty` (400 `empty_key` otherwise). Owner, name and
//! the strings of `meta` refuse control, invisible (U+200B–U+200F, U+2060–U+2064,
//! U+FEFF, U+00AD) and bidirectional-control characters (U+202A–U+202E, U+2066–U+2069)
//! with a 400 naming the field, the code point and its position from 0. Revocation is
//! idempotent: revoking a revoked key answers 200 with `"already_revoked": true` and
//! changes nothing. `DELETE /v1/roles/{name}` is 409 while unrevoked keys hold the role,
//! naming how many, unless `?detach=true`. `POST /v1/alerts/{id}/ack` acknowledges an
//! alert; `GET /v1/alerts?acknowledged=false` lists the open ones.
//!
//! **Key prefixes** follow the environment: by default `test` keys start `kgtest_`, all
//! others the [`key_prefix`](KeyServer::key_prefix) (`kg_`); see
//! [`env_prefix`](KeyServer::env_prefix).
//!
//! **Edges.** At most [`DEFAULT_MAX_EVENT_SUBSCRIBERS`] (1 000) `GET /v1/events` streams
//! at once ([`max_event_subscribers`](KeyServer::max_event_subscribers)); past it, 503
//! `too_many_subscribers` with `Retry-After`. A connection has
//! [`DEFAULT_HEADER_READ_TIMEOUT`] (10 s) to send a request's headers and a request body
//! may pause [`DEFAULT_REQUEST_BODY_TIMEOUT`] (30 s) at most
//! ([`header_read_timeout`](KeyServer::header_read_timeout),
//! [`request_body_timeout`](KeyServer::request_body_timeout)).
//!
//! # Webhooks
//!
//! `POST /v1/webhooks {"url", "events"?, "description"?}` (admin token;
//! [`AdminClient::create_webhook`](crate::client::AdminClient::create_webhook), CLI `keygate-server webhooks add`) adds an endpoint
//! and answers its signing secret once; `GET /v1/webhooks`, `GET|DELETE
//! /v1/webhooks/{id}` and `GET /v1/webhooks/{id}/deliveries?limit=&before=` (a
//! [`DeliveryPage`](crate::client::DeliveryPage) of [`WebhookDelivery`](crate::client::WebhookDelivery), newest first, at most
//! [`MAX_DELIVERIES_PAGE`]) manage them. URLs: `http` or `https`, no credentials, at
//! most [`MAX_WEBHOOK_URL_LEN`] bytes. Adding and removing are audited.
//!
//! The events, as JSON `{"id", "type", "created_at", "data"}` with no key material
//! (`data`: the key's id, owner, name, environment, scopes, roles, expiry, state and
//! the `actor`, or the alert):
//!
//! | type | when |
//! | --- | --- |
//! | `key.created` | a key was created |
//! | `key.updated` | a patch changed its name, scopes, roles, expiry, meta, rate limit, limits or credits; `data.changed` lists which (`name`, `scopes`, `roles`, `expires_at`, `meta`, `ratelimit`, `limits`, `credits`). A patch that changes nothing sends nothing |
//! | `key.disabled`, `key.enabled` | a patch changed `disabled` (beside `key.updated` when it changed more) |
//! | `key.rotated` | a new secret; `data.previous_expires_at` ends the old one |
//! | `key.revoked` | revoked (once) |
//! | `key.expiring` | the key expires within [`AlertConfig::expiring_within`] (once per expiry) |
//! | `key.expired` | the rotation policy expired it |
//! | `alert.<kind>` | every other alert (`alert.denial_spike`, `alert.rate_spike`, `alert.new_network`, `alert.key_max_age`, `alert.leaked`) |
//!
//! Each event is written to an outbox in the transaction of its change (one row per endpoint that wants it) and
//! delivered by a background worker, signed ([`SIGNATURE_HEADER`], with a verification
//! snippet), retried with backoff, bounded per endpoint and never redirected: see
//! [`WebhookConfig`]. Expiring-soon alerts are [`AlertConfig::expiring_within`]; the
//! maximum key age and expiry after it, [`RotationPolicy`].
//!
//! URLs whose host is an internal address (loopback, private, link-local, …) are
//! refused, and names resolving to one are not connected to, unless
//! [`KeyServer::allow_internal_webhooks`], which says what is checked and what is not.
//!
//! # Leaked keys (GitHub secret scanning)
//!
//! With [`KeyServer::secret_scanning`] (`--github-secret-scanning`), `POST /v1/leaks/github`
//! takes the reports of GitHub's secret scanning partner program. A report is a JSON
//! array of `{"token", "type", "url", "source"}` (at most [`MAX_REPORTED_TOKENS`], body at
//! most [`REPORT_BODY_LIMIT`]), signed: `Github-Public-Key-Identifier` names a key of the
//! public keys document ([`GITHUB_KEYS_URL`] by default; fetched on the first report and
//! again, at most once a minute, for an identifier it does not hold), and
//! `Github-Public-Key-Signature` is the base64 DER ECDSA P-256 signature of the raw body
//! over SHA-256. A missing or bad signature, or an unknown identifier, is 401 and changes
//! nothing; a keys document that cannot be fetched is 503 (GitHub retries). Each token is
//! looked up by digest: a key of this service is revoked (or disabled, [`LeakAction`])
//! with the audit actor [`LEAK_ACTOR`] and the report (`url`, `source`, `token_type`) in
//! the audit record's `changes.report`, a `revoked` (or `updated`) event to every
//! middleware, a `leaked` alert and its `alert.leaked` webhook. The answer labels each
//! token `true_positive` (a key here) or `false_positive`, as GitHub expects. A key
//! reported again, or revoked meanwhile, is labelled `true_positive` and nothing else
//! happens.
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
//! token; [`AdminClient::usage_report`](crate::client::AdminClient::usage_report), CLI
//! `keygate-server usage`) answers a [`UsageReport`](crate::client::UsageReport): one
//! key, or the sum over an owner's keys; `since` and `until` in RFC 3339 (default: the
//! 24 hours before now), widened to whole buckets; buckets with
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
//!
//! # Metrics
//!
//! With [`KeyServer::metrics_listen`] (CLI `--metrics-listen ADDR`, off by default) the
//! key service serves the Prometheus text exposition format at `GET /metrics` on that
//! address of its own, without a token (bind it where only the scraper reaches; the API
//! listener answers `/metrics` with 404). Latencies are in seconds, in buckets from 0.5
//! ms to 10 s. Labels take fixed values or route templates only: no key, key id, owner,
//! token or raw path is ever a label value, so the number of series is bounded.
//!
//! | series | type | labels | what |
//! | --- | --- | --- | --- |
//! | `keygate_server_verify_requests_total` | counter | `outcome`: `valid`, `not_found`, `revoked`, `expired`, `disabled`, `error` | `POST /v1/keys/verify` calls past the token check; `error`: no verdict (malformed request, store failure) |
//! | `keygate_server_verify_duration_seconds` | histogram | — | each of those calls, from its body read to its answer |
//! | `keygate_server_http_requests_total` | counter | `route` (the route template, such as `/v1/keys/{id}`, or `unmatched`), `method` (`GET`, `POST`, `PUT`, `PATCH`, `DELETE`, `HEAD`, `OPTIONS`, `other`), `status` (`1xx` … `5xx`) | every request, admin routes included, token refusals included |
//! | `keygate_server_http_request_duration_seconds` | histogram | `route`, `method` | from a request's arrival to its response head (for `/v1/events`, the stream's opening) |
//! | `keygate_server_usage_batches_total` | counter | `result`: `applied`, `duplicate` | `POST /v1/usage` batches stored, or recognised as applied before |
//! | `keygate_server_usage_rows_received_total` | counter | — | aggregate rows in applied batches (refused ones included) |
//! | `keygate_server_usage_events_received_total` | counter | — | raw events in applied batches |
//! | `keygate_server_usage_rows_refused_total` | counter | — | rows not stored: minute outside the accepted window |
//! | `keygate_server_usage_requests_total` | counter | `result`: `stored`, `refused`, `unknown`, `unattributed` | the requests those rows count, by what became of them (see [Usage](#usage)) |
//! | `keygate_server_usage_reported_total` | counter | `kind`: `dropped`, `overflowed`, `networks_dropped` | what middlewares report they could not deliver in full |
//! | `keygate_server_event_subscribers` | gauge | — | `GET /v1/events` streams open now |
//! | `keygate_server_events_published_total` | counter | — | events published to those streams |
//! | `keygate_server_event_subscribers_refused_total` | counter | — | `GET /v1/events` streams refused (503) because the subscriber cap was reached |
//! | `keygate_server_verify_shed_total` | counter | — | verifications refused at once (503 `overloaded`) because `max_concurrent_verifies` were in progress, single and batched |
//! | `keygate_server_verify_batches_total` | counter | — | `POST /v1/keys/verify-batch` calls past the token check, shedding and the body's check |
//! | `keygate_server_verify_batch_digests_total` | counter | — | digests in those calls (a batch holds 1 to [`MAX_VERIFY_BATCH`](crate::wire::MAX_VERIFY_BATCH)) |
//! | `keygate_server_alerts_raised_total` | counter | — | alerts raised: usage alerts (`denial_spike`, `rate_spike`, `new_network`) and the sweep's `key_expiring` and `key_max_age` |
//! | `keygate_server_retention_passes_total` | counter | `result`: `ok`, `failed` | usage retention passes |
//! | `keygate_server_retention_rows_total` | counter | `action`: `minutes_rolled_up`, `hours_deleted`, `batch_ids_deleted` | rows those passes rolled up into hours or deleted |
//! | `keygate_server_webhook_deliveries_total` | counter | `result`: `delivered` (a 2xx), `failed` (given up on: too many attempts, or too old) | webhook deliveries this replica finished |
//! | `keygate_server_webhook_attempts_failed_total` | counter | — | webhook attempts that failed (each retried later, or given up on) |
//! | `keygate_server_keys_expired_by_policy_total` | counter | — | keys the rotation policy expired (past their maximum age and grace period) |
//! | `keygate_server_store_operation_duration_seconds` | histogram | `op`: the store operation (`find_by_digest`, `create_key`, `change_key`, `record_usage`, `read_usage`, `ping`, …) | each operation, failures included |
//! | `keygate_server_store_errors_total` | counter | `op`, `kind`: `unavailable`, `database`, `corrupt`, `not_found`, `conflict`, `config`, `migration` | failed operations (`not_found` and `conflict` are answers to the request, the others faults) |
//! | `keygate_server_change_feed_connected` | gauge | — | PostgreSQL: 1 while the feed of other replicas' changes is connected |
//! | `keygate_server_change_feed_reconnects_total` | counter | — | PostgreSQL: times that feed reconnected (each followed by `reset`) |
//! | `keygate_server_events_forwarded_total` | counter | — | PostgreSQL: other replicas' changes forwarded to this replica's streams |
//! | `keygate_server_fanout_lag_seconds` | histogram | — | PostgreSQL: from another replica's `NOTIFY` of a change (sent in its transaction, just before the commit) to this replica hearing it; measured against the two hosts' clocks, so skew shows in it |
//! | `keygate_server_credits_reconcile_passes_total` | counter | — | with [`KeyServer::reconcile_credits`] (feature `redis`): credit reconciliation passes, failed ones included |
//! | `keygate_server_credits_reconciled_total` | counter | `holder`: `key`, `owner` | keys and owners whose remaining credits a pass wrote from Redis (a count that had not changed is not written) |
//! | `keygate_server_credits_reconcile_errors_total` | counter | `kind`: `redis` (did not answer), `store` | passes stopped by a failure (the next one tries again) |
//! | `keygate_server_build_info` | gauge | `version` | always 1 |
//!
//! Each key service records into a Prometheus recorder of its own, not the `metrics`
//! crate's global recorder: several key services in one process each expose their own
//! counts, and an application's global recorder (where the middleware's
//! `keygate_usage_*` series go) is left alone. To serve the page from an application
//! that embeds [`router`], set `metrics_listen` and call [`KeyServer::build`], then
//! answer with [`ServerState::render_metrics`].
//!
//! # Backup
//!
//! [`backup_sqlite`] (CLI `keygate-server backup --database sqlite://FILE --to COPY`)
//! copies a SQLite store consistently while key services use it; start a key service
//! on the copy to restore. A PostgreSQL store is backed up with PostgreSQL's tools
//! (`pg_dump`; see the README).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::client::TokenKind;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

// Module order from the bottom up; each imports only modules before it: text, model,
// token, events, meters, store, error, validate, usage, report, auth, alerts, retention,
// webhooks, policy, state, openapi, tokens_api, manage, webhook_api, metrics, api (and this one,
// which builds and starts the service; backup stands apart, on its own connection).
mod alerts;
mod api;
mod auth;
mod backup;
mod console;
mod error;
mod events;
mod leaks;
mod manage;
mod meters;
mod metrics;
mod model;
mod openapi;
mod owners_api;
mod policy;
mod reconcile;
mod report;
mod retention;
mod state;
mod store;
mod text;
mod token;
mod tokens_api;
mod usage;
mod validate;
mod webhook_api;
mod webhooks;

pub use alerts::AlertConfig;
pub use api::DEFAULT_MAX_CONCURRENT_VERIFIES;
pub use api::{BODY_LIMIT, JsonBody, MAX_USAGE_EVENTS, USAGE_BODY_LIMIT, router};
pub use auth::{Admin, Service};
pub use backup::{BackupError, backup_sqlite};
pub use console::{
    ConsoleConfig, DEFAULT_CONSOLE_ABSOLUTE_TIMEOUT, DEFAULT_CONSOLE_IDLE_TIMEOUT, DEFAULT_CONSOLE_MAX_SESSIONS,
    DEFAULT_SIGN_IN_ATTEMPTS_PER_MINUTE,
};
pub use error::{ApiError, ServerError};
pub use events::{DEFAULT_MAX_EVENT_SUBSCRIBERS, EventHub, MAX_EVENTS_PER_CHANGE};
pub use leaks::{
    DEFAULT_KEYS_REFETCH, GITHUB_KEYS_URL, LEAK_ACTOR, LeakAction, MAX_REPORTED_TOKENS, REPORT_BODY_LIMIT,
    SecretScanning,
};
pub use policy::{POLICY_ACTOR, RotationPolicy};
pub use reconcile::DEFAULT_CREDITS_RECONCILE_INTERVAL;
pub use report::{MAX_USAGE_BUCKETS, MAX_USAGE_ROUTES, MAX_USAGE_ROWS, MAX_USAGE_SPAN};
pub use retention::RetentionConfig;
pub use state::{ServerState, ServerStats};
#[cfg(feature = "postgres")]
pub use store::PostgresStore;
pub use store::{KeyCursor, KeyFilter, KeySort, KeySortBy, KeyState, RetentionReport, SqliteStore, Store, StoreError};
pub use usage::{
    AGGREGATE_BODY_LIMIT, MAX_AGGREGATE_NETWORKS, MAX_AGGREGATE_ROWS, MAX_USAGE_AGE, MAX_USAGE_AHEAD,
    MAX_USAGE_ROUTE_LEN, USAGE_BATCH_ID_RETENTION,
};
pub use webhook_api::{MAX_DELIVERIES_PAGE, MAX_WEBHOOK_URL_LEN};
pub use webhooks::{EVENT_ID_HEADER, SIGNATURE_HEADER, WebhookConfig};

pub use auth::TOKEN_SYNC_INTERVAL;
pub use token::{
    BOOTSTRAP_ADMIN, BOOTSTRAP_SERVICE, MAX_ACTIVE_TOKENS, MAX_TOKEN_LEN, MAX_TOKEN_NAME_LEN, MIN_TOKEN_LEN,
    OFFLINE_ACTOR,
};
pub use tokens_api::create_token_offline;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// Default heartbeat interval on `GET /v1/events`.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// Default per-subscriber event buffer.
pub const DEFAULT_EVENT_BUFFER: usize = 1024;
/// Default prefix of issued keys.
pub const DEFAULT_KEY_PREFIX: &str = "kg";
/// Default time a connection has to send a request's headers (also the longest an idle
/// keep-alive connection stays open).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

// keygate's clients drop a pooled connection before the key service closes it idle
// (see `transport::POOL_IDLE_TIMEOUT`): fails to build if the two cross.
const _: () = assert!(crate::transport::POOL_IDLE_TIMEOUT.as_millis() < DEFAULT_HEADER_READ_TIMEOUT.as_millis());
/// Default longest wait for the next piece of a request body.
pub const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The environment whose keys get their own prefix by default, and that prefix: a test
/// key reads `kgtest_...`, recognisable on sight and by secret scanners.
pub const DEFAULT_ENV_PREFIXES: &[(&str, &str)] = &[("test", "kgtest")];
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
    metrics_listen: Option<SocketAddr>,
    env_prefixes: std::collections::BTreeMap<String, String>,
    max_event_subscribers: u64,
    max_concurrent_verifies: usize,
    header_read_timeout: Duration,
    request_body_timeout: Duration,
    webhooks: WebhookConfig,
    allow_internal_webhooks: bool,
    rotation: RotationPolicy,
    secret_scanning: Option<SecretScanning>,
    console: ConsoleConfig,
    /// The Redis URL and interval of the credit reconciler, if on.
    #[cfg(feature = "redis")]
    reconcile: Option<(String, Duration)>,
    #[cfg(feature = "redis")]
    redis_prefix: String,
}

impl std::fmt::Debug for KeyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyServer")
            .field("listen", &self.listen)
            .field("key_prefix", &self.key_prefix)
            .field("heartbeat", &self.heartbeat)
            .field("metrics_listen", &self.metrics_listen)
            .finish_non_exhaustive()
    }
}

impl KeyServer {
    /// Defaults: database `sqlite::memory:`, listen `127.0.0.1:7700`, key prefix `kg`
    /// (`kgtest` for environment `test`), heartbeat 15 s, event buffer 1 024 per
    /// subscriber, at most 1 000 event streams, header read timeout 10 s, request body
    /// timeout 30 s, [`AlertConfig::default`], [`RetentionConfig::default`], [`WebhookConfig::default`], no [`RotationPolicy`], metrics off,
    /// the admin console on under `/console` ([`ConsoleConfig::default`]),
    /// and no bootstrap token: a persistent database must hold an admin token, and on
    /// `sqlite::memory:` the tokens not given are generated (read them from
    /// [`RunningKeyServer`]).
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
            metrics_listen: None,
            env_prefixes: DEFAULT_ENV_PREFIXES.iter().map(|(e, p)| ((*e).to_owned(), (*p).to_owned())).collect(),
            max_event_subscribers: DEFAULT_MAX_EVENT_SUBSCRIBERS,
            max_concurrent_verifies: api::DEFAULT_MAX_CONCURRENT_VERIFIES,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            request_body_timeout: DEFAULT_REQUEST_BODY_TIMEOUT,
            webhooks: WebhookConfig::default(),
            allow_internal_webhooks: false,
            rotation: RotationPolicy::default(),
            secret_scanning: None,
            console: ConsoleConfig::default(),
            #[cfg(feature = "redis")]
            reconcile: None,
            #[cfg(feature = "redis")]
            redis_prefix: crate::meter::redis::schema::DEFAULT_PREFIX.to_owned(),
        }
    }

    /// Reconciles credits from the fleet-wide engine's counts in Redis at `redis_url`
    /// (`redis://[user:password@]host:port[/db]`, `rediss://` for TLS) into the store
    /// every `every` ([`DEFAULT_CREDITS_RECONCILE_INTERVAL`], 30 s, is the usual
    /// choice; default: off). Feature `redis`. Where Redis's count started from the
    /// credits' current revision, its remaining credits become the stored `remaining`
    /// (shown by the admin API with `credits_reconciled_at`); a count of an older
    /// revision is left alone. Not audited; counted in
    /// `keygate_server_credits_reconciled_total`. One replica reconciling is enough and
    /// several are harmless: each write holds only while the revision does. Redis
    /// unreachable is logged when it starts and ends, and the key service serves on.
    /// The URL is never logged.
    #[cfg(feature = "redis")]
    pub fn reconcile_credits(mut self, redis_url: impl Into<String>, every: Duration) -> Self {
        self.reconcile = Some((redis_url.into(), every));
        self
    }

    /// The prefix of the Redis keys the fleet-wide engine writes (default `keygate:`):
    /// the middlewares' `RedisLimits` prefix. Feature `redis`.
    #[cfg(feature = "redis")]
    pub fn redis_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.redis_prefix = prefix.into();
        self
    }

    /// The prefix of the keys of `environment` (`[a-z][a-z0-9]{0,15}`, like
    /// [`key_prefix`](Self::key_prefix)), replacing its default: by default `test` keys
    /// start `kgtest_` and every other environment's the key prefix (`kg_`). The
    /// middleware's default format check accepts any prefix.
    ///
    /// ```
    /// # use keygate::server::KeyServer;
    /// let server = KeyServer::builder().env_prefix("live", "acme").env_prefix("test", "acmetest");
    /// ```
    pub fn env_prefix(mut self, environment: impl Into<String>, prefix: impl Into<String>) -> Self {
        self.env_prefixes.insert(environment.into(), prefix.into());
        self
    }

    /// Forgets every environment's own prefix, the defaults included: every key gets
    /// the [`key_prefix`](Self::key_prefix).
    pub fn no_env_prefixes(mut self) -> Self {
        self.env_prefixes.clear();
        self
    }

    /// Most `GET /v1/events` streams served at once (default 1 000); past it, 503
    /// `too_many_subscribers` with `Retry-After`.
    pub fn max_event_subscribers(mut self, streams: u64) -> Self {
        self.max_event_subscribers = streams;
        self
    }

    /// Most `POST /v1/keys/verify` requests answered at once (default
    /// [`DEFAULT_MAX_CONCURRENT_VERIFIES`], 256); past it, 503 `overloaded` with
    /// `Retry-After: 1` at once instead of a queue that grows. A middleware's cache serves
    /// stale verdicts and its circuit breaker backs off meanwhile.
    pub fn max_concurrent_verifies(mut self, verifies: usize) -> Self {
        self.max_concurrent_verifies = verifies;
        self
    }

    /// How long a connection has to send a request's headers before it is closed
    /// (default 10 s). An idle keep-alive connection is closed after as long.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Longest wait for the next piece of a request body before the request fails
    /// (default 30 s).
    pub fn request_body_timeout(mut self, timeout: Duration) -> Self {
        self.request_body_timeout = timeout;
        self
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

    /// A bootstrap service token (verify, usage, events), at least [`MIN_TOKEN_LEN`]
    /// characters, accepted as the token named `bootstrap-service` besides the stored
    /// ones. See [Tokens](self#tokens).
    pub fn service_token(mut self, token: impl Into<String>) -> Self {
        self.service_token = Some(token.into());
        self
    }

    /// A bootstrap admin token, at least [`MIN_TOKEN_LEN`] characters, accepted as the
    /// token named `bootstrap-admin` (its audit actor) besides the stored ones.
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

    /// How long usage and the change log are kept and how often they are pruned
    /// (default [`RetentionConfig::default`]: minute rows 7 days, hour rows 90 days, the
    /// change log 24 hours and 100 000 rows, a pass every 5 minutes).
    pub fn retention(mut self, config: RetentionConfig) -> Self {
        self.retention = config;
        self
    }

    /// How long the change log keeps a change for resuming event streams (default 24
    /// hours; at least 1 second): a stream resuming from an older id gets `reset`. Sets
    /// [`RetentionConfig::change_log`].
    pub fn change_log_retention(mut self, keep: Duration) -> Self {
        self.retention.change_log = keep;
        self
    }

    /// Most rows the change log keeps (default 100 000, about 10 MB; at least 1). Sets
    /// [`RetentionConfig::change_log_rows`].
    pub fn change_log_max_rows(mut self, rows: u64) -> Self {
        self.retention.change_log_rows = rows;
        self
    }

    /// How webhooks are delivered (default [`WebhookConfig::default`]: retries for up
    /// to 24 hours or 20 attempts, 10 000 pending deliveries per endpoint).
    pub fn webhooks(mut self, config: WebhookConfig) -> Self {
        self.webhooks = config;
        self
    }

    /// Accepts and delivers to webhook URLs on internal addresses (default: refused).
    ///
    /// By default, against server-side request forgery (an admin token making the key
    /// service post to the network it runs in): `POST /v1/webhooks` answers 400
    /// `invalid_url` for a URL whose host is literally a loopback, private (RFC 1918,
    /// IPv6 unique local), link-local, unspecified, shared (`100.64.0.0/10`), broadcast
    /// or multicast address, or `localhost`; and at delivery the client connects only
    /// to the public addresses a name resolves to, so a name pointing at an internal
    /// address, or rebound to one after the endpoint was added (DNS rebinding), reaches
    /// nothing. The webhook client then ignores HTTP proxy settings (a proxy would make
    /// the check moot). Not covered: an internal service reachable at a public address,
    /// and NAT64 or 6to4 addresses embedding an internal IPv4 one.
    pub fn allow_internal_webhooks(mut self, allow: bool) -> Self {
        self.allow_internal_webhooks = allow;
        self
    }

    /// Takes leaked-key reports from GitHub's secret scanning partner program at
    /// `POST /v1/leaks/github` (default: off, the route answers 404). A report is
    /// accepted only with a valid signature from a key of the configured keys document;
    /// each reported token that is a key here is revoked (or disabled, see
    /// [`LeakAction`]) with an audit record whose actor is [`LEAK_ACTOR`] and a `leaked`
    /// alert. See the [`leaks`](self#leaked-keys-github-secret-scanning) section.
    pub fn secret_scanning(mut self, config: SecretScanning) -> Self {
        self.secret_scanning = Some(config);
        self
    }

    /// The maximum key age per environment or owner, and whether keys past it expire
    /// (default: no maximum). Keys are swept every [`AlertConfig::sweep_interval`].
    pub fn rotation_policy(mut self, policy: RotationPolicy) -> Self {
        self.rotation = policy;
        self
    }

    /// Serves Prometheus metrics at `GET /metrics` on this address of its own (port 0
    /// picks a free one; read it from [`RunningKeyServer::metrics_addr`]). Off by
    /// default. The page asks for no token: bind it to an address only the scraper
    /// reaches. The series are listed in the [module docs](self#metrics).
    ///
    /// With [`build`](Self::build) instead of [`start`](Self::start), setting it turns
    /// the recording on without listening: serve
    /// [`ServerState::render_metrics`] yourself.
    pub fn metrics_listen(mut self, addr: SocketAddr) -> Self {
        self.metrics_listen = Some(addr);
        self
    }

    /// The admin console in the browser (default: on, under `/console` on the key
    /// service's listener; [`ConsoleConfig::off`] turns it off, [`ConsoleConfig::listen`]
    /// moves it to an address of its own). Only [`start`](Self::start) serves it.
    pub fn console(mut self, config: ConsoleConfig) -> Self {
        self.console = config;
        self
    }

    /// The credit reconciler's settings, checked (the URL parsed, not connected to).
    #[cfg(feature = "redis")]
    fn reconcile_config(&mut self) -> Result<Option<reconcile::ReconcileConfig>, ServerError> {
        let Some((url, interval)) = self.reconcile.take() else { return Ok(None) };
        if interval.is_zero() {
            return Err(ServerError::Config("the credits reconcile interval must be above zero".into()));
        }
        let prefix = std::mem::take(&mut self.redis_prefix);
        if prefix.len() > 128 || prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ServerError::Config(
                "the Redis prefix must be at most 128 bytes, without spaces or control characters".into(),
            ));
        }
        // The parser's message, never the URL: it may hold a password.
        let client = redis::Client::open(url.as_str())
            .map_err(|e| ServerError::Config(format!("the Redis URL is not one ({})", e.category())))?;
        Ok(Some(reconcile::ReconcileConfig { client, prefix, interval }))
    }

    /// The configured tokens, checked.
    fn configured_tokens(&mut self) -> Result<(Option<String>, Option<String>), ServerError> {
        let service = self.service_token.take();
        let admin = self.admin_token.take();
        for (what, t) in [("the service token", &service), ("the admin token", &admin)] {
            if let Some(t) = t {
                token::check_configured(what, t).map_err(ServerError::Config)?;
            }
        }
        if service.is_some() && service == admin {
            return Err(ServerError::Config("the service and admin tokens must differ".into()));
        }
        Ok((service, admin))
    }

    /// Opens the store and builds the shared state, without listening: for embedding
    /// [`router`] into another server. Returns the state and the bootstrap (service,
    /// admin) tokens: those configured, or on `sqlite::memory:`, generated for those
    /// not configured.
    ///
    /// Fails with [`ServerError::NoAdminToken`] on a persistent database that holds no
    /// active admin token when none is configured.
    pub async fn build(mut self) -> Result<(ServerState, Option<String>, Option<String>), ServerError> {
        crate::key::validate_prefix(&self.key_prefix)
            .map_err(|e| ServerError::Config(format!("key prefix `{}`: {e}", self.key_prefix)))?;
        self.retention.validate().map_err(ServerError::Config)?;
        for (env, prefix) in &self.env_prefixes {
            validate::validate_environment(env)
                .map_err(|e| ServerError::Config(format!("environment `{env}` of a key prefix: {e}")))?;
            crate::key::validate_prefix(prefix)
                .map_err(|e| ServerError::Config(format!("key prefix `{prefix}` of environment `{env}`: {e}")))?;
        }
        if self.max_concurrent_verifies == 0 || self.max_concurrent_verifies > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(ServerError::Config("max_concurrent_verifies must be at least 1".into()));
        }
        if self.max_event_subscribers == 0 {
            return Err(ServerError::Config("the event subscriber cap must be at least 1".into()));
        }
        if self.header_read_timeout.is_zero() || self.request_body_timeout.is_zero() {
            return Err(ServerError::Config("the header read and request body timeouts must be above zero".into()));
        }
        self.webhooks.validate().map_err(ServerError::Config)?;
        self.rotation.validate().map_err(ServerError::Config)?;
        self.console.validate().map_err(ServerError::Config)?;
        #[cfg(feature = "redis")]
        let reconcile = self.reconcile_config()?;
        let (mut service, mut admin) = self.configured_tokens()?;
        let store = match self.store.take() {
            Some(s) => s,
            None => open_store(&self.database).await?,
        };
        // Generated tokens die with the process: only where the data does too.
        if store.is_ephemeral() {
            let generate =
                |kind| token::generate(kind, "", store::now_ms()).map(|(t, _)| t).map_err(ServerError::Config);
            if service.is_none() {
                service = Some(generate(TokenKind::Service)?);
            }
            if admin.is_none() {
                admin = Some(generate(TokenKind::Admin)?);
            }
        }
        tracing::debug!(
            key_prefix = %self.key_prefix,
            heartbeat = ?self.heartbeat,
            event_buffer = self.event_buffer,
            "key service configured"
        );
        let mut bootstrap = Vec::new();
        if let Some(t) = &service {
            bootstrap.push((TokenKind::Service, t.as_str()));
        }
        if let Some(t) = &admin {
            bootstrap.push((TokenKind::Admin, t.as_str()));
        }
        let tokens = Arc::new(auth::TokenTable::new(&bootstrap));
        tokens.reload(&store).await?;
        if !tokens.has_admin() {
            return Err(ServerError::NoAdminToken);
        }
        let hub = EventHub::with_max_subscribers(self.event_buffer, self.heartbeat, self.max_event_subscribers);
        // Streams start after what the log holds already; the feed catches up from here.
        hub.advance_to(store.change_log_bounds().await?.newest);
        let meters = Arc::new(if self.metrics_listen.is_some() { meters::Meters::on() } else { meters::Meters::off() });
        let store = store
            .reporting_to(Arc::new(auth::Sink { hub: hub.clone(), tokens: Arc::clone(&tokens) }))
            .metered_by(Arc::clone(&meters))
            .with_webhook_queue(self.webhooks.max_pending);
        let feed = store.follow_changes();
        if let Some(feed) = &feed {
            // Serving before the feed listens would let another replica's change slip by
            // unnoticed; a feed that is late publishes `reset` when it connects.
            if !feed.wait_connected(FEED_START_WAIT).await {
                tracing::warn!("the feed of other replicas' changes is not connected yet; starting anyway");
            }
        }
        // A token change made before the feed listened is not missed.
        tokens.reload(&store).await?;
        let token_task = auth::TokenTask::spawn(Arc::clone(&tokens), store.clone());
        let retention_counters = Arc::new(retention::RetentionCounters::default());
        let retention_task = self.retention.enabled.then(|| {
            retention::RetentionTask::spawn(store.clone(), self.retention.clone(), Arc::clone(&retention_counters))
        });
        let webhook_counters = Arc::new(webhooks::WebhookCounters::default());
        let webhook_worker = if self.webhooks.enabled {
            let worker = webhooks::WebhookWorker::spawn(
                store.clone(),
                self.webhooks.clone(),
                Arc::clone(&webhook_counters),
                self.allow_internal_webhooks,
            )
            .map_err(|e| ServerError::Config(format!("webhook HTTP client: {e}")))?;
            Some(worker)
        } else {
            None
        };
        let leaks = match self.secret_scanning.take() {
            Some(config) => Some(leaks::Leaks::new(config).map_err(ServerError::Config)?),
            None => None,
        };
        let sweep_counters = Arc::new(policy::SweepCounters::default());
        let sweep_task = policy::SweepTask::spawn(
            store.clone(),
            self.alerts.clone(),
            self.rotation.clone(),
            Arc::clone(&sweep_counters),
        );
        let reconcile_counters = Arc::new(reconcile::ReconcileCounters::default());
        #[cfg(feature = "redis")]
        let reconcile_task =
            reconcile.map(|c| reconcile::ReconcileTask::spawn(store.clone(), c, Arc::clone(&reconcile_counters)));
        #[cfg(feature = "redis")]
        let reconciling = reconcile_task.is_some();
        #[cfg(not(feature = "redis"))]
        let reconciling = false;
        let state = ServerState {
            inner: Arc::new(state::StateInner {
                store,
                tokens,
                _token_task: Some(token_task),
                hub,
                stats: state::Stats::default(),
                alerts: self.alerts.clone(),
                key_prefix: self.key_prefix.clone(),
                env_prefixes: std::mem::take(&mut self.env_prefixes),
                feed,
                retention: self.retention.clone(),
                retention_counters,
                _retention_task: retention_task,
                meters,
                webhook_counters,
                verify_slots: tokio::sync::Semaphore::new(self.max_concurrent_verifies),
                allow_internal_webhooks: self.allow_internal_webhooks,
                leaks,
                _webhook_worker: webhook_worker,
                sweep_counters,
                _sweep_task: sweep_task,
                reconcile_counters,
                reconciling,
                #[cfg(feature = "redis")]
                _reconcile_task: reconcile_task,
            }),
        };
        Ok((state, service, admin))
    }

    /// Opens the store, runs migrations, binds and starts serving in the background.
    pub async fn start(self) -> Result<RunningKeyServer, ServerError> {
        let listen = self.listen;
        let metrics_listen = self.metrics_listen;
        let timeouts = (self.header_read_timeout, self.request_body_timeout);
        let console_config = self.console.clone();
        let (state, service_token, admin_token) = self.build().await?;
        let listener =
            tokio::net::TcpListener::bind(listen).await.map_err(|source| ServerError::Bind { addr: listen, source })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: listen, source })?;
        let metrics = match metrics_listen {
            Some(at) => Some(serve_metrics(at, state.clone(), timeouts.0).await?),
            None => None,
        };
        let mut app = router(state.clone());
        let mut console_served = None;
        if console_config.enabled {
            let pages = console::router(state.clone(), &console_config);
            match console_config.listen {
                None => app = app.merge(pages),
                Some(at) => console_served = Some(serve_console(at, pages, timeouts).await?),
            }
        }
        let app = app
            .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(timeouts.1))
            .layer(tower_http::trace::TraceLayer::new_for_http());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let hub = state.inner.hub.clone();
        let task = tokio::spawn(async move {
            let stop = async move {
                let _ = stop_rx.await;
                // Event streams never end on their own: end them so that the graceful
                // shutdown does not wait for them.
                hub.disconnect_all();
            };
            serve::serve(listener, app, timeouts.0, stop).await;
        });
        tracing::info!(%addr, "key service listening");
        let (metrics_addr, metrics_task) = metrics.unzip();
        let (console_addr, console_task) = console_served.unzip();
        Ok(RunningKeyServer {
            addr,
            state,
            stop: Some(stop_tx),
            task: Some(task),
            service_token,
            admin_token,
            metrics_addr,
            metrics_task,
            console_addr,
            console_task,
        })
    }
}

/// Binds the metrics listener and serves `/metrics` on it until aborted (a scrape is
/// short: nothing to drain).
async fn serve_metrics(
    at: SocketAddr,
    state: ServerState,
    header_read_timeout: Duration,
) -> Result<(SocketAddr, JoinHandle<()>), ServerError> {
    let listener = tokio::net::TcpListener::bind(at).await.map_err(|source| ServerError::Bind { addr: at, source })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: at, source })?;
    let app = metrics::exposition(state);
    // The same header-read timeout as the API listener: a scraper's address is no
    // reason to let half-sent requests hold connections. It stops when its task is
    // aborted, at shutdown.
    let task = tokio::spawn(serve::serve(listener, app, header_read_timeout, std::future::pending()));
    tracing::info!(%addr, "metrics listening");
    Ok((addr, task))
}

/// Binds the console's own listener and serves its pages on it until aborted.
async fn serve_console(
    at: SocketAddr,
    pages: axum::Router,
    (header_read_timeout, body_timeout): (Duration, Duration),
) -> Result<(SocketAddr, JoinHandle<()>), ServerError> {
    let listener = tokio::net::TcpListener::bind(at).await.map_err(|source| ServerError::Bind { addr: at, source })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: at, source })?;
    let app = pages
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(body_timeout))
        .layer(tower_http::trace::TraceLayer::new_for_http());
    let task = tokio::spawn(serve::serve(listener, app, header_read_timeout, std::future::pending()));
    tracing::info!(%addr, "console listening");
    Ok((addr, task))
}

/// A key service serving in the background. Dropping it starts a graceful shutdown;
/// [`shutdown`](Self::shutdown) also waits for it.
pub struct RunningKeyServer {
    addr: SocketAddr,
    state: ServerState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    service_token: Option<String>,
    admin_token: Option<String>,
    metrics_addr: Option<SocketAddr>,
    metrics_task: Option<JoinHandle<()>>,
    console_addr: Option<SocketAddr>,
    console_task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningKeyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningKeyServer")
            .field("addr", &self.addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
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

    /// The bound address of `GET /metrics`, when
    /// [`metrics_listen`](KeyServer::metrics_listen) was set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound address of the console's own listener, when
    /// [`ConsoleConfig::listen`] was set (otherwise the console is at [`url`](Self::url)`/console`).
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console_addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ServerStats {
        self.state.stats()
    }

    /// The shared state (store, event hub).
    pub fn state(&self) -> &ServerState {
        &self.state
    }

    /// The bootstrap service token (configured, or generated on `sqlite::memory:`);
    /// `None` when the service tokens are all stored ones.
    pub fn service_token(&self) -> Option<&str> {
        self.service_token.as_deref()
    }

    /// The bootstrap admin token (configured, or generated on `sqlite::memory:`);
    /// `None` when the admin tokens are all stored ones.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
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
    /// (for up to 10 s), writes when tokens were last used, and returns. (Dropping the
    /// server instead loses up to 30 s of `last_used_at`.)
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(metrics) = self.metrics_task.take() {
            metrics.abort();
        }
        if let Some(console) = self.console_task.take() {
            console.abort();
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(10), &mut task).await.is_err() {
                tracing::warn!("graceful shutdown timed out; aborting open connections");
                task.abort();
            }
        }
        let inner = &self.state.inner;
        if let Err(e) = inner.tokens.flush_uses(&inner.store).await {
            tracing::warn!(error = %e, "cannot write when tokens were last used");
        }
        tracing::info!(addr = %self.addr, "key service stopped");
    }
}

impl Drop for RunningKeyServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(metrics) = self.metrics_task.take() {
            metrics.abort();
        }
        if let Some(console) = self.console_task.take() {
            console.abort();
        }
    }
}

/// The accept loop: `axum::serve` cannot bound the time a client takes to send its
/// headers, so connections are served by hyper's HTTP/1 builder with a timer.
mod serve {
    use std::future::Future;
    use std::time::Duration;

    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    /// Serves `app` on `listener` until `stop` completes, then stops accepting and waits
    /// for the open connections to finish their requests.
    pub(super) async fn serve(
        listener: tokio::net::TcpListener,
        app: axum::Router,
        header_read_timeout: Duration,
        stop: impl Future<Output = ()>,
    ) {
        let graceful = GracefulShutdown::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
        tokio::pin!(stop);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut stop => break,
            };
            let _ = stream.set_nodelay(true);
            // The peer's address, for handlers that need it (the console's sign-in limit).
            let app = tower_layer::Layer::layer(&axum::Extension(axum::extract::ConnectInfo(peer)), app.clone());
            let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        graceful.shutdown().await;
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
