//! The statements every backend runs alike: the same tables, the same encodings and
//! SQL that both SQLite and PostgreSQL accept (`$n` placeholders, `CAST(… AS …)`,
//! `string_agg`). [`shared_queries!`] generates them once per database type: spelled
//! out generically, sqlx's executor, encode and decode bounds would bury the SQL.
//!
//! What the backends add around these (how transactions begin and commit, `NOTIFY`)
//! stays in the backend: a function here never commits.

/// Advisory lock namespaces (first key of the two-key form), for the backends that
/// have advisory locks.
pub(crate) const LOCK_ROLE: i32 = 0x6b67_0002;
pub(crate) const LOCK_NETWORK: i32 = 0x6b67_0003;

/// Defines the module `shared` of the functions every backend calls, for the
/// `sqlx::Database` given, in the module that invokes it. `row_lock` is the clause
/// that locks the key rows a change reads, until the transaction ends; `name_lock` the
/// function that serializes changes of one name in a namespace (a role, a key's
/// networks) until the transaction ends, even of a row that does not exist yet;
/// `skip_locked` the clause that locks the rows a subquery picks, passing over those
/// another transaction holds.
macro_rules! shared_queries {
    ($db:ty, row_lock = $row_lock:literal, name_lock = $name_lock:path, skip_locked = $skip_locked:literal) => {
        pub(crate) mod shared {
            use ::serde_json::Value;
            use ::sqlx::Executor;
            use ::time::OffsetDateTime;

            use $crate::key::KeyDigest;
            use $crate::server::model::{Alert, AuditRecord, KeyInfo, RoleInfo};
            use $crate::server::store::rows::{
                ALERT_COLUMNS, AUDIT_COLUMNS, KEY_COLUMNS, ROLE_COLUMNS, alert_from_row, audit_from_row,
                found_from_row, key_from_row, role_from_row,
            };
            use $crate::server::store::usage::{BatchMark, ReadRow, TALLY_COLUMNS, Tally, UsageKey, UsageRead, UsageTable};
            use $crate::server::store::queries::{LOCK_NETWORK, LOCK_ROLE};
            use $crate::server::store::owners::{credits_json, limits_json, next_credits_revision, ratelimit_of};
            use $crate::server::store::{
                Found, KeyChange, NetworkSeen, NewKeyRecord, NewSecret, StoreError, action, create_changes,
                parse_json_list, to_ms,
            };

            use $crate::server::store::like_pattern;

            type Conn = <$db as ::sqlx::Database>::Connection;
            type Row = <$db as ::sqlx::Database>::Row;

            pub(crate) async fn get_key<'e>(
                ex: impl Executor<'e, Database = $db>,
                key_id: &str,
            ) -> Result<Option<KeyInfo>, StoreError> {
                select_key(ex, key_id, "").await
            }

            async fn select_key<'e>(
                ex: impl Executor<'e, Database = $db>,
                key_id: &str,
                lock: &str,
            ) -> Result<Option<KeyInfo>, StoreError> {
                let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM keys k WHERE k.key_id = $1{lock}"))
                    .bind(key_id)
                    .fetch_optional(ex)
                    .await?;
                row.as_ref().map(key_from_row).transpose()
            }

            /// A key as it is now, holding its row lock until the transaction ends.
            pub(crate) async fn key_locked(conn: &mut Conn, key_id: &str) -> Result<Option<KeyInfo>, StoreError> {
                select_key(conn, key_id, $row_lock).await
            }

            async fn load_key(conn: &mut Conn, key_id: &str, lock: &str) -> Result<KeyInfo, StoreError> {
                select_key(conn, key_id, lock)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("no key with id `{key_id}`")))
            }

            pub(crate) async fn list_keys<'e>(
                ex: impl Executor<'e, Database = $db>,
                owner: Option<&str>,
                limit: u32,
            ) -> Result<Vec<KeyInfo>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {KEY_COLUMNS} FROM keys k WHERE (CAST($1 AS TEXT) IS NULL OR k.owner = $1) \
                     ORDER BY k.created_at, k.key_id LIMIT $2"
                ))
                .bind(owner)
                .bind(i64::from(limit))
                .fetch_all(ex)
                .await?;
                rows.iter().map(key_from_row).collect()
            }

            /// One page of keys in `filter.sort`, after `filter.after`, narrowed by the
            /// filter (see [`KeyFilter`](crate::server::store::KeyFilter)).
            pub(crate) async fn page_keys<'e>(
                ex: impl Executor<'e, Database = $db>,
                filter: &$crate::server::store::KeyFilter,
                now_ms: i64,
                limit: u32,
            ) -> Result<Vec<KeyInfo>, StoreError> {
                use $crate::server::store::{KeySortBy, SortValue};
                // The column and direction come from the enum, never from the request.
                let column = match filter.sort.by {
                    KeySortBy::Created => "k.created_at",
                    KeySortBy::Name => "k.name",
                    KeySortBy::Owner => "k.owner",
                    KeySortBy::LastUsed => "COALESCE(k.last_used_at, 0)",
                };
                let (past, dir) = if filter.sort.descending { ("<", "DESC") } else { (">", "ASC") };
                // A numeric cursor value binds `$1`, a text one `$10`; the other is NULL.
                let (int_at, text_at) = match filter.after.as_ref().map(|c| &c.value) {
                    Some(SortValue::Int(v)) => (Some(*v), None),
                    Some(SortValue::Text(t)) => (None, Some(t.as_str())),
                    None => (None, None),
                };
                let ((at, ty), (other, other_ty)) = if filter.sort.by.is_text() {
                    (("$10", "TEXT"), ("$1", "BIGINT"))
                } else {
                    (("$1", "BIGINT"), ("$10", "TEXT"))
                };
                // `LIKE ... ESCAPE`: the search text's own `%` and `_` match themselves.
                let rows = sqlx::query(&format!(
                    "SELECT {KEY_COLUMNS} FROM keys k WHERE \
                     (CAST({other} AS {other_ty}) IS NULL OR 1 = 1) \
                     AND (CAST({at} AS {ty}) IS NULL OR {column} {past} {at} OR ({column} = {at} AND k.key_id {past} $7)) \
                     AND (CAST($8 AS TEXT) IS NULL OR k.owner = $8) \
                     AND (CAST($2 AS TEXT) IS NULL OR LOWER(k.owner) LIKE $2 ESCAPE '\\' \
                          OR LOWER(k.name) LIKE $2 ESCAPE '\\' OR LOWER(k.key_id) LIKE $2 ESCAPE '\\' \
                          OR LOWER(k.key_prefix) LIKE $2 ESCAPE '\\') \
                     AND (CAST($3 AS TEXT) IS NULL OR k.environment = $3) \
                     AND (CAST($4 AS TEXT) IS NULL \
                          OR ($4 = 'revoked' AND k.revoked_at IS NOT NULL) \
                          OR ($4 = 'disabled' AND k.revoked_at IS NULL AND k.disabled) \
                          OR ($4 = 'expired' AND k.revoked_at IS NULL AND k.expires_at IS NOT NULL AND k.expires_at <= $5) \
                          OR ($4 = 'active' AND k.revoked_at IS NULL AND NOT k.disabled \
                              AND (k.expires_at IS NULL OR k.expires_at > $5)) \
                          OR ($4 = 'expiring' AND k.revoked_at IS NULL AND NOT k.disabled \
                              AND k.expires_at > $5 AND k.expires_at <= $9)) \
                     ORDER BY {column} {dir}, k.key_id {dir} LIMIT $6"
                ))
                .bind(int_at)
                .bind(filter.search.as_deref().map(like_pattern))
                .bind(filter.environment.as_deref())
                .bind(filter.state.map(|s| s.as_str()))
                .bind(now_ms)
                .bind(i64::from(limit))
                .bind(filter.after.as_ref().map(|c| c.key_id.as_str()))
                .bind(filter.owner.as_deref())
                .bind(now_ms.saturating_add(i64::try_from(filter.expiring_within.as_millis()).unwrap_or(i64::MAX)))
                .bind(text_at)
                .fetch_all(ex)
                .await?;
                rows.iter().map(key_from_row).collect()
            }

            /// A new key: its row, its secret, its roles and the `key.create` audit
            /// record. Returns the key as stored.
            pub(crate) async fn create_key(
                conn: &mut Conn,
                key: &NewKeyRecord,
                actor: &str,
            ) -> Result<KeyInfo, StoreError> {
                let created = to_ms(key.created_at);
                sqlx::query(
                    "INSERT INTO keys (key_id, owner, name, scopes, roles, environment, expires_at, disabled, meta, \
                     ratelimit_limit, ratelimit_period_s, key_prefix, created_at, limits, credits, allowed_networks, \
                     credits_revision) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
                )
                .bind(&key.key_id)
                .bind(&key.owner)
                .bind(&key.name)
                .bind(Value::from(key.scopes.clone()).to_string())
                .bind(Value::from(key.roles.clone()).to_string())
                .bind(&key.environment)
                .bind(key.expires_at.map(to_ms))
                .bind(false)
                .bind(key.meta.to_string())
                .bind(ratelimit_of(&key.limits).map(|r| r.limit as i64))
                .bind(ratelimit_of(&key.limits).map(|r| r.period_s as i64))
                .bind(&key.secret.key_prefix)
                .bind(created)
                .bind(limits_json(&key.limits))
                .bind(credits_json(key.credits.as_ref()))
                .bind(Value::from(key.allowed_networks.clone()).to_string())
                .bind(key.credits.as_ref().map(|_| next_credits_revision(None) as i64))
                .execute(&mut *conn)
                .await?;
                insert_secret(conn, &key.key_id, &key.secret, created).await?;
                write_roles(conn, &key.key_id, &key.roles).await?;
                let changes = create_changes(key);
                write_audit(conn, key.created_at, actor, action::KEY_CREATE, Some(&key.key_id), &changes).await?;
                load_key(conn, &key.key_id, "").await
            }

            /// Changes an unrevoked key, holding its row lock, and writes the audit
            /// record. Returns the key as changed.
            pub(crate) async fn change_key(
                conn: &mut Conn,
                key_id: &str,
                change: &KeyChange<'_>,
                actor: &str,
                at: OffsetDateTime,
                report: Option<&Value>,
            ) -> Result<KeyInfo, StoreError> {
                let mut key = load_key(conn, key_id, $row_lock).await?;
                if key.revoked {
                    return Err(StoreError::Conflict(format!("key `{}` is revoked; revocation is final", key.key_id)));
                }
                let roles_before = key.roles.clone();
                let mut changes = change.apply(&mut key, at);
                if let (Some(report), Some(fields)) = (report, changes.as_object_mut()) {
                    fields.insert("report".to_owned(), report.clone());
                }
                match change {
                    KeyChange::Update(_) if key.roles != roles_before => write_roles(conn, key_id, &key.roles).await?,
                    KeyChange::Rotate { secret, grace_until } => {
                        replace_secret(conn, key_id, secret, *grace_until, at).await?
                    }
                    _ => {}
                }
                write_key(conn, &key).await?;
                write_audit(conn, at, actor, change.action(), Some(&key.key_id), &changes).await?;
                Ok(key)
            }

            /// Creates or replaces a role and writes `role.put`. Returns the role and
            /// the unrevoked keys that hold it.
            pub(crate) async fn put_role(
                conn: &mut Conn,
                name: &str,
                scopes: &[String],
                actor: &str,
                at: OffsetDateTime,
            ) -> Result<(RoleInfo, Vec<String>), StoreError> {
                $name_lock(&mut *conn, LOCK_ROLE, name).await?;
                let before: Option<String> = sqlx::query_scalar("SELECT scopes FROM roles WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&mut *conn)
                    .await?;
                let before = before.as_deref().map(parse_json_list).transpose()?;
                sqlx::query(
                    "INSERT INTO roles (name, scopes, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET scopes = EXCLUDED.scopes, updated_at = EXCLUDED.updated_at",
                )
                .bind(name)
                .bind(Value::from(scopes.to_vec()).to_string())
                .bind(to_ms(at))
                .execute(&mut *conn)
                .await?;
                let affected: Vec<String> = sqlx::query_scalar(
                    "SELECT kr.key_id FROM key_roles kr JOIN keys k ON k.key_id = kr.key_id \
                     WHERE kr.role = $1 AND k.revoked_at IS NULL ORDER BY kr.key_id",
                )
                .bind(name)
                .fetch_all(&mut *conn)
                .await?;
                let changes = ::serde_json::json!({ "role": name, "scopes": { "from": before, "to": scopes } });
                write_audit(conn, at, actor, action::ROLE_PUT, None, &changes).await?;
                Ok((RoleInfo { name: name.to_owned(), scopes: scopes.to_vec(), updated_at: at }, affected))
            }

            pub(crate) async fn list_roles<'e>(
                ex: impl Executor<'e, Database = $db>,
            ) -> Result<Vec<RoleInfo>, StoreError> {
                let rows = sqlx::query(&format!("SELECT {ROLE_COLUMNS} FROM roles ORDER BY name LIMIT 10000"))
                    .fetch_all(ex)
                    .await?;
                rows.iter().map(role_from_row).collect()
            }

            pub(crate) async fn find_by_digest<'e>(
                ex: impl Executor<'e, Database = $db>,
                digest: &KeyDigest,
            ) -> Result<Option<Found>, StoreError> {
                // One round trip: the roles' scope lists come back newline-joined (JSON
                // arrays never contain a raw newline). SQLite has had `string_agg`
                // since 3.44; the one sqlx bundles is newer.
                let row = sqlx::query(&format!(
                    "SELECT {KEY_COLUMNS}, s.expires_at AS secret_expires_at, \
                     (SELECT string_agg(r.scopes, '\n') FROM key_roles kr JOIN roles r ON r.name = kr.role \
                      WHERE kr.key_id = k.key_id) AS role_scopes, \
                     o.limits AS owner_limits, o.credits AS owner_credits, o.allowed_networks AS owner_allowed_networks, \
                     o.credits_revision AS owner_credits_revision \
                     FROM key_secrets s JOIN keys k ON k.key_id = s.key_id \
                     LEFT JOIN owners o ON o.owner = k.owner WHERE s.digest = $1"
                ))
                .bind(&digest.as_bytes()[..])
                .fetch_optional(ex)
                .await?;
                row.as_ref().map(found_from_row).transpose()
            }

            pub(crate) async fn find_by_digests<'e>(
                ex: impl Executor<'e, Database = $db>,
                digests: &[KeyDigest],
            ) -> Result<Vec<(KeyDigest, Found)>, StoreError> {
                if digests.is_empty() {
                    return Ok(Vec::new());
                }
                let placeholders: Vec<String> = (1..=digests.len()).map(|i| format!("${i}")).collect();
                let sql = format!(
                    "SELECT {KEY_COLUMNS}, s.digest AS digest, s.expires_at AS secret_expires_at, \
                     (SELECT string_agg(r.scopes, '\n') FROM key_roles kr JOIN roles r ON r.name = kr.role \
                      WHERE kr.key_id = k.key_id) AS role_scopes, \
                     o.limits AS owner_limits, o.credits AS owner_credits, o.allowed_networks AS owner_allowed_networks, \
                     o.credits_revision AS owner_credits_revision \
                     FROM key_secrets s JOIN keys k ON k.key_id = s.key_id \
                     LEFT JOIN owners o ON o.owner = k.owner WHERE s.digest IN ({})",
                    placeholders.join(", ")
                );
                let mut query = sqlx::query(&sql);
                for digest in digests {
                    query = query.bind(&digest.as_bytes()[..]);
                }
                let rows = query.fetch_all(ex).await?;
                rows.iter()
                    .map(|row| {
                        let bytes: Vec<u8> = ::sqlx::Row::try_get(row, "digest")?;
                        let digest = <[u8; 32]>::try_from(bytes.as_slice())
                            .map(KeyDigest::from_bytes)
                            .map_err(|_| StoreError::Corrupt("a stored digest is not 32 bytes".into()))?;
                        Ok((digest, found_from_row(row)?))
                    })
                    .collect()
            }

            pub(crate) async fn audit<'e>(
                ex: impl Executor<'e, Database = $db>,
                since: Option<OffsetDateTime>,
                limit: u32,
            ) -> Result<Vec<AuditRecord>, StoreError> {
                let rows = recent(ex, "audit", AUDIT_COLUMNS, since, limit).await?;
                rows.iter().map(audit_from_row).collect()
            }

            pub(crate) async fn audit_page<'e>(
                ex: impl Executor<'e, Database = $db>,
                filter: &$crate::server::store::AuditFilter,
                at: $crate::server::store::AuditPage,
                limit: u32,
            ) -> Result<Vec<(i64, AuditRecord)>, StoreError> {
                use $crate::server::store::AuditPage;
                let (before, after, order) = match at {
                    AuditPage::Newest => (None, None, "DESC"),
                    AuditPage::Before(id) => (Some(id), None, "DESC"),
                    // The oldest newer ones: read upwards, then turned newest first.
                    AuditPage::After(id) => (None, Some(id), "ASC"),
                };
                let sql = format!(
                    "SELECT {AUDIT_COLUMNS} FROM audit WHERE (CAST($1 AS TEXT) IS NULL OR key_id = $1) \
                     AND (CAST($2 AS TEXT) IS NULL OR actor = $2) \
                     AND (CAST($3 AS TEXT) IS NULL OR LOWER(action) LIKE $3 ESCAPE '\\') \
                     AND (CAST($4 AS BIGINT) IS NULL OR at >= $4) \
                     AND (CAST($5 AS BIGINT) IS NULL OR id < $5) \
                     AND (CAST($6 AS BIGINT) IS NULL OR id > $6) \
                     ORDER BY id {order} LIMIT $7"
                );
                let rows = sqlx::query(&sql)
                    .bind(filter.key_id.as_deref())
                    .bind(filter.actor.as_deref())
                    .bind(filter.action_prefix.as_deref().map($crate::server::store::prefix_pattern))
                    .bind(filter.since.map(to_ms))
                    .bind(before)
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(ex)
                    .await?;
                let mut records = rows
                    .iter()
                    .map(|row| Ok((::sqlx::Row::try_get::<i64, _>(row, "id")?, audit_from_row(row)?)))
                    .collect::<Result<Vec<_>, StoreError>>()?;
                if matches!(at, AuditPage::After(_)) {
                    records.reverse();
                }
                Ok(records)
            }

            pub(crate) async fn alerts<'e>(
                ex: impl Executor<'e, Database = $db>,
                since: Option<OffsetDateTime>,
                limit: u32,
            ) -> Result<Vec<Alert>, StoreError> {
                let rows = recent(ex, "alerts", ALERT_COLUMNS, since, limit).await?;
                rows.iter().map(alert_from_row).collect()
            }

            /// Rows of an append-only table, oldest first: from `since` on, or the
            /// newest `limit`.
            async fn recent<'e>(
                ex: impl Executor<'e, Database = $db>,
                table: &str,
                cols: &str,
                since: Option<OffsetDateTime>,
                limit: u32,
            ) -> Result<Vec<Row>, StoreError> {
                // The casts type `$1` for PostgreSQL when it is NULL.
                let sql = format!(
                    "SELECT * FROM (SELECT {cols} FROM {table} WHERE CAST($1 AS BIGINT) IS NULL OR at >= $1 \
                     ORDER BY CASE WHEN CAST($1 AS BIGINT) IS NULL THEN -id ELSE id END LIMIT $2) AS r ORDER BY id"
                );
                Ok(sqlx::query(&sql).bind(since.map(to_ms)).bind(i64::from(limit)).fetch_all(ex).await?)
            }

            /// Which of these key ids are keys of this store (keys are never deleted:
            /// the answer stays true).
            pub(crate) async fn known_keys(
                pool: &::sqlx::Pool<$db>,
                ids: &[&str],
            ) -> Result<::std::collections::HashSet<String>, StoreError> {
                let mut known = ::std::collections::HashSet::new();
                for chunk in ids.chunks(500) {
                    let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
                    let sql = format!("SELECT key_id FROM keys WHERE key_id IN ({})", marks.join(", "));
                    let mut q = sqlx::query_scalar::<_, String>(&sql);
                    for id in chunk {
                        q = q.bind(*id);
                    }
                    known.extend(q.fetch_all(pool).await?);
                }
                Ok(known)
            }

            /// Marks a batch id applied; when it was already, returns what its first
            /// copy stored (and the caller rolls back). Two transactions marking one id
            /// at once: the second waits for the first on the primary key and then
            /// finds it.
            pub(crate) async fn mark_batch(conn: &mut Conn, batch: BatchMark<'_>) -> Result<Option<u64>, StoreError> {
                let inserted = sqlx::query(
                    "INSERT INTO usage_batches (batch_id, applied_at, accepted) VALUES ($1, $2, $3) \
                     ON CONFLICT (batch_id) DO NOTHING",
                )
                .bind(batch.batch_id)
                .bind(batch.applied_at)
                .bind(i64::try_from(batch.accepted).unwrap_or(i64::MAX))
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if inserted == 1 {
                    return Ok(None);
                }
                let accepted: i64 = sqlx::query_scalar("SELECT accepted FROM usage_batches WHERE batch_id = $1")
                    .bind(batch.batch_id)
                    .fetch_one(&mut *conn)
                    .await?;
                Ok(Some(accepted.max(0) as u64))
            }

            /// Streams the rows of `read` into `each`; returns how many there were
            /// (at most `read.max_rows + 1`: one more says there were too many).
            pub(crate) async fn read_usage(
                pool: &::sqlx::Pool<$db>,
                read: &UsageRead<'_>,
                each: &mut (dyn FnMut(ReadRow) -> Result<(), StoreError> + Send),
            ) -> Result<u64, StoreError> {
                use ::futures_util::TryStreamExt;
                let sql = read.sql();
                let limit = i64::try_from(read.max_rows.saturating_add(1)).unwrap_or(i64::MAX);
                let mut rows =
                    sqlx::query(&sql).bind(read.whose()).bind(read.from).bind(read.to).bind(limit).fetch(pool);
                let mut n = 0u64;
                while let Some(row) = rows.try_next().await? {
                    n += 1;
                    each(ReadRow::from_row(&row, read.kind)?)?;
                }
                Ok(n)
            }

            /// `owner`'s keys with the most requests (or, with `by_denied`, the most
            /// denied ones, only those with a denial) with `at` in `[from, to)`.
            pub(crate) async fn top_keys<'e>(
                ex: impl Executor<'e, Database = $db>,
                owner: &str,
                from: i64,
                to: i64,
                by_denied: bool,
                limit: u32,
            ) -> Result<Vec<$crate::server::store::KeyUsage>, StoreError> {
                use $crate::server::store::usage::OWNER_ROWS;
                let column = if by_denied { "denied" } else { "requests" };
                // The casts: PostgreSQL sums BIGINTs as NUMERIC.
                let sql = format!(
                    "SELECT u.key_id AS key_id, k.name AS name, CAST(SUM(u.requests) AS BIGINT) AS requests, \
                     CAST(SUM(u.allowed) AS BIGINT) AS allowed, CAST(SUM(u.denied) AS BIGINT) AS denied \
                     FROM ({OWNER_ROWS}) AS u JOIN keys k ON k.key_id = u.key_id \
                     GROUP BY u.key_id, k.name HAVING SUM(u.{column}) > 0 \
                     ORDER BY SUM(u.{column}) DESC, u.key_id LIMIT $4"
                );
                let rows =
                    sqlx::query(&sql).bind(owner).bind(from).bind(to).bind(i64::from(limit)).fetch_all(ex).await?;
                rows.iter()
                    .map(|row| {
                        let n = |c: &str| ::sqlx::Row::try_get::<i64, _>(row, c).map(|v| v.max(0) as u64);
                        Ok($crate::server::store::KeyUsage {
                            key_id: ::sqlx::Row::try_get(row, "key_id")?,
                            name: ::sqlx::Row::try_get(row, "name")?,
                            requests: n("requests")?,
                            allowed: n("allowed")?,
                            denied: n("denied")?,
                        })
                    })
                    .collect()
            }

            /// The sums over `owner`'s keys with `at` in `[from, to)`, and how many of
            /// its keys have a request in it.
            pub(crate) async fn owner_total<'e>(
                ex: impl Executor<'e, Database = $db>,
                owner: &str,
                from: i64,
                to: i64,
            ) -> Result<($crate::server::store::KeyUsage, u64), StoreError> {
                use $crate::server::store::usage::OWNER_ROWS;
                let sql = format!(
                    "SELECT CAST(COALESCE(SUM(u.requests), 0) AS BIGINT) AS requests, \
                     CAST(COALESCE(SUM(u.allowed), 0) AS BIGINT) AS allowed, \
                     CAST(COALESCE(SUM(u.denied), 0) AS BIGINT) AS denied, \
                     CAST(COUNT(DISTINCT CASE WHEN u.requests > 0 THEN u.key_id END) AS BIGINT) AS keys_used \
                     FROM ({OWNER_ROWS}) AS u"
                );
                let row = sqlx::query(&sql).bind(owner).bind(from).bind(to).fetch_one(ex).await?;
                let n = |c: &str| ::sqlx::Row::try_get::<i64, _>(&row, c).map(|v| v.max(0) as u64);
                let total = $crate::server::store::KeyUsage {
                    requests: n("requests")?,
                    allowed: n("allowed")?,
                    denied: n("denied")?,
                    ..Default::default()
                };
                Ok((total, n("keys_used")?))
            }

            pub(crate) async fn key_owners<'e>(
                ex: impl Executor<'e, Database = $db>,
                limit: u32,
            ) -> Result<Vec<String>, StoreError> {
                Ok(sqlx::query_scalar("SELECT DISTINCT owner FROM keys ORDER BY owner LIMIT $1")
                    .bind(i64::from(limit))
                    .fetch_all(ex)
                    .await?)
            }

            /// Deletes up to `limit` minute rows older than `before` and returns them,
            /// for the caller to add to hour rows in the same transaction. Each row is
            /// taken by one transaction only: a row another one holds is passed over.
            pub(crate) async fn take_minutes(
                conn: &mut Conn,
                before: i64,
                limit: u32,
            ) -> Result<Vec<(UsageKey, Tally)>, StoreError> {
                let sql = format!(
                    "DELETE FROM usage_minutes WHERE (key_id, minute) IN (SELECT key_id, minute FROM usage_minutes \
                     WHERE minute < $1 ORDER BY minute LIMIT $2{}) RETURNING key_id, minute, {}",
                    $skip_locked,
                    TALLY_COLUMNS.join(", ")
                );
                let rows = sqlx::query(&sql).bind(before).bind(i64::from(limit)).fetch_all(&mut *conn).await?;
                rows.iter()
                    .map(|row| Ok((UsageKey::from_row(row, UsageTable::Minutes)?, Tally::from_row(row)?)))
                    .collect()
            }

            /// Deletes up to `limit` rows of `table` whose `column` is below `before`.
            pub(crate) async fn delete_before(
                conn: &mut Conn,
                table: &str,
                primary_key: &str,
                column: &str,
                before: i64,
                limit: u32,
            ) -> Result<u64, StoreError> {
                let sql = format!(
                    "DELETE FROM {table} WHERE ({primary_key}) IN \
                     (SELECT {primary_key} FROM {table} WHERE {column} < $1 LIMIT $2)"
                );
                let done = sqlx::query(&sql).bind(before).bind(i64::from(limit)).execute(&mut *conn).await?;
                Ok(done.rows_affected())
            }

            /// Whether `key_id` was used from `network` before: the cheap check that
            /// spares a write transaction on nearly every call.
            pub(crate) async fn network_known<'e>(
                ex: impl Executor<'e, Database = $db>,
                key_id: &str,
                network: &str,
            ) -> Result<bool, StoreError> {
                let known: Option<i64> =
                    sqlx::query_scalar("SELECT CAST(1 AS BIGINT) FROM key_networks WHERE key_id = $1 AND network = $2")
                        .bind(key_id)
                        .bind(network)
                        .fetch_optional(ex)
                        .await?;
                Ok(known.is_some())
            }

            pub(crate) async fn add_network(
                conn: &mut Conn,
                key_id: &str,
                network: &str,
                at: OffsetDateTime,
            ) -> Result<NetworkSeen, StoreError> {
                // Exactly one of two concurrent first sightings is the first.
                $name_lock(&mut *conn, LOCK_NETWORK, key_id).await?;
                let inserted = sqlx::query(
                    "INSERT INTO key_networks (key_id, network, first_seen) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(key_id)
                .bind(network)
                .bind(to_ms(at))
                .execute(&mut *conn)
                .await?
                .rows_affected();
                let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM key_networks WHERE key_id = $1")
                    .bind(key_id)
                    .fetch_one(&mut *conn)
                    .await?;
                Ok(match (inserted, count) {
                    (0, _) => NetworkSeen::Known,
                    (_, 1) => NetworkSeen::First,
                    _ => NetworkSeen::New,
                })
            }

            /// Stores an alert unless one of the same key, kind and minute exists;
            /// its id if stored.
            pub(crate) async fn insert_alert<'e>(
                ex: impl Executor<'e, Database = $db>,
                alert: &Alert,
            ) -> Result<Option<i64>, StoreError> {
                let id: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO alerts (at, key_id, kind, minute, observed, baseline, threshold, detail) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (key_id, kind, minute) DO NOTHING \
                     RETURNING id",
                )
                .bind(to_ms(alert.at))
                .bind(&alert.key_id)
                .bind(alert.kind.as_str())
                .bind(alert.minute.unix_timestamp())
                .bind(i64::try_from(alert.observed).unwrap_or(i64::MAX))
                .bind(alert.baseline)
                .bind(alert.threshold)
                .bind(&alert.detail)
                .fetch_optional(ex)
                .await?;
                Ok(id)
            }

            /// The one statement every audit record is written with (keys, roles, tokens,
            /// webhooks, alerts).
            pub(crate) async fn write_audit(
                conn: &mut Conn,
                at: OffsetDateTime,
                actor: &str,
                action: &str,
                key_id: Option<&str>,
                changes: &Value,
            ) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO audit (at, actor, action, key_id, changes) VALUES ($1, $2, $3, $4, $5)")
                    .bind(to_ms(at))
                    .bind(actor)
                    .bind(action)
                    .bind(key_id)
                    .bind(changes.to_string())
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            }

            async fn write_key(conn: &mut Conn, key: &KeyInfo) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE keys SET name = $2, scopes = $3, roles = $4, expires_at = $5, disabled = $6, \
                     revoked_at = $7, meta = $8, ratelimit_limit = $9, ratelimit_period_s = $10, key_prefix = $11, \
                     updated_at = $12, limits = $13, credits = $14, allowed_networks = $15, credits_revision = $16, \
                     credits_reconciled_at = $17 WHERE key_id = $1",
                )
                .bind(&key.key_id)
                .bind(&key.name)
                .bind(Value::from(key.scopes.clone()).to_string())
                .bind(Value::from(key.roles.clone()).to_string())
                .bind(key.expires_at.map(to_ms))
                .bind(key.disabled)
                .bind(key.revoked_at.map(to_ms))
                .bind(key.meta.to_string())
                .bind(key.ratelimit.map(|r| r.limit as i64))
                .bind(key.ratelimit.map(|r| r.period_s as i64))
                .bind(&key.key_prefix)
                .bind(key.updated_at.map(to_ms))
                .bind(limits_json(&key.limits))
                .bind(credits_json(key.credits.as_ref()))
                .bind(Value::from(key.allowed_networks.clone()).to_string())
                .bind(key.credits_revision.map(|r| r as i64))
                .bind(key.credits_reconciled_at.map(to_ms))
                .execute(&mut *conn)
                .await?;
                Ok(())
            }

            async fn write_roles(conn: &mut Conn, key_id: &str, roles: &[String]) -> Result<(), StoreError> {
                sqlx::query("DELETE FROM key_roles WHERE key_id = $1").bind(key_id).execute(&mut *conn).await?;
                for role in roles {
                    sqlx::query("INSERT INTO key_roles (key_id, role) VALUES ($1, $2)")
                        .bind(key_id)
                        .bind(role)
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            }

            async fn insert_secret(
                conn: &mut Conn,
                key_id: &str,
                secret: &NewSecret,
                at_ms: i64,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO key_secrets (digest, key_id, key_prefix, created_at) VALUES ($1, $2, $3, $4)",
                )
                .bind(&secret.digest.as_bytes()[..])
                .bind(key_id)
                .bind(&secret.key_prefix)
                .bind(at_ms)
                .execute(&mut *conn)
                .await?;
                Ok(())
            }

            /// Rotation: the previous secrets end at `grace_until` at the latest (older
            /// ones still in an earlier grace keep their earlier end), and `secret` is
            /// added.
            async fn replace_secret(
                conn: &mut Conn,
                key_id: &str,
                secret: &NewSecret,
                grace_until: OffsetDateTime,
                at: OffsetDateTime,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE key_secrets SET expires_at = CASE WHEN expires_at IS NULL OR expires_at > $2 THEN $2 \
                     ELSE expires_at END WHERE key_id = $1",
                )
                .bind(key_id)
                .bind(to_ms(grace_until))
                .execute(&mut *conn)
                .await?;
                insert_secret(conn, key_id, secret, to_ms(at)).await
            }

            // ---- roles delete, unknown roles, alert acknowledgement (the CLI's needs)

            /// The names of the roles that exist among `names`.
            pub(crate) async fn existing_roles<'e>(
                ex: impl Executor<'e, Database = $db>,
                names: &[String],
            ) -> Result<Vec<String>, StoreError> {
                if names.is_empty() {
                    return Ok(Vec::new());
                }
                let marks: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
                let sql = format!("SELECT name FROM roles WHERE name IN ({})", marks.join(", "));
                let mut q = sqlx::query_scalar::<_, String>(&sql);
                for n in names {
                    q = q.bind(n);
                }
                Ok(q.fetch_all(ex).await?)
            }

            /// Deletes a role and writes `role.delete`. While unrevoked keys hold it,
            /// refuses (a conflict naming how many) unless `detach`, which first removes
            /// it from each of them, each with its own `key.update` record. Returns the
            /// keys it was removed from.
            pub(crate) async fn delete_role(
                conn: &mut Conn,
                name: &str,
                detach: bool,
                actor: &str,
                at: OffsetDateTime,
            ) -> Result<Vec<String>, StoreError> {
                $name_lock(&mut *conn, LOCK_ROLE, name).await?;
                let before: Option<String> = sqlx::query_scalar("SELECT scopes FROM roles WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&mut *conn)
                    .await?;
                let Some(before) = before else {
                    return Err(StoreError::NotFound(format!("no role named `{name}`")));
                };
                let holders: Vec<String> = sqlx::query_scalar(
                    "SELECT kr.key_id FROM key_roles kr JOIN keys k ON k.key_id = kr.key_id \
                     WHERE kr.role = $1 AND k.revoked_at IS NULL ORDER BY kr.key_id",
                )
                .bind(name)
                .fetch_all(&mut *conn)
                .await?;
                if !holders.is_empty() && !detach {
                    let n = holders.len();
                    let keys = if n == 1 { "key holds" } else { "keys hold" };
                    return Err(StoreError::Conflict(format!(
                        "role `{name}` is in use: {n} {keys} it; `?detach=true` (`keygate-server roles delete \
                         {name} --detach`) removes it from them and then deletes it"
                    )));
                }
                for key_id in &holders {
                    let key = load_key(conn, key_id, $row_lock).await?;
                    let roles: Vec<String> = key.roles.iter().filter(|r| r.as_str() != name).cloned().collect();
                    let patch = $crate::server::model::KeyPatch { roles: Some(roles), ..Default::default() };
                    change_key(conn, key_id, &KeyChange::Update(&patch), actor, at, None).await?;
                }
                sqlx::query("DELETE FROM roles WHERE name = $1").bind(name).execute(&mut *conn).await?;
                let changes = ::serde_json::json!({
                    "role": name,
                    "scopes": parse_json_list(&before)?,
                    "detached": holders,
                });
                write_audit(conn, at, actor, action::ROLE_DELETE, None, &changes).await?;
                Ok(holders)
            }

            /// Alerts, oldest first, like [`alerts`] but only the open ones
            /// (`acknowledged` false) or only the acknowledged ones (true).
            pub(crate) async fn alerts_by_state<'e>(
                ex: impl Executor<'e, Database = $db>,
                since: Option<OffsetDateTime>,
                acknowledged: bool,
                limit: u32,
            ) -> Result<Vec<Alert>, StoreError> {
                let state = if acknowledged { "IS NOT NULL" } else { "IS NULL" };
                let sql = format!(
                    "SELECT * FROM (SELECT {ALERT_COLUMNS} FROM alerts WHERE acknowledged_at {state} AND \
                     (CAST($1 AS BIGINT) IS NULL OR at >= $1) \
                     ORDER BY CASE WHEN CAST($1 AS BIGINT) IS NULL THEN -id ELSE id END LIMIT $2) AS r ORDER BY id"
                );
                let rows = sqlx::query(&sql).bind(since.map(to_ms)).bind(i64::from(limit)).fetch_all(ex).await?;
                rows.iter().map(alert_from_row).collect()
            }

            /// Acknowledges an alert and writes `alert.ack`; an alert acknowledged before
            /// keeps its first time and writes nothing. Returns the alert.
            pub(crate) async fn ack_alert(
                conn: &mut Conn,
                id: i64,
                actor: &str,
                at: OffsetDateTime,
            ) -> Result<Alert, StoreError> {
                let done = sqlx::query("UPDATE alerts SET acknowledged_at = $2 WHERE id = $1 AND acknowledged_at IS NULL")
                    .bind(id)
                    .bind(to_ms(at))
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                let row = sqlx::query(&format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?;
                let alert = row
                    .as_ref()
                    .map(alert_from_row)
                    .transpose()?
                    .ok_or_else(|| StoreError::NotFound(format!("no alert with id {id}")))?;
                if done == 1 {
                    let changes = ::serde_json::json!({ "alert_id": id, "kind": alert.kind.as_str() });
                    write_audit(conn, at, actor, action::ALERT_ACK, Some(&alert.key_id), &changes).await?;
                }
                Ok(alert)
            }
        }
    };
}

pub(crate) use shared_queries;
