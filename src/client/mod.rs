//! The key service's admin API over HTTP (feature `client`): [`AdminClient`] and the
//! types it sends and reads, for tools that manage keys, roles and usage reports.
//!
//! The feature needs reqwest only (rustls), not the key service's own dependencies
//! (sqlx, clap, tokio's full runtime); feature `server` includes it, and the key service
//! takes and answers these same types.
//!
//! ```no_run
//! # async fn run() -> Result<(), keygate::client::ClientError> {
//! use keygate::client::{AdminClient, NewKey, UsageQuery};
//!
//! let admin = AdminClient::new("https://keys.internal:7700", std::env::var("KEYGATE_ADMIN_TOKEN").unwrap())?;
//! let created = admin
//!     .create_key(NewKey { owner: "acme".into(), name: "ci".into(), scopes: vec!["reports:read".into()], ..Default::default() })
//!     .await?;
//! println!("{} (shown once)", created.key.expose_secret());
//! let report = admin.usage_report(&UsageQuery::owner("acme")).await?;
//! println!("{} minutes with traffic", report.buckets.len());
//! admin.revoke(&created.key_id).await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use reqwest::{Method, RequestBuilder};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::key::ApiKey;
use crate::transport::{ClientOptions, ReadError, http_client, read_body};
use crate::wire::{Alert, ErrorBody};

mod keys_page;
mod model;

pub use keys_page::{KeyListQuery, KeyPage};

pub use model::{
    AuditRecord, CreatedToken, DeliveryState, KeyInfo, KeyPatch, NewKey, NewToken, OwnerInfo, OwnerQuota, RoleInfo,
    TokenInfo, TokenKind, UsageBucket, UsageGroupBy, UsageQuery, UsageReport, WebhookDelivery, WebhookEndpoint,
};

/// What an admin call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The key service could not be reached or the transfer failed.
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The key service refused the call.
    #[error("HTTP {status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The `error` code.
        code: String,
        /// The `message`.
        message: String,
    },
    /// The answer could not be understood.
    #[error("unexpected answer: {0}")]
    Decode(String),
}

impl ClientError {
    /// The HTTP status of an [`Api`](Self::Api) error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A created or rotated key: the raw key (shown this once) and the key's fields.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    /// The key's id.
    pub key_id: String,
    /// The raw key. Store it now: the key service cannot show it again.
    pub key: ApiKey,
    /// The key's fields.
    pub info: KeyInfo,
    /// After a rotation: when the previous secret stops working.
    pub previous_expires_at: Option<OffsetDateTime>,
}

impl<'de> Deserialize<'de> for CreatedKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            key: String,
            #[serde(flatten)]
            info: KeyInfo,
            #[serde(default, with = "time::serde::rfc3339::option")]
            previous_expires_at: Option<OffsetDateTime>,
        }
        let w = Wire::deserialize(d)?;
        Ok(Self {
            key_id: w.info.key_id.clone(),
            key: ApiKey::new(w.key),
            info: w.info,
            previous_expires_at: w.previous_expires_at,
        })
    }
}

/// Largest answer read: a list of 1 000 keys or records fits many times over.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// A client of the key service's admin API.
///
/// Timeouts: connect 2 s, whole request 10 s; answers up to 16 MiB; redirects are not
/// followed (a 3xx is a [`ClientError::Api`]).
#[derive(Clone)]
#[must_use]
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient").field("base", &self.base).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Keys {
    keys: Vec<KeyInfo>,
}
#[derive(Deserialize)]
struct Roles {
    roles: Vec<RoleInfo>,
}
#[derive(Deserialize)]
struct Records {
    records: Vec<AuditRecord>,
}
#[derive(Deserialize)]
struct Alerts {
    alerts: Vec<Alert>,
}

fn rfc3339(t: OffsetDateTime) -> Result<String, ClientError> {
    t.format(&time::format_description::well_known::Rfc3339)
        .map_err(|_| ClientError::Decode(format!("{t} has no RFC 3339 form")))
}

impl AdminClient {
    /// A client of the key service at `url` (`http://127.0.0.1:7700`).
    pub fn new(url: impl Into<String>, admin_token: impl Into<String>) -> Result<Self, ClientError> {
        let http = http_client(ClientOptions {
            connect_timeout: Duration::from_secs(2),
            timeout: Some(Duration::from_secs(10)),
            tcp_keepalive: None,
        })?;
        Ok(Self { http, base: url.into().trim_end_matches('/').to_owned(), token: admin_token.into() })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token)
    }

    async fn send<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T, ClientError> {
        let res = req.send().await?;
        let status = res.status();
        let bytes = read_body(res, MAX_ANSWER_BYTES).await.map_err(|e| match e {
            ReadError::Transfer(e) => ClientError::Http(e),
            too_large => ClientError::Decode(too_large.to_string()),
        })?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => (b.error, b.message),
                Err(_) => (String::new(), String::from_utf8_lossy(&bytes).chars().take(200).collect()),
            };
            return Err(ClientError::Api { status: status.as_u16(), code, message });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `POST /v1/keys`.
    pub async fn create_key(&self, key: NewKey) -> Result<CreatedKey, ClientError> {
        self.send(self.request(Method::POST, "/v1/keys").json(&key)).await
    }

    /// `GET /v1/keys/{id}`.
    pub async fn get_key(&self, key_id: &str) -> Result<KeyInfo, ClientError> {
        self.send(self.request(Method::GET, &format!("/v1/keys/{}", encode(key_id)))).await
    }

    /// `GET /v1/keys?owner=`: the first 1 000 keys, oldest first (page on with
    /// [`list_keys_page`](Self::list_keys_page)).
    pub async fn list_keys(&self, owner: Option<&str>) -> Result<Vec<KeyInfo>, ClientError> {
        let mut req = self.request(Method::GET, "/v1/keys");
        if let Some(owner) = owner {
            req = req.query(&[("owner", owner)]);
        }
        Ok(self.send::<Keys>(req).await?.keys)
    }

    /// `GET /v1/keys` with `query`: one page of keys, oldest first, and the cursor of the
    /// next.
    pub async fn list_keys_page(&self, query: &KeyListQuery) -> Result<KeyPage, ClientError> {
        self.send(self.request(Method::GET, "/v1/keys").query(&query.pairs())).await
    }

    /// Every key `query` selects, following the cursors from `query.after` (or the first
    /// page) to the last page, at most `max_pages` pages (a bound, not a target).
    pub async fn list_all_keys(&self, query: &KeyListQuery, max_pages: usize) -> Result<Vec<KeyInfo>, ClientError> {
        let mut query = query.clone();
        let mut keys = Vec::new();
        for _ in 0..max_pages {
            let page = self.list_keys_page(&query).await?;
            keys.extend(page.keys);
            match page.next {
                Some(next) => query.after = Some(next),
                None => break,
            }
        }
        Ok(keys)
    }

    /// `PATCH /v1/keys/{id}`.
    pub async fn update_key(&self, key_id: &str, patch: &KeyPatch) -> Result<KeyInfo, ClientError> {
        self.send(self.request(Method::PATCH, &format!("/v1/keys/{}", encode(key_id))).json(patch)).await
    }

    /// `POST /v1/keys/{id}/rotate`: a new secret; the old one works `grace_s` more seconds.
    pub async fn rotate(&self, key_id: &str, grace_s: u64) -> Result<CreatedKey, ClientError> {
        let body = serde_json::json!({ "grace_s": grace_s });
        self.send(self.request(Method::POST, &format!("/v1/keys/{}/rotate", encode(key_id))).json(&body)).await
    }

    /// `POST /v1/keys/{id}/revoke`. Revoking a revoked key succeeds and changes nothing;
    /// [`revoke_key`](Self::revoke_key) tells the two apart.
    pub async fn revoke(&self, key_id: &str) -> Result<KeyInfo, ClientError> {
        self.send(self.request(Method::POST, &format!("/v1/keys/{}/revoke", encode(key_id)))).await
    }

    /// `GET /v1/owners/{owner}`: the owner's limits and credits (empty when none were set).
    pub async fn get_owner(&self, owner: &str) -> Result<OwnerInfo, ClientError> {
        self.send(self.request(Method::GET, &format!("/v1/owners/{}", encode(owner)))).await
    }

    /// `PUT /v1/owners/{owner}`: replaces the owner's limits and credits.
    pub async fn put_owner(&self, owner: &str, quota: &OwnerQuota) -> Result<OwnerInfo, ClientError> {
        self.send(self.request(Method::PUT, &format!("/v1/owners/{}", encode(owner))).json(quota)).await
    }

    /// `PUT /v1/roles/{name}`.
    pub async fn put_role<I, S>(&self, name: &str, scopes: I) -> Result<RoleInfo, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let scopes: Vec<String> = scopes.into_iter().map(Into::into).collect();
        let body = serde_json::json!({ "scopes": scopes });
        self.send(self.request(Method::PUT, &format!("/v1/roles/{}", encode(name))).json(&body)).await
    }

    /// `GET /v1/roles`.
    pub async fn list_roles(&self) -> Result<Vec<RoleInfo>, ClientError> {
        Ok(self.send::<Roles>(self.request(Method::GET, "/v1/roles")).await?.roles)
    }

    /// `GET /v1/audit?since=`: from `since` on, or the newest 1 000 records.
    pub async fn audit(&self, since: Option<OffsetDateTime>) -> Result<Vec<AuditRecord>, ClientError> {
        let mut req = self.request(Method::GET, "/v1/audit");
        if let Some(since) = since {
            req = req.query(&[("since", rfc3339(since)?)]);
        }
        Ok(self.send::<Records>(req).await?.records)
    }

    /// `GET /v1/usage?key_id=&since=`: a key's usage per minute, from `since` (default:
    /// the last 24 hours). [`usage_report`](Self::usage_report) asks anything else.
    pub async fn usage(&self, key_id: &str, since: Option<OffsetDateTime>) -> Result<UsageReport, ClientError> {
        let mut query = UsageQuery::key(key_id);
        query.since = since;
        self.usage_report(&query).await
    }

    /// `GET /v1/usage?key_id=|owner=&since=&until=&group_by=`: a key's usage, or the sum
    /// over an owner's keys, per minute, hour, day or route.
    pub async fn usage_report(&self, query: &UsageQuery) -> Result<UsageReport, ClientError> {
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(k) = &query.key_id {
            params.push(("key_id", k.clone()));
        }
        if let Some(o) = &query.owner {
            params.push(("owner", o.clone()));
        }
        if let Some(t) = query.since {
            params.push(("since", rfc3339(t)?));
        }
        if let Some(t) = query.until {
            params.push(("until", rfc3339(t)?));
        }
        if let Some(g) = query.group_by {
            params.push(("group_by", g.as_str().to_owned()));
        }
        self.send(self.request(Method::GET, "/v1/usage").query(&params)).await
    }

    /// `GET /v1/alerts`: the newest 1 000 alerts.
    pub async fn alerts(&self) -> Result<Vec<Alert>, ClientError> {
        Ok(self.send::<Alerts>(self.request(Method::GET, "/v1/alerts")).await?.alerts)
    }
}

fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

// ---- tokens (issue 14)

#[derive(Deserialize)]
struct Tokens {
    tokens: Vec<TokenInfo>,
}

impl AdminClient {
    /// `POST /v1/tokens`: a new service or admin token, shown this once.
    pub async fn create_token(&self, kind: TokenKind, name: &str) -> Result<CreatedToken, ClientError> {
        let body = NewToken { kind, name: name.to_owned() };
        self.send(self.request(Method::POST, "/v1/tokens").json(&body)).await
    }

    /// `GET /v1/tokens`: this replica's bootstrap tokens, then every stored token.
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        Ok(self.send::<Tokens>(self.request(Method::GET, "/v1/tokens")).await?.tokens)
    }

    /// `POST /v1/tokens/{id}/revoke`: idempotent; the last active admin token is refused
    /// (409).
    pub async fn revoke_token(&self, id: &str) -> Result<TokenInfo, ClientError> {
        self.send(self.request(Method::POST, &format!("/v1/tokens/{}/revoke", encode(id)))).await
    }
}

// ---- the CLI's operator commands: idempotent revoke, disable/enable, roles delete,
// alerts by state and their acknowledgement.

/// The answer of [`AdminClient::revoke_key`]: the key, and whether it had been revoked
/// before (revocation is idempotent).
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct Revocation {
    /// The key as it is now.
    #[serde(flatten)]
    pub info: KeyInfo,
    /// The key had been revoked before this call; nothing changed.
    #[serde(default)]
    pub already_revoked: bool,
}

/// The answer of [`AdminClient::delete_role`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct RoleDeleted {
    /// The role deleted.
    pub name: String,
    /// The keys it was removed from (`detach`), by id.
    #[serde(default)]
    pub detached: Vec<String>,
}

impl AdminClient {
    /// `POST /v1/keys/{id}/revoke`, telling whether the key had been revoked before:
    /// revoking a revoked key succeeds and changes nothing.
    pub async fn revoke_key(&self, key_id: &str) -> Result<Revocation, ClientError> {
        self.send(self.request(Method::POST, &format!("/v1/keys/{}/revoke", encode(key_id)))).await
    }

    /// Disables a key (`PATCH` `disabled: true`): verify answers `DISABLED` until
    /// [`enable`](Self::enable).
    pub async fn disable(&self, key_id: &str) -> Result<KeyInfo, ClientError> {
        self.update_key(key_id, &KeyPatch { disabled: Some(true), ..KeyPatch::default() }).await
    }

    /// Enables a disabled key (`PATCH` `disabled: false`).
    pub async fn enable(&self, key_id: &str) -> Result<KeyInfo, ClientError> {
        self.update_key(key_id, &KeyPatch { disabled: Some(false), ..KeyPatch::default() }).await
    }

    /// `DELETE /v1/roles/{name}[?detach=true]`: refused with 409 while unrevoked keys
    /// hold the role, unless `detach`, which removes it from them first.
    pub async fn delete_role(&self, name: &str, detach: bool) -> Result<RoleDeleted, ClientError> {
        let mut req = self.request(Method::DELETE, &format!("/v1/roles/{}", encode(name)));
        if detach {
            req = req.query(&[("detach", "true")]);
        }
        self.send(req).await
    }

    /// `GET /v1/alerts?acknowledged=`: the newest 1 000 alerts; `Some(false)` only the
    /// open ones, `Some(true)` only the acknowledged ones, `None` all.
    pub async fn list_alerts(&self, acknowledged: Option<bool>) -> Result<Vec<Alert>, ClientError> {
        let mut req = self.request(Method::GET, "/v1/alerts");
        if let Some(a) = acknowledged {
            req = req.query(&[("acknowledged", if a { "true" } else { "false" })]);
        }
        Ok(self.send::<Alerts>(req).await?.alerts)
    }

    /// `POST /v1/alerts/{id}/ack`: acknowledges an alert (again: keeps the first time).
    pub async fn ack_alert(&self, alert_id: u64) -> Result<Alert, ClientError> {
        self.send(self.request(Method::POST, &format!("/v1/alerts/{alert_id}/ack"))).await
    }
}

// ---- webhooks (issue 14): endpoints and their delivery log

/// `POST /v1/webhooks`'s answer: the endpoint and its signing secret, shown this once.
#[derive(Clone, serde::Serialize, Deserialize)]
pub struct CreatedWebhook {
    /// The endpoint.
    #[serde(flatten)]
    pub endpoint: WebhookEndpoint,
    /// The HMAC-SHA256 key of its signatures (`whsec_…`), sent in the
    /// `keygate-signature` header of every delivery.
    pub secret: String,
}

impl std::fmt::Debug for CreatedWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedWebhook").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

/// A page of `GET /v1/webhooks/{id}/deliveries`, newest first.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DeliveryPage {
    /// The endpoint.
    pub webhook_id: String,
    /// Deliveries dropped because its queue was full, since it was added.
    pub dropped: u64,
    /// Deliveries waiting for an attempt.
    pub pending: u64,
    /// The deliveries, newest first.
    pub deliveries: Vec<WebhookDelivery>,
    /// Pass as `before` for the next (older) page; `None` on the last one.
    pub next_before: Option<i64>,
}

#[derive(Deserialize)]
struct Webhooks {
    webhooks: Vec<WebhookEndpoint>,
}

impl AdminClient {
    /// `POST /v1/webhooks`: adds an endpoint receiving `events` (types such as
    /// `key.revoked`, or prefixes such as `alert.*`; empty: every type).
    pub async fn create_webhook<I, S>(
        &self,
        url: &str,
        events: I,
        description: Option<&str>,
    ) -> Result<CreatedWebhook, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let events: Vec<String> = events.into_iter().map(Into::into).collect();
        let body = serde_json::json!({ "url": url, "events": events, "description": description });
        self.send(self.request(Method::POST, "/v1/webhooks").json(&body)).await
    }

    /// `GET /v1/webhooks`.
    pub async fn list_webhooks(&self) -> Result<Vec<WebhookEndpoint>, ClientError> {
        Ok(self.send::<Webhooks>(self.request(Method::GET, "/v1/webhooks")).await?.webhooks)
    }

    /// `DELETE /v1/webhooks/{id}`: removes the endpoint and its pending deliveries.
    pub async fn delete_webhook(&self, id: &str) -> Result<WebhookEndpoint, ClientError> {
        self.send(self.request(Method::DELETE, &format!("/v1/webhooks/{}", encode(id)))).await
    }

    /// `GET /v1/webhooks/{id}/deliveries?before=&limit=`: up to `limit` (default 100,
    /// at most 500) deliveries with ids below `before`, newest first.
    pub async fn webhook_deliveries(
        &self,
        id: &str,
        before: Option<i64>,
        limit: Option<u32>,
    ) -> Result<DeliveryPage, ClientError> {
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(b) = before {
            params.push(("before", b.to_string()));
        }
        if let Some(l) = limit {
            params.push(("limit", l.to_string()));
        }
        let path = format!("/v1/webhooks/{}/deliveries", encode(id));
        self.send(self.request(Method::GET, &path).query(&params)).await
    }
}
