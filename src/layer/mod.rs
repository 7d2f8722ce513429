//! [`ApiKeyLayer`]: authenticate every request with an API key.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Response};
use tower_layer::Layer;

use crate::authorize::RequireScopes;
use crate::cost::Cost;
use crate::error::{AuthError, Rejections};
use crate::extract::{DEFAULT_MAX_KEY_LEN, KeySource};
use crate::key::KeyFormat;
use crate::meter::{LimitEngine, LocalEngine};
use crate::usage::UsageSink;
use crate::verify::Verifier;

mod client_ip;
mod record;
mod service;

use client_ip::ClientIp;

pub use service::{ApiKeyService, ResponseFuture};

/// `Retry-After` for 503 answers unless [`ApiKeyLayer::retry_after`] says otherwise.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Config {
    sources: Vec<KeySource>,
    format: KeyFormat,
    max_key_len: usize,
    optional: bool,
    keep_credentials: bool,
    // Shared with every request the layer lets through, for the answers made behind it.
    rejections: Arc<Rejections>,
    retry_after: Duration,
    usage: Option<Arc<dyn UsageSink>>,
    client_ip: ClientIp,
    // Shared by every route the layer is applied to: a key's limits are per process
    // (with the local engine), not per route.
    engine: Option<Arc<dyn LimitEngine>>,
    /// What a request costs unless its route (or the layer's policy) says otherwise.
    cost: Cost,
    policy: Option<RequireScopes>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("sources", &self.sources)
            .field("format", &self.format)
            .field("max_key_len", &self.max_key_len)
            .field("optional", &self.optional)
            .field("keep_credentials", &self.keep_credentials)
            .field("rejections", &self.rejections)
            .field("retry_after", &self.retry_after)
            .field("usage", &self.usage.is_some())
            .field("client_ip", &self.client_ip)
            .field("rate_limits", &self.engine.is_some())
            .field("cost", &self.cost)
            .field("policy", &self.policy)
            .finish()
    }
}

struct Shared<V> {
    verifier: Arc<V>,
    config: Config,
}

/// Authenticates every request with an API key.
///
/// Defaults: sources Bearer then `x-api-key`; keygate key format with any prefix;
/// keys up to 256 bytes; a key is required; credentials are stripped; realm `api`;
/// `Retry-After: 5` on 503; per-key rate limits enforced; no usage sink.
///
/// ```no_run
/// use axum::{Router, routing::get};
/// use keygate::{ApiKey, ApiKeyLayer, Principal, RequireScopes, ScopeSet, StaticVerifier};
///
/// # async fn run() {
/// let key = ApiKey::generate("kg").unwrap();
/// let verifier = StaticVerifier::new().with_key(
///     &key,
///     Principal::builder("key_1").owner("acme").scopes(ScopeSet::parse(["reports:read"]).unwrap()).build(),
/// );
///
/// let app = Router::new()
///     .route("/reports", get(|p: Principal| async move { format!("hello {}", p.owner()) }))
///     .route_layer(RequireScopes::all(["reports:read"]))
///     .layer(ApiKeyLayer::new(verifier));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// axum::serve(listener, app).await.unwrap();
/// # }
/// ```
///
/// # What happens to a request
/// 1. The key is looked for in every configured [`KeySource`] (default: Bearer, then
///    `x-api-key`). None: 401, unless the layer is [`optional`](ApiKeyLayer::optional).
///    Two credentials anywhere: 400. Empty, over [`max_key_len`](ApiKeyLayer::max_key_len)
///    or non-visible-ASCII: 401. No verifier call in any of these cases.
/// 2. The key is checked against the [`KeyFormat`] (prefix, length, checksum): a key
///    that fails is a 401 with no verifier call.
/// 3. The credential is removed from the request (header, query parameter or cookie)
///    unless [`keep_credentials`](ApiKeyLayer::keep_credentials) is set.
/// 4. The [`Verifier`] decides: valid keys put a [`Principal`](crate::Principal) into the request's
///    extensions; invalid keys are 401; a verifier error is 503 with `Retry-After`, and
///    a [`CachedVerifier`](crate::CachedVerifier) whose [`MissBudget`](crate::MissBudget)
///    is spent is 429 with `Retry-After`.
/// 5. When the response head is ready (or the layer refused), the decided request goes to
///    the usage sink as a [`DecidedRequest`](crate::DecidedRequest).
///
/// # HEAD, OPTIONS and CORS
/// Every method is authenticated, HEAD and OPTIONS included: keygate never guesses that
/// a request is harmless. A CORS preflight carries no credentials, so put tower-http's
/// `CorsLayer` *outside* keygate (added after it with `Router::layer`, so it runs first)
/// to answer preflights before authentication.
///
/// # gRPC
/// Requests whose `content-type` starts with `application/grpc` are answered in gRPC
/// terms: HTTP 200, trailers-only, `grpc-status` 16/3/7/14/8 and a percent-encoded
/// `grpc-message`. The same layer works in `tonic::transport::Server::builder().layer(..)`.
#[must_use]
pub struct ApiKeyLayer<V> {
    // Built once: axum may call `layer` for every request on routes whose handlers
    // are turned into services late, so `layer` must be an Arc clone and nothing more.
    shared: Arc<Shared<V>>,
}

impl<V> Clone for ApiKeyLayer<V> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

impl<V: Verifier> ApiKeyLayer<V> {
    /// A layer that asks `verifier` about every well-formed key.
    pub fn new(verifier: V) -> Self {
        Self::from_arc(Arc::new(verifier))
    }

    /// Like [`new`](ApiKeyLayer::new), sharing a verifier the caller keeps too (to
    /// invalidate its cache, read its counters, or revoke static keys).
    pub fn from_arc(verifier: Arc<V>) -> Self {
        let config = Config {
            sources: KeySource::defaults(),
            format: KeyFormat::default(),
            max_key_len: DEFAULT_MAX_KEY_LEN,
            optional: false,
            keep_credentials: false,
            rejections: Arc::new(Rejections::default()),
            retry_after: DEFAULT_RETRY_AFTER,
            usage: None,
            client_ip: ClientIp::None,
            engine: Some(Arc::new(LocalEngine::default())),
            cost: Cost::new(),
            policy: None,
        };
        Self { shared: Arc::new(Shared { verifier, config }) }
    }

    /// The configuration, copied first if a clone of this layer shares it.
    fn config_mut(&mut self) -> &mut Config {
        if Arc::get_mut(&mut self.shared).is_none() {
            let copy = Shared { verifier: self.shared.verifier.clone(), config: self.shared.config.clone() };
            self.shared = Arc::new(copy);
        }
        &mut Arc::get_mut(&mut self.shared).expect("just made unique").config
    }

    /// Where to look for the key, in order. Panics on an empty list (a configuration
    /// error: nothing could ever authenticate).
    pub fn sources(mut self, sources: impl IntoIterator<Item = KeySource>) -> Self {
        let config = self.config_mut();
        config.sources = sources.into_iter().collect();
        assert!(!config.sources.is_empty(), "ApiKeyLayer::sources: at least one source is needed");
        // Challenge with the scheme the client can actually use: Bearer if it is read,
        // else the first other `Authorization` scheme.
        let scheme = if config.sources.contains(&KeySource::Bearer) {
            "Bearer"
        } else {
            config.sources.iter().find_map(KeySource::challenge_scheme).unwrap_or("Bearer")
        };
        Arc::make_mut(&mut config.rejections).scheme = Arc::from(scheme);
        self
    }

    /// The local format check (default: keygate keys with any prefix).
    pub fn format(mut self, format: KeyFormat) -> Self {
        self.config_mut().format = format;
        self
    }

    /// Longest key accepted, in bytes (default 256). Longer keys are 401 before hashing.
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.config_mut().max_key_len = bytes;
        self
    }

    /// Let requests without any key through with no principal (handlers take
    /// `Option<Principal>`). A key that is present but bad is still rejected.
    pub fn optional(mut self) -> Self {
        self.config_mut().optional = true;
        self
    }

    /// Keep the credential in the request for the inner service (default `false`:
    /// handlers and their logs never see a key).
    pub fn keep_credentials(mut self, keep: bool) -> Self {
        self.config_mut().keep_credentials = keep;
        self
    }

    /// The realm in `WWW-Authenticate` (default `api`).
    pub fn realm(mut self, realm: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.config_mut().rejections).realm = Arc::from(realm.into());
        self
    }

    /// Answer rejections with the service's own responses: `render` gets the
    /// [`AuthError`] (its [`code()`](AuthError::code) tells the cases apart) and returns
    /// status, headers and body; keygate writes them in the inner service's body type.
    ///
    /// It answers every rejection made by this layer and by the [`RequireScopes`]
    /// policies and [`Principal`](crate::Principal) extractors behind it. What keygate
    /// adds when `render` leaves it out:
    /// - `WWW-Authenticate` on a 401 or 403 whose case has a challenge (RFC 9110 requires
    ///   it on 401), with this layer's scheme and realm;
    /// - `Retry-After` on a 429 or 503 whose case has a wait;
    /// - `Cache-Control: no-store`;
    /// - the `AuthError` in the response's extensions.
    ///
    /// A header `render` sets is never replaced, and nothing else is added: no
    /// `Content-Type` is guessed. The status is `render`'s, even one that is not an
    /// error; usage records keep the real outcome whatever status is sent.
    ///
    /// gRPC requests keep keygate's answer (HTTP 200, trailers-only, `grpc-status` and
    /// `grpc-message` from the table on [`AuthError`]): a gRPC client reads nothing
    /// else. `render` is still called, and the headers it returns are sent as extra
    /// metadata, except `content-type`, `content-length`, `transfer-encoding` and the
    /// `grpc-*` fields keygate owns; its status and body are dropped.
    ///
    /// `render` runs on the request path for every rejection: keep it quick, and never
    /// put request data it did not validate into the response.
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use bytes::Bytes;
    /// use http::{Response, header};
    /// use keygate::{ApiKeyLayer, AuthError, StaticVerifier};
    ///
    /// fn our_error(err: &AuthError) -> Response<Bytes> {
    ///     let body = serde_json::json!({ "error": { "code": err.code(), "message": err.public_detail() } });
    ///     Response::builder()
    ///         .status(err.status())
    ///         .header(header::CONTENT_TYPE, "application/json")
    ///         .body(Bytes::from(body.to_string()))
    ///         .unwrap()
    /// }
    ///
    /// let app: Router = Router::new()
    ///     .route("/reports", get(|| async { "reports" }))
    ///     .layer(ApiKeyLayer::new(StaticVerifier::new()).on_rejection(our_error));
    /// ```
    pub fn on_rejection<F>(mut self, render: F) -> Self
    where
        F: Fn(&AuthError) -> Response<Bytes> + Send + Sync + 'static,
    {
        Arc::make_mut(&mut self.config_mut().rejections).hook = Some(Arc::new(render));
        self
    }

    /// `Retry-After` on 503 answers (default 5 s).
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.config_mut().retry_after = after;
        self
    }

    /// Enforce the limits and credits a key's principal carries, its own and its
    /// owner's (default `true`): 429 `rate_limited` with `Retry-After` once a limit is
    /// exhausted, 429 `usage_exceeded` once credits are spent (with `Retry-After` until
    /// the next refill, when they have one); gRPC `RESOURCE_EXHAUSTED` for both. What a
    /// request draws is its route's [`Cost`] (default [`Cost::new`]: 1 from `requests`,
    /// 1 credit). A key with no limits and no credits costs one branch, nothing more.
    ///
    /// Everything is counted **per process** (for one count shared by every instance,
    /// see `fleet_limits`, feature `redis`):
    /// - each named limit with GCRA per key (an owner's limits per owner): a key may
    ///   spend `burst` (default `limit`) at once, then one unit every `period / limit`;
    ///   with N replicas of a service a key can make up to N × `limit` per period;
    /// - credits as a counter per key (and per owner) that starts from the verify
    ///   answer's `remaining`, and is set to the refill amount at each refill time (the
    ///   same UTC times in every process). Each process counts on its own: with N
    ///   replicas a key can spend up to N × its credits. A counter starts again from the
    ///   answer's `remaining` when the key service states other credits.
    ///
    /// Up to 100 000 keys (and as many owners) are tracked at once; past that, idle
    /// ones are forgotten first, and a new one that still finds no room is not limited
    /// (and a warning is logged). `false` turns all of it off, route costs included.
    pub fn rate_limits(mut self, enforce: bool) -> Self {
        self.config_mut().engine = enforce.then(|| Arc::new(LocalEngine::default()) as Arc<dyn LimitEngine>);
        self
    }

    /// Enforce limits and credits fleet-wide on Redis instead of per process: every
    /// instance with the same [`RedisLimits`](crate::RedisLimits) (same Redis, same
    /// prefix) shares one count per key and limit, with no Redis round trip on the
    /// request path while a lease lasts. Route costs and the answers (429
    /// `rate_limited`, 429 `usage_exceeded`) are as with [`rate_limits`](Self::rate_limits);
    /// a limit whose Redis-down policy fails closed answers 503 `limits_unavailable`.
    ///
    /// ```no_run
    /// use keygate::{ApiKeyLayer, RedisLimits, StaticVerifier};
    ///
    /// # async fn demo() -> Result<(), keygate::RedisLimitsError> {
    /// let limits = RedisLimits::builder("redis://127.0.0.1:6379").expected_instances(3).build()?;
    /// let layer = ApiKeyLayer::new(StaticVerifier::new()).fleet_limits(limits.clone());
    /// // ... serve, then give back what this instance holds:
    /// limits.shutdown().await;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn fleet_limits(mut self, limits: crate::RedisLimits) -> Self {
        self.config_mut().engine = Some(limits.into_engine());
        self
    }

    /// What a request costs unless its route says otherwise (default [`Cost::new`]: 1
    /// from `requests`, 1 credit). A route says otherwise with a [`Cost`] route layer or
    /// a [`RequireScopes`] cost; this layer's own policy's cost
    /// ([`require`](Self::require)) is charged instead of this one.
    pub fn cost(mut self, cost: Cost) -> Self {
        self.config_mut().cost = cost;
        self
    }

    /// Tell clients where their key stands (default `true`): responses for keys that
    /// carry a rate limit, allowed ones and 429s alike, get the IETF fields of
    /// draft-ietf-httpapi-ratelimit-headers in their structured-field form:
    ///
    /// ```text
    /// RateLimit-Policy: "requests";q=100;w=60
    /// RateLimit: "requests";r=99;t=1
    /// ```
    ///
    /// The fields name the binding limit (`requests` here): on a 429 the one that
    /// refused, otherwise the one the request drew from with the least left.
    /// `q` and `w` are its limit and period in seconds; `r` is how many units the key
    /// could still spend at once; `t` the seconds (rounded up) until the next unit
    /// comes back, on a 429 the same wait as `Retry-After`.
    /// The limit replenishes continuously (GCRA), one request every `w / q` seconds.
    /// A field the inner service or an [`on_rejection`](Self::on_rejection) hook set
    /// is left alone. Turn them off when a key's limit is nobody else's business.
    pub fn rate_limit_headers(mut self, send: bool) -> Self {
        Arc::make_mut(&mut self.config_mut().rejections).ratelimit_fields = send;
        self
    }

    /// Also enforce `policy` in this layer, as a [`RequireScopes`] right behind it would:
    /// one layer per route instead of two.
    ///
    /// This is the cheapest way to protect a route: axum adds a boxed future and a
    /// service clone for every layer a request passes. Keep one layer for the router
    /// and [`RequireScopes`] per route when the routes share a layer; use this when
    /// each route gets its own:
    ///
    /// ```
    /// use axum::{Router, routing::get};
    /// use keygate::{ApiKeyLayer, RequireScopes, StaticVerifier};
    ///
    /// let auth = ApiKeyLayer::new(StaticVerifier::new());
    /// let app: Router = Router::new()
    ///     .route("/reports", get(|| async { "reports" }).layer(auth.clone().require(RequireScopes::all(["reports:read"]))))
    ///     .route("/admin", get(|| async { "admin" }).layer(auth.require(RequireScopes::role("admin"))));
    /// ```
    pub fn require(mut self, policy: RequireScopes) -> Self {
        self.config_mut().policy = Some(policy);
        self
    }

    /// Hand every decided request to `sink`: a [`UsageAggregator`](crate::UsageAggregator)
    /// for the key service, a [`UsagePipeline`](crate::UsagePipeline) for raw events, or
    /// both as a pair `(a, b)`. Calling it again replaces the sink.
    pub fn usage(mut self, sink: impl UsageSink) -> Self {
        self.config_mut().usage = Some(Arc::new(sink));
        self
    }

    /// Take usage events' client IP from the peer address (axum's `ConnectInfo`).
    pub fn client_ip_from_peer(mut self) -> Self {
        self.config_mut().client_ip = ClientIp::Peer;
        self
    }

    /// Take usage events' client IP from a header set by a proxy you trust (the last
    /// address in it, the one that proxy added). Panics on an invalid header name.
    pub fn client_ip_from_header(mut self, name: &str) -> Self {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("client_ip_from_header: invalid header name");
        self.config_mut().client_ip = ClientIp::Header(name);
        self
    }

    /// Believe forwarded addresses from peers in these networks (IPv4 and IPv6 CIDRs,
    /// `10.0.0.0/8`, `2001:db8::/32`, or single addresses): the request's client is the
    /// peer address, or, when the peer is one of these proxies, the rightmost address in
    /// `Forwarded` (or, without it, `X-Forwarded-For`) that is not; never the leftmost
    /// entry on its own word, which the client may have written itself. Network
    /// allowlists, the miss budget and usage events use that address. Default: no
    /// proxy is trusted, the peer address counts and forwarding headers are ignored.
    /// Panics on a network that does not parse.
    pub fn trusted_proxies<I, S>(mut self, networks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let networks: Arc<[ipnet::IpNet]> = networks
            .into_iter()
            .map(|n| {
                let n = n.as_ref();
                n.parse::<ipnet::IpNet>()
                    .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .unwrap_or_else(|_| panic!("trusted_proxies: `{n}` is not a network (203.0.113.0/24) or address"))
            })
            .collect();
        self.config_mut().client_ip = ClientIp::TrustedProxies(networks);
        self
    }

    /// The verifier this layer asks.
    pub fn verifier(&self) -> &Arc<V> {
        &self.shared.verifier
    }
}

impl<V> std::fmt::Debug for ApiKeyLayer<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyLayer")
            .field("verifier", &std::any::type_name::<V>())
            .field("config", &self.shared.config)
            .finish()
    }
}

impl<S, V: Verifier> Layer<S> for ApiKeyLayer<V> {
    type Service = ApiKeyService<S, V>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiKeyService::new(inner, self.shared.clone())
    }
}
