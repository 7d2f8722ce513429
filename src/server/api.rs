//! The HTTP API of protocol v1 (the middleware's side is documented in
//! [`wire`](crate::wire)) as an axum [`Router`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::response::sse::Sse;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Router, http::StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use utoipa::openapi::schema::{OneOfBuilder, Schema};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{IntoParams, OpenApi, PartialSchema, ToSchema};

use super::auth::{Admin, Service};
use super::error::ApiError;
use super::events::{FetchChanges, Start, looks_like_key_id, start_from};
use super::meters::VerifyOutcome;
use super::model::{
    Alert, AuditRecord, DEFAULT_ENVIRONMENT, KeyInfo, KeyPatch, MAX_GRACE_S, NewKey, RoleInfo, RoleRequest,
    RotateRequest, UsageGroupBy, UsageReport,
};
use super::openapi::SecuritySchemes;
use super::report::{Whose, usage_report};
use super::state::{ServerState, Stats};
use super::store::{
    Applied, BatchMark, Found, KeyCursor, KeyFilter, KeySort, KeyState, NewKeyRecord, NewSecret, now_ms, to_ms,
};
use super::text::{rfc3339, shown};
use super::usage::{self, AGGREGATE_BODY_LIMIT, BatchForm};
use super::validate::{
    merge_ratelimit, validate_credits, validate_environment, validate_expiry, validate_meta, validate_networks,
    validate_ratelimit, validate_role_name, validate_roles, validate_scopes, validate_text,
};
use super::webhook_api;
use crate::key::{ApiKey, KeyDigest};
use crate::usage::{AggregateBatch, UsageBatch};
use crate::verify::Reason;
use crate::wire::{
    MAX_VERIFY_BATCH, Refusal, UsageAccepted, ValidKey, VerifyAnswer, VerifyBatchAnswer, VerifyBatchRequest,
    VerifyRequest,
};

/// Largest admin or verify request body: 64 KiB.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Largest `POST /v1/usage` body carrying raw events: 4 MiB (aggregate batches:
/// [`AGGREGATE_BODY_LIMIT`](super::AGGREGATE_BODY_LIMIT)).
pub const USAGE_BODY_LIMIT: usize = 4 * 1024 * 1024;
/// Most events in one raw `POST /v1/usage` batch.
pub const MAX_USAGE_EVENTS: usize = 10_000;
/// Most records one `GET /v1/audit`, `/v1/alerts` or `/v1/keys` answer holds.
pub const MAX_RECORDS: u32 = 1000;
/// Longer keys cannot be ours: answered `NOT_FOUND` without a lookup.
const MAX_VERIFY_KEY_LEN: usize = 1024;

/// The key service's routes, with `state` applied.
///
/// | route | token |
/// | --- | --- |
/// | `POST /v1/keys/verify`, `POST /v1/keys/verify-batch`, `POST /v1/usage`, `GET /v1/events` | service |
/// | `POST/GET /v1/keys`, `GET/PATCH /v1/keys/{id}`, `POST /v1/keys/{id}/rotate`, `POST /v1/keys/{id}/revoke`, `PUT/DELETE /v1/roles/{name}`, `GET /v1/roles`, `GET/PUT /v1/owners/{owner}`, `GET /v1/audit`, `GET /v1/usage`, `GET /v1/alerts`, `POST /v1/alerts/{id}/ack`, `POST/GET /v1/tokens`, `POST /v1/tokens/{id}/revoke` | admin |
/// | `POST/GET /v1/webhooks`, `GET/DELETE /v1/webhooks/{id}`, `GET /v1/webhooks/{id}/deliveries` | admin |
/// | `GET /healthz`, `GET /openapi.json` | none |
/// | `POST /v1/leaks/github` | GitHub's signature (see [`secret_scanning`](super::KeyServer::secret_scanning)) |
///
/// `GET /openapi.json` answers the OpenAPI 3.1 document of these routes, generated from
/// this code (the repository keeps a copy as `docs/openapi.json`).
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi_json))
        .route("/v1/keys/verify", post(verify))
        .route("/v1/keys/verify-batch", post(verify_batch))
        .route("/v1/keys", post(create_key).get(list_keys))
        .route("/v1/keys/{id}", get(get_key).patch(patch_key))
        .route("/v1/keys/{id}/rotate", post(rotate_key))
        .route("/v1/keys/{id}/revoke", post(revoke_key))
        .route("/v1/roles", get(list_roles))
        .route("/v1/roles/{name}", put(put_role))
        .route("/v1/audit", get(audit))
        .route("/v1/usage", post(ingest_usage).get(read_usage))
        .route("/v1/alerts", get(alerts))
        .route("/v1/events", get(events))
        // Tokens as data (issue 14): handlers in `tokens_api`.
        .route("/v1/tokens", post(super::tokens_api::create_token).get(super::tokens_api::list_tokens))
        .route("/v1/tokens/{id}/revoke", post(super::tokens_api::revoke_token))
        // Operator commands of the CLI: roles delete, alerts ack.
        .route("/v1/roles/{name}", delete(super::manage::delete_role))
        .route("/v1/alerts/{id}/ack", post(super::manage::ack_alert))
        // GitHub secret scanning (signed reports, no token): see `leaks`.
        .route("/v1/leaks/github", post(super::leaks::github_report))
        // Owners' limits and credits (issue 16).
        .route("/v1/owners/{owner}", get(super::owners_api::get_owner).put(super::owners_api::put_owner))
        // Webhooks: endpoints and their delivery log (see the `webhook_api` module).
        .merge(webhook_api::routes())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        // axum sets `Allow` (the route's methods) on what this answers.
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // Metrics: every request by route template and status class (a no-op when off).
        .layer(axum::middleware::from_fn_with_state(state.clone(), super::metrics::track))
        .with_state(state)
}

/// The OpenAPI 3.1 document of [`router`]'s routes, served at `GET /openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "keygate key service",
        version = env!("CARGO_PKG_VERSION"),
        description = "The reference key service of keygate: keys, roles, audit, usage, alerts, tokens and webhooks \
                       for operators (admin token), verify, usage upload and events for middlewares (service \
                       token). Every refusal is `ErrorBody` JSON `{\"error\", \"message\"}`. A path that is not \
                       a route answers 404 `not_found`; a method a route does not take, 405 `method_not_allowed` with `Allow`.",
        license(name = "MIT OR Apache-2.0")
    ),
    paths(
        healthz,
        openapi_json,
        verify,
        verify_batch,
        crate::server::leaks::github_report,
        create_key,
        list_keys,
        get_key,
        patch_key,
        rotate_key,
        revoke_key,
        list_roles,
        put_role,
        crate::server::manage::delete_role,
        audit,
        read_usage,
        ingest_usage,
        alerts,
        crate::server::manage::ack_alert,
        crate::server::owners_api::get_owner,
        crate::server::owners_api::put_owner,
        events,
        crate::server::tokens_api::create_token,
        crate::server::tokens_api::list_tokens,
        crate::server::tokens_api::revoke_token,
        crate::server::webhook_api::create,
        crate::server::webhook_api::list,
        crate::server::webhook_api::show,
        crate::server::webhook_api::delete,
        crate::server::webhook_api::deliveries,
    ),
    components(
        schemas(
            crate::wire::ErrorBody,
            crate::wire::KeyChanged,
            crate::wire::ResetData,
            crate::wire::Heartbeat,
            crate::AggregateBatch,
            crate::UsageBatch,
        ),
        responses(
            crate::server::openapi::BadRequest,
            crate::server::openapi::Unauthorized,
            crate::server::openapi::NotFound,
            crate::server::openapi::Conflict,
            crate::server::openapi::TooLarge,
            crate::server::openapi::Internal,
            crate::server::openapi::Unavailable,
        )
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "health", description = "Liveness and this document; no token."),
        (name = "verify", description = "The middleware's verify call (service token)."),
        (name = "keys", description = "Issue, change, rotate and revoke keys (admin token)."),
        (name = "roles", description = "Named sets of scopes (admin token)."),
        (name = "owners", description = "Limits and credits shared by all of an owner's keys (admin token)."),
        (name = "audit", description = "The append-only audit log (admin token)."),
        (name = "usage", description = "Usage upload (service token) and reports (admin token)."),
        (name = "alerts", description = "Anomaly, expiring-soon and maximum-age alerts (admin token)."),
        (name = "events", description = "Invalidations pushed to middlewares (service token)."),
        (name = "tokens", description = "Service and admin tokens as data (admin token)."),
        (name = "webhooks", description = "Webhook endpoints and their delivery log (admin token)."),
        (name = "leaks", description = "Leaked-key reports from GitHub secret scanning (signed, no token)."),
    )
)]
struct ApiDoc;

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    summary = "This document",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this service; it holds no secrets.", body = serde_json::Value)
    ),
    security(())
)]
async fn openapi_json() -> Response {
    // Rendered once: the document is fixed at build time.
    static DOC: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| super::openapi::render(&ApiDoc::openapi()));
    ([(http::header::CONTENT_TYPE, "application/json")], DOC.as_str()).into_response()
}

/// A JSON body read with a size limit, whose every failure is an [`ApiError`]:
/// 413 over `LIMIT` bytes, 400 with serde's position and reason otherwise.
/// The content type is not checked: the body is JSON or it is refused.
pub struct JsonBody<T, const LIMIT: usize = BODY_LIMIT>(pub T);

impl<S: Send + Sync, T: DeserializeOwned, const LIMIT: usize> FromRequest<S> for JsonBody<T, LIMIT> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        parse_json(&read_body(req, LIMIT).await?).map(JsonBody)
    }
}

/// The body, refused with 413 beyond `limit` bytes (declared or sent).
pub(super) async fn read_body(req: Request, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge(limit));
    }
    axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
        if is_length_limit(&e) {
            ApiError::TooLarge(limit)
        } else {
            ApiError::invalid("invalid_request", "the request body could not be read")
        }
    })
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

pub(super) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid("invalid_json", "the request body is empty; expected a JSON object"));
    }
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::invalid("invalid_request", e.to_string()),
        _ => ApiError::invalid("invalid_json", format!("malformed JSON: {e}")),
    })
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t).map_err(|e| ApiError::invalid("invalid_query", e.body_text()))
}

fn path(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(s)| s).map_err(|e| ApiError::invalid("invalid_request", e.body_text()))
}

fn parse_time(field: &str, s: &str) -> Result<OffsetDateTime, ApiError> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|_| {
        ApiError::invalid("invalid_query", format!("`{field}` must be an RFC 3339 time, got `{}`", shown(s)))
    })
}

/// The answer of `GET /healthz`.
#[derive(Serialize, ToSchema)]
struct Health {
    /// `ok`.
    #[schema(value_type = String)]
    status: &'static str,
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    summary = "Whether the service and its store answer",
    responses(
        (status = 200, description = "The store answered.", body = Health),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(())
)]
async fn healthz(State(state): State<ServerState>) -> Response {
    match state.inner.store.ping().await {
        Ok(()) => Json(Health { status: "ok" }).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "health check failed");
            ApiError::Unavailable.into_response()
        }
    }
}

// ---- verify

#[utoipa::path(
    post,
    path = "/v1/keys/verify",
    tag = "verify",
    summary = "Verify a key (the middleware's call)",
    request_body = VerifyRequest,
    responses(
        (status = 200, description = "The verdict; a refused key is a 200 too.", body = VerifyAnswer),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 413, response = crate::server::openapi::TooLarge),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("service_token" = []))
)]
async fn verify(
    State(state): State<ServerState>,
    _: Service,
    body: Result<JsonBody<VerifyRequest>, ApiError>,
) -> Response {
    // Shed, don't queue: a middleware whose verify waits behind thousands of others times
    // out anyway, and the queue would only hold memory. Its cache serves stale verdicts
    // meanwhile and its circuit breaker backs off.
    let Ok(_slot) = state.inner.verify_slots.try_acquire() else { return shed(&state) };
    state.inner.stats.verify_calls.fetch_add(1, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let verified = |outcome| state.inner.meters.verified(outcome, started.elapsed());
    // A data error could echo the key back in serde's message: keep it generic here.
    let request = match body {
        Ok(JsonBody(request)) => request,
        Err(ApiError::Invalid { .. }) => {
            verified(VerifyOutcome::Error);
            let expected = r#"expected a JSON object {"digest": "<hex SHA-256 of the key>"} or {"key": "<key>"}"#;
            return ApiError::invalid("invalid_request", expected).into_response();
        }
        Err(e) => {
            verified(VerifyOutcome::Error);
            return e.into_response();
        }
    };
    let digest = match &request {
        // Longer keys cannot be ours: not worth a lookup.
        VerifyRequest::Key(key) if key.is_empty() || key.len() > MAX_VERIFY_KEY_LEN => None,
        request => Some(request.digest()),
    };
    let answer = match decide(&state, digest).await {
        Ok(a) => a,
        Err(e) => {
            verified(VerifyOutcome::Error);
            return e.into_response();
        }
    };
    verified(match &answer {
        VerifyAnswer::Valid(_) => VerifyOutcome::Valid,
        VerifyAnswer::Invalid(refusal) => match refusal.code {
            Reason::NotFound => VerifyOutcome::NotFound,
            Reason::Revoked => VerifyOutcome::Revoked,
            Reason::Expired => VerifyOutcome::Expired,
            Reason::Disabled => VerifyOutcome::Disabled,
        },
    });
    let valid = matches!(answer, VerifyAnswer::Valid(_));
    let counter = if valid { &state.inner.stats.verify_valid } else { &state.inner.stats.verify_invalid };
    counter.fetch_add(1, Ordering::Relaxed);
    Json(answer).into_response()
}

/// The answer for the key with this digest (`None`: a key that cannot exist). A refusal
/// carries the key id for every reason but `NOT_FOUND`: it lets the middleware attribute
/// its denials (usage, alerts); only the middleware sees it, never the client.
async fn decide(state: &ServerState, digest: Option<KeyDigest>) -> Result<VerifyAnswer, ApiError> {
    let Some(digest) = digest else { return Ok(answer_for(None)) };
    Ok(answer_for(state.inner.store.find_by_digest(&digest).await?))
}

/// The answer for what a lookup found (`None`: no such key).
fn answer_for(found: Option<Found>) -> VerifyAnswer {
    let Some(found) = found else {
        tracing::debug!("verify: no such key");
        return VerifyAnswer::Invalid(Refusal { code: Reason::NotFound, key_id: None });
    };
    let k = found.key;
    let now = OffsetDateTime::now_utc();
    // A rotated-away secret stops at the end of its grace; the answer carries that
    // time so that no cache keeps it longer.
    let expires_at = match (k.expires_at, found.secret_expires_at) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let reason = if k.revoked {
        Some(Reason::Revoked)
    } else if k.disabled {
        Some(Reason::Disabled)
    } else if expires_at.is_some_and(|e| e <= now) {
        Some(Reason::Expired)
    } else {
        None
    };
    tracing::debug!(key_id = %k.key_id, outcome = reason.map_or("VALID", Reason::code), "verify");
    if let Some(code) = reason {
        return VerifyAnswer::Invalid(Refusal { code, key_id: Some(k.key_id) });
    }
    let scopes: BTreeSet<&String> = k.scopes.iter().chain(found.role_scopes.iter()).collect();
    // Only beside credits: a revision says which setting of them these are.
    let credits_revision = k.credits.as_ref().and(k.credits_revision);
    let owner_credits_revision = found.owner_credits.as_ref().and(found.owner_credits_revision);
    VerifyAnswer::Valid(ValidKey {
        scopes: scopes.into_iter().cloned().collect(),
        key_id: k.key_id,
        owner: k.owner,
        name: k.name,
        roles: k.roles,
        environment: k.environment,
        expires_at,
        meta: k.meta,
        ratelimit: k.ratelimit,
        limits: k.limits,
        credits: k.credits,
        owner_limits: found.owner_limits,
        owner_credits: found.owner_credits,
        credits_revision,
        owner_credits_revision,
        allowed_networks: k.allowed_networks,
        owner_allowed_networks: found.owner_allowed_networks,
    })
}

/// The fast 503 of a verification that found every slot taken. Shed, don't queue: a
/// middleware whose verify waits behind thousands of others times out anyway, and the
/// queue would only hold memory. Its cache serves stale verdicts meanwhile and its
/// circuit breaker backs off.
fn shed(state: &ServerState) -> Response {
    state.inner.stats.verify_shed.fetch_add(1, Ordering::Relaxed);
    tracing::debug!("verify shed: too many verifications in progress");
    let body = crate::wire::ErrorBody {
        error: "overloaded".to_owned(),
        message: "too many verifications in progress; retry shortly".to_owned(),
    };
    let retry = [(http::header::RETRY_AFTER, VERIFY_RETRY_AFTER_S.to_string())];
    (StatusCode::SERVICE_UNAVAILABLE, retry, Json(body)).into_response()
}

#[utoipa::path(
    post,
    path = "/v1/keys/verify-batch",
    tag = "verify",
    summary = "Verify up to 500 keys by digest in one call (the middleware's refresh)",
    request_body = VerifyBatchRequest,
    responses(
        (status = 200, description = "One verdict per digest, in the request's order.", body = VerifyBatchAnswer),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 413, response = crate::server::openapi::TooLarge),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("service_token" = []))
)]
async fn verify_batch(
    State(state): State<ServerState>,
    _: Service,
    body: Result<JsonBody<VerifyBatchRequest>, ApiError>,
) -> Response {
    // One slot for the whole batch: it is one query, and a middleware sends few.
    let Ok(_slot) = state.inner.verify_slots.try_acquire() else { return shed(&state) };
    let request = match body {
        Ok(JsonBody(request)) => request,
        Err(ApiError::Invalid { .. }) => {
            let expected = format!(
                r#"expected a JSON object {{"digests": [...]}} with 1 to {MAX_VERIFY_BATCH} hex SHA-256 digests"#
            );
            return ApiError::invalid("invalid_request", expected).into_response();
        }
        Err(e) => return e.into_response(),
    };
    let stats = &state.inner.stats;
    stats.verify_batches.fetch_add(1, Ordering::Relaxed);
    stats.verify_batch_digests.fetch_add(request.digests.len() as u64, Ordering::Relaxed);
    let found: HashMap<KeyDigest, Found> = match state.inner.store.find_by_digests(&request.digests).await {
        Ok(found) => found.into_iter().collect(),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let answers: Vec<VerifyAnswer> = request.digests.iter().map(|d| answer_for(found.get(d).cloned())).collect();
    let valid = answers.iter().filter(|a| matches!(a, VerifyAnswer::Valid(_))).count() as u64;
    stats.verify_valid.fetch_add(valid, Ordering::Relaxed);
    stats.verify_invalid.fetch_add(answers.len() as u64 - valid, Ordering::Relaxed);
    tracing::debug!(digests = answers.len(), valid, "verify batch");
    Json(VerifyBatchAnswer { answers }).into_response()
}

// ---- keys

/// Create and rotate answers: the raw key, shown once, plus the key's fields.
#[derive(Serialize, ToSchema)]
#[schema(as = CreatedKey)]
struct Created<'a> {
    /// The raw key. Store it now: the key service keeps only its digest.
    #[schema(value_type = String)]
    key: &'a str,
    #[serde(flatten)]
    #[schema(value_type = KeyInfo)]
    info: &'a KeyInfo,
    /// After a rotation: when the previous secret stops working.
    #[serde(skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    previous_expires_at: Option<OffsetDateTime>,
}

/// A new secret with the prefix of the key's environment (the server's key prefix for
/// an environment without one of its own).
fn new_secret(state: &ServerState, environment: &str) -> Result<(ApiKey, NewSecret), ApiError> {
    let prefix = state.inner.env_prefixes.get(environment).unwrap_or(&state.inner.key_prefix);
    let key = ApiKey::generate(prefix).map_err(|e| {
        tracing::error!(error = %e, "cannot generate a key");
        ApiError::Internal
    })?;
    let secret = NewSecret { digest: key.digest(), key_prefix: key.display_prefix() };
    Ok((key, secret))
}

#[utoipa::path(
    post,
    path = "/v1/keys",
    tag = "keys",
    summary = "Create a key",
    request_body = NewKey,
    responses(
        (status = 201, description = "The key, shown this once, and its fields.", body = Created),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 413, response = crate::server::openapi::TooLarge),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
async fn create_key(
    State(state): State<ServerState>,
    admin: Admin,
    JsonBody(req): JsonBody<NewKey>,
) -> Result<Response, ApiError> {
    let now = now_ms();
    validate_text("owner", &req.owner)?;
    validate_text("name", &req.name)?;
    let scopes = validate_scopes("scopes", &req.scopes)?;
    let roles = validate_roles(&req.roles)?;
    let environment = req.environment.unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_owned());
    validate_environment(&environment)?;
    if let Some(at) = req.expires_at {
        validate_expiry(at, now)?;
    }
    let meta = req.meta.unwrap_or_else(|| json!({}));
    validate_meta(&meta)?;
    let limits = merge_ratelimit(req.limits, req.ratelimit.as_ref())?;
    if let Some(credits) = &req.credits {
        validate_credits(credits)?;
    }
    // What the request says is checked first; then what it names must exist.
    refuse_empty(&scopes, &roles, req.allow_empty)?;
    refuse_unknown_roles(&state, &roles).await?;
    let (key, secret) = new_secret(&state, &environment)?;
    let record = NewKeyRecord {
        key_id: new_key_id()?,
        secret,
        owner: req.owner,
        name: req.name,
        scopes,
        roles,
        environment,
        expires_at: req.expires_at.map(truncate_ms),
        meta,
        limits,
        credits: req.credits,
        allowed_networks: validate_networks(&req.allowed_networks)?,
        created_at: now,
    };
    let info = state.inner.store.create_key(&record, admin.actor()).await?;
    tracing::info!(key_id = %info.key_id, owner = %info.owner, "key created");
    let body = Created { key: key.expose_secret(), info: &info, previous_expires_at: None };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only this owner's keys.
    owner: Option<String>,
    /// At most this many (1 to 1 000; default 1 000).
    limit: Option<u32>,
    /// The page after this cursor: the `next` of the answer before.
    after: Option<String>,
    /// Only keys whose owner, name, key id or display prefix holds this text
    /// (case-insensitive for ASCII).
    q: Option<String>,
    /// Only keys of this environment.
    environment: Option<String>,
    /// Only keys in this state: `active`, `disabled`, `revoked` or `expired`; or
    /// `expiring`: active keys that expire within the alerts' `expiring_within` (7 days
    /// by default).
    state: Option<String>,
    /// The order: `created` (the default), `name`, `owner` or `last_used`, ascending, or
    /// descending with `:desc` (`name:desc`); ties go by key id the same way. Page on
    /// with the same `sort`: a cursor belongs to its order.
    sort: Option<String>,
}

/// The answer of `GET /v1/keys`.
#[derive(Serialize, ToSchema)]
struct KeyList {
    /// In the order asked for (`sort`); by default oldest first.
    keys: Vec<KeyInfo>,
    /// More keys follow: ask again with `after` set to this cursor. Absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "keys",
    summary = "List keys",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of at most `limit` keys in the order `sort` (by default oldest first), and the cursor of the next page.", body = KeyList),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
async fn list_keys(
    State(state): State<ServerState>,
    _: Admin,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<KeyList>, ApiError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(MAX_RECORDS).clamp(1, MAX_RECORDS);
    let sort = match q.sort.as_deref() {
        Some(s) => KeySort::parse(s).ok_or_else(|| {
            ApiError::invalid(
                "invalid_request",
                "`sort` must be created, name, owner or last_used, optionally followed by `:asc` or `:desc`",
            )
        })?,
        None => KeySort::default(),
    };
    let after = match q.after.as_deref() {
        Some(c) => Some(
            KeyCursor::parse(c)
                .filter(|c| c.sort() == sort)
                .ok_or_else(|| ApiError::invalid("invalid_request", "`after` is not a cursor of this listing"))?,
        ),
        None => None,
    };
    let key_state = match q.state.as_deref() {
        Some(s) => Some(KeyState::parse(s).ok_or_else(|| {
            ApiError::invalid("invalid_request", "`state` must be one of active, expiring, disabled, revoked, expired")
        })?),
        None => None,
    };
    if let Some(text) = &q.q {
        validate_text("q", text)?;
    }
    let filter = KeyFilter {
        after,
        owner: q.owner,
        search: q.q,
        environment: q.environment,
        state: key_state,
        expiring_within: state.inner.alerts.expiring_within,
        sort,
    };
    // One more than answered: whether another page follows.
    let mut keys = state.inner.store.page_keys(&filter, limit + 1).await?;
    let next = if keys.len() > limit as usize {
        keys.truncate(limit as usize);
        keys.last().map(|k| KeyCursor::after_in(k, sort).to_string())
    } else {
        None
    };
    Ok(Json(KeyList { keys, next }))
}

async fn load(state: &ServerState, id: &str) -> Result<KeyInfo, ApiError> {
    let found = if looks_like_key_id(id) { state.inner.store.get_key(id).await? } else { None };
    found.ok_or_else(|| ApiError::NotFound(format!("no key with id `{}`", shown(id))))
}

#[utoipa::path(
    get,
    path = "/v1/keys/{id}",
    tag = "keys",
    summary = "Show a key",
    params(("id" = String, Path, description = "The key's id (`key_` + 22 base62 characters).")),
    responses(
        (status = 200, description = "The key.", body = KeyInfo),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 404, response = crate::server::openapi::NotFound),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
async fn get_key(
    State(state): State<ServerState>,
    _: Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<KeyInfo>, ApiError> {
    Ok(Json(load(&state, &path(id)?).await?))
}

#[utoipa::path(
    patch,
    path = "/v1/keys/{id}",
    tag = "keys",
    summary = "Change a key",
    params(("id" = String, Path, description = "The key's id (`key_` + 22 base62 characters).")),
    request_body = KeyPatch,
    responses(
        (status = 200, description = "The key as changed.", body = KeyInfo),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 404, response = crate::server::openapi::NotFound),
        (status = 409, response = crate::server::openapi::Conflict),
        (status = 413, response = crate::server::openapi::TooLarge),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
async fn patch_key(
    State(state): State<ServerState>,
    admin: Admin,
    id: Result<Path<String>, PathRejection>,
    JsonBody(mut patch): JsonBody<KeyPatch>,
) -> Result<Json<KeyInfo>, ApiError> {
    let id = path(id)?;
    let now = now_ms();
    if patch.is_empty() {
        return Err(ApiError::invalid(
            "invalid_request",
            "nothing to change: send one or more of name, scopes, roles, disabled, meta, expires_at, ratelimit, \
             limits, credits, allowed_networks",
        ));
    }
    if let Some(networks) = &patch.allowed_networks {
        patch.allowed_networks = Some(validate_networks(networks)?);
    }
    if let Some(name) = &patch.name {
        validate_text("name", name)?;
    }
    if let Some(scopes) = &patch.scopes {
        patch.scopes = Some(validate_scopes("scopes", scopes)?);
    }
    if let Some(roles) = &patch.roles {
        let roles = validate_roles(roles)?;
        refuse_unknown_roles(&state, &roles).await?;
        patch.roles = Some(roles);
    }
    if let Some(meta) = &patch.meta {
        validate_meta(meta)?;
    }
    if let Some(Some(at)) = patch.expires_at {
        validate_expiry(at, now)?;
        patch.expires_at = Some(Some(truncate_ms(at)));
    }
    if let Some(Some(rl)) = &patch.ratelimit {
        validate_ratelimit(rl)?;
    }
    if let Some(limits) = &patch.limits {
        // With `ratelimit` in the same patch, the list may not name `requests`.
        let rl = patch.ratelimit.flatten();
        merge_ratelimit(limits.clone(), rl.as_ref())?;
        if patch.ratelimit == Some(None) && limits.iter().any(|l| &*l.name == crate::quota::REQUESTS) {
            return Err(ApiError::invalid(
                "invalid_limit",
                "`ratelimit: null` removes the limit named `requests`, which `limits` sets",
            ));
        }
    }
    if let Some(Some(credits)) = &patch.credits {
        validate_credits(credits)?;
    }
    let before = load(&state, &id).await?;
    if patch.scopes.is_some() || patch.roles.is_some() {
        let scopes = patch.scopes.as_ref().unwrap_or(&before.scopes);
        let roles = patch.roles.as_ref().unwrap_or(&before.roles);
        refuse_empty(scopes, roles, patch.allow_empty)?;
    }
    let info = state.inner.store.update_key(&id, &patch, admin.actor(), now).await?;
    tracing::info!(key_id = %id, "key updated");
    Ok(Json(info))
}

#[utoipa::path(
    post,
    path = "/v1/keys/{id}/rotate",
    tag = "keys",
    summary = "Give a key a new secret",
    params(("id" = String, Path, description = "The key's id (`key_` + 22 base62 characters).")),
    request_body(content = Option<RotateRequest>, description = "Optional: an empty body means `grace_s` 0."),
    responses(
        (status = 200, description = "The new key, shown this once, its fields, and when the previous secret stops working.", body = Created),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 404, response = crate::server::openapi::NotFound),
        (status = 409, response = crate::server::openapi::Conflict),
        (status = 413, response = crate::server::openapi::TooLarge),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
async fn rotate_key(
    State(state): State<ServerState>,
    admin: Admin,
    id: Result<Path<String>, PathRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let id = path(id)?;
    // An empty body means the defaults (`grace_s` 0).
    let bytes = axum::body::to_bytes(req.into_body(), BODY_LIMIT).await.map_err(|_| ApiError::TooLarge(BODY_LIMIT))?;
    let req: RotateRequest =
        if bytes.iter().all(u8::is_ascii_whitespace) { RotateRequest::default() } else { parse_json(&bytes)? };
    if req.grace_s > MAX_GRACE_S {
        return Err(ApiError::invalid("invalid_grace", format!("`grace_s` must be at most {MAX_GRACE_S} (30 days)")));
    }
    let before = load(&state, &id).await?;
    let now = now_ms();
    let grace_until = now + time::Duration::seconds(req.grace_s as i64);
    let (key, secret) = new_secret(&state, &before.environment)?;
    let info = state.inner.store.rotate_key(&id, &secret, grace_until, admin.actor(), now).await?;
    tracing::info!(key_id = %id, grace_s = req.grace_s, "key rotated");
    let body = Created { key: key.expose_secret(), info: &info, previous_expires_at: Some(grace_until) };
    Ok(Json(body).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/keys/{id}/revoke",
    tag = "keys",
    summary = "Revoke a key (idempotent)",
    params(("id" = String, Path, description = "The key's id (`key_` + 22 base62 characters).")),
    responses(
        (status = 200, description = "The key, revoked, and whether it had been before.", body = Revoked),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 404, response = crate::server::openapi::NotFound),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
/// Revocation is idempotent: revoking a revoked key answers 200 with the key as it
/// is and `"already_revoked": true`, and writes no audit record.
async fn revoke_key(
    State(state): State<ServerState>,
    admin: Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Revoked>, ApiError> {
    let id = path(id)?;
    let before = load(&state, &id).await?;
    if before.revoked {
        return Ok(Json(Revoked { info: before, already_revoked: true }));
    }
    let info = match state.inner.store.revoke_key(&id, admin.actor(), now_ms()).await {
        Ok(info) => Revoked { info, already_revoked: false },
        // Revoked in between, by another request: the same outcome.
        Err(super::store::StoreError::Conflict(_)) => Revoked { info: load(&state, &id).await?, already_revoked: true },
        Err(e) => return Err(e.into()),
    };
    if !info.already_revoked {
        tracing::info!(key_id = %id, "key revoked");
    }
    Ok(Json(info))
}

/// The revoke answer: the key, and whether it had been revoked before.
#[derive(Serialize, ToSchema)]
#[schema(as = RevokedKey)]
struct Revoked {
    #[serde(flatten)]
    info: KeyInfo,
    /// The key had been revoked before: nothing changed.
    already_revoked: bool,
}

// ---- roles

#[utoipa::path(
    put,
    path = "/v1/roles/{name}",
    tag = "roles",
    summary = "Define or redefine a role",
    params(("name" = String, Path, description = "The role's name.")),
    request_body = RoleRequest,
    responses(
        (status = 200, description = "The role, and how many keys hold it.", body = RolePut),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 413, response = crate::server::openapi::TooLarge),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
async fn put_role(
    State(state): State<ServerState>,
    admin: Admin,
    name: Result<Path<String>, PathRejection>,
    JsonBody(req): JsonBody<RoleRequest>,
) -> Result<Json<RolePut>, ApiError> {
    let name = path(name)?;
    validate_role_name(&name).map_err(|m| ApiError::invalid("invalid_role", m))?;
    let scopes = validate_scopes("scopes", &req.scopes)?;
    let (role, affected) = state.inner.store.put_role(&name, &scopes, admin.actor(), now_ms()).await?;
    tracing::info!(role = %name, keys = affected, "role put");
    Ok(Json(RolePut {
        name: role.name,
        scopes: role.scopes,
        updated_at: rfc3339(role.updated_at),
        keys_affected: affected,
    }))
}

/// The answer of `PUT /v1/roles/{name}`.
#[derive(Serialize, ToSchema)]
struct RolePut {
    name: String,
    scopes: Vec<String>,
    #[schema(format = DateTime)]
    updated_at: Option<String>,
    /// Keys holding the role, told to forget what they cached (`updated` events).
    keys_affected: usize,
}

/// The answer of `GET /v1/roles`.
#[derive(Serialize, ToSchema)]
struct RoleList {
    roles: Vec<RoleInfo>,
}

#[utoipa::path(
    get,
    path = "/v1/roles",
    tag = "roles",
    summary = "List roles",
    responses(
        (status = 200, description = "Every role.", body = RoleList),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
async fn list_roles(State(state): State<ServerState>, _: Admin) -> Result<Json<RoleList>, ApiError> {
    Ok(Json(RoleList { roles: state.inner.store.list_roles().await? }))
}

// ---- audit, usage, alerts

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SinceQuery {
    /// Only what happened at or after this RFC 3339 time.
    #[param(format = DateTime)]
    since: Option<String>,
}

/// The answer of `GET /v1/audit`.
#[derive(Serialize, ToSchema)]
struct AuditList {
    records: Vec<AuditRecord>,
}

/// The answer of `GET /v1/alerts`.
#[derive(Serialize, ToSchema)]
struct AlertList {
    alerts: Vec<Alert>,
}

#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "audit",
    summary = "Read the audit log",
    params(SinceQuery),
    responses(
        (status = 200, description = "At most 1 000 records, oldest first.", body = AuditList),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
async fn audit(
    State(state): State<ServerState>,
    _: Admin,
    q: Result<Query<SinceQuery>, QueryRejection>,
) -> Result<Json<AuditList>, ApiError> {
    let since = query(q)?.since.map(|s| parse_time("since", &s)).transpose()?;
    Ok(Json(AuditList { records: state.inner.store.audit(since, MAX_RECORDS).await? }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AlertsQuery {
    /// Only alerts raised at or after this RFC 3339 time.
    #[param(format = DateTime)]
    since: Option<String>,
    /// Absent: every alert; `false`: the open ones; `true`: the acknowledged ones.
    acknowledged: Option<bool>,
}

#[utoipa::path(
    get,
    path = "/v1/alerts",
    tag = "alerts",
    summary = "List alerts",
    params(AlertsQuery),
    responses(
        (status = 200, description = "At most 1 000 alerts.", body = AlertList),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
async fn alerts(
    State(state): State<ServerState>,
    _: Admin,
    q: Result<Query<AlertsQuery>, QueryRejection>,
) -> Result<Json<AlertList>, ApiError> {
    let q = query(q)?;
    let since = q.since.map(|s| parse_time("since", &s)).transpose()?;
    let store = &state.inner.store;
    let alerts = match q.acknowledged {
        None => store.alerts(since, MAX_RECORDS).await?,
        Some(acknowledged) => store.alerts_by_state(since, acknowledged, MAX_RECORDS).await?,
    };
    Ok(Json(AlertList { alerts }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    /// One key's usage (give exactly one of `key_id` and `owner`).
    key_id: Option<String>,
    /// The sum over an owner's keys.
    owner: Option<String>,
    /// From this RFC 3339 time (default: 24 hours before `until`).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Until this RFC 3339 time, exclusive (default: now).
    #[param(format = DateTime)]
    until: Option<String>,
    /// Grouping (default `minute`).
    group_by: Option<UsageGroupBy>,
}

/// The body of `POST /v1/usage`: one of two batch forms.
enum UsageUpload {}

impl PartialSchema for UsageUpload {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(Ref::from_schema_name("AggregateBatch"))
            .item(Ref::from_schema_name("UsageBatch"))
            .description(Some("An aggregate batch (told apart by its `batch_id`) or a raw batch of events."))
            .into()
    }
}

impl ToSchema for UsageUpload {}

#[utoipa::path(
    get,
    path = "/v1/usage",
    tag = "usage",
    summary = "Read a key's or an owner's usage",
    params(UsageParams),
    responses(
        (status = 200, description = "The buckets with traffic.", body = UsageReport),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
async fn read_usage(
    State(state): State<ServerState>,
    _: Admin,
    q: Result<Query<UsageParams>, QueryRejection>,
) -> Result<Json<UsageReport>, ApiError> {
    let q = query(q)?;
    let whose = match (q.key_id, q.owner) {
        (Some(key_id), None) => Whose::Key(key_id),
        (None, Some(owner)) => Whose::Owner(owner),
        _ => return Err(ApiError::invalid("invalid_query", "give exactly one of `key_id` or `owner`")),
    };
    let since = q.since.map(|s| parse_time("since", &s)).transpose()?;
    let until = q.until.map(|s| parse_time("until", &s)).transpose()?;
    let report = usage_report(&state.inner.store, whose, since, until, q.group_by.unwrap_or_default()).await?;
    Ok(Json(report))
}

#[utoipa::path(
    post,
    path = "/v1/usage",
    tag = "usage",
    summary = "Upload usage (the middleware's call)",
    request_body(content = UsageUpload, description = "An aggregate batch (it has a `batch_id`; at most 16 MiB) or a raw batch of events (at most 4 MiB)."),
    responses(
        (status = 202, description = "Stored, or recognised as applied before (`duplicate`).", body = UsageAccepted),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 409, response = crate::server::openapi::Conflict),
        (status = 413, response = crate::server::openapi::TooLarge),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("service_token" = []))
)]
/// `POST /v1/usage`: an aggregate batch (it has a `batch_id`, up to 16 MiB) or a raw
/// batch of events (up to 4 MiB).
async fn ingest_usage(State(state): State<ServerState>, _: Service, req: Request) -> Result<Response, ApiError> {
    let bytes = read_body(req, AGGREGATE_BODY_LIMIT).await?;
    let now = OffsetDateTime::now_utc();
    let stats = &state.inner.stats;
    let (batch_id, rows, networks, reported) = match usage::form_of(&bytes)? {
        BatchForm::Aggregate => {
            let batch: AggregateBatch = parse_json(&bytes)?;
            usage::check_aggregate(&batch)?;
            let reported = [batch.dropped, batch.overflowed, batch.networks_dropped];
            (Some(batch.batch_id), batch.rows, batch.networks, reported)
        }
        BatchForm::Raw => {
            if bytes.len() > USAGE_BODY_LIMIT {
                return Err(ApiError::TooLarge(USAGE_BODY_LIMIT));
            }
            let batch: UsageBatch = parse_json(&bytes)?;
            if batch.events.len() > MAX_USAGE_EVENTS {
                return Err(ApiError::invalid(
                    "too_many_events",
                    format!("a batch holds at most {MAX_USAGE_EVENTS} events, got {}", batch.events.len()),
                ));
            }
            let (rows, networks) = usage::rows_of_events(&batch.events)?;
            Stats::add(&stats.usage_events, batch.events.len() as u64);
            (None, rows, networks, [batch.dropped, 0, 0])
        }
    };
    drop(bytes);
    let known = state.inner.store.known_keys(&usage::key_ids(&rows, &networks)).await?;
    let folded = usage::fold(&rows, &networks, &known, now);
    let accepted = folded.delta.requests();
    let mark = batch_id.as_deref().map(|batch_id| BatchMark { batch_id, applied_at: to_ms(now), accepted });
    if let Applied::Before { accepted } = state.inner.store.record_usage(mark, &folded.delta).await? {
        tracing::debug!(batch_id = batch_id.as_deref().unwrap_or_default(), "usage batch applied before; ignored");
        Stats::add(&stats.usage_duplicates, 1);
        let answer = UsageAccepted { accepted, duplicate: true, refused: 0, unknown: 0, unattributed: 0 };
        return Ok((StatusCode::ACCEPTED, Json(answer)).into_response());
    }
    let [dropped, overflowed, networks_dropped] = reported;
    if dropped > 0 {
        tracing::warn!(dropped, "a middleware reports usage it could not deliver");
    }
    if folded.refused > 0 {
        tracing::warn!(
            rows = folded.refused_rows,
            requests = folded.refused,
            "usage rows outside the accepted time window refused (a middleware's clock is off?)"
        );
    }
    if folded.unknown > 0 {
        tracing::debug!(requests = folded.unknown, "usage of key ids that are not this service's keys");
    }
    Stats::add(&stats.usage_batches, 1);
    if batch_id.is_some() {
        Stats::add(&stats.usage_rows, rows.len() as u64);
    }
    Stats::add(&stats.usage_requests, accepted);
    Stats::add(&stats.usage_rows_refused, folded.refused_rows);
    Stats::add(&stats.usage_requests_refused, folded.refused);
    Stats::add(&stats.usage_unknown, folded.unknown);
    Stats::add(&stats.usage_unattributed, folded.unattributed);
    Stats::add(&stats.usage_dropped_reported, dropped);
    Stats::add(&stats.usage_overflowed_reported, overflowed);
    Stats::add(&stats.usage_networks_dropped_reported, networks_dropped);
    let answer = UsageAccepted {
        accepted,
        duplicate: false,
        refused: folded.refused,
        unknown: folded.unknown,
        unattributed: folded.unattributed,
    };
    // The batch is stored: an alert evaluation failure must not make the middleware resend
    // it. The evaluation runs as a task of its own, so a middleware that gives up waiting
    // (and then resends, which is answered as a duplicate) cannot cut it short; the answer
    // still waits for it, so alerts are visible once the batch is acknowledged.
    let inner = Arc::clone(&state.inner);
    let evaluation = tokio::spawn(async move {
        if let Err(e) = inner.alerts.evaluate(&inner.store, &folded, &inner.stats.alerts_raised).await {
            tracing::error!(error = %e, "alert evaluation failed");
        }
    });
    let _ = evaluation.await;
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

// ---- events

#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    summary = "Stream invalidations and alerts (the middleware's call)",
    params(
        ("Last-Event-ID" = Option<String>, Header, description = "The last event id seen (or the `keygate-events-position` of the previous stream): the stream replays the key changes made after it from the change log, then goes live. An id older than the log's retention, from the future or unreadable starts the stream with `reset`.")
    ),
    responses(
        (status = 200, description = "Server-Sent Events, opened with the comment `: keygate events v1`. Events: `revoked`, `updated`, `rotated` (data `KeyChanged`, with an `id:`), `reset` (`ResetData`), `alert` (`Alert`), `heartbeat` (`Heartbeat`). The stream ends when its token is revoked.", content_type = "text/event-stream", body = String,
            headers(
                ("keygate-events-position" = u64, description = "The change-log id this stream starts after."),
                ("keygate-events-resumed" = Option<u64>, description = "Present when the stream resumed after `Last-Event-ID`: that id.")
            )),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("service_token" = []))
)]
/// Past the subscriber cap, 503 `too_many_subscribers` with `Retry-After`: each stream
/// holds memory and a file descriptor for as long as it stays open. With
/// `Last-Event-ID`, the stream replays what was missed from the change log first (see
/// [`EventHub`](super::EventHub)).
async fn events(State(state): State<ServerState>, service: Service, headers: http::HeaderMap) -> Response {
    // Heartbeats are events of their own (see the `events` module): no keep-alive comments.
    // The stream ends when its token is revoked.
    let Some(subscription) = state.inner.hub.try_subscribe_until(Some(service.revoked())) else {
        let max = state.inner.hub.max_subscribers();
        tracing::warn!(max, "event stream refused: subscriber cap reached");
        let body = crate::wire::ErrorBody {
            error: "too_many_subscribers".to_owned(),
            message: format!("this key service already serves {max} event streams; retry later"),
        };
        let retry = [(http::header::RETRY_AFTER, EVENTS_RETRY_AFTER_S.to_string())];
        return (StatusCode::SERVICE_UNAVAILABLE, retry, Json(body)).into_response();
    };
    // Subscribed first, the log read second: a change committing in between is both
    // replayed and received live, and the live copy is skipped.
    let start = match headers.get(crate::wire::LAST_EVENT_ID_HEADER) {
        None => Start::Fresh,
        Some(value) => match value.to_str() {
            Err(_) => Start::Refuse("bad_id"),
            // An empty Last-Event-ID is what an SSE client sends when it has seen no id.
            Ok(text) if text.trim().is_empty() => Start::Fresh,
            Ok(text) => match state.inner.store.change_log_bounds().await {
                Ok(b) => start_from(text.trim(), b.oldest, b.newest.max(subscription.position())),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the change log bounds; the stream starts with reset");
                    Start::Refuse("unavailable")
                }
            },
        },
    };
    let position = match start {
        Start::Resume(id) => id,
        Start::Fresh | Start::Refuse(_) => subscription.position(),
    };
    match start {
        Start::Resume(id) => tracing::debug!(after = id, "event stream resumed"),
        Start::Refuse(reason) => tracing::info!(reason, "event stream cannot resume; it starts with reset"),
        Start::Fresh => {}
    }
    let store = state.inner.store.clone();
    let fetch: FetchChanges = Arc::new(move |after| {
        let store = store.clone();
        Box::pin(async move { store.changes_after(after).await.map_err(|e| e.to_string()) })
    });
    let mut response = Sse::new(subscription.start(start, Some(fetch))).into_response();
    let h = response.headers_mut();
    h.insert(crate::wire::EVENTS_POSITION_HEADER, http::HeaderValue::from(position));
    if let Start::Resume(id) = start {
        h.insert(crate::wire::EVENTS_RESUMED_HEADER, http::HeaderValue::from(id));
    }
    response
}

/// The `Retry-After` of a refused event stream, in seconds.
const EVENTS_RETRY_AFTER_S: u64 = 5;

/// The `Retry-After` of a shed verification, in seconds.
const VERIFY_RETRY_AFTER_S: u64 = 1;

/// Default most verifications answered at once by one key service: 256.
pub const DEFAULT_MAX_CONCURRENT_VERIFIES: usize = 256;

// ---- helpers

/// 400 `unknown_role` naming the first role that is not defined.
async fn refuse_unknown_roles(state: &ServerState, roles: &[String]) -> Result<(), ApiError> {
    let missing = state.inner.store.missing_roles(roles).await?;
    match missing.first() {
        None => Ok(()),
        Some(role) => Err(ApiError::invalid(
            "unknown_role",
            format!(
                "role `{}` does not exist; define it first (PUT /v1/roles/{}, `keygate-server roles put {}`)",
                shown(role),
                shown(role),
                shown(role)
            ),
        )),
    }
}

/// 400 `empty_key` for a key that would hold neither scopes nor roles, unless allowed.
fn refuse_empty(scopes: &[String], roles: &[String], allowed: bool) -> Result<(), ApiError> {
    if scopes.is_empty() && roles.is_empty() && !allowed {
        return Err(ApiError::invalid(
            "empty_key",
            "the key would have neither scopes nor roles; give some, or set `allow_empty: true` \
             (`--allow-empty`) for a key that only authenticates",
        ));
    }
    Ok(())
}

fn truncate_ms(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(t.nanosecond() / 1_000_000 * 1_000_000).unwrap_or(t)
}

/// `key_` + 22 base62 characters (131 bits) from the operating system's CSPRNG.
fn new_key_id() -> Result<String, ApiError> {
    let mut id = String::from("key_");
    crate::key::push_random_base62(&mut id, 22).map_err(|_| ApiError::Internal)?;
    Ok(id)
}
