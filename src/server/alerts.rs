//! Anomaly alerts on ingested usage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;

use super::model::{Alert, AlertKind};
use super::store::{NetworkSeen, Store, StoreError};
use super::usage::Folded;

/// Alert thresholds. Defaults: baseline 10 minutes; denials > max(20, 5 × baseline);
/// requests > max(1 000, 10 × baseline); new networks on; minutes up to 1 hour old;
/// expiring keys 7 days ahead, swept every minute.
///
/// After each usage batch is stored, every `(key, minute)` it touched is compared with
/// the key's own baseline: the mean per minute over the [`AlertConfig::baseline_minutes`]
/// minutes before it (minutes without traffic count as zero).
///
/// - `denial_spike`: denials in the minute > max([`denial_min`](AlertConfig::denial_min),
///   [`denial_factor`](AlertConfig::denial_factor) × baseline denials).
/// - `rate_spike`: requests in the minute > max([`rate_min`](AlertConfig::rate_min),
///   [`rate_factor`](AlertConfig::rate_factor) × baseline requests).
/// - `new_network`: the key is seen from a client network (/24 IPv4, /48 IPv6) it has not
///   used before. The first network a key is ever seen from raises nothing.
///
/// - `key_expiring`: the key's `expires_at` is less than
///   [`expiring_within`](AlertConfig::expiring_within) away; raised by a sweep of the
///   keys every [`sweep_interval`](AlertConfig::sweep_interval), once per key and expiry
///   time (its `minute` is the expiry's).
/// - `key_max_age`: see [`RotationPolicy`](super::RotationPolicy).
///
/// At most one alert per key, kind and minute is stored (the store enforces it), each
/// also published as an SSE `alert` event and queued as a webhook event (`alert.<kind>`,
/// `key.expiring` for `key_expiring`). Minutes older than
/// [`max_age`](AlertConfig::max_age) (replayed usage) are not evaluated.
#[derive(Debug, Clone)]
pub struct AlertConfig {
    /// Evaluate anything at all (default true).
    pub enabled: bool,
    /// Minutes before the current one that form the baseline (default 10).
    pub baseline_minutes: u32,
    /// Denials in a minute never alert at or below this (default 20).
    pub denial_min: u64,
    /// How many times the baseline denials a minute must exceed (default 5.0).
    pub denial_factor: f64,
    /// Requests in a minute never alert at or below this (default 1 000).
    pub rate_min: u64,
    /// How many times the baseline requests a minute must exceed (default 10.0).
    pub rate_factor: f64,
    /// Alert on a client network a key has not used before (default true).
    pub new_network: bool,
    /// Minutes older than this are stored but not evaluated (default 1 hour).
    pub max_age: Duration,
    /// Most `(key, minute)` pairs evaluated per batch; the rest are skipped with a
    /// warning (default 1 000).
    pub max_evaluations: usize,
    /// Raise `key_expiring` (webhook `key.expiring`) this long before a key's
    /// `expires_at`, once per key and expiry time (default 7 days; zero: never).
    pub expiring_within: Duration,
    /// How often the keys are swept for expiring ones and for the rotation policy
    /// (default 1 minute).
    pub sweep_interval: Duration,
}

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            baseline_minutes: 10,
            denial_min: 20,
            denial_factor: 5.0,
            rate_min: 1000,
            rate_factor: 10.0,
            new_network: true,
            max_age: Duration::from_secs(3600),
            max_evaluations: 1000,
            expiring_within: Duration::from_secs(7 * 86_400),
            sweep_interval: Duration::from_secs(60),
        }
    }
}

impl AlertConfig {
    /// Evaluates a stored batch; counts the alerts raised in `raised`.
    pub(crate) async fn evaluate(&self, store: &Store, folded: &Folded, raised: &AtomicU64) -> Result<(), StoreError> {
        Evaluation { cfg: self, store, raised }.run(folded).await
    }
}

struct Evaluation<'a> {
    cfg: &'a AlertConfig,
    store: &'a Store,
    raised: &'a AtomicU64,
}

impl Evaluation<'_> {
    async fn run(&self, folded: &Folded) -> Result<(), StoreError> {
        let cfg = self.cfg;
        if !cfg.enabled {
            return Ok(());
        }
        let now = OffsetDateTime::now_utc();
        let oldest = (now - cfg.max_age).unix_timestamp();
        let touched = folded.touched();
        if touched.len() > cfg.max_evaluations {
            tracing::warn!(pairs = touched.len(), max = cfg.max_evaluations, "usage batch too wide; not all evaluated");
        }
        for (key_id, minute) in touched.into_iter().filter(|(_, m)| *m >= oldest).take(cfg.max_evaluations) {
            self.spikes(&key_id, minute, now).await?;
        }
        if cfg.new_network {
            for (key_id, network, at) in &folded.networks {
                if self.store.note_network(key_id, network, *at).await? == NetworkSeen::New {
                    let minute = minute_start(*at);
                    let alert = Alert {
                        id: None,
                        acknowledged_at: None,
                        at: now,
                        key_id: key_id.clone(),
                        kind: AlertKind::NewNetwork,
                        minute,
                        observed: 1,
                        baseline: 0.0,
                        threshold: 0.0,
                        detail: format!("first use from {network}"),
                    };
                    self.raise(alert).await?;
                }
            }
        }
        Ok(())
    }

    async fn spikes(&self, key_id: &str, minute: i64, now: OffsetDateTime) -> Result<(), StoreError> {
        let cfg = self.cfg;
        let window = i64::from(cfg.baseline_minutes.max(1));
        let since = OffsetDateTime::from_unix_timestamp(minute - window * 60).unwrap_or(now);
        let buckets = self.store.usage(key_id, since, cfg.baseline_minutes + 1).await?;
        let (mut cur_req, mut cur_den, mut base_req, mut base_den) = (0u64, 0u64, 0u64, 0u64);
        for b in &buckets {
            match b.start.unix_timestamp() {
                m if m == minute => (cur_req, cur_den) = (b.requests, b.denied),
                m if m < minute => (base_req, base_den) = (base_req + b.requests, base_den + b.denied),
                _ => {}
            }
        }
        let checks = [
            (AlertKind::DenialSpike, cur_den, base_den, cfg.denial_min, cfg.denial_factor, "denials"),
            (AlertKind::RateSpike, cur_req, base_req, cfg.rate_min, cfg.rate_factor, "requests"),
        ];
        for (kind, observed, base_sum, min, factor, what) in checks {
            let baseline = base_sum as f64 / window as f64;
            let threshold = (min as f64).max(factor * baseline);
            if observed as f64 > threshold {
                let alert = Alert {
                    id: None,
                    acknowledged_at: None,
                    at: now,
                    key_id: key_id.to_owned(),
                    kind,
                    minute: OffsetDateTime::from_unix_timestamp(minute).unwrap_or(now),
                    observed,
                    baseline,
                    threshold,
                    detail: format!(
                        "{observed} {what} in one minute; baseline {baseline:.1}/min, threshold {threshold:.1}"
                    ),
                };
                self.raise(alert).await?;
            }
        }
        Ok(())
    }

    /// Stores the alert, which publishes it, unless the minute has one of its kind.
    async fn raise(&self, alert: Alert) -> Result<(), StoreError> {
        if self.store.insert_alert(&alert).await? {
            tracing::warn!(key_id = %alert.key_id, kind = alert.kind.as_str(), detail = %alert.detail, "usage alert");
            self.raised.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

pub(crate) fn minute_start(t: OffsetDateTime) -> OffsetDateTime {
    let ts = t.unix_timestamp();
    OffsetDateTime::from_unix_timestamp(ts - ts.rem_euclid(60)).unwrap_or(t)
}
