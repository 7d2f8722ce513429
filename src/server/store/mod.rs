//! Storage behind one object-safe trait, so that the backend can be chosen at run time
//! from the database URL ([`open`]) and the HTTP layer never knows which one it talks to.
//!
//! Every method that changes a key or a role writes its audit record in the same
//! transaction as the change: either both are stored or neither is.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::key::KeyDigest;
use crate::principal::RateLimit;

use super::error::ServerError;
use super::events::{ChangeFeed, EventHub};
use super::model::{Alert, AuditRecord, KeyInfo, KeyPatch, RoleInfo, UsageBucket};

#[cfg(feature = "postgres")]
mod postgres;
mod queries;
mod rows;
mod sqlite;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// A boxed, `Send` future: what [`Store`] methods return, so that `dyn Store` works.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Audit action names.
pub mod action {
    /// A key was created.
    pub const KEY_CREATE: &str = "key.create";
    /// A key was changed with `PATCH`.
    pub const KEY_UPDATE: &str = "key.update";
    /// A key got a new secret.
    pub const KEY_ROTATE: &str = "key.rotate";
    /// A key was revoked.
    pub const KEY_REVOKE: &str = "key.revoke";
    /// A role was created or replaced.
    pub const ROLE_PUT: &str = "role.put";
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
    /// A migration failed.
    #[error("migration {version}: {source}")]
    Migration {
        /// The migration's version.
        version: i64,
        /// Why.
        source: sqlx::Error,
    },
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
pub struct NewKeyRecord {
    /// The key's id.
    pub key_id: String,
    /// The secret's first characters.
    pub secret: NewSecret,
    /// Owner.
    pub owner: String,
    /// Name.
    pub name: String,
    /// Validated, sorted scopes.
    pub scopes: Vec<String>,
    /// Validated, sorted roles.
    pub roles: Vec<String>,
    /// Environment.
    pub environment: String,
    /// Expiry.
    pub expires_at: Option<OffsetDateTime>,
    /// Metadata object.
    pub meta: Value,
    /// Rate limit.
    pub ratelimit: Option<RateLimit>,
    /// Creation time.
    pub created_at: OffsetDateTime,
}

/// A secret to store: its digest and display prefix, never the secret.
#[derive(Debug, Clone)]
pub struct NewSecret {
    /// SHA-256 of the key.
    pub digest: KeyDigest,
    /// `kg_3fA9`.
    pub key_prefix: String,
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
}

/// One key's usage in one minute, to add to the stored aggregate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MinuteRow {
    /// The key.
    pub key_id: String,
    /// The minute's start, Unix seconds.
    pub minute: i64,
    /// Requests.
    pub requests: i64,
    /// Allowed.
    pub allowed: i64,
    /// Denied.
    pub denied: i64,
    /// 2xx.
    pub status_2xx: i64,
    /// 4xx.
    pub status_4xx: i64,
    /// 5xx.
    pub status_5xx: i64,
    /// Latency sum, microseconds.
    pub latency_us_sum: i64,
    /// Latency max, microseconds.
    pub latency_us_max: i64,
}

/// Whether a client network was new for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkSeen {
    /// Seen before.
    Known,
    /// The first network this key was ever seen from.
    First,
    /// New, and the key had been used from other networks before.
    New,
}

/// The storage a key service runs on. Implementations: [`SqliteStore`], and
/// `PostgresStore` with feature `postgres`.
pub trait Store: Send + Sync + 'static {
    /// Checks the database answers.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Inserts a key, its secret and the `key.create` audit record.
    fn create_key<'a>(&'a self, key: &'a NewKeyRecord, actor: &'a str) -> BoxFuture<'a, Result<KeyInfo, StoreError>>;

    /// One key by id.
    fn get_key<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<Option<KeyInfo>, StoreError>>;

    /// Keys, oldest first, optionally of one owner, at most `limit`.
    fn list_keys<'a>(&'a self, owner: Option<&'a str>, limit: u32) -> BoxFuture<'a, Result<Vec<KeyInfo>, StoreError>>;

    /// Applies a validated patch and writes `key.update`. A revoked key is a conflict.
    fn update_key<'a>(
        &'a self,
        key_id: &'a str,
        patch: &'a KeyPatch,
        actor: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<KeyInfo, StoreError>>;

    /// Makes `secret` the key's current secret; the previous ones stop at `grace_until`
    /// at the latest. Writes `key.rotate`.
    fn rotate_key<'a>(
        &'a self,
        key_id: &'a str,
        secret: &'a NewSecret,
        grace_until: OffsetDateTime,
        actor: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<KeyInfo, StoreError>>;

    /// Revokes a key for good and writes `key.revoke`.
    fn revoke_key<'a>(
        &'a self,
        key_id: &'a str,
        actor: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<KeyInfo, StoreError>>;

    /// Creates or replaces a role and writes `role.put`. Returns the role and the ids
    /// of the unrevoked keys that hold it (their effective scopes changed).
    fn put_role<'a>(
        &'a self,
        name: &'a str,
        scopes: &'a [String],
        actor: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<(RoleInfo, Vec<String>), StoreError>>;

    /// All roles, by name.
    fn list_roles(&self) -> BoxFuture<'_, Result<Vec<RoleInfo>, StoreError>>;

    /// The key holding the secret with this digest: an index lookup, never a scan.
    fn find_by_digest<'a>(&'a self, digest: &'a KeyDigest) -> BoxFuture<'a, Result<Option<Found>, StoreError>>;

    /// Audit records, oldest first: from `since` on, or the newest `limit` without it.
    fn audit(&self, since: Option<OffsetDateTime>, limit: u32) -> BoxFuture<'_, Result<Vec<AuditRecord>, StoreError>>;

    /// Adds per-minute aggregates (atomic upserts, correct under concurrent writers)
    /// and moves keys' `last_used_at` forward.
    fn record_usage<'a>(
        &'a self,
        rows: &'a [MinuteRow],
        last_used: &'a [(String, OffsetDateTime)],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// A key's minutes from `since` on, oldest first, at most `limit`.
    fn usage<'a>(
        &'a self,
        key_id: &'a str,
        since: OffsetDateTime,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<UsageBucket>, StoreError>>;

    /// Remembers that `key_id` was used from `network`.
    fn note_network<'a>(
        &'a self,
        key_id: &'a str,
        network: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<NetworkSeen, StoreError>>;

    /// Stores an alert unless one of the same key, kind and minute exists; true if stored.
    fn insert_alert<'a>(&'a self, alert: &'a Alert) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Alerts, oldest first: from `since` on, or the newest `limit` without it.
    fn alerts(&self, since: Option<OffsetDateTime>, limit: u32) -> BoxFuture<'_, Result<Vec<Alert>, StoreError>>;

    /// For a store that several key-service replicas share: starts forwarding the
    /// changes made through the other replicas (revocations, updates, rotations, role
    /// changes, resets, alerts) into `hub`, so that this replica's event-stream
    /// subscribers hear about them. `None` (the default) for a store only one replica
    /// uses, such as SQLite. Called from within a Tokio runtime.
    fn follow_changes(&self, hub: &EventHub) -> Option<ChangeFeed> {
        let _ = hub;
        None
    }
}

/// Opens the store a URL names (`sqlite://path`, `sqlite::memory:`, and with feature
/// `postgres`, `postgres://...` or `postgresql://...`) and runs its migrations.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, ServerError> {
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteStore::open(url).await?));
    }
    #[cfg(feature = "postgres")]
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PostgresStore::open(url).await?));
    }
    let scheme = url.split(':').next().unwrap_or_default();
    Err(ServerError::UnsupportedDatabase(format!("{scheme}:…")))
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
        "expires_at": rfc3339(key.expires_at),
        "meta": key.meta,
        "ratelimit": key.ratelimit,
        "key_prefix": key.secret.key_prefix,
    })
}

pub(crate) fn rfc3339(t: Option<OffsetDateTime>) -> Value {
    t.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()).map_or(Value::Null, Value::String)
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
                    "previous_expires_at": rfc3339(Some(*grace_until)),
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
        note("expires_at", rfc3339(key.expires_at), rfc3339(expires_at));
        key.expires_at = expires_at;
    }
    if let Some(ratelimit) = patch.ratelimit {
        note("ratelimit", json!(key.ratelimit), json!(ratelimit));
        key.ratelimit = ratelimit;
    }
    Value::Object(changes)
}
