//! PostgreSQL (feature `postgres`): the store several key-service replicas share;
//! see [`PostgresStore`].

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Transaction;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::query::Query;
use time::OffsetDateTime;

use super::feed::{ChangeFeed, FeedCounters};
use super::usage::{Applied, BatchMark, TALLY_COLUMNS, Tally, UsageDelta, UsageKey, UsageTable, hours_of};
use super::{ChangeSink, StoreError};
use crate::key::KeyDigest;
use crate::server::events::ChangeNote;

super::queries::shared_queries!(
    sqlx::Postgres,
    row_lock = " FOR UPDATE",
    name_lock = super::xact_lock,
    skip_locked = " FOR UPDATE SKIP LOCKED"
);
super::webhooks::webhook_queries!(
    sqlx::Postgres,
    row_lock = " FOR UPDATE",
    name_lock = super::xact_lock,
    skip_locked = " FOR UPDATE SKIP LOCKED"
);

// Tokens (issue 14).
super::token_queries!(sqlx::Postgres, name_lock = super::xact_lock);

// Owners' limits and credits (issue 16).
super::owners::owner_queries!(sqlx::Postgres, name_lock = super::xact_lock);

// The credit reconciler (issue 16).
#[cfg(feature = "redis")]
super::credits::credit_queries!(sqlx::Postgres);

super::changelog::change_log_queries!(sqlx::Postgres);

/// Changes of one name in a namespace serialize, whether or not its row exists yet.
async fn xact_lock(conn: &mut PgConnection, namespace: i32, name: &str) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))").bind(namespace).bind(name).execute(conn).await?;
    Ok(())
}

/// Default most connections one replica opens (plus one for `LISTEN`).
const DEFAULT_MAX_CONNECTIONS: u32 = 10;
/// `statement_timeout` set on every connection unless the URL's `options` set one.
const STATEMENT_TIMEOUT: &str = "30s";
/// Advisory lock namespace of migrations (first key of the two-key form; the others are
/// in `queries`).
const LOCK_MIGRATE: i32 = 0x6b67_0001;
/// Advisory lock namespace of the change log: held from a change's log rows to its
/// commit, so that ids are handed out in commit order across replicas.
const LOCK_CHANGE_LOG: i32 = 0x6b67_0005;
/// Largest `NOTIFY` payload PostgreSQL takes is 8 000 bytes.
const MAX_PAYLOAD: usize = 7900;
/// Attempts of a usage batch that lost a deadlock or serialization race.
const USAGE_ATTEMPTS: u32 = 3;
/// A quiet `LISTEN` connection is checked this often...
const FEED_PING_EVERY: Duration = Duration::from_secs(10);
/// ...and counts as lost when the check takes longer than this.
const FEED_PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect delay bounds of the feed (full jitter).
const FEED_BACKOFF_MIN: Duration = Duration::from_millis(100);
const FEED_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A feed connection that lasted this long resets the backoff.
const FEED_STABLE_AFTER: Duration = Duration::from_secs(10);

/// A [`Store`](super::Store) on PostgreSQL, for several key-service replicas sharing one database.
///
/// - **Schema.** The tables of the SQLite store with PostgreSQL types (`BIGINT`,
///   `BYTEA`, `BOOLEAN`), created in the first schema of the `search_path`; pick one
///   with `?options=-c%20search_path%3D<schema>` on the URL.
/// - **Migrations** are sqlx's (`migrate!`, bookkept in `_sqlx_migrations` of the
///   schema) and run at start inside one transaction holding `pg_advisory_xact_lock`,
///   keyed by the schema: replicas starting together take turns, and the later ones
///   find the work done. DDL is transactional in PostgreSQL, so a failed migration
///   leaves nothing half applied, and the lock cannot leak. (sqlx's own lock is off: it
///   is a session lock keyed by the database alone, which an early error leaves held
///   by a pooled connection.)
/// - **Writes** lock what they change (`SELECT … FOR UPDATE` on the key, an advisory
///   lock per role name or per key for networks), so that concurrent changes through
///   different replicas serialize exactly as they do on SQLite.
/// - **Usage** is merged in the batch's transaction, table by table (minutes, then
///   routes, then keys' `last_used_at`), with three statements over arrays per table:
///   `INSERT … ON CONFLICT DO NOTHING` so every row exists, `SELECT … FOR UPDATE` in key
///   order, and an `UPDATE` with the merged counters and histograms. Replicas merging
///   the same rows take turns on the row locks, in the same order, so they cannot
///   deadlock; a batch that still loses a race is retried (it was rolled back as a
///   whole). The batch id is inserted first in the same transaction: a second replica
///   given the same batch waits on its primary key, then finds it and adds nothing.
/// - **Retention** takes minute rows with `DELETE … WHERE … IN (SELECT … FOR UPDATE SKIP
///   LOCKED) RETURNING …` and adds them to their hour rows in that transaction, so
///   replicas running it at once take disjoint rows.
/// - **Fan-out.** Every change that affects verification sends `NOTIFY` on the
///   deployment's channel in the transaction that makes it, so it is delivered exactly
///   when it commits. Each replica's feed task `LISTEN`s on a connection of its own and
///   forwards the other replicas' notes into its event hub; its own notes are skipped
///   (the store published them already). The
///   channel is `keygate_events` in schema `public` and `keygate_events_<schema>` in
///   another one, so deployments in different schemas of one database stay apart.
///   Open one store per replica: the id that tags a replica's notes is the store's, so
///   two key servers sharing one store value would skip each other's notes.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    listen_options: PgConnectOptions,
    schema: String,
    channel: String,
    origin: String,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user@host:port/db?options=...`) with up to 10
    /// pooled connections (plus one for `LISTEN`) and runs the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("cannot read the PostgreSQL URL: {e}")))?;
        Self::open_with(options, DEFAULT_MAX_CONNECTIONS).await
    }

    /// Connects with these options and pool size, and runs the migrations.
    pub async fn open_with(options: PgConnectOptions, max_connections: u32) -> Result<Self, StoreError> {
        let mut options = options;
        if options.get_application_name().is_none() {
            options = options.application_name("keygate-server");
        }
        if !options.get_options().is_some_and(|o| o.contains("statement_timeout")) {
            options = options.options([("statement_timeout", STATEMENT_TIMEOUT)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .idle_timeout(Duration::from_secs(600))
            .connect_with(options.clone())
            .await?;
        let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()::text").fetch_one(&pool).await?;
        let schema = schema.ok_or_else(|| {
            StoreError::Config("no schema of the search_path exists: create it, or fix `search_path`".into())
        })?;
        let channel = channel_for(&schema);
        let origin = replica_id();
        let listen_options = options.application_name(&listen_application_name(&origin, &channel));
        let store = Self { inner: Arc::new(Inner { pool, listen_options, schema, channel, origin }) };
        store.migrate().await?;
        Ok(store)
    }

    /// The connection pool, for tools and tests.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The schema the tables live in.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The `NOTIFY` channel replicas of this deployment share.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// This replica's id, which tags its notes to the others.
    pub fn replica_id(&self) -> &str {
        &self.inner.origin
    }

    /// The `application_name` of the `LISTEN` connection (find it in
    /// `pg_stat_activity`): `keygate-listen <replica id> <channel>`, cut to 63 bytes.
    pub fn listen_application_name(&self) -> String {
        listen_application_name(&self.inner.origin, &self.inner.channel)
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.inner.pool.close().await;
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut migrator = sqlx::migrate!("src/server/store/migrations/postgres");
        migrator.set_locking(false);
        let mut tx = self.write().await?;
        // Replicas starting together wait here for one another; the lock ends with
        // the transaction, whatever happens.
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()::text))")
            .bind(LOCK_MIGRATE)
            .execute(&mut *tx)
            .await?;
        migrator.run(&mut *tx).await.map_err(StoreError::Migration)?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn write(&self) -> Result<Transaction<'static, sqlx::Postgres>, StoreError> {
        Ok(self.inner.pool.begin().await?)
    }

    /// Logs the notes, sends them to every replica (this one included) and commits:
    /// `NOTIFY` in the transaction is delivered exactly when, and only if, the change
    /// commits. Logged notes are published by each replica's feed, this one's too, in
    /// the order of their ids; only the others (alerts, token changes) go to `sink` here.
    pub(super) async fn commit(
        &self,
        mut tx: Transaction<'static, sqlx::Postgres>,
        notes: &[ChangeNote],
        sink: &dyn ChangeSink,
    ) -> Result<(), StoreError> {
        let ids = if notes.iter().any(|n| super::changelog::row_of(n).is_some()) {
            // Until the commit: a change that took its id later commits later, so a
            // reader of the log never sees id n before an id below it is visible.
            sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()::text))")
                .bind(LOCK_CHANGE_LOG)
                .execute(&mut *tx)
                .await?;
            change_log_sql::append(&mut tx, notes, super::to_ms(super::now_ms())).await?
        } else {
            vec![None; notes.len()]
        };
        for (note, id) in notes.iter().zip(&ids) {
            let payload = note.encode(&self.inner.origin, *id);
            if payload.len() > MAX_PAYLOAD {
                // Only alerts can be this large (their detail); a key change never is.
                tracing::warn!(
                    bytes = payload.len(),
                    "change note too large for NOTIFY; other replicas will not see it"
                );
                continue;
            }
            sqlx::query("SELECT pg_notify($1, $2)").bind(&self.inner.channel).bind(payload).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        for (note, id) in notes.iter().zip(ids) {
            if id.is_none() {
                sink.publish(note, None);
            }
        }
        Ok(())
    }

    /// Stores a batch's usage in one transaction, with its batch id when it has one (a
    /// batch id applied before, by any replica, adds nothing). A transaction that lost
    /// a deadlock or serialization race, or found a row it had made sure of deleted by
    /// a roll-up, was rolled back as a whole and is tried again.
    pub(super) async fn record_usage(
        &self,
        batch: Option<BatchMark<'_>>,
        delta: &UsageDelta,
    ) -> Result<Applied, StoreError> {
        let mut attempt = 1;
        loop {
            match self.record_usage_once(batch, delta).await {
                Ok(Some(applied)) => return Ok(applied),
                Ok(None) if attempt < USAGE_ATTEMPTS => {
                    tracing::debug!(attempt, "usage rows were rolled up meanwhile; retrying");
                }
                Ok(None) => return Err(StoreError::Conflict("usage rows kept changing under the batch".into())),
                Err(e) if attempt < USAGE_ATTEMPTS && is_retryable(&e) => {
                    tracing::debug!(error = %e, attempt, "usage batch lost a lock race; retrying");
                }
                Err(e) => return Err(e),
            }
            attempt += 1;
        }
    }

    /// Starts forwarding the changes made through the other replicas into `sink`.
    /// Called from within a Tokio runtime.
    pub(super) fn follow_changes(&self, sink: Arc<dyn ChangeSink>, lag: metrics::Histogram) -> ChangeFeed {
        let inner = Arc::clone(&self.inner);
        ChangeFeed::spawn(lag, move |counters| feed(inner, sink, counters))
    }

    /// `None`: a row vanished under the transaction, which is rolled back.
    async fn record_usage_once(
        &self,
        batch: Option<BatchMark<'_>>,
        delta: &UsageDelta,
    ) -> Result<Option<Applied>, StoreError> {
        let mut tx = self.write().await?;
        if let Some(batch) = batch {
            if let Some(accepted) = shared::mark_batch(&mut tx, batch).await? {
                tx.rollback().await?;
                return Ok(Some(Applied::Before { accepted }));
            }
        }
        // Tables in one order (minutes, routes, keys) and rows in key order in each: two
        // transactions never wait for each other in a cycle.
        if !merge(&mut tx, UsageTable::Minutes, &delta.minutes).await?
            || !merge(&mut tx, UsageTable::Routes, &delta.routes).await?
        {
            tx.rollback().await?;
            return Ok(None);
        }
        if !delta.last_used.is_empty() {
            let ids: Vec<&str> = delta.last_used.keys().map(String::as_str).collect();
            let ats: Vec<i64> = delta.last_used.values().copied().collect();
            sqlx::query("SELECT key_id FROM keys WHERE key_id = ANY($1::TEXT[]) ORDER BY key_id FOR UPDATE")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE keys AS k SET last_used_at = GREATEST(COALESCE(k.last_used_at, 0), u.at) \
                 FROM UNNEST($1::TEXT[], $2::BIGINT[]) AS u(key_id, at) WHERE k.key_id = u.key_id",
            )
            .bind(&ids)
            .bind(&ats)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(Some(Applied::Now))
    }

    /// Moves up to `limit` minute rows older than `before` into hour rows, in one
    /// transaction; returns how many. Replicas running this at once take different rows
    /// (`SKIP LOCKED`), and a row deleted is added to its hour in the same commit: no
    /// minute is rolled up twice or lost.
    pub(super) async fn roll_up(&self, before: i64, limit: u32) -> Result<u64, StoreError> {
        let mut attempt = 1;
        loop {
            let result = async {
                let mut tx = self.write().await?;
                let taken = shared::take_minutes(&mut tx, before, limit).await?;
                let n = taken.len() as u64;
                if !merge(&mut tx, UsageTable::Hours, &hours_of(taken)).await? {
                    tx.rollback().await?;
                    return Ok(None);
                }
                tx.commit().await?;
                Ok(Some(n))
            }
            .await;
            match result {
                Ok(Some(n)) => return Ok(n),
                Ok(None) if attempt < USAGE_ATTEMPTS => {}
                Ok(None) => return Ok(0),
                Err(e) if attempt < USAGE_ATTEMPTS && is_retryable(&e) => {}
                Err(e) => return Err(e),
            }
            attempt += 1;
        }
    }
}

/// The key columns of rows to merge, as arrays to bind.
struct KeyArrays<'a> {
    ids: Vec<&'a str>,
    ats: Vec<i64>,
    routes: Vec<&'a str>,
    methods: Vec<&'a str>,
    outcomes: Vec<&'a str>,
}

impl<'a> KeyArrays<'a> {
    fn of(keys: impl Iterator<Item = &'a UsageKey>) -> Self {
        let mut a =
            Self { ids: Vec::new(), ats: Vec::new(), routes: Vec::new(), methods: Vec::new(), outcomes: Vec::new() };
        for k in keys {
            a.ids.push(&k.key_id);
            a.ats.push(k.at);
            a.routes.push(&k.route);
            a.methods.push(&k.method);
            a.outcomes.push(&k.outcome);
        }
        a
    }

    fn bind<'q>(
        &'q self,
        q: Query<'q, sqlx::Postgres, PgArguments>,
        table: UsageTable,
    ) -> Query<'q, sqlx::Postgres, PgArguments> {
        let q = q.bind(&self.ids).bind(&self.ats);
        if table.routed() { q.bind(&self.routes).bind(&self.methods).bind(&self.outcomes) } else { q }
    }
}

/// Adds `rows` into `table` exactly, whatever other transactions add at the same
/// time: every row is made to exist (`INSERT … ON CONFLICT DO NOTHING`), locked and read
/// (`SELECT … FOR UPDATE`), merged here and written back, each step one statement over
/// arrays, rows in key order. `false` when a row was deleted between the first two
/// steps (retention rolled it up): the caller rolls back and tries again.
async fn merge(
    conn: &mut PgConnection,
    table: UsageTable,
    rows: &BTreeMap<UsageKey, Tally>,
) -> Result<bool, StoreError> {
    if rows.is_empty() {
        return Ok(true);
    }
    let name = table.name();
    let keys = table.key_columns();
    let key_list = keys.join(", ");
    let key_types = ["TEXT", "BIGINT", "TEXT", "TEXT", "TEXT"];
    let key_arrays: Vec<String> = (0..keys.len()).map(|i| format!("${}::{}[]", i + 1, key_types[i])).collect();
    let key_arrays = key_arrays.join(", ");
    let tally_list = TALLY_COLUMNS.join(", ");
    let arrays = KeyArrays::of(rows.keys());

    let zeros = "0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NULL";
    let insert = format!(
        "INSERT INTO {name} ({key_list}, {tally_list}) SELECT {key_list}, {zeros} FROM UNNEST({key_arrays}) \
         AS u({key_list}) ORDER BY {key_list} ON CONFLICT DO NOTHING"
    );
    arrays.bind(sqlx::query(&insert), table).execute(&mut *conn).await?;

    let lock = format!(
        "SELECT {key_list}, {tally_list} FROM {name} WHERE ({key_list}) IN (SELECT * FROM UNNEST({key_arrays})) \
         ORDER BY {key_list} FOR UPDATE"
    );
    let found = arrays.bind(sqlx::query(&lock), table).fetch_all(&mut *conn).await?;
    if found.len() != rows.len() {
        return Ok(false);
    }
    let mut merged = Vec::with_capacity(rows.len());
    for row in &found {
        let key = UsageKey::from_row(row, table)?;
        let Some(add) = rows.get(&key) else {
            return Err(StoreError::Corrupt(format!("{name}: a row locked that was not asked for")));
        };
        let mut tally = Tally::from_row(row)?;
        tally.merge(add);
        merged.push((key, tally.values()));
    }

    let n = keys.len();
    let mut value_arrays: Vec<String> = (0..10).map(|i| format!("${}::BIGINT[]", n + 1 + i)).collect();
    value_arrays.push(format!("${}::TEXT[]", n + 11));
    let sets: Vec<String> = TALLY_COLUMNS.iter().map(|c| format!("{c} = u.{c}")).collect();
    let matches: Vec<String> = keys.iter().map(|c| format!("t.{c} = u.{c}")).collect();
    let update = format!(
        "UPDATE {name} AS t SET {} FROM UNNEST({key_arrays}, {}) AS u({key_list}, {tally_list}) WHERE {}",
        sets.join(", "),
        value_arrays.join(", "),
        matches.join(" AND ")
    );
    let written = KeyArrays::of(merged.iter().map(|(k, _)| k));
    let mut q = written.bind(sqlx::query(&update), table);
    let columns: Vec<Vec<i64>> = (0..10).map(|c| merged.iter().map(|(_, (ints, _))| ints[c]).collect()).collect();
    for column in &columns {
        q = q.bind(column);
    }
    let latencies: Vec<Option<&str>> = merged.iter().map(|(_, (_, l))| l.as_deref()).collect();
    q.bind(&latencies).execute(&mut *conn).await?;
    Ok(true)
}

/// `keygate_events` for schema `public`; `keygate_events_<schema>` for another schema
/// whose name is plain (`[a-z0-9_]`, at most 32 bytes); otherwise a name derived from
/// a digest of the schema's. Always a valid identifier of at most 47 bytes.
fn channel_for(schema: &str) -> String {
    if schema == "public" {
        return "keygate_events".into();
    }
    let plain = schema.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if plain && schema.len() <= 32 {
        return format!("keygate_events_{schema}");
    }
    let digest = KeyDigest::of(schema.as_bytes()).to_hex();
    format!("keygate_events_{}", &digest[..16])
}

/// What PostgreSQL keeps of an `application_name` (it cuts at 63 bytes); ASCII only.
fn listen_application_name(origin: &str, channel: &str) -> String {
    let mut name = format!("keygate-listen {origin} {channel}");
    name.truncate(63);
    name
}

/// A replica's id in its notes: random, or (no randomness) the time and process id,
/// which tell replicas apart as well.
fn replica_id() -> String {
    let id = getrandom::u64().unwrap_or_else(|_| {
        (OffsetDateTime::now_utc().unix_timestamp_nanos() as u64) ^ u64::from(std::process::id()).rotate_left(32)
    });
    format!("{id:016x}")
}

fn is_retryable(e: &StoreError) -> bool {
    let (StoreError::Database(err) | StoreError::Unavailable(err)) = e else { return false };
    // 40001 serialization_failure, 40P01 deadlock_detected.
    err.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "40001" || c == "40P01")
}

/// The `LISTEN` loop of one replica: connect, listen, forward; on any loss, reconnect
/// with backoff and publish `reset`.
async fn feed(inner: Arc<Inner>, sink: Arc<dyn ChangeSink>, counters: Arc<FeedCounters>) {
    let mut failures: u32 = 0;
    loop {
        let mut listener = match listen(&inner).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(channel = %inner.channel, error = %e, "change feed: cannot listen; retrying");
                tokio::time::sleep(backoff(failures)).await;
                failures = failures.saturating_add(1);
                continue;
            }
        };
        let connects = counters.set_connected(true);
        // Listening now: what was committed before is in the log, what commits from
        // now on is heard (the hub skips what it hears twice).
        match catch_up(&inner, &*sink).await {
            Ok(CatchUp::Published(n)) => {
                counters.caught_up(n);
                if connects > 1 {
                    tracing::info!(channel = %inner.channel, changes = n, "change feed reconnected; caught up from the change log");
                } else {
                    tracing::info!(channel = %inner.channel, "change feed listening");
                }
            }
            Ok(CatchUp::TooFar) => {
                tracing::warn!(channel = %inner.channel, "change feed reconnected after a gap the change log no longer holds: told subscribers to reset");
                sink.publish(&ChangeNote::Reset("gap".into()), None);
            }
            Err(e) => {
                tracing::warn!(channel = %inner.channel, error = %e, "change feed cannot read the change log: told subscribers to reset");
                sink.publish(&ChangeNote::Reset("gap".into()), None);
            }
        }
        if connects > 1 {
            // Token changes are not logged: reload them, in case one was missed.
            sink.publish(&ChangeNote::Tokens, None);
        }
        let up = tokio::time::Instant::now();
        let why = pump(&mut listener, &inner, &*sink, &counters).await;
        counters.set_connected(false);
        drop(listener);
        tracing::warn!(channel = %inner.channel, error = %why, "change feed lost; reconnecting");
        if up.elapsed() >= FEED_STABLE_AFTER {
            failures = 0;
        }
        tokio::time::sleep(backoff(failures)).await;
        failures = failures.saturating_add(1);
    }
}

/// What a catch-up did.
enum CatchUp {
    /// Published this many changes from the log.
    Published(u64),
    /// The log no longer holds (or holds too much of) what was missed; the sink was
    /// moved past it.
    TooFar,
}

/// Most pages of the change log a feed reads to catch up before it resets instead.
const CATCH_UP_MAX_PAGES: u32 = 200;

/// Publishes the logged changes after the sink's position, in order.
async fn catch_up(inner: &Inner, sink: &dyn ChangeSink) -> Result<CatchUp, StoreError> {
    let mut after = sink.position();
    let bounds = change_log_sql::bounds(&inner.pool).await?;
    let missing = bounds.oldest.is_some_and(|oldest| after.saturating_add(1) < oldest);
    let mut published = 0;
    if !missing {
        for _ in 0..CATCH_UP_MAX_PAGES {
            let page = change_log_sql::after(&inner.pool, after, super::changelog::PAGE_ROWS).await?;
            let Some(&(last, _)) = page.last() else { return Ok(CatchUp::Published(published)) };
            for (id, note) in &page {
                sink.publish(note, Some(*id));
            }
            published += page.len() as u64;
            after = last;
        }
    }
    sink.skip_to(bounds.newest);
    Ok(CatchUp::TooFar)
}

async fn listen(inner: &Inner) -> Result<PgListener, sqlx::Error> {
    // A connection of its own, not from the store's pool: it lives as long as the feed
    // and never runs anything but LISTEN and its liveness check.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(FEED_PING_TIMEOUT)
        .connect_lazy_with(inner.listen_options.clone());
    let mut listener = tokio::time::timeout(FEED_PING_TIMEOUT, PgListener::connect_with(&pool))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    tokio::time::timeout(FEED_PING_TIMEOUT, listener.listen(&inner.channel))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    Ok(listener)
}

/// Forwards notes until the connection is lost; returns why.
async fn pump(listener: &mut PgListener, inner: &Inner, sink: &dyn ChangeSink, counters: &FeedCounters) -> String {
    loop {
        // `try_recv` is cancel-safe: a timeout loses nothing.
        match tokio::time::timeout(FEED_PING_EVERY, listener.try_recv()).await {
            Ok(Ok(Some(n))) => counters.forward(sink, &inner.origin, n.payload()),
            Ok(Ok(None)) => return "connection closed".into(),
            Ok(Err(e)) => return e.to_string(),
            Err(_) => {
                match tokio::time::timeout(FEED_PING_TIMEOUT, sqlx::query("SELECT 1").execute(&mut *listener)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("liveness check failed: {e}"),
                    Err(_) => return format!("liveness check took over {FEED_PING_TIMEOUT:?}"),
                }
            }
        }
    }
}

/// Full jitter: uniform in `[0, min(max, min × 2^failures)]`.
fn backoff(failures: u32) -> Duration {
    let cap = FEED_BACKOFF_MIN.saturating_mul(1u32 << failures.min(16)).min(FEED_BACKOFF_MAX);
    let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX).max(1);
    let random = getrandom::u64().unwrap_or(cap_ms / 2);
    Duration::from_millis(random % (cap_ms + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_are_per_schema_and_always_valid_identifiers() {
        assert_eq!(channel_for("public"), "keygate_events");
        assert_eq!(channel_for("kg_test_ab12"), "keygate_events_kg_test_ab12");
        for odd in ["Weird \"Schema\"", &"x".repeat(63), "ünïcode"] {
            let c = channel_for(odd);
            assert!(c.len() <= 63 && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{c}");
        }
        assert!(listen_application_name(&replica_id(), &channel_for(&"y".repeat(63))).len() <= 63);
        assert!(channel_for(&"y".repeat(32)).len() <= 47);
    }

    #[test]
    fn backoff_stays_in_bounds() {
        for failures in [0, 1, 5, 40, u32::MAX] {
            assert!(backoff(failures) <= FEED_BACKOFF_MAX);
        }
        assert!(backoff(0) <= FEED_BACKOFF_MIN);
    }
}
