//! The aggregator's background task: every interval it cuts the table, merges it into a
//! batch, queues the batch as pending and sends the pending batches oldest first.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use super::Shared;
use super::merge::Merger;
use super::split;
use super::table::Tables;
use crate::usage::AggregateBatch;
use crate::usage::exporter::{AggregateExporter, ExportError};
use crate::usage::pipeline::{FlushError, metric};
use crate::usage::shutdown::StopRequest;

/// First wait after a failed export; it doubles per failure up to the flush interval.
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);

pub(super) enum Command {
    Flush(oneshot::Sender<Result<(), FlushError>>),
}

pub(super) struct Settings {
    pub(super) flush_interval: Duration,
    pub(super) shutdown_deadline: Duration,
    pub(super) max_pending_batches: usize,
}

struct Pending {
    batch: AggregateBatch,
    requests: u64,
    /// Once sent, a batch never changes: a retry must be the same bytes under the same id.
    attempted: bool,
}

pub(super) struct Worker<E> {
    shared: Arc<Shared>,
    exporter: E,
    commands: mpsc::Receiver<Command>,
    shutdown: StopRequest,
    /// Set once shutdown has begun: every export from then on ends by this instant.
    deadline: Option<Instant>,
    settings: Settings,
    /// The tables the shards swap in at the next cut (one per shard).
    spares: Vec<Tables>,
    merger: Merger,
    pending: VecDeque<Pending>,
    /// Requests given up and not yet carried to the key service in a batch's `dropped`.
    carry: u64,
    failures: u32,
    retry_at: Option<Instant>,
}

enum Wake {
    Tick,
    Retry,
    Flush(oneshot::Sender<Result<(), FlushError>>),
    Shutdown,
}

impl<E: AggregateExporter> Worker<E> {
    pub(super) fn new(
        shared: Arc<Shared>,
        exporter: E,
        commands: mpsc::Receiver<Command>,
        shutdown: StopRequest,
        settings: Settings,
        max_networks_per_key: usize,
    ) -> Self {
        let spares = (0..shared.table.shard_count()).map(|_| Tables::default()).collect();
        Self {
            shared,
            exporter,
            commands,
            shutdown,
            deadline: None,
            settings,
            spares,
            merger: Merger::new(max_networks_per_key),
            pending: VecDeque::new(),
            carry: 0,
            failures: 0,
            retry_at: None,
        }
    }

    pub(super) async fn run(mut self) {
        let interval = self.settings.flush_interval;
        let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let retry_at = self.retry_at;
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
                _ = tick.tick() => Wake::Tick,
                () = sleep_until(retry_at) => Wake::Retry,
            };
            match wake {
                Wake::Tick => {
                    self.cut();
                    if self.retry_at.is_none_or(|at| at <= Instant::now()) {
                        let _ = self.send().await;
                    }
                }
                Wake::Retry => {
                    let _ = self.send().await;
                }
                Wake::Flush(reply) => {
                    self.cut();
                    let _ = reply.send(self.send().await);
                }
                Wake::Shutdown => break,
            }
        }
        self.finish().await;
    }

    /// Cuts the table and queues what it held as a batch. An empty interval queues
    /// nothing, unless a drop count has no other batch to travel in.
    fn cut(&mut self) {
        let table = &self.shared.table;
        table.clock.refresh();
        metrics::gauge!(metric::ROWS).set(table.rows() as f64);
        let counts = table.cut(&mut self.spares);
        let merged = self.merger.merge(&mut self.spares, &table.clock);
        let networks_dropped = counts.networks_dropped + merged.networks_dropped;
        let batch = AggregateBatch {
            batch_id: String::new(),
            rows: merged.rows,
            networks: merged.networks,
            dropped: 0,
            overflowed: counts.overflowed,
            networks_dropped,
        };
        let requests = batch.requests();
        metrics::counter!(metric::AGGREGATED).increment(requests);
        metrics::counter!(metric::OVERFLOWED).increment(counts.overflowed);
        metrics::counter!(metric::NETWORKS_DROPPED).increment(networks_dropped);
        let carried_elsewhere = self.carry == 0 || self.pending.iter().any(|p| !p.attempted);
        if batch.rows.is_empty() && batch.networks.is_empty() && networks_dropped == 0 && carried_elsewhere {
            return;
        }
        // Usually one part; the counts travel with the first.
        let AggregateBatch { rows, networks, .. } = batch;
        let mut counts = Some((counts.overflowed, networks_dropped));
        for part in split::split(rows, networks) {
            let (overflowed, networks_dropped) = counts.take().unwrap_or_default();
            let requests = part.rows.iter().fold(0u64, |n, r| n.saturating_add(r.requests));
            let batch = AggregateBatch {
                batch_id: batch_id(),
                rows: part.rows,
                networks: part.networks,
                dropped: 0,
                overflowed,
                networks_dropped,
            };
            self.pending.push_back(Pending { batch, requests, attempted: false });
        }
        while self.pending.len() > self.settings.max_pending_batches {
            if let Some(oldest) = self.pending.pop_front() {
                tracing::warn!(
                    target: "keygate::usage",
                    requests = oldest.requests,
                    pending = self.settings.max_pending_batches,
                    "usage batch given up: too many batches waiting to be delivered"
                );
                self.give_up(oldest);
            }
        }
        self.publish_pending();
    }

    /// Sends pending batches, oldest first, until one fails for a reason that may pass
    /// (it stays first in line, unchanged, and is tried again after a backoff).
    async fn send(&mut self) -> Result<(), FlushError> {
        while let Some(front) = self.pending.front_mut() {
            if !front.attempted {
                front.batch.dropped = front.batch.dropped.saturating_add(std::mem::take(&mut self.carry));
                front.attempted = true;
            }
            match self.export_front().await {
                Ok(()) => {
                    let done = self.pending.pop_front().expect("the batch just sent");
                    self.shared.exported.fetch_add(done.requests, Ordering::Relaxed);
                    self.shared.batches_exported.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(metric::REQUESTS_EXPORTED).increment(done.requests);
                    metrics::counter!(metric::BATCHES_EXPORTED).increment(1);
                    self.failures = 0;
                    self.retry_at = None;
                }
                Err(error) if error.is_permanent() => {
                    self.count_failure();
                    let failed = self.pending.pop_front().expect("the batch just sent");
                    tracing::error!(
                        target: "keygate::usage",
                        %error,
                        requests = failed.requests,
                        batch_id = %failed.batch.batch_id,
                        "usage batch refused; sending it again would not help, so it is given up"
                    );
                    self.give_up(failed);
                }
                Err(error) => {
                    self.count_failure();
                    let wait = backoff(self.failures, self.settings.flush_interval);
                    self.failures = self.failures.saturating_add(1);
                    self.retry_at = Some(Instant::now() + wait);
                    tracing::warn!(
                        target: "keygate::usage",
                        %error,
                        pending = self.pending.len(),
                        retry_in_ms = wait.as_millis() as u64,
                        "usage batch not delivered; it stays pending"
                    );
                    self.publish_pending();
                    return Err(self.pending_error());
                }
            }
        }
        self.publish_pending();
        Ok(())
    }

    /// Exports the first pending batch: for at most one flush interval (so that an
    /// exporter that hangs delays the next cut by one interval at most), and once shutdown
    /// has begun, only until its deadline.
    async fn export_front(&mut self) -> Result<(), ExportError> {
        let Some(front) = self.pending.front() else { return Ok(()) };
        let export = self.exporter.export(&front.batch);
        tokio::pin!(export);
        let give_up = tokio::time::sleep(self.settings.flush_interval);
        let deadline = tokio::select! {
            biased;
            result = &mut export => return result,
            deadline = self.shutdown.deadline(self.deadline) => deadline,
            () = give_up, if self.deadline.is_none() => return Err(ExportError::Timeout),
        };
        self.deadline = Some(deadline);
        tokio::time::timeout_at(deadline, export).await.unwrap_or(Err(ExportError::Timeout))
    }

    /// The last cut, and delivery of everything pending until the deadline; what is
    /// still pending then is lost.
    async fn finish(&mut self) {
        let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + self.settings.shutdown_deadline);
        self.cut();
        while !self.pending.is_empty() {
            if self.send().await.is_ok() || Instant::now() >= deadline {
                break;
            }
            let wait = self.retry_at.unwrap_or(deadline).min(deadline);
            tokio::time::sleep_until(wait).await;
        }
        let left: u64 = self.pending.drain(..).map(|p| p.requests).sum();
        if left > 0 {
            tracing::warn!(target: "keygate::usage", requests = left, "usage not delivered by the shutdown deadline");
        }
        self.shared.lose(left);
        self.publish_pending();
    }

    fn give_up(&mut self, batch: Pending) {
        self.shared.lose(batch.requests);
        // Its own drop count was never delivered either.
        self.carry = self.carry.saturating_add(batch.requests).saturating_add(batch.batch.dropped);
        self.publish_pending();
    }

    fn count_failure(&self) {
        self.shared.export_failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric::AGGREGATE_EXPORT_FAILURES).increment(1);
    }

    fn pending_error(&self) -> FlushError {
        FlushError::Pending {
            batches: self.pending.len() as u64,
            requests: self.pending.iter().map(|p| p.requests).sum(),
        }
    }

    /// Mirrors the pending queue into the shared counters; the handle reads them if it
    /// has to abort this task.
    fn publish_pending(&self) {
        let requests: u64 = self.pending.iter().map(|p| p.requests).sum();
        self.shared.pending_batches.store(self.pending.len(), Ordering::Relaxed);
        self.shared.pending_requests.store(requests, Ordering::Relaxed);
        metrics::gauge!(metric::BATCHES_PENDING).set(self.pending.len() as f64);
    }
}

/// A fresh batch id: 128 random bits as 32 lowercase hex digits.
fn batch_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // Without the OS generator, still unique enough for a deduplication window: the
        // process's hash seed, the time and a counter, hashed twice.
        use std::hash::BuildHasher;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let state = std::collections::hash_map::RandomState::new();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        bytes[..8].copy_from_slice(&state.hash_one((n, now, 0u8)).to_le_bytes());
        bytes[8..].copy_from_slice(&state.hash_one((n, now, 1u8)).to_le_bytes());
    }
    let mut id = String::with_capacity(32);
    for b in bytes {
        let _ = write!(id, "{b:02x}");
    }
    id
}

/// `min(flush interval, 1 s × 2^failures)`, drawn between half of that and all of it so
/// middlewares that failed together do not retry together.
fn backoff(failures: u32, max: Duration) -> Duration {
    let cap = INITIAL_BACKOFF.saturating_mul(1u32 << failures.min(20)).min(max);
    let half = cap / 2;
    let spread = u64::try_from((cap - half).as_micros()).unwrap_or(u64::MAX);
    half + Duration::from_micros(getrandom::u64().unwrap_or(0) % spread.saturating_add(1))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_ids_are_32_lowercase_hex_digits_and_differ() {
        let (a, b) = (batch_id(), batch_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn backoff_doubles_up_to_the_interval() {
        let max = Duration::from_secs(10);
        for failures in 0..40 {
            let cap = INITIAL_BACKOFF.saturating_mul(1 << failures.min(20)).min(max);
            let wait = backoff(failures, max);
            assert!(wait >= cap / 2 && wait <= cap, "{failures}: {wait:?}");
        }
    }
}
