//! keygate: API-key authentication for axum and tonic services.
//!
//! One tower [`Layer`](tower_layer::Layer), [`ApiKeyLayer`], finds the API key in a
//! request, rejects malformed keys locally, verifies the rest through a
//! [`Verifier`] (in memory, or a remote key service behind a cache), and puts the
//! verified [`Principal`] into the request. [`RequireScopes`] states per route what a
//! key must hold. Every decided request can emit a [`UsageEvent`].
//!
//! The path of a request follows the modules: [`extract`] → [`key`] (format check) →
//! [`verify`] → [`authorize`] → inner service → [`usage`].
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod authorize;
pub mod body;
mod clock;
pub mod error;
pub mod extract;
pub mod key;
pub mod layer;
pub mod principal;
pub mod ratelimit;
pub mod scope;
pub mod usage;
pub mod verify;

#[cfg(feature = "server")]
pub mod server;

pub use authorize::RequireScopes;
pub use body::{KeygateBody, RejectionBody};
pub use error::{AuthError, InvalidKey};
pub use extract::KeySource;
pub use key::{ApiKey, FormatError, KeyDigest, KeyFormat};
pub use layer::{ApiKeyLayer, ApiKeyService};
#[cfg(feature = "axum")]
pub use principal::MissingPrincipal;
pub use principal::{Principal, RateLimit};
pub use scope::{Requirement, RequirementError, Scope, ScopeError, ScopeSet};
pub use usage::{Outcome, UsageEvent, UsageSink};
pub use verify::{Reason, StaticVerifier, Verdict, Verifier, VerifyError};

// --- re-exports owned by the cache/remote work (src/verify/cached.rs, http.rs, events.rs)
#[cfg(feature = "cache")]
pub use verify::{
    CacheStats, CachedVerifier, CachedVerifierBuilder, DEFAULT_CACHE_CAPACITY, DEFAULT_NEGATIVE_CAPACITY,
    DEFAULT_NEGATIVE_TTL, DEFAULT_POSITIVE_TTL, DEFAULT_STALE_IF_ERROR, DEFAULT_STALE_RETRY_INTERVAL, FailurePolicy,
};
#[cfg(feature = "remote")]
pub use verify::{HttpVerifier, RemoteConfigError, RevocationListener};
// --- re-exports owned by the usage pipeline work (src/usage/pipeline.rs, exporter.rs)
#[cfg(feature = "remote")]
pub use usage::HttpUsageExporter;
pub use usage::{ChannelSink, PipelineHandle, PipelineStats, TracingSink, UsageBatch, UsageExporter, UsagePipeline};
