//! The embedded default: SQLite through sqlx, a file (WAL) or `sqlite::memory:`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Transaction;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use time::OffsetDateTime;

use super::{MinuteRow, StoreError, to_ms};
use crate::server::events::ChangeNote;

// SQLite has no row locks; a write transaction (`BEGIN IMMEDIATE`) already holds the
// database's write lock.
super::queries::shared_queries!(sqlx::Sqlite, row_lock = "", name_lock = super::no_lock);

static MIGRATOR: Migrator = sqlx::migrate!("src/server/store/migrations/sqlite");

/// One writer at a time is SQLite's own rule: a write transaction is lock enough.
async fn no_lock(_: &mut SqliteConnection, _: i32, _: &str) -> Result<(), StoreError> {
    Ok(())
}

/// A [`Store`](super::Store) on SQLite.
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

    /// The migrations sqlx embedded, in one `BEGIN IMMEDIATE` transaction: two
    /// processes opening a new file take turns.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        MIGRATOR.run(&mut *tx).await.map_err(StoreError::Migration)?;
        tx.commit().await?;
        Ok(())
    }

    /// A write transaction: `BEGIN IMMEDIATE`, so that concurrent writers queue for the
    /// write lock instead of failing on an upgrade.
    pub(super) async fn write(&self) -> Result<Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Commits; the notes need no more (one process serves a SQLite store).
    pub(super) async fn commit(
        &self,
        tx: Transaction<'static, sqlx::Sqlite>,
        _: &[ChangeNote],
    ) -> Result<(), StoreError> {
        Ok(tx.commit().await?)
    }

    /// Adds per-minute aggregates with one upsert per row.
    pub(super) async fn record_usage(
        &self,
        rows: &[MinuteRow],
        last_used: &[(String, OffsetDateTime)],
    ) -> Result<(), StoreError> {
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
    }
}
