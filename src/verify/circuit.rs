//! The circuit a [`CachedVerifier`](super::CachedVerifier) keeps around the verifier it
//! wraps: once that verifier keeps failing, requests stop waiting on it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::cached::lock;

/// Default number of consecutive failed calls that open the circuit: 5.
pub const DEFAULT_CIRCUIT_OPEN_AFTER: u32 = 5;
/// Default wait before the first probe of an open circuit: 500 ms.
pub const DEFAULT_CIRCUIT_FIRST_PROBE: Duration = Duration::from_millis(500);
/// Default longest wait between probes of an open circuit: 10 s.
pub const DEFAULT_CIRCUIT_MAX_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// When a [`CachedVerifier`](super::CachedVerifier) stops calling a failing verifier,
/// and how it checks for recovery; set with
/// [`CachedVerifierBuilder::circuit_breaker`](super::CachedVerifierBuilder::circuit_breaker).
///
/// After [`open_after`](Self::open_after) consecutive failed calls (default 5) the
/// circuit opens: a lookup that would call the verifier is answered at once instead,
/// with the stale verdict when one is held inside the stale-if-error window, else with
/// [`VerifyError::CircuitOpen`](super::VerifyError::CircuitOpen) (503, or the
/// fail-open principal under [`FailurePolicy::FailOpen`](super::FailurePolicy)). Fresh
/// and refused verdicts are served from the cache as always.
///
/// While open, one call at a time probes the verifier: the first after
/// [`first_probe_after`](Self::first_probe_after) (default 500 ms), then after a wait
/// that doubles on every failed probe up to
/// [`max_probe_interval`](Self::max_probe_interval) (default 10 s), with up to 25 %
/// random jitter so that a fleet does not probe in step. The probe runs in the
/// background, on the key of the lookup that found it due; that lookup is answered at
/// once like the others. The first successful call closes the circuit.
///
/// The state goes to the `metrics` facade as the gauge `keygate_cache_circuit_open`
/// (1 while open) and the counter `keygate_cache_circuit_opened_total`, and to the log:
/// `warn` when it opens, `info` when it closes.
///
/// ```
/// use std::time::Duration;
/// use keygate::{CachedVerifier, CircuitBreaker, StaticVerifier};
///
/// let verifier = CachedVerifier::builder(StaticVerifier::new())
///     .circuit_breaker(CircuitBreaker::new().open_after(3).max_probe_interval(Duration::from_secs(5)))
///     .build();
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct CircuitBreaker {
    open_after: u32,
    first_probe: Duration,
    max_probe_interval: Duration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self::new()
    }
}

impl CircuitBreaker {
    /// The defaults: open after 5 consecutive failures, first probe after 500 ms,
    /// probes at most 10 s apart.
    pub fn new() -> Self {
        Self {
            open_after: DEFAULT_CIRCUIT_OPEN_AFTER,
            first_probe: DEFAULT_CIRCUIT_FIRST_PROBE,
            max_probe_interval: DEFAULT_CIRCUIT_MAX_PROBE_INTERVAL,
        }
    }

    /// A circuit that never opens: every lookup that needs the verifier calls it.
    pub fn disabled() -> Self {
        Self { open_after: 0, ..Self::new() }
    }

    /// Consecutive failed calls that open the circuit (default 5; 0 disables it).
    pub fn open_after(mut self, failures: u32) -> Self {
        self.open_after = failures;
        self
    }

    /// Wait before the first probe once the circuit opened (default 500 ms).
    pub fn first_probe_after(mut self, wait: Duration) -> Self {
        self.first_probe = wait.min(super::cached::MAX_DURATION);
        self
    }

    /// Longest wait between two probes (default 10 s): how long a recovered verifier
    /// can go unnoticed at worst, when nothing else closes the circuit.
    pub fn max_probe_interval(mut self, wait: Duration) -> Self {
        self.max_probe_interval = wait.min(super::cached::MAX_DURATION);
        self
    }
}

/// What a lookup that needs the verifier may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Call it.
    Call,
    /// Do not call it; start the one probe in the background.
    Probe,
    /// Do not call it.
    Refuse,
}

pub(crate) struct Circuit {
    config: CircuitBreaker,
    state: Mutex<State>,
    open_gauge: metrics::Gauge,
    opened: metrics::Counter,
}

#[derive(Default)]
struct State {
    failures: u32,
    open: Option<Open>,
    opened_count: u64,
}

struct Open {
    next_probe: Instant,
    wait: Duration,
    probing: bool,
}

impl Circuit {
    pub(crate) fn new(config: CircuitBreaker, cache: Option<&str>) -> Self {
        let (open_gauge, opened) = match cache {
            Some(name) => (
                metrics::gauge!("keygate_cache_circuit_open", "cache" => name.to_owned()),
                metrics::counter!("keygate_cache_circuit_opened_total", "cache" => name.to_owned()),
            ),
            None => {
                (metrics::gauge!("keygate_cache_circuit_open"), metrics::counter!("keygate_cache_circuit_opened_total"))
            }
        };
        open_gauge.set(0.0);
        Self { config, state: Mutex::new(State::default()), open_gauge, opened }
    }

    /// Asked before every call the verifier would get. The state is only touched on
    /// that path (a miss), never on a cache hit.
    pub(crate) fn admit(&self) -> Admit {
        if self.config.open_after == 0 {
            return Admit::Call;
        }
        let mut state = lock(&self.state);
        let Some(open) = state.open.as_mut() else { return Admit::Call };
        if open.probing || Instant::now() < open.next_probe {
            return Admit::Refuse;
        }
        open.probing = true;
        Admit::Probe
    }

    pub(crate) fn is_open(&self) -> bool {
        lock(&self.state).open.is_some()
    }

    pub(crate) fn opened_count(&self) -> u64 {
        lock(&self.state).opened_count
    }

    /// A call answered (a verdict, valid or not): the verifier works.
    pub(crate) fn succeeded(&self) {
        let mut state = lock(&self.state);
        state.failures = 0;
        if state.open.take().is_some() {
            drop(state);
            self.open_gauge.set(0.0);
            tracing::info!("keygate: the verifier answers again; circuit closed");
        }
    }

    /// Closes the circuit without a call: something else showed the key service is
    /// back (the event stream connected). Only the revocation listener knows that.
    #[cfg(feature = "remote")]
    pub(crate) fn close(&self, why: &'static str) {
        let mut state = lock(&self.state);
        state.failures = 0;
        if state.open.take().is_some() {
            drop(state);
            self.open_gauge.set(0.0);
            tracing::info!(why, "keygate: circuit closed");
        }
    }

    /// A call failed. `probe`: it was the open circuit's probe.
    pub(crate) fn failed(&self, probe: bool) {
        if self.config.open_after == 0 {
            return;
        }
        let mut state = lock(&self.state);
        let now = Instant::now();
        match state.open.as_mut() {
            Some(open) if probe => {
                open.probing = false;
                open.wait = open.wait.saturating_mul(2).min(self.config.max_probe_interval);
                open.next_probe = now + jittered(open.wait);
            }
            // A call started before the circuit opened: nothing new learnt.
            Some(_) => {}
            None => {
                state.failures = state.failures.saturating_add(1);
                if state.failures >= self.config.open_after {
                    let wait = self.config.first_probe.min(self.config.max_probe_interval);
                    state.open = Some(Open { next_probe: now + jittered(wait), wait, probing: false });
                    state.opened_count += 1;
                    let failures = state.failures;
                    drop(state);
                    self.open_gauge.set(1.0);
                    self.opened.increment(1);
                    tracing::warn!(
                        failures,
                        "keygate: the verifier keeps failing; circuit open, lookups that need it are answered at once"
                    );
                }
            }
        }
    }

    /// The probe ended without an answer (its task was cancelled): let another one go.
    pub(crate) fn probe_abandoned(&self) {
        if let Some(open) = lock(&self.state).open.as_mut() {
            open.probing = false;
        }
    }
}

/// `wait` plus up to 25 % of it, at random.
fn jittered(wait: Duration) -> Duration {
    let mut byte = [0u8; 2];
    // Jitter only spreads probes; without randomness they are merely in step.
    let _ = getrandom::fill(&mut byte);
    let fraction = f64::from(u16::from_le_bytes(byte)) / f64::from(u16::MAX) * 0.25;
    wait.saturating_add(wait.mul_f64(fraction))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_closes_on_success() {
        let c = Circuit::new(CircuitBreaker::new().open_after(3).first_probe_after(Duration::from_millis(20)), None);
        c.failed(false);
        c.failed(false);
        c.succeeded();
        c.failed(false);
        c.failed(false);
        assert_eq!(c.admit(), Admit::Call, "a success in between resets the count");
        c.failed(false);
        assert!(c.is_open());
        assert_eq!(c.admit(), Admit::Refuse, "no probe before the first wait");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(c.admit(), Admit::Probe);
        assert_eq!(c.admit(), Admit::Refuse, "one probe at a time");
        c.failed(true);
        assert_eq!(c.admit(), Admit::Refuse, "the wait doubled");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.admit(), Admit::Probe);
        c.probe_abandoned();
        assert_eq!(c.admit(), Admit::Probe, "an abandoned probe lets the next one go");
        c.succeeded();
        assert!(!c.is_open());
        assert_eq!(c.admit(), Admit::Call);
        assert_eq!(c.opened_count(), 1);
    }

    #[test]
    fn the_wait_is_capped_and_a_disabled_circuit_never_opens() {
        let c = Circuit::new(
            CircuitBreaker::new()
                .open_after(1)
                .first_probe_after(Duration::from_secs(1))
                .max_probe_interval(Duration::from_secs(2)),
            None,
        );
        c.failed(false);
        for _ in 0..10 {
            lock(&c.state).open.as_mut().unwrap().probing = true;
            c.failed(true);
        }
        assert_eq!(lock(&c.state).open.as_ref().unwrap().wait, Duration::from_secs(2));
        let off = Circuit::new(CircuitBreaker::disabled(), None);
        for _ in 0..100 {
            off.failed(false);
        }
        assert_eq!(off.admit(), Admit::Call);
        for _ in 0..1000 {
            let j = jittered(Duration::from_millis(100));
            assert!(j >= Duration::from_millis(100) && j <= Duration::from_millis(125), "{j:?}");
        }
    }
}
