//! `GET` and `PUT /v1/owners/{owner}`: limits and credits shared by all of an owner's
//! keys (issue 16). Setting them writes `owner.put` and sends `updated` for each of the
//! owner's keys, whose verify answers carry them.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};

use super::api::JsonBody;
use super::auth::Admin;
use super::error::ApiError;
use super::state::ServerState;
use super::store::now_ms;
use super::validate::{validate_credits, validate_limits, validate_text};
use crate::client::{OwnerInfo, OwnerQuota};

fn owner(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let owner = p.map(|Path(s)| s).map_err(|e| ApiError::invalid("invalid_request", e.body_text()))?;
    validate_text("owner", &owner)?;
    Ok(owner)
}

#[utoipa::path(
    get,
    path = "/v1/owners/{owner}",
    tag = "owners",
    summary = "Show an owner's limits and credits",
    params(("owner" = String, Path, description = "The owner, as its keys name it.")),
    responses(
        (status = 200, description = "The owner's limits and credits (empty when none were set).", body = OwnerInfo),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn get_owner(
    State(state): State<ServerState>,
    _: Admin,
    owner_path: Result<Path<String>, PathRejection>,
) -> Result<Json<OwnerInfo>, ApiError> {
    let owner = owner(owner_path)?;
    Ok(Json(state.inner.store.get_owner(&owner).await?))
}

#[utoipa::path(
    put,
    path = "/v1/owners/{owner}",
    tag = "owners",
    summary = "Set an owner's limits and credits",
    params(("owner" = String, Path, description = "The owner, as its keys name it.")),
    request_body = OwnerQuota,
    responses(
        (status = 200, description = "The owner's limits and credits as set.", body = OwnerInfo),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 413, response = crate::server::openapi::TooLarge),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
/// Replaces the owner's limits and credits (`{"limits": [], "credits": null}` clears
/// them). Writes `owner.put` and sends `updated` for each of the owner's unrevoked keys;
/// setting what is set already writes and sends nothing.
pub(crate) async fn put_owner(
    State(state): State<ServerState>,
    admin: Admin,
    owner_path: Result<Path<String>, PathRejection>,
    JsonBody(req): JsonBody<OwnerQuota>,
) -> Result<Json<OwnerInfo>, ApiError> {
    let owner = owner(owner_path)?;
    validate_limits(&req.limits)?;
    if let Some(credits) = &req.credits {
        validate_credits(credits)?;
    }
    let networks = super::validate::validate_networks(&req.allowed_networks)?;
    let store = &state.inner.store;
    let info = store.put_owner(&owner, &req.limits, req.credits.as_ref(), &networks, admin.actor(), now_ms()).await?;
    tracing::info!(owner = %owner, limits = info.limits.len(), credits = info.credits.is_some(), "owner limits set");
    Ok(Json(info))
}
