//! The admin API's types (protocol v1; the middleware's side is in [`wire`](crate::wire)),
//! shared by the server, the store and [`AdminClient`](super::AdminClient). Their
//! validation, which needs the HTTP error type, is in `validate`.

use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;

use crate::principal::RateLimit;

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

/// A key as the admin API shows it: never the key itself, nor its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Stable, non-secret id: `key_` + 22 base62 characters.
    pub key_id: String,
    /// Who owns the key.
    pub owner: String,
    /// A human name.
    pub name: String,
    /// The key's own scopes (roles' scopes are added at verification).
    pub scopes: Vec<String>,
    /// Role names.
    pub roles: Vec<String>,
    /// `live`, `test`, or another `[a-z][a-z0-9_-]{0,31}` name.
    pub environment: String,
    /// When the key stops working, if ever.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// A disabled key answers `DISABLED` until enabled again.
    pub disabled: bool,
    /// A revoked key answers `REVOKED`, for good.
    pub revoked: bool,
    /// When it was revoked.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Free-form JSON object.
    pub meta: serde_json::Value,
    /// Optional per-key rate limit, enforced by the middleware.
    pub ratelimit: Option<RateLimit>,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change through the admin API.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub updated_at: Option<OffsetDateTime>,
    /// The newest request in the usage the middleware reported (not updated by verify).
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    /// The current secret's first characters (`kg_3fA9`), safe to show.
    pub key_prefix: String,
}

/// `POST /v1/keys`: a key to create. Unknown fields are rejected.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// Who owns the key (1 to 128 bytes, no control characters).
    pub owner: String,
    /// A human name (1 to 128 bytes, no control characters).
    pub name: String,
    /// Scopes (`resource:action`), at most 64.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Role names, at most 32. A role need not exist yet: it grants nothing until
    /// `PUT /v1/roles/{name}` defines it.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Environment; default `live`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// Expiry, which must be in the future; default never.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// A JSON object of at most 4 KiB; default `{}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
    /// A rate limit for the middleware to enforce; default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratelimit: Option<RateLimit>,
}

/// `PATCH /v1/keys/{id}`: the fields to change. Absent fields stay as they are;
/// `expires_at: null` and `ratelimit: null` remove them. Unknown fields are rejected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    /// New name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// New scopes (replaces the list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// New roles (replaces the list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    /// Disable or enable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// New metadata object (replaces it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Value>,
    /// New expiry (`null` removes it); must be in the future.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "double_option_time")]
    pub expires_at: Option<Option<OffsetDateTime>>,
    /// New rate limit (`null` removes it).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "double_option")]
    pub ratelimit: Option<Option<RateLimit>>,
}

impl KeyPatch {
    /// Whether the patch changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `POST /v1/keys/{id}/rotate`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the old key keeps working, in seconds (0 to 30 days; default 0).
    #[serde(default)]
    pub grace_s: u64,
}

/// `PUT /v1/roles/{name}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRequest {
    /// The role's scopes, at most 64 (replaces the list).
    pub scopes: Vec<String>,
}

/// A role as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleInfo {
    /// The role's name.
    pub name: String,
    /// Its scopes.
    pub scopes: Vec<String>,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// One audit record. Records are only ever appended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Which token acted: `admin`.
    pub actor: String,
    /// `key.create`, `key.update`, `key.rotate`, `key.revoke`, `role.put`.
    pub action: String,
    /// The key concerned, if any.
    pub key_id: Option<String>,
    /// What changed: new values on create, `{"field": {"from", "to"}}` on update.
    /// Never a key or a key hash.
    pub changes: serde_json::Value,
}

/// One minute of one key's usage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UsageBucket {
    /// The minute's start.
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// Requests seen.
    pub requests: u64,
    /// Requests let through.
    pub allowed: u64,
    /// Requests refused.
    pub denied: u64,
    /// Responses 200–299.
    pub status_2xx: u64,
    /// Responses 400–499.
    pub status_4xx: u64,
    /// Responses 500–599.
    pub status_5xx: u64,
    /// Sum of latencies, milliseconds.
    pub latency_ms_sum: f64,
    /// Largest latency, milliseconds.
    pub latency_ms_max: f64,
}

/// `GET /v1/usage` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    /// The key.
    pub key_id: String,
    /// Minutes with traffic, oldest first.
    pub buckets: Vec<UsageBucket>,
}

pub(crate) use crate::wire::{Alert, AlertKind};

/// Distinguishes an absent field (`None`) from `null` (`Some(None)`).
fn double_option<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

mod double_option_time {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;

    pub fn serialize<S: Serializer>(v: &Option<Option<OffsetDateTime>>, s: S) -> Result<S::Ok, S::Error> {
        time::serde::rfc3339::option::serialize(&v.flatten(), s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<OffsetDateTime>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "time::serde::rfc3339::option")] Option<OffsetDateTime>);
        Wrap::deserialize(d).map(|w| Some(w.0))
    }
}
