//! [`Outcome`]: what happened to a request. The rejections, the usage records and the
//! layer all speak it, so it sits at the bottom of the crate and reads nothing.

use serde::{Deserialize, Serialize};

/// What happened to a request, as precisely as keygate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
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
    /// Valid key of an environment the route does not take.
    WrongEnvironment,
    /// Valid key used from outside its (or its owner's) allowed networks.
    IpNotAllowed,
    /// The key service could not answer and nothing stale was usable.
    Unavailable,
    /// A rate limit of the key (or of its owner) was exceeded.
    RateLimited,
    /// The key's (or its owner's) credits were spent.
    UsageExceeded,
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
            Self::WrongEnvironment => "wrong_environment",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::Unavailable => "unavailable",
            Self::RateLimited => "rate_limited",
            Self::UsageExceeded => "usage_exceeded",
        }
    }
}
