//! `/v1/webhooks`: the admin routes of webhook endpoints and their delivery log.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::error::ApiError;
use super::model::AlertKind;
use super::state::ServerState;
use super::store::{NewEndpoint, WebhookEndpoint, now_ms};
use super::text::shown;
use super::validate::validate_text;
use super::webhooks::internal_host;
use crate::client::DeliveryPage;

/// Longest webhook URL accepted.
pub const MAX_WEBHOOK_URL_LEN: usize = 2048;
/// Most event types one endpoint subscribes to.
const MAX_WEBHOOK_EVENTS: usize = 32;
/// Most deliveries one `GET /v1/webhooks/{id}/deliveries` answer holds.
pub const MAX_DELIVERIES_PAGE: u32 = 500;
/// The key lifecycle event types.
const KEY_EVENTS: [&str; 8] = [
    "key.created",
    "key.updated",
    "key.rotated",
    "key.revoked",
    "key.disabled",
    "key.enabled",
    "key.expiring",
    "key.expired",
];
const ALERT_KINDS: [AlertKind; 5] =
    [AlertKind::DenialSpike, AlertKind::RateSpike, AlertKind::NewNetwork, AlertKind::KeyMaxAge, AlertKind::Leaked];

/// Every webhook event type: the key lifecycle events and `alert.<kind>`.
pub(crate) fn event_types() -> Vec<String> {
    KEY_EVENTS
        .iter()
        .map(|s| (*s).to_owned())
        .chain(ALERT_KINDS.iter().map(|k| format!("alert.{}", k.as_str())))
        .collect()
}

/// `POST /v1/webhooks`: an endpoint to add. Unknown fields are rejected.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewWebhook {
    /// Where deliveries are posted: `http` or `https`, no credentials, no fragment.
    url: String,
    /// Event types (`key.revoked`) or prefixes (`alert.*`); empty or `*`: every type.
    #[serde(default)]
    events: Vec<String>,
    /// Free text.
    #[serde(default)]
    description: Option<String>,
}

/// The answer to `POST /v1/webhooks`: the endpoint and its secret, shown this once.
#[derive(Serialize, ToSchema)]
struct CreatedWebhook<'a> {
    #[serde(flatten)]
    #[schema(value_type = WebhookEndpoint)]
    endpoint: &'a WebhookEndpoint,
    /// The signing secret (`whsec_...`). Store it now: it is not shown again.
    #[schema(value_type = String)]
    secret: &'a str,
}

/// The answer of `GET /v1/webhooks`.
#[derive(Serialize, ToSchema)]
pub(crate) struct WebhookList {
    webhooks: Vec<WebhookEndpoint>,
}

fn validate_url(url: &str, allow_internal: bool) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::invalid("invalid_url", format!("`url` {why}"));
    if url.len() > MAX_WEBHOOK_URL_LEN {
        return Err(bad(&format!("is longer than {MAX_WEBHOOK_URL_LEN} bytes")));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("must be http:// or https://"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("must not carry credentials (user:password@)"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if parsed.fragment().is_some() {
        return Err(bad("must not have a fragment (#...)"));
    }
    if let Some(kind) = internal_host(&parsed).filter(|_| !allow_internal) {
        return Err(bad(&format!(
            "points at an internal address ({kind}): webhooks do not reach loopback, private, link-local or \
             unspecified addresses unless the server allows them (`keygate-server serve --webhook-allow-internal`)"
        )));
    }
    Ok(())
}

fn validate_events(events: &[String]) -> Result<Vec<String>, ApiError> {
    if events.len() > MAX_WEBHOOK_EVENTS {
        return Err(ApiError::invalid("invalid_events", format!("at most {MAX_WEBHOOK_EVENTS} event types")));
    }
    let known = event_types();
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let matches_some = match e.strip_suffix('*') {
            Some(prefix) => (prefix.is_empty() || prefix.ends_with('.')) && known.iter().any(|k| k.starts_with(prefix)),
            None => known.contains(e),
        };
        if !matches_some {
            return Err(ApiError::invalid(
                "invalid_events",
                format!(
                    "unknown event type `{}`; known: {}, or a prefix such as `alert.*`",
                    shown(e),
                    known.join(", ")
                ),
            ));
        }
        out.push(e.clone());
    }
    out.sort();
    out.dedup();
    // `*` alone is every type, which an empty list already says.
    if out.iter().any(|e| e == "*") {
        out.clear();
    }
    Ok(out)
}

fn random_id(prefix: &str, len: usize) -> Result<String, ApiError> {
    let mut id = String::from(prefix);
    crate::key::push_random_base62(&mut id, len).map_err(|_| ApiError::Internal)?;
    Ok(id)
}

/// `/v1/webhooks`, `/v1/webhooks/{id}`, `/v1/webhooks/{id}/deliveries`.
pub(crate) fn routes() -> Router<ServerState> {
    Router::new()
        .route("/v1/webhooks", post(create).get(list))
        .route("/v1/webhooks/{id}", get(show).delete(delete))
        .route("/v1/webhooks/{id}/deliveries", get(deliveries))
}

/// Largest `POST /v1/webhooks` body.
const CREATE_BODY_LIMIT: usize = 16 * 1024;

#[utoipa::path(
    post,
    path = "/v1/webhooks",
    tag = "webhooks",
    operation_id = "create_webhook",
    summary = "Add a webhook endpoint",
    request_body = NewWebhook,
    responses(
        (status = 201, description = "The endpoint and its signing secret, shown this once.", body = CreatedWebhook),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 409, response = crate::server::openapi::Conflict),
        (status = 413, response = crate::server::openapi::TooLarge),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn create(State(state): State<ServerState>, admin: Admin, req: Request) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(req.into_body(), CREATE_BODY_LIMIT)
        .await
        .map_err(|_| ApiError::TooLarge(CREATE_BODY_LIMIT))?;
    let req: NewWebhook = serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::invalid("invalid_request", e.to_string()),
        _ => ApiError::invalid("invalid_json", format!("malformed JSON: {e}")),
    })?;
    validate_url(&req.url, state.inner.allow_internal_webhooks)?;
    let events = validate_events(&req.events)?;
    let description = req.description.unwrap_or_default();
    if !description.is_empty() {
        validate_text("description", &description)?;
    }
    let endpoint = NewEndpoint {
        id: random_id("wh_", 22)?,
        url: req.url,
        events,
        description,
        secret: random_id("whsec_", 32)?,
        created_at: now_ms(),
    };
    let created = state.inner.store.create_webhook(&endpoint, admin.actor()).await?;
    tracing::info!(webhook = %created.id, url = %super::text::url_without_query(&created.url), "webhook endpoint added");
    Ok((StatusCode::CREATED, Json(CreatedWebhook { endpoint: &created, secret: &endpoint.secret })).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/webhooks",
    tag = "webhooks",
    operation_id = "list_webhooks",
    summary = "List webhook endpoints",
    responses(
        (status = 200, description = "Every endpoint, never a secret.", body = WebhookList),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn list(State(state): State<ServerState>, _: Admin) -> Result<Json<WebhookList>, ApiError> {
    Ok(Json(WebhookList { webhooks: state.inner.store.webhooks().await? }))
}

fn endpoint_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let id = p.map(|Path(s)| s).map_err(|e| ApiError::invalid("invalid_request", e.body_text()))?;
    let plausible = id.len() == 25 && id.starts_with("wh_") && id[3..].bytes().all(|b| b.is_ascii_alphanumeric());
    if plausible { Ok(id) } else { Err(ApiError::NotFound(format!("no webhook with id `{}`", shown(&id)))) }
}

#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    operation_id = "show_webhook",
    summary = "Show a webhook endpoint",
    params(("id" = String, Path, description = "The endpoint's id (`wh_` + 22 base62 characters).")),
    responses(
        (status = 200, description = "The endpoint.", body = WebhookEndpoint),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 404, response = crate::server::openapi::NotFound),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn show(
    State(state): State<ServerState>,
    _: Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<WebhookEndpoint>, ApiError> {
    let id = endpoint_id(id)?;
    let found = state.inner.store.webhook(&id).await?;
    found.map(Json).ok_or_else(|| ApiError::NotFound(format!("no webhook with id `{id}`")))
}

#[utoipa::path(
    delete,
    path = "/v1/webhooks/{id}",
    tag = "webhooks",
    operation_id = "delete_webhook",
    summary = "Remove a webhook endpoint",
    params(("id" = String, Path, description = "The endpoint's id (`wh_` + 22 base62 characters).")),
    responses(
        (status = 200, description = "The endpoint as it was; its pending deliveries are dropped.", body = WebhookEndpoint),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 404, response = crate::server::openapi::NotFound),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn delete(
    State(state): State<ServerState>,
    admin: Admin,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<WebhookEndpoint>, ApiError> {
    let id = endpoint_id(id)?;
    let removed = state.inner.store.delete_webhook(&id, admin.actor(), now_ms()).await?;
    tracing::info!(webhook = %id, "webhook endpoint removed");
    Ok(Json(removed))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    /// At most this many (1 to 500; default 100).
    limit: Option<u32>,
    /// Only deliveries with a smaller id: the previous page's `next_before`.
    before: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/v1/webhooks/{id}/deliveries",
    tag = "webhooks",
    operation_id = "webhook_deliveries",
    summary = "Read an endpoint's delivery log",
    params(("id" = String, Path, description = "The endpoint's id (`wh_` + 22 base62 characters)."), PageQuery),
    responses(
        (status = 200, description = "A page of deliveries, newest first.", body = DeliveryPage),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 404, response = crate::server::openapi::NotFound),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(("admin_token" = []))
)]
pub(crate) async fn deliveries(
    State(state): State<ServerState>,
    _: Admin,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<DeliveryPage>, ApiError> {
    let id = endpoint_id(id)?;
    let q = q.map(|Query(q)| q).map_err(|e| ApiError::invalid("invalid_query", e.body_text()))?;
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_DELIVERIES_PAGE);
    let store = &state.inner.store;
    let endpoint = store.webhook(&id).await?.ok_or_else(|| ApiError::NotFound(format!("no webhook with id `{id}`")))?;
    let page = store.webhook_deliveries(&id, q.before, limit).await?;
    let next_before = if page.len() == limit as usize { page.last().map(|d| d.id) } else { None };
    Ok(Json(DeliveryPage {
        webhook_id: id,
        dropped: endpoint.dropped,
        pending: endpoint.pending,
        deliveries: page,
        next_before,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_without_credentials() {
        assert!(validate_url("https://hooks.example.com/keygate?x=1", false).is_ok());
        assert!(validate_url("http://127.0.0.1:9000/", true).is_ok());
        assert!(validate_url("http://127.0.0.1:9000/", false).is_err());
        for bad in [
            "ftp://example.com/",
            "https://user:pw@example.com/",
            "https://u@example.com/",
            "not a url",
            "https://example.com/#frag",
        ] {
            assert!(validate_url(bad, true).is_err(), "{bad}");
        }
        assert!(validate_url(&format!("https://example.com/{}", "a".repeat(MAX_WEBHOOK_URL_LEN)), true).is_err());
    }

    #[test]
    fn event_types_are_known_or_prefixes_of_known_ones() {
        assert_eq!(validate_events(&["key.revoked".into(), "alert.*".into()]).unwrap(), ["alert.*", "key.revoked"]);
        assert!(validate_events(&["*".into()]).unwrap().is_empty());
        assert!(validate_events(&["key.exploded".into()]).is_err());
        assert!(validate_events(&["ke*".into()]).is_err());
        assert!(validate_events(&["nothing.*".into()]).is_err());
    }
}
