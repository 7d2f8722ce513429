//! The embedded default: SQLite through sqlx, a file (WAL) or `sqlite::memory:`.

use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Transaction};
use time::OffsetDateTime;

use super::rows::{
    ALERT_COLUMNS, AUDIT_COLUMNS, KEY_COLUMNS, USAGE_COLUMNS, alert_from_row, audit_from_row, bucket_from_row,
    key_from_row,
};
use super::{
    BoxFuture, Found, MinuteRow, NetworkSeen, NewKeyRecord, NewSecret, Store, StoreError, action, apply_patch, from_ms,
    from_ms_opt, parse_json_list, to_ms,
};
use crate::key::KeyDigest;
use crate::server::model::{Alert, AuditRecord, KeyInfo, KeyPatch, RoleInfo, UsageBucket};

super::writes::shared_writes!(SqliteConnection);

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
        let current: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM keygate_migrations").fetch_one(&mut *tx).await?;
        for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(|source| StoreError::Migration { version, source })?;
            sqlx::query("INSERT INTO keygate_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(to_ms(OffsetDateTime::now_utc()))
                .execute(&mut *tx)
                .await?;
            tracing::info!(version, "applied migration");
        }
        tx.commit().await?;
        Ok(())
    }

    async fn write(&self) -> Result<Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Rows of an append-only table, oldest first: from `since` on, or the newest `limit`.
    async fn recent(
        &self,
        table: &str,
        cols: &str,
        since: Option<OffsetDateTime>,
        limit: u32,
    ) -> Result<Vec<SqliteRow>, StoreError> {
        let sql = format!(
            "SELECT * FROM (SELECT {cols} FROM {table} WHERE $1 IS NULL OR at >= $1 \
             ORDER BY CASE WHEN $1 IS NULL THEN -id ELSE id END LIMIT $2) ORDER BY id"
        );
        Ok(sqlx::query(&sql).bind(since.map(to_ms)).bind(i64::from(limit)).fetch_all(&self.pool).await?)
    }

    /// Starts a change of an unrevoked key: the write transaction and the key as stored.
    async fn begin_change(&self, key_id: &str) -> Result<(Transaction<'static, sqlx::Sqlite>, KeyInfo), StoreError> {
        let mut tx = self.write().await?;
        let key = load_key(&mut tx, key_id).await?;
        refuse_revoked(&key)?;
        Ok((tx, key))
    }
}

/// Ends a change: the key's row, its audit record, commit.
async fn finish_change(
    mut tx: Transaction<'static, sqlx::Sqlite>,
    key: &KeyInfo,
    actor: &str,
    action: &str,
    changes: &Value,
) -> Result<(), StoreError> {
    let at = key.updated_at.unwrap_or_else(OffsetDateTime::now_utc);
    write_key(&mut tx, key).await?;
    write_audit(&mut tx, at, actor, action, Some(&key.key_id), changes).await?;
    tx.commit().await?;
    Ok(())
}

async fn load_key(conn: &mut SqliteConnection, key_id: &str) -> Result<KeyInfo, StoreError> {
    let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM keys k WHERE k.key_id = $1"))
        .bind(key_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no key with id `{key_id}`")))?;
    key_from_row(&row)
}

fn refuse_revoked(key: &KeyInfo) -> Result<(), StoreError> {
    if key.revoked {
        return Err(StoreError::Conflict(format!("key `{}` is revoked; revocation is final", key.key_id)));
    }
    Ok(())
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
            insert_key(&mut tx, key, actor).await?;
            let info = load_key(&mut tx, &key.key_id).await?;
            tx.commit().await?;
            Ok(info)
        })
    }

    fn get_key<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<Option<KeyInfo>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM keys k WHERE k.key_id = $1"))
                .bind(key_id)
                .fetch_optional(&self.pool)
                .await?;
            row.as_ref().map(key_from_row).transpose()
        })
    }

    fn list_keys<'a>(&'a self, owner: Option<&'a str>, limit: u32) -> BoxFuture<'a, Result<Vec<KeyInfo>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(&format!(
                "SELECT {KEY_COLUMNS} FROM keys k WHERE ($1 IS NULL OR k.owner = $1) \
                 ORDER BY k.created_at, k.key_id LIMIT $2"
            ))
            .bind(owner)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(key_from_row).collect()
        })
    }

    fn update_key<'a>(
        &'a self,
        key_id: &'a str,
        patch: &'a KeyPatch,
        actor: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<KeyInfo, StoreError>> {
        Box::pin(async move {
            let (mut tx, mut key) = self.begin_change(key_id).await?;
            let roles_before = key.roles.clone();
            let changes = apply_patch(&mut key, patch);
            key.updated_at = Some(at);
            if key.roles != roles_before {
                write_roles(&mut tx, key_id, &key.roles).await?;
            }
            finish_change(tx, &key, actor, action::KEY_UPDATE, &changes).await?;
            Ok(key)
        })
    }

    fn rotate_key<'a>(
        &'a self,
        key_id: &'a str,
        secret: &'a NewSecret,
        grace_until: OffsetDateTime,
        actor: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<KeyInfo, StoreError>> {
        Box::pin(async move {
            let (mut tx, mut key) = self.begin_change(key_id).await?;
            replace_secret(&mut tx, key_id, secret, grace_until, at).await?;
            let changes = serde_json::json!({
                "key_prefix": { "from": key.key_prefix, "to": secret.key_prefix },
                "previous_expires_at": super::rfc3339(Some(grace_until)),
            });
            key.key_prefix.clone_from(&secret.key_prefix);
            key.updated_at = Some(at);
            finish_change(tx, &key, actor, action::KEY_ROTATE, &changes).await?;
            Ok(key)
        })
    }

    fn revoke_key<'a>(
        &'a self,
        key_id: &'a str,
        actor: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<KeyInfo, StoreError>> {
        Box::pin(async move {
            let (tx, mut key) = self.begin_change(key_id).await?;
            key.revoked = true;
            key.revoked_at = Some(at);
            key.updated_at = Some(at);
            let changes = serde_json::json!({ "revoked": { "from": false, "to": true } });
            finish_change(tx, &key, actor, action::KEY_REVOKE, &changes).await?;
            Ok(key)
        })
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
            let before: Option<String> = sqlx::query_scalar("SELECT scopes FROM roles WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
            let before = before.as_deref().map(parse_json_list).transpose()?;
            let scopes_json = Value::from(scopes.to_vec()).to_string();
            sqlx::query(
                "INSERT INTO roles (name, scopes, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET scopes = excluded.scopes, updated_at = excluded.updated_at",
            )
            .bind(name)
            .bind(&scopes_json)
            .bind(to_ms(at))
            .execute(&mut *tx)
            .await?;
            let affected: Vec<String> = sqlx::query_scalar(
                "SELECT kr.key_id FROM key_roles kr JOIN keys k ON k.key_id = kr.key_id \
                 WHERE kr.role = $1 AND k.revoked_at IS NULL ORDER BY kr.key_id",
            )
            .bind(name)
            .fetch_all(&mut *tx)
            .await?;
            let changes = serde_json::json!({ "role": name, "scopes": { "from": before, "to": scopes } });
            write_audit(&mut tx, at, actor, action::ROLE_PUT, None, &changes).await?;
            tx.commit().await?;
            Ok((RoleInfo { name: name.to_owned(), scopes: scopes.to_vec(), updated_at: at }, affected))
        })
    }

    fn list_roles(&self) -> BoxFuture<'_, Result<Vec<RoleInfo>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query("SELECT name, scopes, updated_at FROM roles ORDER BY name LIMIT 10000")
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(RoleInfo {
                        name: row.try_get("name")?,
                        scopes: parse_json_list(row.try_get("scopes")?)?,
                        updated_at: from_ms(row.try_get("updated_at")?)?,
                    })
                })
                .collect()
        })
    }

    fn find_by_digest<'a>(&'a self, digest: &'a KeyDigest) -> BoxFuture<'a, Result<Option<Found>, StoreError>> {
        Box::pin(async move {
            // One round trip: the roles' scope lists come back newline-joined (JSON
            // arrays never contain a raw newline).
            let row = sqlx::query(&format!(
                "SELECT {KEY_COLUMNS}, s.expires_at AS secret_expires_at, \
                 (SELECT group_concat(r.scopes, char(10)) FROM key_roles kr JOIN roles r ON r.name = kr.role \
                  WHERE kr.key_id = k.key_id) AS role_scopes \
                 FROM key_secrets s JOIN keys k ON k.key_id = s.key_id WHERE s.digest = $1"
            ))
            .bind(&digest.as_bytes()[..])
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let mut role_scopes = Vec::new();
            if let Some(lists) = row.try_get::<Option<String>, _>("role_scopes")? {
                for list in lists.lines() {
                    role_scopes.extend(parse_json_list(list)?);
                }
            }
            Ok(Some(Found {
                key: key_from_row(&row)?,
                secret_expires_at: from_ms_opt(row.try_get("secret_expires_at")?)?,
                role_scopes,
            }))
        })
    }

    fn audit(&self, since: Option<OffsetDateTime>, limit: u32) -> BoxFuture<'_, Result<Vec<AuditRecord>, StoreError>> {
        Box::pin(async move {
            let rows = self.recent("audit", AUDIT_COLUMNS, since, limit).await?;
            rows.iter().map(audit_from_row).collect()
        })
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
        Box::pin(async move {
            let rows = sqlx::query(&format!(
                "SELECT {USAGE_COLUMNS} FROM usage_minutes WHERE key_id = $1 AND minute >= $2 ORDER BY minute LIMIT $3"
            ))
            .bind(key_id)
            .bind(since.unix_timestamp() - since.unix_timestamp().rem_euclid(60))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(bucket_from_row).collect()
        })
    }

    fn note_network<'a>(
        &'a self,
        key_id: &'a str,
        network: &'a str,
        at: OffsetDateTime,
    ) -> BoxFuture<'a, Result<NetworkSeen, StoreError>> {
        Box::pin(async move {
            let known: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM key_networks WHERE key_id = $1 AND network = $2")
                    .bind(key_id)
                    .bind(network)
                    .fetch_optional(&self.pool)
                    .await?;
            if known.is_some() {
                return Ok(NetworkSeen::Known);
            }
            let mut tx = self.write().await?;
            let inserted = sqlx::query(
                "INSERT INTO key_networks (key_id, network, first_seen) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(key_id)
            .bind(network)
            .bind(to_ms(at))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM key_networks WHERE key_id = $1")
                .bind(key_id)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(match (inserted, count) {
                (0, _) => NetworkSeen::Known,
                (_, 1) => NetworkSeen::First,
                _ => NetworkSeen::New,
            })
        })
    }

    fn insert_alert<'a>(&'a self, alert: &'a Alert) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(
                "INSERT INTO alerts (at, key_id, kind, minute, observed, baseline, threshold, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (key_id, kind, minute) DO NOTHING",
            )
            .bind(to_ms(alert.at))
            .bind(&alert.key_id)
            .bind(alert.kind.as_str())
            .bind(alert.minute.unix_timestamp())
            .bind(i64::try_from(alert.observed).unwrap_or(i64::MAX))
            .bind(alert.baseline)
            .bind(alert.threshold)
            .bind(&alert.detail)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    fn alerts(&self, since: Option<OffsetDateTime>, limit: u32) -> BoxFuture<'_, Result<Vec<Alert>, StoreError>> {
        Box::pin(async move {
            let rows = self.recent("alerts", ALERT_COLUMNS, since, limit).await?;
            rows.iter().map(alert_from_row).collect()
        })
    }
}
