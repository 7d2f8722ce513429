//! Usage: one record per decided request, allowed or denied.
//!
//! The layer hands each decided request to a [`UsageSink`] as a borrowed
//! [`DecidedRequest`] when the response head is ready (or when it rejects), without
//! blocking. There are two paths from there:
//!
//! | path | what travels | use it for |
//! | --- | --- | --- |
//! | [`UsageAggregator`] → [`AggregateExporter`] (`HttpUsageExporter` to the key service) | per interval (10 s), one [`AggregateBatch`]: rows per (minute, key id, route, method, outcome) with status classes, a latency histogram and the client networks seen; a batch id the receiver applies once | the key service's usage, billing, quotas and alerts: cost independent of traffic (an addition per request, no allocation), bounded memory, exactly-once counts |
//! | [`UsagePipeline`] → [`UsageExporter`] (yours) | every request as an owned [`UsageEvent`] (time, key id, owner, route, status, latency, client address, request id), in batches of 1 000 | your own log pipeline or analytics store, when you need each request; it costs an allocation and a queue slot per request, and drops (counted) when the queue is full |
//!
//! Both can run at once: a pair `(aggregator, pipeline)` is a sink. The key service
//! still accepts raw events (`{"events": [...]}`) on `POST /v1/usage` from middlewares
//! that send them.
//!
//! | sink or exporter | what it does |
//! | --- | --- |
//! | [`UsageAggregator`] | folds requests into a sharded, bounded row table (default 10 000 rows per interval, overflow counted into per-key overflow rows); cuts it every 10 s into a batch for an [`AggregateExporter`], keeps failed batches (6 by default) and retries them unchanged |
//! | `HttpUsageExporter` (feature `remote`) | an [`AggregateExporter`]: `POST /v1/usage` to the key service, with bounded retries and backoff inside one call |
//! | [`UsagePipeline`] | a bounded lock-free queue (default 65 536 events) drained by a background task into batches (1 000 events, or whatever is queued every 1 s) for a [`UsageExporter`]; drops and counts when full, never blocks |
//! | [`TracingSink`] | one `tracing` event per request (target `keygate::usage`) |
//! | [`ChannelSink`] | a bounded Tokio channel, for tests and custom consumers |

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::outcome::Outcome;

/// One request's usage record. Never carries the key: only its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct UsageEvent {
    /// When the request arrived.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The key's id, when a key was verified.
    #[cfg_attr(feature = "server", schema(value_type = Option<String>))]
    pub key_id: Option<Arc<str>>,
    /// The key's owner, when a key was verified.
    #[cfg_attr(feature = "server", schema(value_type = Option<String>))]
    pub owner: Option<Arc<str>>,
    /// Allowed, or the precise denial.
    pub outcome: Outcome,
    /// HTTP method.
    /// (Standard methods are static strings: recording them allocates nothing.)
    #[cfg_attr(feature = "server", schema(value_type = String))]
    pub method: std::borrow::Cow<'static, str>,
    /// Route template (`/reports/{id}`), gRPC method path, or the raw path cut short.
    #[cfg_attr(feature = "server", schema(value_type = String))]
    pub route: Arc<str>,
    /// Response status (for gRPC rejections, the HTTP status the case maps to).
    pub status: u16,
    /// Request start to response head (`latency_ms` on the wire, fractional).
    #[serde(rename = "latency_ms", with = "duration_ms")]
    #[cfg_attr(feature = "server", schema(value_type = f64))]
    pub latency: Duration,
    /// Client address, when configured.
    #[cfg_attr(feature = "server", schema(value_type = Option<String>))]
    pub client_ip: Option<IpAddr>,
    /// `x-request-id`, when present.
    #[cfg_attr(feature = "server", schema(value_type = Option<String>))]
    pub request_id: Option<Arc<str>>,
}

/// One decided request, borrowed from the layer for the moment it is recorded.
///
/// The layer hands this to [`UsageSink::record`]; a sink that keeps every request turns
/// it into an owned [`UsageEvent`] with [`to_event`](Self::to_event), one that
/// aggregates (such as [`UsageAggregator`]) adds it to a row without allocating.
#[derive(Debug, Clone, Copy)]
pub struct DecidedRequest<'a> {
    started: Instant,
    latency: Duration,
    key_id: Option<&'a Arc<str>>,
    owner: Option<&'a Arc<str>>,
    outcome: Outcome,
    method: &'a http::Method,
    route: &'a str,
    status: u16,
    client_ip: Option<IpAddr>,
    request_id: Option<&'a str>,
}

impl<'a> DecidedRequest<'a> {
    /// A request that arrived at `started`, got `status` with `outcome`, and was routed to
    /// `route` (template, gRPC method or raw path); latency is measured from `started`
    /// to now. The layer builds these; the constructor is public for tests and benchmarks
    /// of custom sinks.
    pub fn new(started: Instant, method: &'a http::Method, route: &'a str, status: u16, outcome: Outcome) -> Self {
        Self {
            started,
            latency: started.elapsed(),
            key_id: None,
            owner: None,
            outcome,
            method,
            route,
            status,
            client_ip: None,
            request_id: None,
        }
    }

    /// Sets the key id and owner of a verified (or refused but existing) key.
    #[must_use]
    pub fn with_key(mut self, key_id: &'a Arc<str>, owner: Option<&'a Arc<str>>) -> Self {
        self.key_id = Some(key_id);
        self.owner = owner;
        self
    }

    /// Sets the latency instead of measuring it.
    #[must_use]
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Sets the client address.
    #[must_use]
    pub fn with_client_ip(mut self, ip: Option<IpAddr>) -> Self {
        self.client_ip = ip;
        self
    }

    /// Sets the `x-request-id`.
    #[must_use]
    pub fn with_request_id(mut self, id: Option<&'a str>) -> Self {
        self.request_id = id;
        self
    }

    /// When the request arrived (monotonic clock).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Request start to response head.
    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// The key's id, when a key was verified or refused as an existing key.
    pub fn key_id(&self) -> Option<&'a Arc<str>> {
        self.key_id
    }

    /// The key's owner, when a key was verified.
    pub fn owner(&self) -> Option<&'a Arc<str>> {
        self.owner
    }

    /// Allowed, or the precise denial.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// HTTP method.
    pub fn method(&self) -> &'a http::Method {
        self.method
    }

    /// Route template, gRPC method path, or the raw path cut short.
    pub fn route(&self) -> &'a str {
        self.route
    }

    /// Response status (for gRPC rejections, the HTTP status the case maps to).
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Client address, when the layer is configured to record it.
    pub fn client_ip(&self) -> Option<IpAddr> {
        self.client_ip
    }

    /// `x-request-id`, when present (at most 128 bytes).
    pub fn request_id(&self) -> Option<&'a str> {
        self.request_id
    }

    /// An owned event (allocates the route and request id).
    pub fn to_event(&self) -> UsageEvent {
        UsageEvent {
            at: OffsetDateTime::now_utc() - self.started.elapsed(),
            key_id: self.key_id.cloned(),
            owner: self.owner.cloned(),
            outcome: self.outcome,
            method: method_name(self.method),
            route: Arc::from(self.route),
            status: self.status,
            latency: self.latency,
            client_ip: self.client_ip,
            request_id: self.request_id.map(Arc::from),
        }
    }
}

/// Standard methods as static strings; only extension methods allocate.
pub(crate) fn method_name(m: &http::Method) -> std::borrow::Cow<'static, str> {
    std::borrow::Cow::Borrowed(match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => return std::borrow::Cow::Owned(m.as_str().to_owned()),
    })
}

/// Receives every decided request. `record` must not block or wait: drop and count
/// instead.
///
/// Two sinks at once: a pair `(a, b)` is a sink that records into both.
pub trait UsageSink: Send + Sync + 'static {
    /// Takes one decided request.
    fn record(&self, request: &DecidedRequest<'_>);
}

impl<S: UsageSink + ?Sized> UsageSink for Arc<S> {
    fn record(&self, request: &DecidedRequest<'_>) {
        (**self).record(request)
    }
}

impl<A: UsageSink, B: UsageSink> UsageSink for (A, B) {
    fn record(&self, request: &DecidedRequest<'_>) {
        self.0.record(request);
        self.1.record(request);
    }
}

mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        // `try_from`: a finite value too large for a `Duration` is refused, not a panic.
        Duration::try_from_secs_f64(ms / 1000.0)
            .map_err(|_| serde::de::Error::custom("latency must be a non-negative number of milliseconds"))
    }
}

mod aggregate;
mod exporter;
mod histogram;
mod pipeline;
mod rows;
mod shutdown;
mod sinks;

pub use aggregate::{AggregatorBuildError, AggregatorHandle, AggregatorStats, UsageAggregator, UsageAggregatorBuilder};
pub use exporter::{AggregateExporter, ExportError, UsageBatch, UsageExporter};
pub use histogram::{LATENCY_BUCKETS, LATENCY_RELATIVE_ERROR, LatencyHistogram};
pub use pipeline::metric;
pub use pipeline::{
    FlushError, PipelineBuildError, PipelineHandle, PipelineStats, UsagePipeline, UsagePipelineBuilder,
};
pub(crate) use rows::NetworkPrefix;
pub use rows::{
    AggregateBatch, AggregateRow, ClientNetwork, OVERFLOW_METHOD, OVERFLOW_ROUTE, StatusCounts, network_of,
};
pub use sinks::{ChannelSink, TracingSink};
