//! Rejections: every way keygate says no, rendered for HTTP or gRPC.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::body::RejectionBody;
use crate::key::FormatError;
use crate::outcome::Outcome;
use crate::principal::RateLimit;
use crate::ratelimit::LimitState;
use crate::verify::Reason;

/// The realm in `WWW-Authenticate` unless [`ApiKeyLayer::realm`](crate::ApiKeyLayer::realm)
/// says otherwise.
pub const DEFAULT_REALM: &str = "api";

/// The `WWW-Authenticate` scheme when no configured source reads `Authorization`.
const DEFAULT_CHALLENGE_SCHEME: &str = "Bearer";

/// Why a key was turned away as `invalid_token`. The client never sees this.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidKey {
    /// Empty, too long, or bytes outside visible ASCII.
    Malformed(&'static str),
    /// Failed the local format check.
    Format(FormatError),
    /// The verifier said no.
    Rejected(Reason),
}

/// Every rejection keygate makes.
///
/// | case | [`code()`](AuthError::code) | HTTP | `WWW-Authenticate` | gRPC |
/// | --- | --- | --- | --- | --- |
/// | no key | `missing_key` | 401 | `Bearer realm="…"` | 16 UNAUTHENTICATED |
/// | malformed, unknown, revoked, disabled | `invalid_key` | 401 | `…, error="invalid_token"` | 16 |
/// | expired | `expired_key` | 401 | `…, error="invalid_token", error_description="key expired"` | 16 |
/// | conflicting keys | `conflicting_credentials` | 400 | `…, error="invalid_request"` | 3 INVALID_ARGUMENT |
/// | missing scope or role | `insufficient_scope` | 403 | `…, error="insufficient_scope", scope="…"` (no `scope` when only roles would do) | 7 PERMISSION_DENIED |
/// | key service unavailable | `key_service_unavailable` | 503 + `Retry-After` | none | 14 UNAVAILABLE |
/// | rate limited | `rate_limited` | 429 + `Retry-After` + `RateLimit` fields | none | 8 RESOURCE_EXHAUSTED |
/// | credits spent | `usage_exceeded` | 429 (+ `Retry-After` until the next refill, when there is one) | none | 8 RESOURCE_EXHAUSTED |
/// | limits cannot be counted (fleet-wide store down, policy fails closed) | `limits_unavailable` | 503 + `Retry-After` | none | 14 UNAVAILABLE |
/// | keygate set up wrongly | `misconfigured` | 500 | none | 13 INTERNAL |
///
/// HTTP bodies are `application/problem+json` (RFC 9457) with the code as a `code`
/// member. Unknown, revoked, disabled and malformed keys get byte-identical responses
/// so that nobody can learn which keys exist; the precise reason goes to the log and
/// the usage event only. The challenge names `Bearer` unless the layer reads only
/// another `Authorization` scheme ([`KeySource::authorization`](crate::KeySource::authorization)),
/// whose name it then uses.
///
/// Every rejection response carries the `AuthError` in its extensions, so an outer
/// layer can tell the cases apart without parsing the body; a service that wants its
/// own bodies sets [`ApiKeyLayer::on_rejection`](crate::ApiKeyLayer::on_rejection).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credential in any configured source.
    #[error("no API key was presented")]
    MissingCredentials,
    /// Credentials in two places, or one repeated.
    #[error("conflicting credentials: {0}")]
    ConflictingCredentials(&'static str),
    /// The key is not valid (malformed, unknown, revoked, disabled).
    #[error("invalid API key ({0:?})")]
    InvalidKey(InvalidKey),
    /// The key has expired.
    #[error("the API key has expired")]
    Expired,
    /// The key lacks what the route requires: scopes, roles or both.
    #[error("the API key does not meet the requirement ({required})")]
    InsufficientScope {
        /// The requirement, in the syntax [`Requirement`](crate::Requirement) reads.
        required: String,
        /// The scopes the requirement names (for `scope="…"` and `required_scopes`).
        scopes: Vec<String>,
        /// The roles the requirement names (for `required_roles`).
        roles: Vec<String>,
    },
    /// The key's environment is not one the route takes (a test key on a live route).
    #[error("the API key's environment is not allowed here (required: {})", required.join(" or "))]
    WrongEnvironment {
        /// The environments the requirement names (for `required_environments`).
        required: Vec<String>,
    },
    /// The request comes from outside the key's (or its owner's) allowed networks.
    #[error("the API key may not be used from this address")]
    IpNotAllowed,
    /// The key service could not answer.
    #[error("the key service is unavailable")]
    Unavailable {
        /// Suggested wait.
        retry_after: Duration,
    },
    /// A rate limit of the key (or of its owner) is exhausted.
    #[error("rate limit exceeded")]
    RateLimited {
        /// When the limit lets the next request through.
        retry_after: Duration,
        /// The limit that was exceeded, for the `RateLimit` fields (`None`: not told).
        limit: Option<RateLimit>,
        /// Its name in the `RateLimit` fields (`None`: `requests`).
        name: Option<Arc<str>>,
    },
    /// The key's (or its owner's) credits are spent.
    #[error("usage exceeded: no credits left")]
    UsageExceeded {
        /// Until the next refill, if the credits have one.
        retry_after: Option<Duration>,
    },
    /// The fleet-wide limit engine cannot count (Redis is down) and the limit's policy
    /// fails closed.
    #[error("limits cannot be counted now")]
    LimitsUnavailable {
        /// Suggested wait.
        retry_after: Duration,
    },
    /// keygate is configured wrongly (for example `RequireScopes` without `ApiKeyLayer`).
    #[error("server misconfiguration: {0}")]
    Misconfigured(&'static str),
}

impl AuthError {
    /// A stable snake_case name for the case, for a service's own error bodies, logs
    /// and metrics: `missing_key`, `invalid_key`, `expired_key`,
    /// `conflicting_credentials`, `insufficient_scope`, `wrong_environment`, `ip_not_allowed`,
    /// `key_service_unavailable`, `rate_limited`, `usage_exceeded`, `limits_unavailable`,
    /// `misconfigured`. A code
    /// never changes meaning; new cases get
    /// new codes.
    ///
    /// ```
    /// use keygate::AuthError;
    ///
    /// assert_eq!(AuthError::MissingCredentials.code(), "missing_key");
    /// assert_eq!(AuthError::Expired.code(), "expired_key");
    /// ```
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingCredentials => "missing_key",
            Self::ConflictingCredentials(_) => "conflicting_credentials",
            Self::InvalidKey(_) => "invalid_key",
            Self::Expired => "expired_key",
            Self::InsufficientScope { .. } => "insufficient_scope",
            Self::WrongEnvironment { .. } => "wrong_environment",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::Unavailable { .. } => "key_service_unavailable",
            Self::RateLimited { .. } => "rate_limited",
            Self::UsageExceeded { .. } => "usage_exceeded",
            Self::LimitsUnavailable { .. } => "limits_unavailable",
            Self::Misconfigured(_) => "misconfigured",
        }
    }

    /// The HTTP status for this rejection.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingCredentials | Self::InvalidKey(_) | Self::Expired => StatusCode::UNAUTHORIZED,
            Self::ConflictingCredentials(_) => StatusCode::BAD_REQUEST,
            Self::InsufficientScope { .. } | Self::WrongEnvironment { .. } | Self::IpNotAllowed => {
                StatusCode::FORBIDDEN
            }
            Self::Unavailable { .. } | Self::LimitsUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } | Self::UsageExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Misconfigured(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status code for this rejection.
    pub fn grpc_code(&self) -> u8 {
        let status = self.status().as_u16();
        GRPC_STATUS.iter().find(|(_, http)| *http == status).map_or(13, |(grpc, _)| *grpc)
    }

    /// The usage outcome for this rejection.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::MissingCredentials => Outcome::NoKey,
            Self::ConflictingCredentials(_) => Outcome::Conflict,
            Self::InvalidKey(InvalidKey::Malformed(_) | InvalidKey::Format(_)) => Outcome::Malformed,
            Self::InvalidKey(InvalidKey::Rejected(r)) => match r {
                Reason::NotFound => Outcome::NotFound,
                Reason::Revoked => Outcome::Revoked,
                Reason::Disabled => Outcome::Disabled,
                Reason::Expired => Outcome::Expired,
            },
            Self::Expired => Outcome::Expired,
            Self::InsufficientScope { .. } => Outcome::InsufficientScope,
            Self::WrongEnvironment { .. } => Outcome::WrongEnvironment,
            Self::IpNotAllowed => Outcome::IpNotAllowed,
            Self::Unavailable { .. } | Self::LimitsUnavailable { .. } => Outcome::Unavailable,
            Self::RateLimited { .. } => Outcome::RateLimited,
            Self::UsageExceeded { .. } => Outcome::UsageExceeded,
            Self::Misconfigured(_) => Outcome::Unavailable,
        }
    }

    /// What the client is told: the `detail` of the problem body and the gRPC message.
    /// The same text for every `invalid_token` cause.
    pub fn public_detail(&self) -> String {
        match self {
            Self::MissingCredentials => "no API key was presented".into(),
            Self::ConflictingCredentials(what) => format!("more than one credential was presented: {what}"),
            Self::InvalidKey(_) => "the API key is not valid".into(),
            Self::Expired => "the API key has expired".into(),
            Self::InsufficientScope { required, scopes, roles } => insufficient_detail(required, scopes, roles),
            Self::WrongEnvironment { required } => {
                format!("API keys of this environment cannot be used here; use a key of: {}", required.join(", "))
            }
            Self::IpNotAllowed => "the API key may not be used from this address".into(),
            Self::Unavailable { .. } => "the key service is unavailable; retry later".into(),
            Self::RateLimited { .. } => "the API key's rate limit is exhausted; retry later".into(),
            Self::UsageExceeded { .. } => "the API key's credits are spent".into(),
            Self::LimitsUnavailable { .. } => "usage limits cannot be checked now; retry later".into(),
            Self::Misconfigured(_) => "authentication is misconfigured on this server".into(),
        }
    }

    /// The client-facing shape of a verifier's refusal: expiry is told, every other
    /// reason is the same `invalid_token`.
    pub(crate) fn refused(reason: Reason) -> Self {
        match reason {
            Reason::Expired => Self::Expired,
            other => Self::InvalidKey(InvalidKey::Rejected(other)),
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::MissingCredentials => "Missing API key",
            Self::ConflictingCredentials(_) => "Conflicting credentials",
            Self::InvalidKey(_) => "Invalid API key",
            Self::Expired => "Expired API key",
            Self::InsufficientScope { .. } => "Insufficient scope",
            Self::WrongEnvironment { .. } => "Wrong key environment",
            Self::IpNotAllowed => "Address not allowed",
            Self::Unavailable { .. } => "Key service unavailable",
            Self::RateLimited { .. } => "Rate limit exceeded",
            Self::UsageExceeded { .. } => "Usage exceeded",
            Self::LimitsUnavailable { .. } => "Limits unavailable",
            Self::Misconfigured(_) => "Authentication misconfigured",
        }
    }

    /// The `WWW-Authenticate` value for a challenge `scheme` (`Bearer` unless the layer
    /// reads another `Authorization` scheme) and `realm`, if this case has one.
    ///
    /// ```
    /// use keygate::AuthError;
    ///
    /// let v = AuthError::Expired.www_authenticate("Bearer", "api").unwrap();
    /// assert_eq!(v, r#"Bearer realm="api", error="invalid_token", error_description="key expired""#);
    /// ```
    pub fn www_authenticate(&self, scheme: &str, realm: &str) -> Option<String> {
        let base = format!("{scheme} realm=\"{}\"", quote(realm));
        Some(match self {
            Self::MissingCredentials => base,
            Self::InvalidKey(_) => format!("{base}, error=\"invalid_token\""),
            Self::Expired => format!("{base}, error=\"invalid_token\", error_description=\"key expired\""),
            Self::ConflictingCredentials(_) => format!("{base}, error=\"invalid_request\""),
            // A requirement that names only roles has no scope to list.
            Self::InsufficientScope { scopes, .. } if scopes.is_empty() => {
                format!("{base}, error=\"insufficient_scope\"")
            }
            Self::InsufficientScope { scopes, .. } => {
                format!("{base}, error=\"insufficient_scope\", scope=\"{}\"", quote(&scopes.join(" ")))
            }
            // RFC 6750 has no code for it: the closest, a key without the right to this.
            Self::WrongEnvironment { .. } | Self::IpNotAllowed => format!("{base}, error=\"insufficient_scope\""),
            _ => return None,
        })
    }

    /// The RFC 9457 problem body.
    pub fn problem_json(&self) -> Bytes {
        let mut body = serde_json::json!({
            "type": "about:blank",
            "title": self.title(),
            "status": self.status().as_u16(),
            "detail": self.public_detail(),
            "code": self.code(),
        });
        if let Self::InsufficientScope { scopes, roles, .. } = self {
            body["required_scopes"] = serde_json::json!(scopes);
            body["required_roles"] = serde_json::json!(roles);
        }
        if let Self::WrongEnvironment { required } = self {
            body["required_environments"] = serde_json::json!(required);
        }
        Bytes::from(body.to_string())
    }

    /// Renders as an HTTP response: problem+json, `WWW-Authenticate` (scheme `Bearer`),
    /// `Retry-After`, `Cache-Control: no-store`, and the error in the extensions.
    pub fn to_http_response<B: RejectionBody>(&self, realm: &str) -> Response<B> {
        self.http_response(DEFAULT_CHALLENGE_SCHEME, realm, true)
    }

    fn http_response<B: RejectionBody>(&self, scheme: &str, realm: &str, ratelimit_fields: bool) -> Response<B> {
        let mut res = Response::new(B::rejection(self.problem_json()));
        *res.status_mut() = self.status();
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(v) = self.www_authenticate(scheme, realm).and_then(|v| HeaderValue::from_str(&v).ok()) {
            res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        self.complete(&mut res, scheme, realm, ratelimit_fields);
        res
    }

    /// Renders as a gRPC trailers-only response (HTTP 200, `grpc-status`, `grpc-message`,
    /// `Retry-After` and the `RateLimit` fields where they apply), with the error in the
    /// extensions.
    pub fn to_grpc_response<B: RejectionBody>(&self) -> Response<B> {
        self.grpc_response(true)
    }

    fn grpc_response<B: RejectionBody>(&self, ratelimit_fields: bool) -> Response<B> {
        let mut res = Response::new(B::rejection(Bytes::new()));
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(self.grpc_code() as u16));
        if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(&self.public_detail())) {
            h.insert("grpc-message", v);
        }
        if let Some(after) = self.retry_after() {
            h.insert(header::RETRY_AFTER, retry_after_value(after));
        }
        if let Some(state) = self.limit_state().filter(|_| ratelimit_fields) {
            state.write_fields(h);
        }
        res.extensions_mut().insert(self.clone());
        res
    }

    /// A refused key's standing against the limit it exceeded.
    fn limit_state(&self) -> Option<LimitState> {
        match self {
            Self::RateLimited { retry_after, limit: Some(limit), name } => {
                Some(LimitState { name: name.clone(), limit: *limit, remaining: 0, reset: *retry_after })
            }
            _ => None,
        }
    }

    /// Adds what every HTTP rejection needs and a custom one may have left out: the
    /// challenge on 401/403, `Retry-After` on 429/503 (and the `RateLimit` fields on
    /// 429), `no-store`, and the error itself.
    fn complete<B>(&self, res: &mut Response<B>, scheme: &str, realm: &str, ratelimit_fields: bool) {
        let status = res.status();
        let h = res.headers_mut();
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
            && !h.contains_key(header::WWW_AUTHENTICATE)
        {
            if let Some(v) = self.www_authenticate(scheme, realm).and_then(|v| HeaderValue::from_str(&v).ok()) {
                h.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
            && !h.contains_key(header::RETRY_AFTER)
        {
            if let Some(after) = self.retry_after() {
                h.insert(header::RETRY_AFTER, retry_after_value(after));
            }
        }
        if status == StatusCode::TOO_MANY_REQUESTS && ratelimit_fields {
            if let Some(state) = self.limit_state() {
                state.write_fields(h);
            }
        }
        if !h.contains_key(header::CACHE_CONTROL) {
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        res.extensions_mut().insert(self.clone());
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after }
            | Self::RateLimited { retry_after, .. }
            | Self::LimitsUnavailable { retry_after } => Some(*retry_after),
            Self::UsageExceeded { retry_after } => *retry_after,
            _ => None,
        }
    }
}

/// A service's own rendering of rejections, set with
/// [`ApiKeyLayer::on_rejection`](crate::ApiKeyLayer::on_rejection).
pub(crate) type RejectionHook = Arc<dyn Fn(&AuthError) -> Response<Bytes> + Send + Sync>;

/// How one layer answers: its realm and challenge scheme, and the service's hook if it
/// set one. Built once per layer; the request carries it (in the layer context) to the
/// policies and extractors behind the layer, so that they answer alike.
#[derive(Clone)]
pub(crate) struct Rejections {
    pub(crate) realm: Arc<str>,
    pub(crate) scheme: Arc<str>,
    pub(crate) hook: Option<RejectionHook>,
    /// `RateLimit-Policy` / `RateLimit` on 429s (and, from the layer, on allowed
    /// responses of limited keys).
    pub(crate) ratelimit_fields: bool,
}

impl Default for Rejections {
    fn default() -> Self {
        Self {
            realm: Arc::from(DEFAULT_REALM),
            scheme: Arc::from(DEFAULT_CHALLENGE_SCHEME),
            hook: None,
            ratelimit_fields: true,
        }
    }
}

impl std::fmt::Debug for Rejections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rejections")
            .field("realm", &self.realm)
            .field("scheme", &self.scheme)
            .field("hook", &self.hook.is_some())
            .field("ratelimit_fields", &self.ratelimit_fields)
            .finish()
    }
}

impl Rejections {
    /// The response for `err`; `realm` overrides the layer's (a policy's own realm).
    pub(crate) fn render<B: RejectionBody>(&self, err: &AuthError, grpc: bool, realm: Option<&str>) -> Response<B> {
        let realm = realm.unwrap_or(&self.realm);
        match (&self.hook, grpc) {
            (None, false) => err.http_response(&self.scheme, realm, self.ratelimit_fields),
            (None, true) => err.grpc_response(self.ratelimit_fields),
            (Some(hook), false) => {
                let (parts, body) = hook(err).into_parts();
                let mut res = Response::from_parts(parts, B::rejection(body));
                err.complete(&mut res, &self.scheme, realm, self.ratelimit_fields);
                res
            }
            // gRPC clients read the status from `grpc-status`: what a service may add
            // is metadata, never a body or a status of its own.
            (Some(hook), true) => {
                let custom = hook(err);
                let mut res = err.grpc_response(self.ratelimit_fields);
                add_metadata(res.headers_mut(), custom.headers());
                res
            }
        }
    }
}

/// A custom rejection's headers, as gRPC metadata: every header but those keygate owns
/// in a trailers-only answer. A header the hook sets replaces keygate's (`Retry-After`,
/// the `RateLimit` fields), as on HTTP.
fn add_metadata(to: &mut HeaderMap, from: &HeaderMap) {
    let owned = |name: &http::HeaderName| {
        matches!(name.as_str(), "grpc-status" | "grpc-message" | "grpc-status-details-bin")
            || name == header::CONTENT_TYPE
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
    };
    for name in from.keys().filter(|n| !owned(n)) {
        to.remove(name);
        for value in from.get_all(name) {
            to.append(name.clone(), value.clone());
        }
    }
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for AuthError {
    /// Renders as HTTP with the realm `api`.
    fn into_response(self) -> axum::response::Response {
        self.to_http_response(DEFAULT_REALM)
    }
}

/// What a 403 tells the client would do. Only scopes: the requirement, as before roles
/// had their own syntax. Only roles, any one of which would do (the requirement is
/// exactly `role(a) OR role(b)…`, as [`Requirement`](crate::Requirement) writes it):
/// those roles. Anything else: the whole requirement, since naming one part would be
/// wrong.
fn insufficient_detail(required: &str, scopes: &[String], roles: &[String]) -> String {
    if roles.is_empty() {
        return format!("the API key lacks the required scope: {required}");
    }
    if scopes.is_empty() {
        let alternatives = roles.iter().map(|r| format!("role({r})")).collect::<Vec<_>>().join(" OR ");
        if required == alternatives {
            return match roles {
                [one] => format!("the API key lacks the required role: {one}"),
                _ => format!("the API key lacks one of the roles: {}", roles.join(", ")),
            };
        }
    }
    format!("the API key does not meet the requirement: {required}")
}

/// Whole seconds, rounded up so that a client waiting that long is never early.
fn retry_after_value(after: Duration) -> HeaderValue {
    HeaderValue::from(after.as_millis().div_ceil(1000).max(1) as u64)
}

/// Escapes a quoted-string's `"` and `\`; drops control characters.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() || !c.is_ascii() => {}
            c => out.push(c),
        }
    }
    out
}

/// The gRPC codes keygate answers with and the HTTP status each stands for. Read
/// both ways: rejections are rendered from it, and usage records turn a gRPC answer
/// back into an HTTP status class.
const GRPC_STATUS: [(u8, u16); 6] = [(16, 401), (3, 400), (7, 403), (14, 503), (8, 429), (13, 500)];

/// The HTTP status a gRPC answer's `grpc-status` corresponds to (an OK or missing
/// status keeps the HTTP one).
pub(crate) fn http_status_of_grpc<B>(res: &Response<B>) -> u16 {
    match res.headers().get("grpc-status").map(HeaderValue::as_bytes) {
        None | Some(b"0") => res.status().as_u16(),
        Some(code) => std::str::from_utf8(code)
            .ok()
            .and_then(|c| c.parse::<u8>().ok())
            .and_then(|c| GRPC_STATUS.iter().find(|(grpc, _)| *grpc == c))
            .map_or(500, |(_, http)| *http),
    }
}

/// gRPC's percent-encoding for `grpc-message`: everything outside 0x20..=0x7E, and `%`.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

fn grpc_percent_encode(s: &str) -> String {
    utf8_percent_encode(s, GRPC_MESSAGE).to_string()
}

/// Whether a request is gRPC (its `content-type` starts with `application/grpc`).
pub(crate) fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_key_bodies_are_identical() {
        let a = AuthError::InvalidKey(InvalidKey::Rejected(Reason::NotFound));
        let b = AuthError::InvalidKey(InvalidKey::Rejected(Reason::Revoked));
        let c = AuthError::InvalidKey(InvalidKey::Format(FormatError::BadChecksum));
        assert_eq!(a.problem_json(), b.problem_json());
        assert_eq!(a.problem_json(), c.problem_json());
        assert_eq!(a.www_authenticate("Bearer", "x"), c.www_authenticate("Bearer", "x"));
    }

    #[test]
    fn codes_are_stable_and_distinct() {
        let cases = [
            (AuthError::MissingCredentials, "missing_key"),
            (AuthError::ConflictingCredentials("two"), "conflicting_credentials"),
            (AuthError::InvalidKey(InvalidKey::Rejected(Reason::Revoked)), "invalid_key"),
            (AuthError::InvalidKey(InvalidKey::Malformed("x")), "invalid_key"),
            (AuthError::Expired, "expired_key"),
            (AuthError::InvalidKey(InvalidKey::Rejected(Reason::Expired)), "invalid_key"),
            (
                AuthError::InsufficientScope { required: "a:b".into(), scopes: vec!["a:b".into()], roles: vec![] },
                "insufficient_scope",
            ),
            (AuthError::Unavailable { retry_after: Duration::from_secs(1) }, "key_service_unavailable"),
            (AuthError::RateLimited { retry_after: Duration::from_secs(1), limit: None, name: None }, "rate_limited"),
            (AuthError::UsageExceeded { retry_after: None }, "usage_exceeded"),
            (AuthError::LimitsUnavailable { retry_after: Duration::from_secs(1) }, "limits_unavailable"),
            (AuthError::Misconfigured("x"), "misconfigured"),
        ];
        for (err, code) in &cases {
            assert_eq!(err.code(), *code, "{err:?}");
            let body: serde_json::Value = serde_json::from_slice(&err.problem_json()).unwrap();
            assert_eq!(body["code"], *code);
        }
        // A verifier's "expired" is told as expiry, never as a generic invalid key.
        assert_eq!(AuthError::refused(Reason::Expired).code(), "expired_key");
    }

    #[test]
    fn realm_is_quoted() {
        let v = AuthError::MissingCredentials.www_authenticate("Bearer", "a\"b\\c\n").unwrap();
        assert_eq!(v, "Bearer realm=\"a\\\"b\\\\c\"");
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(grpc_percent_encode("a%b é"), "a%25b %C3%A9");
    }
}
