//! The console's changes and reads go through the admin API's own handlers, called in
//! process with the session's token: the same validation, the same store calls, the
//! same audit records (actor: the token's name) and change events as over HTTP.

use axum::body::Body;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tower_service::Service;
use zeroize::Zeroizing;

use super::Console;
use crate::server::state::ServerState;
use crate::server::token::TokenKind;

/// Largest API answer the console reads: 8 MiB (1 000 keys fit many times over).
const ANSWER_LIMIT: usize = 8 * 1024 * 1024;

/// The request as the API would see it, with `token` as its bearer token.
fn bearer(token: &str) -> Option<Zeroizing<String>> {
    let value = Zeroizing::new(format!("Bearer {token}"));
    // A token with bytes a header cannot hold is no token of ours.
    http::HeaderValue::from_str(&value).ok().map(|_| value)
}

/// The name of the active admin token `token`, if it is one.
pub(crate) fn admin_token_name(server: &ServerState, token: &str) -> Option<String> {
    let value = bearer(token)?;
    let (parts, ()) = http::Request::builder().header(AUTHORIZATION, value.as_str()).body(()).ok()?.into_parts();
    server.inner.tokens.authenticate(&parts, TokenKind::Admin).ok().map(|entry| entry.info().name)
}

/// What the API refused, for the page.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl Refused {
    fn internal() -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "the key service could not answer; try again".into(),
        }
    }

    /// The request field the message is about (``"`owner` must not be empty"``,
    /// `"scopes[2]: ..."`), if it names one.
    pub(crate) fn field(&self) -> Option<&str> {
        let m = self.message.as_str();
        if let Some(rest) = m.strip_prefix('`') {
            return rest.split('`').next();
        }
        let end = m.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
        (end > 0 && m[end..].starts_with('[')).then(|| &m[..end])
    }
}

impl Console {
    /// `method path` of the admin API with `token`, the JSON `body` if any: its answer,
    /// or what it refused.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, Refused> {
        let auth = bearer(token)
            .ok_or_else(|| Refused { status: StatusCode::UNAUTHORIZED, message: "invalid token".into() })?;
        let mut req = http::Request::builder().method(method).uri(path).header(AUTHORIZATION, auth.as_str());
        let body = match body {
            Some(v) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(v).map_err(|_| Refused::internal())?)
            }
            None => Body::empty(),
        };
        let req = req.body(body).map_err(|_| Refused::internal())?;
        // `Router` is always ready: no `poll_ready` needed.
        let res = self.api.clone().call(req).await.map_err(|e| match e {})?;
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), ANSWER_LIMIT).await.map_err(|_| Refused::internal())?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                tracing::error!(error = %e, "the console cannot read an answer of the admin API");
                Refused::internal()
            });
        }
        let err: crate::wire::ErrorBody = serde_json::from_slice(&bytes).map_err(|_| Refused::internal())?;
        Err(Refused { status, message: err.message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(message: &str) -> Refused {
        Refused { status: StatusCode::BAD_REQUEST, message: message.into() }
    }

    #[test]
    fn the_field_a_message_is_about() {
        assert_eq!(refused("`owner` must not be empty").field(), Some("owner"));
        assert_eq!(refused("scopes[2]: not a scope").field(), Some("scopes"));
        assert_eq!(refused("no key with id `x`").field(), None);
    }
}
