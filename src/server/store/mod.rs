//! Storage: [`Store`], an enum over the backends (SQLite, and PostgreSQL with feature
//! `postgres`), chosen at run time from the database URL, so that the HTTP layer never
//! knows which one it talks to.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::key::KeyDigest;
use crate::principal::RateLimit;
use crate::quota::{Credits, Limit};

use super::events::{ChangeNote, KeyEvent, MAX_EVENTS_PER_CHANGE};
use super::meters::Meters;
use super::model::{Alert, AuditRecord, KeyInfo, KeyPatch, RoleInfo, UsageBucket};
use super::text::rfc3339;

pub(crate) mod changelog;
mod feed;
#[cfg(feature = "postgres")]
mod postgres;
mod queries;
mod rows;
mod sqlite;
mod usage;
mod webhooks;
pub(crate) use changelog::LogBounds;
pub use changelog::{DEFAULT_CHANGE_LOG_MAX_ROWS, DEFAULT_CHANGE_LOG_RETENTION};
pub(crate) use feed::ChangeFeed;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
pub(crate) use rows::bucket_from;
pub use sqlite::SqliteStore;
pub use usage::RetentionReport;
pub(crate) use usage::{
    Applied, BatchMark, ChangeLogCutoff, KeyUsage, OwnerUsage, ReadKind, ReadRow, RetentionCutoffs, Tally, UsageDelta,
    UsageKey, UsageOf, UsageRead,
};
pub(crate) use webhooks::{Attempt, AttemptNext, Claimed, NewEndpoint, Target, WebhookEvent};
pub(crate) use webhooks::{WebhookDelivery, WebhookEndpoint};

/// Audit action names.
pub(crate) mod action {
    /// A key was created.
    pub(crate) const KEY_CREATE: &str = "key.create";
    /// A key was changed with `PATCH`.
    pub(crate) const KEY_UPDATE: &str = "key.update";
    /// A key got a new secret.
    pub(crate) const KEY_ROTATE: &str = "key.rotate";
    /// A key was revoked.
    pub(crate) const KEY_REVOKE: &str = "key.revoke";
    /// A role was created or replaced.
    pub(crate) const ROLE_PUT: &str = "role.put";
    /// A role was deleted.
    pub(crate) const ROLE_DELETE: &str = "role.delete";
    /// An alert was acknowledged.
    pub(crate) const ALERT_ACK: &str = "alert.ack";
    /// A webhook endpoint was added.
    pub(crate) const WEBHOOK_CREATE: &str = "webhook.create";
    /// A webhook endpoint was removed.
    pub(crate) const WEBHOOK_DELETE: &str = "webhook.delete";
}

/// What a store can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The key or role does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change is not allowed in the key's current state.
    #[error("{0}")]
    Conflict(String),
    /// The database cannot be reached (pool timeout, I/O).
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// The database refused a statement.
    #[error("database: {0}")]
    Database(sqlx::Error),
    /// A stored value could not be read back.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The database is not set up as the store needs (no schema to create tables in, ...).
    #[error("database configuration: {0}")]
    Config(String),
    /// Migrating the schema failed.
    #[error("migration: {0}")]
    Migration(sqlx::migrate::MigrateError),
}

impl StoreError {
    /// The `kind` label of `keygate_server_store_errors_total`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Unavailable(_) => "unavailable",
            Self::Database(_) => "database",
            Self::Corrupt(_) => "corrupt",
            Self::Config(_) => "config",
            Self::Migration(_) => "migration",
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => Self::Unavailable(e),
            e => Self::Database(e),
        }
    }
}

/// A key to insert: everything but the raw secret.
#[derive(Debug, Clone)]
pub(crate) struct NewKeyRecord {
    /// The key's id.
    pub(crate) key_id: String,
    /// The secret's first characters.
    pub(crate) secret: NewSecret,
    /// Owner.
    pub(crate) owner: String,
    /// Name.
    pub(crate) name: String,
    /// Validated, sorted scopes.
    pub(crate) scopes: Vec<String>,
    /// Validated, sorted roles.
    pub(crate) roles: Vec<String>,
    /// Environment.
    pub(crate) environment: String,
    /// Expiry.
    pub(crate) expires_at: Option<OffsetDateTime>,
    /// Metadata object.
    pub(crate) meta: Value,
    /// Validated named limits (the `requests` one is also `ratelimit`).
    pub(crate) limits: Vec<Limit>,
    /// Validated credits.
    pub(crate) credits: Option<Credits>,
    /// Validated, canonical network allowlist.
    pub(crate) allowed_networks: Vec<String>,
    /// Creation time.
    pub(crate) created_at: OffsetDateTime,
}

/// A secret to store: its digest and display prefix, never the secret.
#[derive(Debug, Clone)]
pub(crate) struct NewSecret {
    /// SHA-256 of the key.
    pub(crate) digest: KeyDigest,
    /// `kg_3fA9`.
    pub(crate) key_prefix: String,
}

/// What [`Store::find_by_digest`] found.
#[derive(Debug, Clone)]
pub struct Found {
    /// The key the secret belongs to.
    pub key: KeyInfo,
    /// Set on a secret replaced by rotation: the end of its grace.
    pub secret_expires_at: Option<OffsetDateTime>,
    /// The scopes of the key's roles that exist (duplicates possible).
    pub role_scopes: Vec<String>,
    /// The owner's limits, shared by all of its keys.
    pub owner_limits: Vec<Limit>,
    /// The owner's credits, shared by all of its keys.
    pub owner_credits: Option<Credits>,
    /// Which setting of the owner's credits `owner_credits` holds.
    pub owner_credits_revision: Option<u64>,
    /// The owner's network allowlist.
    pub owner_allowed_networks: Vec<String>,
}

/// Whether a client network was new for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NetworkSeen {
    /// Seen before.
    Known,
    /// The first network this key was ever seen from.
    First,
    /// New, and the key had been used from other networks before.
    New,
}

/// Where a store reports the changes it committed (the key service's event hub).
pub(crate) trait ChangeSink: fmt::Debug + Send + Sync + 'static {
    /// Hands over one committed change, with its change log id if it is logged. Logged
    /// changes come in the order of their ids; one at or below an id handed over before
    /// is a duplicate (a feed catching up from the log) and is skipped.
    fn publish(&self, note: &ChangeNote, id: Option<u64>);

    /// The newest change log id handed over (0 for none): where a feed catches up from.
    fn position(&self) -> u64 {
        0
    }

    /// Moves the position up to `id` without handing anything over (after a `reset`
    /// that covers what lies before it).
    fn skip_to(&self, _id: u64) {}
}

/// The sink of a store no key service has attached to.
#[derive(Debug)]
struct Unheard;

impl ChangeSink for Unheard {
    fn publish(&self, _: &ChangeNote, _: Option<u64>) {}
}

/// The storage a key service runs on: [`SqliteStore`], or [`PostgresStore`] with
/// feature `postgres` (`From` either). Cheap to clone: clones share the pool.
///
/// Each method is written once here; the backends supply
/// only what differs: how a write transaction begins and commits, locks, usage upserts,
/// migrations and the feed of other replicas' changes.
///
/// Every method that changes a key or a role writes its audit record in the same
/// transaction as the change: either both are stored or neither is. The notes a change
/// makes for event subscribers are decided here, committed with it (PostgreSQL sends
/// them to the other replicas with `NOTIFY` in the transaction) and then handed to the
/// store's change sink (the event hub): the one place the key service publishes.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    sink: Arc<dyn ChangeSink>,
    meters: Arc<Meters>,
    /// Most pending webhook deliveries per endpoint (see `with_webhook_queue`).
    webhook_queue: u32,
}

/// Default of the most pending webhook deliveries per endpoint.
pub(crate) const DEFAULT_WEBHOOK_QUEUE: u32 = 10_000;

#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqliteStore),
    #[cfg(feature = "postgres")]
    Postgres(PostgresStore),
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("backend", &self.backend).finish_non_exhaustive()
    }
}

impl From<SqliteStore> for Store {
    fn from(store: SqliteStore) -> Self {
        Self {
            backend: Backend::Sqlite(store),
            sink: Arc::new(Unheard),
            meters: Arc::new(Meters::off()),
            webhook_queue: DEFAULT_WEBHOOK_QUEUE,
        }
    }
}

#[cfg(feature = "postgres")]
impl From<PostgresStore> for Store {
    fn from(store: PostgresStore) -> Self {
        Self {
            backend: Backend::Postgres(store),
            sink: Arc::new(Unheard),
            meters: Arc::new(Meters::off()),
            webhook_queue: DEFAULT_WEBHOOK_QUEUE,
        }
    }
}

/// `$body` once per backend, with `$b` the backend and (optionally) `$q` its module of
/// shared queries.
macro_rules! each_backend {
    ($store:expr, $b:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite($b) => $body,
            #[cfg(feature = "postgres")]
            Backend::Postgres($b) => $body,
        }
    };
    ($store:expr, $b:ident, $q:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite($b) => {
                use sqlite::shared as $q;
                $body
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres($b) => {
                use postgres::shared as $q;
                $body
            }
        }
    };
    ($store:expr, $b:ident, $q:ident, $w:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite($b) => {
                #[allow(unused_imports)]
                use sqlite::shared as $q;
                use sqlite::webhook_sql as $w;
                $body
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres($b) => {
                #[allow(unused_imports)]
                use postgres::shared as $q;
                use postgres::webhook_sql as $w;
                $body
            }
        }
    };
}

/// `$body` once per backend, with `$c` its module of change log statements.
macro_rules! each_log_backend {
    ($store:expr, $b:ident, $c:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite($b) => {
                use sqlite::change_log_sql as $c;
                $body
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres($b) => {
                use postgres::change_log_sql as $c;
                $body
            }
        }
    };
}

/// A write: `$body`, in a write transaction `$tx` of the backend with its queries `$q`,
/// returns the value and the notes it made; the notes are logged (those that change
/// verdicts) and committed with the change, then go to the sink.
macro_rules! write_tx {
    ($store:expr, |$tx:ident, $q:ident| $body:expr) => {{
        let value = each_backend!($store, b, $q => {
            let mut $tx = b.write().await?;
            let (value, notes): (_, Vec<ChangeNote>) = $body;
            b.commit($tx, &notes, &*$store.sink).await?;
            value
        });
        Ok(value)
    }};
    ($store:expr, |$tx:ident, $q:ident, $w:ident| $body:expr) => {{
        let value = each_backend!($store, b, $q, $w => {
            let mut $tx = b.write().await?;
            let (value, notes): (_, Vec<ChangeNote>) = $body;
            b.commit($tx, &notes, &*$store.sink).await?;
            value
        });
        Ok(value)
    }};
}

// ---- tokens (issue 14): the `tokens` table, in `tokens.rs`; declared after the macros
// above, which it uses.
mod tokens;
pub(crate) use tokens::{ActiveToken, Revoked, token_queries};

// ---- owners and limits (issue 16), in `owners.rs`.
pub(crate) mod owners;

// ---- the credit reconciler's reads and writes (issue 16), in `credits.rs`.
#[cfg(feature = "redis")]
pub(crate) mod credits;

impl Store {
    /// Reports every change this store commits to `sink` from now on.
    #[must_use]
    pub(crate) fn reporting_to(mut self, sink: Arc<dyn ChangeSink>) -> Self {
        self.sink = sink;
        self
    }

    /// Times every operation (and counts its failures) in `meters` from now on.
    #[must_use]
    pub(crate) fn metered_by(mut self, meters: Arc<Meters>) -> Self {
        self.meters = meters;
        self
    }

    /// Runs one operation, timing it as `op` (a fixed name: the `op` label).
    async fn metered<T>(
        &self,
        op: &'static str,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if !self.meters.is_on() {
            return work.await;
        }
        let started = Instant::now();
        let result = work.await;
        self.meters.store_op(op, started.elapsed(), result.as_ref().err().map(StoreError::kind));
        result
    }

    /// The change log's oldest and newest ids.
    pub(crate) async fn change_log_bounds(&self) -> Result<LogBounds, StoreError> {
        self.metered("change_log_bounds", async { each_log_backend!(self, b, c => c::bounds(b.pool()).await) }).await
    }

    /// Up to [`changelog::PAGE_ROWS`] logged changes with ids above `after`, oldest first.
    pub(crate) async fn changes_after(&self, after: u64) -> Result<Vec<(u64, ChangeNote)>, StoreError> {
        self.metered("changes_after", async {
            each_log_backend!(self, b, c => c::after(b.pool(), after, changelog::PAGE_ROWS).await)
        })
        .await
    }

    /// Checks the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.metered("ping", async {
            each_backend!(self, b => sqlx::query("SELECT 1").execute(b.pool()).await.map(drop)?);
            Ok(())
        })
        .await
    }

    /// Inserts a key, its secret and the `key.create` audit record.
    pub(crate) async fn create_key(&self, key: &NewKeyRecord, actor: &str) -> Result<KeyInfo, StoreError> {
        self.metered("create_key", async {
            write_tx!(self, |tx, q, w| {
                let info = q::create_key(&mut tx, key, actor).await?;
                let event = WebhookEvent::new("key.created", key.created_at, key_event_data(&info, actor))?;
                w::enqueue(&mut tx, &[event], self.webhook_queue).await?;
                (info, Vec::new())
            })
        })
        .await
    }

    /// One key by id.
    pub async fn get_key(&self, key_id: &str) -> Result<Option<KeyInfo>, StoreError> {
        self.metered("get_key", async { each_backend!(self, b, q => q::get_key(b.pool(), key_id).await) }).await
    }

    /// Keys, oldest first, optionally of one owner, at most `limit`.
    pub async fn list_keys(&self, owner: Option<&str>, limit: u32) -> Result<Vec<KeyInfo>, StoreError> {
        self.metered("list_keys", async { each_backend!(self, b, q => q::list_keys(b.pool(), owner, limit).await) })
            .await
    }

    /// One page of at most `limit` keys in `filter.sort` (by default oldest first:
    /// creation time, then key id), narrowed by `filter`, starting after `filter.after`
    /// (the cursor of the last key of the page before, in the same order): pages over
    /// any number of keys, each key once (in an order by last use, a key used meanwhile
    /// moves).
    pub async fn page_keys(&self, filter: &KeyFilter, limit: u32) -> Result<Vec<KeyInfo>, StoreError> {
        let now = now_ms_i64();
        self.metered("page_keys", async {
            each_backend!(self, b, q => q::page_keys(b.pool(), filter, now, limit).await)
        })
        .await
    }

    /// Applies a validated patch and writes `key.update`. A revoked key is a conflict.
    pub(crate) async fn update_key(
        &self,
        key_id: &str,
        patch: &KeyPatch,
        actor: &str,
        at: OffsetDateTime,
    ) -> Result<KeyInfo, StoreError> {
        self.change_key(key_id, KeyChange::Update(patch), actor, at, None).await
    }

    /// Makes `secret` the key's current secret; the previous ones stop at `grace_until`
    /// at the latest. Writes `key.rotate`.
    pub(crate) async fn rotate_key(
        &self,
        key_id: &str,
        secret: &NewSecret,
        grace_until: OffsetDateTime,
        actor: &str,
        at: OffsetDateTime,
    ) -> Result<KeyInfo, StoreError> {
        self.change_key(key_id, KeyChange::Rotate { secret, grace_until }, actor, at, None).await
    }

    /// Revokes a key for good and writes `key.revoke`.
    pub(crate) async fn revoke_key(
        &self,
        key_id: &str,
        actor: &str,
        at: OffsetDateTime,
    ) -> Result<KeyInfo, StoreError> {
        self.change_key(key_id, KeyChange::Revoke, actor, at, None).await
    }

    /// Revokes (or, with `disable`, disables) a key reported leaked; `report` (where it
    /// was found) goes into the audit record's `changes` as `report`.
    pub(crate) async fn leaked(
        &self,
        key_id: &str,
        disable: bool,
        actor: &str,
        at: OffsetDateTime,
        report: &Value,
    ) -> Result<KeyInfo, StoreError> {
        let patch = KeyPatch { disabled: Some(true), ..KeyPatch::default() };
        let change = if disable { KeyChange::Update(&patch) } else { KeyChange::Revoke };
        self.change_key(key_id, change, actor, at, Some(report)).await
    }

    async fn change_key(
        &self,
        key_id: &str,
        change: KeyChange<'_>,
        actor: &str,
        at: OffsetDateTime,
        report: Option<&Value>,
    ) -> Result<KeyInfo, StoreError> {
        self.metered("change_key", async {
            write_tx!(self, |tx, q, w| {
                // Under the row lock: of two patches at once, the second sees the first's
                // result, so each change is one event.
                let before = match &change {
                    KeyChange::Update(_) => q::key_locked(&mut tx, key_id).await?,
                    _ => None,
                };
                let key = q::change_key(&mut tx, key_id, &change, actor, at, report).await?;
                let events = webhook_events_of(&change, &key, before.as_ref(), actor, at)?;
                w::enqueue(&mut tx, &events, self.webhook_queue).await?;
                let note = ChangeNote::Key(change.event(), key.key_id.clone());
                (key, vec![note])
            })
        })
        .await
    }

    /// Creates or replaces a role and writes `role.put`. Returns the role and how many
    /// unrevoked keys hold it (their effective scopes changed: each is `updated`, or
    /// all are `reset` above [`MAX_EVENTS_PER_CHANGE`]).
    pub(crate) async fn put_role(
        &self,
        name: &str,
        scopes: &[String],
        actor: &str,
        at: OffsetDateTime,
    ) -> Result<(RoleInfo, usize), StoreError> {
        self.metered("put_role", async {
            write_tx!(self, |tx, q| {
                let (role, affected) = q::put_role(&mut tx, name, scopes, actor, at).await?;
                ((role, affected.len()), notes_for_keys(KeyEvent::Updated, affected))
            })
        })
        .await
    }

    /// All roles, by name.
    pub async fn list_roles(&self) -> Result<Vec<RoleInfo>, StoreError> {
        self.metered("list_roles", async { each_backend!(self, b, q => q::list_roles(b.pool()).await) }).await
    }

    /// The key holding the secret with this digest: an index lookup, never a scan.
    pub async fn find_by_digest(&self, digest: &KeyDigest) -> Result<Option<Found>, StoreError> {
        self.metered("find_by_digest", async { each_backend!(self, b, q => q::find_by_digest(b.pool(), digest).await) })
            .await
    }

    /// The keys holding the secrets with these digests, in one query (an index lookup per
    /// digest): each found digest once, in no particular order; digests of no key are
    /// left out.
    pub async fn find_by_digests(&self, digests: &[KeyDigest]) -> Result<Vec<(KeyDigest, Found)>, StoreError> {
        self.metered("find_by_digests", async {
            each_backend!(self, b, q => q::find_by_digests(b.pool(), digests).await)
        })
        .await
    }

    /// Audit records, oldest first: from `since` on, or the newest `limit` without it.
    pub async fn audit(&self, since: Option<OffsetDateTime>, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        self.metered("audit", async { each_backend!(self, b, q => q::audit(b.pool(), since, limit).await) }).await
    }

    /// One page of at most `limit` audit records narrowed by `filter`, newest first,
    /// each with its id (the order records were written): the newest, those older than
    /// a record, or the oldest of those newer than one.
    pub(crate) async fn audit_page(
        &self,
        filter: &AuditFilter,
        at: AuditPage,
        limit: u32,
    ) -> Result<Vec<(i64, AuditRecord)>, StoreError> {
        self.metered("audit_page", async {
            each_backend!(self, b, q => q::audit_page(b.pool(), filter, at, limit).await)
        })
        .await
    }

    /// Which of these key ids belong to keys of this store.
    pub(crate) async fn known_keys(&self, ids: &[&str]) -> Result<std::collections::HashSet<String>, StoreError> {
        self.metered("known_keys", async { each_backend!(self, b, q => q::known_keys(b.pool(), ids).await) }).await
    }

    /// Stores a usage batch in one transaction, marking its batch id applied in the
    /// same transaction when it has one; a batch id applied before adds nothing.
    pub(crate) async fn record_usage(
        &self,
        batch: Option<BatchMark<'_>>,
        delta: &UsageDelta,
    ) -> Result<Applied, StoreError> {
        self.metered("record_usage", async { each_backend!(self, b => b.record_usage(batch, delta).await) }).await
    }

    /// Streams the usage rows `read` selects into `each`; returns how many it read (one
    /// more than `read.max_rows` when there are more).
    pub(crate) async fn read_usage(
        &self,
        read: &UsageRead<'_>,
        mut each: impl FnMut(ReadRow) -> Result<(), StoreError> + Send,
    ) -> Result<u64, StoreError> {
        self.metered("read_usage", async {
            each_backend!(self, b, q => q::read_usage(b.pool(), read, &mut each).await)
        })
        .await
    }

    /// `owner`'s usage with `at` in `[from, to)` (Unix seconds): its `limit` busiest
    /// and most denied keys, and the sums over all of them. Three statements, not one
    /// snapshot: traffic stored meanwhile may be in one part and not another.
    pub(crate) async fn owner_usage(
        &self,
        owner: &str,
        from: i64,
        to: i64,
        limit: u32,
    ) -> Result<OwnerUsage, StoreError> {
        self.metered("owner_usage", async {
            each_backend!(self, b, q => {
                let top_requests = q::top_keys(b.pool(), owner, from, to, false, limit).await?;
                let top_denied = q::top_keys(b.pool(), owner, from, to, true, limit).await?;
                let (total, keys_used) = q::owner_total(b.pool(), owner, from, to).await?;
                Ok(OwnerUsage { top_requests, top_denied, total, keys_used })
            })
        })
        .await
    }

    /// The owners of keys, by name, at most `limit`.
    pub(crate) async fn key_owners(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        self.metered("key_owners", async { each_backend!(self, b, q => q::key_owners(b.pool(), limit).await) }).await
    }

    /// A key's minutes in `[since, since + limit minutes)`, oldest first: what the
    /// alerts compare a minute with. Minutes rolled up into hours are not in it.
    pub async fn usage(&self, key_id: &str, since: OffsetDateTime, limit: u32) -> Result<Vec<UsageBucket>, StoreError> {
        let from = since.unix_timestamp() - since.unix_timestamp().rem_euclid(60);
        let read = UsageRead {
            of: UsageOf::Key(key_id),
            kind: ReadKind::Minutes,
            from,
            to: from.saturating_add(i64::from(limit) * 60),
            max_rows: u64::from(limit),
        };
        let mut minutes = std::collections::BTreeMap::<i64, Tally>::new();
        self.read_usage(&read, |row| {
            minutes.entry(row.at).or_default().merge(&row.tally);
            Ok(())
        })
        .await?;
        minutes.iter().map(|(at, tally)| rows::bucket_from(*at, None, tally)).collect()
    }

    /// One retention pass: rolls minute rows up into hour rows, deletes hour rows and
    /// batch ids past their time, in transactions of bounded size.
    pub(crate) async fn retention_pass(&self, cut: &RetentionCutoffs) -> Result<RetentionReport, StoreError> {
        self.metered("retention_pass", self.retention_pass_unmetered(cut)).await
    }

    async fn retention_pass_unmetered(&self, cut: &RetentionCutoffs) -> Result<RetentionReport, StoreError> {
        let mut report = RetentionReport::default();
        let per_tx = u64::from(cut.rows_per_transaction);
        for _ in 0..cut.max_transactions {
            let n = each_backend!(self, b => b.roll_up(cut.minutes_before, cut.rows_per_transaction).await?);
            report.minutes_rolled_up += n;
            if n < per_tx {
                break;
            }
        }
        let deletions = [
            ("usage_hours", "key_id, hour", "hour", cut.hours_before),
            ("usage_routes", "key_id, hour, route, method, outcome", "hour", cut.hours_before),
            ("usage_batches", "batch_id", "applied_at", cut.batches_before_ms),
        ];
        for (table, primary_key, column, before) in deletions {
            for _ in 0..cut.max_transactions {
                let n = each_backend!(self, b, q => {
                    let mut tx = b.write().await?;
                    let n = q::delete_before(&mut tx, table, primary_key, column, before, cut.rows_per_transaction).await?;
                    b.commit(tx, &[], &*self.sink).await?;
                    n
                });
                if table == "usage_batches" {
                    report.batch_ids_deleted += n;
                } else {
                    report.hours_deleted += n;
                }
                if n < per_tx {
                    break;
                }
            }
        }
        if let Some(log) = cut.change_log {
            for _ in 0..cut.max_transactions {
                let n = each_log_backend!(self, b, c => {
                    let mut tx = b.write().await?;
                    let n = c::prune(&mut tx, log.before_ms, log.max_rows, cut.rows_per_transaction).await?;
                    b.commit(tx, &[], &*self.sink).await?;
                    n
                });
                report.changes_deleted += n;
                if n < per_tx {
                    break;
                }
            }
        }
        Ok(report)
    }

    /// Remembers that `key_id` was used from `network`.
    pub(crate) async fn note_network(
        &self,
        key_id: &str,
        network: &str,
        at: OffsetDateTime,
    ) -> Result<NetworkSeen, StoreError> {
        self.metered("note_network", async {
            let known = each_backend!(self, b, q => q::network_known(b.pool(), key_id, network).await?);
            if known {
                return Ok(NetworkSeen::Known);
            }
            write_tx!(self, |tx, q| (q::add_network(&mut tx, key_id, network, at).await?, Vec::new()))
        })
        .await
    }

    /// Stores an alert (and publishes it) unless one of the same key, kind and minute
    /// exists; true if stored.
    pub(crate) async fn insert_alert(&self, alert: &Alert) -> Result<bool, StoreError> {
        self.metered("insert_alert", async {
            write_tx!(self, |tx, q, w| {
                let id = q::insert_alert(&mut *tx, alert).await?;
                let notes = match id {
                    Some(id) => {
                        let alert = Alert { id: Some(id.max(0) as u64), ..alert.clone() };
                        let data =
                            serde_json::to_value(&alert).map_err(|e| StoreError::Corrupt(format!("alert: {e}")))?;
                        let event = WebhookEvent::new(alert_event_type(&alert), alert.at, data)?;
                        w::enqueue(&mut tx, &[event], self.webhook_queue).await?;
                        vec![ChangeNote::Alert(Box::new(alert))]
                    }
                    None => Vec::new(),
                };
                (id.is_some(), notes)
            })
        })
        .await
    }

    /// Alerts, oldest first: from `since` on, or the newest `limit` without it.
    pub async fn alerts(&self, since: Option<OffsetDateTime>, limit: u32) -> Result<Vec<Alert>, StoreError> {
        self.metered("alerts", async { each_backend!(self, b, q => q::alerts(b.pool(), since, limit).await) }).await
    }

    // ---- roles delete, unknown roles, alert acknowledgement

    /// The names among `names` that are not defined roles, in their order.
    pub(crate) async fn missing_roles(&self, names: &[String]) -> Result<Vec<String>, StoreError> {
        self.metered("missing_roles", async {
            let existing = each_backend!(self, b, q => q::existing_roles(b.pool(), names).await?);
            Ok(names.iter().filter(|n| !existing.contains(n)).cloned().collect())
        })
        .await
    }

    /// Deletes a role and writes `role.delete`; see the shared query for the refusal
    /// while keys hold it and for `detach`. The keys it was removed from are `updated`
    /// (or all `reset` above [`MAX_EVENTS_PER_CHANGE`]).
    pub(crate) async fn delete_role(
        &self,
        name: &str,
        detach: bool,
        actor: &str,
        at: OffsetDateTime,
    ) -> Result<Vec<String>, StoreError> {
        self.metered("delete_role", async {
            write_tx!(self, |tx, q| {
                let detached = q::delete_role(&mut tx, name, detach, actor, at).await?;
                (detached.clone(), notes_for_keys(KeyEvent::Updated, detached))
            })
        })
        .await
    }

    /// Alerts, oldest first, only the open (`acknowledged` false) or only the
    /// acknowledged ones: from `since` on, or the newest `limit` without it.
    pub async fn alerts_by_state(
        &self,
        since: Option<OffsetDateTime>,
        acknowledged: bool,
        limit: u32,
    ) -> Result<Vec<Alert>, StoreError> {
        self.metered("alerts_by_state", async {
            each_backend!(self, b, q => q::alerts_by_state(b.pool(), since, acknowledged, limit).await)
        })
        .await
    }

    /// Acknowledges an alert (idempotent) and writes `alert.ack` the first time.
    pub(crate) async fn ack_alert(&self, id: i64, actor: &str, at: OffsetDateTime) -> Result<Alert, StoreError> {
        self.metered("ack_alert", async {
            write_tx!(self, |tx, q| (q::ack_alert(&mut tx, id, actor, at).await?, Vec::new()))
        })
        .await
    }

    /// For a store that several key-service replicas share (PostgreSQL): starts
    /// forwarding the changes made through the other replicas into the sink. `None` for
    /// a store only one replica uses (SQLite). Called from within a Tokio runtime.
    pub(crate) fn follow_changes(&self) -> Option<ChangeFeed> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            #[cfg(feature = "postgres")]
            Backend::Postgres(p) => Some(p.follow_changes(Arc::clone(&self.sink), self.meters.fanout_lag())),
        }
    }
}

// ---- webhooks: endpoints, the outbox, the key sweep

/// Most endpoints `GET /v1/webhooks` lists.
pub(crate) const MAX_WEBHOOK_ENDPOINTS: u32 = 1000;

impl Store {
    /// Caps the pending deliveries of each webhook endpoint (default 10 000): past it,
    /// queuing an event drops the endpoint's oldest pending ones, counted as `dropped`.
    #[must_use]
    pub(crate) fn with_webhook_queue(mut self, max_pending: u32) -> Self {
        self.webhook_queue = max_pending.max(1);
        self
    }

    /// Adds a webhook endpoint and writes `webhook.create`.
    pub(crate) async fn create_webhook(&self, e: &NewEndpoint, actor: &str) -> Result<WebhookEndpoint, StoreError> {
        let audited = json!({
            "id": e.id,
            "url": super::text::url_without_query(&e.url),
            "events": e.events,
            "description": e.description,
        });
        self.metered("create_webhook", async {
            write_tx!(self, |tx, _q, w| {
                (w::create_endpoint(&mut tx, e, actor, action::WEBHOOK_CREATE, &audited).await?, Vec::new())
            })
        })
        .await
    }

    /// Removes a webhook endpoint with its deliveries and writes `webhook.delete`.
    pub(crate) async fn delete_webhook(
        &self,
        id: &str,
        actor: &str,
        at: OffsetDateTime,
    ) -> Result<WebhookEndpoint, StoreError> {
        self.metered("delete_webhook", async {
            let found: Result<Option<WebhookEndpoint>, StoreError> = write_tx!(self, |tx, _q, w| {
                (w::delete_endpoint(&mut tx, id, actor, action::WEBHOOK_DELETE, at).await?, Vec::new())
            });
            found?.ok_or_else(|| StoreError::NotFound(format!("no webhook with id `{id}`")))
        })
        .await
    }

    /// One webhook endpoint.
    pub async fn webhook(&self, id: &str) -> Result<Option<WebhookEndpoint>, StoreError> {
        self.metered("webhook", async { each_backend!(self, b, _q, w => w::endpoint(b.pool(), id).await) }).await
    }

    /// Webhook endpoints, oldest first (at most 1 000).
    pub async fn webhooks(&self) -> Result<Vec<WebhookEndpoint>, StoreError> {
        self.metered("webhooks", async {
            each_backend!(self, b, _q, w => w::endpoints(b.pool(), MAX_WEBHOOK_ENDPOINTS).await)
        })
        .await
    }

    /// An endpoint's deliveries, newest first, with ids below `before`, at most `limit`.
    pub async fn webhook_deliveries(
        &self,
        endpoint_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        self.metered("webhook_deliveries", async {
            each_backend!(self, b, _q, w => w::deliveries(b.pool(), endpoint_id, before, limit).await)
        })
        .await
    }

    /// Every endpoint's URL and secret.
    pub(crate) async fn webhook_targets(&self) -> Result<std::collections::HashMap<String, Target>, StoreError> {
        self.metered("webhook_targets", async { each_backend!(self, b, _q, w => w::targets(b.pool()).await) }).await
    }

    /// Claims up to `limit` due deliveries for this worker until `until`.
    pub(crate) async fn claim_deliveries(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.metered("claim_deliveries", async {
            if !each_backend!(self, b, _q, w => w::any_due(b.pool(), now).await?) {
                return Ok(Vec::new());
            }
            write_tx!(self, |tx, _q, w| (w::claim(&mut tx, now, until, limit).await?, Vec::new()))
        })
        .await
    }

    /// Records how an attempt ended.
    pub(crate) async fn finish_delivery(&self, id: i64, attempt: &Attempt) -> Result<(), StoreError> {
        self.metered("finish_delivery", async {
            each_backend!(self, b, _q, w => w::finish(b.pool(), id, attempt).await)
        })
        .await
    }

    /// Deletes each endpoint's finished deliveries beyond its newest `keep`.
    pub(crate) async fn prune_deliveries(&self, keep: u32) -> Result<u64, StoreError> {
        self.metered("prune_deliveries", async {
            write_tx!(self, |tx, _q, w| (w::prune(&mut tx, keep).await?, Vec::new()))
        })
        .await
    }

    /// Sets the key's `expires_at` to now with the audit actor `actor` and queues
    /// `key.expired`, unless it has expired already or expires within
    /// [`EXPIRY_SKEW`]: under the key's row lock, so that replicas sweeping at once
    /// expire it once. True if this call expired it.
    pub(crate) async fn expire_key(&self, key_id: &str, actor: &str) -> Result<bool, StoreError> {
        self.metered("expire_key", async {
            write_tx!(self, |tx, q, w| {
                let expiry = w::key_expiry_locked(&mut tx, key_id).await?;
                // Read after the lock: a clock read before it may predate the expiry
                // another replica committed while this one waited.
                let now = now_ms();
                match expiry {
                    Some(Some(at)) if at <= now + EXPIRY_SKEW => (false, Vec::new()),
                    None => (false, Vec::new()),
                    Some(_) => {
                        let patch = KeyPatch { expires_at: Some(Some(now)), ..KeyPatch::default() };
                        let change = KeyChange::Update(&patch);
                        let key = q::change_key(&mut tx, key_id, &change, actor, now, None).await?;
                        let event = WebhookEvent::new("key.expired", now, key_event_data(&key, actor))?;
                        w::enqueue(&mut tx, &[event], self.webhook_queue).await?;
                        (true, vec![ChangeNote::Key(change.event(), key.key_id)])
                    }
                }
            })
        })
        .await
    }

    /// Unrevoked keys expiring in `(now, until]`, soonest first, at most `limit`.
    pub(crate) async fn keys_expiring(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<KeyInfo>, StoreError> {
        self.metered("keys_expiring", async {
            each_backend!(self, b, _q, w => w::expiring(b.pool(), now, until, limit).await)
        })
        .await
    }

    /// Unrevoked, unexpired keys whose current secret is older than `before`, oldest
    /// first, with the secret's creation time.
    pub(crate) async fn keys_aged(
        &self,
        now: OffsetDateTime,
        before: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<(KeyInfo, OffsetDateTime)>, StoreError> {
        self.metered("keys_aged", async {
            each_backend!(self, b, _q, w => w::aged(b.pool(), now, before, limit).await)
        })
        .await
    }
}

/// How close to now an existing expiry counts as "expired already" for
/// [`Store::expire_key`]: replicas' clocks differ by a little, and a key the other
/// replica expired a moment ago by its clock must not be expired twice.
const EXPIRY_SKEW: time::Duration = time::Duration::seconds(2);

/// A key event's `data`: what identifies the key and what it allows, never key
/// material (no secret, no digest, not even the display prefix).
fn key_event_data(k: &KeyInfo, actor: &str) -> Value {
    json!({
        "key_id": k.key_id,
        "owner": k.owner,
        "name": k.name,
        "environment": k.environment,
        "scopes": k.scopes,
        "roles": k.roles,
        "expires_at": k.expires_at.and_then(rfc3339),
        "disabled": k.disabled,
        "revoked": k.revoked,
        "actor": actor,
    })
}

/// The webhook events a change of a key makes: `key.rotated`, `key.revoked`, and for a
/// patch, `key.disabled` / `key.enabled` when the flag really changed.
fn webhook_events_of(
    change: &KeyChange<'_>,
    key: &KeyInfo,
    before: Option<&KeyInfo>,
    actor: &str,
    at: OffsetDateTime,
) -> Result<Vec<WebhookEvent>, StoreError> {
    let mut data = key_event_data(key, actor);
    match change {
        KeyChange::Rotate { grace_until, .. } => {
            data["previous_expires_at"] = json!(rfc3339(*grace_until));
            Ok(vec![WebhookEvent::new("key.rotated", at, data)?])
        }
        KeyChange::Revoke => Ok(vec![WebhookEvent::new("key.revoked", at, data)?]),
        KeyChange::Update(_) => {
            let Some(before) = before else { return Ok(Vec::new()) };
            let mut events = Vec::new();
            if before.disabled != key.disabled {
                let kind = if key.disabled { "key.disabled" } else { "key.enabled" };
                events.push(WebhookEvent::new(kind, at, data.clone())?);
            }
            let changed: Vec<&str> = [
                ("name", before.name != key.name),
                ("scopes", before.scopes != key.scopes),
                ("roles", before.roles != key.roles),
                ("expires_at", before.expires_at != key.expires_at),
                ("meta", before.meta != key.meta),
                ("ratelimit", before.ratelimit != key.ratelimit),
                ("limits", before.limits != key.limits),
                ("allowed_networks", before.allowed_networks != key.allowed_networks),
                ("credits", before.credits != key.credits),
            ]
            .into_iter()
            .filter_map(|(field, differs)| differs.then_some(field))
            .collect();
            if !changed.is_empty() {
                data["changed"] = json!(changed);
                events.push(WebhookEvent::new("key.updated", at, data)?);
            }
            Ok(events)
        }
    }
}

/// An alert's webhook event type: `key.expiring` for a key about to expire,
/// `alert.<kind>` for the others.
pub(crate) fn alert_event_type(alert: &Alert) -> String {
    match alert.kind {
        super::model::AlertKind::KeyExpiring => "key.expiring".to_owned(),
        kind => format!("alert.{}", kind.as_str()),
    }
}

/// The notes of a change to these keys: one `kind` each, or a single `reset` when they
/// are more than [`MAX_EVENTS_PER_CHANGE`], so that one change cannot overflow
/// subscribers' buffers.
fn notes_for_keys(kind: KeyEvent, key_ids: Vec<String>) -> Vec<ChangeNote> {
    if key_ids.len() > MAX_EVENTS_PER_CHANGE {
        return vec![ChangeNote::Reset("bulk".into())];
    }
    key_ids.into_iter().map(|id| ChangeNote::Key(kind, id)).collect()
}

/// Unix milliseconds: how every store keeps time.
pub(crate) fn to_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

pub(crate) fn from_ms(ms: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .map_err(|_| StoreError::Corrupt(format!("timestamp {ms} out of range")))
}

pub(crate) fn from_ms_opt(ms: Option<i64>) -> Result<Option<OffsetDateTime>, StoreError> {
    ms.map(from_ms).transpose()
}

/// Current time cut to what the store keeps, so that answers compare equal to rows.
pub(crate) fn now_ms() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000).unwrap_or(now)
}

pub(crate) fn parse_json_list(s: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("list column: {e}")))
}

pub(crate) fn parse_json(s: &str) -> Result<Value, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("json column: {e}")))
}

pub(crate) fn ratelimit_from(limit: Option<i64>, period_s: Option<i64>) -> Option<RateLimit> {
    match (limit, period_s) {
        (Some(l), Some(p)) if l > 0 && p > 0 => Some(RateLimit { limit: l as u64, period_s: p as u64 }),
        _ => None,
    }
}

/// The audit `changes` of a new key: what it was created with.
pub(crate) fn create_changes(key: &NewKeyRecord) -> Value {
    json!({
        "owner": key.owner,
        "name": key.name,
        "scopes": key.scopes,
        "roles": key.roles,
        "environment": key.environment,
        "expires_at": key.expires_at.and_then(rfc3339),
        "meta": key.meta,
        "ratelimit": owners::ratelimit_of(&key.limits),
        "limits": key.limits,
        "credits": key.credits,
        "allowed_networks": key.allowed_networks,
        "key_prefix": key.secret.key_prefix,
    })
}

/// A change of an existing, unrevoked key: what `update_key`, `rotate_key` and
/// `revoke_key` have in common, so that every backend makes them in one place.
pub(crate) enum KeyChange<'a> {
    /// A validated patch.
    Update(&'a KeyPatch),
    /// A new secret; the previous ones end at `grace_until` at the latest.
    Rotate {
        /// The new secret.
        secret: &'a NewSecret,
        /// The end of the previous secrets' grace.
        grace_until: OffsetDateTime,
    },
    /// Revocation, for good.
    Revoke,
}

impl KeyChange<'_> {
    /// The event subscribers hear.
    pub(crate) fn event(&self) -> KeyEvent {
        match self {
            Self::Update(_) => KeyEvent::Updated,
            Self::Rotate { .. } => KeyEvent::Rotated,
            Self::Revoke => KeyEvent::Revoked,
        }
    }

    /// The audit action.
    pub(crate) fn action(&self) -> &'static str {
        match self {
            Self::Update(_) => action::KEY_UPDATE,
            Self::Rotate { .. } => action::KEY_ROTATE,
            Self::Revoke => action::KEY_REVOKE,
        }
    }

    /// Applies the change to the key as stored and returns the audit `changes`. The
    /// rows besides the key's (roles, secrets) are the caller's to write.
    pub(crate) fn apply(&self, key: &mut KeyInfo, at: OffsetDateTime) -> Value {
        let changes = match self {
            Self::Update(patch) => apply_patch(key, patch),
            Self::Rotate { secret, grace_until } => {
                let changes = json!({
                    "key_prefix": { "from": key.key_prefix, "to": secret.key_prefix },
                    "previous_expires_at": rfc3339(*grace_until),
                });
                key.key_prefix.clone_from(&secret.key_prefix);
                changes
            }
            Self::Revoke => {
                key.revoked = true;
                key.revoked_at = Some(at);
                json!({ "revoked": { "from": false, "to": true } })
            }
        };
        key.updated_at = Some(at);
        changes
    }
}

/// Applies a validated patch to a key and returns `{"field": {"from", "to"}}` for
/// the fields that really changed (the audit record's `changes`).
pub(crate) fn apply_patch(key: &mut KeyInfo, patch: &KeyPatch) -> Value {
    let mut changes = serde_json::Map::new();
    let mut note = |field: &str, from: Value, to: Value| {
        if from != to {
            changes.insert(field.to_owned(), json!({ "from": from, "to": to }));
        }
    };
    if let Some(name) = &patch.name {
        note("name", json!(key.name), json!(name));
        key.name.clone_from(name);
    }
    if let Some(scopes) = &patch.scopes {
        note("scopes", json!(key.scopes), json!(scopes));
        key.scopes.clone_from(scopes);
    }
    if let Some(roles) = &patch.roles {
        note("roles", json!(key.roles), json!(roles));
        key.roles.clone_from(roles);
    }
    if let Some(disabled) = patch.disabled {
        note("disabled", json!(key.disabled), json!(disabled));
        key.disabled = disabled;
    }
    if let Some(meta) = &patch.meta {
        note("meta", key.meta.clone(), meta.clone());
        key.meta = meta.clone();
    }
    if let Some(expires_at) = patch.expires_at {
        note("expires_at", json!(key.expires_at.and_then(rfc3339)), json!(expires_at.and_then(rfc3339)));
        key.expires_at = expires_at;
    }
    // `ratelimit` is the `requests` limit: the API refused a patch that sets both.
    let mut limits = patch.limits.clone().unwrap_or_else(|| key.limits.clone());
    if let Some(ratelimit) = patch.ratelimit {
        limits.retain(|l| &*l.name != crate::quota::REQUESTS);
        if let Some(rl) = ratelimit {
            limits.insert(0, Limit::new(crate::quota::REQUESTS, rl.limit, rl.period_s));
        }
    }
    if limits != key.limits {
        let ratelimit = owners::ratelimit_of(&limits);
        note("ratelimit", json!(key.ratelimit), json!(ratelimit));
        note("limits", json!(key.limits), json!(limits));
        key.ratelimit = ratelimit;
        key.limits = limits;
    }
    if let Some(credits) = &patch.credits {
        note("credits", json!(key.credits), json!(credits));
        key.credits.clone_from(credits);
        // Every set is a new revision, the same value included: an operator setting
        // what the store shows (reconciled a while ago) means to restart the fleet-wide
        // count from it.
        let revision = owners::next_credits_revision(key.credits_revision);
        note("credits_revision", json!(key.credits_revision), json!(revision));
        key.credits_revision = Some(revision);
        key.credits_reconciled_at = None;
    }
    if let Some(networks) = &patch.allowed_networks {
        note("allowed_networks", json!(key.allowed_networks), json!(networks));
        key.allowed_networks.clone_from(networks);
    }
    Value::Object(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_of_many_keys_is_one_reset() {
        let ids = |n: usize| (0..n).map(|i| format!("key_{i}")).collect::<Vec<_>>();
        let few = notes_for_keys(KeyEvent::Updated, ids(MAX_EVENTS_PER_CHANGE));
        assert_eq!(few.len(), MAX_EVENTS_PER_CHANGE);
        assert_eq!(few[0], ChangeNote::Key(KeyEvent::Updated, "key_0".into()));
        let many = notes_for_keys(KeyEvent::Updated, ids(MAX_EVENTS_PER_CHANGE + 1));
        assert_eq!(many, [ChangeNote::Reset("bulk".into())]);
        assert!(notes_for_keys(KeyEvent::Updated, Vec::new()).is_empty());
    }
}

/// What [`Store::page_keys`] narrows a listing to. Empty: every key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFilter {
    /// Only keys after this one in listing order (the last key of the page before).
    pub after: Option<KeyCursor>,
    /// Only this owner's keys.
    pub owner: Option<String>,
    /// Only keys whose owner, name, id or display prefix holds this text (case-insensitive
    /// for ASCII).
    pub search: Option<String>,
    /// Only keys of this environment.
    pub environment: Option<String>,
    /// Only keys in this state.
    pub state: Option<KeyState>,
    /// What [`KeyState::Expiring`] means: expiring within this long from now.
    pub expiring_within: std::time::Duration,
    /// The listing's order; [`after`](Self::after) must be a cursor of the same order.
    pub sort: KeySort,
}

/// What [`Store::audit_page`] narrows the audit log to. Empty: every record.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditFilter {
    /// Only records of this key.
    pub(crate) key_id: Option<String>,
    /// Only records of this actor.
    pub(crate) actor: Option<String>,
    /// Only records whose action starts with this (ASCII case-insensitive).
    pub(crate) action_prefix: Option<String>,
    /// Only records from this time on.
    pub(crate) since: Option<OffsetDateTime>,
}

/// Which page of the audit log [`Store::audit_page`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuditPage {
    /// The newest records.
    Newest,
    /// The newest of the records older than the record with this id.
    Before(i64),
    /// The oldest of the records newer than the record with this id.
    After(i64),
}

/// `text%` for `LIKE ... ESCAPE '\'`, lower-cased, the text's own `%`, `_` and `\` escaped.
pub(crate) fn prefix_pattern(text: &str) -> String {
    let mut out = like_pattern(text);
    out.remove(0);
    out
}

/// The column a listing of keys is ordered by; ties are broken by key id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeySortBy {
    /// Creation time (the default).
    #[default]
    Created,
    /// The key's name.
    Name,
    /// The key's owner.
    Owner,
    /// When the key was last used; never-used keys count as used at the epoch.
    LastUsed,
}

impl KeySortBy {
    /// Every column, in the order pages offer them.
    pub const ALL: [KeySortBy; 4] = [Self::Created, Self::Name, Self::Owner, Self::LastUsed];

    /// `created`, `name`, `owner` or `last_used`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Name => "name",
            Self::Owner => "owner",
            Self::LastUsed => "last_used",
        }
    }

    fn tag(self) -> char {
        match self {
            Self::Created => 'c',
            Self::Name => 'n',
            Self::Owner => 'o',
            Self::LastUsed => 'u',
        }
    }

    fn is_text(self) -> bool {
        matches!(self, Self::Name | Self::Owner)
    }
}

/// How a listing of keys is ordered: by a column ascending or descending, the key id
/// breaking ties the same way. Written `column` or `column:desc` (`column:asc` reads
/// too). Default: oldest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeySort {
    /// The column.
    pub by: KeySortBy,
    /// Largest first.
    pub descending: bool,
}

impl KeySort {
    /// The order `s` names (`name`, `last_used:desc`, ...), if any.
    pub fn parse(s: &str) -> Option<Self> {
        let (by, dir) = s.split_once(':').unwrap_or((s, "asc"));
        let by = KeySortBy::ALL.into_iter().find(|b| b.as_str() == by)?;
        let descending = match dir {
            "asc" => false,
            "desc" => true,
            _ => return None,
        };
        Some(Self { by, descending })
    }
}

impl std::fmt::Display for KeySort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.by.as_str())?;
        if self.descending { f.write_str(":desc") } else { Ok(()) }
    }
}

/// The sort column's value at a cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SortValue {
    /// Unix milliseconds.
    Int(i64),
    Text(String),
}

/// A place in a listing of keys in some [`KeySort`]: just after a key. Written as
/// `{created_at unix ms}.{key_id}` for the default order, otherwise
/// `{column}{a|d}.{value}.{key_id}` with text values in base64url; clients treat it as
/// opaque. A cursor belongs to its order: [`KeyCursor::sort`] says which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCursor {
    pub(crate) sort: KeySort,
    pub(crate) value: SortValue,
    pub(crate) key_id: String,
}

/// Longest cursor [`KeyCursor::parse`] reads.
const MAX_CURSOR: usize = 1024;

fn cursor_key_id(id: &str) -> Option<String> {
    let ok = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    ok.then(|| id.to_owned())
}

impl KeyCursor {
    /// Just after `key`, oldest first.
    pub fn after(key: &KeyInfo) -> Self {
        Self::after_in(key, KeySort::default())
    }

    /// Just after `key` in the order `sort`.
    pub fn after_in(key: &KeyInfo, sort: KeySort) -> Self {
        let value = match sort.by {
            KeySortBy::Created => SortValue::Int(to_ms(key.created_at)),
            KeySortBy::LastUsed => SortValue::Int(key.last_used_at.map_or(0, to_ms)),
            KeySortBy::Name => SortValue::Text(key.name.clone()),
            KeySortBy::Owner => SortValue::Text(key.owner.clone()),
        };
        Self { sort, value, key_id: key.key_id.clone() }
    }

    /// The order this cursor is a place in.
    pub fn sort(&self) -> KeySort {
        self.sort
    }

    /// The cursor `s` writes, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        use base64::Engine;
        if s.len() > MAX_CURSOR {
            return None;
        }
        let parts: Vec<&str> = s.split('.').collect();
        if let [ms, id] = parts[..] {
            let ms = ms.parse().ok().filter(|_| ms.bytes().all(|b| b.is_ascii_digit()))?;
            return Some(Self { sort: KeySort::default(), value: SortValue::Int(ms), key_id: cursor_key_id(id)? });
        }
        let [tag, value, id] = parts[..] else { return None };
        let mut chars = tag.chars();
        let (Some(by), Some(dir), None) = (chars.next(), chars.next(), chars.next()) else { return None };
        let by = KeySortBy::ALL.into_iter().find(|b| b.tag() == by)?;
        let descending = match dir {
            'a' => false,
            'd' => true,
            _ => return None,
        };
        let value = if by.is_text() {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(value).ok()?;
            SortValue::Text(String::from_utf8(bytes).ok()?)
        } else {
            SortValue::Int(value.parse().ok()?)
        };
        Some(Self { sort: KeySort { by, descending }, value, key_id: cursor_key_id(id)? })
    }
}

impl std::fmt::Display for KeyCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use base64::Engine;
        if self.sort == KeySort::default() {
            if let SortValue::Int(ms) = self.value {
                // The form cursors had before listings could be sorted: still good.
                return write!(f, "{ms}.{}", self.key_id);
            }
        }
        let dir = if self.sort.descending { 'd' } else { 'a' };
        write!(f, "{}{dir}.", self.sort.by.tag())?;
        match &self.value {
            SortValue::Int(v) => write!(f, "{v}")?,
            SortValue::Text(t) => f.write_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t))?,
        }
        write!(f, ".{}", self.key_id)
    }
}

#[cfg(test)]
mod cursor_tests {
    use super::*;

    #[test]
    fn cursors_read_back_as_written_in_every_order() {
        let old = KeyCursor::parse("1700000000000.key_abc").unwrap();
        assert_eq!(old.sort(), KeySort::default());
        assert_eq!(old.to_string(), "1700000000000.key_abc");
        for by in KeySortBy::ALL {
            for descending in [false, true] {
                let sort = KeySort { by, descending };
                assert_eq!(KeySort::parse(&sort.to_string()), Some(sort));
                let value = if by.is_text() { SortValue::Text("a.b:c/é".into()) } else { SortValue::Int(42) };
                let c = KeyCursor { sort, value, key_id: "key_x".into() };
                assert_eq!(KeyCursor::parse(&c.to_string()), Some(c));
            }
        }
        assert_eq!(KeySort::parse("name:asc"), KeySort::parse("name"));
        for bad in ["", "nonsense", "na.x.key_a", "nx.eA.key_a", "ua.x.key_a", "na.eA.key a", "-1.key_a", "1.2.3.4"] {
            assert!(KeyCursor::parse(bad).is_none(), "{bad}");
        }
        assert!(KeySort::parse("name:up").is_none() && KeySort::parse("size").is_none());
    }
}

/// A key's state as the listing filters it: one of the first four applies to each key;
/// [`Expiring`](Self::Expiring) narrows [`Active`](Self::Active).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Not revoked, not disabled, not past its expiry.
    Active,
    /// Disabled and not revoked.
    Disabled,
    /// Revoked.
    Revoked,
    /// Past its expiry and not revoked (disabled or not).
    Expired,
    /// Active, and past its expiry within [`KeyFilter::expiring_within`].
    Expiring,
}

impl KeyState {
    /// Every state, in the order pages list them.
    pub const ALL: [KeyState; 5] = [Self::Active, Self::Expiring, Self::Disabled, Self::Revoked, Self::Expired];

    /// `active`, `expiring`, `disabled`, `revoked` or `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Disabled => "disabled",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::Expiring => "expiring",
        }
    }

    /// The state named `s`, if any.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// `%text%` for `LIKE ... ESCAPE '\'`, lower-cased, the text's own `%`, `_` and `\` escaped.
pub(crate) fn like_pattern(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('%');
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

fn now_ms_i64() -> i64 {
    to_ms(now_ms())
}
