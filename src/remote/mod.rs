//! What the three clients of the key service share: the list of its URLs with failover
//! and cooldown, the service-token header, the settings every client builder takes and
//! one backoff (the HTTP client itself, rustls with timeouts and no redirects, and
//! bounded answer bodies are `transport`'s, which the admin client uses too).
//! `setup` ([`RemoteAuth`]) builds the three and the cache and usage aggregator they
//! serve from one URL list and one token.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;

use zeroize::Zeroizing;

mod endpoints;
mod exporter;
mod listener;
mod setup;
mod token_file;
mod verifier;

#[cfg(fuzzing)]
pub(crate) use listener::{EventBound, PARSER_START};

pub(crate) use crate::transport::{Cause, ClientOptions, ReadError, describe, http_client, read_body};
pub(crate) use endpoints::{Endpoint, Endpoints, KeyServiceUrls};
pub(crate) use token_file::{Auth, Ticket};
pub use token_file::{DEFAULT_TOKEN_FILE_POLL, MAX_TOKEN_FILE_BYTES};

pub use exporter::{HttpExporterBuildError, HttpUsageExporter, HttpUsageExporterBuilder};
pub use listener::{
    DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_MAX_LINE_BYTES, ListenerStats, RevocationListener, RevocationListenerBuilder,
};
pub use setup::{RemoteAuth, RemoteAuthBuilder};
pub use verifier::{DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_VERIFY_TIMEOUT, HttpVerifier, HttpVerifierBuilder};

/// Default connect timeout of every key-service client: 500 ms.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default time a key-service URL that refused a connection is tried last: 2 s.
pub const DEFAULT_FAILOVER_COOLDOWN: Duration = Duration::from_secs(2);
/// Default first retry or reconnect delay bound: 100 ms.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Default largest retry or reconnect delay bound: 5 s.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Most key-service URLs one client takes (a bit set tracks which were tried).
pub(crate) const MAX_URLS: usize = 64;

/// Why a client of the key service could not be built.
#[derive(Debug, Clone, thiserror::Error)]
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
    #[error("a service token is required (`.service_token(...)` or `.service_token_file(...)` on the builder)")]
    MissingServiceToken,
    /// The service token file cannot be read or holds no token. The contents are
    /// never repeated.
    #[error("the service token file {} cannot be used: {reason}", path.display())]
    TokenFile {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The service token is empty or has characters a header cannot carry.
    #[error("the service token must be non-empty visible ASCII")]
    InvalidServiceToken,
    /// The HTTP client could not be built.
    #[error("the HTTP client could not be built")]
    Client(#[source] Arc<reqwest::Error>),
    /// A background task was asked for outside a Tokio runtime.
    #[error("must be called from within a Tokio runtime")]
    NoRuntime,
    /// A setting that must be greater than zero was zero (one of the usage
    /// aggregator's or the usage exporter's, named here).
    #[error("setting `{0}` must be greater than zero")]
    Zero(&'static str),
}

impl PartialEq for RemoteConfigError {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::InvalidUrl { index: a, reason: r }, Self::InvalidUrl { index: b, reason: s }) => a == b && r == s,
            (Self::Client(a), Self::Client(b)) => Arc::ptr_eq(a, b),
            (Self::Zero(a), Self::Zero(b)) => a == b,
            (Self::TokenFile { path: a, reason: r }, Self::TokenFile { path: b, reason: s }) => a == b && r == s,
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

impl Eq for RemoteConfigError {}

/// `Bearer <token>` as a header value marked sensitive (hyper never logs it, HTTP/2
/// never indexes it).
pub(crate) fn service_token_header(token: Option<&str>) -> Result<HeaderValue, RemoteConfigError> {
    let token = token.ok_or(RemoteConfigError::MissingServiceToken)?;
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(RemoteConfigError::InvalidServiceToken);
    }
    let value = Zeroizing::new(format!("Bearer {token}"));
    let mut header = HeaderValue::from_str(&value).map_err(|_| RemoteConfigError::InvalidServiceToken)?;
    header.set_sensitive(true);
    Ok(header)
}

/// Whether `response` came from where it was sent: a caller-supplied client might
/// follow redirects, and an answer from elsewhere must not be trusted.
pub(crate) fn answered_by(response: &reqwest::Response, endpoint: &Endpoint) -> bool {
    response.url() == &endpoint.url
}

/// Exponential backoff with jitter: uniform in `[cap / 2, cap]` where
/// `cap = min(max, initial × 2^failures)`, so that clients that failed together do not
/// retry together, while a retry never comes sooner than half its bound (a key service
/// that is down is not hammered by the unlucky draws of full jitter).
pub(crate) fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    let cap = initial.saturating_mul(1u32 << failures.min(20)).min(max);
    let half = cap / 2;
    let spread = u64::try_from((cap - half).as_micros()).unwrap_or(u64::MAX);
    let random = getrandom::u64().unwrap_or_else(|_| u64::from(Instant::now().elapsed().subsec_nanos()));
    half + Duration::from_micros(random % spread.saturating_add(1))
}

/// The setters every key-service client builder shares, documented once. The builder
/// must have a `remote: RemoteSettings` field.
macro_rules! remote_builder_methods {
    () => {
        /// The token this client presents to the key service (this or
        /// [`service_token_file`](Self::service_token_file) is required; the later call
        /// wins). It is sent as a sensitive header and never shown by `Debug`.
        pub fn service_token(mut self, token: impl Into<String>) -> Self {
            self.remote.token = Some(zeroize::Zeroizing::new(token.into()));
            self.remote.token_file = None;
            self
        }

        /// Reads the service token from a file (a Kubernetes or Vault secret), instead of
        /// [`service_token`](Self::service_token): at most 4 KiB, surrounding whitespace
        /// (the trailing newline) trimmed. The file must hold a token when the client is
        /// built. It is read again at most every 5 s by default
        /// ([`service_token_file_poll`](Self::service_token_file_poll)) and at once when
        /// the key service answers 401, after which the request is sent again, once, if
        /// the file holds another token. So a rotation that makes the new token valid,
        /// rewrites the file, then revokes the old token costs no failed request. A read
        /// that fails, or finds the file empty, keeps the token read before (logged
        /// once, at `warn`, with the path and never the contents).
        pub fn service_token_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
            self.remote.token_file = Some(path.into());
            self.remote.token = None;
            self
        }

        /// How often the [`service_token_file`](Self::service_token_file) is read again
        /// on the request path (default 5 s); a 401 reads it at once in any case.
        pub fn service_token_file_poll(mut self, interval: std::time::Duration) -> Self {
            self.remote.token_file_poll = interval;
            self
        }

        /// How long establishing a connection may take (default 500 ms). A connection
        /// that cannot be made in time moves the call to the next URL.
        pub fn connect_timeout(mut self, timeout: std::time::Duration) -> Self {
            self.remote.connect_timeout = timeout;
            self
        }

        /// With several URLs: how long one that refused a connection is tried only after
        /// the others (default 2 s).
        pub fn failover_cooldown(mut self, cooldown: std::time::Duration) -> Self {
            self.remote.failover_cooldown = cooldown;
            self
        }

        /// Uses this reqwest client (custom TLS roots, proxies, a shared pool) instead of
        /// building one. Its connect timeout is then its own. Give it
        /// `redirect(Policy::none())`: an answer that comes from another URL than the
        /// one asked is refused, but a client that follows redirects has already sent
        /// the request there.
        pub fn client(mut self, client: reqwest::Client) -> Self {
            self.remote.client = Some(client);
            self
        }
    };
}
pub(crate) use remote_builder_methods;

/// What every client builder holds: URLs, token, connection settings.
pub(crate) struct RemoteSettings {
    pub(crate) urls: Vec<String>,
    pub(crate) token: Option<Zeroizing<String>>,
    pub(crate) token_file: Option<std::path::PathBuf>,
    pub(crate) token_file_poll: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) failover_cooldown: Duration,
    pub(crate) client: Option<reqwest::Client>,
}

impl fmt::Debug for RemoteSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteSettings")
            .field("urls", &self.urls.len())
            .field("service_token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("service_token_file", &self.token_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("failover_cooldown", &self.failover_cooldown)
            .field("client", &self.client.as_ref().map(|_| "custom"))
            .finish()
    }
}

/// What a client is built from.
pub(crate) struct Remote {
    pub(crate) client: reqwest::Client,
    pub(crate) endpoints: Endpoints,
    pub(crate) auth: Auth,
}

impl Remote {
    /// A request to one of the key service's URLs, carrying the service token, and the
    /// ticket to hand to [`Auth::refused`] if the key service answers 401.
    pub(crate) async fn request(
        &self,
        method: reqwest::Method,
        endpoint: &Endpoint,
    ) -> (reqwest::RequestBuilder, Ticket) {
        self.request_to(method, endpoint.url.clone()).await
    }

    /// [`request`](Self::request) to another URL of the same key service.
    pub(crate) async fn request_to(
        &self,
        method: reqwest::Method,
        url: reqwest::Url,
    ) -> (reqwest::RequestBuilder, Ticket) {
        let (auth, ticket) = self.auth.header().await;
        (self.client.request(method, url).header(http::header::AUTHORIZATION, auth), ticket)
    }
}

impl RemoteSettings {
    pub(crate) fn new(urls: impl KeyServiceUrls) -> Self {
        Self {
            urls: urls.into_urls(),
            token: None,
            token_file: None,
            token_file_poll: DEFAULT_TOKEN_FILE_POLL,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            failover_cooldown: DEFAULT_FAILOVER_COOLDOWN,
            client: None,
        }
    }

    /// Checks URLs and token, and builds the client unless one was given.
    pub(crate) fn build(
        self,
        path: &str,
        timeout: Option<Duration>,
        tcp_keepalive: Option<Duration>,
    ) -> Result<Remote, RemoteConfigError> {
        let endpoints = Endpoints::new(self.urls, path, self.failover_cooldown)?;
        let auth = match self.token_file {
            Some(path) => Auth::File(token_file::TokenFile::open(path, self.token_file_poll)?),
            None => Auth::Fixed(service_token_header(self.token.as_deref().map(String::as_str))?),
        };
        let client = match self.client {
            Some(client) => client,
            None => http_client(ClientOptions { connect_timeout: self.connect_timeout, timeout, tcp_keepalive })
                .map_err(|e| RemoteConfigError::Client(Arc::new(e)))?,
        };
        Ok(Remote { client, endpoints, auth })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let e = Endpoints::new(vec!["http://127.0.0.1:9/base/".into()], "/v1/keys/verify", Duration::ZERO).unwrap();
        assert_eq!(e.get(0).url.as_str(), "http://127.0.0.1:9/base/v1/keys/verify");
        assert_eq!(&*e.get(0).label, "http://127.0.0.1:9/base");
        for bad in ["", "ftp://x", "http://u:p@x", "http://x/?q=1", "not a url"] {
            assert!(Endpoints::new(vec![bad.into()], "/x", Duration::ZERO).is_err(), "{bad}");
        }
        assert_eq!(Endpoints::new(vec![], "/x", Duration::ZERO).unwrap_err(), RemoteConfigError::NoUrl);
        assert!(Endpoints::new(vec!["http://127.0.0.1:1".into(); 65], "/x", Duration::ZERO).is_err());
    }

    #[test]
    fn endpoints_that_refused_are_tried_last() {
        let urls = vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into(), "http://127.0.0.1:3".into()];
        let e = Endpoints::new(urls, "/x", Duration::from_secs(2)).unwrap();
        assert_eq!(e.pick(0, 0), Some(0));
        assert_eq!(e.pick(2, 0), Some(2));
        e.cool_down_forever(0);
        assert_eq!(e.pick(0, 0), Some(1));
        assert_eq!(e.pick(2, 0), Some(2));
        assert_eq!(e.pick(2, 0b100), Some(1));
        assert_eq!(e.pick(1, 0b110), Some(0), "a cooling endpoint is still the last resort");
        assert_eq!(e.pick(0, 0b111), None);
        e.mark_up(0);
        assert_eq!(e.pick(0, 0), Some(0));
        assert!(e.mark_down(1), "first failure");
        assert!(!e.mark_down(1), "already cooling");
    }

    #[test]
    fn tokens_are_checked_and_sensitive() {
        assert!(service_token_header(Some("t0k")).unwrap().is_sensitive());
        for bad in [Some(""), Some("a b"), Some("t\r\nx"), None] {
            assert!(service_token_header(bad).is_err());
        }
    }

    #[test]
    fn backoff_is_bounded() {
        for failures in [0, 1, 5, 40, u32::MAX] {
            assert!(backoff(Duration::from_millis(100), Duration::from_secs(30), failures) <= Duration::from_secs(30));
        }
        for _ in 0..100 {
            let first = backoff(Duration::from_millis(100), Duration::from_secs(30), 0);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100), "{first:?}");
        }
        assert_eq!(backoff(Duration::ZERO, Duration::ZERO, 3), Duration::ZERO);
    }
}
