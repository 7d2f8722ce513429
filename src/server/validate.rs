//! Validation of admin input: the limits of [`model`](super::model), as API errors.

use time::OffsetDateTime;

use crate::principal::RateLimit;
use crate::scope::{Scope, validate_role};

use super::error::ApiError;
use super::model::{MAX_META_BYTES, MAX_NAME_LEN, MAX_RATELIMIT_PERIOD_S, MAX_ROLES, MAX_SCOPES};
use super::text::shown;

pub(crate) fn validate_text(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid("invalid_request", format!("`{field}` must not be empty")));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(ApiError::invalid("invalid_request", format!("`{field}` is longer than {MAX_NAME_LEN} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid("invalid_request", format!("`{field}` must not contain control characters")));
    }
    Ok(())
}

/// Validates scopes and returns them sorted and deduplicated.
pub(crate) fn validate_scopes(field: &str, scopes: &[String]) -> Result<Vec<String>, ApiError> {
    if scopes.len() > MAX_SCOPES {
        return Err(ApiError::invalid("invalid_scope", format!("`{field}` holds more than {MAX_SCOPES} scopes")));
    }
    let mut out = Vec::with_capacity(scopes.len());
    for (i, s) in scopes.iter().enumerate() {
        Scope::parse(s).map_err(|e| ApiError::invalid("invalid_scope", format!("{field}[{i}]: {e}")))?;
        out.push(s.clone());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Validates role names and returns them sorted and deduplicated.
pub(crate) fn validate_roles(roles: &[String]) -> Result<Vec<String>, ApiError> {
    if roles.len() > MAX_ROLES {
        return Err(ApiError::invalid("invalid_role", format!("`roles` holds more than {MAX_ROLES} roles")));
    }
    let mut out = Vec::with_capacity(roles.len());
    for (i, r) in roles.iter().enumerate() {
        validate_role_name(r).map_err(|e| ApiError::invalid("invalid_role", format!("roles[{i}]: {e}")))?;
        out.push(r.clone());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

pub(crate) fn validate_role_name(name: &str) -> Result<(), String> {
    validate_role(name).map_err(|_| format!("role name `{}` must match [a-z0-9_.-]{{1,64}}", shown(name)))
}

pub(crate) fn validate_environment(env: &str) -> Result<(), ApiError> {
    let b = env.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "invalid_request",
            "`environment` must match [a-z][a-z0-9_-]{0,31} (e.g. `live`, `test`)",
        ))
    }
}

pub(crate) fn validate_expiry(at: OffsetDateTime, now: OffsetDateTime) -> Result<(), ApiError> {
    if at <= now {
        return Err(ApiError::invalid("invalid_expiry", "`expires_at` must be in the future"));
    }
    Ok(())
}

pub(crate) fn validate_meta(meta: &serde_json::Value) -> Result<(), ApiError> {
    if !meta.is_object() {
        return Err(ApiError::invalid("invalid_request", "`meta` must be a JSON object"));
    }
    if meta.to_string().len() > MAX_META_BYTES {
        return Err(ApiError::invalid("invalid_request", format!("`meta` is larger than {MAX_META_BYTES} bytes")));
    }
    Ok(())
}

pub(crate) fn validate_ratelimit(rl: &RateLimit) -> Result<(), ApiError> {
    // The store keeps the limit in a signed 64-bit column: larger values would come
    // back as "no limit".
    let too_large = rl.limit > i64::MAX as u64;
    if rl.limit == 0 || too_large || rl.period_s == 0 || rl.period_s > MAX_RATELIMIT_PERIOD_S {
        return Err(ApiError::invalid(
            "invalid_request",
            format!(
                "`ratelimit` needs limit between 1 and {} and period_s between 1 and {MAX_RATELIMIT_PERIOD_S}",
                i64::MAX
            ),
        ));
    }
    Ok(())
}
