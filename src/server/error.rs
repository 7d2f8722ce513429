//! Errors: [`ApiError`] renders every refusal of the HTTP API as
//! `{"error": code, "message": ...}`; [`ServerError`] is what starting a server can fail with.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use super::store::StoreError;

/// A refusal of the HTTP API, rendered as JSON `{"error": code, "message": ...}`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400: the request is malformed or fails validation.
    #[error("{message}")]
    Invalid {
        /// Machine-readable code (`invalid_json`, `invalid_scope`, ...).
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// 401: missing or wrong bearer token.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 404: no such key, role or route.
    #[error("{0}")]
    NotFound(String),
    /// 409: the request conflicts with the key's state (for example, it is revoked).
    #[error("{0}")]
    Conflict(String),
    /// 405: the route exists but does not accept the method; axum adds `Allow` with the
    /// route's methods.
    #[error("this route does not accept that method; `Allow` lists the ones it does")]
    MethodNotAllowed,
    /// 413: the body is larger than the route accepts.
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    /// 503: the store cannot be reached.
    #[error("the store is unavailable")]
    Unavailable,
    /// 500: anything else; the details go to the log, not to the client.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// A 400 with `code` and `message`.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { code, message: message.into() }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error` code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { code, .. } => code,
            Self::Unauthorized(_) => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TooLarge(_) => "payload_too_large",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = crate::wire::ErrorBody { error: self.code().to_owned(), message: self.to_string() };
        let mut res = (self.status(), axum::Json(body)).into_response();
        if matches!(self, Self::Unauthorized(_)) {
            res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"keygate\""));
        }
        res
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => Self::NotFound(what),
            StoreError::Conflict(what) => Self::Conflict(what),
            StoreError::Unavailable(err) => {
                tracing::error!(error = %err, "store unavailable");
                Self::Unavailable
            }
            other => {
                tracing::error!(error = %other, "store error");
                Self::Internal
            }
        }
    }
}

/// Why a [`KeyServer`](super::KeyServer) could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The database URL is not one this build supports.
    #[error("unsupported database URL `{0}` (expected sqlite:..., or postgres://... with feature `postgres`)")]
    UnsupportedDatabase(String),
    /// Opening or migrating the store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A configuration value is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// A persistent database holds no active admin token and none is configured:
    /// nobody could administer the service.
    #[error(
        "no admin token: the database holds no active admin token and none is configured. Create one with \
         `keygate-server tokens create --kind admin --name ops --database <url>` (it prints the token once), or \
         configure one with KEYGATE_ADMIN_TOKEN or --admin-token-file (at least 32 characters)"
    )]
    NoAdminToken,
}
