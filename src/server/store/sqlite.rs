//! The embedded default: SQLite through sqlx, a file (WAL) or `sqlite::memory:`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Transaction;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use time::OffsetDateTime;

use super::{BoxFuture, Found, KeyChange, MinuteRow, NetworkSeen, NewKeyRecord, NewSecret, Store, StoreError, to_ms};
use crate::key::KeyDigest;
use crate::server::model::{Alert, AuditRecord, KeyInfo, KeyPatch, RoleInfo, UsageBucket};

// SQLite has no row locks; a write transaction (`BEGIN IMMEDIATE`) already holds the
// database's write lock.
super::queries::shared_queries!(sqlx::Sqlite, row_lock = "");

const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("migrations/sqlite_0001_initial.sql"))];

/// A [`Store`] on SQLite.
///
/// A file database uses WAL, `synchronous = NORMAL`, a 5 s busy timeout and up to 8
/// connections; writes start with `BEGIN IMMEDIATE` so that concurrent writers queue
/// instead of failing on a lock upgrade. `sqlite::memory:` uses exactly one connection
/// that is never recycled: every connection to `:memory:` is a separate database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` and runs the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        let mut opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        if !memory {
            opts = opts.journal_mode(SqliteJournalMode::Wal).synchronous(SqliteSynchronous::Normal);
        }
        let pool_opts = if memory {
            SqlitePoolOptions::new().max_connections(1).min_connections(1).idle_timeout(None).max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(8).idle_timeout(Duration::from_secs(600))
        };
        let pool = pool_opts.acquire_timeout(Duration::from_secs(5)).connect_with(opts).await?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// The connection pool, for tools and tests.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes the pool, checkpointing the WAL of a file database.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS keygate_migrations (version INTEGER PRIMARY KEY NOT NULL, applied_at INTEGER NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        shared::migrate(&mut tx, MIGRATIONS, |version| tracing::info!(version, "applied migration")).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn write(&self) -> Result<Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Makes a change of a key in a write transaction of its own.
    async fn change_key(
        &self,
        key_id: &str,
        change: KeyChange<'_>,
        actor: &str,
        at: OffsetDateTime,
    ) -> Result<KeyInfo, StoreError> {
        let mut tx = self.write().await?;
        let key = shared::change_key(&mut tx, key_id, &change, actor, at).await?;
        tx.commit().await?;
        Ok(key)
    }
}

impl Store for SqliteStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
    }

    fn create_key<'a>(&'a self, key: &'a NewKeyRecord, actor: &'a str) -> BoxFuture<'a, Result<KeyInfo, StoreError>> {
        Box::pin(async move {
            let mut tx = self.write().await?;
            let info = shared::create_key(&mut tx, key, actor).await?;
            tx.commit().await?;
            Ok(info)
        })
    }

    fn get_key<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<Option<KeyInfo>, StoreError>> {
        Box::pin(shared::get_key(&self.pool, key_id))
    }

    fn list_keys<'a>(&'a self, owner: Option<&'a str>, limit: u32) -> BoxFuture<'a, Result<Vec<KeyInfo>, StoreError>> {
        Box::pin(shared::list_keys(&self.pool, owner, limit))
    }

    fn update_key<'a>(
        &'a self,
        key_id: &'a str,
        patch: &'a KeyPatch,
        actor: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<KeyInfo, StoreError>> {
        Box::pin(self.change_key(key_id, KeyChange::Update(patch), actor, at))
    }

    fn rotate_key<'a>(
        &'a self,
        key_id: &'a str,
        secret: &'a NewSecret,
        grace_until: OffsetDateTime,
        actor: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<KeyInfo, StoreError>> {
        Box::pin(self.change_key(key_id, KeyChange::Rotate { secret, grace_until }, actor, at))
    }

    fn revoke_key<'a>(
        &'a self,
        key_id: &'a str,
        actor: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<KeyInfo, StoreError>> {
        Box::pin(self.change_key(key_id, KeyChange::Revoke, actor, at))
    }

    fn put_role<'a>(
        &'a self,
        name: &'a str,
        scopes: &'a [String],
        actor: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<(RoleInfo, Vec<String>), StoreError>> {
        Box::pin(async move {
            let mut tx = self.write().await?;
            let put = shared::put_role(&mut tx, name, scopes, actor, at).await?;
            tx.commit().await?;
            Ok(put)
        })
    }

    fn list_roles(&self) -> BoxFuture<'_, Result<Vec<RoleInfo>, StoreError>> {
        Box::pin(shared::list_roles(&self.pool))
    }

    fn find_by_digest<'a>(&'a self, digest: &'a KeyDigest) -> BoxFuture<'a, Result<Option<Found>, StoreError>> {
        Box::pin(shared::find_by_digest(&self.pool, digest))
    }

    fn audit(&self, since: Option<OffsetDateTime>, limit: u32) -> BoxFuture<'_, Result<Vec<AuditRecord>, StoreError>> {
        Box::pin(shared::audit(&self.pool, since, limit))
    }

    fn record_usage<'a>(
        &'a self,
        rows: &'a [MinuteRow],
        last_used: &'a [(String, OffsetDateTime)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut tx = self.write().await?;
            for r in rows {
                sqlx::query(
                    "INSERT INTO usage_minutes (key_id, minute, requests, allowed, denied, status_2xx, status_4xx, \
                     status_5xx, latency_us_sum, latency_us_max) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     ON CONFLICT (key_id, minute) DO UPDATE SET \
                     requests = usage_minutes.requests + excluded.requests, \
                     allowed = usage_minutes.allowed + excluded.allowed, \
                     denied = usage_minutes.denied + excluded.denied, \
                     status_2xx = usage_minutes.status_2xx + excluded.status_2xx, \
                     status_4xx = usage_minutes.status_4xx + excluded.status_4xx, \
                     status_5xx = usage_minutes.status_5xx + excluded.status_5xx, \
                     latency_us_sum = usage_minutes.latency_us_sum + excluded.latency_us_sum, \
                     latency_us_max = MAX(usage_minutes.latency_us_max, excluded.latency_us_max)",
                )
                .bind(&r.key_id)
                .bind(r.minute)
                .bind(r.requests)
                .bind(r.allowed)
                .bind(r.denied)
                .bind(r.status_2xx)
                .bind(r.status_4xx)
                .bind(r.status_5xx)
                .bind(r.latency_us_sum)
                .bind(r.latency_us_max)
                .execute(&mut *tx)
                .await?;
            }
            for (key_id, at) in last_used {
                sqlx::query("UPDATE keys SET last_used_at = MAX(COALESCE(last_used_at, 0), $2) WHERE key_id = $1")
                    .bind(key_id)
                    .bind(to_ms(*at))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn usage<'a>(
        &'a self,
        key_id: &'a str,
        since: OffsetDateTime,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<UsageBucket>, StoreError>> {
        Box::pin(shared::usage(&self.pool, key_id, since, limit))
    }

    fn note_network<'a>(
        &'a self,
        key_id: &'a str,
        network: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<NetworkSeen, StoreError>> {
        Box::pin(async move {
            if shared::network_known(&self.pool, key_id, network).await? {
                return Ok(NetworkSeen::Known);
            }
            let mut tx = self.write().await?;
            let seen = shared::add_network(&mut tx, key_id, network, at).await?;
            tx.commit().await?;
            Ok(seen)
        })
    }

    fn insert_alert<'a>(&'a self, alert: &'a Alert) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(shared::insert_alert(&self.pool, alert))
    }

    fn alerts(&self, since: Option<OffsetDateTime>, limit: u32) -> BoxFuture<'_, Result<Vec<Alert>, StoreError>> {
        Box::pin(shared::alerts(&self.pool, since, limit))
    }
}
