//! Where usage goes: [`AggregateExporter`] (aggregated rows, from the
//! [`UsageAggregator`](crate::UsageAggregator)) and [`UsageExporter`] (raw events, from the
//! [`UsagePipeline`](crate::UsagePipeline)), and the error both return.

use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{AggregateBatch, UsageEvent};

/// One batch of usage events, as the pipeline hands it to an exporter and as
/// `POST /v1/usage` carries it: `{"events": [...], "dropped": n}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
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

/// Delivers batches of aggregated usage somewhere: the key service (`HttpUsageExporter`),
/// your own store, a test's vector.
///
/// The [`UsageAggregator`](crate::UsageAggregator) calls `export` from one background
/// task, one batch at a time, and waits for it. The batch is lent, not given: when
/// `export` fails, the aggregator keeps the batch, unchanged and with the same
/// [`batch_id`](AggregateBatch::batch_id), and offers it again later, so a receiver that
/// applies each `batch_id` once counts every request exactly once even when an answer
/// was lost after the batch was stored. Return an error that
/// [`is_permanent`](ExportError::is_permanent) when sending the same batch again cannot
/// help; it is then given up at once.
///
/// An attempt should end in bounded time; the aggregator abandons one after a flush
/// interval (and at the shutdown deadline) and tries again later.
///
/// ```
/// use std::sync::Mutex;
/// use keygate::{AggregateBatch, AggregateExporter, ExportError};
///
/// /// Keeps per-key totals, applying each batch id once.
/// #[derive(Default)]
/// struct Totals(Mutex<(std::collections::HashSet<String>, std::collections::HashMap<String, u64>)>);
///
/// impl AggregateExporter for Totals {
///     async fn export(&self, batch: &AggregateBatch) -> Result<(), ExportError> {
///         let mut guard = self.0.lock().unwrap();
///         let (seen, totals) = &mut *guard;
///         if seen.insert(batch.batch_id.clone()) {
///             for row in &batch.rows {
///                 let key = row.key_id.as_deref().unwrap_or("(none)").to_owned();
///                 *totals.entry(key).or_default() += row.requests;
///             }
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait AggregateExporter: Send + Sync + 'static {
    /// Delivers one batch (or fails, and is offered the same batch again later).
    fn export(&self, batch: &AggregateBatch) -> impl Future<Output = Result<(), ExportError>> + Send;
}

impl<E: AggregateExporter + ?Sized> AggregateExporter for Arc<E> {
    fn export(&self, batch: &AggregateBatch) -> impl Future<Output = Result<(), ExportError>> + Send {
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

    /// Whether sending the same batch again cannot succeed: it could not be encoded, or
    /// the receiver refused it as malformed (HTTP 400), too large (413) or unprocessable
    /// (422), also as the last error of retries that gave up. The
    /// [`UsageAggregator`](crate::UsageAggregator) gives such a batch up at once (counted);
    /// any other error keeps it pending for another attempt.
    ///
    /// ```
    /// use keygate::ExportError;
    /// assert!(ExportError::Status { status: 413 }.is_permanent());
    /// assert!(!ExportError::Status { status: 503 }.is_permanent());
    /// assert!(!ExportError::Timeout.is_permanent());
    /// ```
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Encode(_) => true,
            Self::Status { status } => matches!(status, 400 | 413 | 422),
            Self::GaveUp { last, .. } => last.is_permanent(),
            Self::Transport(_) | Self::Timeout | Self::Other(_) => false,
        }
    }
}
