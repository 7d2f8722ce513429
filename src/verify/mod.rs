//! Verification: turning a well-formed key into a [`Verdict`].
//!
//! A [`Verifier`] answers `Valid(principal)` or `Invalid(reason)`, or fails with a
//! [`VerifyError`] when it cannot tell (key service unreachable, timed out, or
//! answering nonsense). The layer renders `Invalid` as 401 and `VerifyError` as 503:
//! a verifier that cannot tell never turns into a denial, and never into "valid".

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use crate::key::{ApiKey, KeyDigest};
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

    /// The principal this verdict lets in now, or why not.
    ///
    /// A valid verdict for a key past its `expires_at` is `Expired`: whatever cached
    /// the verdict, it never outlives the key. Only keys that expire read the clock.
    pub(crate) fn admit(self) -> Result<Principal, Reason> {
        match self {
            Self::Valid(p) if p.expires_at().is_some_and(|at| at <= time::OffsetDateTime::now_utc()) => {
                Err(Reason::Expired)
            }
            Self::Valid(p) => Ok(p),
            Self::Invalid { reason, .. } => Err(reason),
        }
    }
}

/// Why a key is not valid: the `code` of a refusal. Clients of the protected service see
/// one 401 for all of these except `Expired`; logs and usage events see the precise
/// reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
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
///
/// The cause is kept ([`source`](std::error::Error::source)) and shared, so that one
/// error can go to every request that waited on the same verification. `Display` never
/// holds a key or a service token.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The key service could not be reached (refused, reset, DNS).
    #[error("key service unreachable: {0}")]
    Unreachable(#[source] SharedError),
    /// The key service did not answer in time.
    #[error("key service timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The key service answered with an unexpected HTTP status (a redirect included:
    /// keygate never follows one).
    #[error("key service answered HTTP {0}")]
    Status(u16),
    /// The key service's answer could not be understood.
    #[error("key service answer not understood: {0}")]
    BadAnswer(#[source] SharedError),
    /// Anything else.
    #[error("verification failed: {0}")]
    Other(#[source] SharedError),
    /// Not asked: the verifier failed so often that a
    /// [`CachedVerifier`](crate::CachedVerifier)'s circuit is open (see
    /// [`CircuitBreaker`](crate::CircuitBreaker)).
    #[error("key service not asked: it keeps failing (circuit open)")]
    CircuitOpen,
    /// Not asked: the lookup's [`MissBudget`](crate::MissBudget) is spent. The layer
    /// answers 429 (`rate_limited`, gRPC `RESOURCE_EXHAUSTED`), not 503, and never lets
    /// the request through under [`FailurePolicy::FailOpen`](crate::FailurePolicy).
    #[error("too many lookups of unknown keys; retry in {retry_after:?}")]
    Throttled {
        /// When the budget lets the next miss through.
        retry_after: std::time::Duration,
    },
}

/// The cause of a [`VerifyError`]: any error, shared (cloning it is cheap). Made from
/// an error with [`SharedError::new`], or from a message with `"...".into()`.
#[derive(Clone)]
pub struct SharedError(Arc<dyn std::error::Error + Send + Sync>);

impl SharedError {
    /// Wraps `error`.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(error))
    }
}

impl std::fmt::Debug for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&*self.0, f)
    }
}

/// Transparent: the wrapped error's own causes follow.
impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl From<&str> for SharedError {
    fn from(message: &str) -> Self {
        Self(Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(message)))
    }
}

impl From<String> for SharedError {
    fn from(message: String) -> Self {
        Self(Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(message)))
    }
}

impl From<Box<dyn std::error::Error + Send + Sync>> for SharedError {
    fn from(error: Box<dyn std::error::Error + Send + Sync>) -> Self {
        Self(Arc::from(error))
    }
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

    /// Verifies one key for a request from `client`, the address the layer knows for it
    /// (`None` when it knows none). The layer calls this one; the default forgets the
    /// client and calls [`verify`](Verifier::verify).
    /// [`CachedVerifier`](crate::CachedVerifier) charges its
    /// [`MissBudget`](crate::MissBudget) to the client.
    fn verify_from(
        &self,
        key: &ApiKey,
        client: Option<IpAddr>,
    ) -> impl Future<Output = Result<Verdict, VerifyError>> + Send {
        let _ = client;
        self.verify(key)
    }

    /// The verdict, if it is known without waiting (a cache hit, an in-memory table).
    ///
    /// The layer asks this first and builds a future only when it answers `None`. It
    /// must agree with [`verify`](Verifier::verify); the default knows nothing.
    fn verify_now(&self, key: &ApiKey) -> Option<Result<Verdict, VerifyError>> {
        let _ = key;
        None
    }

    /// Verifies several keys by their digests alone, in one call: one verdict per digest,
    /// in order. `None`: this verifier needs the key itself (the default).
    ///
    /// A [`CachedVerifier`](crate::CachedVerifier) whose verifier can do this refreshes hot
    /// verdicts before they go stale and revalidates what it holds after an event-stream
    /// `reset`, in the background and in batches; without it, a verdict is refreshed by
    /// the first request that finds it stale, and a `reset` drops the cache.
    /// [`HttpVerifier`](crate::HttpVerifier) sends `POST /v1/keys/verify-batch`.
    fn verify_digests(
        &self,
        digests: &[KeyDigest],
    ) -> Option<impl Future<Output = Result<Vec<Verdict>, VerifyError>> + Send> {
        let _ = digests;
        None::<std::future::Ready<Result<Vec<Verdict>, VerifyError>>>
    }
}

impl<V: Verifier> Verifier for Arc<V> {
    fn verify(&self, key: &ApiKey) -> impl Future<Output = Result<Verdict, VerifyError>> + Send {
        (**self).verify(key)
    }

    fn verify_from(
        &self,
        key: &ApiKey,
        client: Option<IpAddr>,
    ) -> impl Future<Output = Result<Verdict, VerifyError>> + Send {
        (**self).verify_from(key, client)
    }

    fn verify_now(&self, key: &ApiKey) -> Option<Result<Verdict, VerifyError>> {
        (**self).verify_now(key)
    }

    fn verify_digests(
        &self,
        digests: &[KeyDigest],
    ) -> Option<impl Future<Output = Result<Vec<Verdict>, VerifyError>> + Send> {
        (**self).verify_digests(digests)
    }
}

#[cfg(feature = "cache")]
mod budget;
#[cfg(feature = "cache")]
pub(crate) mod cached;
#[cfg(feature = "cache")]
mod circuit;
#[cfg(feature = "cache")]
pub use budget::{
    DEFAULT_MISS_BUDGET_CLIENTS, DEFAULT_MISS_BUDGET_OVERALL, DEFAULT_MISS_BUDGET_PER_CLIENT, MissBudget,
};
#[cfg(feature = "cache")]
pub use cached::{
    CacheStats, CachedVerifier, CachedVerifierBuilder, DEFAULT_CACHE_CAPACITY, DEFAULT_NEGATIVE_CAPACITY,
    DEFAULT_NEGATIVE_TTL, DEFAULT_POSITIVE_TTL, DEFAULT_REFRESH_AHEAD, DEFAULT_REFRESH_BATCH,
    DEFAULT_REVALIDATION_RATE, DEFAULT_STALE_IF_ERROR, DEFAULT_STALE_RETRY_INTERVAL, FailurePolicy,
};
#[cfg(feature = "cache")]
pub use circuit::{
    CircuitBreaker, DEFAULT_CIRCUIT_FIRST_PROBE, DEFAULT_CIRCUIT_MAX_PROBE_INTERVAL, DEFAULT_CIRCUIT_OPEN_AFTER,
};
