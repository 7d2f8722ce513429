//! Reading rows back into the model, shared by every backend: the column names and
//! the encodings (times as Unix milliseconds, lists and objects as JSON text) are the
//! same everywhere, only the row type differs.

use sqlx::Row;

use super::owners::{credits_from, limits_from, ratelimit_of, revision_from};
use super::usage::Tally;
use super::{Found, StoreError, from_ms, from_ms_opt, parse_json, parse_json_list, ratelimit_from};
use crate::server::model::{Alert, AlertKind, AuditRecord, KeyInfo, RoleInfo, UsageBucket};

/// The columns [`key_from_row`] reads, from `keys k`.
pub(crate) const KEY_COLUMNS: &str = "k.key_id, k.owner, k.name, k.scopes, k.roles, k.environment, k.expires_at, \
     k.disabled, k.revoked_at, k.meta, k.ratelimit_limit, k.ratelimit_period_s, k.key_prefix, k.created_at, \
     k.updated_at, k.last_used_at, k.limits, k.credits, k.allowed_networks, k.credits_revision, k.credits_reconciled_at";

/// The columns [`alert_from_row`] reads, from `alerts`.
pub(crate) const ALERT_COLUMNS: &str =
    "id, at, key_id, kind, minute, observed, baseline, threshold, detail, acknowledged_at";

/// The columns [`role_from_row`] reads, from `roles`.
pub(crate) const ROLE_COLUMNS: &str = "name, scopes, updated_at";

/// The columns [`audit_from_row`] reads, from `audit`.
pub(crate) const AUDIT_COLUMNS: &str = "id, at, actor, action, key_id, changes";

/// Typed column access, the same for every backend's row.
pub(crate) trait Get {
    fn text(&self, col: &str) -> Result<String, sqlx::Error>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error>;
    fn int(&self, col: &str) -> Result<i64, sqlx::Error>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error>;
    fn flag(&self, col: &str) -> Result<bool, sqlx::Error>;
    fn real(&self, col: &str) -> Result<f64, sqlx::Error>;
}

macro_rules! impl_get {
    ($row:ty) => {
        impl Get for $row {
            fn text(&self, col: &str) -> Result<String, sqlx::Error> {
                self.try_get(col)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
                self.try_get(col)
            }
            fn int(&self, col: &str) -> Result<i64, sqlx::Error> {
                self.try_get(col)
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
                self.try_get(col)
            }
            fn flag(&self, col: &str) -> Result<bool, sqlx::Error> {
                self.try_get(col)
            }
            fn real(&self, col: &str) -> Result<f64, sqlx::Error> {
                self.try_get(col)
            }
        }
    };
}

impl_get!(sqlx::sqlite::SqliteRow);
#[cfg(feature = "postgres")]
impl_get!(sqlx::postgres::PgRow);

pub(crate) fn key_from_row(row: &impl Get) -> Result<KeyInfo, StoreError> {
    let revoked_at = from_ms_opt(row.opt_int("revoked_at")?)?;
    let legacy = ratelimit_from(row.opt_int("ratelimit_limit")?, row.opt_int("ratelimit_period_s")?);
    let limits = limits_from(&row.text("limits")?, legacy)?;
    Ok(KeyInfo {
        key_id: row.text("key_id")?,
        owner: row.text("owner")?,
        name: row.text("name")?,
        scopes: parse_json_list(&row.text("scopes")?)?,
        roles: parse_json_list(&row.text("roles")?)?,
        environment: row.text("environment")?,
        expires_at: from_ms_opt(row.opt_int("expires_at")?)?,
        disabled: row.flag("disabled")?,
        revoked: revoked_at.is_some(),
        revoked_at,
        meta: parse_json(&row.text("meta")?)?,
        ratelimit: ratelimit_of(&limits),
        limits,
        credits: credits_from(row.opt_text("credits")?.as_deref())?,
        credits_revision: revision_from(row.opt_int("credits_revision")?),
        credits_reconciled_at: from_ms_opt(row.opt_int("credits_reconciled_at")?)?,
        allowed_networks: parse_json_list(&row.text("allowed_networks")?)?,
        created_at: from_ms(row.int("created_at")?)?,
        updated_at: from_ms_opt(row.opt_int("updated_at")?)?,
        last_used_at: from_ms_opt(row.opt_int("last_used_at")?)?,
        key_prefix: row.text("key_prefix")?,
    })
}

/// A key's row with its secret's `secret_expires_at` and its roles' scope lists,
/// newline-joined, as `role_scopes`.
pub(crate) fn found_from_row(row: &impl Get) -> Result<Found, StoreError> {
    let mut role_scopes = Vec::new();
    if let Some(lists) = row.opt_text("role_scopes")? {
        for list in lists.lines() {
            role_scopes.extend(parse_json_list(list)?);
        }
    }
    Ok(Found {
        key: key_from_row(row)?,
        secret_expires_at: from_ms_opt(row.opt_int("secret_expires_at")?)?,
        role_scopes,
        owner_limits: match row.opt_text("owner_limits")? {
            Some(json) => limits_from(&json, None)?,
            None => Vec::new(),
        },
        owner_credits: credits_from(row.opt_text("owner_credits")?.as_deref())?,
        owner_credits_revision: revision_from(row.opt_int("owner_credits_revision")?),
        owner_allowed_networks: match row.opt_text("owner_allowed_networks")? {
            Some(json) => parse_json_list(&json)?,
            None => Vec::new(),
        },
    })
}

pub(crate) fn role_from_row(row: &impl Get) -> Result<RoleInfo, StoreError> {
    Ok(RoleInfo {
        name: row.text("name")?,
        scopes: parse_json_list(&row.text("scopes")?)?,
        updated_at: from_ms(row.int("updated_at")?)?,
    })
}

pub(crate) fn alert_from_row(row: &impl Get) -> Result<Alert, StoreError> {
    let kind = row.text("kind")?;
    Ok(Alert {
        id: Some(row.int("id")?.max(0) as u64),
        acknowledged_at: from_ms_opt(row.opt_int("acknowledged_at")?)?,
        at: from_ms(row.int("at")?)?,
        key_id: row.text("key_id")?,
        kind: AlertKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("alert kind `{kind}`")))?,
        minute: from_ms(row.int("minute")?.saturating_mul(1000))?,
        observed: row.int("observed")?.max(0) as u64,
        baseline: row.real("baseline")?,
        threshold: row.real("threshold")?,
        detail: row.text("detail")?,
    })
}

pub(crate) fn audit_from_row(row: &impl Get) -> Result<AuditRecord, StoreError> {
    Ok(AuditRecord {
        at: from_ms(row.int("at")?)?,
        actor: row.text("actor")?,
        action: row.text("action")?,
        key_id: row.opt_text("key_id")?,
        changes: parse_json(&row.text("changes")?)?,
    })
}

/// A bucket of usage starting at `start` (Unix seconds), of a route when grouped by route.
pub(crate) fn bucket_from(
    start: i64,
    route: Option<(String, String, String)>,
    tally: &Tally,
) -> Result<UsageBucket, StoreError> {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let quantile = |q: f64| tally.latency.quantile(q).map(ms);
    let (route, method, outcome) = match route {
        Some((r, m, o)) => (Some(r), Some(m), Some(o)),
        None => (None, None, None),
    };
    let s = &tally.status;
    Ok(UsageBucket {
        start: from_ms(start.saturating_mul(1000))?,
        route,
        method,
        outcome,
        requests: tally.requests,
        allowed: tally.allowed,
        denied: tally.denied,
        status_1xx: s.informational,
        status_2xx: s.success,
        status_3xx: s.redirection,
        status_4xx: s.client_error,
        status_5xx: s.server_error,
        latency_ms_sum: tally.latency_us_sum as f64 / 1000.0,
        latency_ms_max: tally.latency_us_max as f64 / 1000.0,
        latency_ms_p50: quantile(0.5),
        latency_ms_p90: quantile(0.9),
        latency_ms_p99: quantile(0.99),
    })
}
