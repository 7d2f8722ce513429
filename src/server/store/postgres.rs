//! PostgreSQL (feature `postgres`): the store several key-service replicas share;
//! see [`PostgresStore`].

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Transaction;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use time::OffsetDateTime;

use super::{BoxFuture, Found, KeyChange, MinuteRow, NetworkSeen, NewKeyRecord, NewSecret, Store, StoreError, to_ms};
use crate::key::KeyDigest;
use crate::server::events::{ChangeFeed, ChangeNote, EventHub, FeedCounters, KeyEvent, MAX_EVENTS_PER_CHANGE};
use crate::server::model::{Alert, AuditRecord, KeyInfo, KeyPatch, RoleInfo, UsageBucket};

super::queries::shared_queries!(sqlx::Postgres, row_lock = " FOR UPDATE");

const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("migrations/postgres_0001_initial.sql"))];

/// Default most connections one replica opens (plus one for `LISTEN`).
const DEFAULT_MAX_CONNECTIONS: u32 = 10;
/// `statement_timeout` set on every connection unless the URL's `options` set one.
const STATEMENT_TIMEOUT: &str = "30s";
/// Advisory lock namespaces (first key of the two-key form).
const LOCK_MIGRATE: i32 = 0x6b67_0001;
const LOCK_ROLE: i32 = 0x6b67_0002;
const LOCK_NETWORK: i32 = 0x6b67_0003;
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

/// A [`Store`] on PostgreSQL, for several key-service replicas sharing one database.
///
/// - **Schema.** The tables of the SQLite store with PostgreSQL types (`BIGINT`,
///   `BYTEA`, `BOOLEAN`), created in the first schema of the `search_path`; pick one
///   with `?options=-c%20search_path%3D<schema>` on the URL.
/// - **Migrations** run at start inside one transaction holding
///   `pg_advisory_xact_lock`, keyed by the schema: replicas starting together take
///   turns, and the later ones find the work done. DDL is transactional in PostgreSQL,
///   so a failed migration leaves nothing half applied, and the lock cannot leak.
/// - **Writes** lock what they change (`SELECT … FOR UPDATE` on the key, an advisory
///   lock per role name or per key for networks), so that concurrent changes through
///   different replicas serialize exactly as they do on SQLite.
/// - **Usage** is added with one `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO UPDATE
///   SET n = t.n + EXCLUDED.n, max = GREATEST(…)` per batch, rows in key order so that
///   two replicas ingesting the same keys cannot deadlock; a batch that still loses a
///   deadlock or serialization race is retried (it was rolled back as a whole).
/// - **Fan-out.** Every change that affects verification sends `NOTIFY` on the
///   deployment's channel in the transaction that makes it, so it is delivered exactly
///   when it commits. Each replica's [`follow_changes`](Store::follow_changes) task
///   `LISTEN`s on a connection of its own and forwards the other replicas' notes into
///   its [`EventHub`]; its own notes are skipped (the API published them already). The
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
        let mut tx = self.inner.pool.begin().await?;
        // Replicas starting together wait here for one another; the lock ends with
        // the transaction, whatever happens.
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()::text))")
            .bind(LOCK_MIGRATE)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS keygate_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let schema = &self.inner.schema;
        shared::migrate(&mut tx, MIGRATIONS, |version| tracing::info!(version, schema = %schema, "applied migration"))
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn write(&self) -> Result<Transaction<'static, sqlx::Postgres>, StoreError> {
        Ok(self.inner.pool.begin().await?)
    }

    /// Makes a change of a key, holding its row lock, and tells the other replicas.
    async fn change_key(
        &self,
        key_id: &str,
        change: KeyChange<'_>,
        actor: &str,
        at: OffsetDateTime,
    ) -> Result<KeyInfo, StoreError> {
        let mut tx = self.write().await?;
        let key = shared::change_key(&mut tx, key_id, &change, actor, at).await?;
        let event = match change {
            KeyChange::Update(_) => KeyEvent::Updated,
            KeyChange::Rotate { .. } => KeyEvent::Rotated,
            KeyChange::Revoke => KeyEvent::Revoked,
        };
        self.notify(&mut tx, &ChangeNote::Key(event, key.key_id.clone())).await?;
        tx.commit().await?;
        Ok(key)
    }

    /// Queues a note to the other replicas: sent when `conn`'s transaction commits.
    async fn notify(&self, conn: &mut PgConnection, note: &ChangeNote) -> Result<(), StoreError> {
        let payload = note.encode(&self.inner.origin);
        if payload.len() > MAX_PAYLOAD {
            // Only alerts can be this large (their detail); a key change never is.
            tracing::warn!(bytes = payload.len(), "change note too large for NOTIFY; other replicas will not see it");
            return Ok(());
        }
        sqlx::query("SELECT pg_notify($1, $2)").bind(&self.inner.channel).bind(payload).execute(&mut *conn).await?;
        Ok(())
    }

    async fn record_usage_once(
        &self,
        rows: &[MinuteRow],
        last_used: &[(String, OffsetDateTime)],
    ) -> Result<(), StoreError> {
        // One row per (key, minute), in key order: a statement never touches a row twice,
        // and concurrent batches take their row locks in the same order.
        let mut merged: BTreeMap<(&str, i64), MinuteRow> = BTreeMap::new();
        for r in rows {
            let m = merged.entry((r.key_id.as_str(), r.minute)).or_insert_with(|| MinuteRow {
                key_id: r.key_id.clone(),
                minute: r.minute,
                ..MinuteRow::default()
            });
            m.requests += r.requests;
            m.allowed += r.allowed;
            m.denied += r.denied;
            m.status_2xx += r.status_2xx;
            m.status_4xx += r.status_4xx;
            m.status_5xx += r.status_5xx;
            m.latency_us_sum += r.latency_us_sum;
            m.latency_us_max = m.latency_us_max.max(r.latency_us_max);
        }
        let mut used: BTreeMap<&str, i64> = BTreeMap::new();
        for (key_id, at) in last_used {
            let e = used.entry(key_id.as_str()).or_insert(i64::MIN);
            *e = (*e).max(to_ms(*at));
        }
        let column = |f: fn(&MinuteRow) -> i64| merged.values().map(f).collect::<Vec<i64>>();

        let mut tx = self.write().await?;
        if !merged.is_empty() {
            sqlx::query(
                "INSERT INTO usage_minutes AS t (key_id, minute, requests, allowed, denied, status_2xx, status_4xx, \
                 status_5xx, latency_us_sum, latency_us_max) \
                 SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::BIGINT[], \
                 $6::BIGINT[], $7::BIGINT[], $8::BIGINT[], $9::BIGINT[], $10::BIGINT[]) \
                 ON CONFLICT (key_id, minute) DO UPDATE SET \
                 requests = t.requests + EXCLUDED.requests, \
                 allowed = t.allowed + EXCLUDED.allowed, \
                 denied = t.denied + EXCLUDED.denied, \
                 status_2xx = t.status_2xx + EXCLUDED.status_2xx, \
                 status_4xx = t.status_4xx + EXCLUDED.status_4xx, \
                 status_5xx = t.status_5xx + EXCLUDED.status_5xx, \
                 latency_us_sum = t.latency_us_sum + EXCLUDED.latency_us_sum, \
                 latency_us_max = GREATEST(t.latency_us_max, EXCLUDED.latency_us_max)",
            )
            .bind(merged.values().map(|r| r.key_id.clone()).collect::<Vec<String>>())
            .bind(column(|r| r.minute))
            .bind(column(|r| r.requests))
            .bind(column(|r| r.allowed))
            .bind(column(|r| r.denied))
            .bind(column(|r| r.status_2xx))
            .bind(column(|r| r.status_4xx))
            .bind(column(|r| r.status_5xx))
            .bind(column(|r| r.latency_us_sum))
            .bind(column(|r| r.latency_us_max))
            .execute(&mut *tx)
            .await?;
        }
        if !used.is_empty() {
            let ids: Vec<String> = used.keys().map(|k| (*k).to_owned()).collect();
            let ats: Vec<i64> = used.values().copied().collect();
            // Key rows locked in key order first, for the same reason.
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
        Ok(())
    }
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

impl Store for PostgresStore {
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.inner.pool).await?;
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
        Box::pin(shared::get_key(&self.inner.pool, key_id))
    }

    fn list_keys<'a>(&'a self, owner: Option<&'a str>, limit: u32) -> BoxFuture<'a, Result<Vec<KeyInfo>, StoreError>> {
        Box::pin(shared::list_keys(&self.inner.pool, owner, limit))
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
            // Changes of one role serialize, whether or not it exists yet.
            sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
                .bind(LOCK_ROLE)
                .bind(name)
                .execute(&mut *tx)
                .await?;
            let (role, affected) = shared::put_role(&mut tx, name, scopes, actor, at).await?;
            // The same notes the API publishes locally (see `api::put_role`).
            if affected.len() > MAX_EVENTS_PER_CHANGE {
                self.notify(&mut tx, &ChangeNote::Reset("bulk".into())).await?;
            } else {
                for key_id in &affected {
                    self.notify(&mut tx, &ChangeNote::Key(KeyEvent::Updated, key_id.clone())).await?;
                }
            }
            tx.commit().await?;
            Ok((role, affected))
        })
    }

    fn list_roles(&self) -> BoxFuture<'_, Result<Vec<RoleInfo>, StoreError>> {
        Box::pin(shared::list_roles(&self.inner.pool))
    }

    fn find_by_digest<'a>(&'a self, digest: &'a KeyDigest) -> BoxFuture<'a, Result<Option<Found>, StoreError>> {
        Box::pin(shared::find_by_digest(&self.inner.pool, digest))
    }

    fn audit(&self, since: Option<OffsetDateTime>, limit: u32) -> BoxFuture<'_, Result<Vec<AuditRecord>, StoreError>> {
        Box::pin(shared::audit(&self.inner.pool, since, limit))
    }

    fn record_usage<'a>(
        &'a self,
        rows: &'a [MinuteRow],
        last_used: &'a [(String, OffsetDateTime)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut attempt = 1;
            loop {
                match self.record_usage_once(rows, last_used).await {
                    Err(e) if attempt < USAGE_ATTEMPTS && is_retryable(&e) => {
                        tracing::debug!(error = %e, attempt, "usage batch lost a lock race; retrying");
                        attempt += 1;
                    }
                    other => return other,
                }
            }
        })
    }

    fn usage<'a>(
        &'a self,
        key_id: &'a str,
        since: OffsetDateTime,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<UsageBucket>, StoreError>> {
        Box::pin(shared::usage(&self.inner.pool, key_id, since, limit))
    }

    fn note_network<'a>(
        &'a self,
        key_id: &'a str,
        network: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<NetworkSeen, StoreError>> {
        Box::pin(async move {
            if shared::network_known(&self.inner.pool, key_id, network).await? {
                return Ok(NetworkSeen::Known);
            }
            let mut tx = self.write().await?;
            // One key's networks are counted one replica at a time, so that exactly one
            // of two concurrent first sightings is the first.
            sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
                .bind(LOCK_NETWORK)
                .bind(key_id)
                .execute(&mut *tx)
                .await?;
            let seen = shared::add_network(&mut tx, key_id, network, at).await?;
            tx.commit().await?;
            Ok(seen)
        })
    }

    fn insert_alert<'a>(&'a self, alert: &'a Alert) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut tx = self.write().await?;
            let stored = shared::insert_alert(&mut *tx, alert).await?;
            if stored {
                self.notify(&mut tx, &ChangeNote::Alert(Box::new(alert.clone()))).await?;
            }
            tx.commit().await?;
            Ok(stored)
        })
    }

    fn alerts(&self, since: Option<OffsetDateTime>, limit: u32) -> BoxFuture<'_, Result<Vec<Alert>, StoreError>> {
        Box::pin(shared::alerts(&self.inner.pool, since, limit))
    }

    fn follow_changes(&self, hub: &EventHub) -> Option<ChangeFeed> {
        let inner = Arc::clone(&self.inner);
        let hub = hub.clone();
        Some(ChangeFeed::spawn(move |counters| feed(inner, hub, counters)))
    }
}

/// The `LISTEN` loop of one replica: connect, listen, forward; on any loss, reconnect
/// with backoff and publish `reset`.
async fn feed(inner: Arc<Inner>, hub: EventHub, counters: Arc<FeedCounters>) {
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
        // Changes made while not listening were not heard: subscribers must start over.
        // The first connection only needs it when someone subscribed before it was up.
        if connects > 1 || hub.subscribers() > 0 {
            hub.reset("gap");
        }
        if connects > 1 {
            tracing::warn!(channel = %inner.channel, "change feed reconnected after a gap: told subscribers to reset");
        } else {
            tracing::info!(channel = %inner.channel, "change feed listening");
        }
        let up = tokio::time::Instant::now();
        let why = pump(&mut listener, &inner, &hub, &counters).await;
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
async fn pump(listener: &mut PgListener, inner: &Inner, hub: &EventHub, counters: &FeedCounters) -> String {
    loop {
        // `try_recv` is cancel-safe: a timeout loses nothing.
        match tokio::time::timeout(FEED_PING_EVERY, listener.try_recv()).await {
            Ok(Ok(Some(n))) => counters.forward(hub, &inner.origin, n.payload()),
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
