//! [`ApiKeyLayer`]: authenticate every request with an API key.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use keygate::{ApiKey, ApiKeyLayer, Principal, RequireScopes, ScopeSet, StaticVerifier};
//!
//! # async fn run() {
//! let key = ApiKey::generate("kg").unwrap();
//! let verifier = StaticVerifier::new().with_key(
//!     &key,
//!     Principal::builder("key_1").owner("acme").scopes(ScopeSet::parse(["reports:read"]).unwrap()).build(),
//! );
//!
//! let app = Router::new()
//!     .route("/reports", get(|p: Principal| async move { format!("hello {}", p.owner()) }))
//!     .route_layer(RequireScopes::all(["reports:read"]))
//!     .layer(ApiKeyLayer::new(verifier));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! axum::serve(listener, app).await.unwrap();
//! # }
//! ```
//!
//! # What happens to a request
//! 1. The key is looked for in every configured [`KeySource`] (default: Bearer, then
//!    `x-api-key`). None: 401, unless the layer is [`optional`](ApiKeyLayer::optional).
//!    Two credentials anywhere: 400. Empty, over [`max_key_len`](ApiKeyLayer::max_key_len)
//!    or non-visible-ASCII: 401. No verifier call in any of these cases.
//! 2. The key is checked against the [`KeyFormat`] (prefix, length, checksum): a key
//!    that fails is a 401 with no verifier call.
//! 3. The credential is removed from the request (header, query parameter or cookie)
//!    unless [`keep_credentials`](ApiKeyLayer::keep_credentials) is set.
//! 4. The [`Verifier`] decides: valid keys put a [`Principal`] into the request's
//!    extensions; invalid keys are 401; a verifier error is 503 with `Retry-After`.
//! 5. When the response head is ready, a [`UsageEvent`] goes to the usage sink.
//!
//! # HEAD, OPTIONS and CORS
//! Every method is authenticated, HEAD and OPTIONS included: keygate never guesses that
//! a request is harmless. A CORS preflight carries no credentials, so put tower-http's
//! `CorsLayer` *outside* keygate (added after it with `Router::layer`, so it runs first)
//! to answer preflights before authentication.
//!
//! # gRPC
//! Requests whose `content-type` starts with `application/grpc` are answered in gRPC
//! terms: HTTP 200, trailers-only, `grpc-status` 16/3/7/14/8 and a percent-encoded
//! `grpc-message`. The same layer works in `tonic::transport::Server::builder().layer(..)`.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderName, Request, Response};
use pin_project_lite::pin_project;
use time::OffsetDateTime;
use tower_layer::Layer;
use tower_service::Service;

use crate::authorize::RequireScopes;
use crate::body::RejectionBody;
use crate::clock::{self, Instant};
use crate::error::{AuthError, InvalidKey, is_grpc};
use crate::extract::{DEFAULT_MAX_KEY_LEN, KeySource, find_key, strip_credential};
use crate::key::KeyFormat;
use crate::principal::Principal;
use crate::ratelimit::RateLimiter;
use crate::usage::{Outcome, UsageEvent, UsageSink};
use crate::verify::{Reason, Verdict, Verifier, VerifyError};

/// The realm in `WWW-Authenticate` unless [`ApiKeyLayer::realm`] says otherwise.
pub const DEFAULT_REALM: &str = "api";
/// `Retry-After` for 503 answers unless [`ApiKeyLayer::retry_after`] says otherwise.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest raw path kept as a usage event's route when no route template is known.
pub const MAX_RAW_ROUTE_LEN: usize = 128;

/// Marker in a request's extensions: an [`optional`](ApiKeyLayer::optional) layer let
/// it through without a key. `Option<Principal>` reads it as `None`.
#[derive(Debug, Clone, Copy)]
pub struct Anonymous;

/// In a request's extensions when the layer's realm is not the default, so that
/// [`RequireScopes`](crate::RequireScopes) answers with the same realm.
#[derive(Debug, Clone)]
pub(crate) struct LayerRealm(pub(crate) Arc<str>);

/// In a request's extensions when usage events are on: asks an inner
/// [`RequireScopes`](crate::RequireScopes) to hand back the matched route template.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WantsRoute;

/// The verifier's answer, with the ready service and the request it will take.
type BoxVerify<S, B> = Pin<Box<dyn Future<Output = (Result<Verdict, VerifyError>, S, Request<B>)> + Send>>;

/// Where a usage event's client IP comes from.
#[derive(Debug, Clone, Default)]
enum ClientIp {
    #[default]
    None,
    Peer,
    Header(HeaderName),
}

#[derive(Clone)]
struct Config {
    sources: Vec<KeySource>,
    format: KeyFormat,
    max_key_len: usize,
    optional: bool,
    keep_credentials: bool,
    realm: String,
    realm_ext: Option<LayerRealm>,
    retry_after: Duration,
    usage: Option<Arc<dyn UsageSink>>,
    client_ip: ClientIp,
    // Shared by every route the layer is applied to: a key's limit is per process,
    // not per route.
    rate_limiter: Option<Arc<RateLimiter>>,
    policy: Option<RequireScopes>,
}

struct Shared<V> {
    verifier: Arc<V>,
    config: Config,
}

/// Authenticates every request with an API key; see the [module docs](self).
///
/// Defaults: sources Bearer then `x-api-key`; keygate key format with any prefix;
/// keys up to 256 bytes; a key is required; credentials are stripped; realm `api`;
/// `Retry-After: 5` on 503; no usage sink.
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
            realm: DEFAULT_REALM.to_owned(),
            realm_ext: None,
            retry_after: DEFAULT_RETRY_AFTER,
            usage: None,
            client_ip: ClientIp::None,
            rate_limiter: Some(Arc::new(RateLimiter::default())),
            policy: None,
        };
        clock::warm_up();
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
        let config = self.config_mut();
        config.realm = realm.into();
        config.realm_ext = (config.realm != DEFAULT_REALM).then(|| LayerRealm(Arc::from(config.realm.as_str())));
        self
    }

    /// `Retry-After` on 503 answers (default 5 s).
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.config_mut().retry_after = after;
        self
    }

    /// Enforce the rate limit a key's principal carries (default `true`): 429 with
    /// `Retry-After` once a key exceeds it. Limits are counted per process; see
    /// [`RateLimiter`].
    pub fn rate_limits(mut self, enforce: bool) -> Self {
        self.config_mut().rate_limiter = enforce.then(|| Arc::new(RateLimiter::default()));
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
    ///     .route("/admin", get(|| async { "admin" }).layer(auth.require(RequireScopes::all(["admin"]))));
    /// ```
    pub fn require(mut self, policy: RequireScopes) -> Self {
        self.config_mut().policy = Some(policy);
        self
    }

    /// Send a [`UsageEvent`] for every decided request to `sink`.
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

    /// The verifier this layer asks.
    pub fn verifier(&self) -> &Arc<V> {
        &self.shared.verifier
    }
}

impl<S, V: Verifier> Layer<S> for ApiKeyLayer<V> {
    type Service = ApiKeyService<S, V>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiKeyService { inner, shared: self.shared.clone() }
    }
}

/// The service [`ApiKeyLayer`] builds.
pub struct ApiKeyService<S, V> {
    inner: S,
    // One Arc: axum clones route services for every request.
    shared: Arc<Shared<V>>,
}

impl<S: Clone, V> Clone for ApiKeyService<S, V> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), shared: self.shared.clone() }
    }
}

impl<S, V, ReqB, ResB> Service<Request<ReqB>> for ApiKeyService<S, V>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    V: Verifier,
    ReqB: Send + 'static,
    ResB: RejectionBody,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let config = &self.shared.config;
        let grpc = is_grpc(&req);
        let record = config.usage.as_ref().map(|_| Record::start(&mut req, &config.client_ip));
        // A disabled span still costs a callsite check per use; skip it entirely when
        // nobody listens at debug level.
        let span = if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug_span!("keygate", key_id = tracing::field::Empty)
        } else {
            tracing::Span::none()
        };
        let future = |state, record, span| ResponseFuture { state, shared: self.shared.clone(), grpc, record, span };
        let rejected = |err| State::Rejected { err: Some(err) };

        if let Some(realm) = &config.realm_ext {
            req.extensions_mut().insert(realm.clone());
        }
        let found = match find_key(&req, &config.sources, config.max_key_len) {
            Ok(found) => found,
            Err(err) => return future(rejected(err), record, span),
        };
        let Some(found) = found else {
            if !config.optional {
                return future(rejected(AuthError::MissingCredentials), record, span);
            }
            if let Err(err) = check_policy(config, &req, None) {
                return future(rejected(err), record, span);
            }
            req.extensions_mut().insert(Anonymous);
            let fut = call_inner(&mut self.inner, req, &span);
            return future(State::Inner { fut, outcome: Outcome::Anonymous }, record, span);
        };
        if let Err(e) = config.format.check(&found.key) {
            return future(rejected(AuthError::InvalidKey(InvalidKey::Format(e))), record, span);
        }
        if !config.keep_credentials {
            strip_credential(&mut req, &config.sources[found.source]);
        }
        let key = found.key;
        // A verdict the verifier already holds (a cache hit) needs no future at all, and
        // the inner service that was just driven to readiness takes the request at once:
        // no clone of it either.
        match self.shared.verifier.verify_now(&key) {
            Some(result) => {
                let mut record = record;
                match admit(result, &mut req, config, &span, &mut record) {
                    // Built in place: the inner future is the bulk of this one, and every
                    // intermediate value would be one more copy of it.
                    Ok(outcome) => ResponseFuture {
                        state: State::Inner { fut: call_inner(&mut self.inner, req, &span), outcome },
                        shared: self.shared.clone(),
                        grpc,
                        record,
                        span,
                    },
                    Err(err) => future(rejected(err), record, span),
                }
            }
            None => {
                // The slow path: the request, the ready service and the verifier call
                // travel in one box, so the common future stays small.
                let shared = self.shared.clone();
                let inner = take_ready(&mut self.inner);
                let verify: BoxVerify<S, ReqB> = Box::pin(async move {
                    let result = shared.verifier.verify(&key).await;
                    (result, inner, req)
                });
                future(State::Verify { fut: verify }, record, span)
            }
        }
    }
}

/// Calls the inner service inside the span, when there is one.
fn call_inner<S: Service<R>, R>(inner: &mut S, req: R, span: &tracing::Span) -> S::Future {
    if span.is_none() { inner.call(req) } else { span.in_scope(|| inner.call(req)) }
}

/// The layer's own [`RequireScopes`], if it has one.
fn check_policy<B>(config: &Config, req: &Request<B>, principal: Option<&Principal>) -> Result<(), AuthError> {
    match &config.policy {
        Some(policy) => policy.check_principal(req.uri().path(), principal),
        None => Ok(()),
    }
}

/// The service that was driven to readiness goes with the request; a clone stays.
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

/// What a usage event needs from the request, captured only when a sink is set.
struct Record {
    start: Instant,
    method: http::Method,
    // Resolved to text only when the event is built: an inner RequireScopes usually
    // supplies the template, and then the request's own path is never copied.
    route: RouteSource,
    client_ip: Option<IpAddr>,
    request_id: Option<Arc<str>>,
    principal: Option<Principal>,
    /// The id of an existing key that was refused (revoked, disabled, expired).
    denied_key_id: Option<Arc<str>>,
}

impl Record {
    fn start<B>(req: &mut Request<B>, client_ip: &ClientIp) -> Self {
        let route = route_of(req);
        if !route.is_template() {
            // Running before routing: an inner RequireScopes hands the template back.
            req.extensions_mut().insert(WantsRoute);
        }
        Self {
            start: Instant::now(),
            method: req.method().clone(),
            route,
            client_ip: match client_ip {
                ClientIp::None => None,
                ClientIp::Peer => peer_ip(req),
                ClientIp::Header(name) => req
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.rsplit(',').next())
                    .and_then(|v| v.trim().parse().ok()),
            },
            request_id: req
                .headers()
                .get(X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(|v| Arc::from(&v[..v.len().min(128)])),
            principal: None,
            denied_key_id: None,
        }
    }

    fn finish(self, sink: &dyn UsageSink, status: u16, outcome: Outcome, route: Option<Arc<str>>) {
        let end = Instant::now();
        sink.record(UsageEvent {
            at: clock::wall_time(self.start, end),
            key_id: self.principal.as_ref().map(|p| p.key_id_arc().clone()).or(self.denied_key_id),
            owner: self.principal.as_ref().map(|p| p.owner_arc().clone()),
            outcome,
            method: method_name(&self.method),
            route: route.unwrap_or_else(|| self.route.resolve()),
            status,
            latency: end.saturating_duration_since(self.start),
            client_ip: self.client_ip,
            request_id: self.request_id,
        });
    }
}

/// Standard methods as static strings; only extension methods allocate.
fn method_name(m: &http::Method) -> std::borrow::Cow<'static, str> {
    use http::Method as M;
    let name = match *m {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::PATCH => "PATCH",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => return std::borrow::Cow::Owned(m.as_str().to_owned()),
    };
    std::borrow::Cow::Borrowed(name)
}

#[cfg(feature = "axum")]
fn peer_ip<B>(req: &Request<B>) -> Option<IpAddr> {
    req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip())
}

#[cfg(not(feature = "axum"))]
fn peer_ip<B>(_: &Request<B>) -> Option<IpAddr> {
    None
}

/// Where a usage event's route comes from, kept cheaply until the event is built.
enum RouteSource {
    /// The template axum matched (when keygate runs inside routing).
    #[cfg(feature = "axum")]
    Matched(axum::extract::MatchedPath),
    /// The request's path: the gRPC method, or the raw path.
    Path(Option<http::uri::PathAndQuery>),
}

impl RouteSource {
    fn is_template(&self) -> bool {
        match self {
            #[cfg(feature = "axum")]
            Self::Matched(_) => true,
            Self::Path(_) => false,
        }
    }

    /// The template, the gRPC method, or the raw path cut short (it may carry ids; it
    /// is never the query).
    fn resolve(self) -> Arc<str> {
        match self {
            #[cfg(feature = "axum")]
            Self::Matched(m) => templates::intern(&m),
            Self::Path(pq) => {
                let path = pq.as_ref().map_or("/", |pq| pq.path());
                let mut end = path.len().min(MAX_RAW_ROUTE_LEN);
                while !path.is_char_boundary(end) {
                    end -= 1;
                }
                Arc::from(&path[..end])
            }
        }
    }
}

fn route_of<B>(req: &Request<B>) -> RouteSource {
    #[cfg(feature = "axum")]
    if let Some(m) = req.extensions().get::<axum::extract::MatchedPath>() {
        return RouteSource::Matched(m.clone());
    }
    // A clone of a parsed path shares its bytes: no copy here.
    RouteSource::Path(req.uri().path_and_query().cloned())
}

/// Route templates as shared strings, made once per template and thread rather than
/// once per request.
#[cfg(feature = "axum")]
mod templates {
    use std::cell::RefCell;
    use std::sync::Arc;

    use axum::extract::MatchedPath;

    /// Slots per thread. Templates are a router's, not a client's: a handful per
    /// application; two that share a slot only cost an allocation when they alternate.
    const SLOTS: usize = 64;

    /// A template's address and the shared copy made of it.
    type Slot = Option<(usize, Arc<str>)>;

    thread_local! {
        // Keyed by the address of the router's own copy of the template, which every
        // request matching that route shares; the text is compared too, so that an
        // address reused by a later router can never name the wrong route.
        static TEMPLATES: RefCell<[Slot; SLOTS]> = const { RefCell::new([const { None }; SLOTS]) };
    }

    pub(super) fn intern(m: &MatchedPath) -> Arc<str> {
        let text = m.as_str();
        let addr = text.as_ptr() as usize;
        let slot = (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) % SLOTS;
        TEMPLATES.with(|cell| {
            let Ok(mut slots) = cell.try_borrow_mut() else { return Arc::from(text) };
            if let Some((known_addr, known)) = &slots[slot] {
                if *known_addr == addr && **known == *text {
                    return known.clone();
                }
            }
            let shared: Arc<str> = Arc::from(text);
            slots[slot] = Some((addr, shared.clone()));
            shared
        })
    }
}

pin_project! {
    /// The future of [`ApiKeyService`].
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
        shared: Arc<dyn SharedConfig>,
        grpc: bool,
        record: Option<Record>,
        span: tracing::Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        Verify { fut: BoxVerify<S, B> },
        Inner { #[pin] fut: S::Future, outcome: Outcome },
        Rejected { err: Option<AuthError> },
    }
}

/// The parts of the layer's configuration its futures need, without the verifier type.
trait SharedConfig: Send + Sync {
    fn config(&self) -> &Config;
}

impl<V: Verifier> SharedConfig for Shared<V> {
    fn config(&self) -> &Config {
        &self.config
    }
}

/// Applies a verdict to the request: the principal goes into its extensions, or the
/// rejection comes back. The usage record and the span learn the key id either way.
fn admit<B>(
    result: Result<Verdict, VerifyError>,
    req: &mut Request<B>,
    config: &Config,
    span: &tracing::Span,
    record: &mut Option<Record>,
) -> Result<Outcome, AuthError> {
    match &result {
        Ok(Verdict::Valid(p)) => {
            span.record("key_id", p.key_id());
            // Even a rate-limited or expired key's event names the key.
            if let Some(r) = record.as_mut() {
                r.principal = Some(p.clone());
            }
        }
        Ok(Verdict::Invalid { key_id: Some(id), .. }) => {
            span.record("key_id", &**id);
            if let Some(r) = record.as_mut() {
                r.denied_key_id = Some(id.clone());
            }
        }
        _ => {}
    }
    let principal = decide(result, config)?;
    check_policy(config, req, Some(&principal))?;
    let outcome = if principal.is_fail_open() { Outcome::FailOpen } else { Outcome::Allowed };
    req.extensions_mut().insert(principal);
    Ok(outcome)
}

/// Turns a verifier's answer into a principal or a rejection.
fn decide(result: Result<Verdict, VerifyError>, config: &Config) -> Result<Principal, AuthError> {
    let retry_after = config.retry_after;
    match result {
        // Only keys that expire pay for reading the clock.
        Ok(Verdict::Valid(p)) if p.expires_at().is_some_and(|at| at <= OffsetDateTime::now_utc()) => {
            Err(AuthError::Expired)
        }
        Ok(Verdict::Valid(p)) => match (p.ratelimit(), &config.rate_limiter) {
            (Some(limit), Some(limiter)) => match limiter.check(p.key_id_arc(), limit) {
                Ok(()) => Ok(p),
                Err(retry_after) => Err(AuthError::RateLimited { retry_after }),
            },
            _ => Ok(p),
        },
        Ok(Verdict::Invalid { reason: Reason::Expired, .. }) => Err(AuthError::Expired),
        Ok(Verdict::Invalid { reason, .. }) => Err(AuthError::InvalidKey(InvalidKey::Rejected(reason))),
        Err(e) => {
            tracing::warn!(error = %e, "keygate: key service unavailable, failing closed");
            Err(AuthError::Unavailable { retry_after })
        }
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: RejectionBody,
{
    type Output = Result<Response<ResB>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = (!this.span.is_none()).then(|| this.span.enter());
        loop {
            match this.state.as_mut().project() {
                StateProj::Verify { fut } => {
                    let (result, mut inner, mut req) = ready!(fut.as_mut().poll(cx));
                    let next = match admit(result, &mut req, this.shared.config(), this.span, this.record) {
                        Ok(outcome) => State::Inner { fut: inner.call(req), outcome },
                        Err(err) => State::Rejected { err: Some(err) },
                    };
                    this.state.set(next);
                }
                StateProj::Inner { fut, outcome } => {
                    let outcome = *outcome;
                    let res = ready!(fut.poll(cx))?;
                    if let (Some(record), Some(sink)) = (this.record.take(), this.shared.config().usage.as_ref()) {
                        // An inner RequireScopes reports its denial (and, when this layer
                        // runs before routing, the route template) in the response.
                        let outcome = res.extensions().get::<Outcome>().copied().unwrap_or(outcome);
                        let status = grpc_aware_status(&res, *this.grpc);
                        // Only a layer that ran before routing needs the template back.
                        let route = if record.route.is_template() { None } else { matched_route(&res) };
                        record.finish(&**sink, status, outcome, route);
                    }
                    return Poll::Ready(Ok(res));
                }
                StateProj::Rejected { err } => {
                    let Some(err) = err.take() else {
                        panic!("keygate ResponseFuture polled after completion");
                    };
                    let config = this.shared.config();
                    log_rejection(&err);
                    if let (Some(record), Some(sink)) = (this.record.take(), config.usage.as_ref()) {
                        record.finish(&**sink, err.status().as_u16(), err.outcome(), None);
                    }
                    // A scope denial comes from the layer's own policy, which may name
                    // its own realm.
                    let realm = match (&err, &config.policy) {
                        (AuthError::InsufficientScope { .. }, Some(policy)) => policy.own_realm(),
                        _ => None,
                    };
                    return Poll::Ready(Ok(err.to_response(realm.unwrap_or(&config.realm), *this.grpc)));
                }
            }
        }
    }
}

#[cfg(feature = "axum")]
fn matched_route<B>(res: &Response<B>) -> Option<Arc<str>> {
    res.extensions().get::<axum::extract::MatchedPath>().map(templates::intern)
}

#[cfg(not(feature = "axum"))]
fn matched_route<B>(_: &Response<B>) -> Option<Arc<str>> {
    None
}

/// For gRPC answers the HTTP status is 200 whatever happened; the event reports the
/// HTTP status the `grpc-status` corresponds to so that status classes stay meaningful.
fn grpc_aware_status<B>(res: &Response<B>, grpc: bool) -> u16 {
    if !grpc {
        return res.status().as_u16();
    }
    match res.headers().get("grpc-status").and_then(|v| v.to_str().ok()) {
        Some("16") => 401,
        Some("7") => 403,
        Some("3") => 400,
        Some("14") => 503,
        Some("8") => 429,
        Some("0") | None => res.status().as_u16(),
        Some(_) => 500,
    }
}

fn log_rejection(err: &AuthError) {
    // The precise reason goes to the log at debug level; the client sees the generic one.
    match err {
        AuthError::InvalidKey(InvalidKey::Malformed(why)) => tracing::debug!(reason = why, "keygate: malformed key"),
        AuthError::InvalidKey(InvalidKey::Format(e)) => {
            tracing::debug!(reason = %e, "keygate: key failed format check")
        }
        AuthError::InvalidKey(InvalidKey::Rejected(r)) => tracing::debug!(reason = r.code(), "keygate: key rejected"),
        other => tracing::debug!(reason = %other, outcome = other.outcome().as_str(), "keygate: request rejected"),
    }
}
