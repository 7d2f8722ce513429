//! Rate limits: GCRA (the generic cell rate algorithm), one atomic "theoretical arrival
//! time" per tracked name (a key's limit, an owner's, a client address), so checking a
//! limit is a read lock and a compare-and-swap. A caller may spend `burst` units at
//! once (default `limit`) and then one every `period / limit`.
//!
//! Limits are enforced per process: with N replicas of a service a key can make up to
//! N × `limit` requests per period in total.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::principal::RateLimit;
use crate::quota::{Limit, REQUESTS};

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Where a key stands against its limit once a request was counted (or refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LimitState {
    /// The limit's name in the fields (`None`: `requests`).
    pub(crate) name: Option<Arc<str>>,
    pub(crate) limit: RateLimit,
    /// Requests the key could still make right now.
    pub(crate) remaining: u64,
    /// Until the next request's worth of quota comes back.
    pub(crate) reset: Duration,
}

impl LimitState {
    /// The IETF `RateLimit-Policy` and `RateLimit` fields
    /// (draft-ietf-httpapi-ratelimit-headers, structured-field form):
    /// `"<name>";q=<limit>;w=<period s>` and `"<name>";r=<remaining>;t=<s>`, `t`
    /// rounded up like `Retry-After`. A field already set is left alone.
    pub(crate) fn write_fields(&self, headers: &mut HeaderMap) {
        // Names are `[a-z0-9_-]`: nothing to escape in a structured-field string.
        let name = self.name.as_deref().unwrap_or(REQUESTS);
        if !headers.contains_key(&RATELIMIT_POLICY) {
            let v = format!("\"{name}\";q={};w={}", self.limit.limit, self.limit.period_s.max(1));
            headers.insert(RATELIMIT_POLICY.clone(), HeaderValue::try_from(v).expect("digits and ASCII"));
        }
        if !headers.contains_key(&RATELIMIT) {
            let t = self.reset.as_nanos().div_ceil(1_000_000_000);
            let v = format!("\"{name}\";r={};t={t}", self.remaining);
            headers.insert(RATELIMIT.clone(), HeaderValue::try_from(v).expect("digits and ASCII"));
        }
    }
}

/// Least time between two sweeps of a full limiter: 1 s.
const SWEEP_INTERVAL_NS: u64 = 1_000_000_000;

/// Most keys tracked at once.
pub(crate) const DEFAULT_MAX_TRACKED_KEYS: usize = 100_000;

/// Tracks request rates per key id, or per anything else that names a caller (the
/// cache's miss budget counts per client address).
#[derive(Debug)]
pub(crate) struct RateLimiter<K = Arc<str>> {
    epoch: Instant,
    max_keys: usize,
    keys: RwLock<HashMap<K, Arc<AtomicU64>>>,
    /// Nanoseconds after `epoch` of the last sweep of a full map.
    swept_at: AtomicU64,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_TRACKED_KEYS)
    }
}

/// A limit as GCRA counts it, in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    /// Time one unit of cost takes to come back.
    interval: u64,
    /// How far the arrival time may run ahead of now: `(burst - 1) × interval`.
    tolerance: u64,
}

impl Gcra {
    fn new(limit: u64, period_s: u64, burst: u64) -> Self {
        // Saturating throughout: a key service may send any u64, and an absurd period
        // must mean "very slow", never an overflow.
        let period = period_s.max(1).saturating_mul(1_000_000_000);
        let interval = (period / limit.max(1)).max(1);
        Self { interval, tolerance: interval.saturating_mul(burst.max(1) - 1) }
    }
}

impl<K: std::hash::Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter tracking at most `max_keys` keys (idle keys are forgotten first).
    pub(crate) fn new(max_keys: usize) -> Self {
        Self { epoch: Instant::now(), max_keys, keys: RwLock::new(HashMap::new()), swept_at: AtomicU64::new(0) }
    }

    /// Counts one request for `key_id`, or refuses it when over the limit (burst
    /// `limit`). (The cache's miss budget is its one user.)
    #[cfg_attr(not(feature = "cache"), allow(dead_code))]
    pub(crate) fn check(&self, key_id: &K, limit: RateLimit) -> Result<Option<LimitState>, LimitState> {
        self.spend(key_id, &Limit::new(REQUESTS, limit.limit, limit.period_s), 1, false)
    }

    /// Spends `cost` units of `limit` for `key_id`, or refuses (and spends nothing) when
    /// that would exceed it. `named`: the state names the limit (else `requests`).
    pub(crate) fn spend(
        &self,
        key_id: &K,
        limit: &Limit,
        cost: u64,
        named: bool,
    ) -> Result<Option<LimitState>, LimitState> {
        let rate = RateLimit { limit: limit.limit, period_s: limit.period_s };
        let name = named.then(|| limit.name.clone());
        let burst = limit.effective_burst();
        if limit.limit == 0 || cost > burst {
            let reset = Duration::from_secs(limit.period_s.max(1));
            return Err(LimitState { name, limit: rate, remaining: 0, reset });
        }
        let g = Gcra::new(limit.limit, limit.period_s, burst);
        let increment = g.interval.saturating_mul(cost);
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let Some(tat) = self.slot(key_id, now) else { return Ok(None) };
        let mut current = tat.load(Ordering::Acquire);
        loop {
            let start = current.max(now);
            // The last of the `cost` units must fit in the burst: the first at `start`,
            // the others one interval apart.
            let ahead_after = (start - now).saturating_add(increment - g.interval);
            if ahead_after > g.tolerance {
                let reset = Duration::from_nanos(ahead_after - g.tolerance);
                return Err(LimitState { name, limit: rate, remaining: 0, reset });
            }
            let next = start.saturating_add(increment);
            match tat.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // `ahead` is how far the key's arrival time runs ahead of now: each
                    // `interval` of it is one unit of the burst in use, and the oldest
                    // comes back once `ahead` drops to the next multiple.
                    let ahead = next.saturating_sub(now);
                    let capacity = g.tolerance.saturating_add(g.interval);
                    let remaining = capacity.saturating_sub(ahead) / g.interval;
                    let reset = ahead - (ahead.div_ceil(g.interval) - 1) * g.interval;
                    return Ok(Some(LimitState { name, limit: rate, remaining, reset: Duration::from_nanos(reset) }));
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives back `cost` units spent before (a route that costs otherwise than the
    /// layer charged, or a later limit refused).
    pub(crate) fn give_back(&self, key_id: &K, limit: &Limit, cost: u64) {
        let g = Gcra::new(limit.limit, limit.period_s, limit.effective_burst());
        let decrement = g.interval.saturating_mul(cost);
        let slot = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(key_id).cloned();
        if let Some(tat) = slot {
            let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(t.saturating_sub(decrement)));
        }
    }

    fn slot(&self, key_id: &K, now: u64) -> Option<Arc<AtomicU64>> {
        if let Some(slot) = self.keys.read().unwrap_or_else(|e| e.into_inner()).get(key_id) {
            return Some(slot.clone());
        }
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if keys.len() >= self.max_keys {
            // Sweeping walks every entry: at most once a second, or a flood of new
            // callers would cost a walk each (and a log line each).
            let last = self.swept_at.load(Ordering::Relaxed);
            if last != 0 && now.saturating_sub(last) < SWEEP_INTERVAL_NS {
                return None;
            }
            self.swept_at.store(now.max(1), Ordering::Relaxed);
            // A key whose arrival time has passed is fully replenished: forgetting it
            // changes nothing.
            keys.retain(|_, tat| tat.load(Ordering::Relaxed) > now);
            if keys.len() >= self.max_keys {
                tracing::warn!(
                    max_keys = self.max_keys,
                    "keygate: rate limiter full, not limiting new callers for now"
                );
                return None;
            }
        }
        Some(keys.entry(key_id.clone()).or_insert_with(|| Arc::new(AtomicU64::new(0))).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_of_limit_then_refuses() {
        let rl = RateLimiter::default();
        let key: Arc<str> = Arc::from("key_1");
        let limit = RateLimit { limit: 5, period_s: 60 };
        for left in (0..5).rev() {
            let state = rl.check(&key, limit).unwrap().unwrap();
            assert_eq!(state.remaining, left);
            // One request's worth comes back every 12 s.
            assert!(state.reset > Duration::from_secs(11) && state.reset <= Duration::from_secs(12), "{state:?}");
        }
        let wait = rl.check(&key, limit).unwrap_err();
        assert_eq!(wait.remaining, 0);
        assert!(wait.reset > Duration::from_secs(10) && wait.reset <= Duration::from_secs(12), "{wait:?}");
        // Other keys are independent.
        assert!(rl.check(&Arc::from("key_2"), limit).is_ok());
    }

    #[test]
    fn absurd_limits_neither_panic_nor_overflow() {
        let rl = RateLimiter::default();
        let key: Arc<str> = Arc::from("key_1");
        assert!(rl.check(&key, RateLimit { limit: 1, period_s: u64::MAX }).is_ok());
        assert!(rl.check(&key, RateLimit { limit: 1, period_s: u64::MAX }).is_err());
        assert!(rl.check(&Arc::from("key_2"), RateLimit { limit: u64::MAX, period_s: u64::MAX }).is_ok());
        assert!(rl.check(&Arc::from("key_3"), RateLimit { limit: 0, period_s: 1 }).is_err());
    }

    #[test]
    fn a_burst_below_the_limit_and_costs_above_one() {
        let rl = RateLimiter::default();
        let key: Arc<str> = Arc::from("key_1");
        // 100 per 100 s with a burst of 5: five at once, then one a second.
        let limit = Limit::new("reports", 100, 100).burst(5);
        let first = rl.spend(&key, &limit, 3, true).unwrap().unwrap();
        assert_eq!((first.remaining, first.name.as_deref()), (2, Some("reports")));
        assert!(rl.spend(&key, &limit, 3, true).is_err(), "3 more do not fit in the 2 left");
        assert_eq!(rl.spend(&key, &limit, 2, true).unwrap().unwrap().remaining, 0);
        let refused = rl.spend(&key, &limit, 1, true).unwrap_err();
        assert!(refused.reset > Duration::from_millis(900) && refused.reset <= Duration::from_secs(1), "{refused:?}");
        // Giving back makes room again; a cost above the burst never fits.
        rl.give_back(&key, &limit, 2);
        assert_eq!(rl.spend(&key, &limit, 2, true).unwrap().unwrap().remaining, 0);
        assert!(rl.spend(&Arc::from("key_2"), &limit, 6, true).is_err());
    }

    #[test]
    fn full_limiter_forgets_idle_keys() {
        let rl: RateLimiter = RateLimiter::new(2);
        let limit = RateLimit { limit: 1, period_s: 3600 };
        assert!(rl.check(&Arc::from("a"), limit).is_ok());
        assert!(rl.check(&Arc::from("b"), limit).is_ok());
        // Both are busy for an hour, so a third key cannot be tracked and passes.
        assert!(rl.check(&Arc::from("c"), limit).is_ok());
        assert!(rl.check(&Arc::from("a"), limit).is_err());
        // Within the second after a sweep, a new key is not tracked without one.
        assert!(rl.check(&Arc::from("d"), limit).is_ok());
        assert!(rl.check(&Arc::from("d"), limit).is_ok(), "not tracked");
        assert_eq!(rl.keys.read().unwrap().len(), 2);
    }
}
