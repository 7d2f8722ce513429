//! Usage events: one per decided request, allowed or denied.
//!
//! The layer builds a [`UsageEvent`] when the response head is ready (or when it
//! rejects) and hands it to a [`UsageSink`] without blocking.
//!
//! | sink or exporter | what it does |
//! | --- | --- |
//! | [`UsagePipeline`] | a bounded lock-free queue (default 65 536 events) drained by a background task into batches (1 000 events, or whatever is queued every 1 s) for a [`UsageExporter`]; drops and counts when full, never blocks |
//! | `HttpUsageExporter` (feature `remote`) | `POST /v1/usage` to the key service, with bounded retries and backoff |
//! | [`TracingSink`] | one `tracing` event per request (target `keygate::usage`) |
//! | [`ChannelSink`] | a bounded Tokio channel, for tests and custom consumers |

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::context::Outcome;

/// One request's usage record. Never carries the key: only its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// When the request arrived.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The key's id, when a key was verified.
    pub key_id: Option<Arc<str>>,
    /// The key's owner, when a key was verified.
    pub owner: Option<Arc<str>>,
    /// Allowed, or the precise denial.
    pub outcome: Outcome,
    /// HTTP method.
    /// (Standard methods are static strings: recording them allocates nothing.)
    pub method: std::borrow::Cow<'static, str>,
    /// Route template (`/reports/{id}`), gRPC method path, or the raw path cut short.
    pub route: Arc<str>,
    /// Response status (for gRPC rejections, the HTTP status the case maps to).
    pub status: u16,
    /// Request start to response head (`latency_ms` on the wire, fractional).
    #[serde(rename = "latency_ms", with = "duration_ms")]
    pub latency: Duration,
    /// Client address, when configured.
    pub client_ip: Option<IpAddr>,
    /// `x-request-id`, when present.
    pub request_id: Option<Arc<str>>,
}

/// Receives usage events. `record` must not block or wait: drop and count instead.
pub trait UsageSink: Send + Sync + 'static {
    /// Takes one event.
    fn record(&self, event: UsageEvent);
}

impl<S: UsageSink + ?Sized> UsageSink for Arc<S> {
    fn record(&self, event: UsageEvent) {
        (**self).record(event)
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

mod exporter;
mod pipeline;
mod sinks;

pub use exporter::{ExportError, UsageBatch, UsageExporter};
pub use pipeline::metric;
pub use pipeline::{
    FlushError, PipelineBuildError, PipelineHandle, PipelineStats, UsagePipeline, UsagePipelineBuilder,
};
pub use sinks::{ChannelSink, TracingSink};
