//! The credit reconciler (features `server` and `redis`): copies the fleet-wide counts
//! of credits that a Redis engine keeps (`RedisLimits` in the middlewares) back into
//! the store, so that the admin API shows what is left and a count lost from Redis
//! restarts from close to where it was.
//!
//! Every interval ([`DEFAULT_CREDITS_RECONCILE_INTERVAL`], 30 s, by default) it pages
//! through the unrevoked keys and the owners that have credits, [`PAGE`] at a time,
//! reads each one's `rem` and `rev` from its credits hash in one pipelined round trip
//! per page, and where `rev` is the store's current `credits_revision` and `rem`
//! differs from the stored `remaining`, writes `rem` as `remaining` (and the time as
//! `credits_reconciled_at`) while the revision still holds: an operator's set in
//! between wins. Where `rev` differs, the count in Redis started from an older set and
//! is left to the engine, which restarts from the newer credits. A pass's writes are
//! neither audited (one a key every 30 s would drown the log) nor published; they are
//! counted (`keygate_server_credits_reconciled_total`).
//!
//! One replica reconciling is enough; several are harmless (each write is conditional
//! and writes the same count). Redis unreachable: a warning when it stops answering,
//! one when it answers again, and the next interval tries again; the key service serves
//! on.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Default time between reconciliation passes.
pub const DEFAULT_CREDITS_RECONCILE_INTERVAL: Duration = Duration::from_secs(30);

/// Most holders a pass reads from the store, and from Redis, at once.
#[cfg(feature = "redis")]
pub(crate) const PAGE: u32 = 500;

/// Counters of the reconciler.
#[derive(Debug, Default)]
pub(crate) struct ReconcileCounters {
    pub(crate) passes: AtomicU64,
    pub(crate) keys: AtomicU64,
    pub(crate) owners: AtomicU64,
    pub(crate) redis_errors: AtomicU64,
    pub(crate) store_errors: AtomicU64,
}

#[cfg(feature = "redis")]
pub(crate) use task::{ReconcileConfig, ReconcileTask};

#[cfg(feature = "redis")]
mod task {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use redis::aio::{ConnectionManager, ConnectionManagerConfig};
    use tokio::task::JoinHandle;

    use super::{PAGE, ReconcileCounters};
    use crate::meter::redis::schema::{self, Holder};
    use crate::quota::{Credits, MAX_QUOTA_AMOUNT};
    use crate::server::store::credits::Reconciled;
    use crate::server::store::{Store, StoreError, now_ms};

    /// Most pages of one holder kind a pass reads: 100 000 pages of 500, far beyond
    /// any store this serves, so that a pass always ends.
    const MAX_PAGES: usize = 100_000;
    /// How long connecting to Redis and each of its answers may take.
    const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

    /// Where the counts are and how often to read them.
    #[derive(Clone)]
    pub(crate) struct ReconcileConfig {
        /// Parsed at configuration: a bad URL fails `build`, not every pass.
        pub(crate) client: redis::Client,
        pub(crate) prefix: String,
        pub(crate) interval: Duration,
    }

    // The URL may hold a password: never shown.
    impl std::fmt::Debug for ReconcileConfig {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ReconcileConfig")
                .field("prefix", &self.prefix)
                .field("interval", &self.interval)
                .finish_non_exhaustive()
        }
    }

    /// What stopped a pass.
    enum PassError {
        Redis(redis::RedisError),
        Store(StoreError),
    }

    /// The background passes; stop when dropped.
    pub(crate) struct ReconcileTask(JoinHandle<()>);

    impl Drop for ReconcileTask {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    impl ReconcileTask {
        pub(crate) fn spawn(store: Store, config: ReconcileConfig, counters: Arc<ReconcileCounters>) -> Self {
            Self(tokio::spawn(async move {
                let mut tick = tokio::time::interval(config.interval.max(Duration::from_millis(10)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut redis: Option<ConnectionManager> = None;
                // Logged on changes only: an unreachable Redis is one warning, not one a pass.
                let mut redis_up: Option<bool> = None;
                loop {
                    tick.tick().await;
                    match pass(&store, &config, &mut redis, &counters).await {
                        Ok(()) => {
                            if redis_up == Some(false) {
                                tracing::info!("Redis answers again: reconciling credits");
                            }
                            redis_up = Some(true);
                        }
                        Err(PassError::Redis(e)) => {
                            counters.redis_errors.fetch_add(1, Ordering::Relaxed);
                            // A fresh connection next time rather than a manager's backoff.
                            redis = None;
                            if redis_up != Some(false) {
                                tracing::warn!(
                                    error = %e,
                                    "Redis does not answer: credits are not reconciled into the store until it does \
                                     (tried again every interval)"
                                );
                            }
                            redis_up = Some(false);
                        }
                        Err(PassError::Store(e)) => {
                            counters.store_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "credit reconciliation failed on the store; the next pass tries again");
                        }
                    }
                    counters.passes.fetch_add(1, Ordering::Relaxed);
                }
            }))
        }
    }

    async fn connect(client: &redis::Client) -> Result<ConnectionManager, redis::RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        ConnectionManager::new_with_config(client.clone(), config).await
    }

    /// One pass over keys, then owners.
    async fn pass(
        store: &Store,
        config: &ReconcileConfig,
        redis: &mut Option<ConnectionManager>,
        counters: &ReconcileCounters,
    ) -> Result<(), PassError> {
        let conn = match redis {
            Some(c) => c,
            None => redis.insert(connect(&config.client).await.map_err(PassError::Redis)?),
        };
        for holder in [Holder::Key, Holder::Owner] {
            let mut after = String::new();
            for _ in 0..MAX_PAGES {
                let page = store.credits_page(holder, &after, PAGE).await.map_err(PassError::Store)?;
                let Some(last) = page.last() else { break };
                let mut pipe = redis::pipe();
                for row in &page {
                    pipe.cmd("HMGET")
                        .arg(schema::credits_key(&config.prefix, holder, &row.id))
                        .arg(schema::REMAINING)
                        .arg(schema::REVISION);
                }
                let counts: Vec<(Option<String>, Option<String>)> =
                    pipe.query_async(conn).await.map_err(PassError::Redis)?;
                let changed: Vec<Reconciled> = page
                    .iter()
                    .zip(counts)
                    .filter_map(|(row, (rem, rev))| {
                        if rev? != row.revision.to_string() {
                            return None;
                        }
                        let remaining = remaining_of(&rem?)?;
                        (remaining != row.credits.remaining).then(|| Reconciled {
                            id: row.id.clone(),
                            revision: row.revision,
                            credits: Credits { remaining, refill: row.credits.refill },
                        })
                    })
                    .collect();
                if !changed.is_empty() {
                    let written =
                        store.reconcile_credits(holder, &changed, now_ms()).await.map_err(PassError::Store)?;
                    let counter = match holder {
                        Holder::Key => &counters.keys,
                        Holder::Owner => &counters.owners,
                    };
                    counter.fetch_add(written, Ordering::Relaxed);
                }
                if page.len() < PAGE as usize {
                    break;
                }
                after.clone_from(&last.id);
            }
        }
        Ok(())
    }

    /// `rem` as credits: an integer, below zero (leases overdrawn) as none left, and
    /// never more than credits may be. Anything else is not a count and is left alone.
    fn remaining_of(rem: &str) -> Option<u64> {
        let n: i64 = rem.trim().parse().ok()?;
        Some((n.max(0) as u64).min(MAX_QUOTA_AMOUNT))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn counts_read_back_as_credits() {
            assert_eq!(super::remaining_of("42"), Some(42));
            assert_eq!(super::remaining_of("-3"), Some(0));
            assert_eq!(super::remaining_of("x"), None);
            assert_eq!(super::remaining_of("99999999999999999"), Some(crate::quota::MAX_QUOTA_AMOUNT));
        }
    }
}
