//! One bucket's lease: units taken from Redis ahead of need and spent here, so the
//! request path makes no round trip while the lease lasts.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::quota::{Credits, Refill};

/// Which count a credits grant was taken from: a lease is void once that count was
/// reseeded (an operator set new credits) or refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Origin {
    /// The key service's credits revision, if it gives one.
    pub(super) revision: Option<u64>,
    /// The credits as stated: without a revision, they name the count.
    pub(super) remaining: u64,
    pub(super) refill: Option<Refill>,
    /// The Unix second of the refill the count is at (-1: no refill).
    pub(super) refilled_at: i64,
}

impl Origin {
    /// Whether `other` names the same count. With a revision, `remaining` is what the
    /// key service reconciled and does not name it.
    pub(super) fn same_count(&self, other: &Origin) -> bool {
        self.refilled_at == other.refilled_at
            && match (self.revision, other.revision) {
                (Some(a), Some(b)) => a == b,
                (None, None) => self.remaining == other.remaining && self.refill == other.refill,
                _ => false,
            }
    }

    /// The count's revision as Redis keeps it.
    pub(super) fn tag(&self) -> String {
        super::schema::revision(self.revision, &Credits { remaining: self.remaining, refill: self.refill })
    }
}

/// What a local attempt to spend found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Local {
    /// Spent from the lease: `left`, what Redis had left at the last grant plus what
    /// this process still holds; `low`, the lease holds less than half of what the
    /// observed rate spends in a window (time to top it up).
    Spent { left: u64, low: bool },
    /// Redis refused moments ago and would refuse again: no round trip until then.
    Refused { wait: Duration },
    /// The lease cannot pay: ask Redis.
    Fetch,
}

#[derive(Debug)]
pub(super) struct Lease {
    state: Mutex<State>,
    /// One Redis call per bucket at a time in this process: concurrent misses wait for
    /// it and then spend what it brought.
    pub(super) fetch: tokio::sync::Mutex<()>,
    /// A background top-up is on its way: requests spending a low lease meanwhile start
    /// no other.
    topping_up: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct State {
    held: u64,
    origin: Origin,
    /// What Redis had left after the last grant (for `RateLimit` fields).
    left: u64,
    refused_until: Option<Instant>,
    /// What Redis was short of when it refused: only a request lacking at least as much
    /// is refused here. A refusal of a big cost (one above the burst waits long) must
    /// not refuse small ones that Redis would admit.
    refused_lack: u64,
    /// Spent since the last fetch, and since when: the observed rate sizes the next lease.
    spent: u64,
    /// Spent ever (refunds aside): unchanged between sweeps means idle.
    total: u64,
    /// Half of what the observed rate spends in a window: below it the lease is low.
    low_water: u64,
    /// A limit's emission interval in µs, to give its units back (0 for credits).
    emission_us: u64,
    since: Instant,
    /// Units per second this process spends, smoothed over fetches.
    rate: f64,
    /// `total` at the last sweep.
    swept_total: u64,
    idle_sweeps: u32,
    /// Spent while Redis was down (credits only): debited when it is back.
    pub(super) owed: u64,
    /// The count `owed` was spent against: a lease made while Redis was down holds no
    /// origin of its own, and its debit would match no count.
    owed_origin: Origin,
}

impl Lease {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                held: 0,
                origin: Origin::default(),
                left: 0,
                refused_until: None,
                refused_lack: 0,
                spent: 0,
                total: 0,
                low_water: 0,
                emission_us: 0,
                since: Instant::now(),
                rate: 0.0,
                swept_total: 0,
                idle_sweeps: 0,
                owed: 0,
                owed_origin: Origin::default(),
            }),
            fetch: tokio::sync::Mutex::new(()),
            topping_up: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Claims the lease's one background top-up; `false` when one is on its way.
    pub(super) fn claim_top_up(&self) -> bool {
        !self.topping_up.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// The claimed top-up is over.
    pub(super) fn top_up_done(&self) {
        self.topping_up.store(false, std::sync::atomic::Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spends `units` from the lease if it holds them under `origin` (`None`: any, for
    /// limits).
    pub(super) fn try_spend(&self, units: u64, origin: Option<&Origin>) -> Local {
        let mut s = self.lock();
        if origin.is_some_and(|o| !o.same_count(&s.origin)) {
            // The count was reseeded or refilled since this lease was taken: what it
            // holds belongs to a count that no longer exists.
            s.held = 0;
            s.refused_until = None;
            return Local::Fetch;
        }
        if s.held >= units {
            s.held -= units;
            s.spent += units;
            s.total += units;
            return Local::Spent { left: s.left.saturating_add(s.held), low: s.held < s.low_water };
        }
        if let Some(until) = s.refused_until {
            let now = Instant::now();
            if now >= until {
                s.refused_until = None;
            } else if units - s.held >= s.refused_lack {
                return Local::Refused { wait: until - now };
            }
        }
        Local::Fetch
    }

    /// Gives `units` back to the lease (a refund).
    pub(super) fn give_back(&self, units: u64) {
        let mut s = self.lock();
        s.held = s.held.saturating_add(units);
        s.spent = s.spent.saturating_sub(units);
    }

    /// What to ask Redis for now: `(want, lack)`, `lack` what the lease is short of
    /// `need` (the least Redis may grant) and `want` that plus what the observed rate
    /// spends in `window`, the extra at most `max`. A key slower than one unit per
    /// `window` takes only what it needs, so its limits are exact.
    pub(super) fn want(&self, need: u64, window: Duration, max: u64) -> (u64, u64) {
        let mut s = self.lock();
        let elapsed = s.since.elapsed().as_secs_f64().max(1e-3);
        let observed = s.spent as f64 / elapsed;
        s.rate = if s.rate == 0.0 { observed } else { 0.5 * s.rate + 0.5 * observed };
        s.spent = 0;
        s.since = Instant::now();
        let ahead = ((s.rate * window.as_secs_f64()).floor() as u64).min(max);
        s.low_water = if ahead > 1 { ahead / 2 } else { 0 };
        let lack = need.saturating_sub(s.held);
        (lack.saturating_add(ahead), lack)
    }

    /// Adds a grant of `granted` units taken under `origin`, with `left` in Redis after
    /// it; units held under another origin are dropped.
    pub(super) fn add(&self, granted: u64, left: u64, origin: Option<Origin>, emission_us: u64) {
        let mut s = self.lock();
        s.emission_us = emission_us;
        if let Some(origin) = origin {
            if !origin.same_count(&s.origin) {
                s.held = 0;
            }
            s.origin = origin;
        }
        s.held = s.held.saturating_add(granted);
        s.left = left;
        s.refused_until = None;
    }

    /// Redis refused to grant `lack` units: refuse requests lacking as much here too
    /// for `wait`.
    pub(super) fn refused(&self, wait: Duration, left: u64, lack: u64) {
        let mut s = self.lock();
        s.left = left;
        s.refused_until = Some(Instant::now() + wait);
        s.refused_lack = lack;
    }

    /// At a sweep: the held units and their origin if the lease was idle since the last
    /// sweep (they go back to Redis), and whether it has been idle `forget_after` sweeps
    /// with nothing held (it can be dropped).
    pub(super) fn sweep(&self, forget_after: u32) -> (Option<(u64, Origin)>, bool) {
        let mut s = self.lock();
        let idle = s.total == s.swept_total && s.owed == 0;
        s.swept_total = s.total;
        if !idle {
            s.idle_sweeps = 0;
            return (None, false);
        }
        s.idle_sweeps = s.idle_sweeps.saturating_add(1);
        let returned = (s.held > 0).then(|| (std::mem::take(&mut s.held), s.origin));
        (returned, s.idle_sweeps >= forget_after && s.held == 0)
    }

    /// The emission interval of the limit whose units it holds (0 for credits).
    pub(super) fn emission_us(&self) -> u64 {
        self.lock().emission_us
    }

    /// Everything held, for shutdown.
    pub(super) fn take_all(&self) -> (u64, Origin) {
        let mut s = self.lock();
        (std::mem::take(&mut s.held), s.origin)
    }

    /// Notes `units` spent while Redis was down from the count `origin` names.
    pub(super) fn owe(&self, units: u64, origin: Origin) {
        let mut s = self.lock();
        s.owed = s.owed.saturating_add(units);
        s.owed_origin = origin;
    }

    /// What was spent while Redis was down, to debit now, with the origin it counts
    /// against.
    pub(super) fn take_owed(&self) -> (u64, Origin) {
        let mut s = self.lock();
        (std::mem::take(&mut s.owed), s.owed_origin)
    }

    /// Whether forgetting it loses nothing: nothing held or owed, unused since the last
    /// sweep.
    pub(super) fn is_empty(&self) -> bool {
        let s = self.lock();
        s.held == 0 && s.owed == 0 && s.total == s.swept_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(rev: u64) -> Origin {
        Origin { revision: Some(rev), remaining: 10, refill: None, refilled_at: 0 }
    }

    #[test]
    fn spends_what_it_holds_and_then_asks() {
        let l = Lease::new();
        assert_eq!(l.try_spend(1, None), Local::Fetch);
        l.add(3, 10, None, 0);
        assert_eq!(l.try_spend(2, None), Local::Spent { left: 11, low: false });
        assert_eq!(l.try_spend(2, None), Local::Fetch, "one left, two needed");
        l.give_back(2);
        assert_eq!(l.try_spend(3, None), Local::Spent { left: 10, low: false });
    }

    #[test]
    fn a_new_origin_voids_what_is_held() {
        let l = Lease::new();
        l.add(5, 0, Some(origin(1)), 0);
        assert_eq!(l.try_spend(1, Some(&origin(1))), Local::Spent { left: 4, low: false });
        assert_eq!(l.try_spend(1, Some(&origin(2))), Local::Fetch);
        l.add(2, 0, Some(origin(2)), 0);
        assert_eq!(l.try_spend(2, Some(&origin(2))), Local::Spent { left: 0, low: false });
        assert_eq!(l.try_spend(1, Some(&origin(2))), Local::Fetch, "the old 4 were dropped");
    }

    #[test]
    fn a_refusal_is_remembered_until_its_wait() {
        let l = Lease::new();
        l.refused(Duration::from_secs(60), 0, 1);
        assert!(matches!(l.try_spend(1, None), Local::Refused { .. }));
        l.refused(Duration::ZERO, 0, 1);
        assert_eq!(l.try_spend(1, None), Local::Fetch);
    }

    #[test]
    fn a_refusal_of_a_big_need_does_not_refuse_small_ones() {
        let l = Lease::new();
        // Redis could not grant 19 units (a cost above the burst waits long for them).
        l.refused(Duration::from_secs(60), 0, 19);
        assert_eq!(l.try_spend(1, None), Local::Fetch, "one unit may well be there");
        assert!(matches!(l.try_spend(19, None), Local::Refused { .. }));
        assert!(matches!(l.try_spend(30, None), Local::Refused { .. }));
    }

    #[test]
    fn what_is_owed_counts_against_the_count_it_was_spent_from() {
        let l = Lease::new();
        l.owe(3, origin(7));
        assert_eq!(l.take_owed(), (3, origin(7)), "not the default origin of a lease that never fetched");
    }

    #[test]
    fn idle_leases_give_back_and_are_forgotten() {
        let l = Lease::new();
        l.add(4, 0, None, 0);
        assert_eq!(l.try_spend(1, None), Local::Spent { left: 3, low: false });
        assert_eq!(l.sweep(2), (None, false), "used since the last sweep");
        assert_eq!(l.sweep(2), (Some((3, Origin::default())), false));
        assert_eq!(l.sweep(2), (None, true));
    }

    #[test]
    fn wants_at_least_the_need_and_at_most_max_ahead() {
        let l = Lease::new();
        assert_eq!(l.want(1, Duration::from_millis(100), 50), (1, 1), "no rate seen: only the need");
        l.add(3, 0, None, 0);
        for _ in 0..3 {
            assert!(matches!(l.try_spend(1, None), Local::Spent { .. }));
        }
        // Three units in well under a second: the next lease takes some ahead, at most 2.
        let (want, lack) = l.want(4, Duration::from_secs(10), 2);
        assert_eq!((want, lack), (6, 4));
    }
}
