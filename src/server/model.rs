//! The admin API's limits and the request bodies only the key service reads. The types
//! it shares with [`AdminClient`](crate::client::AdminClient) are the client's
//! ([`crate::client`]), used here under their one path; their validation, which needs
//! the HTTP error type, is in `validate`.

use serde::{Deserialize, Serialize};

pub(crate) use crate::client::{
    AuditRecord, KeyInfo, KeyPatch, NewKey, RoleInfo, UsageBucket, UsageGroupBy, UsageReport,
};

/// Longest owner or key name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Most scopes one key or role may hold.
pub const MAX_SCOPES: usize = 64;
/// Most roles one key may hold.
pub const MAX_ROLES: usize = 32;
/// Largest `meta` object, serialized, in bytes.
pub const MAX_META_BYTES: usize = 4096;
/// Longest rotation grace: 30 days.
pub const MAX_GRACE_S: u64 = 30 * 24 * 3600;
/// Longest rate-limit period: one day.
pub const MAX_RATELIMIT_PERIOD_S: u64 = 24 * 3600;
/// The environment a key gets when the request names none.
pub const DEFAULT_ENVIRONMENT: &str = "live";

/// `POST /v1/keys/{id}/rotate`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the old key keeps working, in seconds (0 to 30 days; default 0).
    #[serde(default)]
    pub grace_s: u64,
}

/// `PUT /v1/roles/{name}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleRequest {
    /// The role's scopes, at most 64 (replaces the list).
    pub scopes: Vec<String>,
}

pub(crate) use crate::wire::{Alert, AlertKind};
