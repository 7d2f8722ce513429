//! `POST /v1/tokens`, `GET /v1/tokens`, `POST /v1/tokens/{id}/revoke` (admin token),
//! and the offline creation the CLI runs against a database directly.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::api::JsonBody;
use super::auth::Admin;
use super::error::{ApiError, ServerError};
use super::state::ServerState;
use super::store::{Revoked, Store, now_ms};
use super::text::shown;
use super::token::{CreatedToken, MAX_ACTIVE_TOKENS, NewToken, OFFLINE_ACTOR, TokenInfo, check_name, generate};

/// Generates and stores a token of `new.kind` named `new.name`, audited as `actor`.
async fn create(store: &Store, new: &NewToken, actor: &str) -> Result<CreatedToken, ApiError> {
    check_name(&new.name).map_err(|m| ApiError::invalid("invalid_name", m))?;
    let (token, record) = generate(new.kind, &new.name, now_ms()).map_err(|e| {
        tracing::error!(error = %e, "cannot generate a token");
        ApiError::Internal
    })?;
    let info = store.create_token(&record, actor).await?;
    Ok(CreatedToken { info, token })
}

#[utoipa::path(
    post,
    path = "/v1/tokens",
    tag = "tokens",
    summary = "Create a token",
    request_body = NewToken,
    responses(
        (status = 201, description = "The token, shown this once, and its fields.", body = CreatedToken),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 409, response = crate::server::openapi::Conflict),
        (status = 413, response = crate::server::openapi::TooLarge),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
/// `POST /v1/tokens {kind, name}`: `201 {id, name, kind, prefix, created_at, ..., token}`,
/// the token shown this once.
pub(crate) async fn create_token(
    State(state): State<ServerState>,
    admin: Admin,
    JsonBody(new): JsonBody<NewToken>,
) -> Result<Response, ApiError> {
    let created = create(&state.inner.store, &new, admin.actor()).await?;
    // Accepted here before the answer; other replicas hear the change note.
    reload(&state).await;
    tracing::info!(token = %created.info.name, kind = %created.info.kind, by = admin.actor(), "token created");
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// The answer of `GET /v1/tokens`.
#[derive(Serialize, ToSchema)]
pub(crate) struct TokenList {
    tokens: Vec<TokenInfo>,
}

#[utoipa::path(
    get,
    path = "/v1/tokens",
    tag = "tokens",
    summary = "List tokens",
    responses(
        (status = 200, description = "This replica's bootstrap tokens, then every stored one, active ones first; never a token or its digest.", body = TokenList),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
/// `GET /v1/tokens`: the bootstrap tokens of this replica, then every stored token,
/// active ones first, each group oldest first; never a token or its digest.
pub(crate) async fn list_tokens(State(state): State<ServerState>, _: Admin) -> Result<Json<TokenList>, ApiError> {
    let tokens = &state.inner.tokens;
    let limit = u32::try_from(MAX_ACTIVE_TOKENS * 10).unwrap_or(u32::MAX);
    let mut list: Vec<TokenInfo> = tokens.bootstrap_infos();
    for mut t in state.inner.store.list_tokens(limit).await? {
        if t.revoked_at.is_none() {
            if let Some(used) = tokens.noted_use(&t.id) {
                t.last_used_at = t.last_used_at.max(Some(used));
            }
        }
        list.push(t);
    }
    Ok(Json(TokenList { tokens: list }))
}

#[utoipa::path(
    post,
    path = "/v1/tokens/{id}/revoke",
    tag = "tokens",
    summary = "Revoke a token (idempotent)",
    params(("id" = String, Path, description = "The token's id (`tok_` + 22 base62 characters).")),
    responses(
        (status = 200, description = "The token, revoked.", body = TokenInfo),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 404, response = crate::server::openapi::NotFound),
        (status = 409, response = crate::server::openapi::Conflict),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
/// `POST /v1/tokens/{id}/revoke`: idempotent; refused (409) for the last active admin
/// token and for bootstrap tokens. The token stops working on this replica before the
/// answer, its event streams closed; other replicas follow on the change note.
pub(crate) async fn revoke_token(
    State(state): State<ServerState>,
    admin: Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<TokenInfo>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::invalid("invalid_request", e.body_text()))?;
    let tokens = &state.inner.tokens;
    if tokens.bootstrap_infos().iter().any(|t| t.id == id) {
        return Err(ApiError::Conflict(format!(
            "`{id}` is configured at start (KEYGATE_*_TOKEN, a token file or the builder), not stored: remove it \
             from the configuration and restart to retire it"
        )));
    }
    if !looks_like_token_id(&id) {
        return Err(ApiError::NotFound(format!("no token with id `{}`", shown(&id))));
    }
    // Only stored admin tokens count as the others: a bootstrap admin is this replica's
    // configuration, and another replica started without one would be locked out.
    let revoked = state.inner.store.revoke_token(&id, admin.actor(), now_ms(), 0).await?;
    let info = match revoked {
        Revoked::Now(info) => {
            reload(&state).await;
            tracing::info!(token = %info.name, kind = %info.kind, by = admin.actor(), "token revoked");
            info
        }
        Revoked::Before(info) => info,
    };
    Ok(Json(info))
}

/// Reloads this replica's tokens now; on failure the background task retries soon.
async fn reload(state: &ServerState) {
    let tokens = &state.inner.tokens;
    if let Err(e) = tokens.reload(&state.inner.store).await {
        tracing::error!(error = %e, "cannot reload the tokens after a change; retrying in the background");
        tokens.changed();
    }
}

fn looks_like_token_id(id: &str) -> bool {
    id.len() <= 64 && id.starts_with("tok_") && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Creates a token directly in the database at `database` (no key service needed),
/// audited as [`OFFLINE_ACTOR`]: how a first admin token is made for a persistent
/// database. Running replicas sharing a PostgreSQL database accept it at once; a SQLite
/// file's server, on its next reload (at most
/// [`TOKEN_SYNC_INTERVAL`](super::TOKEN_SYNC_INTERVAL)) or restart.
///
/// ```no_run
/// # async fn run() -> Result<(), keygate::server::ServerError> {
/// use keygate::client::{NewToken, TokenKind};
/// use keygate::server::create_token_offline;
///
/// let created =
///     create_token_offline("sqlite://keys.db", &NewToken { kind: TokenKind::Admin, name: "ops".into() }).await?;
/// println!("{} (shown once)", created.token);
/// # Ok(()) }
/// ```
pub async fn create_token_offline(database: &str, new: &NewToken) -> Result<CreatedToken, ServerError> {
    check_name(&new.name).map_err(ServerError::Config)?;
    let (token, record) = generate(new.kind, &new.name, now_ms()).map_err(ServerError::Config)?;
    let store = super::open_store(database).await?;
    let stored = store.create_token(&record, OFFLINE_ACTOR).await;
    store.close().await;
    Ok(CreatedToken { info: stored?, token })
}
