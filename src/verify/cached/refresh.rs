//! Verdicts refreshed off the request path, in batches by digest
//! ([`Verifier::verify_digests`]): a hot valid verdict before it goes stale
//! (refresh-ahead), and everything held after a `reset` (revalidation, at a bounded
//! rate).
//!
//! One task per cache does the work, and only while there is some: it is started by the
//! first digest queued and ends when both queues are empty. Batches go one at a time, so
//! a cache never has more than one batch call in flight.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{Core, Shared, lock};
use crate::key::KeyDigest;
use crate::verify::{Verdict, Verifier, VerifyError};

/// How long the worker waits before taking a batch, so that one call carries the
/// digests that come due together instead of one call each.
const LINGER: Duration = Duration::from_millis(20);
/// Pause before a revalidation batch is tried again after it failed (or while the
/// circuit is open).
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Most digests waiting for a refresh-ahead. Past it a hot verdict is refreshed the old
/// way: by the first request that finds it stale.
pub(super) const MAX_PENDING: usize = 10_000;

/// The limits of background refresh; see the builder methods that set them.
#[derive(Debug, Clone, Copy)]
pub(super) struct RefreshConfig {
    pub(super) ahead: Duration,
    pub(super) batch: usize,
    pub(super) revalidation_rate: u32,
    pub(super) serve_during_revalidation: Duration,
}

/// What one cache knows about its background refresh.
pub(super) struct Refresh {
    pub(super) config: RefreshConfig,
    /// The wrapped verifier verifies by digest: without it nothing here runs, and a
    /// reset drops the cache instead. Cleared when the key service turns out not to
    /// have the batch call (an older one).
    capable: AtomicBool,
    /// Bumped by every reset: a verdict stored in an older one is unconfirmed.
    generation: AtomicU64,
    /// Milliseconds after `origin` until which unconfirmed verdicts are still served.
    serve_old_until_ms: AtomicU64,
    origin: Instant,
    queues: Mutex<Queues>,
}

#[derive(Default)]
struct Queues {
    ahead: Vec<KeyDigest>,
    revalidate: VecDeque<KeyDigest>,
    running: bool,
}

enum Work {
    Ahead(Vec<KeyDigest>),
    Revalidate(Vec<KeyDigest>),
}

impl Refresh {
    pub(super) fn new(config: RefreshConfig, capable: bool) -> Self {
        Self {
            config,
            capable: AtomicBool::new(capable),
            generation: AtomicU64::new(0),
            serve_old_until_ms: AtomicU64::new(0),
            origin: Instant::now(),
            queues: Mutex::new(Queues::default()),
        }
    }

    pub(super) fn capable(&self) -> bool {
        self.capable.load(Ordering::Relaxed)
    }

    /// The reset generation new verdicts are stored in.
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a verdict stored before the last reset may still be served at `now`.
    pub(super) fn serving_old(&self, now: Instant) -> bool {
        let at = u64::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX);
        at < self.serve_old_until_ms.load(Ordering::Acquire)
    }

    /// When a verdict stored at `now`, fresh for `fresh`, comes due for a refresh: `ahead`
    /// before it goes stale, but never in the first half of its fresh time (a short TTL
    /// must not turn every hit into a refresh).
    pub(super) fn due_at(&self, now: Instant, fresh: Duration) -> Instant {
        if !self.capable() || self.config.ahead.is_zero() {
            return now + fresh;
        }
        now + fresh.saturating_sub(self.config.ahead).max(fresh / 2)
    }

    fn claim_worker(&self) -> bool {
        !std::mem::replace(&mut lock(&self.queues).running, true)
    }

    fn release_worker(&self) {
        lock(&self.queues).running = false;
    }

    /// The next batch, or `None` (the worker then stops: `running` is cleared under the
    /// same lock a new digest is queued under, so none is left behind).
    fn next(&self, core: &Core) -> Option<Work> {
        let mut queues = lock(&self.queues);
        if !queues.ahead.is_empty() {
            let n = queues.ahead.len().min(self.config.batch);
            return Some(Work::Ahead(queues.ahead.drain(..n).collect()));
        }
        let generation = self.generation();
        let mut batch = Vec::new();
        while batch.len() < self.config.batch {
            let Some(digest) = queues.revalidate.pop_front() else { break };
            // Confirmed meanwhile (by a request that missed, or a refresh), or gone.
            if core.positive.get(&digest).is_some_and(|entry| entry.generation != generation) {
                batch.push(digest);
            }
        }
        if batch.is_empty() {
            queues.running = false;
            return None;
        }
        Some(Work::Revalidate(batch))
    }
}

impl<V: Verifier> Shared<V> {
    /// Queues a hot verdict for a refresh ahead of its TTL (its entry is marked queued).
    pub(super) fn refresh_ahead(self: &Arc<Self>, digest: KeyDigest) {
        let refresh = &self.core.refresh;
        if !refresh.capable() {
            return;
        }
        {
            let mut queues = lock(&refresh.queues);
            if queues.ahead.len() >= MAX_PENDING {
                drop(queues);
                self.core.unmark_queued(&[digest]);
                return;
            }
            queues.ahead.push(digest);
        }
        self.start_worker();
    }

    /// After a `reset`: every verdict held is unconfirmed. Unless the serve window is
    /// open, none is served again until the wrapped verifier confirms it, in a background
    /// batch or on the request path; the background batches go at the revalidation rate.
    /// A verifier that cannot verify by digest gets the cache dropped instead.
    pub(crate) fn revalidate_all(self: &Arc<Self>) {
        let core = &self.core;
        let refresh = &core.refresh;
        if !refresh.capable() {
            core.invalidate_all();
            return;
        }
        // In-flight answers were computed before the reset: not to be cached.
        core.epoch.fetch_add(1, Ordering::SeqCst);
        core.counters.invalidations.add();
        let until = Instant::now() + refresh.config.serve_during_revalidation;
        let until_ms = u64::try_from(until.saturating_duration_since(refresh.origin).as_millis()).unwrap_or(u64::MAX);
        refresh.serve_old_until_ms.store(until_ms, Ordering::Release);
        refresh.generation.fetch_add(1, Ordering::AcqRel);
        // Per-thread copies know nothing of generations: none taken before is served.
        core.retire_copies();
        // Refusals are cheap to ask again and a missed re-enable must not linger.
        core.negative.invalidate_all();
        let digests: VecDeque<KeyDigest> = core.positive.iter().map(|(digest, _)| *digest).collect();
        tracing::info!(entries = digests.len(), "cache: revalidating every verdict held");
        lock(&refresh.queues).revalidate = digests;
        self.start_worker();
    }

    fn start_worker(self: &Arc<Self>) {
        let refresh = &self.core.refresh;
        if !refresh.claim_worker() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime here: the next queueing on one starts the worker. What is
            // queued waits; what is due meanwhile refreshes on the request path.
            refresh.release_worker();
            return;
        };
        // Weak between batches: a cache dropped by its users goes, and with it the
        // event-stream listener that watches for that, even while batches still fail.
        let guard = WorkerGuard(Arc::downgrade(self));
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(LINGER).await;
                let Some(shared) = guard.0.upgrade() else { break };
                let Some(work) = shared.core.refresh.next(&shared.core) else {
                    // `next` cleared the flag: a new worker may already own it.
                    std::mem::forget(guard);
                    return;
                };
                let pause = match work {
                    Work::Ahead(digests) => shared.refresh_batch(digests, false).await,
                    Work::Revalidate(digests) => {
                        let rate = f64::from(shared.core.refresh.config.revalidation_rate.max(1));
                        let pace = Duration::from_secs_f64(digests.len() as f64 / rate);
                        shared.refresh_batch(digests, true).await.max(pace)
                    }
                };
                drop(shared);
                tokio::time::sleep(pause).await;
            }
        });
    }

    /// One batch; how long to wait before the next.
    async fn refresh_batch(&self, digests: Vec<KeyDigest>, revalidating: bool) -> Duration {
        let core = &self.core;
        let retry_later = |digests: Vec<KeyDigest>| {
            if revalidating {
                let mut queues = lock(&core.refresh.queues);
                for digest in digests.into_iter().rev() {
                    queues.revalidate.push_front(digest);
                }
                RETRY_PAUSE
            } else {
                // Queued again by the next hit, or refreshed by the first stale lookup.
                core.unmark_queued(&digests);
                Duration::ZERO
            }
        };
        if core.circuit.is_open() {
            return retry_later(digests);
        }
        let Some(call) = self.inner.verify_digests(&digests) else { return Duration::ZERO };
        let epoch = core.epoch.load(Ordering::SeqCst);
        core.counters.refresh_batches.add();
        let verdicts = match call.await {
            Ok(verdicts) if verdicts.len() == digests.len() => verdicts,
            Ok(verdicts) => {
                core.circuit.failed(false);
                core.counters.remote_errors.add();
                tracing::warn!(
                    asked = digests.len(),
                    answered = verdicts.len(),
                    "cache: batch refresh answer miscounted"
                );
                return retry_later(digests);
            }
            Err(VerifyError::Status(status @ (404 | 405))) => {
                // A key service from before batch verify: not a failure of the service,
                // and not worth asking again.
                tracing::warn!(status, "cache: the verifier has no batch verify; refreshing on the request path");
                core.refresh.capable.store(false, Ordering::Relaxed);
                // Left marked queued: their next hits must not try again.
                lock(&core.refresh.queues).revalidate.clear();
                return Duration::ZERO;
            }
            Err(err) => {
                core.circuit.failed(false);
                core.counters.remote_errors.add();
                tracing::debug!(error = %err, digests = digests.len(), revalidating, "cache: batch refresh failed");
                return retry_later(digests);
            }
        };
        core.circuit.succeeded();
        for (digest, verdict) in digests.iter().zip(verdicts) {
            match verdict {
                Verdict::Valid(principal) => core.store_valid(*digest, &principal, epoch),
                Verdict::Invalid { reason, key_id } => core.store_invalid(*digest, (reason, key_id), epoch),
            }
        }
        if core.epoch.load(Ordering::SeqCst) != epoch {
            // An invalidation overlapped the call: its answers were not stored (one of
            // them may predate it). Ask again.
            return retry_later(digests);
        }
        let counter = if revalidating { &core.counters.revalidated } else { &core.counters.refreshed_ahead };
        counter.add_n(digests.len() as u64);
        Duration::ZERO
    }
}

/// Lets the next queueing start a worker if this one's task ends otherwise than by
/// finding no work: dropped mid-way (the runtime shutting down), or a panic.
struct WorkerGuard<V: Verifier>(Weak<Shared<V>>);

impl<V: Verifier> Drop for WorkerGuard<V> {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared.core.refresh.release_worker();
        }
    }
}
