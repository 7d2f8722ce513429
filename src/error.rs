//! Rejections: every way keygate says no, rendered for HTTP or gRPC.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::body::RejectionBody;
use crate::context::Outcome;
use crate::key::FormatError;
use crate::verify::Reason;

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
/// | case | HTTP | `WWW-Authenticate` | gRPC |
/// | --- | --- | --- | --- |
/// | no key | 401 | `Bearer realm="…"` | 16 UNAUTHENTICATED |
/// | malformed, unknown, revoked, disabled | 401 | `…, error="invalid_token"` | 16 |
/// | expired | 401 | `…, error="invalid_token", error_description="key expired"` | 16 |
/// | conflicting keys | 400 | `…, error="invalid_request"` | 3 INVALID_ARGUMENT |
/// | missing scope or role | 403 | `…, error="insufficient_scope", scope="…"` (no `scope` when only roles would do) | 7 PERMISSION_DENIED |
/// | key service unavailable | 503 + `Retry-After` | none | 14 UNAVAILABLE |
/// | rate limited | 429 + `Retry-After` | none | 8 RESOURCE_EXHAUSTED |
///
/// HTTP bodies are `application/problem+json` (RFC 9457). Unknown, revoked, disabled
/// and malformed keys get byte-identical responses so that nobody can learn which
/// keys exist; the precise reason goes to the log and the usage event only.
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
    /// The key service could not answer.
    #[error("the key service is unavailable")]
    Unavailable {
        /// Suggested wait.
        retry_after: Duration,
    },
    /// The key's rate limit is exhausted.
    #[error("rate limit exceeded")]
    RateLimited {
        /// When the limit resets.
        retry_after: Duration,
    },
    /// keygate is configured wrongly (for example `RequireScopes` without `ApiKeyLayer`).
    #[error("server misconfiguration: {0}")]
    Misconfigured(&'static str),
}

impl AuthError {
    /// The HTTP status for this rejection.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingCredentials | Self::InvalidKey(_) | Self::Expired => StatusCode::UNAUTHORIZED,
            Self::ConflictingCredentials(_) => StatusCode::BAD_REQUEST,
            Self::InsufficientScope { .. } => StatusCode::FORBIDDEN,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
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
            Self::Unavailable { .. } => Outcome::Unavailable,
            Self::RateLimited { .. } => Outcome::RateLimited,
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
            Self::Unavailable { .. } => "the key service is unavailable; retry later".into(),
            Self::RateLimited { .. } => "the API key's rate limit is exhausted; retry later".into(),
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
            Self::Unavailable { .. } => "Key service unavailable",
            Self::RateLimited { .. } => "Rate limit exceeded",
            Self::Misconfigured(_) => "Authentication misconfigured",
        }
    }

    /// The `WWW-Authenticate` value, if this case has one.
    pub fn www_authenticate(&self, realm: &str) -> Option<String> {
        let base = format!("Bearer realm=\"{}\"", quote(realm));
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
        });
        if let Self::InsufficientScope { scopes, roles, .. } = self {
            body["required_scopes"] = serde_json::json!(scopes);
            body["required_roles"] = serde_json::json!(roles);
        }
        Bytes::from(body.to_string())
    }

    /// Renders as an HTTP response (problem+json, `WWW-Authenticate`, `Retry-After`).
    pub fn to_http_response<B: RejectionBody>(&self, realm: &str) -> Response<B> {
        let mut res = Response::new(B::rejection(self.problem_json()));
        *res.status_mut() = self.status();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(v) = self.www_authenticate(realm).and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
        if let Some(after) = self.retry_after() {
            h.insert(header::RETRY_AFTER, retry_after_value(after));
        }
        res
    }

    /// Renders as a gRPC trailers-only response (HTTP 200, `grpc-status`, `grpc-message`).
    pub fn to_grpc_response<B: RejectionBody>(&self) -> Response<B> {
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
        res
    }

    /// Renders for the protocol of the request: gRPC when its `content-type` starts
    /// with `application/grpc`, HTTP otherwise.
    pub fn to_response<B: RejectionBody>(&self, realm: &str, grpc: bool) -> Response<B> {
        if grpc { self.to_grpc_response() } else { self.to_http_response(realm) }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after } | Self::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for AuthError {
    /// Renders as HTTP with the realm `api`.
    fn into_response(self) -> axum::response::Response {
        self.to_http_response(crate::context::DEFAULT_REALM)
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
        assert_eq!(a.www_authenticate("x"), c.www_authenticate("x"));
    }

    #[test]
    fn realm_is_quoted() {
        let v = AuthError::MissingCredentials.www_authenticate("a\"b\\c\n").unwrap();
        assert_eq!(v, "Bearer realm=\"a\\\"b\\\\c\"");
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(grpc_percent_encode("a%b é"), "a%25b %C3%A9");
    }
}
