//! Fleet-wide limits and credits on Redis.
//!
//! See [`RedisLimits`] for how it counts, its bounds and what happens when Redis is down.

mod lease;
// Used by the key service's reconciler too.
pub(crate) mod schema;
mod scripts;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use redis::aio::ConnectionManager;
use time::OffsetDateTime;

use self::lease::{Lease, Local, Origin};
use self::schema::Holder;
use super::{Charge, LimitEngine, LocalEngine, Refused, Step, steps};
use crate::cost::Cost;
use crate::principal::{Principal, RateLimit};
use crate::quota::{Credits, Limit, Quota, Refill};
use crate::ratelimit::LimitState;

/// What a limit (or the credits) does while Redis cannot be reached; see the
/// [module docs](RedisLimits#when-redis-is-down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RedisDown {
    /// Count in this process at 1/`expected_instances` of the limit (the default).
    #[default]
    LocalShare,
    /// Refuse with 503 `limits_unavailable`.
    FailClosed,
}

/// Counters of a [`RedisLimits`] engine since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisLimitsStats {
    /// Scripts run against Redis (leases, strict charges, returns).
    pub redis_calls: u64,
    /// Redis calls that failed or timed out.
    pub redis_errors: u64,
    /// Units taken from Redis in leases or strict charges.
    pub units_taken: u64,
    /// Unspent units given back to Redis.
    pub units_returned: u64,
    /// Switches to the fallback (Redis unreachable).
    pub switched_to_fallback: u64,
    /// Switches back to Redis.
    pub switched_back: u64,
    /// Whether the fallback is in force now.
    pub on_fallback: bool,
    /// Buckets (a key's or an owner's limit or credits) this instance holds a lease for.
    pub leases: u64,
}

/// Why a [`RedisLimits`] could not be built: a URL Redis's client does not take, or no
/// tokio runtime to run in.
#[derive(Debug, thiserror::Error)]
#[error("keygate: cannot use Redis for limits: {why}")]
pub struct RedisLimitsError {
    why: &'static str,
    #[source]
    source: Option<redis::RedisError>,
}

/// Builds a [`RedisLimits`]; every setting is optional and states its default.
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisLimitsBuilder {
    url: String,
    prefix: String,
    lease_window: Duration,
    max_lease: u64,
    expected_instances: u64,
    timeout: Duration,
    strict_credits: bool,
    strict_limits: HashSet<String>,
    credits_down: RedisDown,
    limits_down: RedisDown,
    limit_down: HashMap<String, RedisDown>,
    max_leases: usize,
}

impl RedisLimitsBuilder {
    /// The prefix of every Redis key the engine uses (default `keygate:`); the key
    /// service's reconciler must use the same.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a lease should last at the rate this instance spends a key's units
    /// (default 100 ms).
    pub fn lease_window(mut self, window: Duration) -> Self {
        self.lease_window = window;
        self
    }

    /// Most units a lease takes beyond the request's own need (default 1 000); the M of
    /// the [bounds](RedisLimits#bounds).
    pub fn max_lease(mut self, max: u64) -> Self {
        self.max_lease = max;
        self
    }

    /// How many instances share the limits (default 1): the fallback's share, and how
    /// thin the last credits are spread.
    pub fn expected_instances(mut self, n: u64) -> Self {
        self.expected_instances = n.max(1);
        self
    }

    /// Longest wait for one Redis call before it counts as failed (default 250 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Charge credits exactly, one Redis call per request (default `false`: leases).
    pub fn strict_credits(mut self, strict: bool) -> Self {
        self.strict_credits = strict;
        self
    }

    /// Charge the limits named `name` (a key's and an owner's) exactly, one Redis call
    /// per request.
    pub fn strict_limit(mut self, name: impl Into<String>) -> Self {
        self.strict_limits.insert(name.into());
        self
    }

    /// What credits do while Redis is down (default [`RedisDown::LocalShare`]).
    pub fn credits_when_down(mut self, policy: RedisDown) -> Self {
        self.credits_down = policy;
        self
    }

    /// What limits do while Redis is down (default [`RedisDown::LocalShare`]).
    pub fn limits_when_down(mut self, policy: RedisDown) -> Self {
        self.limits_down = policy;
        self
    }

    /// What the limits named `name` do while Redis is down, instead of
    /// [`limits_when_down`](Self::limits_when_down).
    pub fn limit_when_down(mut self, name: impl Into<String>, policy: RedisDown) -> Self {
        self.limit_down.insert(name.into(), policy);
        self
    }

    /// Most buckets leased at once (default 100 000); past it, a new one is charged
    /// strictly until the sweeper forgets leases idle for a minute.
    pub fn max_leases(mut self, max: usize) -> Self {
        self.max_leases = max;
        self
    }

    /// The engine. Connects lazily: Redis need not be up yet (until it is, the
    /// fallback is in force). Must run in a tokio runtime, which runs the engine's
    /// sweeper and probe; they end when the last clone of the engine is dropped.
    pub fn build(self) -> Result<RedisLimits, RedisLimitsError> {
        let bad_url = |e| RedisLimitsError { why: "the Redis URL is not usable", source: Some(e) };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| RedisLimitsError { why: "build it inside a tokio runtime", source: None })?;
        let client = redis::Client::open(self.url.as_str()).map_err(bad_url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(bad_url)?;
        let engine = Arc::new(Engine {
            conn,
            config: self,
            leases: RwLock::new(HashMap::new()),
            fallback: LocalEngine::default(),
            down: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            stats: Counters::default(),
            full_warned: AtomicBool::new(false),
        });
        runtime.spawn(sweeper(Arc::downgrade(&engine)));
        Ok(RedisLimits { engine })
    }
}

/// A fleet-wide limit engine on Redis: limits and credits shared by every instance,
/// with no Redis round trip on the request path while a lease lasts. Give it to
/// [`ApiKeyLayer::fleet_limits`](crate::ApiKeyLayer::fleet_limits); clones share one
/// engine.
///
/// ```no_run
/// use keygate::{ApiKeyLayer, RedisLimits, StaticVerifier};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// // In a tokio runtime: the engine's background work runs there.
/// let limits = RedisLimits::builder("redis://127.0.0.1:6379").strict_credits(true).build()?;
/// let layer = ApiKeyLayer::new(StaticVerifier::new()).fleet_limits(limits.clone());
/// // ... serve; then, on shutdown, give back what this instance holds:
/// limits.shutdown().await;
/// # Ok(()) }
/// ```
///
/// # How it counts
/// Every limit and every credit count lives in Redis, one hash per key (or owner) and
/// name. An instance takes a **lease** (a number of units) from it with one atomic
/// script and spends the lease locally: the request path makes no Redis round trip
/// while a lease lasts, and a lease running low is topped up in the background. A
/// lease's size follows the rate this instance spends the key's units: what it spends
/// in [`lease_window`](RedisLimitsBuilder::lease_window) (default 100 ms), at most
/// [`max_lease`](RedisLimitsBuilder::max_lease) (default 1 000) beyond the request's own
/// need. A key slower than one request per window takes exactly what each request
/// needs, so its limits are exact. A grant of credits is also at most a
/// 1/(2 × [`expected_instances`](RedisLimitsBuilder::expected_instances)) of what is
/// left (and at least the need), so the last credits are spread thin rather than held
/// by one instance.
///
/// # Bounds
/// With N instances and lease cap M (`max_lease`):
/// - **Credits are never overspent** while Redis answers: units are taken from the
///   count before they are spent. The price is the other way: a request can be refused
///   while another instance holds unspent units; an idle lease goes back within 2
///   sweeps (at most 2 s), all leases go back at [`RedisLimits::shutdown`], and an
///   instance that dies without it loses what it held (at most M plus the request's
///   cost per key).
/// - **A rate limit** admits, over any interval `T`, at most
///   `burst + limit × T / period + N × min(M, burst)` units: units taken from the limit
///   earlier and spent in `T` are the last term (a grant never exceeds what the limit
///   holds, at most `burst`). Idle leases go back as above.
/// - A call that times out may still have been applied by Redis: its units are then
///   counted twice (in Redis and by the fallback), which errs towards refusing.
/// - **Strict** mode ([`strict_credits`](RedisLimitsBuilder::strict_credits),
///   [`strict_limit`](RedisLimitsBuilder::strict_limit)) takes exactly each request's
///   cost with one atomic Redis call on the request path (the round trip, about 0.1 ms
///   on a LAN, is the price): no lease, the bounds above without the M terms and no
///   credits lost with an instance.
///
/// Refills happen in Redis, in the same script: each instance computes the latest
/// refill time (UTC, the same in every instance) and the script applies it once. An
/// operator's new credits (a new `credits_revision` from the key service) restart the
/// count from them; the key service can reconcile what is left back into its store.
///
/// # When Redis is down
/// A Redis call that fails or takes longer than
/// [`timeout`](RedisLimitsBuilder::timeout) (default 250 ms) is decided by the
/// fallback; the third such call in a row switches the engine to it, logs a warning and counts the switch
/// ([`RedisLimitsStats::switched_to_fallback`]); a probe then asks Redis every second
/// and switches back (an info line, [`RedisLimitsStats::switched_back`]), with no
/// restart. Meanwhile leases already held are spent, and what they cannot pay goes by
/// [`RedisDown`], per limit and for credits:
/// - [`RedisDown::LocalShare`] (the default): counted in this process at 1/N of the
///   limit (burst, credits and refill amount alike, at least 1), N being
///   `expected_instances` (default 1). Credits spent so are debited from Redis when it
///   is back.
/// - [`RedisDown::FailClosed`]: refused with 503 `limits_unavailable` and a
///   `Retry-After` of 1 s.
#[derive(Clone)]
pub struct RedisLimits {
    engine: Arc<Engine>,
}

impl std::fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimits").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl RedisLimits {
    /// A builder for Redis at `url` (`redis://host:port/db`, `rediss://` for TLS is not
    /// compiled in).
    pub fn builder(url: impl Into<String>) -> RedisLimitsBuilder {
        RedisLimitsBuilder {
            url: url.into(),
            prefix: schema::DEFAULT_PREFIX.to_owned(),
            lease_window: Duration::from_millis(100),
            max_lease: 1000,
            expected_instances: 1,
            timeout: Duration::from_millis(250),
            strict_credits: false,
            strict_limits: HashSet::new(),
            credits_down: RedisDown::LocalShare,
            limits_down: RedisDown::LocalShare,
            limit_down: HashMap::new(),
            max_leases: 100_000,
        }
    }

    /// The engine's counters.
    pub fn stats(&self) -> RedisLimitsStats {
        let s = &self.engine.stats;
        RedisLimitsStats {
            redis_calls: s.calls.load(Ordering::Relaxed),
            redis_errors: s.errors.load(Ordering::Relaxed),
            units_taken: s.taken.load(Ordering::Relaxed),
            units_returned: s.returned.load(Ordering::Relaxed),
            switched_to_fallback: s.to_fallback.load(Ordering::Relaxed),
            switched_back: s.back.load(Ordering::Relaxed),
            on_fallback: self.engine.down.load(Ordering::Relaxed),
            leases: self.engine.leases.read().unwrap_or_else(|e| e.into_inner()).len() as u64,
        }
    }

    /// Gives every unspent unit this instance holds back to Redis (call it when the
    /// instance stops; what is not given back is lost to credits, and to limits until
    /// their time passes).
    pub async fn shutdown(&self) {
        // Redis may be back before the probe noticed: what is held would be lost for
        // nothing (the loop below stops while the engine is down).
        if self.engine.down.load(Ordering::Acquire) {
            self.engine.probe().await;
        }
        let leases: Vec<_> = {
            let map = self.engine.leases.read().unwrap_or_else(|e| e.into_inner());
            map.iter().map(|(b, l)| (b.clone(), l.clone())).collect()
        };
        for (bucket, lease) in leases {
            // Each call to a Redis that hangs waits the full timeout: once three failed
            // (the engine switched), the rest would only wait too and be lost anyway.
            if self.engine.down.load(Ordering::Acquire) {
                break;
            }
            let (held, origin) = lease.take_all();
            if held > 0 {
                self.engine.give(&bucket, held, &origin, lease.emission_us()).await;
            }
        }
    }

    pub(crate) fn into_engine(self) -> Arc<dyn LimitEngine> {
        Arc::new(self)
    }
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    errors: AtomicU64,
    taken: AtomicU64,
    returned: AtomicU64,
    to_fallback: AtomicU64,
    back: AtomicU64,
}

/// A key's or an owner's limit (`name` set) or credits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Bucket {
    holder: Holder,
    id: Arc<str>,
    name: Option<Arc<str>>,
}

/// What a bucket is charged against: a limit or credits, as the principal states them.
#[derive(Debug, Clone)]
enum Measure {
    Limit(Limit),
    Credits { credits: Credits, origin: Origin },
}

/// One step of a charge, owned, for the path that waits on Redis.
#[derive(Debug, Clone)]
struct OwnedStep {
    bucket: Bucket,
    measure: Measure,
    units: u64,
}

struct Engine {
    conn: ConnectionManager,
    config: RedisLimitsBuilder,
    leases: RwLock<HashMap<Bucket, Arc<Lease>>>,
    fallback: LocalEngine,
    down: AtomicBool,
    /// Failed calls in a row.
    failures: AtomicU64,
    stats: Counters,
    full_warned: AtomicBool,
}

/// How long an untouched credits count lives in Redis.
const CREDITS_EXPIRY_S: u64 = 40 * 24 * 3600;

/// Failed Redis calls in a row that switch the engine to its fallback.
const FAILURES_TO_SWITCH: u64 = 3;

/// A Redis call that did not answer in time or failed.
struct Unreachable;

impl Engine {
    fn key(&self, bucket: &Bucket) -> String {
        match &bucket.name {
            Some(name) => schema::limit_key(&self.config.prefix, bucket.holder, &bucket.id, name),
            None => schema::credits_key(&self.config.prefix, bucket.holder, &bucket.id),
        }
    }

    fn strict(&self, step: &OwnedStep) -> bool {
        match &step.bucket.name {
            Some(name) => self.config.strict_limits.contains(&**name),
            None => self.config.strict_credits,
        }
    }

    fn lease(&self, bucket: &Bucket) -> Option<Arc<Lease>> {
        self.leases.read().unwrap_or_else(|e| e.into_inner()).get(bucket).cloned()
    }

    /// The bucket's lease, created if there is room.
    fn lease_or_new(&self, bucket: &Bucket) -> Option<Arc<Lease>> {
        if let Some(l) = self.lease(bucket) {
            return Some(l);
        }
        let mut map = self.leases.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= self.config.max_leases && !map.contains_key(bucket) {
            if !self.full_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max_leases = self.config.max_leases,
                    "keygate: Redis limit leases full, charging new keys strictly until idle ones are swept"
                );
            }
            return None;
        }
        Some(map.entry(bucket.clone()).or_insert_with(|| Arc::new(Lease::new())).clone())
    }

    /// Runs a script with the engine's timeout; a failure switches to the fallback.
    async fn call<T: redis::FromRedisValue>(&self, inv: redis::ScriptInvocation<'_>) -> Result<T, Unreachable> {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let mut conn = self.conn.clone();
        let result = tokio::time::timeout(self.config.timeout, inv.invoke_async::<T>(&mut conn)).await;
        match result {
            Ok(Ok(v)) => {
                self.failures.store(0, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.switch_down(&e.to_string());
                Err(Unreachable)
            }
            Err(_) => {
                self.switch_down("no answer within the timeout");
                Err(Unreachable)
            }
        }
    }

    /// A failed call: this request goes by the fallback, and the third failure in a
    /// row switches the engine to it (one slow answer under load is not an outage).
    fn switch_down(&self, why: &str) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if self.failures.fetch_add(1, Ordering::AcqRel) + 1 < FAILURES_TO_SWITCH {
            return;
        }
        if !self.down.swap(true, Ordering::AcqRel) {
            self.stats.to_fallback.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = why, "keygate: Redis unreachable, limits switched to their fallback");
        }
    }

    /// Takes up to `want` units, at least `lack`: the grant, what Redis has left and
    /// (for credits) the origin of the units; or the refusal.
    async fn take(&self, step: &OwnedStep, want: u64, lack: u64) -> Result<Result<Grant, Refused>, Unreachable> {
        let key = self.key(&step.bucket);
        match &step.measure {
            Measure::Credits { credits, origin } => {
                let refill = credits.refill.map_or(-1, |r| r.amount() as i64);
                let expiry = CREDITS_EXPIRY_S;
                let mut inv = scripts::TAKE_CREDITS.key(&key);
                inv.arg(want)
                    .arg(lack)
                    .arg(origin.tag())
                    .arg(credits.remaining)
                    .arg(refill)
                    .arg(origin.refilled_at)
                    .arg(2 * self.config.expected_instances)
                    .arg(expiry);
                let (granted, left, at): (u64, u64, i64) = self.call(inv).await?;
                self.stats.taken.fetch_add(granted, Ordering::Relaxed);
                let origin = Origin { refilled_at: at, ..*origin };
                if granted < lack {
                    let wait = credits.refill.map(|r| until(r.next_after(OffsetDateTime::now_utc())));
                    return Ok(Err(Refused::Credits(wait)));
                }
                Ok(Ok((granted, left, Some(origin))))
            }
            Measure::Limit(l) => {
                let t = emission_us(l);
                let mut inv = scripts::TAKE_LIMIT.key(&key);
                inv.arg(want).arg(lack).arg(t).arg(l.effective_burst());
                let (granted, left, wait_us): (u64, u64, u64) = self.call(inv).await?;
                self.stats.taken.fetch_add(granted, Ordering::Relaxed);
                if granted < lack {
                    let reset = Duration::from_micros(wait_us.max(1));
                    return Ok(Err(Refused::Limit(limit_state(l, 0, reset))));
                }
                Ok(Ok((granted, left, None)))
            }
        }
    }

    /// Gives `units` back to Redis (best effort: a failure only loses them). A
    /// limit's units need its emission interval; credits' their origin.
    async fn give(&self, bucket: &Bucket, units: u64, origin: &Origin, emission_us: u64) {
        let key = self.key(bucket);
        let given = match &bucket.name {
            None => {
                let mut inv = scripts::GIVE_CREDITS.key(&key);
                inv.arg(units).arg(origin.tag()).arg(origin.refilled_at);
                self.call::<i64>(inv).await
            }
            Some(_) => {
                let mut inv = scripts::GIVE_LIMIT.key(&key);
                inv.arg(units).arg(emission_us.max(1));
                self.call::<i64>(inv).await
            }
        };
        if matches!(given, Ok(1)) {
            self.stats.returned.fetch_add(units, Ordering::Relaxed);
        }
    }

    /// Charges one step, waiting on Redis if its lease cannot pay.
    async fn charge_step(self: &Arc<Self>, step: &OwnedStep) -> Result<Option<LimitState>, Refused> {
        let origin = match &step.measure {
            Measure::Credits { origin, .. } => Some(origin),
            Measure::Limit(_) => None,
        };
        let lease = self.lease_or_new(&step.bucket);
        let lease = match lease {
            Some(lease) if !self.strict(step) => lease,
            other => return self.charge_strict(step, other.as_ref()).await,
        };
        if let Some(done) = local_result(step, lease.try_spend(step.units, origin)) {
            return done;
        }
        let _one = lease.fetch.lock().await;
        // Another request's fetch may have brought enough.
        if let Some(done) = local_result(step, lease.try_spend(step.units, origin)) {
            return done;
        }
        if self.down.load(Ordering::Acquire) {
            return self.fall_back(step, Some(&lease));
        }
        let (want, lack) = lease.want(step.units, self.config.lease_window, self.config.max_lease);
        match self.take(step, want, lack).await {
            Err(Unreachable) => self.fall_back(step, Some(&lease)),
            Ok(Err(refused)) => {
                lease.refused(self.refusal_wait(&refused), 0, lack);
                Err(refused)
            }
            Ok(Ok((granted, left, origin))) => {
                lease.add(granted, left, origin, emission(step));
                match lease.try_spend(step.units, origin.as_ref()) {
                    Local::Spent { left, .. } => Ok(spent_state(step, left)),
                    // Granted at least the lack, under the origin just set: cannot miss.
                    _ => Err(Refused::Unavailable(Duration::from_secs(1))),
                }
            }
        }
    }

    /// One atomic Redis call for exactly the step's units. `lease` (when there was room
    /// for one) holds nothing, only the last refusal: an exhausted key hammering a
    /// strict limit costs Redis one call per wait, not one per request.
    async fn charge_strict(&self, step: &OwnedStep, lease: Option<&Arc<Lease>>) -> Result<Option<LimitState>, Refused> {
        if let Some(done) = lease.and_then(|l| local_result(step, l.try_spend(step.units, None))) {
            return done;
        }
        if self.down.load(Ordering::Acquire) {
            return self.fall_back(step, None);
        }
        match self.take(step, step.units, step.units).await {
            Err(Unreachable) => self.fall_back(step, None),
            Ok(Err(refused)) => {
                if let Some(lease) = lease {
                    lease.refused(self.refusal_wait(&refused), 0, step.units);
                }
                Err(refused)
            }
            Ok(Ok((_, left, _))) => Ok(spent_state(step, left)),
        }
    }

    /// How long a refusal is repeated here without asking Redis again: a limit's until
    /// its next unit; credits (which come back with a refill, an operator or a returned
    /// lease) one lease window.
    fn refusal_wait(&self, refused: &Refused) -> Duration {
        match refused {
            Refused::Limit(s) => s.reset,
            Refused::Credits(_) => self.config.lease_window,
            Refused::Unavailable(d) => *d,
        }
    }

    /// The step under the Redis-down policy.
    fn fall_back(&self, step: &OwnedStep, lease: Option<&Arc<Lease>>) -> Result<Option<LimitState>, Refused> {
        let n = self.config.expected_instances.max(1);
        let policy = match &step.bucket.name {
            Some(name) => self.config.limit_down.get(&**name).copied().unwrap_or(self.config.limits_down),
            None => self.config.credits_down,
        };
        if policy == RedisDown::FailClosed {
            return Err(Refused::Unavailable(Duration::from_secs(1)));
        }
        let p = Principal::builder(&*step.bucket.id).owner(&*step.bucket.id).build();
        let now = OffsetDateTime::now_utc();
        match &step.measure {
            Measure::Limit(l) => {
                let share = Limit {
                    name: l.name.clone(),
                    limit: (l.limit / n).max(1),
                    period_s: l.period_s,
                    burst: Some((l.effective_burst() / n).max(1)),
                };
                let s = match step.bucket.holder {
                    Holder::Key => Step::KeyLimit(&share, step.units),
                    Holder::Owner => Step::OwnerLimit(&share, step.units),
                };
                self.fallback.apply(&p, &s, now)
            }
            Measure::Credits { credits, origin } => {
                let share =
                    Credits { remaining: credits.remaining / n, refill: credits.refill.map(|r| scale_refill(r, n)) };
                let s = match step.bucket.holder {
                    Holder::Key => Step::KeyCredits(&share, step.units),
                    Holder::Owner => Step::OwnerCredits(&share, step.units),
                };
                let r = self.fallback.apply(&p, &s, now);
                if r.is_ok() {
                    if let Some(lease) = lease {
                        lease.owe(step.units, *origin);
                    }
                }
                r
            }
        }
    }

    /// Gives a step's charge back: to its lease, or to Redis for a strict one.
    fn refund_step(self: &Arc<Self>, step: OwnedStep) {
        if !self.strict(&step) {
            if let Some(lease) = self.lease(&step.bucket) {
                lease.give_back(step.units);
                return;
            }
        }
        let engine = self.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let origin = match &step.measure {
                    Measure::Credits { origin, .. } => *origin,
                    Measure::Limit(_) => Origin::default(),
                };
                engine.give(&step.bucket, step.units, &origin, emission(&step)).await;
            });
        }
    }

    /// Tops a lease running low up in the background, so no request waits for it.
    /// The caller claimed the lease's top-up; it is released when done.
    fn top_up(self: &Arc<Self>, step: &OwnedStep, lease: &Arc<Lease>) {
        let rt = tokio::runtime::Handle::try_current();
        let (Ok(rt), false) = (rt, self.down.load(Ordering::Relaxed)) else {
            lease.top_up_done();
            return;
        };
        let (engine, lease, step) = (self.clone(), lease.clone(), step.clone());
        rt.spawn(async move {
            // Released however the task ends (a request fetching, Redis failing).
            struct Done(Arc<Lease>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.top_up_done();
                }
            }
            let _done = Done(lease.clone());
            let Ok(_one) = lease.fetch.try_lock() else { return };
            let (want, _) = lease.want(0, engine.config.lease_window, engine.config.max_lease);
            if want == 0 {
                return;
            }
            if let Ok(Ok((granted, left, origin))) = engine.take(&step, want, 0).await {
                lease.add(granted, left, origin, emission(&step));
            }
        });
    }
}

/// The answer a local attempt gives, or `None` to ask Redis.
fn local_result(step: &OwnedStep, local: Local) -> Option<Result<Option<LimitState>, Refused>> {
    match local {
        Local::Spent { left, .. } => Some(Ok(spent_state(step, left))),
        Local::Refused { wait } => Some(Err(match &step.measure {
            Measure::Limit(l) => Refused::Limit(limit_state(l, 0, wait)),
            Measure::Credits { credits, .. } => {
                Refused::Credits(credits.refill.map(|r| until(r.next_after(OffsetDateTime::now_utc()))))
            }
        })),
        Local::Fetch => None,
    }
}

fn spent_state(step: &OwnedStep, left: u64) -> Option<LimitState> {
    match &step.measure {
        Measure::Limit(l) => {
            let reset = Duration::from_micros(emission_us(l));
            Some(limit_state(l, left.min(l.effective_burst()), reset))
        }
        Measure::Credits { .. } => None,
    }
}

fn limit_state(l: &Limit, remaining: u64, reset: Duration) -> LimitState {
    LimitState {
        name: Some(l.name.clone()),
        limit: RateLimit { limit: l.limit, period_s: l.period_s },
        remaining,
        reset,
    }
}

/// What a grant brings: units, what Redis has left, the origin (credits).
type Grant = (u64, u64, Option<Origin>);

/// The emission interval of a step's limit (0 for credits).
fn emission(step: &OwnedStep) -> u64 {
    match &step.measure {
        Measure::Limit(l) => emission_us(l),
        Measure::Credits { .. } => 0,
    }
}

/// The GCRA's emission interval in whole microseconds (at least 1).
fn emission_us(l: &Limit) -> u64 {
    (l.period_s.saturating_mul(1_000_000) / l.limit.max(1)).max(1)
}

fn until(t: OffsetDateTime) -> Duration {
    (t - OffsetDateTime::now_utc()).try_into().unwrap_or(Duration::ZERO)
}

fn scale_refill(r: Refill, n: u64) -> Refill {
    match r {
        Refill::Every { interval_s, amount } => Refill::Every { interval_s, amount: amount / n },
        Refill::Daily { amount } => Refill::Daily { amount: amount / n },
        Refill::Monthly { day, amount } => Refill::Monthly { day, amount: amount / n },
    }
}

/// The latest refill time at or before `now`, as a Unix second (-1: no refill).
fn refilled_at(credits: &Credits, now: OffsetDateTime) -> i64 {
    match credits.refill {
        None => -1,
        Some(r) => {
            // `next_after` of a moment just before the next one is the next one; the
            // latest at or before `now` is found one step back from it.
            let next = r.next_after(now);
            last_before(r, next, now).unix_timestamp()
        }
    }
}

/// The refill time before `next` (which is the first after `now`).
fn last_before(r: Refill, next: OffsetDateTime, now: OffsetDateTime) -> OffsetDateTime {
    match r {
        Refill::Every { interval_s, .. } => next - Duration::from_secs(interval_s.max(1)),
        Refill::Daily { .. } => next - Duration::from_secs(86_400),
        Refill::Monthly { .. } => {
            // A month is 28 to 31 days: the refill time after a moment 32 days before
            // `now` is at most one month before `next`, and it is the one.
            let mut t = r.next_after(now - Duration::from_secs(32 * 86_400));
            loop {
                let after = r.next_after(t);
                if after > now {
                    return t;
                }
                t = after;
            }
        }
    }
}

/// A step's bucket, units and (credits) the count it draws from; `now` is read once,
/// and only for credits with a refill.
fn locate(
    p: &Principal,
    quota: &Quota,
    step: &Step<'_>,
    now: &mut Option<OffsetDateTime>,
) -> (Bucket, u64, Option<Origin>) {
    let limit = |holder, id: &Arc<str>, l: &Limit| Bucket { holder, id: id.clone(), name: Some(l.name.clone()) };
    let mut credits = |holder, id: &Arc<str>, c: &Credits, revision: Option<u64>| {
        let refilled_at = match c.refill {
            None => -1,
            Some(_) => refilled_at(c, *now.get_or_insert_with(OffsetDateTime::now_utc)),
        };
        let origin = Origin { revision, remaining: c.remaining, refill: c.refill, refilled_at };
        (Bucket { holder, id: id.clone(), name: None }, origin)
    };
    match *step {
        Step::KeyLimit(l, u) => (limit(Holder::Key, p.key_id_arc(), l), u, None),
        Step::OwnerLimit(l, u) => (limit(Holder::Owner, p.owner_arc(), l), u, None),
        Step::KeyCredits(c, u) => {
            let (b, o) = credits(Holder::Key, p.key_id_arc(), c, quota.credits_revision);
            (b, u, Some(o))
        }
        Step::OwnerCredits(c, u) => {
            let (b, o) = credits(Holder::Owner, p.owner_arc(), c, quota.owner_credits_revision);
            (b, u, Some(o))
        }
    }
}

/// The steps of a charge, owned, for the path that waits on Redis.
fn owned_steps(p: &Principal, quota: &Quota, cost: &Cost) -> Vec<OwnedStep> {
    let mut now = None;
    steps(quota, cost)
        .map(|step| {
            let (bucket, units, origin) = locate(p, quota, &step, &mut now);
            let measure = match (step, origin) {
                (Step::KeyLimit(l, _) | Step::OwnerLimit(l, _), _) => Measure::Limit(l.clone()),
                (Step::KeyCredits(c, _) | Step::OwnerCredits(c, _), origin) => {
                    Measure::Credits { credits: c.clone(), origin: origin.unwrap_or_default() }
                }
            };
            OwnedStep { bucket, measure, units }
        })
        .collect()
}

impl LimitEngine for RedisLimits {
    fn charge(&self, p: &Principal, quota: &Quota, cost: &Cost) -> Charge {
        // Every step paid from its lease: no future, no Redis, no allocation.
        if let Some(done) = self.engine.charge_now(p, quota, cost) {
            return Charge::Done(done);
        }
        let (engine, steps) = (self.engine.clone(), owned_steps(p, quota, cost));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Charge::Wait(Box::pin(async move { engine.charge_all(steps).await }));
        };
        // The charge runs on its own: a request dropped while a Redis call is in flight
        // (the client went away) would drop the call's answer, and with it the units
        // Redis took. Finished, a charge nobody waits for any more is given back.
        let (tx, rx) = tokio::sync::oneshot::channel();
        rt.spawn(async move {
            let result = engine.clone().charge_all(steps.clone()).await;
            if let Err(Ok(_)) = tx.send(result) {
                for step in steps {
                    engine.refund_step(step);
                }
            }
        });
        Charge::Wait(Box::pin(async move { rx.await.unwrap_or(Err(Refused::Unavailable(Duration::from_secs(1)))) }))
    }

    fn refund(&self, p: &Principal, quota: &Quota, cost: &Cost) {
        for step in owned_steps(p, quota, cost) {
            self.engine.refund_step(step);
        }
    }
}

impl Engine {
    /// The charge from leases alone, or `None` when a step needs Redis (nothing is then
    /// charged).
    fn charge_now(
        self: &Arc<Self>,
        p: &Principal,
        quota: &Quota,
        cost: &Cost,
    ) -> Option<Result<Option<LimitState>, Refused>> {
        let mut binding: Option<LimitState> = None;
        let mut now = None;
        // Gives back the first `n` steps, spent from their leases (no allocation: the
        // steps are found again).
        let undo = |n: usize| {
            let mut now = None;
            for step in steps(quota, cost).take(n) {
                let (bucket, units, _) = locate(p, quota, &step, &mut now);
                if let Some(lease) = self.lease(&bucket) {
                    lease.give_back(units);
                }
            }
        };
        for (i, step) in steps(quota, cost).enumerate() {
            let (bucket, units, origin) = locate(p, quota, &step, &mut now);
            let strict = match &bucket.name {
                Some(name) => self.config.strict_limits.contains(&**name),
                None => self.config.strict_credits,
            };
            let Some(lease) = (!strict).then(|| self.lease(&bucket)).flatten() else {
                undo(i);
                return None;
            };
            match lease.try_spend(units, origin.as_ref()) {
                Local::Spent { left, low } => {
                    if let (Step::KeyLimit(l, _) | Step::OwnerLimit(l, _), state) = (&step, left) {
                        keep_binding(
                            &mut binding,
                            Some(limit_state(l, state.min(l.effective_burst()), Duration::from_micros(emission_us(l)))),
                        );
                    }
                    // One top-up per lease at a time: a request that finds one on its
                    // way costs one atomic swap, no allocation and no task.
                    if low && lease.claim_top_up() {
                        match owned_steps(p, quota, cost).into_iter().find(|s| s.bucket == bucket) {
                            Some(owned) => self.top_up(&owned, &lease),
                            None => lease.top_up_done(),
                        }
                    }
                }
                Local::Refused { wait } => {
                    undo(i);
                    let refused = match step {
                        Step::KeyLimit(l, _) | Step::OwnerLimit(l, _) => Refused::Limit(limit_state(l, 0, wait)),
                        Step::KeyCredits(c, _) | Step::OwnerCredits(c, _) => {
                            Refused::Credits(c.refill.map(|r| until(r.next_after(OffsetDateTime::now_utc()))))
                        }
                    };
                    return Some(Err(refused));
                }
                Local::Fetch => {
                    undo(i);
                    return None;
                }
            }
        }
        Some(Ok(binding))
    }

    async fn charge_all(self: Arc<Self>, steps: Vec<OwnedStep>) -> Result<Option<LimitState>, Refused> {
        let mut binding: Option<LimitState> = None;
        // Whatever was charged is given back unless the whole charge succeeds, also when
        // this future is dropped half way (the client went away).
        let mut undo = Undo { engine: self.clone(), steps: Vec::new() };
        for step in steps {
            let state = self.charge_step(&step).await?;
            keep_binding(&mut binding, state);
            undo.steps.push(step);
        }
        undo.steps.clear();
        Ok(binding)
    }
}

/// Gives back the steps it holds when dropped.
struct Undo {
    engine: Arc<Engine>,
    steps: Vec<OwnedStep>,
}

impl Drop for Undo {
    fn drop(&mut self) {
        for step in self.steps.drain(..) {
            self.engine.refund_step(step);
        }
    }
}

fn keep_binding(binding: &mut Option<LimitState>, state: Option<LimitState>) {
    if let Some(state) = state {
        if binding.as_ref().is_none_or(|b| state.remaining < b.remaining) {
            *binding = Some(state);
        }
    }
}

/// Every second: idle leases go back to Redis, long-idle ones are forgotten, and while
/// the fallback is in force, Redis is probed and, once back, what was spent meanwhile
/// is debited.
async fn sweeper(engine: Weak<Engine>) {
    // Connect now rather than on the first request.
    if let Some(engine) = engine.upgrade() {
        let mut conn = engine.conn.clone();
        let _ =
            tokio::time::timeout(engine.config.timeout * 4, redis::cmd("PING").query_async::<String>(&mut conn)).await;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(engine) = engine.upgrade() else { return };
        if engine.down.load(Ordering::Acquire) {
            engine.probe().await;
            continue;
        }
        let leases: Vec<_> = {
            let map = engine.leases.read().unwrap_or_else(|e| e.into_inner());
            map.iter().map(|(b, l)| (b.clone(), l.clone())).collect()
        };
        let mut forget = Vec::new();
        for (bucket, lease) in leases {
            // As at shutdown: a hanging Redis would hold this sweep (and the probe that
            // notices Redis coming back) one timeout per lease; what is held stays.
            if engine.down.load(Ordering::Acquire) {
                break;
            }
            let (owed, origin) = lease.take_owed();
            // A debit that fails is owed still: dropped, what was spent while Redis was
            // down (or on this sweep's first failed call) would never be counted.
            if owed > 0 && bucket.name.is_none() && !engine.debit(&bucket, owed, &origin).await {
                lease.owe(owed, origin);
            }
            let (returned, idle) = lease.sweep(60);
            if let Some((units, origin)) = returned {
                engine.give(&bucket, units, &origin, lease.emission_us()).await;
            }
            if idle {
                forget.push(bucket);
            }
        }
        if !forget.is_empty() {
            let mut map = engine.leases.write().unwrap_or_else(|e| e.into_inner());
            for bucket in forget {
                // The sweep awaited Redis since it found this lease idle: a request may
                // have taken it (a clone) or filled it meanwhile, and a lease dropped
                // then would lose what it holds.
                if map.get(&bucket).is_some_and(|l| Arc::strong_count(l) == 1 && l.is_empty()) {
                    map.remove(&bucket);
                }
            }
            engine.full_warned.store(false, Ordering::Relaxed);
        }
    }
}

impl Engine {
    async fn probe(&self) {
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        let answer = tokio::time::timeout(self.config.timeout, ping.query_async::<String>(&mut conn)).await;
        if matches!(answer, Ok(Ok(_))) && self.down.swap(false, Ordering::AcqRel) {
            self.failures.store(0, Ordering::Relaxed);
            self.stats.back.fetch_add(1, Ordering::Relaxed);
            tracing::info!("keygate: Redis reachable again, limits counted fleet-wide");
        }
    }

    /// Debits credits spent while Redis was down (never below zero); whether Redis
    /// answered.
    async fn debit(&self, bucket: &Bucket, units: u64, origin: &Origin) -> bool {
        let mut inv = scripts::DEBIT_CREDITS.key(self.key(bucket));
        let refill = origin.refill.map_or(-1, |r| r.amount() as i64);
        inv.arg(units)
            .arg(origin.tag())
            .arg(origin.remaining)
            .arg(refill)
            .arg(origin.refilled_at)
            .arg(CREDITS_EXPIRY_S);
        self.call::<i64>(inv).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn at(r: Refill, now: OffsetDateTime) -> OffsetDateTime {
        let c = Credits { remaining: 1, refill: Some(r) };
        OffsetDateTime::from_unix_timestamp(refilled_at(&c, now)).unwrap()
    }

    #[test]
    fn the_latest_refill_is_at_or_before_now_and_the_next_is_after() {
        let monthly = Refill::Monthly { day: 31, amount: 1 };
        // Day 31 falls on a month's last day; exactly at a refill time, that refill.
        assert_eq!(at(monthly, datetime!(2026-03-31 00:00 UTC)), datetime!(2026-03-31 00:00 UTC));
        assert_eq!(at(monthly, datetime!(2026-03-30 23:59:59 UTC)), datetime!(2026-02-28 00:00 UTC));
        assert_eq!(at(monthly, datetime!(2026-04-15 12:00 UTC)), datetime!(2026-03-31 00:00 UTC));
        assert_eq!(at(monthly, datetime!(2024-03-01 00:00 UTC)), datetime!(2024-02-29 00:00 UTC));
        assert_eq!(at(monthly, datetime!(2027-01-01 00:00 UTC)), datetime!(2026-12-31 00:00 UTC));
        let every = Refill::Every { interval_s: 7, amount: 1 };
        for s in [0_i64, 1, 6, 7, 8, 1_764_633_601] {
            let now = OffsetDateTime::from_unix_timestamp(s).unwrap();
            let last = at(every, now);
            assert!(last <= now && every.next_after(now) > now && every.next_after(last) > now, "at {s}");
        }
        let daily = Refill::Daily { amount: 1 };
        assert_eq!(at(daily, datetime!(2026-12-01 00:00 UTC)), datetime!(2026-12-01 00:00 UTC));
        assert_eq!(at(daily, datetime!(2026-12-01 23:59:59 UTC)), datetime!(2026-12-01 00:00 UTC));
    }

    #[test]
    fn a_huge_limit_keeps_a_whole_microsecond_interval() {
        let l = Limit::new("requests", 1_000_000_000_000_000, 1);
        assert_eq!(emission_us(&l), 1, "never 0, which would divide by zero in the script");
        let l = Limit::new("requests", 1, 31 * 86_400);
        assert_eq!(emission_us(&l), 31 * 86_400 * 1_000_000);
    }
}
