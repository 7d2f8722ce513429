//! The bounded, batching usage pipeline.
//!
//! Requests put events into a fixed-size lock-free queue; one background task takes them
//! out in batches and hands each batch to a [`UsageExporter`]. Nothing on the request path
//! waits, allocates (beyond the event the caller built) or takes a lock: when the queue is
//! full the event is dropped and counted, and the count travels downstream in the next
//! batch's `dropped` field.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use super::exporter::{ExportError, UsageBatch, UsageExporter};
use super::shutdown::{self, StopRequest, Stopper};
use super::{DecidedRequest, UsageEvent, UsageSink};

/// Default queue capacity: 65 536 events.
pub const DEFAULT_CAPACITY: usize = 65_536;
/// Default batch size: 1 000 events.
pub const DEFAULT_BATCH_SIZE: usize = 1_000;
/// Default flush interval: 1 s.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Default shutdown deadline: 5 s.
pub const DEFAULT_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

const COMMAND_QUEUE: usize = 16;

/// Metric names: counters (`_total`) and gauges, of the [`UsagePipeline`] (raw events)
/// and of the [`UsageAggregator`](crate::UsageAggregator) (aggregated requests).
pub mod metric {
    /// Events accepted into the queue.
    pub const ENQUEUED: &str = "keygate_usage_events_enqueued_total";
    /// Events refused because the queue was full or the pipeline shut down.
    pub const DROPPED: &str = "keygate_usage_events_dropped_total";
    /// Events the exporter delivered.
    pub const EXPORTED: &str = "keygate_usage_events_exported_total";
    /// Batches the exporter failed to deliver.
    pub const EXPORT_FAILURES: &str = "keygate_usage_export_failures_total";
    /// Events accepted into the queue that were never delivered (failed batch, shutdown deadline).
    pub const LOST: &str = "keygate_usage_events_lost_total";
    /// Events waiting in the queue (gauge).
    pub const QUEUE_DEPTH: &str = "keygate_usage_queue_depth";

    /// Aggregator: requests folded into rows (published at each cut).
    pub const AGGREGATED: &str = "keygate_usage_requests_aggregated_total";
    /// Aggregator: of those, requests folded into overflow rows because the table was full.
    pub const OVERFLOWED: &str = "keygate_usage_requests_overflowed_total";
    /// Aggregator: client networks not kept because a key's or the table's set was full.
    pub const NETWORKS_DROPPED: &str = "keygate_usage_networks_dropped_total";
    /// Aggregator: requests refused because the aggregator had shut down.
    pub const REQUESTS_REFUSED: &str = "keygate_usage_requests_refused_total";
    /// Aggregator: requests in batches the exporter delivered.
    pub const REQUESTS_EXPORTED: &str = "keygate_usage_requests_exported_total";
    /// Aggregator: batches the exporter delivered.
    pub const BATCHES_EXPORTED: &str = "keygate_usage_batches_exported_total";
    /// Aggregator: failed export attempts (a batch that is retried counts once per attempt).
    pub const AGGREGATE_EXPORT_FAILURES: &str = "keygate_usage_aggregate_export_failures_total";
    /// Aggregator: requests given up (pending queue full, refused batch, shutdown deadline).
    pub const REQUESTS_LOST: &str = "keygate_usage_requests_lost_total";
    /// Aggregator: batches waiting to be delivered (gauge).
    pub const BATCHES_PENDING: &str = "keygate_usage_batches_pending";
    /// Aggregator: rows the table held when the last interval was cut (gauge).
    pub const ROWS: &str = "keygate_usage_rows";
}

/// Keeps counters that every request writes on cache lines of their own, so producers on
/// different cores do not also fight over the queue's indices or the read-mostly fields.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

struct Shared {
    queue: ArrayQueue<UsageEvent>,
    enqueued: Padded<AtomicU64>,
    dropped: Padded<AtomicU64>,
    closed: AtomicBool,
    batch_size: u64,
    notify: Notify,
    // Written by the worker only.
    exported: AtomicU64,
    export_failures: AtomicU64,
    lost: AtomicU64,
    in_flight: AtomicU64,
}

impl Shared {
    #[cold]
    fn refuse(&self) {
        self.dropped.0.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric::DROPPED).increment(1);
    }

    fn lose(&self, n: u64) {
        if n > 0 {
            self.lost.fetch_add(n, Ordering::Relaxed);
            metrics::counter!(metric::LOST).increment(n);
        }
    }

    fn stats(&self) -> PipelineStats {
        PipelineStats {
            enqueued: self.enqueued.0.load(Ordering::Relaxed),
            dropped: self.dropped.0.load(Ordering::Relaxed),
            exported: self.exported.load(Ordering::Relaxed),
            export_failures: self.export_failures.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            queued: self.queue.len(),
        }
    }
}

/// Counters of a [`UsagePipeline`], each monotonic except `queued`.
///
/// Read without a lock while requests keep arriving, so the fields are not one atomic
/// snapshot. Once the pipeline is quiet (after [`PipelineHandle::shutdown`]),
/// `enqueued == exported + lost + queued` and every event recorded is in exactly one of
/// `exported`, `lost` and `dropped`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PipelineStats {
    /// Events accepted into the queue.
    pub enqueued: u64,
    /// Events refused at the door: the queue was full, or the pipeline had shut down.
    pub dropped: u64,
    /// Events the exporter delivered.
    pub exported: u64,
    /// Batches the exporter failed to deliver.
    pub export_failures: u64,
    /// Events accepted but never delivered: in a failed batch, or still queued when the
    /// shutdown deadline passed.
    pub lost: u64,
    /// Events waiting in the queue right now.
    pub queued: usize,
}

/// A [`UsagePipeline`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineBuildError {
    /// `build` was called outside a Tokio runtime, so the worker has nowhere to run.
    #[error("the usage pipeline must be built inside a Tokio runtime")]
    NoRuntime,
    /// A size or duration was zero.
    #[error("usage pipeline setting `{0}` must be greater than zero")]
    Zero(&'static str),
    /// The batch size exceeds the queue capacity, so no batch could ever fill up.
    #[error("usage pipeline batch size {batch_size} exceeds the queue capacity {capacity}")]
    BatchLargerThanQueue {
        /// The batch size asked for.
        batch_size: usize,
        /// The queue capacity asked for.
        capacity: usize,
    },
}

/// [`flush`](UsagePipeline::flush) did not deliver everything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// The pipeline has shut down (or its worker is gone).
    #[error("the usage pipeline has shut down")]
    Closed,
    /// Some batches failed; their events are counted as lost.
    #[error("{batches} usage batch(es) with {events} event(s) could not be delivered")]
    Failed {
        /// Batches that failed.
        batches: u64,
        /// Events in them.
        events: u64,
    },
    /// [`UsageAggregator`](crate::UsageAggregator): some batches could not be delivered
    /// yet; they stay pending and are retried (and counted as lost only if given up).
    #[error("{batches} usage batch(es) with {requests} request(s) are still pending")]
    Pending {
        /// Batches still pending.
        batches: u64,
        /// Requests in them.
        requests: u64,
    },
}

/// Builds a [`UsagePipeline`]. Every limit is explicit; the defaults follow.
///
/// | setting | default |
/// | --- | --- |
/// | [`capacity`](Self::capacity) | 65 536 events |
/// | [`batch_size`](Self::batch_size) | 1 000 events |
/// | [`flush_interval`](Self::flush_interval) | 1 s |
/// | [`shutdown_deadline`](Self::shutdown_deadline) | 5 s |
#[derive(Debug, Clone)]
#[must_use]
pub struct UsagePipelineBuilder {
    capacity: usize,
    batch_size: usize,
    flush_interval: Duration,
    shutdown_deadline: Duration,
}

impl Default for UsagePipelineBuilder {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_CAPACITY,
            batch_size: DEFAULT_BATCH_SIZE,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            shutdown_deadline: DEFAULT_SHUTDOWN_DEADLINE,
        }
    }
}

impl UsagePipelineBuilder {
    /// How many events the queue holds before new ones are dropped. Default 65 536.
    ///
    /// The queue is allocated once, up front, and never grows: 152 bytes per slot on 64-bit
    /// targets, so about 10 MB at the default.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Events per batch: a batch is exported as soon as this many are queued, and no
    /// batch is larger. Default 1 000. Must not exceed the capacity.
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// Longest time an event waits in the queue before a (possibly partial) batch is
    /// exported; drop counts are also reported at this pace when no events flow. Default 1 s.
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// How long [`PipelineHandle::shutdown`] (or the last handle going away) may take to
    /// export what is queued. Whatever is not delivered by then is counted as lost.
    /// Default 5 s.
    pub fn shutdown_deadline(mut self, deadline: Duration) -> Self {
        self.shutdown_deadline = deadline;
        self
    }

    /// Allocates the queue and spawns the worker on the current Tokio runtime.
    ///
    /// Returns the sink to give to the layer (clone it freely) and the handle that flushes
    /// and shuts the pipeline down. Dropping the handle detaches the worker: it keeps
    /// exporting until every [`UsagePipeline`] clone is gone, then drains the queue within
    /// the shutdown deadline.
    ///
    /// Install a `metrics` recorder before calling this if you want its counters.
    pub fn build<E: UsageExporter>(self, exporter: E) -> Result<(UsagePipeline, PipelineHandle), PipelineBuildError> {
        for (name, zero) in [
            ("capacity", self.capacity == 0),
            ("batch_size", self.batch_size == 0),
            ("flush_interval", self.flush_interval.is_zero()),
            ("shutdown_deadline", self.shutdown_deadline.is_zero()),
        ] {
            if zero {
                return Err(PipelineBuildError::Zero(name));
            }
        }
        if self.batch_size > self.capacity {
            return Err(PipelineBuildError::BatchLargerThanQueue {
                batch_size: self.batch_size,
                capacity: self.capacity,
            });
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| PipelineBuildError::NoRuntime)?;

        let shared = Arc::new(Shared {
            queue: ArrayQueue::new(self.capacity),
            enqueued: Padded::default(),
            dropped: Padded::default(),
            closed: AtomicBool::new(false),
            batch_size: self.batch_size as u64,
            notify: Notify::new(),
            exported: AtomicU64::new(0),
            export_failures: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        });
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let worker = |shutdown| Worker {
            shared: shared.clone(),
            exporter,
            commands: commands_rx,
            shutdown,
            deadline: None,
            batch_size: self.batch_size,
            flush_interval: self.flush_interval,
            shutdown_deadline: self.shutdown_deadline,
            dropped_reported: 0,
            lost_unreported: 0,
            enqueued_published: 0,
        };
        let worker = shutdown::spawn(&runtime, self.shutdown_deadline, |stop| worker(stop).run());
        let pipeline = UsagePipeline {
            inner: Arc::new(SinkInner {
                shared,
                commands: commands_tx,
                capacity: self.capacity,
                batch_size: self.batch_size,
            }),
        };
        let handle = PipelineHandle { pipeline: pipeline.clone(), worker };
        Ok((pipeline, handle))
    }
}

struct SinkInner {
    shared: Arc<Shared>,
    // Never sent on by `record`; while any clone is alive the worker knows someone may
    // still record or flush.
    commands: mpsc::Sender<Command>,
    capacity: usize,
    batch_size: usize,
}

/// The usage sink to hand to [`ApiKeyLayer::usage`](crate::ApiKeyLayer): a bounded queue in
/// front of a batching background exporter.
///
/// [`record`](UsageSink::record) never blocks and never allocates: it is one lock-free push
/// and one counter increment (≈ 20–40 ns). When the queue is full, or after shutdown, the
/// event is dropped, counted in [`PipelineStats::dropped`] and the
/// `keygate_usage_events_dropped_total` metric, and reported downstream in the next batch.
///
/// Defaults (see [`UsagePipelineBuilder`]): a queue of 65 536 events, exported every 1 s
/// or as soon as 1 000 are queued, 5 s to drain at shutdown.
///
/// ```
/// # use keygate::{ExportError, UsageBatch, UsageExporter, UsagePipeline};
/// # struct Discard;
/// # impl UsageExporter for Discard {
/// #     async fn export(&self, _: UsageBatch) -> Result<(), ExportError> { Ok(()) }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let (sink, handle) = UsagePipeline::builder()
///     .capacity(65_536)
///     .batch_size(1_000)
///     .flush_interval(std::time::Duration::from_secs(1))
///     .build(Discard)?;
/// // layer = ApiKeyLayer::new(verifier).usage(sink.clone());
/// # drop(sink);
/// let stats = handle.shutdown().await; // flushes what is queued, within 5 s
/// assert_eq!(stats.dropped, 0);
/// # Ok(())
/// # }
/// ```
///
/// Metrics (through the `metrics` facade): `keygate_usage_events_enqueued_total`,
/// `keygate_usage_events_dropped_total`, `keygate_usage_events_exported_total`,
/// `keygate_usage_export_failures_total`, `keygate_usage_events_lost_total` and the gauge
/// `keygate_usage_queue_depth`. All but `dropped` are published by the worker after each
/// export, keeping the request path to atomics.
#[derive(Clone)]
pub struct UsagePipeline {
    inner: Arc<SinkInner>,
}

impl UsagePipeline {
    /// A builder with the defaults: 65 536 events, batches of 1 000, every 1 s, 5 s to drain.
    pub fn builder() -> UsagePipelineBuilder {
        UsagePipelineBuilder::default()
    }

    /// The pipeline's counters.
    pub fn stats(&self) -> PipelineStats {
        self.inner.shared.stats()
    }

    /// Exports everything queued now, and waits for it.
    ///
    /// Returns [`FlushError::Failed`] when a batch could not be delivered (its events are
    /// counted as lost) and [`FlushError::Closed`] after shutdown.
    pub async fn flush(&self) -> Result<(), FlushError> {
        let (reply, answer) = oneshot::channel();
        self.inner.commands.send(Command::Flush(reply)).await.map_err(|_| FlushError::Closed)?;
        answer.await.unwrap_or(Err(FlushError::Closed))
    }

    /// Queue capacity, in events.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Events per batch.
    pub fn batch_size(&self) -> usize {
        self.inner.batch_size
    }
}

impl UsageSink for UsagePipeline {
    #[inline]
    fn record(&self, request: &DecidedRequest<'_>) {
        let shared = &*self.inner.shared;
        if shared.closed.load(Ordering::Relaxed) {
            return shared.refuse();
        }
        match shared.queue.push(request.to_event()) {
            Ok(()) => {
                // Wake the worker once per `batch_size` events rather than checking the
                // queue length: the counter increment is needed anyway, and `Notify` keeps
                // a permit when the worker is busy, so no wake-up is lost.
                let n = shared.enqueued.0.fetch_add(1, Ordering::Relaxed) + 1;
                if n % shared.batch_size == 0 {
                    shared.notify.notify_one();
                }
            }
            Err(_) => shared.refuse(),
        }
    }
}

impl fmt::Debug for UsagePipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsagePipeline")
            .field("capacity", &self.inner.capacity)
            .field("batch_size", &self.inner.batch_size)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Controls a running [`UsagePipeline`]: flush, read counters, shut down.
///
/// Dropping it without [`shutdown`](Self::shutdown) detaches the worker (see
/// [`UsagePipelineBuilder::build`]).
pub struct PipelineHandle {
    pipeline: UsagePipeline,
    worker: Stopper,
}

impl PipelineHandle {
    /// Another sink for the same pipeline.
    pub fn pipeline(&self) -> UsagePipeline {
        self.pipeline.clone()
    }

    /// The pipeline's counters.
    pub fn stats(&self) -> PipelineStats {
        self.pipeline.stats()
    }

    /// Exports everything queued now, and waits for it. See [`UsagePipeline::flush`].
    pub async fn flush(&self) -> Result<(), FlushError> {
        self.pipeline.flush().await
    }

    /// Stops taking events, exports everything queued within the shutdown deadline
    /// (default 5 s), and returns the final counters.
    ///
    /// From this call on, `record` on any clone drops and counts. Events still queued when
    /// the deadline passes are counted as lost. Returns within the deadline plus 100 ms even
    /// if the exporter never answers.
    pub async fn shutdown(self) -> PipelineStats {
        let Self { pipeline, worker } = self;
        let shared = pipeline.inner.shared.clone();
        shared.closed.store(true, Ordering::SeqCst);
        drop(pipeline);
        if !worker.stop().await {
            // Whatever the worker held is gone.
            shared.lose(shared.in_flight.swap(0, Ordering::Relaxed));
        }
        // Anything still here raced the `closed` flag or outlived the worker.
        let mut stragglers = 0;
        while shared.queue.pop().is_some() {
            stragglers += 1;
        }
        shared.lose(stragglers);
        let stats = shared.stats();
        metrics::gauge!(metric::QUEUE_DEPTH).set(0.0);
        if stats.lost > 0 || stats.dropped > 0 {
            tracing::warn!(
                target: "keygate::usage",
                dropped = stats.dropped,
                lost = stats.lost,
                exported = stats.exported,
                "usage pipeline shut down with undelivered events"
            );
        }
        stats
    }
}

impl fmt::Debug for PipelineHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineHandle")
            .field("pipeline", &self.pipeline)
            .field("shutdown_deadline", &self.worker.deadline())
            .finish_non_exhaustive()
    }
}

enum Command {
    Flush(oneshot::Sender<Result<(), FlushError>>),
}

enum Wake {
    Full,
    Tick,
    Flush(oneshot::Sender<Result<(), FlushError>>),
    Shutdown,
}

struct Worker<E> {
    shared: Arc<Shared>,
    exporter: E,
    commands: mpsc::Receiver<Command>,
    shutdown: StopRequest,
    /// Set once shutdown has begun: every export from then on ends by this instant.
    deadline: Option<Instant>,
    batch_size: usize,
    flush_interval: Duration,
    shutdown_deadline: Duration,
    /// `shared.dropped` as of the last batch that carried it downstream.
    dropped_reported: u64,
    /// Lost events (and drop counts of failed batches) not yet reported downstream.
    lost_unreported: u64,
    enqueued_published: u64,
}

impl<E: UsageExporter> Worker<E> {
    async fn run(mut self) {
        let mut tick = tokio::time::interval_at(Instant::now() + self.flush_interval, self.flush_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let wake = tokio::select! {
                biased;
                deadline = self.shutdown.asked() => {
                    self.deadline = Some(deadline);
                    Wake::Shutdown
                }
                command = self.commands.recv() => match command {
                    Some(Command::Flush(reply)) => Wake::Flush(reply),
                    // Every sink and the handle are gone: nobody can record again.
                    None => Wake::Shutdown,
                },
                () = self.shared.notify.notified() => Wake::Full,
                _ = tick.tick() => Wake::Tick,
            };
            match wake {
                Wake::Full => self.export_full_batches().await,
                Wake::Tick => {
                    self.export_full_batches().await;
                    if self.shared.queue.len() < self.batch_size {
                        self.export_batch(self.batch_size).await;
                    }
                }
                Wake::Flush(reply) => {
                    let result = self.flush().await;
                    let _ = reply.send(result);
                }
                Wake::Shutdown => break,
            }
            self.publish_metrics();
        }
        self.drain().await;
        self.publish_metrics();
    }

    /// Exports full batches while there are any, at most a queue's worth per call so that
    /// a flood cannot starve flush and shutdown requests.
    async fn export_full_batches(&mut self) {
        let rounds = self.shared.queue.capacity() / self.batch_size + 1;
        for _ in 0..rounds {
            if self.shared.queue.len() < self.batch_size {
                return;
            }
            self.export_batch(self.batch_size).await;
        }
        // Still full batches waiting: come straight back after looking at commands.
        self.shared.notify.notify_one();
    }

    /// Exports what was queued when the request came in, plus any drop count.
    async fn flush(&mut self) -> Result<(), FlushError> {
        let mut left = self.shared.queue.len();
        let (mut batches, mut events) = (0, 0);
        loop {
            let take = left.min(self.batch_size);
            let (sent, ok) = self.export_batch(take).await;
            if !ok {
                batches += 1;
                events += sent;
            }
            left -= take;
            if left == 0 || sent == 0 {
                break;
            }
        }
        if batches == 0 { Ok(()) } else { Err(FlushError::Failed { batches, events }) }
    }

    /// Exports everything left before the deadline; counts the rest as lost.
    async fn drain(&mut self) {
        let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + self.shutdown_deadline);
        while Instant::now() < deadline {
            let (sent, _) = self.export_batch(self.batch_size).await;
            if sent == 0 && self.shared.queue.is_empty() {
                break;
            }
        }
        let mut abandoned = 0;
        while self.shared.queue.pop().is_some() {
            abandoned += 1;
        }
        self.shared.lose(abandoned);
    }

    /// Pops up to `max` events and exports them with the pending drop count. Returns how
    /// many events went out and whether the exporter took them. Sends nothing when there
    /// is nothing to say.
    async fn export_batch(&mut self, max: usize) -> (u64, bool) {
        let mut events = Vec::with_capacity(max.min(self.shared.queue.len()));
        while events.len() < max {
            match self.shared.queue.pop() {
                Some(event) => events.push(event),
                None => break,
            }
        }
        let dropped_total = self.shared.dropped.0.load(Ordering::Relaxed);
        let dropped = dropped_total.saturating_sub(self.dropped_reported) + self.lost_unreported;
        if events.is_empty() && dropped == 0 {
            return (0, true);
        }
        self.dropped_reported = dropped_total;
        self.lost_unreported = 0;

        let sent = events.len() as u64;
        self.shared.in_flight.store(sent, Ordering::Relaxed);
        let result = {
            let export = self.exporter.export(UsageBatch { events, dropped });
            tokio::pin!(export);
            // Normally an export takes as long as the exporter likes; once shutdown has
            // begun it must end by the deadline.
            let deadline = tokio::select! {
                biased;
                result = &mut export => Ok(result),
                deadline = self.shutdown.deadline(self.deadline) => Err(deadline),
            };
            match deadline {
                Ok(result) => result,
                Err(deadline) => {
                    self.deadline = Some(deadline);
                    tokio::time::timeout_at(deadline, export).await.unwrap_or(Err(ExportError::Timeout))
                }
            }
        };
        self.shared.in_flight.store(0, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.shared.exported.fetch_add(sent, Ordering::Relaxed);
                metrics::counter!(metric::EXPORTED).increment(sent);
                (sent, true)
            }
            Err(error) => {
                self.shared.export_failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(metric::EXPORT_FAILURES).increment(1);
                self.shared.lose(sent);
                // Report these events, and the drop count the failed batch carried, next time.
                self.lost_unreported += sent + dropped;
                tracing::warn!(
                    target: "keygate::usage",
                    %error,
                    events = sent,
                    dropped,
                    "usage batch not delivered; its events are counted as lost"
                );
                (sent, false)
            }
        }
    }

    fn publish_metrics(&mut self) {
        let enqueued = self.shared.enqueued.0.load(Ordering::Relaxed);
        if enqueued > self.enqueued_published {
            metrics::counter!(metric::ENQUEUED).increment(enqueued - self.enqueued_published);
            self.enqueued_published = enqueued;
        }
        metrics::gauge!(metric::QUEUE_DEPTH).set(self.shared.queue.len() as f64);
    }
}
