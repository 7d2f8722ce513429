//! Wire protocol v1 between the middleware and the key service: every message both
//! sides exchange, as one set of types.
//!
//! [`HttpVerifier`](crate::HttpVerifier), [`RevocationListener`](crate::RevocationListener)
//! and [`HttpUsageExporter`](crate::HttpUsageExporter) read and write these types, and
//! so does the reference key service (feature `server`): the two sides cannot drift
//! apart without `tests/wire_roundtrip.rs` noticing.
//!
//! # Transport
//!
//! JSON over HTTP/1.1 or HTTP/2, UTF-8. The middleware authenticates with
//! `Authorization: Bearer <service token>`. Neither side follows redirects: a 3xx
//! answer is an error, and its target receives nothing.
//!
//! # Verify: `POST /v1/keys/verify` ([`VERIFY_PATH`])
//!
//! Request ([`VerifyRequest`]): `{"digest": "<64 lower-case hex digits of SHA-256(key)>"}`.
//! The raw key never leaves the middleware; the key service stores and looks keys up
//! by that digest. Older clients send `{"key": "<raw key>"}`, which the key service
//! still accepts.
//!
//! **Why a digest, and what it gives away.** Whatever sits between the middleware and
//! the key service (a proxy, a TLS-terminating load balancer, request logs, the key
//! service's own memory) sees digests only, and a digest is not a credential: a
//! protected service hashes what it is given, so presenting a digest verifies the digest
//! of the digest. Recovering a key from its digest means inverting SHA-256 over the
//! key's random part; a generated key has 30 base62 characters (about 178 bits), far
//! beyond any search. A holder of the service token can ask about a digest it already
//! has (and learn that key's owner, scopes and roles, as it could with the raw key) and
//! can follow the event stream (key ids only); it cannot list keys, cannot turn a digest
//! into a key, and cannot use what it learns against a protected service. One caveat:
//! keys of a low-entropy format of your own ([`KeyFormat::opaque`](crate::KeyFormat::opaque)
//! with short or guessable secrets) can be found from their digest by trying
//! candidates, as they could be from the stored digests; use generated keys.
//!
//! Answer, always `200` ([`VerifyAnswer`]):
//!
//! - valid ([`ValidKey`]): `{"valid": true, "key_id", "owner", "name", "scopes": [...],
//!   "roles": [...], "environment", "expires_at": RFC 3339 or null, "meta": {...},
//!   "ratelimit": {"limit", "period_s"} or null, "limits"?: [Limit...], "credits"?: Credits,
//!   "owner_limits"?: [Limit...], "owner_credits"?: Credits, "allowed_networks"?: [CIDR...],
//!   "owner_allowed_networks"?: [CIDR...]}` (the networks the key, and every key of its
//!   owner, may be used from; a middleware refuses a request from elsewhere with 403
//!   `ip_not_allowed`). `expires_at` is the earliest
//!   of the key's expiry and, after a rotation, the end of the old secret's grace: no cache
//!   may keep the answer longer. `limits` are the key's named limits ([`Limit`]
//!   `{"name", "limit", "period_s", "burst"?}`), `credits` its credits ([`Credits`]
//!   `{"remaining", "refill"?}`); the `owner_` fields are the owner's, shared by all of
//!   its keys. Each is left out when empty, and read as empty when absent (answers of
//!   older key services). `ratelimit` repeats the limit named `requests` for older
//!   middlewares; a middleware that finds `ratelimit` and no `requests` limit reads it
//!   as that limit.
//! - refused ([`Refusal`]): `{"valid": false, "code": "NOT_FOUND" | "REVOKED" |
//!   "EXPIRED" | "DISABLED", "key_id"?}` ([`Reason`]). `key_id` is present when the key
//!   exists (every code but `NOT_FOUND`), so that the middleware can attribute denials;
//!   it is never shown to the caller of the protected service.
//!
//! Any other status, an unknown `code`, or a body that does not parse is an error on the
//! middleware's side ([`VerifyError`](crate::VerifyError), HTTP 503), never a denial.
//!
//! # Batch verify: `POST /v1/keys/verify-batch` ([`VERIFY_BATCH_PATH`])
//!
//! Request ([`VerifyBatchRequest`]): `{"digests": ["<hex>", ...]}`, 1 to
//! [`MAX_VERIFY_BATCH`] (500) digests, never raw keys. Answer, `200`
//! ([`VerifyBatchAnswer`]): `{"answers": [...]}`, one [`VerifyAnswer`] per digest in
//! the request's order. A [`CachedVerifier`](crate::CachedVerifier) uses it to refresh
//! hot verdicts before they go stale and to revalidate what it holds after a `reset`:
//! one call instead of hundreds, off the request path. A batch takes one slot of the key
//! service's verify concurrency; shed, it is a `503` like a single verify.
//!
//! # Events: `GET /v1/events` ([`EVENTS_PATH`])
//!
//! Server-Sent Events (`text/event-stream`). The stream opens with the comment
//! `: keygate events v1` ([`EVENTS_GREETING`]). Event names are [`EventName`]s:
//!
//! | event | data | meaning |
//! | --- | --- | --- |
//! | `revoked`, `updated`, `rotated` ([`KeyEvent`]) | [`KeyChanged`] `{"key_id"}` | forget what is cached for this key id |
//! | `reset` | [`ResetData`] `{"reason", "missed"?}` | forget everything (`lagged`: this subscriber fell behind; `bulk`: a change touched too many keys; `gap`: replicas lost touch) |
//! | `alert` | [`Alert`] | a key's usage looks anomalous, it expires soon, or it is past the rotation policy's maximum age |
//! | `heartbeat` | [`Heartbeat`] `{"at"}` | sign of life, every 15 s by default |
//!
//! A subscriber treats unknown events as signs of life. A `revoked`, `updated` or
//! `rotated` event whose data cannot be read must be treated like `reset`.
//!
//! **Resuming.** `revoked`, `updated`, `rotated` and the `reset` of a change too large
//! to list (`bulk`) carry an SSE `id:`: the change's id in the key service's change log,
//! a decimal number that only grows (shared by every replica of one database).
//! `alert`, `heartbeat` and the other `reset`s carry none, which leaves an SSE client's
//! last event id as it was. Every stream's response has the header
//! `keygate-events-position: <id>` ([`EVENTS_POSITION_HEADER`]): the stream delivers
//! every change after that id. A subscriber that reconnects with `Last-Event-ID: <id>`
//! ([`LAST_EVENT_ID_HEADER`]), the last id it saw (or the position, if it saw none),
//! gets the changes it missed from the log, in order, then the live ones, none twice;
//! the response then has `keygate-events-resumed: <id>` ([`EVENTS_RESUMED_HEADER`])
//! and the subscriber may keep what it cached. Otherwise the stream starts with `reset`,
//! reason `expired` (the id is older than the log's retention), `future` (newer than
//! any id of this log) or `bad_id` (not a number), then goes live. A key service that
//! answers without `keygate-events-resumed` (an older one, which sends no ids) did not
//! resume: the subscriber must forget everything.
//!
//! # Usage: `POST /v1/usage` ([`USAGE_PATH`])
//!
//! Two request bodies are accepted on the same path; the answer to both is `202`
//! ([`UsageAccepted`]) `{"accepted": n}`.
//!
//! - **Aggregates** ([`AggregateBatch`](crate::AggregateBatch)), what
//!   [`HttpUsageExporter`](crate::HttpUsageExporter) sends once per flush interval:
//!   `{"batch_id", "rows": [AggregateRow...], "networks": [ClientNetwork...], "dropped": n,
//!   "overflowed": n, "networks_dropped": n}`. A row is the requests of one minute with
//!   the same key id, route, method and outcome: `{"minute", "key_id", "route", "method",
//!   "outcome", "requests", "status": {"1xx", "2xx", "3xx", "4xx", "5xx"}, "latency",
//!   "last_at_ms"}`, with `latency` a [`LatencyHistogram`](crate::LatencyHistogram) in its
//!   sparse form `{"count", "sum_us", "max_us", "buckets": [[index, count]...]}` (the
//!   bucket layout is fixed and documented on the type). The key service applies a
//!   `batch_id` at most once: a batch sent again answers `{"accepted": n,
//!   "duplicate": true}` and adds nothing. `accepted` counts requests; requests not
//!   stored are counted in the answer by reason.
//! - **Raw events** ([`UsageBatch`](crate::UsageBatch)), what keygate before aggregation
//!   sent and what a custom exporter may still send: `{"events": [UsageEvent...],
//!   "dropped": n}`. There is no batch id, so a retried raw batch can count twice.
//!   `accepted` counts events.
//!
//! The reference key service takes at most 20 000 rows, 20 000 networks and 16 MiB per
//! aggregate batch, and 10 000 events and 4 MiB per raw batch; the rest of what it checks
//! (clock skew, key ids, how long batch ids are remembered) is documented on
//! `keygate::server` (feature `server`).
//!
//! # Errors
//!
//! Every refusal of a request (400, 401, 404, 409, 413, 503, 500) carries
//! [`ErrorBody`] `{"error": "<code>", "message": "<what is wrong>"}`.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;

use crate::key::{ApiKey, KeyDigest};
use crate::principal::RateLimit;
use crate::quota::{Credits, Limit};
use crate::verify::Reason;

/// Path of the verify call.
pub const VERIFY_PATH: &str = "/v1/keys/verify";
/// Path of the batch verify call.
pub const VERIFY_BATCH_PATH: &str = "/v1/keys/verify-batch";
/// Most digests one batch verify call may carry: 500 (about 34 KB of JSON, inside the
/// key service's 64 KiB request bound).
pub const MAX_VERIFY_BATCH: usize = 500;
/// Path of the event stream.
pub const EVENTS_PATH: &str = "/v1/events";
/// Path of the usage upload.
pub const USAGE_PATH: &str = "/v1/usage";
/// The SSE comment a key service opens each event stream with.
pub const EVENTS_GREETING: &str = "keygate events v1";
/// The request header a subscriber resumes with: the last event id it saw.
pub const LAST_EVENT_ID_HEADER: &str = "last-event-id";
/// The response header of every event stream: the change log id it delivers changes
/// after.
pub const EVENTS_POSITION_HEADER: &str = "keygate-events-position";
/// The response header of a resumed event stream: the `Last-Event-ID` it resumed from.
pub const EVENTS_RESUMED_HEADER: &str = "keygate-events-resumed";

/// Reads an event id (`id:` field, `Last-Event-ID`): a decimal `u64`, at most 20 digits,
/// nothing else (no sign, no spaces).
pub fn parse_event_id(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

// ---- verify

/// The body of `POST /v1/keys/verify`.
///
/// `Debug` never shows a raw key (see [`ApiKey`]).
#[derive(Debug, Clone)]
pub enum VerifyRequest {
    /// `{"digest": "<hex SHA-256>"}`: what keygate sends.
    Digest(KeyDigest),
    /// `{"key": "<raw key>"}`: what older clients send.
    Key(ApiKey),
}

impl VerifyRequest {
    /// The digest the key service looks the key up by.
    pub fn digest(&self) -> KeyDigest {
        match self {
            Self::Digest(digest) => *digest,
            Self::Key(key) => key.digest(),
        }
    }
}

impl Serialize for VerifyRequest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(1))?;
        match self {
            Self::Digest(digest) => map.serialize_entry("digest", &digest.to_hex())?,
            Self::Key(key) => map.serialize_entry("key", key.expose_secret())?,
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for VerifyRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            digest: Option<String>,
            key: Option<String>,
        }
        // Messages never repeat the values: one of them is a secret.
        match Raw::deserialize(d)? {
            Raw { digest: Some(hex), key: None } => KeyDigest::from_hex(&hex)
                .map(Self::Digest)
                .ok_or_else(|| D::Error::custom("`digest` must be 64 hex digits")),
            Raw { digest: None, key: Some(key) } => Ok(Self::Key(ApiKey::new(key))),
            _ => Err(D::Error::custom("expected exactly one of `digest` and `key`")),
        }
    }
}

/// The answer to `POST /v1/keys/verify`, tagged by its `valid` field.
#[derive(Debug, Clone, PartialEq)]
// A valid answer is the common one and is read once per cache miss: boxing it would
// cost an allocation for nothing, and change the public type.
#[allow(clippy::large_enum_variant)]
pub enum VerifyAnswer {
    /// `{"valid": true, ...}`.
    Valid(ValidKey),
    /// `{"valid": false, "code", "key_id"?}`.
    Invalid(Refusal),
}

/// The fields of a valid answer. Missing text fields read as empty, a missing `meta` as
/// `null`; `key_id` is required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ValidKey {
    /// The key's stable id.
    pub key_id: String,
    /// Who owns the key.
    #[serde(default)]
    pub owner: String,
    /// The key's human name.
    #[serde(default)]
    pub name: String,
    /// Scopes: the key's own and its roles'.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Role names.
    #[serde(default)]
    pub roles: Vec<String>,
    /// `live`, `test`, ...
    #[serde(default)]
    pub environment: String,
    /// When the answer stops being true, if ever (RFC 3339 or `null`).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Free-form JSON.
    #[serde(default)]
    #[cfg_attr(feature = "server", schema(value_type = Object))]
    pub meta: serde_json::Value,
    /// The key's rate limit, if any: its limit named `requests`, for older middlewares.
    #[serde(default)]
    pub ratelimit: Option<RateLimit>,
    /// The key's named limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
    /// The key's credits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<Credits>,
    /// The owner's limits, shared by all of its keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_limits: Vec<Limit>,
    /// The owner's credits, shared by all of its keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_credits: Option<Credits>,
    /// Changes whenever an operator sets the key's credits (and only then): a fleet-wide
    /// engine starts counting afresh from `credits` when it differs from what it counted
    /// from, and otherwise keeps its own count (which the key service reconciles back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits_revision: Option<u64>,
    /// The same for `owner_credits`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_credits_revision: Option<u64>,
    /// Networks the key may be used from (CIDRs); empty or absent: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_networks: Vec<String>,
    /// Networks every key of the owner may be used from (CIDRs); empty or absent: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_allowed_networks: Vec<String>,
}

/// The body of `POST /v1/keys/verify-batch`: `{"digests": ["<hex SHA-256>", ...]}`, from
/// 1 to [`MAX_VERIFY_BATCH`] digests. Digests only: a batch never carries a raw key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyBatchRequest {
    /// The digests to verify, answered in this order (repeats are answered twice).
    pub digests: Vec<KeyDigest>,
}

impl Serialize for VerifyBatchRequest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Raw {
            digests: Vec<String>,
        }
        Raw { digests: self.digests.iter().map(KeyDigest::to_hex).collect() }.serialize(s)
    }
}

impl<'de> Deserialize<'de> for VerifyBatchRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            digests: Vec<String>,
        }
        let raw = Raw::deserialize(d)?;
        if raw.digests.is_empty() || raw.digests.len() > MAX_VERIFY_BATCH {
            return Err(D::Error::custom(format!("`digests` must hold 1 to {MAX_VERIFY_BATCH} digests")));
        }
        let digests = raw
            .digests
            .iter()
            .map(|hex| KeyDigest::from_hex(hex))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| D::Error::custom("every digest must be 64 hex digits"))?;
        Ok(Self { digests })
    }
}

/// The answer to `POST /v1/keys/verify-batch`: `{"answers": [VerifyAnswer, ...]}`, one
/// per digest of the request, in its order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct VerifyBatchAnswer {
    /// One answer per requested digest, in order.
    pub answers: Vec<VerifyAnswer>,
}

/// The fields of a refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Refusal {
    /// Why.
    pub code: Reason,
    /// The key's id, when the key exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

impl Serialize for VerifyAnswer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Tagged<'a, T> {
            valid: bool,
            #[serde(flatten)]
            fields: &'a T,
        }
        match self {
            Self::Valid(fields) => Tagged { valid: true, fields }.serialize(s),
            Self::Invalid(fields) => Tagged { valid: false, fields }.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for VerifyAnswer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut value = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let valid = match value.remove("valid") {
            Some(serde_json::Value::Bool(valid)) => valid,
            _ => return Err(D::Error::custom("`valid` must be true or false")),
        };
        let value = serde_json::Value::Object(value);
        if valid {
            ValidKey::deserialize(value).map(Self::Valid).map_err(D::Error::custom)
        } else {
            Refusal::deserialize(value).map(Self::Invalid).map_err(D::Error::custom)
        }
    }
}

// ---- events

/// What changed about a key: the events that invalidate one key id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyEvent {
    /// `revoked`.
    Revoked,
    /// `updated`: scopes, roles, disabled flag, meta, expiry, name or rate limit
    /// changed, or a role the key holds was redefined.
    Updated,
    /// `rotated`: the key got a new secret.
    Rotated,
}

impl KeyEvent {
    /// Parses [`name`](Self::name)'s output.
    pub fn parse(name: &str) -> Option<Self> {
        match EventName::parse(name)? {
            EventName::Key(kind) => Some(kind),
            _ => None,
        }
    }

    /// The SSE event name.
    pub fn name(self) -> &'static str {
        EventName::Key(self).name()
    }
}

/// The name of an event on `GET /v1/events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventName {
    /// `revoked`, `updated` or `rotated`, with [`KeyChanged`] data.
    Key(KeyEvent),
    /// `reset`, with [`ResetData`].
    Reset,
    /// `alert`, with an [`Alert`].
    Alert,
    /// `heartbeat`, with [`Heartbeat`] data.
    Heartbeat,
}

impl EventName {
    /// The SSE event name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Key(KeyEvent::Revoked) => "revoked",
            Self::Key(KeyEvent::Updated) => "updated",
            Self::Key(KeyEvent::Rotated) => "rotated",
            Self::Reset => "reset",
            Self::Alert => "alert",
            Self::Heartbeat => "heartbeat",
        }
    }

    /// Parses [`name`](Self::name)'s output; `None` for events this version does not know.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "revoked" => Self::Key(KeyEvent::Revoked),
            "updated" => Self::Key(KeyEvent::Updated),
            "rotated" => Self::Key(KeyEvent::Rotated),
            "reset" => Self::Reset,
            "alert" => Self::Alert,
            "heartbeat" => Self::Heartbeat,
            _ => return None,
        })
    }
}

/// Data of `revoked`, `updated` and `rotated`: `{"key_id"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct KeyChanged {
    /// The key whose cached verdicts are stale.
    pub key_id: String,
}

/// Data of `reset`: `{"reason", "missed"?}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ResetData {
    // Declared first so that the JSON reads as it always has: `{"missed", "reason"}`.
    /// With `lagged`: how many events this subscriber missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<u64>,
    /// `lagged`, `bulk`, `gap`, `unreadable`, `remote`, ...
    pub reason: String,
}

/// Data of `heartbeat`: `{"at"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Heartbeat {
    /// When the key service sent it.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// What an [`Alert`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// Denials in one minute far above the key's own recent baseline.
    DenialSpike,
    /// Requests in one minute far above the key's own recent baseline.
    RateSpike,
    /// The key was used from a client network it had not used before.
    NewNetwork,
    /// The key expires soon (once per key and expiry time).
    KeyExpiring,
    /// The key's current secret is older than the rotation policy's maximum age for
    /// its environment or owner (once per secret; the alert's `minute` is then the
    /// second the secret was made).
    KeyMaxAge,
    /// The key was reported leaked (GitHub secret scanning) and revoked or disabled;
    /// `detail` names where it was found.
    Leaked,
}

impl AlertKind {
    /// The snake_case name used on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DenialSpike => "denial_spike",
            Self::RateSpike => "rate_spike",
            Self::NewNetwork => "new_network",
            Self::KeyExpiring => "key_expiring",
            Self::KeyMaxAge => "key_max_age",
            Self::Leaked => "leaked",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "denial_spike" => Some(Self::DenialSpike),
            "rate_spike" => Some(Self::RateSpike),
            "new_network" => Some(Self::NewNetwork),
            "key_expiring" => Some(Self::KeyExpiring),
            "key_max_age" => Some(Self::KeyMaxAge),
            "leaked" => Some(Self::Leaked),
            _ => None,
        }
    }
}

/// An anomaly the key service noticed in a key's usage or lifecycle: the data of `alert`, and an
/// entry of `GET /v1/alerts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Alert {
    /// The alert's id in the key service (what `POST /v1/alerts/{id}/ack` takes);
    /// absent from older key services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// When an operator acknowledged it (`null` while open); absent from older key
    /// services.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub acknowledged_at: Option<OffsetDateTime>,
    /// When it was raised.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The key.
    pub key_id: String,
    /// What kind.
    pub kind: AlertKind,
    /// The minute it concerns.
    #[serde(with = "time::serde::rfc3339")]
    pub minute: OffsetDateTime,
    /// The count that tripped it (denials or requests in the minute; 1 for a network).
    pub observed: u64,
    /// The mean per minute over the baseline window.
    pub baseline: f64,
    /// The threshold `observed` went over.
    pub threshold: f64,
    /// Human-readable detail (the new network, for `new_network`).
    pub detail: String,
}

// ---- usage

/// The `202` answer to `POST /v1/usage`: `{"accepted": n}`, plus `"duplicate": true`
/// when an aggregate batch's id had already been applied (nothing was added again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct UsageAccepted {
    /// Requests (aggregate batch) or events (raw batch) stored.
    pub accepted: u64,
    /// The batch id had been applied before; this copy was not (`accepted` is what the
    /// first copy stored).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// Requests not stored because their minute is outside the time window the key
    /// service accepts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused: u64,
    /// Requests not stored because their key id is not one of the key service's keys.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unknown: u64,
    /// Requests without a key id (no key, malformed): counted, not stored per key.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unattributed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

// ---- errors

/// The body of every refusal: `{"error": "<code>", "message": "<what is wrong>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// Machine-readable code (`invalid_json`, `unauthorized`, `not_found`, ...).
    pub error: String,
    /// What is wrong, for humans.
    pub message: String,
}

// ---- OpenAPI schemas of the hand-written (de)serializations (the key service's document)

#[cfg(feature = "server")]
mod schemas {
    use utoipa::openapi::schema::{AdditionalProperties, AllOfBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
    use utoipa::openapi::{Ref, RefOr};
    use utoipa::{PartialSchema, ToSchema};

    use super::{MAX_VERIFY_BATCH, Refusal, ValidKey, VerifyAnswer, VerifyBatchRequest, VerifyRequest};

    /// `{name: string}`, nothing else, `name` required.
    fn only(name: &str, string: ObjectBuilder) -> Schema {
        ObjectBuilder::new()
            .property(name, string)
            .required(name)
            .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)))
            .into()
    }

    impl PartialSchema for VerifyRequest {
        fn schema() -> RefOr<Schema> {
            let digest = ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[0-9a-fA-F]{64}$"))
                .description(Some("Hex SHA-256 of the key: what keygate sends."));
            let key = ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("The raw key: what older clients send."));
            OneOfBuilder::new()
                .item(only("digest", digest))
                .item(only("key", key))
                .description(Some("Exactly one of `digest` and `key`."))
                .into()
        }
    }

    impl ToSchema for VerifyRequest {}

    impl PartialSchema for VerifyBatchRequest {
        fn schema() -> RefOr<Schema> {
            let digest = ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[0-9a-fA-F]{64}$"));
            let digests = utoipa::openapi::schema::ArrayBuilder::new()
                .items(digest)
                .min_items(Some(1))
                .max_items(Some(MAX_VERIFY_BATCH))
                .description(Some("Hex SHA-256 digests of the keys, answered in this order."));
            ObjectBuilder::new()
                .property("digests", digests)
                .required("digests")
                .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(false)))
                .into()
        }
    }

    impl ToSchema for VerifyBatchRequest {}

    /// `allOf` of `{"valid": <valid>}` and the named fields' schema.
    fn tagged(valid: bool, fields: &str) -> Schema {
        let tag = ObjectBuilder::new()
            .property("valid", ObjectBuilder::new().schema_type(Type::Boolean).enum_values(Some([valid])))
            .required("valid");
        AllOfBuilder::new().item(tag).item(Ref::from_schema_name(fields)).into()
    }

    impl PartialSchema for VerifyAnswer {
        fn schema() -> RefOr<Schema> {
            OneOfBuilder::new()
                .item(tagged(true, &ValidKey::name()))
                .item(tagged(false, &Refusal::name()))
                .description(Some("`valid: true` with the key's fields, or `valid: false` with the refusal's code."))
                .into()
        }
    }

    impl ToSchema for VerifyAnswer {
        fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
            for (name, schema) in [(ValidKey::name(), ValidKey::schema()), (Refusal::name(), Refusal::schema())] {
                schemas.push((name.into_owned(), schema));
            }
            <ValidKey as ToSchema>::schemas(schemas);
            <Refusal as ToSchema>::schemas(schemas);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_requests_take_one_of_digest_and_key() {
        let key = ApiKey::new("kg_secret");
        let sent = serde_json::to_string(&VerifyRequest::Digest(key.digest())).unwrap();
        assert_eq!(sent, format!(r#"{{"digest":"{}"}}"#, key.digest().to_hex()));
        let read: VerifyRequest = serde_json::from_str(&sent).unwrap();
        assert_eq!(read.digest(), key.digest());
        let old: VerifyRequest = serde_json::from_str(r#"{"key":"kg_secret"}"#).unwrap();
        assert_eq!(old.digest(), key.digest());
        for bad in [r#"{}"#, r#"{"digest":"ab"}"#, r#"{"digest":"00","key":"k"}"#, r#"{"keys":"k"}"#] {
            let err = serde_json::from_str::<VerifyRequest>(bad).unwrap_err().to_string();
            assert!(!err.contains("kg_secret"), "{err}");
        }
    }

    #[test]
    fn batch_requests_carry_1_to_max_digests() {
        let digests: Vec<KeyDigest> = (0..3).map(|i| ApiKey::new(format!("kg_{i}")).digest()).collect();
        let request = VerifyBatchRequest { digests: digests.clone() };
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(serde_json::from_str::<VerifyBatchRequest>(&json).unwrap(), request);
        let hex = digests[0].to_hex();
        let many = format!(r#"{{"digests":[{}]}}"#, vec![format!("\"{hex}\""); MAX_VERIFY_BATCH + 1].join(","));
        let one_less = many.replacen(&format!("\"{hex}\","), "", 1);
        assert_eq!(serde_json::from_str::<VerifyBatchRequest>(&one_less).unwrap().digests.len(), MAX_VERIFY_BATCH);
        for bad in [&many[..], r#"{"digests":[]}"#, r#"{"digests":["ab"]}"#, r#"{"keys":["kg_1"]}"#, r#"{}"#] {
            assert!(serde_json::from_str::<VerifyBatchRequest>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_are_tagged_by_valid() {
        let refusal = VerifyAnswer::Invalid(Refusal { code: Reason::Revoked, key_id: Some("key_a".into()) });
        let json = serde_json::to_string(&refusal).unwrap();
        assert_eq!(json, r#"{"valid":false,"code":"REVOKED","key_id":"key_a"}"#);
        assert_eq!(serde_json::from_str::<VerifyAnswer>(&json).unwrap(), refusal);
        assert!(serde_json::from_str::<VerifyAnswer>(r#"{"valid":false,"code":"GONE"}"#).is_err());
        assert!(serde_json::from_str::<VerifyAnswer>(r#"{"valid":"yes"}"#).is_err());
        assert!(serde_json::from_str::<VerifyAnswer>(r#"{"valid":true}"#).is_err());
    }

    #[test]
    fn event_names_round_trip() {
        for name in ["revoked", "updated", "rotated", "reset", "alert", "heartbeat"] {
            assert_eq!(EventName::parse(name).unwrap().name(), name);
        }
        assert_eq!(KeyEvent::parse("reset"), None);
        assert_eq!(EventName::parse("novel"), None);
    }
}
