//! Where batches of usage events go: the [`UsageExporter`] trait and its batch type.

use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::UsageEvent;

/// One batch of usage events, as the pipeline hands it to an exporter and as
/// `POST /v1/usage` carries it: `{"events": [...], "dropped": n}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageBatch {
    /// The events, oldest first. May be empty when the batch only reports drops.
    pub events: Vec<UsageEvent>,
    /// Events that will never arrive: refused by a full (or closed) queue, or lost with a
    /// batch that could not be delivered, since the previous batch that got through.
    #[serde(default)]
    pub dropped: u64,
}

impl UsageBatch {
    /// Whether the batch carries neither events nor a drop count.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.dropped == 0
    }
}

/// Delivers batches of usage events somewhere: a key service, a log, a test's vector.
///
/// The pipeline calls `export` from one background task, one batch at a time, and waits
/// for it: an exporter that is slow makes the queue fill up and events be dropped (and
/// counted), never a request wait. An exporter retries as it sees fit inside `export`;
/// when it returns an error the pipeline counts the batch's events as lost and reports
/// them downstream in the next batch's `dropped`.
///
/// ```
/// use keygate::{ExportError, UsageBatch, UsageExporter};
///
/// /// Counts events and forgets them.
/// #[derive(Default)]
/// struct Discard(std::sync::atomic::AtomicU64);
///
/// impl UsageExporter for Discard {
///     async fn export(&self, batch: UsageBatch) -> Result<(), ExportError> {
///         self.0.fetch_add(batch.events.len() as u64, std::sync::atomic::Ordering::Relaxed);
///         Ok(())
///     }
/// }
/// ```
pub trait UsageExporter: Send + Sync + 'static {
    /// Delivers one batch. Must finish in bounded time; the pipeline also bounds it at
    /// shutdown.
    fn export(&self, batch: UsageBatch) -> impl Future<Output = Result<(), ExportError>> + Send;
}

impl<E: UsageExporter + ?Sized> UsageExporter for Arc<E> {
    fn export(&self, batch: UsageBatch) -> impl Future<Output = Result<(), ExportError>> + Send {
        (**self).export(batch)
    }
}

/// A batch could not be delivered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The receiver answered with a status that is not success.
    #[error("usage receiver answered HTTP {status}")]
    Status {
        /// The HTTP status.
        status: u16,
    },
    /// The receiver could not be reached (refused, reset, DNS, TLS).
    #[error("usage receiver unreachable: {0}")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The receiver did not answer in time.
    #[error("usage export timed out")]
    Timeout,
    /// The batch could not be encoded.
    #[error("could not encode the usage batch: {0}")]
    Encode(#[source] serde_json::Error),
    /// Retries ran out (attempts or deadline); `last` is the last attempt's error.
    #[error("usage export gave up after {attempts} attempt(s): {last}")]
    GaveUp {
        /// How many attempts were made.
        attempts: u32,
        /// Why the last attempt failed.
        #[source]
        last: Box<ExportError>,
    },
    /// Anything else, for exporters outside keygate.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl ExportError {
    /// Wraps any error for a custom exporter.
    pub fn other(err: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Other(err.into())
    }
}
