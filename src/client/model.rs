//! The admin API's types (protocol v1; the middleware's side is in [`wire`](crate::wire)):
//! what [`AdminClient`](super::AdminClient) sends and reads, and what the key service
//! (feature `server`) takes and answers.

use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;

use crate::principal::RateLimit;
use crate::quota::{Credits, Limit};

/// A key as the admin API shows it: never the key itself, nor its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
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
    #[cfg_attr(feature = "server", schema(value_type = Object))]
    pub meta: serde_json::Value,
    /// Optional per-key rate limit, enforced by the middleware: the limit named
    /// `requests` in `limits`, shown here too for older clients.
    pub ratelimit: Option<RateLimit>,
    /// Named rate limits (at most 16), enforced by the middleware.
    #[serde(default)]
    pub limits: Vec<Limit>,
    /// Credits, spent by the middleware. Middlewares count them per process, each
    /// starting from `remaining`, unless they use `RedisLimits` (feature `redis`): then
    /// one count in Redis, restarted from these credits when they are set again, and
    /// `remaining` is what the key service last reconciled from it.
    #[serde(default)]
    pub credits: Option<Credits>,
    /// Which setting of the credits `credits` holds: changes whenever an operator sets
    /// them (create, `PATCH` with `credits`), never when the reconciler writes the
    /// fleet-wide count back into `remaining`. `null` for a key whose credits were never set.
    #[serde(default)]
    pub credits_revision: Option<u64>,
    /// When the key service last wrote `credits.remaining` from the fleet-wide count in
    /// Redis (only when it had changed); `null` since an operator's set, or without a
    /// reconciler.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub credits_reconciled_at: Option<OffsetDateTime>,
    /// Networks the key may be used from (CIDRs); empty: any.
    #[serde(default)]
    pub allowed_networks: Vec<String>,
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
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// Who owns the key (1 to 128 bytes, no control characters).
    pub owner: String,
    /// A human name (1 to 128 bytes, no control characters).
    pub name: String,
    /// Scopes (`resource:action`), at most 64.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Role names, at most 32, each defined before (`PUT /v1/roles/{name}`): an
    /// unknown role is refused with 400 `unknown_role`.
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
    #[cfg_attr(feature = "server", schema(value_type = Option<Object>))]
    pub meta: Option<serde_json::Value>,
    /// A rate limit for the middleware to enforce; default none. It is the limit named
    /// `requests`: sending it and a `requests` limit in `limits` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratelimit: Option<RateLimit>,
    /// Named rate limits, at most 16 (names `[a-z0-9_-]{1,32}`, each once); default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
    /// Credits; default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<Credits>,
    /// Networks the key may be used from: IPv4 and IPv6 CIDRs or addresses, at most 32;
    /// default none (any network). A request from elsewhere gets 403 `ip_not_allowed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_networks: Vec<String>,
    /// Allows a key with neither scopes nor roles (it authenticates, and passes no
    /// scope or role check); without it such a key is refused with 400 `empty_key`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_empty: bool,
}

/// `PATCH /v1/keys/{id}`: the fields to change. Absent fields stay as they are;
/// `expires_at: null`, `ratelimit: null` and `credits: null` remove them. Unknown fields are rejected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
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
    #[cfg_attr(feature = "server", schema(value_type = Option<Object>))]
    pub meta: Option<serde_json::Value>,
    /// New expiry (`null` removes it); must be in the future.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "double_option_time")]
    #[cfg_attr(feature = "server", schema(value_type = Option<String>, format = DateTime))]
    pub expires_at: Option<Option<OffsetDateTime>>,
    /// New rate limit (`null` removes it).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "double_option")]
    #[cfg_attr(feature = "server", schema(value_type = Option<RateLimit>))]
    pub ratelimit: Option<Option<RateLimit>>,
    /// New named limits (replaces the list; `[]` removes them all). With `ratelimit`
    /// too, the list may not name `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Vec<Limit>>,
    /// New credits (`null` removes them).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "double_option")]
    #[cfg_attr(feature = "server", schema(value_type = Option<Credits>))]
    pub credits: Option<Option<Credits>>,
    /// New network allowlist, replacing the old one (`[]`: any network again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_networks: Option<Vec<String>>,
    /// Allows the patch to leave the key with neither scopes nor roles (refused with
    /// 400 `empty_key` otherwise). Changes nothing by itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_empty: bool,
}

impl KeyPatch {
    /// Whether the patch changes nothing (`allow_empty` changes nothing by itself).
    pub fn is_empty(&self) -> bool {
        Self { allow_empty: false, ..self.clone() } == Self::default()
    }
}

/// An owner's limits and credits, shared by all of its keys (`GET` and `PUT
/// /v1/owners/{owner}`). An owner nothing was set for shows empty ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct OwnerInfo {
    /// The owner, as keys name it.
    pub owner: String,
    /// Named rate limits, counted for all of the owner's keys together.
    #[serde(default)]
    pub limits: Vec<Limit>,
    /// Credits, spent by all of the owner's keys together (per process, or fleet-wide
    /// with `RedisLimits`).
    #[serde(default)]
    pub credits: Option<Credits>,
    /// Which setting of the credits `credits` holds: changes whenever a `PUT` changes
    /// them, never when the reconciler writes the fleet-wide count back into
    /// `remaining`. `null` when credits were never set.
    #[serde(default)]
    pub credits_revision: Option<u64>,
    /// When the key service last wrote `credits.remaining` from the fleet-wide count in
    /// Redis (only when it had changed); `null` since the last `PUT` that changed the
    /// credits, or without a reconciler.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub credits_reconciled_at: Option<OffsetDateTime>,
    /// Networks every key of the owner may be used from (CIDRs); empty: any.
    #[serde(default)]
    pub allowed_networks: Vec<String>,
    /// Last change, if any was made.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub updated_at: Option<OffsetDateTime>,
}

/// `PUT /v1/owners/{owner}`: the owner's limits and credits, replacing what was set.
/// Unknown fields are rejected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OwnerQuota {
    /// Named rate limits, at most 16; default none.
    #[serde(default)]
    pub limits: Vec<Limit>,
    /// Credits; default (`null`) none.
    #[serde(default)]
    pub credits: Option<Credits>,
    /// Networks every key of the owner may be used from, besides each key's own list
    /// (CIDRs or addresses, at most 32); default none (any network).
    #[serde(default)]
    pub allowed_networks: Vec<String>,
}

/// A role as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct AuditRecord {
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The name of the token that acted (`bootstrap-admin` for the configured admin token,
    /// `offline-cli` for `keygate-server tokens create --database`).
    pub actor: String,
    /// `key.create`, `key.update`, `key.rotate`, `key.revoke`, `role.put`, `role.delete`, `owner.put`,
    /// `alert.ack`, `token.create`, `token.revoke`.
    pub action: String,
    /// The key concerned, if any.
    pub key_id: Option<String>,
    /// What changed: new values on create, `{"field": {"from", "to"}}` on update.
    /// Never a key or a key hash.
    #[cfg_attr(feature = "server", schema(value_type = Object))]
    pub changes: serde_json::Value,
}

/// How `GET /v1/usage` groups what it counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum UsageGroupBy {
    /// One bucket per minute with traffic (minute rows; the default). Minutes that
    /// retention rolled up into hours are no longer there.
    #[default]
    Minute,
    /// One bucket per hour: rolled-up hour rows plus the minute rows not rolled up yet.
    Hour,
    /// One bucket per UTC day, from the same rows as `hour`.
    Day,
    /// One bucket per (route, method, outcome) over the whole span, from the
    /// per-route hour rows.
    Route,
}

impl UsageGroupBy {
    /// `minute`, `hour`, `day` or `route`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Route => "route",
        }
    }
}

/// One bucket of usage: a minute, hour or day, or (grouped by route) one route, method
/// and outcome over the span asked for.
///
/// Fields added after the first version (`route`, `method`, `outcome`, `status_1xx`,
/// `status_3xx`, the percentiles) read as absent from older key services, and older
/// readers ignore them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct UsageBucket {
    /// The bucket's start (grouped by route: the start of the span).
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// Route template, gRPC method or raw path (grouped by route only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// HTTP method (grouped by route only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// `allowed`, or the denial (`not_found`, `insufficient_scope`, ...; grouped by
    /// route only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Requests seen.
    pub requests: u64,
    /// Requests let through.
    pub allowed: u64,
    /// Requests refused.
    pub denied: u64,
    /// Responses 100–199 (and any status outside 100–599).
    #[serde(default)]
    pub status_1xx: u64,
    /// Responses 200–299.
    pub status_2xx: u64,
    /// Responses 300–399.
    #[serde(default)]
    pub status_3xx: u64,
    /// Responses 400–499.
    pub status_4xx: u64,
    /// Responses 500–599.
    pub status_5xx: u64,
    /// Sum of latencies, milliseconds.
    pub latency_ms_sum: f64,
    /// Largest latency, milliseconds (exact).
    pub latency_ms_max: f64,
    /// Median latency, milliseconds, within [`LATENCY_RELATIVE_ERROR`](crate::LATENCY_RELATIVE_ERROR);
    /// `null` without latencies (only usage stored before histograms has none).
    #[serde(default)]
    pub latency_ms_p50: Option<f64>,
    /// 90th percentile latency, milliseconds, within the same error.
    #[serde(default)]
    pub latency_ms_p90: Option<f64>,
    /// 99th percentile latency, milliseconds, within the same error.
    #[serde(default)]
    pub latency_ms_p99: Option<f64>,
}

impl Default for UsageBucket {
    /// An empty bucket starting at the Unix epoch.
    fn default() -> Self {
        Self {
            start: OffsetDateTime::UNIX_EPOCH,
            route: None,
            method: None,
            outcome: None,
            requests: 0,
            allowed: 0,
            denied: 0,
            status_1xx: 0,
            status_2xx: 0,
            status_3xx: 0,
            status_4xx: 0,
            status_5xx: 0,
            latency_ms_sum: 0.0,
            latency_ms_max: 0.0,
            latency_ms_p50: None,
            latency_ms_p90: None,
            latency_ms_p99: None,
        }
    }
}

/// `GET /v1/usage` answer: `{"key_id" | "owner", "group_by", "since", "until",
/// "buckets": [...]}`, buckets oldest first (grouped by route: by route, method and
/// outcome).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct UsageReport {
    /// The key asked about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The owner asked about: the buckets sum all of the owner's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// How the buckets are grouped.
    #[serde(default)]
    pub group_by: UsageGroupBy,
    /// Start of the span covered: `since` rounded down to its bucket (to its hour
    /// grouped by route). Absent from older key services.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// End of the span covered, exclusive: `until` rounded up to its bucket.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub until: Option<OffsetDateTime>,
    /// Buckets with traffic.
    pub buckets: Vec<UsageBucket>,
}

/// What to ask `GET /v1/usage` ([`AdminClient::usage_report`](super::AdminClient::usage_report)):
/// one key or one owner, a span (default: the last 24 hours) and a grouping (default
/// per minute).
///
/// ```
/// use keygate::client::{UsageGroupBy, UsageQuery};
///
/// let q = UsageQuery::owner("acme").group_by(UsageGroupBy::Day);
/// assert_eq!(q.owner.as_deref(), Some("acme"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct UsageQuery {
    /// One key's usage.
    pub key_id: Option<String>,
    /// The sum over an owner's keys.
    pub owner: Option<String>,
    /// From (default: 24 hours before `until`, or before now).
    pub since: Option<OffsetDateTime>,
    /// Until, exclusive (default: now).
    pub until: Option<OffsetDateTime>,
    /// Grouping (default per minute).
    pub group_by: Option<UsageGroupBy>,
}

impl UsageQuery {
    /// One key's usage.
    pub fn key(key_id: impl Into<String>) -> Self {
        Self { key_id: Some(key_id.into()), ..Self::default() }
    }

    /// The sum over every key of `owner`.
    pub fn owner(owner: impl Into<String>) -> Self {
        Self { owner: Some(owner.into()), ..Self::default() }
    }

    /// From this time on.
    pub fn since(mut self, since: OffsetDateTime) -> Self {
        self.since = Some(since);
        self
    }

    /// Until this time (exclusive).
    pub fn until(mut self, until: OffsetDateTime) -> Self {
        self.until = Some(until);
        self
    }

    /// Grouped so.
    pub fn group_by(mut self, group_by: UsageGroupBy) -> Self {
        self.group_by = Some(group_by);
        self
    }
}

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

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Middlewares: verify, usage, events. Generated ones start with `kgs_`.
    Service,
    /// The admin API. Generated ones start with `kga_`.
    Admin,
}

impl TokenKind {
    /// `service` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Admin => "admin",
        }
    }

    /// Reads `service` or `admin`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "service" => Some(Self::Service),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    /// The prefix of tokens generated for this kind, so that secret scanners spot them.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Service => "kgs_",
            Self::Admin => "kga_",
        }
    }
}

impl std::fmt::Display for TokenKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token as the admin API shows it: never the token itself, nor its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct TokenInfo {
    /// Stable, non-secret id: `tok_` + 22 base62 characters, or the name of a
    /// bootstrap token.
    pub id: String,
    /// Unique name; the audit log's actor for what the token does.
    pub name: String,
    /// What the token may do.
    pub kind: TokenKind,
    /// The token's first characters (`kga_3fA9`), to recognise it.
    pub prefix: String,
    /// Configured at start (environment, flags, files, builder) rather than stored:
    /// it cannot be revoked through the API.
    #[serde(default)]
    pub bootstrap: bool,
    /// Creation time (for a bootstrap token, when this replica started).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last request authenticated with it, to within the write interval (30 s).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    /// When it was revoked; a revoked token is refused everywhere.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// What the token may do.
    pub kind: TokenKind,
    /// Unique name (`[A-Za-z0-9][A-Za-z0-9._-]*`, at most 64 bytes, not starting with
    /// `bootstrap-`).
    pub name: String,
}

/// A created token: the raw token (shown this once) and its fields.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct CreatedToken {
    /// The token's fields.
    #[serde(flatten)]
    pub info: TokenInfo,
    /// The raw token. Store it now: the key service keeps only its digest.
    pub token: String,
}

impl std::fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedToken").field("info", &self.info).field("token", &"<redacted>").finish()
    }
}

/// A webhook endpoint as `GET /v1/webhooks` shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct WebhookEndpoint {
    /// `wh_` + 22 base62 characters.
    pub id: String,
    /// Where deliveries are posted.
    pub url: String,
    /// The event types it receives (`key.created`, or a prefix such as `alert.*`);
    /// empty: every type.
    pub events: Vec<String>,
    /// Free text.
    pub description: String,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Deliveries dropped, oldest first, because its queue of pending deliveries was full.
    pub dropped: u64,
    /// Deliveries waiting for a (next) attempt.
    pub pending: u64,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting for its first or next attempt.
    Pending,
    /// Answered with a 2xx.
    Delivered,
    /// Given up on: too many attempts or too old.
    Failed,
    /// Dropped unsent because the endpoint's queue was full.
    Dropped,
}

impl DeliveryState {
    /// The name on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Dropped => "dropped",
        }
    }

    /// Reads the stored name (the key service's store).
    #[cfg(feature = "server")]
    pub(crate) fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::Failed, Self::Dropped].into_iter().find(|d| d.as_str() == s)
    }
}

/// One entry of `GET /v1/webhooks/{id}/deliveries`: one event to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct WebhookDelivery {
    /// The delivery's id (increasing).
    pub id: i64,
    /// The event's id, the same for every endpoint and every attempt (`keygate-event-id`).
    pub event_id: String,
    /// The event's type (`key.rotated`).
    pub event_type: String,
    /// Where it stands.
    pub state: DeliveryState,
    /// Attempts made.
    pub attempts: u32,
    /// The last answer's HTTP status, if one came.
    pub last_status: Option<u16>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the event was queued.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the last attempt was made.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_attempt_at: Option<OffsetDateTime>,
    /// When the next attempt is due (pending deliveries).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
    /// When a 2xx answered it.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub delivered_at: Option<OffsetDateTime>,
}
