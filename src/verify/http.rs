//! [`HttpVerifier`]: asks the key service (wire protocol v1, `POST /v1/keys/verify`).

use std::error::Error as _;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::Url;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use zeroize::Zeroizing;

use super::{Reason, Verdict, Verifier, VerifyError};
use crate::key::ApiKey;
use crate::principal::{Principal, RateLimit};
use crate::scope::{ScopeSet, validate_role};

/// Default connect timeout: 500 ms.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default deadline of one verification, retries and failover included: 2 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default largest answer read from the key service: 64 KiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Default time a key-service URL that refused a connection is tried last: 2 s.
pub const DEFAULT_FAILOVER_COOLDOWN: Duration = Duration::from_secs(2);
/// Most key-service URLs one verifier or listener takes.
pub const MAX_URLS: usize = 64;

/// Why a remote verifier or listener could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteConfigError {
    /// No key-service URL was given.
    #[error("no key-service URL given")]
    NoUrl,
    /// A key-service URL is not usable. The URL itself is not repeated (it could carry
    /// credentials); `index` says which one.
    #[error("key-service URL #{index} is not usable: {reason}")]
    InvalidUrl {
        /// Position of the URL in the list, from 0.
        index: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No service token was set.
    #[error("a service token is required (HttpVerifierBuilder::service_token)")]
    MissingServiceToken,
    /// The service token is empty or has characters a header cannot carry.
    #[error("the service token must be non-empty visible ASCII")]
    InvalidServiceToken,
    /// The HTTP client could not be built.
    #[error("the HTTP client could not be built: {0}")]
    Client(String),
    /// A background task was asked for outside a Tokio runtime.
    #[error("must be called from within a Tokio runtime")]
    NoRuntime,
}

/// One or more key-service base URLs: a `&str`, a `String`, or a list of either.
///
/// ```
/// use keygate::verify::KeyServiceUrls;
/// assert_eq!("http://a:1".into_urls(), vec!["http://a:1".to_owned()]);
/// assert_eq!(["http://a:1", "http://b:1"].into_urls().len(), 2);
/// ```
pub trait KeyServiceUrls {
    /// The URLs as strings.
    fn into_urls(self) -> Vec<String>;
}

impl KeyServiceUrls for &str {
    fn into_urls(self) -> Vec<String> {
        vec![self.to_owned()]
    }
}

impl KeyServiceUrls for String {
    fn into_urls(self) -> Vec<String> {
        vec![self]
    }
}

impl KeyServiceUrls for &String {
    fn into_urls(self) -> Vec<String> {
        vec![self.clone()]
    }
}

impl KeyServiceUrls for Url {
    fn into_urls(self) -> Vec<String> {
        vec![self.to_string()]
    }
}

impl<S: AsRef<str>> KeyServiceUrls for Vec<S> {
    fn into_urls(self) -> Vec<String> {
        self.iter().map(|s| s.as_ref().to_owned()).collect()
    }
}

impl<S: AsRef<str>> KeyServiceUrls for &[S] {
    fn into_urls(self) -> Vec<String> {
        self.iter().map(|s| s.as_ref().to_owned()).collect()
    }
}

impl<S: AsRef<str>, const N: usize> KeyServiceUrls for [S; N] {
    fn into_urls(self) -> Vec<String> {
        self.iter().map(|s| s.as_ref().to_owned()).collect()
    }
}

/// A key-service base URL, checked, with `path` appended.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) url: Url,
    /// `scheme://host:port/path` without any credentials: what logs show.
    pub(crate) label: Arc<str>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

pub(crate) fn endpoints(urls: Vec<String>, path: &str) -> Result<Box<[Endpoint]>, RemoteConfigError> {
    if urls.is_empty() {
        return Err(RemoteConfigError::NoUrl);
    }
    if urls.len() > MAX_URLS {
        return Err(RemoteConfigError::InvalidUrl { index: MAX_URLS, reason: "at most 64 URLs" });
    }
    let invalid = |index, reason| RemoteConfigError::InvalidUrl { index, reason };
    urls.iter()
        .enumerate()
        .map(|(index, raw)| {
            let base = Url::parse(raw.trim()).map_err(|_| invalid(index, "not an absolute URL"))?;
            if !matches!(base.scheme(), "http" | "https") {
                return Err(invalid(index, "the scheme must be http or https"));
            }
            if base.host_str().is_none_or(str::is_empty) {
                return Err(invalid(index, "no host"));
            }
            if !base.username().is_empty() || base.password().is_some() {
                return Err(invalid(index, "credentials in the URL are not allowed; use the service token"));
            }
            if base.query().is_some() || base.fragment().is_some() {
                return Err(invalid(index, "a base URL takes no query or fragment"));
            }
            let mut url = base.clone();
            url.set_path(&format!("{}{path}", base.path().trim_end_matches('/')));
            let label = format!(
                "{}://{}:{}{}",
                url.scheme(),
                url.host_str().unwrap_or_default(),
                url.port_or_known_default().unwrap_or_default(),
                base.path().trim_end_matches('/')
            );
            Ok(Endpoint { url, label: label.into() })
        })
        .collect()
}

/// `Bearer <token>` as a header value marked sensitive (hyper never logs it, HTTP/2
/// never indexes it).
pub(crate) fn bearer(token: Option<&str>) -> Result<HeaderValue, RemoteConfigError> {
    let token = token.ok_or(RemoteConfigError::MissingServiceToken)?;
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(RemoteConfigError::InvalidServiceToken);
    }
    let value = Zeroizing::new(format!("Bearer {token}"));
    let mut header = HeaderValue::from_str(&value).map_err(|_| RemoteConfigError::InvalidServiceToken)?;
    header.set_sensitive(true);
    Ok(header)
}

/// Asks the key service about each key: `POST {base}/v1/keys/verify` with
/// `Authorization: Bearer <service token>` and `{"key": "<raw key>"}` (wire protocol v1).
///
/// Put a [`CachedVerifier`](crate::CachedVerifier) in front of it: on its own it makes
/// one call per request.
///
/// # Answers and errors
///
/// A 200 answer `{"valid": true, ...}` becomes [`Verdict::Valid`] (scopes parsed with
/// [`ScopeSet::parse`], `expires_at` as RFC 3339); `{"valid": false, "code": ...}`
/// becomes [`Verdict::Invalid`] with the matching [`Reason`], and the `key_id` the key
/// service adds for refused keys that exist (an extension of protocol v1 that older
/// services simply leave out). Everything else is a
/// [`VerifyError`], never a denial: another status ([`VerifyError::Status`]), a body
/// that does not parse, has an unknown `code`, or is larger than
/// `max_response_bytes` ([`VerifyError::BadAnswer`]), no answer within `timeout`
/// ([`VerifyError::Timeout`]), a refused or reset connection
/// ([`VerifyError::Unreachable`]).
///
/// # Retries and several key services
///
/// The only retry is one immediate retry when a connection is reset or closed before
/// the answer arrives: the usual cause is a pooled keep-alive connection the key service
/// had just closed, and verification is idempotent. Timeouts, error statuses and bad
/// answers are not retried.
///
/// Given several base URLs (replicas of one key service), calls go round robin; a call
/// whose connection cannot be established (refused, unreachable, connect timeout) moves
/// to the next URL, until each was tried once. A URL that failed to connect is then
/// tried last for `failover_cooldown` (default 2 s), so that a dead replica does not
/// cost every other request a connect timeout. `timeout` bounds the whole call, retry
/// and failover included.
///
/// # Secrets
///
/// The service token is sent as a sensitive header and never shown by `Debug`; the key
/// is never logged. URLs with credentials in them are refused.
///
/// ```no_run
/// use std::time::Duration;
/// use keygate::{CachedVerifier, HttpVerifier};
///
/// let remote = HttpVerifier::builder(["http://keys-a:7000", "http://keys-b:7000"])
///     .service_token(std::env::var("KEYGATE_SERVICE_TOKEN").unwrap())
///     .timeout(Duration::from_secs(1))
///     .build()
///     .unwrap();
/// let verifier = CachedVerifier::new(remote);
/// ```
#[derive(Clone)]
pub struct HttpVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    endpoints: Box<[Endpoint]>,
    next: AtomicUsize,
    /// Per endpoint: milliseconds after `origin` until which it is tried last.
    down_until_ms: Box<[AtomicU64]>,
    origin: Instant,
    failover_cooldown: Duration,
    auth: HeaderValue,
    timeout: Duration,
    connect_timeout: Duration,
    max_response_bytes: usize,
}

impl fmt::Debug for HttpVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpVerifier")
            .field("endpoints", &self.inner.endpoints)
            .field("service_token", &"<redacted>")
            .field("connect_timeout", &self.inner.connect_timeout)
            .field("timeout", &self.inner.timeout)
            .field("max_response_bytes", &self.inner.max_response_bytes)
            .field("failover_cooldown", &self.inner.failover_cooldown)
            .finish()
    }
}

/// Builds an [`HttpVerifier`]; see [`HttpVerifier::builder`].
#[must_use]
pub struct HttpVerifierBuilder {
    urls: Vec<String>,
    token: Option<Zeroizing<String>>,
    connect_timeout: Duration,
    timeout: Duration,
    max_response_bytes: usize,
    failover_cooldown: Duration,
    client: Option<reqwest::Client>,
}

impl fmt::Debug for HttpVerifierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpVerifierBuilder")
            .field("urls", &self.urls.len())
            .field("service_token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

impl HttpVerifier {
    /// Starts a builder for one base URL (`"http://127.0.0.1:7000"`) or several
    /// (`["http://a:7000", "http://b:7000"]`). Defaults: connect timeout 500 ms,
    /// timeout 2 s, answers up to 64 KiB. A service token is required.
    pub fn builder(urls: impl KeyServiceUrls) -> HttpVerifierBuilder {
        HttpVerifierBuilder {
            urls: urls.into_urls(),
            token: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            failover_cooldown: DEFAULT_FAILOVER_COOLDOWN,
            client: None,
        }
    }
}

impl HttpVerifierBuilder {
    /// The token this service presents to the key service (required).
    pub fn service_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Zeroizing::new(token.into()));
        self
    }

    /// How long establishing a connection may take (default 500 ms). A connection that
    /// cannot be made in time moves the call to the next URL.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Deadline of one verification, from the first byte sent to the last byte read,
    /// retry and failover included (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Largest answer body read (default 64 KiB); a larger one is a
    /// [`VerifyError::BadAnswer`].
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// With several URLs: how long one that refused a connection is tried only after
    /// the others (default 2 s).
    pub fn failover_cooldown(mut self, cooldown: Duration) -> Self {
        self.failover_cooldown = cooldown;
        self
    }

    /// Uses this reqwest client (for custom TLS roots, proxies, ...) instead of building
    /// one. The connect timeout is then the client's own; `timeout` still applies.
    pub fn client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Checks the URLs and the token and builds the verifier.
    pub fn build(self) -> Result<HttpVerifier, RemoteConfigError> {
        let endpoints = endpoints(self.urls, "/v1/keys/verify")?;
        let down_until_ms = endpoints.iter().map(|_| AtomicU64::new(0)).collect();
        let auth = bearer(self.token.as_deref().map(String::as_str))?;
        let client = match self.client {
            Some(client) => client,
            None => reqwest::Client::builder()
                .connect_timeout(self.connect_timeout)
                .pool_idle_timeout(Duration::from_secs(60))
                .user_agent(concat!("keygate/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| RemoteConfigError::Client(e.to_string()))?,
        };
        Ok(HttpVerifier {
            inner: Arc::new(Inner {
                client,
                endpoints,
                next: AtomicUsize::new(0),
                down_until_ms,
                origin: Instant::now(),
                failover_cooldown: self.failover_cooldown,
                auth,
                timeout: self.timeout,
                connect_timeout: self.connect_timeout,
                max_response_bytes: self.max_response_bytes,
            }),
        })
    }
}

/// How one attempt failed, which decides what happens next.
enum Failure {
    /// No connection: try the next URL.
    Connect(VerifyError),
    /// The connection broke before the answer: retry once.
    Reset(VerifyError),
    /// Anything else: give up.
    Final(VerifyError),
}

#[derive(serde::Serialize)]
struct VerifyRequest<'a> {
    key: &'a str,
}

impl Verifier for HttpVerifier {
    async fn verify(&self, key: &ApiKey) -> Result<Verdict, VerifyError> {
        let inner = &*self.inner;
        let body = Zeroizing::new(
            serde_json::to_vec(&VerifyRequest { key: key.expose_secret() })
                .map_err(|e| VerifyError::Other(e.to_string()))?,
        );
        // reqwest needs an owned body; this copy is freed (not zeroized) after sending.
        let body = Bytes::copy_from_slice(&body);
        match tokio::time::timeout(inner.timeout, inner.call(body)).await {
            Ok(result) => result,
            Err(_) => {
                tracing::debug!(timeout = ?inner.timeout, "key service: verify timed out");
                Err(VerifyError::Timeout(inner.timeout))
            }
        }
    }
}

impl Inner {
    async fn call(&self, body: Bytes) -> Result<Verdict, VerifyError> {
        let n = self.endpoints.len();
        let mut cursor = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut tried: u64 = 0;
        let mut retried = false;
        let mut last = None;
        while let Some(index) = self.pick(cursor, tried) {
            let endpoint = &self.endpoints[index];
            match self.attempt(endpoint, body.clone()).await {
                Ok(verdict) => {
                    self.down_until_ms[index].store(0, Ordering::Relaxed);
                    return Ok(verdict);
                }
                Err(Failure::Final(err)) => return Err(err),
                Err(Failure::Connect(err)) => {
                    tried |= 1 << index;
                    let now = self.now_ms();
                    let cooldown = u64::try_from(self.failover_cooldown.as_millis()).unwrap_or(u64::MAX);
                    if self.down_until_ms[index].swap(now.saturating_add(cooldown), Ordering::Relaxed) <= now && n > 1 {
                        tracing::warn!(endpoint = %endpoint.label, error = %err, "key service unreachable; trying the others first");
                    } else {
                        tracing::debug!(endpoint = %endpoint.label, error = %err, "key service: no connection");
                    }
                    last = Some(err);
                }
                Err(Failure::Reset(err)) => {
                    tracing::debug!(endpoint = %endpoint.label, error = %err, "key service: connection reset");
                    if retried {
                        return Err(err);
                    }
                    retried = true;
                    if n > 1 {
                        tried |= 1 << index;
                    }
                    last = Some(err);
                }
            }
            cursor = index + 1;
        }
        Err(last.unwrap_or_else(|| VerifyError::Unreachable("no key service to ask".into())))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The next endpoint from `cursor` on not yet tried in this call: one that is not
    /// cooling down if there is one, else any.
    fn pick(&self, cursor: usize, tried: u64) -> Option<usize> {
        let n = self.endpoints.len();
        let now = self.now_ms();
        let untried = (0..n).map(|i| (cursor + i) % n).filter(|&i| tried & (1 << i) == 0);
        untried
            .clone()
            .find(|&i| self.down_until_ms[i].load(Ordering::Relaxed) <= now)
            .or_else(|| untried.clone().next())
    }

    async fn attempt(&self, endpoint: &Endpoint, body: Bytes) -> Result<Verdict, Failure> {
        let mut response = self
            .client
            .post(endpoint.url.clone())
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .timeout(self.timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| self.classify(&e))?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            if matches!(status.as_u16(), 401 | 403) {
                tracing::error!(endpoint = %endpoint.label, %status, "key service refused the service token");
            }
            return Err(Failure::Final(VerifyError::Status(status.as_u16())));
        }
        let too_large =
            || Failure::Final(VerifyError::BadAnswer(format!("answer larger than {} bytes", self.max_response_bytes)));
        if response.content_length().is_some_and(|len| len > self.max_response_bytes as u64) {
            return Err(too_large());
        }
        let mut buf = Vec::with_capacity(response.content_length().map_or(512, |l| l as usize));
        while let Some(chunk) = response.chunk().await.map_err(|e| self.classify(&e))? {
            if buf.len() + chunk.len() > self.max_response_bytes {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        parse_answer(&buf).map_err(Failure::Final)
    }

    fn classify(&self, e: &reqwest::Error) -> Failure {
        let detail = describe(e);
        if e.is_connect() {
            Failure::Connect(VerifyError::Unreachable(detail))
        } else if e.is_timeout() {
            Failure::Final(VerifyError::Timeout(self.timeout))
        } else if e.is_request() || e.is_body() {
            // The connection was up and broke before a full answer came back: reset,
            // closed early, or a protocol error on a stale pooled connection.
            Failure::Reset(VerifyError::Unreachable(detail))
        } else if e.is_decode() {
            Failure::Final(VerifyError::BadAnswer(detail))
        } else {
            Failure::Final(VerifyError::Other(detail))
        }
    }
}

/// The error and its causes, without the URL.
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut out = String::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(s) = source {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s.to_string());
        source = s.source();
    }
    if out.is_empty() { e.to_string() } else { out }
}

#[derive(serde::Deserialize)]
struct Answer {
    valid: bool,
    code: Option<String>,
    key_id: Option<String>,
    owner: Option<String>,
    name: Option<String>,
    scopes: Option<Vec<String>>,
    roles: Option<Vec<String>>,
    environment: Option<String>,
    expires_at: Option<String>,
    meta: Option<serde_json::Value>,
    ratelimit: Option<RateLimit>,
}

/// Turns a 200 answer into a verdict. Anything unexpected is a `BadAnswer`: a key
/// service we do not understand must never turn into a denial or a grant.
pub(crate) fn parse_answer(body: &[u8]) -> Result<Verdict, VerifyError> {
    let bad = |what: String| VerifyError::BadAnswer(what);
    let answer: Answer = serde_json::from_slice(body).map_err(|e| bad(format!("not a verify answer: {e}")))?;
    if !answer.valid {
        let reason = match answer.code.as_deref() {
            Some("NOT_FOUND") => Reason::NotFound,
            Some("REVOKED") => Reason::Revoked,
            Some("EXPIRED") => Reason::Expired,
            Some("DISABLED") => Reason::Disabled,
            Some(other) => return Err(bad(format!("unknown code {:?}", truncate(other)))),
            None => return Err(bad("an invalid answer without a code".into())),
        };
        // A key id that comes with a denial is kept for usage events; a malformed one
        // is dropped rather than failing a verdict that is otherwise clear.
        let key_id = answer.key_id.filter(|id| !id.is_empty() && id.len() <= 128).map(Arc::<str>::from);
        return Ok(Verdict::Invalid { reason, key_id });
    }
    let key_id =
        answer.key_id.filter(|id| !id.is_empty()).ok_or_else(|| bad("a valid answer without key_id".into()))?;
    let scopes =
        ScopeSet::parse(answer.scopes.unwrap_or_default()).map_err(|e| bad(format!("bad scope in answer: {e}")))?;
    let roles = answer.roles.unwrap_or_default();
    for role in &roles {
        validate_role(role).map_err(|e| bad(format!("bad role in answer: {e}")))?;
    }
    let expires_at = answer
        .expires_at
        .map(|s| OffsetDateTime::parse(&s, &Rfc3339))
        .transpose()
        .map_err(|e| bad(format!("expires_at is not RFC 3339: {e}")))?;
    let principal = Principal::builder(key_id)
        .owner(answer.owner.unwrap_or_default())
        .name(answer.name.unwrap_or_default())
        .scopes(scopes)
        .roles(roles)
        .environment(answer.environment.unwrap_or_default())
        .expires_at(expires_at)
        .meta(answer.meta.unwrap_or(serde_json::Value::Null))
        .ratelimit(answer.ratelimit)
        .build();
    Ok(Verdict::Valid(principal))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(32) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse() {
        let v = parse_answer(
            br#"{"valid":true,"key_id":"k1","owner":"acme","name":"ci","scopes":["reports:read"],"roles":["admin"],
                "environment":"live","expires_at":"2099-01-01T00:00:00Z","meta":{"a":1},"ratelimit":{"limit":10,"period_s":60}}"#,
        )
        .unwrap();
        let Verdict::Valid(p) = v else { panic!("valid expected") };
        assert_eq!((p.key_id(), p.owner(), p.environment()), ("k1", "acme", "live"));
        assert!(p.has_role("admin"));
        assert_eq!(p.ratelimit(), Some(RateLimit { limit: 10, period_s: 60 }));
        assert!(p.expires_at().is_some());
        let minimal = parse_answer(br#"{"valid":true,"key_id":"k1","expires_at":null,"ratelimit":null}"#).unwrap();
        assert!(matches!(minimal, Verdict::Valid(_)));
        for (code, reason) in [
            ("NOT_FOUND", Reason::NotFound),
            ("REVOKED", Reason::Revoked),
            ("EXPIRED", Reason::Expired),
            ("DISABLED", Reason::Disabled),
        ] {
            let body = format!(r#"{{"valid":false,"code":"{code}"}}"#);
            assert!(
                matches!(parse_answer(body.as_bytes()), Ok(Verdict::Invalid { reason: r, key_id: None }) if r == reason)
            );
        }
    }

    #[test]
    fn strange_answers_are_errors_not_denials() {
        for body in [
            &br#"{"valid":false,"code":"GONE"}"#[..],
            br#"{"valid":false}"#,
            br#"{"valid":true}"#,
            br#"{"valid":true,"key_id":""}"#,
            br#"{"valid":true,"key_id":"k","scopes":["not a scope"]}"#,
            br#"{"valid":true,"key_id":"k","expires_at":"tomorrow"}"#,
            br#"{"valid":"yes"}"#,
            b"<html>",
            b"",
            b"null",
        ] {
            assert!(matches!(parse_answer(body), Err(VerifyError::BadAnswer(_))), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn urls_are_checked() {
        let e = endpoints(vec!["http://127.0.0.1:9/base/".into()], "/v1/keys/verify").unwrap();
        assert_eq!(e[0].url.as_str(), "http://127.0.0.1:9/base/v1/keys/verify");
        assert_eq!(&*e[0].label, "http://127.0.0.1:9/base");
        for bad in ["", "ftp://x", "http://u:p@x", "http://x/?q=1", "not a url"] {
            assert!(endpoints(vec![bad.into()], "/x").is_err(), "{bad}");
        }
        assert_eq!(endpoints(vec![], "/x").unwrap_err(), RemoteConfigError::NoUrl);
    }

    #[test]
    fn endpoints_that_refused_are_tried_last() {
        let v = HttpVerifier::builder(["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"])
            .service_token("t")
            .build()
            .unwrap();
        let inner = &v.inner;
        assert_eq!(inner.pick(0, 0), Some(0));
        assert_eq!(inner.pick(2, 0), Some(2));
        inner.down_until_ms[0].store(u64::MAX, Ordering::Relaxed);
        assert_eq!(inner.pick(0, 0), Some(1));
        assert_eq!(inner.pick(2, 0), Some(2));
        assert_eq!(inner.pick(2, 0b100), Some(1));
        assert_eq!(inner.pick(1, 0b110), Some(0), "a cooling endpoint is still the last resort");
        assert_eq!(inner.pick(0, 0b111), None);
        assert!(HttpVerifier::builder(vec!["http://127.0.0.1:1"; 65]).service_token("t").build().is_err());
    }

    #[test]
    fn debug_hides_the_token() {
        let v = HttpVerifier::builder("http://127.0.0.1:9").service_token("s3cret-token").build().unwrap();
        let out = format!("{v:?}");
        assert!(!out.contains("s3cret"), "{out}");
        assert!(out.contains("<redacted>"));
        assert!(HttpVerifier::builder("http://127.0.0.1:9").build().is_err());
        assert!(HttpVerifier::builder("http://127.0.0.1:9").service_token("a b").build().is_err());
    }
}
