//! Verification: turning a well-formed key into a [`Verdict`].
//!
//! A [`Verifier`] answers `Valid(principal)` or `Invalid(reason)`, or fails with a
//! [`VerifyError`] when it cannot tell (key service unreachable, timed out, or
//! answering nonsense). The layer renders `Invalid` as 401 and `VerifyError` as 503:
//! a verifier that cannot tell never turns into a denial, and never into "valid".

use std::future::Future;
use std::sync::Arc;

use crate::key::ApiKey;
use crate::principal::Principal;

mod static_verifier;
pub use static_verifier::StaticVerifier;

/// What a verifier decided about a key.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The key is good; here is who it belongs to.
    Valid(Principal),
    /// The key is not good, and why.
    Invalid {
        /// Why.
        reason: Reason,
        /// The key's id when the key exists (revoked, disabled, expired), so that usage
        /// events and alerts can name it. Never shown to the client.
        key_id: Option<Arc<str>>,
    },
}

impl Verdict {
    /// An invalid verdict for a key whose id is unknown (or not to be told).
    pub fn invalid(reason: Reason) -> Self {
        Self::Invalid { reason, key_id: None }
    }

    /// An invalid verdict for an existing key.
    pub fn invalid_key(reason: Reason, key_id: impl Into<Arc<str>>) -> Self {
        Self::Invalid { reason, key_id: Some(key_id.into()) }
    }
}

/// Why a key is not valid. Clients see one 401 for all of these except `Expired`;
/// logs and usage events see the precise reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Reason {
    /// No such key.
    NotFound,
    /// The key was revoked.
    Revoked,
    /// The key's expiry (or rotation grace) has passed.
    Expired,
    /// The key is disabled.
    Disabled,
}

impl Reason {
    /// The wire code (`NOT_FOUND`, `REVOKED`, `EXPIRED`, `DISABLED`).
    pub fn code(self) -> &'static str {
        match self {
            Self::NotFound => "NOT_FOUND",
            Self::Revoked => "REVOKED",
            Self::Expired => "EXPIRED",
            Self::Disabled => "DISABLED",
        }
    }
}

/// A verifier could not reach a verdict. Never cached, never a denial: 503.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The key service could not be reached (refused, reset, DNS).
    #[error("key service unreachable: {0}")]
    Unreachable(String),
    /// The key service did not answer in time.
    #[error("key service timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The key service answered with an unexpected HTTP status.
    #[error("key service answered HTTP {0}")]
    Status(u16),
    /// The key service's answer could not be understood.
    #[error("key service answer not understood: {0}")]
    BadAnswer(String),
    /// Anything else.
    #[error("verification failed: {0}")]
    Other(String),
}

/// Turns a key into a [`Verdict`].
///
/// Implementations must be cheap to call concurrently. The key has already passed the
/// layer's format check; implementations must never log it.
///
/// ```
/// use keygate::{ApiKey, Principal, Verdict, Verifier, VerifyError, Reason};
///
/// struct AllowOne(ApiKey);
///
/// impl Verifier for AllowOne {
///     async fn verify(&self, key: &ApiKey) -> Result<Verdict, VerifyError> {
///         // Compare digests: fixed-size and constant-time.
///         Ok(if key.digest() == self.0.digest() {
///             Verdict::Valid(Principal::builder("key_1").build())
///         } else {
///             Verdict::invalid(Reason::NotFound)
///         })
///     }
/// }
/// ```
pub trait Verifier: Send + Sync + 'static {
    /// Verifies one key.
    fn verify(&self, key: &ApiKey) -> impl Future<Output = Result<Verdict, VerifyError>> + Send;

    /// The verdict, if it is known without waiting (a cache hit, an in-memory table).
    ///
    /// The layer asks this first and builds a future only when it answers `None`. It
    /// must agree with [`verify`](Verifier::verify); the default knows nothing.
    fn verify_now(&self, key: &ApiKey) -> Option<Result<Verdict, VerifyError>> {
        let _ = key;
        None
    }
}

impl<V: Verifier> Verifier for Arc<V> {
    fn verify(&self, key: &ApiKey) -> impl Future<Output = Result<Verdict, VerifyError>> + Send {
        (**self).verify(key)
    }

    fn verify_now(&self, key: &ApiKey) -> Option<Result<Verdict, VerifyError>> {
        (**self).verify_now(key)
    }
}

#[cfg(feature = "cache")]
mod cached;
#[cfg(feature = "cache")]
pub use cached::{
    CacheStats, CachedVerifier, CachedVerifierBuilder, DEFAULT_CACHE_CAPACITY, DEFAULT_NEGATIVE_CAPACITY,
    DEFAULT_NEGATIVE_TTL, DEFAULT_POSITIVE_TTL, DEFAULT_STALE_IF_ERROR, DEFAULT_STALE_RETRY_INTERVAL, FailurePolicy,
};

#[cfg(feature = "remote")]
mod http;
#[cfg(feature = "remote")]
pub use http::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_FAILOVER_COOLDOWN, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT, HttpVerifier,
    HttpVerifierBuilder, KeyServiceUrls, MAX_URLS, RemoteConfigError,
};

#[cfg(feature = "remote")]
mod events;
#[cfg(feature = "remote")]
pub use events::{
    DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_BACKOFF, DEFAULT_MAX_LINE_BYTES, ListenerStats,
    RevocationListener, RevocationListenerBuilder,
};
