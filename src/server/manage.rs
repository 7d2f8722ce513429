//! The admin routes the CLI's operator commands added: `DELETE /v1/roles/{name}`
//! (refused while keys hold the role, unless `?detach=true`) and
//! `POST /v1/alerts/{id}/ack`.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Admin;
use super::error::ApiError;
use super::model::Alert;
use super::state::ServerState;
use super::store::now_ms;
use super::text::shown;
use super::validate::validate_role_name;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteRoleQuery {
    #[serde(default)]
    detach: bool,
}

/// `DELETE /v1/roles/{name}[?detach=true]`: 200 `{"name", "deleted": true, "detached":
/// [key ids]}`; 404 for an unknown role; 409 `conflict` naming how many keys hold it
/// when some do and `detach` is not set. With `detach`, the role is first removed from
/// each key holding it (a `key.update` audit record and an `updated` event each), then
/// deleted (`role.delete`).
pub(crate) async fn delete_role(
    State(state): State<ServerState>,
    admin: Admin,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<DeleteRoleQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(name) = name.map_err(|e| ApiError::invalid("invalid_request", e.body_text()))?;
    let Query(q) = q.map_err(|e| ApiError::invalid("invalid_query", e.body_text()))?;
    validate_role_name(&name).map_err(|m| ApiError::invalid("invalid_role", m))?;
    let detached = state.inner.store.delete_role(&name, q.detach, admin.actor(), now_ms()).await?;
    tracing::info!(role = %name, detached = detached.len(), "role deleted");
    Ok(Json(json!({ "name": name, "deleted": true, "detached": detached })))
}

/// `POST /v1/alerts/{id}/ack`: 200 with the alert, `acknowledged_at` set. Acknowledging
/// twice keeps the first time (and writes one `alert.ack` record).
pub(crate) async fn ack_alert(
    State(state): State<ServerState>,
    admin: Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Alert>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::invalid("invalid_request", e.body_text()))?;
    let n = id
        .parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::NotFound(format!("no alert with id `{}`", shown(&id))))?;
    let alert = state.inner.store.ack_alert(n, admin.actor(), now_ms()).await?;
    tracing::info!(alert_id = n, key_id = %alert.key_id, "alert acknowledged");
    Ok(Json(alert))
}
