//! Aggregated usage as it travels to the key service: [`AggregateBatch`] of
//! [`AggregateRow`]s, and the client networks seen per key.

use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::LatencyHistogram;
use crate::outcome::Outcome;

/// The route of a per-key overflow row: requests of a key that found the row table full.
pub const OVERFLOW_ROUTE: &str = "(overflow)";
/// The method of an overflow row.
pub const OVERFLOW_METHOD: &str = "*";

/// One batch of aggregated usage, as an [`AggregateExporter`](crate::AggregateExporter)
/// receives it and as `POST /v1/usage` carries it:
/// `{"batch_id", "rows": [...], "networks": [...], "dropped": n, "overflowed": n}`.
///
/// The key service applies a `batch_id` at most once, so a batch sent again after a lost
/// answer never counts twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct AggregateBatch {
    /// 32 lowercase hex digits (128 random bits), the same on every attempt to send it.
    pub batch_id: String,
    /// The rows, in no particular order; a (minute, key, route, method, outcome) appears once.
    pub rows: Vec<AggregateRow>,
    /// Client networks seen per key in the interval.
    #[serde(default)]
    pub networks: Vec<ClientNetwork>,
    /// Requests that will never arrive: in batches given up since the previous batch that
    /// got through.
    #[serde(default)]
    pub dropped: u64,
    /// Requests in this batch that found the row table full and were folded into overflow
    /// rows (they are counted in `rows`, with less detail).
    #[serde(default)]
    pub overflowed: u64,
    /// Client networks not kept because a key's (or the table's) set was full.
    #[serde(default)]
    pub networks_dropped: u64,
}

impl AggregateBatch {
    /// Requests counted in the batch's rows.
    pub fn requests(&self) -> u64 {
        self.rows.iter().fold(0u64, |n, r| n.saturating_add(r.requests))
    }
}

/// The requests of one minute with the same key, route, method and outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct AggregateRow {
    /// Start of the minute, Unix seconds (a multiple of 60).
    pub minute: i64,
    /// The key's id; `None` for requests without a known key (no key, malformed, unknown)
    /// and for the table-wide overflow row.
    #[serde(default)]
    #[cfg_attr(feature = "server", schema(value_type = Option<String>))]
    pub key_id: Option<Arc<str>>,
    /// Route template, gRPC method, or the raw path cut short; [`OVERFLOW_ROUTE`] for
    /// overflow rows.
    #[cfg_attr(feature = "server", schema(value_type = String))]
    pub route: Arc<str>,
    /// HTTP method; [`OVERFLOW_METHOD`] for overflow rows.
    #[cfg_attr(feature = "server", schema(value_type = String))]
    pub method: Arc<str>,
    /// Allowed, or the precise denial.
    pub outcome: Outcome,
    /// Requests in the row; equals `latency.count`.
    pub requests: u64,
    /// Responses by status class.
    pub status: StatusCounts,
    /// Request start to response head.
    pub latency: LatencyHistogram,
    /// When the row's last request arrived, Unix milliseconds.
    pub last_at_ms: i64,
}

/// Responses by status class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct StatusCounts {
    /// 1xx, and anything outside 100–599.
    #[serde(rename = "1xx", default)]
    pub informational: u64,
    /// 2xx.
    #[serde(rename = "2xx", default)]
    pub success: u64,
    /// 3xx.
    #[serde(rename = "3xx", default)]
    pub redirection: u64,
    /// 4xx.
    #[serde(rename = "4xx", default)]
    pub client_error: u64,
    /// 5xx.
    #[serde(rename = "5xx", default)]
    pub server_error: u64,
}

impl StatusCounts {
    /// Counts one response with `status`.
    #[inline]
    pub fn add(&mut self, status: u16) {
        let class = match status {
            200..=299 => &mut self.success,
            300..=399 => &mut self.redirection,
            400..=499 => &mut self.client_error,
            500..=599 => &mut self.server_error,
            _ => &mut self.informational,
        };
        *class = class.saturating_add(1);
    }

    /// Adds every class of `other`.
    pub fn merge(&mut self, other: &Self) {
        self.informational = self.informational.saturating_add(other.informational);
        self.success = self.success.saturating_add(other.success);
        self.redirection = self.redirection.saturating_add(other.redirection);
        self.client_error = self.client_error.saturating_add(other.client_error);
        self.server_error = self.server_error.saturating_add(other.server_error);
    }

    /// All classes together.
    pub fn total(&self) -> u64 {
        [self.informational, self.success, self.redirection, self.client_error, self.server_error]
            .iter()
            .fold(0u64, |n, c| n.saturating_add(*c))
    }
}

/// A client network a key was used from in an interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ClientNetwork {
    /// The key.
    #[cfg_attr(feature = "server", schema(value_type = String))]
    pub key_id: Arc<str>,
    /// `203.0.113.0/24` or `2001:db8:1::/48` (see [`network_of`]).
    pub network: String,
    /// The minute it was first seen in the interval, Unix seconds.
    pub minute: i64,
}

/// The client network an address belongs to: its /24 (IPv4) or /48 (IPv6).
/// IPv4-mapped IPv6 addresses count as IPv4.
///
/// ```
/// assert_eq!(keygate::network_of("203.0.113.9".parse().unwrap()), "203.0.113.0/24");
/// assert_eq!(keygate::network_of("2001:db8:1:2::5".parse().unwrap()), "2001:db8:1::/48");
/// ```
pub fn network_of(ip: IpAddr) -> String {
    NetworkPrefix::of(ip).to_string()
}

/// A client network in eight bytes: what the edge keeps per key without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum NetworkPrefix {
    V4([u8; 3]),
    V6([u16; 3]),
}

impl NetworkPrefix {
    #[inline]
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                Self::V4([a, b, c])
            }
            IpAddr::V6(v6) => {
                let s = v6.segments();
                Self::V6([s[0], s[1], s[2]])
            }
        }
    }
}

impl std::fmt::Display for NetworkPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::V4([a, b, c]) => write!(f, "{a}.{b}.{c}.0/24"),
            Self::V6([a, b, c]) => write!(f, "{a:x}:{b:x}:{c:x}::/48"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        assert_eq!(network_of("10.1.2.3".parse().unwrap()), "10.1.2.0/24");
        assert_eq!(network_of("::ffff:10.1.2.3".parse().unwrap()), "10.1.2.0/24");
        assert_eq!(network_of("2001:db8:1:2::5".parse().unwrap()), "2001:db8:1::/48");
        assert_eq!(network_of("::1".parse().unwrap()), "0:0:0::/48");
    }

    #[test]
    fn status_classes() {
        let mut s = StatusCounts::default();
        for code in [101, 200, 204, 302, 401, 403, 429, 503, 600] {
            s.add(code);
        }
        assert_eq!((s.informational, s.success, s.redirection, s.client_error, s.server_error), (2, 2, 1, 3, 1));
        assert_eq!(s.total(), 9);
    }

    #[test]
    fn batch_wire_form() {
        let mut latency = LatencyHistogram::new();
        latency.record(std::time::Duration::from_micros(120));
        let mut status = StatusCounts::default();
        status.add(200);
        let batch = AggregateBatch {
            batch_id: "0123456789abcdef0123456789abcdef".into(),
            rows: vec![AggregateRow {
                minute: 1_764_585_600,
                key_id: Some("key_a".into()),
                route: "/reports/{id}".into(),
                method: "GET".into(),
                outcome: Outcome::Allowed,
                requests: 1,
                status,
                latency,
                last_at_ms: 1_764_585_601_234,
            }],
            networks: vec![ClientNetwork {
                key_id: "key_a".into(),
                network: "10.0.0.0/24".into(),
                minute: 1_764_585_600,
            }],
            dropped: 0,
            overflowed: 0,
            networks_dropped: 0,
        };
        let json = serde_json::to_value(&batch).unwrap();
        assert_eq!(json["rows"][0]["status"]["2xx"], 1);
        assert_eq!(json["rows"][0]["latency"]["buckets"][0][1], 1);
        assert_eq!(serde_json::from_value::<AggregateBatch>(json).unwrap(), batch);
        assert_eq!(batch.requests(), 1);
    }
}
