//! The limit engine: what charges a request's [`Cost`] against a principal's
//! [`Quota`], all or nothing. [`LocalEngine`] is the embedded default, counting per
//! process; [`redis`] counts fleet-wide on Redis behind the same [`LimitEngine`] trait.
//!
//! What is charged, in order: for each limit the cost names, the key's limit of that
//! name, then the owner's; then the credits, the key's, then the owner's. The first
//! refusal gives back what was charged before it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use time::OffsetDateTime;

use crate::cost::Cost;
use crate::principal::Principal;
use crate::quota::{Credits, Limit, Quota};
use crate::ratelimit::{DEFAULT_MAX_TRACKED_KEYS, LimitState, RateLimiter};

#[cfg(feature = "redis")]
pub(crate) mod redis;

/// Why a charge was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// A limit is exhausted: where it stands.
    Limit(LimitState),
    /// Credits are spent; the wait until the next refill, if they have one.
    Credits(Option<Duration>),
    /// The engine cannot count now (its store is down and the policy fails closed);
    /// the suggested wait. Only a fleet-wide engine refuses so.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Unavailable(Duration),
}

/// A charge's answer: at once, or once the engine has asked its store.
pub(crate) enum Charge {
    /// Decided without waiting (the common case).
    Done(Result<Option<LimitState>, Refused>),
    /// Decided once this resolves; nothing is charged if it is dropped first. Only a
    /// fleet-wide engine waits.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Wait(Pin<Box<dyn Future<Output = Result<Option<LimitState>, Refused>> + Send>>),
}

/// Charges costs against quotas. Implementations decide where the counts live (this
/// process, or a store shared by a fleet).
pub(crate) trait LimitEngine: Send + Sync + std::fmt::Debug + 'static {
    /// Charges `cost` for `principal`, whose quota is `quota`: all of it, or nothing
    /// and the refusal. `Ok` carries the binding limit's standing (the one with the
    /// least left), if the cost drew from a limit.
    fn charge(&self, principal: &Principal, quota: &Quota, cost: &Cost) -> Charge;

    /// Gives back a charge made before with the same `cost`.
    fn refund(&self, principal: &Principal, quota: &Quota, cost: &Cost);
}

/// One thing a cost draws from.
enum Step<'a> {
    KeyLimit(&'a Limit, u64),
    OwnerLimit(&'a Limit, u64),
    KeyCredits(&'a Credits, u64),
    OwnerCredits(&'a Credits, u64),
}

/// What `cost` draws from `quota`, in the order it is charged.
fn steps<'a>(quota: &'a Quota, cost: &'a Cost) -> impl Iterator<Item = Step<'a>> + 'a {
    let limits = cost.limits().flat_map(move |(name, units)| {
        let key = quota.limits.iter().find(|l| &*l.name == name).map(|l| Step::KeyLimit(l, units));
        let owner = quota.owner_limits.iter().find(|l| &*l.name == name).map(|l| Step::OwnerLimit(l, units));
        key.into_iter().chain(owner)
    });
    let units = cost.credit_units();
    let credits = (units > 0).then_some(()).into_iter().flat_map(move |()| {
        let key = quota.credits.as_ref().map(|c| Step::KeyCredits(c, units));
        let owner = quota.owner_credits.as_ref().map(|c| Step::OwnerCredits(c, units));
        key.into_iter().chain(owner)
    });
    limits.chain(credits)
}

/// The per-process engine: GCRA per key and limit name (and per owner and name for
/// owner limits), credits as counters per key (and per owner) seeded from the verify
/// answer's `remaining`, refilled here at the refill times.
///
/// Every process counts on its own: with N instances a key may spend up to N times its
/// limits and N times its credits. A counter is seeded again whenever the key
/// service's answer states other credits (an operator changed them). Up to 100 000
/// keys and 100 000 owners are tracked per map; past that, idle ones are forgotten
/// first, and a new one that finds no room is not limited (and a warning is logged).
#[derive(Debug)]
pub(crate) struct LocalEngine {
    key_limits: RateLimiter<(Arc<str>, Arc<str>)>,
    owner_limits: RateLimiter<(Arc<str>, Arc<str>)>,
    key_credits: CreditCounters,
    owner_credits: CreditCounters,
}

impl Default for LocalEngine {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_TRACKED_KEYS)
    }
}

impl LocalEngine {
    /// An engine tracking at most `max` keys (and as many owners) per map.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            key_limits: RateLimiter::new(max),
            owner_limits: RateLimiter::new(max),
            key_credits: CreditCounters::new(max),
            owner_credits: CreditCounters::new(max),
        }
    }

    fn apply(&self, p: &Principal, step: &Step<'_>, now: OffsetDateTime) -> Result<Option<LimitState>, Refused> {
        match *step {
            Step::KeyLimit(l, units) => {
                let id = (p.key_id_arc().clone(), l.name.clone());
                self.key_limits.spend(&id, l, units, true).map_err(Refused::Limit)
            }
            Step::OwnerLimit(l, units) => {
                let id = (p.owner_arc().clone(), l.name.clone());
                self.owner_limits.spend(&id, l, units, true).map_err(Refused::Limit)
            }
            Step::KeyCredits(c, units) => {
                self.key_credits.spend(p.key_id_arc(), c, units, now).map(|_| None).map_err(Refused::Credits)
            }
            Step::OwnerCredits(c, units) => {
                self.owner_credits.spend(p.owner_arc(), c, units, now).map(|_| None).map_err(Refused::Credits)
            }
        }
    }

    fn undo(&self, p: &Principal, step: &Step<'_>) {
        match *step {
            Step::KeyLimit(l, units) => self.key_limits.give_back(&(p.key_id_arc().clone(), l.name.clone()), l, units),
            Step::OwnerLimit(l, units) => {
                self.owner_limits.give_back(&(p.owner_arc().clone(), l.name.clone()), l, units)
            }
            Step::KeyCredits(_, units) => self.key_credits.give_back(p.key_id_arc(), units),
            Step::OwnerCredits(_, units) => self.owner_credits.give_back(p.owner_arc(), units),
        }
    }
}

impl LimitEngine for LocalEngine {
    fn charge(&self, p: &Principal, quota: &Quota, cost: &Cost) -> Charge {
        Charge::Done(self.charge_now(p, quota, cost))
    }

    fn refund(&self, p: &Principal, quota: &Quota, cost: &Cost) {
        for step in steps(quota, cost) {
            self.undo(p, &step);
        }
    }
}

impl LocalEngine {
    fn charge_now(&self, p: &Principal, quota: &Quota, cost: &Cost) -> Result<Option<LimitState>, Refused> {
        let now = OffsetDateTime::now_utc();
        let mut binding: Option<LimitState> = None;
        for (i, step) in steps(quota, cost).enumerate() {
            match self.apply(p, &step, now) {
                Ok(Some(state)) => {
                    if binding.as_ref().is_none_or(|b| state.remaining < b.remaining) {
                        binding = Some(state);
                    }
                }
                Ok(None) => {}
                Err(refused) => {
                    for done in steps(quota, cost).take(i) {
                        self.undo(p, &done);
                    }
                    return Err(refused);
                }
            }
        }
        Ok(binding)
    }
}

/// Credits left per key (or owner), in this process.
#[derive(Debug)]
struct CreditCounters {
    max: usize,
    counters: RwLock<HashMap<Arc<str>, Arc<Mutex<Counter>>>>,
}

#[derive(Debug)]
struct Counter {
    /// The credits the key service stated, which the count started from.
    seed: Credits,
    remaining: u64,
    next_refill: Option<OffsetDateTime>,
}

impl Counter {
    fn seeded(seed: &Credits, now: OffsetDateTime) -> Self {
        Self { seed: seed.clone(), remaining: seed.remaining, next_refill: seed.refill.map(|r| r.next_after(now)) }
    }
}

impl CreditCounters {
    fn new(max: usize) -> Self {
        Self { max, counters: RwLock::new(HashMap::new()) }
    }

    fn counter(&self, id: &Arc<str>, seed: &Credits, now: OffsetDateTime) -> Option<Arc<Mutex<Counter>>> {
        if let Some(c) = self.counters.read().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Some(c.clone());
        }
        let mut counters = self.counters.write().unwrap_or_else(|e| e.into_inner());
        if counters.len() >= self.max && !counters.contains_key(id) {
            // A counter back at its seed with no refill due holds nothing a new seed
            // would not: forgetting it changes nothing.
            counters.retain(|_, c| {
                let c = c.lock().unwrap_or_else(|e| e.into_inner());
                c.remaining != c.seed.remaining || c.next_refill.is_some_and(|t| t <= now)
            });
            if counters.len() >= self.max {
                tracing::warn!(max_keys = self.max, "keygate: credit counters full, not counting new keys for now");
                return None;
            }
        }
        Some(counters.entry(id.clone()).or_insert_with(|| Arc::new(Mutex::new(Counter::seeded(seed, now)))).clone())
    }

    /// Spends `units`: what is left, or the wait until the next refill when too few are.
    fn spend(&self, id: &Arc<str>, seed: &Credits, units: u64, now: OffsetDateTime) -> Result<u64, Option<Duration>> {
        let Some(counter) = self.counter(id, seed, now) else { return Ok(u64::MAX) };
        let mut c = counter.lock().unwrap_or_else(|e| e.into_inner());
        if c.seed != *seed {
            *c = Counter::seeded(seed, now);
        }
        if let (Some(at), Some(refill)) = (c.next_refill, seed.refill) {
            if at <= now {
                c.remaining = refill.amount();
                c.next_refill = Some(refill.next_after(now));
            }
        }
        if c.remaining < units {
            let wait = c.next_refill.map(|at| (at - now).try_into().unwrap_or(Duration::ZERO));
            return Err(wait);
        }
        c.remaining -= units;
        Ok(c.remaining)
    }

    fn give_back(&self, id: &Arc<str>, units: u64) {
        let counter = self.counters.read().unwrap_or_else(|e| e.into_inner()).get(id).cloned();
        if let Some(counter) = counter {
            let mut c = counter.lock().unwrap_or_else(|e| e.into_inner());
            c.remaining = c.remaining.saturating_add(units);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Refill;

    fn key(owner: &str, id: &str) -> Principal {
        Principal::builder(id)
            .owner(owner)
            .limits([Limit::new("requests", 1000, 1), Limit::new("reports", 2, 3600)])
            .credits(Some(Credits { remaining: 25, refill: None }))
            .owner_limits([Limit::new("requests", 3, 3600)])
            .build()
    }

    fn charge(e: &LocalEngine, p: &Principal, cost: &Cost) -> Result<Option<LimitState>, Refused> {
        e.charge_now(p, p.quota().unwrap(), cost)
    }

    #[test]
    fn a_refused_charge_takes_nothing() {
        let e = LocalEngine::default();
        let p = key("acme", "key_1");
        let ten = Cost::new().credits(10);
        assert!(charge(&e, &p, &ten).is_ok());
        assert!(charge(&e, &p, &ten).is_ok());
        // 5 credits left: refused, and the owner's `requests` given back.
        assert_eq!(charge(&e, &p, &ten), Err(Refused::Credits(None)));
        let state = charge(&e, &p, &Cost::new().credits(5)).unwrap().unwrap();
        // The owner's limit binds: 3 per hour, the third spent now.
        assert_eq!((state.name.as_deref(), state.remaining), (Some("requests"), 0));
        assert!(matches!(charge(&e, &p, &Cost::new().credits(0)), Err(Refused::Limit(_))));
    }

    #[test]
    fn owner_limits_are_shared_and_key_limits_are_not() {
        let e = LocalEngine::default();
        let (a, b) = (key("acme", "key_a"), key("acme", "key_b"));
        let reports = Cost::free().limit("reports", 1);
        for p in [&a, &a, &b, &b] {
            assert!(charge(&e, p, &reports).is_ok(), "each key has 2 reports of its own");
        }
        assert!(charge(&e, &a, &reports).is_err());
        let req = Cost::new().credits(0);
        assert!(charge(&e, &a, &req).is_ok());
        assert!(charge(&e, &b, &req).is_ok());
        assert!(charge(&e, &b, &req).is_ok());
        assert!(charge(&e, &a, &req).is_err(), "the owner's 3 are spent by both keys");
        assert!(charge(&e, &key("globex", "key_c"), &req).is_ok(), "another owner's are its own");
    }

    #[test]
    fn new_credits_from_the_key_service_reseed_and_refills_restore() {
        let e = LocalEngine::default();
        let credits = |remaining| Credits { remaining, refill: None };
        let with = |c: Credits| Principal::builder("key_1").credits(Some(c)).build();
        let one = Cost::free().credits(1);
        assert!(charge(&e, &with(credits(1)), &one).is_ok());
        assert!(charge(&e, &with(credits(1)), &one).is_err());
        assert!(charge(&e, &with(credits(2)), &one).is_ok(), "an operator's new credits count afresh");
        // A refill due sets the count back to its amount.
        let refilled = Credits { remaining: 0, refill: Some(Refill::Every { interval_s: 3600, amount: 4 }) };
        let p = with(refilled.clone());
        assert!(matches!(charge(&e, &p, &one), Err(Refused::Credits(Some(_)))));
        {
            let counters = e.key_credits.counters.read().unwrap();
            counters[&Arc::<str>::from("key_1")].lock().unwrap().next_refill = Some(OffsetDateTime::now_utc());
        }
        assert!(charge(&e, &p, &Cost::free().credits(4)).is_ok());
        assert!(charge(&e, &p, &one).is_err());
    }
}
