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
//! ```
//! use axum::{Router, routing::get};
//! use keygate::{ApiKey, ApiKeyLayer, Principal, RequireScopes, ScopeSet, StaticVerifier};
//!
//! let key = ApiKey::generate("kg").unwrap();
//! let verifier = StaticVerifier::new().with_key(
//!     &key,
//!     Principal::builder("key_1").owner("acme").scopes(ScopeSet::parse(["reports:read"]).unwrap()).build(),
//! );
//! let app: Router = Router::new()
//!     .route("/reports", get(|p: Principal| async move { format!("reports for {}", p.owner()) }))
//!     .route_layer(RequireScopes::all(["reports:read"]))
//!     .layer(ApiKeyLayer::new(verifier));
//! ```
//!
//! In production the verifier is a `CachedVerifier<HttpVerifier>` against the key
//! service (the `cache` and `remote` features, on by default), kept current by a
//! `RevocationListener`; the reference key service itself is [`server`] (feature
//! `server`). Its wire protocol is documented, with its types, in [`wire`].
//!
//! # Reading the source
//! The modules follow the path of a request, and a module only uses the ones above
//! it in this list:
//!
//! 1. `outcome`: [`Outcome`], what happened to a request; uses nothing.
//! 2. `body`, `key`, `scope`, `principal`: rejection bodies, the key and its format
//!    check, scopes and requirements, the verified identity.
//! 3. `verify`: [`Verifier`] and its implementations, the cache, the remote client;
//!    `ratelimit`: per-key limits.
//! 4. `error`: [`AuthError`], every rejection, rendered for HTTP or gRPC, or by the
//!    service's own hook.
//! 5. `context`: what keygate's layers tell each other about a request (how to answer,
//!    anonymous, route template).
//! 6. `extract`: finding the key in a request.
//! 7. `authorize`: [`RequireScopes`]; `handler`: the [`Principal`] extractor.
//! 8. `usage`: decided requests, the aggregator and the raw-event pipeline.
//! 9. `layer`: [`ApiKeyLayer`], which runs all of the above in that order.
//!
//! `wire` and `remote` sit beside this chain (the protocol types, and the HTTP client
//! plumbing the remote parts share); `server` is the other side of the wire.
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]

mod authorize;
mod body;
mod context;
mod error;
mod extract;
#[cfg(feature = "axum")]
mod handler;
mod key;
mod layer;
mod outcome;
mod principal;
mod ratelimit;
mod scope;
mod usage;
mod verify;
pub mod wire;

#[cfg(feature = "remote")]
mod remote;

#[cfg(feature = "server")]
pub mod server;

pub use authorize::{RequireScopes, RequireScopesFuture, RequireScopesService};
pub use body::{KeygateBody, RejectionBody};
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
    CacheStats, CachedVerifier, CachedVerifierBuilder, DEFAULT_CACHE_CAPACITY, DEFAULT_NEGATIVE_CAPACITY,
    DEFAULT_NEGATIVE_TTL, DEFAULT_POSITIVE_TTL, DEFAULT_STALE_IF_ERROR, DEFAULT_STALE_RETRY_INTERVAL, FailurePolicy,
};

#[cfg(feature = "remote")]
pub use remote::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_FAILOVER_COOLDOWN, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_INITIAL_BACKOFF,
    DEFAULT_MAX_BACKOFF, DEFAULT_MAX_LINE_BYTES, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_VERIFY_TIMEOUT,
    HttpExporterBuildError, HttpUsageExporter, HttpUsageExporterBuilder, HttpVerifier, HttpVerifierBuilder,
    ListenerStats, RemoteConfigError, RevocationListener, RevocationListenerBuilder,
};
// Service tokens read from a file (issue 14).
#[cfg(feature = "remote")]
pub use remote::{DEFAULT_TOKEN_FILE_POLL, MAX_TOKEN_FILE_BYTES};
