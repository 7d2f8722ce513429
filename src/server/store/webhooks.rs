//! Webhook endpoints and their delivery outbox, and the reads of the periodic key sweep
//! (expiring keys, keys past their maximum age): the statements every backend runs
//! alike, generated once per database type by [`webhook_queries!`] as `shared`'s are.
//!
//! An event is written to the outbox in the transaction of the change it reports, one
//! row per endpoint that wants it, so that a change and its webhook are stored together
//! or not at all; the delivery worker reads the outbox, never the request path.

use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use super::rows::Get;
use super::{StoreError, from_ms, from_ms_opt, parse_json_list};

pub(crate) use crate::client::{DeliveryState, WebhookDelivery, WebhookEndpoint};

/// An endpoint to insert.
#[derive(Clone)]
pub(crate) struct NewEndpoint {
    pub(crate) id: String,
    pub(crate) url: String,
    pub(crate) events: Vec<String>,
    pub(crate) description: String,
    pub(crate) secret: String,
    pub(crate) created_at: OffsetDateTime,
}

impl std::fmt::Debug for NewEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewEndpoint").field("id", &self.id).field("url", &self.url).finish_non_exhaustive()
    }
}

/// An event to queue for every endpoint that wants it: `{id, type, created_at, data}`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WebhookEvent {
    pub(crate) id: String,
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(with = "time::serde::rfc3339")]
    pub(crate) created_at: OffsetDateTime,
    pub(crate) data: Value,
}

impl WebhookEvent {
    /// A new event with a fresh id (`evt_` + 22 base62 characters).
    pub(crate) fn new(kind: impl Into<String>, created_at: OffsetDateTime, data: Value) -> Result<Self, StoreError> {
        let mut id = String::from("evt_");
        crate::key::push_random_base62(&mut id, 22)
            .map_err(|_| StoreError::Config("the operating system's random source failed".into()))?;
        Ok(Self { id, kind: kind.into(), created_at, data })
    }
}

/// Whether an endpoint subscribed to `events` wants an event of type `kind`.
pub(crate) fn wants(events: &[String], kind: &str) -> bool {
    events.is_empty()
        || events.iter().any(|e| match e.strip_suffix('*') {
            Some(prefix) => kind.starts_with(prefix),
            None => e == kind,
        })
}

/// What the delivery worker needs of an endpoint.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) url: String,
    pub(crate) secret: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("url", &self.url).finish_non_exhaustive()
    }
}

/// A pending delivery a worker claimed.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    pub(crate) id: i64,
    pub(crate) endpoint_id: String,
    pub(crate) event_id: String,
    pub(crate) payload: String,
    pub(crate) attempts: u32,
    pub(crate) created_at: OffsetDateTime,
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub(crate) struct Attempt {
    pub(crate) at: OffsetDateTime,
    pub(crate) status: Option<u16>,
    pub(crate) error: Option<String>,
    /// Delivered, retried at this time, or failed for good.
    pub(crate) next: AttemptNext,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AttemptNext {
    Delivered,
    RetryAt(OffsetDateTime),
    Failed,
}

/// The columns [`delivery_from_row`] reads.
pub(crate) const DELIVERY_COLUMNS: &str = "id, event_id, event_type, state, attempts, last_status, last_error, \
     created_at, last_attempt_at, next_attempt_at, delivered_at";

pub(crate) fn delivery_from_row(row: &impl Get) -> Result<WebhookDelivery, StoreError> {
    let state = row.text("state")?;
    let state = DeliveryState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("delivery state `{state}`")))?;
    Ok(WebhookDelivery {
        id: row.int("id")?,
        event_id: row.text("event_id")?,
        event_type: row.text("event_type")?,
        state,
        attempts: u32::try_from(row.int("attempts")?).unwrap_or(u32::MAX),
        last_status: row.opt_int("last_status")?.and_then(|s| u16::try_from(s).ok()),
        last_error: row.opt_text("last_error")?,
        created_at: from_ms(row.int("created_at")?)?,
        last_attempt_at: from_ms_opt(row.opt_int("last_attempt_at")?)?,
        next_attempt_at: if state == DeliveryState::Pending {
            from_ms_opt(row.opt_int("next_attempt_at")?)?
        } else {
            None
        },
        delivered_at: from_ms_opt(row.opt_int("delivered_at")?)?,
    })
}

/// The columns [`endpoint_from_row`] reads, from `webhook_endpoints e`.
pub(crate) const ENDPOINT_COLUMNS: &str = "e.id, e.url, e.events, e.description, e.created_at, e.dropped, \
     (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.endpoint_id = e.id AND d.state = 'pending') AS pending";

pub(crate) fn endpoint_from_row(row: &impl Get) -> Result<WebhookEndpoint, StoreError> {
    Ok(WebhookEndpoint {
        id: row.text("id")?,
        url: row.text("url")?,
        events: parse_json_list(&row.text("events")?)?,
        description: row.text("description")?,
        created_at: from_ms(row.int("created_at")?)?,
        dropped: u64::try_from(row.int("dropped")?).unwrap_or(0),
        pending: u64::try_from(row.int("pending")?).unwrap_or(0),
    })
}

/// Advisory lock namespace of adding webhook endpoints (first key of the two-key form).
pub(crate) const LOCK_WEBHOOK_ENDPOINTS: i32 = 0x6b67_0005;

/// Defines the module `webhook_sql`, in the module that invokes it, for the
/// `sqlx::Database` given; `row_lock`, `name_lock` and `skip_locked` as for
/// `shared_queries!`.
macro_rules! webhook_queries {
    ($db:ty, row_lock = $row_lock:literal, name_lock = $name_lock:path, skip_locked = $skip_locked:literal) => {
        pub(crate) mod webhook_sql {
            use ::serde_json::{Value, json};
            use ::sqlx::Executor;
            use ::time::OffsetDateTime;

            use $crate::server::model::KeyInfo;
            use $crate::server::store::rows::{KEY_COLUMNS, key_from_row};
            use $crate::server::store::webhooks::{
                Attempt, AttemptNext, Claimed, DELIVERY_COLUMNS, ENDPOINT_COLUMNS, LOCK_WEBHOOK_ENDPOINTS, NewEndpoint,
                Target, WebhookDelivery, WebhookEndpoint, WebhookEvent, delivery_from_row, endpoint_from_row, wants,
            };
            use $crate::server::store::{StoreError, from_ms, parse_json_list, to_ms};

            type Conn = <$db as ::sqlx::Database>::Connection;

            async fn audit(
                conn: &mut Conn,
                at: OffsetDateTime,
                actor: &str,
                action: &str,
                changes: &Value,
            ) -> Result<(), StoreError> {
                super::shared::write_audit(conn, at, actor, action, None, changes).await
            }

            /// Inserts an endpoint and its audit record.
            pub(crate) async fn create_endpoint(
                conn: &mut Conn,
                e: &NewEndpoint,
                actor: &str,
                action: &str,
                audited: &Value,
            ) -> Result<WebhookEndpoint, StoreError> {
                // Every key change writes one outbox row per endpoint in its own
                // transaction: the count of endpoints bounds what a revocation costs.
                // Counted under a lock every adding transaction takes first, so that
                // two adding at once (on PostgreSQL, where each would count the rows
                // committed before it) cannot both pass at the cap.
                $name_lock(&mut *conn, LOCK_WEBHOOK_ENDPOINTS, "webhook_endpoints").await?;
                let endpoints: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_endpoints")
                    .fetch_one(&mut *conn)
                    .await?;
                if endpoints >= i64::from(crate::server::store::MAX_WEBHOOK_ENDPOINTS) {
                    return Err(StoreError::Conflict(format!(
                        "at most {} webhook endpoints; remove one first",
                        crate::server::store::MAX_WEBHOOK_ENDPOINTS
                    )));
                }
                sqlx::query(
                    "INSERT INTO webhook_endpoints (id, url, events, description, secret, created_at, dropped) \
                     VALUES ($1, $2, $3, $4, $5, $6, 0)",
                )
                .bind(&e.id)
                .bind(&e.url)
                .bind(Value::from(e.events.clone()).to_string())
                .bind(&e.description)
                .bind(&e.secret)
                .bind(to_ms(e.created_at))
                .execute(&mut *conn)
                .await?;
                audit(conn, e.created_at, actor, action, audited).await?;
                Ok(WebhookEndpoint {
                    id: e.id.clone(),
                    url: e.url.clone(),
                    events: e.events.clone(),
                    description: e.description.clone(),
                    created_at: e.created_at,
                    dropped: 0,
                    pending: 0,
                })
            }

            /// Deletes an endpoint, its deliveries, and writes the audit record; the
            /// endpoint as it was, `None` if there was none.
            pub(crate) async fn delete_endpoint(
                conn: &mut Conn,
                id: &str,
                actor: &str,
                action: &str,
                at: OffsetDateTime,
            ) -> Result<Option<WebhookEndpoint>, StoreError> {
                let Some(found) = endpoint(&mut *conn, id).await? else { return Ok(None) };
                sqlx::query("DELETE FROM webhook_deliveries WHERE endpoint_id = $1").bind(id).execute(&mut *conn).await?;
                sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1").bind(id).execute(&mut *conn).await?;
                audit(conn, at, actor, action, &json!({ "id": id, "url": crate::server::text::url_without_query(&found.url) })).await?;
                Ok(Some(found))
            }

            pub(crate) async fn endpoint<'e>(
                ex: impl Executor<'e, Database = $db>,
                id: &str,
            ) -> Result<Option<WebhookEndpoint>, StoreError> {
                let row = sqlx::query(&format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints e WHERE e.id = $1"))
                    .bind(id)
                    .fetch_optional(ex)
                    .await?;
                row.as_ref().map(endpoint_from_row).transpose()
            }

            pub(crate) async fn endpoints<'e>(
                ex: impl Executor<'e, Database = $db>,
                limit: u32,
            ) -> Result<Vec<WebhookEndpoint>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints e ORDER BY e.created_at, e.id LIMIT $1"
                ))
                .bind(i64::from(limit))
                .fetch_all(ex)
                .await?;
                rows.iter().map(endpoint_from_row).collect()
            }

            /// Every endpoint's URL and secret, by id.
            pub(crate) async fn targets<'e>(
                ex: impl Executor<'e, Database = $db>,
            ) -> Result<std::collections::HashMap<String, Target>, StoreError> {
                use ::sqlx::Row;
                let rows = sqlx::query("SELECT id, url, secret FROM webhook_endpoints").fetch_all(ex).await?;
                rows.iter()
                    .map(|r| Ok((r.try_get("id")?, Target { url: r.try_get("url")?, secret: r.try_get("secret")? })))
                    .collect()
            }

            /// Queues `events` for every endpoint that wants them, in the caller's
            /// transaction; past `max_pending` pending deliveries of an endpoint, drops its
            /// oldest ones and counts them. Returns how many were dropped.
            pub(crate) async fn enqueue(
                conn: &mut Conn,
                events: &[WebhookEvent],
                max_pending: u32,
            ) -> Result<u64, StoreError> {
                use ::sqlx::Row;
                if events.is_empty() {
                    return Ok(0);
                }
                let rows = sqlx::query("SELECT id, events FROM webhook_endpoints").fetch_all(&mut *conn).await?;
                let mut dropped = 0;
                for row in &rows {
                    let endpoint_id: String = row.try_get("id")?;
                    let wanted = parse_json_list(&row.try_get::<String, _>("events")?)?;
                    let mut queued = false;
                    for event in events.iter().filter(|ev| wants(&wanted, &ev.kind)) {
                        let payload = serde_json::to_string(event)
                            .map_err(|e| StoreError::Corrupt(format!("webhook event: {e}")))?;
                        let at = to_ms(event.created_at);
                        sqlx::query(
                            "INSERT INTO webhook_deliveries (endpoint_id, event_id, event_type, payload, created_at, \
                             state, attempts, next_attempt_at) VALUES ($1, $2, $3, $4, $5, 'pending', 0, $5)",
                        )
                        .bind(&endpoint_id)
                        .bind(&event.id)
                        .bind(&event.kind)
                        .bind(payload)
                        .bind(at)
                        .execute(&mut *conn)
                        .await?;
                        queued = true;
                    }
                    if queued {
                        dropped += trim(conn, &endpoint_id, max_pending).await?;
                    }
                }
                Ok(dropped)
            }

            /// Marks the pending deliveries of an endpoint beyond the newest `keep` as
            /// dropped and counts them on the endpoint.
            async fn trim(conn: &mut Conn, endpoint_id: &str, keep: u32) -> Result<u64, StoreError> {
                let done = sqlx::query(
                    "UPDATE webhook_deliveries SET state = 'dropped', last_error = 'queue full', claimed_until = NULL \
                     WHERE endpoint_id = $1 AND state = 'pending' AND id <= (SELECT id FROM webhook_deliveries \
                     WHERE endpoint_id = $1 AND state = 'pending' ORDER BY id DESC LIMIT 1 OFFSET $2)",
                )
                .bind(endpoint_id)
                .bind(i64::from(keep))
                .execute(&mut *conn)
                .await?;
                let n = done.rows_affected();
                if n > 0 {
                    ::tracing::warn!(webhook = endpoint_id, dropped = n, max_pending = keep, "webhook queue full; oldest pending deliveries dropped");
                    sqlx::query("UPDATE webhook_endpoints SET dropped = dropped + $2 WHERE id = $1")
                        .bind(endpoint_id)
                        .bind(n as i64)
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(n)
            }

            /// Whether any delivery is due: a read, so that an idle worker never takes
            /// the write lock.
            pub(crate) async fn any_due<'e>(
                ex: impl Executor<'e, Database = $db>,
                now: OffsetDateTime,
            ) -> Result<bool, StoreError> {
                let row = sqlx::query(
                    "SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= $1 \
                     AND (claimed_until IS NULL OR claimed_until <= $1) LIMIT 1",
                )
                .bind(to_ms(now))
                .fetch_optional(ex)
                .await?;
                Ok(row.is_some())
            }

            /// Claims up to `limit` due deliveries until `until`: one replica's, the others
            /// pass over the rows locked by the claim and see them claimed afterwards.
            pub(crate) async fn claim(
                conn: &mut Conn,
                now: OffsetDateTime,
                until: OffsetDateTime,
                limit: u32,
            ) -> Result<Vec<Claimed>, StoreError> {
                use ::sqlx::Row;
                let rows = sqlx::query(concat!(
                    "UPDATE webhook_deliveries SET claimed_until = $1 WHERE id IN (SELECT id FROM webhook_deliveries \
                     WHERE state = 'pending' AND next_attempt_at <= $2 AND (claimed_until IS NULL OR claimed_until <= $2) \
                     ORDER BY next_attempt_at, id LIMIT $3",
                    $skip_locked,
                    ") RETURNING id, endpoint_id, event_id, payload, attempts, created_at"
                ))
                .bind(to_ms(until))
                .bind(to_ms(now))
                .bind(i64::from(limit))
                .fetch_all(&mut *conn)
                .await?;
                let mut claimed = rows
                    .iter()
                    .map(|r| {
                        Ok(Claimed {
                            id: r.try_get("id")?,
                            endpoint_id: r.try_get("endpoint_id")?,
                            event_id: r.try_get("event_id")?,
                            payload: r.try_get("payload")?,
                            attempts: u32::try_from(r.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
                            created_at: from_ms(r.try_get("created_at")?)?,
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                claimed.sort_by_key(|c| c.id);
                Ok(claimed)
            }

            /// Records an attempt's outcome and releases the claim.
            pub(crate) async fn finish<'e>(
                ex: impl Executor<'e, Database = $db>,
                id: i64,
                a: &Attempt,
            ) -> Result<(), StoreError> {
                let (state, next, delivered) = match a.next {
                    AttemptNext::Delivered => ("delivered", None, Some(to_ms(a.at))),
                    AttemptNext::RetryAt(t) => ("pending", Some(to_ms(t)), None),
                    AttemptNext::Failed => ("failed", None, None),
                };
                sqlx::query(
                    "UPDATE webhook_deliveries SET state = $2, attempts = attempts + 1, last_attempt_at = $3, \
                     last_status = $4, last_error = $5, next_attempt_at = COALESCE($6, next_attempt_at), \
                     delivered_at = $7, claimed_until = NULL WHERE id = $1 AND state = 'pending'",
                )
                .bind(id)
                .bind(state)
                .bind(to_ms(a.at))
                .bind(a.status.map(i64::from))
                .bind(a.error.as_deref())
                .bind(next)
                .bind(delivered)
                .execute(ex)
                .await?;
                Ok(())
            }

            /// An endpoint's deliveries, newest first, before the delivery id `before`.
            pub(crate) async fn deliveries<'e>(
                ex: impl Executor<'e, Database = $db>,
                endpoint_id: &str,
                before: Option<i64>,
                limit: u32,
            ) -> Result<Vec<WebhookDelivery>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE endpoint_id = $1 \
                     AND (CAST($2 AS BIGINT) IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
                ))
                .bind(endpoint_id)
                .bind(before)
                .bind(i64::from(limit))
                .fetch_all(ex)
                .await?;
                rows.iter().map(delivery_from_row).collect()
            }

            /// Deletes each endpoint's finished deliveries beyond its newest `keep`.
            pub(crate) async fn prune(conn: &mut Conn, keep: u32) -> Result<u64, StoreError> {
                use ::sqlx::Row;
                let ids = sqlx::query("SELECT id FROM webhook_endpoints").fetch_all(&mut *conn).await?;
                let mut n = 0;
                for row in &ids {
                    let id: String = row.try_get("id")?;
                    let done = sqlx::query(
                        "DELETE FROM webhook_deliveries WHERE endpoint_id = $1 AND state <> 'pending' AND id <= \
                         (SELECT id FROM webhook_deliveries WHERE endpoint_id = $1 AND state <> 'pending' \
                         ORDER BY id DESC LIMIT 1 OFFSET $2)",
                    )
                    .bind(&id)
                    .bind(i64::from(keep))
                    .execute(&mut *conn)
                    .await?;
                    n += done.rows_affected();
                }
                Ok(n)
            }

            /// Whether the key is disabled now, holding its row lock until the
            /// transaction ends (so that the change that follows knows what it changed).
            // ---- the key sweep

            /// A key's expiry now, holding its row lock until the transaction ends;
            /// `None` for no key.
            pub(crate) async fn key_expiry_locked(
                conn: &mut Conn,
                key_id: &str,
            ) -> Result<Option<Option<OffsetDateTime>>, StoreError> {
                use ::sqlx::Row;
                let row = sqlx::query(concat!("SELECT k.expires_at FROM keys k WHERE k.key_id = $1", $row_lock))
                    .bind(key_id)
                    .fetch_optional(&mut *conn)
                    .await?;
                let Some(row) = row else { return Ok(None) };
                let ms: Option<i64> = row.try_get("expires_at")?;
                Ok(Some(ms.map(from_ms).transpose()?))
            }

            /// Unrevoked keys expiring in `(now, until]`, soonest first.
            pub(crate) async fn expiring<'e>(
                ex: impl Executor<'e, Database = $db>,
                now: OffsetDateTime,
                until: OffsetDateTime,
                limit: u32,
            ) -> Result<Vec<KeyInfo>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {KEY_COLUMNS} FROM keys k WHERE k.revoked_at IS NULL AND k.expires_at > $1 \
                     AND k.expires_at <= $2 ORDER BY k.expires_at, k.key_id LIMIT $3"
                ))
                .bind(to_ms(now))
                .bind(to_ms(until))
                .bind(i64::from(limit))
                .fetch_all(ex)
                .await?;
                rows.iter().map(key_from_row).collect()
            }

            /// Unrevoked, unexpired keys whose current secret was made before `before`,
            /// oldest first, with that secret's creation time.
            pub(crate) async fn aged<'e>(
                ex: impl Executor<'e, Database = $db>,
                now: OffsetDateTime,
                before: OffsetDateTime,
                limit: u32,
            ) -> Result<Vec<(KeyInfo, OffsetDateTime)>, StoreError> {
                use ::sqlx::Row;
                let rows = sqlx::query(&format!(
                    "SELECT {KEY_COLUMNS}, s.created_at AS secret_created_at FROM keys k \
                     JOIN key_secrets s ON s.key_id = k.key_id AND s.expires_at IS NULL \
                     WHERE k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > $1) \
                     AND s.created_at < $2 ORDER BY s.created_at, k.key_id LIMIT $3"
                ))
                .bind(to_ms(now))
                .bind(to_ms(before))
                .bind(i64::from(limit))
                .fetch_all(ex)
                .await?;
                rows.iter()
                    .map(|r| Ok((key_from_row(r)?, from_ms(r.try_get("secret_created_at")?)?)))
                    .collect()
            }
        }
    };
}
pub(crate) use webhook_queries;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_wants_its_types_prefixes_or_everything() {
        assert!(wants(&[], "key.created"));
        let some = vec!["key.revoked".to_owned(), "alert.*".to_owned()];
        assert!(wants(&some, "key.revoked"));
        assert!(wants(&some, "alert.denial_spike"));
        assert!(!wants(&some, "key.created"));
        assert!(!wants(&some, "key.revoked.later"));
    }
}
