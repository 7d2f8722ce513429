//! Limits and credits (issue 16): how keys' `limits` / `credits` columns are encoded,
//! and the `owners` table of limits and credits shared by all of an owner's keys.
//! [`owner_queries!`] generates the statements once per database type, as `queries`
//! does for keys.

use time::OffsetDateTime;

use super::{Backend, Store, StoreError, from_ms};
use crate::client::OwnerInfo;
use crate::principal::RateLimit;
use crate::quota::{Credits, Limit, REQUESTS};
use crate::server::events::{ChangeNote, KeyEvent};

/// Audit action of an owner's limits or credits set.
pub(crate) const OWNER_PUT: &str = "owner.put";

/// Advisory lock namespace of owner changes (first key of the two-key form).
pub(crate) const LOCK_OWNER: i32 = 0x6b67_0005;

/// A `limits` column: a JSON array, with the `requests` limit of a row written before
/// schema 7 (which only has the `ratelimit_*` columns) added.
pub(crate) fn limits_from(json: &str, legacy: Option<RateLimit>) -> Result<Vec<Limit>, StoreError> {
    let mut limits: Vec<Limit> =
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("limits column: {e}")))?;
    if let Some(rl) = legacy.filter(|_| !limits.iter().any(|l| &*l.name == REQUESTS)) {
        limits.insert(0, Limit::new(REQUESTS, rl.limit, rl.period_s));
    }
    Ok(limits)
}

/// A `credits` column: JSON or NULL.
pub(crate) fn credits_from(json: Option<&str>) -> Result<Option<Credits>, StoreError> {
    json.map(|s| serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("credits column: {e}")))).transpose()
}

/// A `credits_revision` column.
pub(crate) fn revision_from(column: Option<i64>) -> Option<u64> {
    column.map(|r| r.max(0) as u64)
}

/// The credits revision of a set that follows `previous`: Unix microseconds now, or
/// `previous + 1` when that is larger (a clock behind the previous set's), so that it
/// only grows, whichever replica sets it, and a set after a restore from backup never
/// reuses a revision a fleet-wide engine counted from. It fits the BIGINT column.
pub(crate) fn next_credits_revision(previous: Option<u64>) -> u64 {
    let now_us = u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000).unwrap_or(0);
    now_us.max(previous.map_or(1, |p| p.saturating_add(1))).min(i64::MAX as u64)
}

/// How a `limits` list is stored.
pub(crate) fn limits_json(limits: &[Limit]) -> String {
    serde_json::to_string(limits).expect("limits serialize")
}

/// How credits are stored.
pub(crate) fn credits_json(credits: Option<&Credits>) -> Option<String> {
    credits.map(|c| serde_json::to_string(c).expect("credits serialize"))
}

/// The `requests` limit as the single `ratelimit` older clients and middlewares read
/// (its burst, which they do not know, left out).
pub(crate) fn ratelimit_of(limits: &[Limit]) -> Option<RateLimit> {
    limits.iter().find(|l| &*l.name == REQUESTS).map(|l| RateLimit { limit: l.limit, period_s: l.period_s })
}

/// Defines the module `owner_queries` for the `sqlx::Database` given; `name_lock` as in
/// `shared_queries!`.
macro_rules! owner_queries {
    ($db:ty, name_lock = $name_lock:path) => {
        pub(crate) mod owner_queries {
            use ::sqlx::Row;
            use ::time::OffsetDateTime;

            use $crate::quota::{Credits, Limit};
            use $crate::client::OwnerInfo;
            use $crate::server::store::owners::{
                LOCK_OWNER, OWNER_PUT, credits_from, credits_json, limits_from, limits_json, next_credits_revision,
                owner_info, revision_from,
            };
            use $crate::server::store::{StoreError, to_ms};

            type Conn = <$db as ::sqlx::Database>::Connection;

            /// The owner's settings (empty when none were set).
            pub(crate) async fn get<'e>(
                ex: impl ::sqlx::Executor<'e, Database = $db>,
                owner: &str,
            ) -> Result<OwnerInfo, StoreError> {
                let row = sqlx::query(
                    "SELECT limits, credits, allowed_networks, updated_at, credits_revision, credits_reconciled_at \
                     FROM owners WHERE owner = $1",
                )
                    .bind(owner)
                    .fetch_optional(ex)
                    .await?;
                match row {
                    None => Ok(OwnerInfo {
                        owner: owner.to_owned(),
                        limits: Vec::new(),
                        credits: None,
                        credits_revision: None,
                        credits_reconciled_at: None,
                        allowed_networks: Vec::new(),
                        updated_at: None,
                    }),
                    Some(row) => {
                        let mut info = owner_info(
                            owner,
                            limits_from(&row.try_get::<String, _>("limits")?, None)?,
                            credits_from(row.try_get::<Option<String>, _>("credits")?.as_deref())?,
                            $crate::server::store::parse_json_list(&row.try_get::<String, _>("allowed_networks")?)?,
                            row.try_get("updated_at")?,
                        )?;
                        info.credits_revision = revision_from(row.try_get("credits_revision")?);
                        info.credits_reconciled_at =
                            $crate::server::store::from_ms_opt(row.try_get("credits_reconciled_at")?)?;
                        Ok(info)
                    }
                }
            }

            /// Replaces the owner's settings and writes `owner.put`. Returns the
            /// settings and the owner's unrevoked keys (their answers changed), or no
            /// keys when nothing changed.
            pub(crate) async fn put(
                conn: &mut Conn,
                owner: &str,
                limits: &[Limit],
                credits: Option<&Credits>,
                networks: &[String],
                actor: &str,
                at: OffsetDateTime,
            ) -> Result<(OwnerInfo, Vec<String>), StoreError> {
                $name_lock(&mut *conn, LOCK_OWNER, owner).await?;
                let before = get(&mut *conn, owner).await?;
                if before.limits == limits && before.credits.as_ref() == credits && before.allowed_networks == networks {
                    return Ok((before, Vec::new()));
                }
                // A PUT carries the credits whatever it changes: only a change of them is
                // a set (a new revision); the same credits keep the fleet-wide count.
                let (revision, reconciled_at) = if before.credits.as_ref() == credits {
                    (before.credits_revision, before.credits_reconciled_at)
                } else {
                    (Some(next_credits_revision(before.credits_revision)), None)
                };
                sqlx::query(
                    "INSERT INTO owners (owner, limits, credits, allowed_networks, updated_at, credits_revision, \
                     credits_reconciled_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (owner) DO UPDATE SET limits = EXCLUDED.limits, credits = EXCLUDED.credits, \
                     allowed_networks = EXCLUDED.allowed_networks, updated_at = EXCLUDED.updated_at, \
                     credits_revision = EXCLUDED.credits_revision, credits_reconciled_at = EXCLUDED.credits_reconciled_at",
                )
                .bind(owner)
                .bind(limits_json(limits))
                .bind(credits_json(credits))
                .bind(::serde_json::Value::from(networks.to_vec()).to_string())
                .bind(to_ms(at))
                .bind(revision.map(|r| r as i64))
                .bind(reconciled_at.map(to_ms))
                .execute(&mut *conn)
                .await?;
                let affected: Vec<String> = sqlx::query_scalar(
                    "SELECT key_id FROM keys WHERE owner = $1 AND revoked_at IS NULL ORDER BY key_id",
                )
                .bind(owner)
                .fetch_all(&mut *conn)
                .await?;
                let changes = ::serde_json::json!({
                    "owner": owner,
                    "limits": { "from": before.limits, "to": limits },
                    "credits": { "from": before.credits, "to": credits },
                    "credits_revision": { "from": before.credits_revision, "to": revision },
                    "allowed_networks": { "from": before.allowed_networks, "to": networks },
                });
                super::shared::write_audit(conn, at, actor, OWNER_PUT, None, &changes).await?;
                let info = OwnerInfo {
                    owner: owner.to_owned(),
                    limits: limits.to_vec(),
                    credits: credits.cloned(),
                    credits_revision: revision,
                    credits_reconciled_at: reconciled_at,
                    allowed_networks: networks.to_vec(),
                    updated_at: Some(at),
                };
                Ok((info, affected))
            }
        }
    };
}
pub(crate) use owner_queries;

/// Reads an `owners` row.
pub(crate) fn owner_info(
    owner: &str,
    limits: Vec<Limit>,
    credits: Option<Credits>,
    allowed_networks: Vec<String>,
    updated_at: i64,
) -> Result<OwnerInfo, StoreError> {
    Ok(OwnerInfo {
        owner: owner.to_owned(),
        limits,
        credits,
        credits_revision: None,
        credits_reconciled_at: None,
        allowed_networks,
        updated_at: Some(from_ms(updated_at)?),
    })
}

/// `$body` once per backend, with `$b` the backend and `$q` its owner queries.
macro_rules! each_owner_backend {
    ($store:expr, $b:ident, $q:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite($b) => {
                use super::sqlite::owner_queries as $q;
                $body
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres($b) => {
                use super::postgres::owner_queries as $q;
                $body
            }
        }
    };
}

impl Store {
    /// An owner's limits and credits (empty when none were set).
    pub async fn get_owner(&self, owner: &str) -> Result<OwnerInfo, StoreError> {
        self.metered("get_owner", async { each_owner_backend!(self, b, q => q::get(b.pool(), owner).await) }).await
    }

    /// Replaces an owner's validated limits and credits and writes `owner.put`; each of
    /// the owner's unrevoked keys is `updated` (or all are `reset` above
    /// `MAX_EVENTS_PER_CHANGE`). Setting what is set
    /// already writes and says nothing.
    pub(crate) async fn put_owner(
        &self,
        owner: &str,
        limits: &[Limit],
        credits: Option<&Credits>,
        networks: &[String],
        actor: &str,
        at: OffsetDateTime,
    ) -> Result<OwnerInfo, StoreError> {
        self.metered("put_owner", async {
            let value = each_owner_backend!(self, b, q => {
                let mut tx = b.write().await?;
                let (info, affected) = q::put(&mut tx, owner, limits, credits, networks, actor, at).await?;
                let notes: Vec<ChangeNote> = super::notes_for_keys(KeyEvent::Updated, affected);
                b.commit(tx, &notes, &*self.sink).await?;
                info
            });
            Ok(value)
        })
        .await
    }
}
