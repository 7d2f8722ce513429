//! What keygate's layers tell each other about one request.
//!
//! This module sits at the bottom of the crate: the layer, the per-route policy, the
//! rejections, the principal extractor and usage all read these types, and it reads
//! none of them.
//!
//! Two messages cross between an outer [`ApiKeyLayer`](crate::ApiKeyLayer) and the
//! [`RequireScopes`](crate::RequireScopes) or handlers behind it:
//! - inward, in the request: [`LayerContext`], inserted by the layer into every request
//!   it lets through. Its presence is how an inner policy knows a layer ran at all;
//! - outward, in the response: [`InnerReport`], inserted by an inner policy when the
//!   outer layer asked for it, carrying what only the inner side knows: the route
//!   template axum matched (the outer layer runs before routing) and the policy's
//!   denial, so that the usage event records both.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The realm in `WWW-Authenticate` unless [`ApiKeyLayer::realm`](crate::ApiKeyLayer::realm)
/// says otherwise.
pub const DEFAULT_REALM: &str = "api";

/// In a request's extensions once an `ApiKeyLayer` has let it through.
#[derive(Debug, Clone)]
pub(crate) struct LayerContext {
    /// The layer's realm, for rejections made further in.
    pub(crate) realm: Arc<str>,
    /// Let through without a key by an optional layer.
    pub(crate) anonymous: bool,
    /// The layer records usage: an inner policy reports its denials in an
    /// [`InnerReport`].
    pub(crate) wants_outcome: bool,
    /// ...and it has no route template: the report carries the one the router matched.
    /// (Only axum's router has templates.)
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) wants_route: bool,
}

/// In a response's extensions when an inner policy has something to report outward.
#[derive(Debug, Clone, Default)]
pub(crate) struct InnerReport {
    /// The inner policy turned the request away with this outcome.
    pub(crate) denied: Option<Outcome>,
    /// The route template the router matched.
    #[cfg(feature = "axum")]
    pub(crate) route: Option<axum::extract::MatchedPath>,
}

/// What happened to a request, as precisely as keygate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// Authenticated and authorized; the inner service answered.
    Allowed,
    /// Let through without a key by an optional layer.
    Anonymous,
    /// Let through by a fail-open verifier while the key service was down.
    FailOpen,
    /// No credential.
    NoKey,
    /// Credentials in more than one place, or a repeated credential.
    Conflict,
    /// Empty, too long, bad bytes, or failed the format check.
    Malformed,
    /// Unknown key.
    NotFound,
    /// Revoked key.
    Revoked,
    /// Expired key.
    Expired,
    /// Disabled key.
    Disabled,
    /// Valid key without the scope the route needs.
    InsufficientScope,
    /// The key service could not answer and nothing stale was usable.
    Unavailable,
    /// The key's own rate limit was exceeded.
    RateLimited,
}

impl Outcome {
    /// Whether the request reached the inner service.
    pub fn is_allowed(self) -> bool {
        matches!(self, Self::Allowed | Self::Anonymous | Self::FailOpen)
    }

    /// The snake_case name used on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Anonymous => "anonymous",
            Self::FailOpen => "fail_open",
            Self::NoKey => "no_key",
            Self::Conflict => "conflict",
            Self::Malformed => "malformed",
            Self::NotFound => "not_found",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::Disabled => "disabled",
            Self::InsufficientScope => "insufficient_scope",
            Self::Unavailable => "unavailable",
            Self::RateLimited => "rate_limited",
        }
    }
}
