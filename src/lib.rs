//! keygate: API-key authentication for axum and tonic services.
//!
//! One tower [`Layer`](tower_layer::Layer), [`ApiKeyLayer`], finds the API key in a
//! request, rejects malformed keys locally, verifies the rest through a
//! [`Verifier`] (in memory, or a remote key service behind a cache), and puts the
//! verified [`Principal`] into the request. [`RequireScopes`] states per route what a
//! key must hold. Every decided request reaches a [`UsageSink`]: a [`UsageAggregator`]
//! folds it into bounded per-minute rows for the key service, a [`UsagePipeline`] keeps
//! it as a [`UsageEvent`] for your own exporter.
//!
//! # Quick start
//!
//! Keys held in memory, one route that needs a scope, and what a caller gets:
//!
//! ```
//! use axum::{Router, body::Body, http::{Request, StatusCode}, routing::get};
//! use keygate::{ApiKey, ApiKeyLayer, Principal, RequireScopes, ScopeSet, StaticVerifier};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let key = ApiKey::generate("kg").unwrap();
//! let verifier = StaticVerifier::new().with_key(
//!     &key,
//!     Principal::builder("key_1").owner("acme").scopes(ScopeSet::parse(["reports:read"]).unwrap()).build(),
//! );
//! let app: Router = Router::new()
//!     .route("/reports", get(|p: Principal| async move { format!("reports for {}", p.owner()) }))
//!     .route_layer(RequireScopes::all(["reports:read"]))
//!     .layer(ApiKeyLayer::new(verifier));
//!
//! let call = |auth: Option<String>| {
//!     let mut req = Request::get("/reports");
//!     if let Some(auth) = auth {
//!         req = req.header("authorization", auth);
//!     }
//!     app.clone().oneshot(req.body(Body::empty()).unwrap())
//! };
//! // No key: 401 with a `WWW-Authenticate` challenge.
//! let res = call(None).await.unwrap();
//! assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(res.headers()["www-authenticate"], r#"Bearer realm="api""#);
//! // A key that fails its checksum: 401, and the verifier is never asked.
//! assert_eq!(call(Some("Bearer kg_garbage".into())).await.unwrap().status(), StatusCode::UNAUTHORIZED);
//! // The key: 200, and the handler sees who called.
//! let res = call(Some(format!("Bearer {}", key.expose_secret()))).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! # }
//! ```
//!
//! # Requirements: scopes and roles
//!
//! Scopes are `resource:action` (`*` matches one segment of a granted scope); roles are
//! written `role(name)`. A bare word is neither, and a mistake caught when the route is
//! built:
//!
//! ```
//! use keygate::RequireScopes;
//!
//! let reports = RequireScopes::all(["reports:read"]);
//! let billing = RequireScopes::expr("billing:write OR role(admin)");
//! let ops = RequireScopes::role("ops");
//! assert!(RequireScopes::try_expr("reports:read AND admin").is_err());
//! # let _ = (reports, billing, ops);
//! ```
//!
//! # Rejections
//!
//! Every refusal is an [`AuthError`] with a stable [`code()`](AuthError::code),
//! answered as RFC 9457 problem+json with an RFC 6750 challenge, or in gRPC terms for
//! gRPC requests. A service with its own error shape renders them itself with
//! [`ApiKeyLayer::on_rejection`]; behind [`ApiKeyLayer::optional`], a handler taking
//! `Principal` answers an anonymous caller with the layer's 401.
//!
//! # Against the key service
//!
//! In production the verifier is a `CachedVerifier<HttpVerifier>` against the key
//! service (the `cache` and `remote` features, on by default), kept current by a
//! `RevocationListener`, with usage exported by a [`UsageAggregator`]. `RemoteAuth`
//! sets all of it up in one call, from the key service's URLs and one service token:
//!
//! ```no_run
//! # async fn run(app: axum::Router, signal: impl Future<Output = ()> + Send + 'static) -> Result<(), Box<dyn std::error::Error>> {
//! let token = std::env::var("KEYGATE_SERVICE_TOKEN")?;
//! let (auth, remote) = keygate::RemoteAuth::builder(["http://keys-a:7700", "http://keys-b:7700"], token).build()?;
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
//! axum::serve(listener, app.layer(auth)).with_graceful_shutdown(signal).await?;
//! remote.shutdown().await; // delivers the last interval's usage, stops the listener
//! # Ok(()) }
//! ```
//!
//! The reference key service itself is [`server`] (feature `server`); [`client`]
//! (feature `client`) is its admin API client. The wire protocol is documented, with its
//! types, in [`wire`].
//!
//! # Features
//!
//! | feature | default | what |
//! | --- | --- | --- |
//! | `axum` | yes | the [`Principal`] extractor, route templates from `MatchedPath` |
//! | `cache` | yes | `CachedVerifier` (moka) |
//! | `remote` | yes | `HttpVerifier`, `HttpUsageExporter`, `RevocationListener`, `RemoteAuth` (reqwest + rustls) |
//! | `introspection` | no | `IntrospectionVerifier`: OAuth2 token introspection (RFC 7662) against any authorization server (reqwest + rustls) |
//! | `client` | no | `AdminClient` for the key service's admin API (reqwest only) |
//! | `tonic` | no | [`RejectionBody`] for tonic's body, to layer tonic servers |
//! | `server` | no | the reference key service and the binary `keygate-server` (sqlx, SQLite; includes `client`) |
//! | `postgres` | no | the key service's PostgreSQL store |
//! | `redis` | no | `RedisLimits`: limits and credits counted fleet-wide on Redis, in leases (redis) |
//!
//! # Reading the source
//! The modules follow the path of a request, and a module only uses the ones above
//! it in this list:
//!
//! 1. `outcome`: [`Outcome`], what happened to a request; uses nothing.
//! 2. `body`, `key`, `scope`, `quota`, `principal`: rejection bodies, the key and its
//!    format check, scopes and requirements, limits and credits, the verified identity.
//! 3. `verify`: [`Verifier`] and its implementations, the cache, the remote client;
//!    `cost`: what a route draws ([`Cost`]); `ratelimit`: GCRA; `meter`: the limit
//!    engine that charges costs against a principal's limits and credits.
//! 4. `error`: [`AuthError`], every rejection, rendered for HTTP or gRPC, or by the
//!    service's own hook.
//! 5. `context`: what keygate's layers tell each other about a request (how to answer,
//!    anonymous, route template); `charge`: what the request was charged, and the
//!    [`Cost`] route layer that changes it.
//! 6. `extract`: finding the key in a request.
//! 7. `authorize`: [`RequireScopes`]; `handler`: the [`Principal`] extractor.
//! 8. `usage`: decided requests, the aggregator and the raw-event pipeline.
//! 9. `layer`: [`ApiKeyLayer`], which runs all of the above in that order.
//!
//! `wire`, `transport`, `remote` and `introspection` sit beside this chain (the protocol
//! types, the HTTP client every keygate client uses, the remote parts, and the OAuth2
//! introspection verifier); only `remote::setup`
//! (`RemoteAuth`) uses the whole chain, as it builds the layer. `client` is the admin
//! API's client and types (feature `client`); `server` is the other side of the wire,
//! and reads and answers `client`'s types.
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]

mod authorize;
mod body;
mod charge;
mod context;
mod cost;
mod error;
mod extract;
#[cfg(feature = "axum")]
mod handler;
mod key;
mod layer;
mod meter;
mod outcome;
mod principal;
pub mod quota;
mod ratelimit;
mod scope;
mod usage;
mod verify;
pub mod wire;

#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;

#[cfg(any(feature = "remote", feature = "client", feature = "introspection"))]
mod transport;

#[cfg(feature = "introspection")]
mod introspection;

#[cfg(feature = "remote")]
mod remote;

#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;

#[cfg(feature = "server")]
pub mod server;

pub use authorize::{RequireScopes, RequireScopesFuture, RequireScopesService};
pub use body::{KeygateBody, RejectionBody};
pub use charge::{CostFuture, CostService};
pub use cost::Cost;
pub use error::{AuthError, DEFAULT_REALM, InvalidKey};
pub use extract::{AuthScheme, DEFAULT_MAX_KEY_LEN, KeySource};
#[cfg(feature = "axum")]
pub use handler::MissingPrincipal;
pub use key::{ApiKey, CHECKSUM_LEN, FormatError, KeyDigest, KeyFormat, MAX_PREFIX_LEN, RANDOM_LEN};
pub use layer::{ApiKeyLayer, ApiKeyService, DEFAULT_RETRY_AFTER, ResponseFuture};
pub use outcome::Outcome;
pub use principal::{MetaError, Principal, PrincipalBuilder, RateLimit};
pub use scope::{
    MAX_ROLE_LEN, MAX_SCOPE_LEN, MAX_SEGMENTS, Requirement, RequirementError, RequirementErrorKind, Scope, ScopeError,
    ScopeSet,
};
pub use usage::metric as usage_metrics;
pub use usage::{
    AggregateBatch, AggregateExporter, AggregateRow, AggregatorBuildError, AggregatorHandle, AggregatorStats,
    ChannelSink, ClientNetwork, DecidedRequest, ExportError, FlushError, LATENCY_BUCKETS, LATENCY_RELATIVE_ERROR,
    LatencyHistogram, OVERFLOW_METHOD, OVERFLOW_ROUTE, PipelineBuildError, PipelineHandle, PipelineStats, StatusCounts,
    TracingSink, UsageAggregator, UsageAggregatorBuilder, UsageBatch, UsageEvent, UsageExporter, UsagePipeline,
    UsagePipelineBuilder, UsageSink, network_of,
};
pub use verify::{Reason, SharedError, StaticVerifier, Verdict, Verifier, VerifyError};

#[cfg(feature = "cache")]
pub use verify::{
    CacheStats, CachedVerifier, CachedVerifierBuilder, CircuitBreaker, DEFAULT_CACHE_CAPACITY,
    DEFAULT_CIRCUIT_FIRST_PROBE, DEFAULT_CIRCUIT_MAX_PROBE_INTERVAL, DEFAULT_CIRCUIT_OPEN_AFTER,
    DEFAULT_MISS_BUDGET_CLIENTS, DEFAULT_MISS_BUDGET_OVERALL, DEFAULT_MISS_BUDGET_PER_CLIENT,
    DEFAULT_NEGATIVE_CAPACITY, DEFAULT_NEGATIVE_TTL, DEFAULT_POSITIVE_TTL, DEFAULT_REFRESH_AHEAD,
    DEFAULT_REFRESH_BATCH, DEFAULT_REVALIDATION_RATE, DEFAULT_STALE_IF_ERROR, DEFAULT_STALE_RETRY_INTERVAL,
    FailurePolicy, MissBudget,
};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use meter::redis::{RedisDown, RedisLimits, RedisLimitsBuilder, RedisLimitsError, RedisLimitsStats};

#[cfg(feature = "introspection")]
pub use introspection::{
    DEFAULT_INTROSPECTION_CONNECT_TIMEOUT, DEFAULT_INTROSPECTION_MAX_RESPONSE_BYTES, DEFAULT_INTROSPECTION_TIMEOUT,
    IntrospectionConfigError, IntrospectionVerifier, IntrospectionVerifierBuilder,
};
#[cfg(feature = "remote")]
pub use remote::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_FAILOVER_COOLDOWN, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_INITIAL_BACKOFF,
    DEFAULT_MAX_BACKOFF, DEFAULT_MAX_LINE_BYTES, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_VERIFY_TIMEOUT,
    HttpExporterBuildError, HttpUsageExporter, HttpUsageExporterBuilder, HttpVerifier, HttpVerifierBuilder,
    ListenerStats, RemoteAuth, RemoteAuthBuilder, RemoteConfigError, RevocationListener, RevocationListenerBuilder,
};
// Service tokens read from a file (issue 14).
#[cfg(feature = "remote")]
pub use remote::{DEFAULT_TOKEN_FILE_POLL, MAX_TOKEN_FILE_BYTES};
