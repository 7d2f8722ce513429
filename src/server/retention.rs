//! Retention of usage, run by the key service itself in the background.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::task::JoinHandle;

use super::store::{
    ChangeLogCutoff, DEFAULT_CHANGE_LOG_MAX_ROWS, DEFAULT_CHANGE_LOG_RETENTION, RetentionCutoffs, RetentionReport,
    Store, StoreError,
};
use super::usage::USAGE_BATCH_ID_RETENTION;

/// Transactions of each kind one pass runs at most; the next pass goes on.
const MAX_TRANSACTIONS_PER_PASS: u32 = 100;

/// How long usage is kept, and how the key service prunes it.
///
/// | setting | default |
/// | --- | --- |
/// | [`enabled`](Self::enabled) | `true` |
/// | [`interval`](Self::interval) | 5 minutes |
/// | [`minutes`](Self::minutes) | 7 days |
/// | [`hours`](Self::hours) | 90 days |
/// | [`rows_per_transaction`](Self::rows_per_transaction) | 5 000 |
/// | [`change_log`](Self::change_log) | 24 hours |
/// | [`change_log_rows`](Self::change_log_rows) | 100 000 |
///
/// Every `interval`, a pass
/// 1. rolls up minute rows older than `minutes` into per-key hour rows and deletes them,
///    each batch of rows in the transaction that adds them to their hours (a replica
///    running the pass at the same time takes other rows: no minute counts twice);
/// 2. deletes hour rows (per key, and per key and route) older than `hours`;
/// 3. forgets applied batch ids after 25 hours
///    ([`USAGE_BATCH_ID_RETENTION`](super::USAGE_BATCH_ID_RETENTION));
/// 4. deletes change log rows (what a resuming event stream replays, see
///    [`EventHub`](super::EventHub)) older than `change_log` or beyond the newest
///    `change_log_rows`, but never the newest one. A row costs about 100 bytes: the
///    default bound holds about 10 MB. A stream resuming from an id deleted since gets
///    `reset` (`expired`).
///
/// Each step runs transactions of at most `rows_per_transaction` rows, at most 100 of
/// them per pass, so a pass never holds a lock for long; what is left waits for the
/// next pass. Queries grouped by hour or day read hour rows and the minute rows not
/// rolled up yet together, so their totals do not change when a roll-up runs.
///
/// # Storage
///
/// A row holds eleven integers, its key (and route) and the histogram's sparse JSON:
/// about 60 bytes plus 8 per latency bucket in use. Measured for one key busy every
/// minute of a day over 3 routes, 40 requests a minute with latencies spread over 40 ms
/// (about 30 buckets per minute row, 13 per route row), indexes included:
///
/// | rows | per key and day | SQLite | PostgreSQL | kept (default) | held per key |
/// | --- | --- | --- | --- | --- | --- |
/// | minute | 1 440 | 380 B each, 0.55 MB | 600 B each, 0.85 MB | 7 days | 3.8 MB / 6 MB |
/// | hour (rolled up) | 24 | 380 B each, 9 KB | 600 B each, 14 KB | 90 days | 0.8 MB / 1.3 MB |
/// | route | 24 × 3 | 550 B each, 40 KB | 780 B each, 56 KB | 90 days | 3.6 MB / 5 MB |
///
/// A key used in fewer minutes or over fewer routes costs proportionally less; nothing
/// is stored for a minute without traffic. PostgreSQL also keeps the dead versions that
/// updates leave until autovacuum reclaims them. Batch ids cost about 100 bytes each, one
/// per middleware and flush (8 640 a day at the 10 s default), kept 25 hours.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// Run passes in the background at all (default `true`).
    pub enabled: bool,
    /// Time between passes (default 5 minutes; at least 1 second).
    pub interval: Duration,
    /// Minute rows older than this are rolled up into hour rows (default 7 days; at least
    /// 1 minute).
    pub minutes: Duration,
    /// Hour rows older than this are deleted (default 90 days; at least `minutes`).
    pub hours: Duration,
    /// Rows one transaction rolls up or deletes at most (default 5 000; 1 to 100 000).
    pub rows_per_transaction: u32,
    /// Change log rows older than this are deleted (default 24 hours; at least 1 second).
    pub change_log: Duration,
    /// Most change log rows kept (default 100 000; at least 1).
    pub change_log_rows: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(300),
            minutes: Duration::from_secs(7 * 86_400),
            hours: Duration::from_secs(90 * 86_400),
            rows_per_transaction: 5000,
            change_log: DEFAULT_CHANGE_LOG_RETENTION,
            change_log_rows: DEFAULT_CHANGE_LOG_MAX_ROWS,
        }
    }
}

impl RetentionConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.interval < Duration::from_secs(1) {
            return Err("the retention interval must be at least 1 second".into());
        }
        if self.minutes < Duration::from_secs(60) {
            return Err("minute rows must be kept at least 1 minute".into());
        }
        if self.hours < self.minutes {
            return Err("hour rows must be kept at least as long as minute rows".into());
        }
        if self.hours > Duration::from_secs(100 * 365 * 86_400) {
            return Err("hour rows can be kept at most 100 years".into());
        }
        if !(1..=100_000).contains(&self.rows_per_transaction) {
            return Err("rows per retention transaction must be 1 to 100 000".into());
        }
        if self.change_log < Duration::from_secs(1) || self.change_log > Duration::from_secs(100 * 365 * 86_400) {
            return Err("the change log must be kept 1 second to 100 years".into());
        }
        if self.change_log_rows == 0 {
            return Err("the change log must keep at least 1 row".into());
        }
        Ok(())
    }

    fn cutoffs(&self, now: OffsetDateTime) -> RetentionCutoffs {
        let before = |d: Duration| now.unix_timestamp().saturating_sub(d.as_secs() as i64);
        RetentionCutoffs {
            minutes_before: before(self.minutes),
            hours_before: before(self.hours),
            batches_before_ms: before(USAGE_BATCH_ID_RETENTION).saturating_mul(1000),
            rows_per_transaction: self.rows_per_transaction,
            max_transactions: MAX_TRANSACTIONS_PER_PASS,
            change_log: Some(ChangeLogCutoff {
                before_ms: (now.unix_timestamp_nanos() / 1_000_000) as i64
                    - i64::try_from(self.change_log.as_millis()).unwrap_or(i64::MAX),
                max_rows: self.change_log_rows,
            }),
        }
    }
}

/// What the passes did, for [`ServerStats`](super::ServerStats).
#[derive(Debug, Default)]
pub(crate) struct RetentionCounters {
    pub(crate) passes: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) minutes_rolled_up: AtomicU64,
    pub(crate) hours_deleted: AtomicU64,
    pub(crate) batch_ids_deleted: AtomicU64,
}

/// One pass now.
pub(crate) async fn run_pass(
    store: &Store,
    config: &RetentionConfig,
    counters: &RetentionCounters,
) -> Result<RetentionReport, StoreError> {
    let result = store.retention_pass(&config.cutoffs(OffsetDateTime::now_utc())).await;
    match &result {
        Ok(r) => {
            counters.passes.fetch_add(1, Ordering::Relaxed);
            counters.minutes_rolled_up.fetch_add(r.minutes_rolled_up, Ordering::Relaxed);
            counters.hours_deleted.fetch_add(r.hours_deleted, Ordering::Relaxed);
            counters.batch_ids_deleted.fetch_add(r.batch_ids_deleted, Ordering::Relaxed);
            if *r != RetentionReport::default() {
                tracing::info!(
                    minutes_rolled_up = r.minutes_rolled_up,
                    hours_deleted = r.hours_deleted,
                    batch_ids_deleted = r.batch_ids_deleted,
                    changes_deleted = r.changes_deleted,
                    "usage retention pass"
                );
            }
        }
        Err(e) => {
            counters.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "usage retention pass failed; the next one tries again");
        }
    }
    result
}

/// The background passes; they stop when this is dropped.
#[derive(Debug)]
pub(crate) struct RetentionTask(JoinHandle<()>);

impl RetentionTask {
    /// Starts passes every `config.interval`, the first one after one interval.
    pub(crate) fn spawn(store: Store, config: RetentionConfig, counters: Arc<RetentionCounters>) -> Self {
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(config.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let _ = run_pass(&store, &config, &counters).await;
            }
        }))
    }
}

impl Drop for RetentionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}
