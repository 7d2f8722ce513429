//! Leaked keys reported by GitHub's secret scanning partner program:
//! `POST /v1/leaks/github`.
//!
//! GitHub finds strings matching the pattern an issuer registered in public pushes, and
//! posts them, signed, within seconds. The key service checks the signature, looks each
//! token up by digest, and revokes (or disables) the keys it finds, as an admin would:
//! an audit record (actor [`LEAK_ACTOR`], the reported URL), a `revoked` or `updated`
//! event to every middleware, a `leaked` alert and its `alert.leaked` webhook. Then it
//! answers GitHub which tokens were real. Off unless [`SecretScanning`] is configured.

mod github_keys;

use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

pub use github_keys::GITHUB_KEYS_URL;
pub(crate) use github_keys::GithubKeys;
use github_keys::SignatureError;

use super::api::{parse_json, read_body};
use super::error::ApiError;
use super::model::{Alert, AlertKind};
use super::state::ServerState;
use super::store::{StoreError, now_ms};
use crate::key::ApiKey;

/// The audit actor of changes made on a leak report.
pub const LEAK_ACTOR: &str = "github-secret-scanning";
/// Largest report body: 1 MiB.
pub const REPORT_BODY_LIMIT: usize = 1024 * 1024;
/// Most tokens in one report: 1 000.
pub const MAX_REPORTED_TOKENS: usize = 1_000;
/// Longest reported token looked up; longer ones cannot be keys (1 024 bytes, as
/// verify).
const MAX_TOKEN_LEN: usize = 1024;
/// Longest reported URL kept in the audit record and alert (longer ones are cut).
const MAX_URL_LEN: usize = 2048;

/// What happens to a key reported leaked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeakAction {
    /// Revoked, for good (the default): a leaked secret is compromised whoever pushed it.
    #[default]
    Revoke,
    /// Disabled: refused until an operator enables it again (after rotating it).
    Disable,
}

/// GitHub secret scanning: where its public keys are, and what a report does. Off
/// unless set with [`KeyServer::secret_scanning`](super::KeyServer::secret_scanning).
///
/// ```
/// use keygate::server::{KeyServer, LeakAction, SecretScanning};
///
/// let server = KeyServer::builder().secret_scanning(SecretScanning::github().action(LeakAction::Disable));
/// ```
#[derive(Debug, Clone)]
pub struct SecretScanning {
    pub(crate) keys_url: String,
    pub(crate) refetch_every: Duration,
    pub(crate) action: LeakAction,
}

/// Default shortest time between two fetches of the keys document: 1 min.
pub const DEFAULT_KEYS_REFETCH: Duration = Duration::from_secs(60);

impl SecretScanning {
    /// GitHub's program: keys from [`GITHUB_KEYS_URL`], keys reported are revoked.
    pub fn github() -> Self {
        Self { keys_url: GITHUB_KEYS_URL.to_owned(), refetch_every: DEFAULT_KEYS_REFETCH, action: LeakAction::Revoke }
    }

    /// The shortest time between two fetches of the keys document (default
    /// [`DEFAULT_KEYS_REFETCH`], 1 min): a report naming an unknown identifier refetches
    /// it only this long after the last fetch, so forged identifiers cannot make the key
    /// service hammer the document's host.
    pub fn refetch_interval(mut self, every: Duration) -> Self {
        self.refetch_every = every;
        self
    }

    /// Where the public keys document is fetched from (default [`GITHUB_KEYS_URL`]).
    /// It is fetched on the first report, and again, at most once per
    /// [`refetch_interval`](Self::refetch_interval), when a report names a key
    /// identifier not in it.
    pub fn keys_url(mut self, url: impl Into<String>) -> Self {
        self.keys_url = url.into();
        self
    }

    /// What a report does to the keys it names (default [`LeakAction::Revoke`]).
    pub fn action(mut self, action: LeakAction) -> Self {
        self.action = action;
        self
    }
}

/// The running configuration.
pub(crate) struct Leaks {
    pub(crate) keys: GithubKeys,
    pub(crate) action: LeakAction,
}

impl Leaks {
    pub(crate) fn new(config: SecretScanning) -> Result<Self, String> {
        let keys = GithubKeys::new(config.keys_url, config.refetch_every)
            .map_err(|e| format!("secret scanning HTTP client: {e}"))?;
        Ok(Self { keys, action: config.action })
    }
}

/// One token GitHub found.
#[derive(Deserialize, ToSchema)]
pub(crate) struct Reported {
    /// The string that matched the registered pattern.
    token: String,
    /// The pattern's type name, as registered.
    #[serde(rename = "type")]
    token_type: String,
    /// Where it was found.
    #[serde(default)]
    url: String,
    /// What kind of place (`content`, `commit`, `issue_comment`, ...).
    #[serde(default)]
    source: String,
}

/// GitHub's verdict format, one per reported token.
#[derive(Serialize, ToSchema)]
pub(crate) struct Label {
    /// The token as reported.
    token_raw: String,
    /// The type as reported.
    token_type: String,
    /// `true_positive`: a key of this service (now revoked or disabled);
    /// `false_positive`: no such key.
    label: &'static str,
}

#[utoipa::path(
    post,
    path = "/v1/leaks/github",
    tag = "leaks",
    summary = "Report leaked keys (GitHub secret scanning)",
    description = "GitHub's secret scanning partner protocol. The raw body must be signed: \
                   `Github-Public-Key-Identifier` names a key of the public keys document, \
                   `Github-Public-Key-Signature` is the base64 DER ECDSA P-256 / SHA-256 signature \
                   of the body. Each token that is a key of this service is revoked (or disabled), \
                   once; reporting it again changes nothing. 404 when secret scanning is not enabled.",
    request_body = Vec<Reported>,
    params(
        ("Github-Public-Key-Identifier" = String, Header, description = "The signing key's identifier."),
        ("Github-Public-Key-Signature" = String, Header, description = "Base64 DER ECDSA signature of the body.")
    ),
    responses(
        (status = 200, description = "One label per reported token.", body = Vec<Label>),
        (status = 400, response = crate::server::openapi::BadRequest),
        (status = 401, response = crate::server::openapi::Unauthorized),
        (status = 404, response = crate::server::openapi::NotFound),
        (status = 413, response = crate::server::openapi::TooLarge),
        (status = 500, response = crate::server::openapi::Internal),
        (status = 503, response = crate::server::openapi::Unavailable)
    ),
    security(())
)]
pub(crate) async fn github_report(
    State(state): State<ServerState>,
    headers: HeaderMap,
    request: Request,
) -> Result<Json<Vec<Label>>, ApiError> {
    let Some(leaks) = &state.inner.leaks else {
        return Err(ApiError::NotFound("secret scanning is not enabled on this key service".into()));
    };
    let body = read_body(request, REPORT_BODY_LIMIT).await?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(identifier), Some(signature)) =
        (header("github-public-key-identifier"), header("github-public-key-signature"))
    else {
        return Err(ApiError::Unauthorized("a report needs Github-Public-Key-Identifier and -Signature"));
    };
    match leaks.keys.verify(identifier, signature, &body).await {
        Ok(()) => {}
        Err(SignatureError::Fetch(e)) => {
            // GitHub retries: a key that cannot be checked now is not a bad report.
            tracing::warn!(error = %e, "secret scanning: GitHub's public keys could not be fetched");
            return Err(ApiError::Unavailable);
        }
        Err(e) => {
            tracing::warn!(reason = %e, "secret scanning: report refused");
            return Err(ApiError::Unauthorized("the report's signature is not valid"));
        }
    }
    let reported: Vec<Reported> = parse_json(&body)?;
    if reported.len() > MAX_REPORTED_TOKENS {
        let message = format!("at most {MAX_REPORTED_TOKENS} tokens per report");
        return Err(ApiError::invalid("too_many_tokens", message));
    }
    let mut labels = Vec::with_capacity(reported.len());
    for report in reported {
        let real = handle(&state, leaks.action, &report).await?;
        labels.push(Label {
            token_raw: report.token,
            token_type: report.token_type,
            label: if real { "true_positive" } else { "false_positive" },
        });
    }
    Ok(Json(labels))
}

/// Acts on one reported token; whether it is one of our keys.
async fn handle(state: &ServerState, action: LeakAction, report: &Reported) -> Result<bool, ApiError> {
    if report.token.is_empty() || report.token.len() > MAX_TOKEN_LEN {
        return Ok(false);
    }
    let digest = ApiKey::new(report.token.clone()).digest();
    let Some(found) = state.inner.store.find_by_digest(&digest).await? else { return Ok(false) };
    let key = found.key;
    let done = match action {
        LeakAction::Revoke => key.revoked,
        LeakAction::Disable => key.revoked || key.disabled,
    };
    if done {
        // Reported before (or handled by an operator): nothing to do, nothing recorded.
        return Ok(true);
    }
    let url: String = report.url.chars().take(MAX_URL_LEN).collect();
    let note = json!({ "url": url, "source": report.source, "token_type": report.token_type });
    let now = now_ms();
    let store = &state.inner.store;
    match store.leaked(&key.key_id, action == LeakAction::Disable, LEAK_ACTOR, now, &note).await {
        Ok(_) => {}
        // Revoked in between: the same outcome.
        Err(StoreError::Conflict(_)) => return Ok(true),
        Err(e) => return Err(e.into()),
    }
    let what = if action == LeakAction::Disable { "disabled" } else { "revoked" };
    tracing::warn!(key_id = %key.key_id, %url, "key reported leaked by GitHub secret scanning: {what}");
    let alert = Alert {
        id: None,
        acknowledged_at: None,
        at: now,
        key_id: key.key_id.clone(),
        kind: AlertKind::Leaked,
        minute: now,
        observed: 1,
        baseline: 0.0,
        threshold: 0.0,
        detail: format!("found at {url}; key {what}"),
    };
    // The key is handled whatever becomes of the alert.
    if let Err(e) = store.insert_alert(&alert).await {
        tracing::error!(error = %e, key_id = %key.key_id, "secret scanning: the leak alert could not be stored");
    }
    Ok(true)
}
