//! The periodic key sweep: expiring-soon alerts and the rotation policy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;

use super::alerts::{AlertConfig, minute_start};
use super::model::{Alert, AlertKind, KeyInfo};
use super::store::{Store, StoreError, now_ms};
use super::text::{earlier, later, rfc3339};

/// Most keys one sweep reads per kind (expiring, aged); the next sweep takes the rest.
const MAX_SWEEP_KEYS: u32 = 10_000;

/// The audit actor of the changes the rotation policy makes.
pub const POLICY_ACTOR: &str = "policy";

/// A maximum age of keys, per environment and optionally per owner (which wins over
/// the environment). Off by default (no maximum).
///
/// A key's age is that of its current secret: rotation starts it over. A key past its
/// maximum raises a `key_max_age` alert (webhook `alert.key_max_age`) once per secret
/// (the alert's `minute` is the second the secret was made).
/// With [`expire_after`](Self::expire_after), a key still unrotated that long after
/// its maximum is expired: its `expires_at` is set to now in an audited change whose
/// actor is `policy`, published to the middlewares (`updated`) so that their caches
/// drop it, and queued as a `key.expired` webhook; replicas sweeping at once expire it
/// once. Revoked and already expired keys are left alone. The keys are swept every
/// [`AlertConfig::sweep_interval`].
///
/// ```
/// use std::time::Duration;
/// use keygate::server::RotationPolicy;
///
/// let day = Duration::from_secs(86_400);
/// let policy = RotationPolicy::default()
///     .max_age("live", 90 * day)
///     .max_age_for_owner("ci-bots", 30 * day)
///     .expire_after(7 * day);
/// # let _ = policy;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationPolicy {
    /// Maximum age per environment.
    pub by_environment: BTreeMap<String, Duration>,
    /// Maximum age per owner (wins over the environment's).
    pub by_owner: BTreeMap<String, Duration>,
    /// Expire a key this long after it passed its maximum age (default: never).
    pub expire_after: Option<Duration>,
}

impl RotationPolicy {
    /// The maximum age of the keys of `environment`.
    #[must_use]
    pub fn max_age(mut self, environment: impl Into<String>, age: Duration) -> Self {
        self.by_environment.insert(environment.into(), age);
        self
    }

    /// The maximum age of the keys of `owner`, whatever their environment.
    #[must_use]
    pub fn max_age_for_owner(mut self, owner: impl Into<String>, age: Duration) -> Self {
        self.by_owner.insert(owner.into(), age);
        self
    }

    /// Expires keys this long after they passed their maximum age.
    #[must_use]
    pub fn expire_after(mut self, grace: Duration) -> Self {
        self.expire_after = Some(grace);
        self
    }

    /// The maximum age that applies to `key`, if any.
    fn limit_for(&self, key: &KeyInfo) -> Option<Duration> {
        self.by_owner.get(&key.owner).or_else(|| self.by_environment.get(&key.environment)).copied()
    }

    fn shortest(&self) -> Option<Duration> {
        self.by_environment.values().chain(self.by_owner.values()).min().copied()
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.by_environment.values().chain(self.by_owner.values()).any(|d| *d < Duration::from_secs(1)) {
            return Err("a maximum key age must be at least 1 second".into());
        }
        Ok(())
    }
}

/// Counters of the key sweep.
#[derive(Debug, Default)]
pub(crate) struct SweepCounters {
    pub(crate) alerts_raised: AtomicU64,
    pub(crate) expired_by_policy: AtomicU64,
}

/// One sweep: raises the alerts due and expires the keys the policy says to.
pub(crate) async fn sweep(
    store: &Store,
    alerts: &AlertConfig,
    policy: &RotationPolicy,
    counters: &SweepCounters,
) -> Result<(), StoreError> {
    let now = now_ms();
    let raised = &counters.alerts_raised;
    let raise = |alert: Alert| async move {
        if store.insert_alert(&alert).await? {
            tracing::warn!(key_id = %alert.key_id, kind = alert.kind.as_str(), detail = %alert.detail, "key alert");
            raised.fetch_add(1, Ordering::Relaxed);
        }
        Ok::<_, StoreError>(())
    };
    if alerts.enabled && !alerts.expiring_within.is_zero() {
        for key in store.keys_expiring(now, later(now, alerts.expiring_within), MAX_SWEEP_KEYS).await? {
            let Some(expires_at) = key.expires_at else { continue };
            let left = (expires_at - now).whole_seconds().max(0);
            raise(Alert {
                at: now,
                key_id: key.key_id.clone(),
                kind: AlertKind::KeyExpiring,
                minute: minute_start(expires_at),
                observed: left as u64,
                baseline: 0.0,
                threshold: alerts.expiring_within.as_secs_f64(),
                detail: format!("expires at {} (in {})", rfc3339(expires_at).unwrap_or_default(), human(left)),
                id: None,
                acknowledged_at: None,
            })
            .await?;
        }
    }
    let Some(shortest) = policy.shortest() else { return Ok(()) };
    for (key, since) in store.keys_aged(now, earlier(now, shortest), MAX_SWEEP_KEYS).await? {
        let Some(limit) = policy.limit_for(&key) else { continue };
        let age = now - since;
        if age < limit {
            continue;
        }
        raise(Alert {
            at: now,
            key_id: key.key_id.clone(),
            kind: AlertKind::KeyMaxAge,
            // Once per secret: the second it was made (two secrets of a key are made at
            // least the maximum age, at least 1 s, apart before both can alert).
            minute: since.replace_nanosecond(0).unwrap_or(since),
            observed: age.whole_seconds().max(0) as u64,
            baseline: 0.0,
            threshold: limit.as_secs_f64(),
            detail: format!(
                "the current secret is {} old; the policy's maximum for this key is {}",
                human(age.whole_seconds()),
                human(limit.as_secs() as i64)
            ),
            id: None,
            acknowledged_at: None,
        })
        .await?;
        let Some(grace) = policy.expire_after else { continue };
        if age < limit.saturating_add(grace) {
            continue;
        }
        match store.expire_key(&key.key_id, POLICY_ACTOR).await {
            // Expired meanwhile (another replica's sweep): nothing to do.
            Ok(false) => {}
            Ok(true) => {
                counters.expired_by_policy.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key_id = %key.key_id, "key expired by the rotation policy");
            }
            // Revoked since it was read: nothing left to expire.
            Err(StoreError::Conflict(_) | StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `3d 4h`, `5m 2s`: two units at most.
fn human(secs: i64) -> String {
    let secs = secs.max(0);
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut rest = secs;
    for (size, name) in units {
        if rest >= size && parts.len() < 2 {
            parts.push(format!("{}{name}", rest / size));
            rest %= size;
        } else if !parts.is_empty() {
            break;
        }
    }
    if parts.is_empty() { "0s".into() } else { parts.join(" ") }
}

/// The background sweeps; stop when dropped.
#[derive(Debug)]
pub(crate) struct SweepTask(JoinHandle<()>);

impl SweepTask {
    pub(crate) fn spawn(
        store: Store,
        alerts: AlertConfig,
        policy: RotationPolicy,
        counters: Arc<SweepCounters>,
    ) -> Self {
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(alerts.sweep_interval.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = sweep(&store, &alerts, &policy, &counters).await {
                    tracing::warn!(error = %e, "key sweep failed; the next one tries again");
                }
            }
        }))
    }
}

impl Drop for SweepTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_limit_wins_over_the_environment() {
        let day = Duration::from_secs(86_400);
        let policy = RotationPolicy::default().max_age("live", 90 * day).max_age_for_owner("bots", 30 * day);
        let mut key: KeyInfo = serde_json::from_value(serde_json::json!({
            "key_id": "key_x", "owner": "acme", "name": "n", "scopes": [], "roles": [], "environment": "live",
            "expires_at": null, "disabled": false, "revoked": false, "meta": {}, "ratelimit": null,
            "created_at": "2026-01-01T00:00:00Z", "last_used_at": null, "key_prefix": "kg_x"
        }))
        .unwrap();
        assert_eq!(policy.limit_for(&key), Some(90 * day));
        key.owner = "bots".into();
        assert_eq!(policy.limit_for(&key), Some(30 * day));
        key.owner = "acme".into();
        key.environment = "test".into();
        assert_eq!(policy.limit_for(&key), None);
        assert_eq!(policy.shortest(), Some(30 * day));
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(0), "0s");
        assert_eq!(human(59), "59s");
        assert_eq!(human(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
        assert_eq!(human(3 * 86_400 + 5), "3d");
    }
}
