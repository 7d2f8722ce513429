//! The embedded default: SQLite through sqlx, a file (WAL) or `sqlite::memory:`.

use std::str::FromStr;
use std::time::Duration;

use std::collections::BTreeMap;

use sqlx::Transaction;
use sqlx::migrate::Migrator;
use sqlx::query::Query;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};

use super::usage::{Applied, BatchMark, TALLY_COLUMNS, Tally, UsageDelta, UsageKey, UsageTable, hours_of};
use super::{ChangeSink, StoreError};
use crate::server::events::ChangeNote;

// SQLite has no row locks; a write transaction (`BEGIN IMMEDIATE`) already holds the
// database's write lock.
super::queries::shared_queries!(sqlx::Sqlite, row_lock = "", name_lock = super::no_lock, skip_locked = "");
super::webhooks::webhook_queries!(sqlx::Sqlite, row_lock = "", name_lock = super::no_lock, skip_locked = "");

// Tokens (issue 14).
super::token_queries!(sqlx::Sqlite, name_lock = super::no_lock);

// Owners' limits and credits (issue 16).
super::owners::owner_queries!(sqlx::Sqlite, name_lock = super::no_lock);

// The credit reconciler (issue 16).
#[cfg(feature = "redis")]
super::credits::credit_queries!(sqlx::Sqlite);

super::changelog::change_log_queries!(sqlx::Sqlite);

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
    memory: bool,
    /// Held from a change's log rows to its publication, so that this process publishes
    /// changes in the order of their ids.
    publishing: std::sync::Arc<tokio::sync::Mutex<()>>,
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
        let store = Self { pool, memory, publishing: Default::default() };
        store.migrate().await?;
        Ok(store)
    }

    /// Whether this is `sqlite::memory:` (gone with the process).
    pub(super) fn is_memory(&self) -> bool {
        self.memory
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

    /// Logs the notes (the write lock orders their ids), commits and hands them to
    /// `sink` in id order (one process serves a SQLite store: nobody else needs them).
    pub(super) async fn commit(
        &self,
        mut tx: Transaction<'static, sqlx::Sqlite>,
        notes: &[ChangeNote],
        sink: &dyn ChangeSink,
    ) -> Result<(), StoreError> {
        if notes.is_empty() {
            return Ok(tx.commit().await?);
        }
        // Two changes commit one after the other, but their publications could race
        // and swap: a subscriber seeing id 11 before 10 would resume after 11.
        let _in_order = self.publishing.lock().await;
        let ids = change_log_sql::append(&mut tx, notes, super::to_ms(super::now_ms())).await?;
        tx.commit().await?;
        for (note, id) in notes.iter().zip(ids) {
            sink.publish(note, id);
        }
        Ok(())
    }

    /// Stores a batch's usage in one transaction, with its batch id when it has one
    /// (a batch id applied before adds nothing). The write lock makes the reads and
    /// writes of the merge one step.
    pub(super) async fn record_usage(
        &self,
        batch: Option<BatchMark<'_>>,
        delta: &UsageDelta,
    ) -> Result<Applied, StoreError> {
        let mut tx = self.write().await?;
        if let Some(batch) = batch {
            if let Some(accepted) = shared::mark_batch(&mut tx, batch).await? {
                tx.rollback().await?;
                return Ok(Applied::Before { accepted });
            }
        }
        merge(&mut tx, UsageTable::Minutes, &delta.minutes).await?;
        merge(&mut tx, UsageTable::Routes, &delta.routes).await?;
        for (key_id, at) in &delta.last_used {
            sqlx::query(
                "UPDATE keys SET last_used_at = $2 WHERE key_id = $1 AND (last_used_at IS NULL OR last_used_at < $2)",
            )
            .bind(key_id)
            .bind(*at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Applied::Now)
    }

    /// Moves up to `limit` minute rows older than `before` into hour rows, in one
    /// transaction; returns how many.
    pub(super) async fn roll_up(&self, before: i64, limit: u32) -> Result<u64, StoreError> {
        let mut tx = self.write().await?;
        let taken = shared::take_minutes(&mut tx, before, limit).await?;
        let n = taken.len() as u64;
        merge(&mut tx, UsageTable::Hours, &hours_of(taken)).await?;
        tx.commit().await?;
        Ok(n)
    }
}

/// Adds `rows` into `table`: read, merge, write back, row by row, under the write lock.
async fn merge(
    conn: &mut SqliteConnection,
    table: UsageTable,
    rows: &BTreeMap<UsageKey, Tally>,
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let keys = table.key_columns();
    let matches: Vec<String> = keys.iter().enumerate().map(|(i, c)| format!("{c} = ${}", i + 1)).collect();
    let select = format!("SELECT {} FROM {} WHERE {}", TALLY_COLUMNS.join(", "), table.name(), matches.join(" AND "));
    let columns: Vec<&str> = keys.iter().chain(TALLY_COLUMNS.iter()).copied().collect();
    let marks: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
    let sets: Vec<String> = TALLY_COLUMNS.iter().map(|c| format!("{c} = excluded.{c}")).collect();
    let upsert = format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}",
        table.name(),
        columns.join(", "),
        marks.join(", "),
        keys.join(", "),
        sets.join(", ")
    );
    for (key, add) in rows {
        let found = bind_key(sqlx::query(&select), table, key).fetch_optional(&mut *conn).await?;
        let mut tally = match found {
            Some(row) => Tally::from_row(&row)?,
            None => Tally::default(),
        };
        tally.merge(add);
        let (ints, latency) = tally.values();
        let mut q = bind_key(sqlx::query(&upsert), table, key);
        for v in ints {
            q = q.bind(v);
        }
        q.bind(latency).execute(&mut *conn).await?;
    }
    Ok(())
}

fn bind_key<'q>(
    q: Query<'q, sqlx::Sqlite, SqliteArguments<'q>>,
    table: UsageTable,
    key: &'q UsageKey,
) -> Query<'q, sqlx::Sqlite, SqliteArguments<'q>> {
    let q = q.bind(key.key_id.as_str()).bind(key.at);
    if table.routed() { q.bind(key.route.as_str()).bind(key.method.as_str()).bind(key.outcome.as_str()) } else { q }
}
