//! The admin routes the CLI's operator commands added: `DELETE /v1/roles/{name}`
//! (refused while keys hold the role, unless `?detach=true`) and
//! `POST /v1/alerts/{id}/ack`.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::error::ApiError;
use super::model::Alert;
use super::state::ServerState;
use super::store::now_ms;
use super::text::shown;
use super::validate::validate_role_name;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteRoleQuery {
    /// Remove the role from the keys holding it first (default `false`: refused while some do).
    #[serde(default)]
    detach: bool,
}

/// The answer of `DELETE /v1/roles/{name}`.
#[derive(Serialize, ToSchema)]
pub(crate) struct RoleDeleted {
    name: String,
    /// Always `true`.
    deleted: bool,
    /// The keys the role was removed from (with `detach`).
    detached: Vec<String>,
}

#[utoipa::path(
    delete,
    path = "/v1/roles/{name}",
    tag = "roles",
    summary = "Delete a role",
    params(("name" = String, Path, description = "The role's name."), DeleteRoleQuery),
    responses(
        (status = 200, description = "The role is gone.", body = RoleDeleted),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 404, response = crate::server::openapi::NotFound),
        (status = 409, response = crate::server::openapi::Conflict),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
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
) -> Result<Json<RoleDeleted>, ApiError> {
    let Path(name) = name.map_err(|e| ApiError::invalid("invalid_request", e.body_text()))?;
    let Query(q) = q.map_err(|e| ApiError::invalid("invalid_query", e.body_text()))?;
    validate_role_name(&name).map_err(|m| ApiError::invalid("invalid_role", m))?;
    let detached = state.inner.store.delete_role(&name, q.detach, admin.actor(), now_ms()).await?;
    tracing::info!(role = %name, detached = detached.len(), "role deleted");
    Ok(Json(RoleDeleted { name, deleted: true, detached }))
}

#[utoipa::path(
    post,
    path = "/v1/alerts/{id}/ack",
    tag = "alerts",
    summary = "Acknowledge an alert",
    params(("id" = String, Path, description = "The alert's id (a positive integer).")),
    responses(
        (status = 200, description = "The alert, `acknowledged_at` set (the first time, when acknowledged twice).", body = Alert),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 404, response = crate::server::openapi::NotFound),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
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
