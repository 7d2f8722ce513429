//! [`UsageAggregator`]: decided requests folded in memory into per-minute rows, exported
//! as one [`AggregateBatch`] per flush interval.
//!
//! `table` is what the request path touches (sharded rows, the clock anchor, the caps);
//! `merge` turns a cut of the shards into one batch; `worker` cuts, queues, sends, retries
//! and shuts down.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::exporter::AggregateExporter;
use super::pipeline::{FlushError, metric};
use super::shutdown::{self, Stopper};
use super::{DecidedRequest, UsageSink};

mod merge;
mod split;
mod table;
mod worker;

use table::{Limits, Table, Tables};
use worker::{Command, Settings, Worker};

/// Default cap on rows per interval: 10 000.
pub(crate) const DEFAULT_MAX_ROWS: usize = 10_000;
/// Default cap on per-key overflow rows per interval: 1 000.
pub(crate) const DEFAULT_MAX_OVERFLOW_ROWS: usize = 1_000;
/// Default client networks kept per key per interval: 16.
pub(crate) const DEFAULT_MAX_NETWORKS_PER_KEY: usize = 16;
/// Default client networks kept per interval, all keys together: 10 000.
pub(crate) const DEFAULT_MAX_NETWORKS: usize = 10_000;
/// Default flush interval: 10 s.
pub(crate) const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(10);
/// Default batches kept for delivery: 6 (a minute of outage at the default interval).
pub(crate) const DEFAULT_MAX_PENDING_BATCHES: usize = 6;
/// Default shutdown deadline: 5 s.
pub(crate) const DEFAULT_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

const COMMAND_QUEUE: usize = 16;

/// What the sinks, the handle and the worker share.
struct Shared {
    table: Table,
    closed: AtomicBool,
    // Written by the worker once per batch, or by `record` after shutdown only.
    dropped: AtomicU64,
    exported: AtomicU64,
    batches_exported: AtomicU64,
    export_failures: AtomicU64,
    lost: AtomicU64,
    pending_batches: AtomicUsize,
    pending_requests: AtomicU64,
}

impl Shared {
    #[cold]
    fn refuse(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric::REQUESTS_REFUSED).increment(1);
    }

    fn lose(&self, n: u64) {
        if n > 0 {
            self.lost.fetch_add(n, Ordering::Relaxed);
            metrics::counter!(metric::REQUESTS_LOST).increment(n);
        }
    }

    fn stats(&self) -> AggregatorStats {
        let totals = self.table.totals();
        AggregatorStats {
            recorded: totals.recorded,
            overflowed: totals.overflowed,
            networks_dropped: totals.networks_dropped,
            dropped: self.dropped.load(Ordering::Relaxed),
            exported: self.exported.load(Ordering::Relaxed),
            batches_exported: self.batches_exported.load(Ordering::Relaxed),
            export_failures: self.export_failures.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            pending_batches: self.pending_batches.load(Ordering::Relaxed),
            pending_requests: self.pending_requests.load(Ordering::Relaxed),
            rows: self.table.rows(),
        }
    }
}

/// Counters of a [`UsageAggregator`], each monotonic except the last three.
///
/// Read while requests keep arriving, the fields are not one snapshot. Once the
/// aggregator is quiet (after [`AggregatorHandle::shutdown`]), every request recorded is
/// in exactly one of `exported` and `lost`: `recorded == exported + lost`, and the
/// requests refused after shutdown are in `dropped`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AggregatorStats {
    /// Requests folded into rows.
    pub recorded: u64,
    /// Of those, requests that found the row table full and went into an overflow row
    /// (counted exactly, with less detail: see [`UsageAggregatorBuilder::max_rows`]).
    pub overflowed: u64,
    /// Client networks not kept because a key's or the table's set was full (at least one
    /// per network not kept; one seen again in the same interval may count again).
    pub networks_dropped: u64,
    /// Requests refused because the aggregator had shut down.
    pub dropped: u64,
    /// Requests in batches the exporter delivered.
    pub exported: u64,
    /// Batches the exporter delivered.
    pub batches_exported: u64,
    /// Failed export attempts (a batch retried three times and then delivered counts 3).
    pub export_failures: u64,
    /// Requests recorded but never delivered: in a batch pushed out of a full pending
    /// queue, refused by the receiver as malformed or too large, or still pending when the
    /// shutdown deadline passed. Reported to the receiver in the next delivered batch's
    /// `dropped`.
    pub lost: u64,
    /// Batches waiting to be delivered right now.
    pub pending_batches: usize,
    /// Requests in them.
    pub pending_requests: u64,
    /// Rows in the current interval's table right now (every kind of row, as stored: a row
    /// recorded from several threads may be stored once per shard).
    pub rows: usize,
}

/// A [`UsageAggregator`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AggregatorBuildError {
    /// `build` was called outside a Tokio runtime, so the worker has nowhere to run.
    #[error("the usage aggregator must be built inside a Tokio runtime")]
    NoRuntime,
    /// A cap or duration was zero.
    #[error("usage aggregator setting `{0}` must be greater than zero")]
    Zero(&'static str),
}

/// Builds a [`UsageAggregator`]. Every limit is explicit; the defaults follow.
///
/// | setting | default |
/// | --- | --- |
/// | [`max_rows`](Self::max_rows) | 10 000 rows per interval |
/// | [`max_overflow_rows`](Self::max_overflow_rows) | 1 000 per-key overflow rows per interval |
/// | [`max_networks_per_key`](Self::max_networks_per_key) | 16 client networks per key per interval |
/// | [`max_networks`](Self::max_networks) | 10 000 client networks per interval |
/// | [`flush_interval`](Self::flush_interval) | 10 s |
/// | [`max_pending_batches`](Self::max_pending_batches) | 6 batches |
/// | [`shutdown_deadline`](Self::shutdown_deadline) | 5 s |
///
/// # Memory
///
/// A row takes about 1 KB: 176 bytes in its table, the latency histogram's 832-byte
/// bucket array, and its route text (shared method names and key ids cost nothing more).
/// The table of one interval holds at most `max_rows + max_overflow_rows` rows plus the
/// table-wide overflow rows (at most 1 024, and past that two per shard and outcome), so
/// about **12 MB** at the defaults, plus up to as much again in hash-table room kept for
/// the next interval. While an interval is exported the next one fills, so at most two
/// tables exist at once. Each pending batch holds at most as many rows (about 1 KB each
/// as [`AggregateRow`](crate::AggregateRow)s): with the defaults, at most about 70 MB when
/// the receiver has been unreachable for a minute under a flood of distinct rows, and
/// rows × 1 KB × 6 in the usual case of a few hundred rows per interval. Client networks
/// take 16 bytes each.
#[derive(Debug, Clone)]
#[must_use]
pub struct UsageAggregatorBuilder {
    limits: Limits,
    flush_interval: Duration,
    max_pending_batches: usize,
    shutdown_deadline: Duration,
}

impl Default for UsageAggregatorBuilder {
    fn default() -> Self {
        Self {
            limits: Limits {
                max_rows: DEFAULT_MAX_ROWS,
                max_overflow_rows: DEFAULT_MAX_OVERFLOW_ROWS,
                max_networks_per_key: DEFAULT_MAX_NETWORKS_PER_KEY,
                max_networks: DEFAULT_MAX_NETWORKS,
            },
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            max_pending_batches: DEFAULT_MAX_PENDING_BATCHES,
            shutdown_deadline: DEFAULT_SHUTDOWN_DEADLINE,
        }
    }
}

impl UsageAggregatorBuilder {
    /// Rows per interval: a row is one (minute, key id, route, method, outcome). Default
    /// 10 000.
    ///
    /// The cap counts rows as stored, checked only when a row is created. A request that
    /// would need a new row once the cap is reached is folded into its key's overflow row
    /// (route [`OVERFLOW_ROUTE`](crate::OVERFLOW_ROUTE), method
    /// [`OVERFLOW_METHOD`](crate::OVERFLOW_METHOD), its own minute and outcome), so totals
    /// per key, per minute and per outcome stay exact; requests without a key id go to the
    /// table-wide overflow row of their minute and outcome. Every such request is counted
    /// in [`AggregatorStats::overflowed`] and the batch's `overflowed`.
    ///
    /// Keep `max_rows + max_overflow_rows` within what the receiver takes in one batch.
    pub fn max_rows(mut self, rows: usize) -> Self {
        self.limits.max_rows = rows;
        self
    }

    /// Per-key overflow rows per interval (one per key, minute and outcome that found the
    /// table full). Past it, requests go to the table-wide overflow row (no key id) of
    /// their minute and outcome, and only the per-key detail is lost. Default 1 000.
    pub fn max_overflow_rows(mut self, rows: usize) -> Self {
        self.limits.max_overflow_rows = rows;
        self
    }

    /// Client networks (IPv4 /24, IPv6 /48) kept per key per interval, for the receiver's
    /// new-network alert. Only requests with a key id and a client address (see
    /// [`ApiKeyLayer::client_ip_from_header`](crate::ApiKeyLayer::client_ip_from_header))
    /// have one. Networks past the cap are counted in `networks_dropped`. Default 16.
    pub fn max_networks_per_key(mut self, networks: usize) -> Self {
        self.limits.max_networks_per_key = networks;
        self
    }

    /// Client networks kept per interval, all keys together. Default 10 000.
    pub fn max_networks(mut self, networks: usize) -> Self {
        self.limits.max_networks = networks;
        self
    }

    /// How often the table is cut and sent as one batch. Default 10 s.
    ///
    /// Also the longest one export attempt may take before it is abandoned (and the batch
    /// retried), and the longest wait between retries of a failed batch (1 s after the
    /// first failure, doubling, jittered).
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// Batches kept while the receiver cannot take them. When one more is cut, the oldest
    /// is given up: its requests are counted in [`AggregatorStats::lost`] and reported in
    /// the `dropped` of the next batch delivered. Default 6 (a minute at the default
    /// interval). See the memory note above.
    ///
    /// An interval is usually one batch. One that would encode to more than 8 MiB, 20 000
    /// rows or 20 000 networks (rows whose latencies spread over many buckets, a raised
    /// [`max_rows`](Self::max_rows)) goes out as several, each with its own id, so that the
    /// key service never refuses it as too large; each counts here as one batch.
    pub fn max_pending_batches(mut self, batches: usize) -> Self {
        self.max_pending_batches = batches;
        self
    }

    /// How long [`AggregatorHandle::shutdown`] (or the last sink going away) may take to
    /// deliver the last interval and everything pending. What is not delivered by then is
    /// counted as lost. Default 5 s.
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.shutdown_deadline = deadline;
        self
    }

    /// Spawns the worker on the current Tokio runtime.
    ///
    /// Returns the sink to give to the layer (clone it freely) and the handle that
    /// flushes and shuts the aggregator down. Dropping the handle detaches the worker: it
    /// keeps cutting and exporting until every [`UsageAggregator`] clone is gone, then
    /// cuts the last interval and delivers what is pending within the shutdown deadline.
    /// (If the runtime stops first, that last delivery does not happen: call
    /// [`shutdown`](AggregatorHandle::shutdown).)
    ///
    /// Install a `metrics` recorder before calling this if you want its counters.
    pub fn build<E: AggregateExporter>(
        self,
        exporter: E,
    ) -> Result<(UsageAggregator, AggregatorHandle), AggregatorBuildError> {
        for (name, zero) in [
            ("max_rows", self.limits.max_rows == 0),
            ("max_overflow_rows", self.limits.max_overflow_rows == 0),
            ("max_networks_per_key", self.limits.max_networks_per_key == 0),
            ("max_networks", self.limits.max_networks == 0),
            ("flush_interval", self.flush_interval.is_zero()),
            ("max_pending_batches", self.max_pending_batches == 0),
            ("shutdown_deadline", self.shutdown_deadline.is_zero()),
        ] {
            if zero {
                return Err(AggregatorBuildError::Zero(name));
            }
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| AggregatorBuildError::NoRuntime)?;

        // Twice the cores: a thread rarely finds its shard taken, and a row hot on every
        // core is stored at most this many times.
        let shards = std::thread::available_parallelism().map_or(4, |n| n.get()).saturating_mul(2).clamp(2, 64);
        let shared = Arc::new(Shared {
            table: Table::new(self.limits, shards),
            closed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            exported: AtomicU64::new(0),
            batches_exported: AtomicU64::new(0),
            export_failures: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            pending_batches: AtomicUsize::new(0),
            pending_requests: AtomicU64::new(0),
        });
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let settings = Settings {
            flush_interval: self.flush_interval,
            shutdown_deadline: self.shutdown_deadline,
            max_pending_batches: self.max_pending_batches,
        };
        let max_networks_per_key = self.limits.max_networks_per_key;
        let worker = shutdown::spawn(&runtime, self.shutdown_deadline, |stop| {
            Worker::new(shared.clone(), exporter, commands_rx, stop, settings, max_networks_per_key).run()
        });
        let aggregator = UsageAggregator {
            inner: Arc::new(SinkInner {
                shared,
                commands: commands_tx,
                limits: self.limits,
                interval: self.flush_interval,
            }),
        };
        let handle = AggregatorHandle { aggregator: aggregator.clone(), worker };
        Ok((aggregator, handle))
    }
}

struct SinkInner {
    shared: Arc<Shared>,
    // Never sent on by `record`; while any clone is alive the worker knows someone may
    // still record or flush.
    commands: mpsc::Sender<Command>,
    limits: Limits,
    interval: Duration,
}

/// The usage sink to hand to [`ApiKeyLayer::usage`](crate::ApiKeyLayer::usage): decided
/// requests are folded in memory into rows keyed by (minute, key id, route, method,
/// outcome), each holding counts by status class, a [`LatencyHistogram`](crate::LatencyHistogram)
/// and the time of its last request; every flush interval the rows are cut into one
/// [`AggregateBatch`](crate::AggregateBatch) for an [`AggregateExporter`] (such as
/// `HttpUsageExporter`, to the key service).
///
/// [`record`](UsageSink::record) never blocks on I/O and allocates nothing unless the
/// request needs a new row: it hashes the borrowed row key, takes its thread's shard lock
/// (a lock no one holds for more than an addition, or for the swap at a cut; when it is
/// taken, the next free shard is used) and adds. The minute comes from the request's
/// start `Instant` and an anchor the worker refreshes each interval, so the wall clock is
/// not read per request.
///
/// Bounded: rows per interval are capped (default 10 000), and past the cap requests are
/// folded into per-key overflow rows and counted, never dropped; see
/// [`UsageAggregatorBuilder`] for every cap and the memory they bound.
///
/// Delivery: each batch has a random `batch_id` (32 hex digits) that the receiver applies
/// at most once. A batch the exporter fails to deliver stays pending, unchanged, and is
/// sent again (oldest first) after a backoff; when more than `max_pending_batches` wait,
/// the oldest is given up and its request count travels in the next delivered batch's
/// `dropped`. A batch the receiver refuses as malformed or too large (HTTP 400, 413, 422,
/// or an encoding error: see [`ExportError::is_permanent`](crate::ExportError::is_permanent))
/// is given up at once. An interval with no requests sends nothing.
///
/// ```
/// # use keygate::{AggregateBatch, AggregateExporter, ExportError, UsageAggregator};
/// # struct Discard;
/// # impl AggregateExporter for Discard {
/// #     async fn export(&self, _: &AggregateBatch) -> Result<(), ExportError> { Ok(()) }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (sink, handle) = UsageAggregator::builder()
///     .max_rows(10_000)
///     .flush_interval(std::time::Duration::from_secs(10))
///     .build(Discard)?;
/// // layer = ApiKeyLayer::new(verifier).usage(sink.clone());
/// # drop(sink);
/// let stats = handle.shutdown().await; // sends the last interval, within 5 s
/// assert_eq!(stats.recorded, stats.exported + stats.lost);
/// # Ok(())
/// # }
/// ```
///
/// Metrics (through the `metrics` facade, published by the worker, never by `record`):
/// `keygate_usage_requests_aggregated_total`, `keygate_usage_requests_overflowed_total`,
/// `keygate_usage_networks_dropped_total`, `keygate_usage_requests_exported_total`,
/// `keygate_usage_batches_exported_total`, `keygate_usage_aggregate_export_failures_total`,
/// `keygate_usage_requests_lost_total`, `keygate_usage_requests_refused_total`, and the
/// gauges `keygate_usage_batches_pending` and `keygate_usage_rows` (see
/// [`usage_metrics`](crate::usage_metrics)).
#[derive(Clone)]
pub struct UsageAggregator {
    inner: Arc<SinkInner>,
}

impl UsageAggregator {
    /// A builder with the defaults (see [`UsageAggregatorBuilder`]).
    pub fn builder() -> UsageAggregatorBuilder {
        UsageAggregatorBuilder::default()
    }

    /// The aggregator's counters.
    pub fn stats(&self) -> AggregatorStats {
        self.inner.shared.stats()
    }

    /// Cuts the table now and sends every pending batch, and waits for it.
    ///
    /// Returns [`FlushError::Pending`] when a batch could not be delivered (it stays
    /// pending and is retried) and [`FlushError::Closed`] after shutdown.
    pub async fn flush(&self) -> Result<(), FlushError> {
        let (reply, answer) = oneshot::channel();
        self.inner.commands.send(Command::Flush(reply)).await.map_err(|_| FlushError::Closed)?;
        answer.await.unwrap_or(Err(FlushError::Closed))
    }

    /// The flush interval.
    pub fn flush_interval(&self) -> Duration {
        self.inner.interval
    }

    /// The row cap per interval.
    pub fn max_rows(&self) -> usize {
        self.inner.limits.max_rows
    }
}

impl UsageSink for UsageAggregator {
    #[inline]
    fn record(&self, request: &DecidedRequest<'_>) {
        let shared = &*self.inner.shared;
        if !shared.table.record(request, &shared.closed) {
            shared.refuse();
        }
    }
}

impl fmt::Debug for UsageAggregator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageAggregator")
            .field("limits", &self.inner.limits)
            .field("flush_interval", &self.inner.interval)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Controls a running [`UsageAggregator`]: flush, read counters, shut down.
///
/// Dropping it without [`shutdown`](Self::shutdown) detaches the worker (see
/// [`UsageAggregatorBuilder::build`]).
pub struct AggregatorHandle {
    aggregator: UsageAggregator,
    worker: Stopper,
}

impl AggregatorHandle {
    /// Another sink for the same aggregator.
    pub fn aggregator(&self) -> UsageAggregator {
        self.aggregator.clone()
    }

    /// The aggregator's counters.
    pub fn stats(&self) -> AggregatorStats {
        self.aggregator.stats()
    }

    /// Cuts the table now and sends every pending batch. See [`UsageAggregator::flush`].
    pub async fn flush(&self) -> Result<(), FlushError> {
        self.aggregator.flush().await
    }

    /// Stops taking requests, cuts the last interval, delivers it and everything pending
    /// within the shutdown deadline (default 5 s), and returns the final counters.
    ///
    /// From this call on, `record` on any clone refuses and counts
    /// ([`AggregatorStats::dropped`]). What is not delivered by the deadline is counted as
    /// lost. Returns within the deadline plus 100 ms even if the exporter never answers.
    pub async fn shutdown(self) -> AggregatorStats {
        let Self { aggregator, worker } = self;
        let shared = aggregator.inner.shared.clone();
        shared.closed.store(true, Ordering::SeqCst);
        drop(aggregator);
        if !worker.stop().await {
            // Whatever was pending is gone. (The worker only waits inside exports, when
            // everything it holds is in the pending queue.)
            shared.lose(shared.pending_requests.swap(0, Ordering::Relaxed));
            shared.pending_batches.store(0, Ordering::Relaxed);
        }
        // Requests that raced the `closed` flag, or that the worker never cut.
        let mut spares: Vec<Tables> = (0..shared.table.shard_count()).map(|_| Tables::default()).collect();
        shared.table.cut(&mut spares);
        let stragglers: u64 = spares.iter().flat_map(|t| t.rows.iter()).map(|row| row.requests).sum();
        metrics::counter!(metric::AGGREGATED).increment(stragglers);
        shared.lose(stragglers);
        metrics::gauge!(metric::BATCHES_PENDING).set(0.0);
        let stats = shared.stats();
        if stats.lost > 0 || stats.dropped > 0 {
            tracing::warn!(
                target: "keygate::usage",
                dropped = stats.dropped,
                lost = stats.lost,
                exported = stats.exported,
                "usage aggregator shut down with undelivered requests"
            );
        }
        stats
    }
}

impl fmt::Debug for AggregatorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AggregatorHandle")
            .field("aggregator", &self.aggregator)
            .field("shutdown_deadline", &self.worker.deadline())
            .finish_non_exhaustive()
    }
}
