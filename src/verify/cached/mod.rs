//! [`CachedVerifier`]: a moka cache in front of any [`Verifier`].
//!
//! ```
//! use std::time::Duration;
//! use keygate::{ApiKey, CachedVerifier, Principal, StaticVerifier, Verdict, Verifier};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let key = ApiKey::generate("kg").unwrap();
//! let keys = StaticVerifier::new().with_key(&key, Principal::builder("key_1").build());
//! let verifier = CachedVerifier::builder(keys).positive_ttl(Duration::from_secs(10)).build();
//! assert!(matches!(verifier.verify(&key).await, Ok(Verdict::Valid(_))));
//! assert!(matches!(verifier.verify_now(&key), Some(Ok(Verdict::Valid(_)))));
//! assert_eq!((verifier.stats().misses, verifier.stats().hits), (1, 1));
//! assert_eq!(verifier.invalidate_key_id("key_1").await, 1);
//! assert!(verifier.verify_now(&key).is_none());
//! # });
//! ```
//!
//! Defaults: [`DEFAULT_CACHE_CAPACITY`] (100 000) valid and [`DEFAULT_NEGATIVE_CAPACITY`]
//! (10 000) invalid verdicts; [`DEFAULT_POSITIVE_TTL`] 30 s, never past the key's
//! `expires_at`; [`DEFAULT_NEGATIVE_TTL`] 5 s; [`DEFAULT_STALE_IF_ERROR`] 5 min;
//! [`DEFAULT_STALE_RETRY_INTERVAL`] 1 s; [`FailurePolicy::FailClosed`];
//! [`DEFAULT_REFRESH_AHEAD`] 10 s, [`DEFAULT_REFRESH_BATCH`] 100,
//! [`DEFAULT_REVALIDATION_RATE`] 1 000 a second, nothing unconfirmed served after a reset.
//!
//! # Why invalidation holds under concurrency
//!
//! Removal by key id is a moka predicate (`invalidate_entries_if`), not an index kept
//! beside the cache: moka applies it to every entry stored before it by timestamp, so
//! no verdict can land between two structures and escape it. (A hand-kept index lost
//! verdicts stored while `invalidate_all` cleared moka and then the index, and those
//! keys outlived their revocation until the TTL.) The cost: until moka's housekeeping
//! has swept the cache, reads also test the pending predicates.
//!
//! moka can only remove what it holds, and an answer the wrapped verifier computed
//! before a revocation may arrive after it. So every invalidation first bumps one
//! epoch: an answer is cached only if the epoch did not move while it was fetched
//! (checked again after the insert, so an invalidation overlapping the insert still
//! wins), and a lookup never joins a call started in an older epoch, whose answer may
//! be the revoked one. That rule, and refreshing a stale entry moka still holds, are
//! why coalescing is a small map of calls in flight here rather than moka's
//! `try_get_with`, which joins any call for an absent key whatever happened since.
//!
//! In front of moka, each thread keeps copies of up to 128 hot fresh valid verdicts
//! ([`CachedVerifierBuilder::thread_copies`]): moka's `get` costs an epoch pin, a clock
//! read and a logged read, and skipping it was worth 4 to 8 % of the loopback
//! benchmark's production form. A copy is served only while fresh, only by the cache it
//! came from, and only until the next removal of any valid verdict: a second counter,
//! the copies generation, is read before the moka lookup a copy is taken from and
//! bumped after every removal, so a copy taken across one is stale when made.
//!
//! What `invalidate_key_id` returns (how many valid verdicts it removed) comes from a
//! second small moka cache that remembers each key id's digests: moka cannot say how
//! many entries a predicate covers, and walking the cache to count them takes
//! milliseconds at 100 000 entries. Removal never depends on it; a race can only make
//! that count off by one.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

// The sync cache: its `get` is a plain call (no future to build and poll), and
// nothing here ever waits inside the cache.
use moka::sync::Cache;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use self::refresh::{Refresh, RefreshConfig};
use super::budget::{Budgets, MissBudget};
use super::circuit::{Admit, Circuit, CircuitBreaker};
use super::{Reason, Verdict, Verifier, VerifyError};
use crate::key::{ApiKey, DigestHash, KeyDigest};
use crate::principal::Principal;

/// Default number of valid verdicts kept: 100 000.
pub const DEFAULT_CACHE_CAPACITY: u64 = 100_000;
/// Default number of invalid verdicts kept: 10 000.
pub const DEFAULT_NEGATIVE_CAPACITY: u64 = 10_000;
/// Default time a valid verdict is served without asking again: 30 s.
pub const DEFAULT_POSITIVE_TTL: Duration = Duration::from_secs(30);
/// Default time an invalid verdict is served without asking again: 5 s.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Default stale-if-error window after the positive TTL: 5 min.
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(5 * 60);
/// Default pause between refresh attempts of one stale entry while the verifier fails: 1 s.
pub const DEFAULT_STALE_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Default time before a valid verdict goes stale from which a hit on it starts its
/// background refresh: 10 s.
pub const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_secs(10);
/// Default number of digests in one background refresh call: 100.
pub const DEFAULT_REFRESH_BATCH: usize = 100;
/// Default pace of revalidation after a `reset`: 1 000 verdicts a second.
pub const DEFAULT_REVALIDATION_RATE: u32 = 1_000;

mod refresh;

/// Durations are capped here so that `Instant + duration` can never overflow.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a [`CachedVerifier`] answers when the wrapped verifier fails and no stale
/// verdict can be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Return the [`VerifyError`]: the layer answers 503 (gRPC `UNAVAILABLE`). The default.
    #[default]
    FailClosed,
    /// Let the request through as [`Principal::fail_open()`]: anonymous, no scopes, no
    /// roles, flagged with [`Principal::is_fail_open`]. Routes that require any scope or
    /// role still answer 403; routes without a requirement are open to anyone while the
    /// key service is down. Logged at `warn` when the verifier is built and on every use.
    FailOpen,
}

/// Counters of a [`CachedVerifier`], read with [`CachedVerifier::stats`].
///
/// The same numbers go to the [`metrics`] facade as `keygate_cache_hits_total`,
/// `keygate_cache_misses_total`, `keygate_cache_stale_served_total`,
/// `keygate_cache_negative_hits_total`, `keygate_cache_remote_errors_total`,
/// `keygate_cache_coalesced_waits_total`, `keygate_cache_fail_open_total`,
/// `keygate_cache_invalidations_total`, `keygate_cache_circuit_rejections_total`,
/// `keygate_cache_circuit_opened_total`, `keygate_cache_throttled_total`,
/// `keygate_cache_refreshed_ahead_total`, `keygate_cache_revalidated_total` and
/// `keygate_cache_refresh_batches_total`, labelled `cache` with the builder's
/// [`name`](CachedVerifierBuilder::name) when one is set. The handles are registered
/// when the verifier is built: install the metrics recorder before that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Fresh valid verdicts served from the cache.
    pub hits: u64,
    /// Lookups that had to ask the wrapped verifier (nothing cached, or only a stale entry).
    pub misses: u64,
    /// Valid verdicts served past their TTL because the wrapped verifier failed.
    pub stale_served: u64,
    /// Invalid verdicts served from the negative cache.
    pub negative_hits: u64,
    /// Calls to the wrapped verifier that failed.
    pub remote_errors: u64,
    /// Lookups that waited for another caller's call to the wrapped verifier instead of
    /// making their own.
    pub coalesced_waits: u64,
    /// Requests let through by [`FailurePolicy::FailOpen`].
    pub fail_open: u64,
    /// Calls to [`CachedVerifier::invalidate_key_id`] and [`CachedVerifier::invalidate_all`].
    pub invalidations: u64,
    /// Lookups answered without calling the wrapped verifier because the circuit was
    /// open (stale verdicts served, or [`VerifyError::CircuitOpen`]).
    pub circuit_rejections: u64,
    /// Times the circuit opened.
    pub circuit_opened: u64,
    /// Lookups of uncached keys refused by the [`MissBudget`].
    pub throttled: u64,
    /// Hot valid verdicts refreshed in the background before they went stale.
    pub refreshed_ahead: u64,
    /// Verdicts confirmed (or replaced) in the background after a `reset`.
    pub revalidated: u64,
    /// Batch calls to the wrapped verifier ([`Verifier::verify_digests`]) for either.
    pub refresh_batches: u64,
}

/// One counter: exact here for [`CacheStats`], and a `metrics` handle registered once.
struct Count {
    n: AtomicU64,
    metric: metrics::Counter,
}

impl Count {
    fn new(metric: &'static str, cache: Option<&str>) -> Self {
        let metric = match cache {
            Some(name) => metrics::counter!(metric, "cache" => name.to_owned()),
            None => metrics::counter!(metric),
        };
        Self { n: AtomicU64::new(0), metric }
    }

    fn add(&self) {
        self.add_n(1);
    }

    fn add_n(&self, n: u64) {
        self.n.fetch_add(n, Ordering::Relaxed);
        self.metric.increment(n);
    }

    fn get(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }
}

struct Counters {
    hits: Count,
    misses: Count,
    stale_served: Count,
    negative_hits: Count,
    remote_errors: Count,
    coalesced_waits: Count,
    fail_open: Count,
    invalidations: Count,
    circuit_rejections: Count,
    throttled: Count,
    refreshed_ahead: Count,
    revalidated: Count,
    refresh_batches: Count,
}

impl Counters {
    fn new(cache: Option<&str>) -> Self {
        Self {
            hits: Count::new("keygate_cache_hits_total", cache),
            misses: Count::new("keygate_cache_misses_total", cache),
            stale_served: Count::new("keygate_cache_stale_served_total", cache),
            negative_hits: Count::new("keygate_cache_negative_hits_total", cache),
            remote_errors: Count::new("keygate_cache_remote_errors_total", cache),
            coalesced_waits: Count::new("keygate_cache_coalesced_waits_total", cache),
            fail_open: Count::new("keygate_cache_fail_open_total", cache),
            invalidations: Count::new("keygate_cache_invalidations_total", cache),
            circuit_rejections: Count::new("keygate_cache_circuit_rejections_total", cache),
            throttled: Count::new("keygate_cache_throttled_total", cache),
            refreshed_ahead: Count::new("keygate_cache_refreshed_ahead_total", cache),
            revalidated: Count::new("keygate_cache_revalidated_total", cache),
            refresh_batches: Count::new("keygate_cache_refresh_batches_total", cache),
        }
    }
}

/// A verifier with a cache in front: a verified key costs no call to the wrapped
/// verifier until its TTL ends, and the wrapped verifier is never asked twice at once
/// about the same key.
///
/// # What is cached, and for how long
///
/// - **Cache keys** are [`KeyDigest`]s (SHA-256 of the key), never the key.
/// - **Valid verdicts** are fresh for the positive TTL (default 30 s), never beyond the
///   principal's own `expires_at`. At most `max_capacity` (default 100 000) are kept.
/// - **Invalid verdicts** (`NotFound`, `Revoked`, ...) are kept for the negative TTL
///   (default 5 s) in a separate cache of `negative_capacity` entries (default 10 000),
///   so that a flood of distinct wrong keys evicts other wrong keys, never the hot
///   valid ones.
/// - **Errors** ([`VerifyError`]) are never cached.
///
/// # Coalescing
///
/// Concurrent lookups of one key that is not fresh in the cache share one call to the
/// wrapped verifier, and share its answer, error included. Keys are told apart by
/// digest. If the caller making the call is cancelled, a waiting caller takes over.
///
/// # Stale-if-error
///
/// A valid verdict past its TTL is kept for the stale-if-error window (default 5 min,
/// still capped at `expires_at`). A lookup that finds such an entry asks the wrapped
/// verifier again; if that fails, the stale verdict is served, logged at `warn`
/// ("serving stale verdict", with the key id) and counted in `stale_served`. While the
/// verifier keeps failing, one entry is retried at most once per
/// [`stale_retry_interval`](CachedVerifierBuilder::stale_retry_interval) (default 1 s)
/// and served stale at once in between, so an outage does not add the verifier's
/// timeout to every request. Keys never seen, keys past the window and keys with a
/// cached invalid verdict get the error (or the fail-open principal, see
/// [`FailurePolicy`]). A verdict of `Invalid` from the verifier removes any stale
/// valid entry at once.
///
/// # Refresh ahead, and revalidation after a reset
///
/// With a verifier that can [verify by digest](Verifier::verify_digests)
/// ([`HttpVerifier`](crate::HttpVerifier), [`StaticVerifier`](crate::StaticVerifier)), a
/// hit on a valid verdict in the last [`refresh_ahead`](CachedVerifierBuilder::refresh_ahead)
/// of its TTL (default 10 s, never in the first half) queues it for a background refresh:
/// one task per cache sends what came due together as one batch call (default 100
/// digests), one batch at a time, and stores the answers as any other (a refusal
/// replaces the verdict at once). A key in use therefore never waits for the verifier
/// after its first request, and a revocation the event stream missed still lands within
/// one TTL. [`revalidate_all`](CachedVerifier::revalidate_all), which the
/// [`RevocationListener`](crate::RevocationListener) calls on a `reset`, marks every
/// verdict held unconfirmed and revalidates them in batches at
/// [`revalidation_rate`](CachedVerifierBuilder::revalidation_rate) (default 1 000 a
/// second); unconfirmed verdicts are not served (but within
/// [`serve_during_revalidation`](CachedVerifierBuilder::serve_during_revalidation)), not
/// even stale, and a lookup of one asks the verifier at no cost to the miss budget.
/// Background calls respect the circuit: none is made while it is open. A verifier
/// answering 404 or 405 to the batch call (an older key service) is asked no more
/// batches; refreshes then happen on the request path, and a reset drops the cache.
///
/// # Invalidation
///
/// [`invalidate_key_id`](CachedVerifier::invalidate_key_id) removes every entry of a
/// key id (a rotated key has two digests under one id), its cached refusals included,
/// and [`invalidate_all`](CachedVerifier::invalidate_all) drops everything. A lookup
/// after either returns never sees the removed entries, not even as stale ones, and
/// never gets an answer the wrapped verifier gave before the invalidation; a verdict
/// stored while another invalidation runs is still removed by a later one.
/// [`RevocationListener`](crate::RevocationListener) (feature `remote`) calls
/// them from the key service's event stream.
///
/// # Sharing
///
/// Cloning is one atomic increment; all clones share the cache.
///
/// ```
/// use std::time::Duration;
/// use keygate::{ApiKey, CachedVerifier, Principal, StaticVerifier, Verdict, Verifier};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let key = ApiKey::generate("kg").unwrap();
/// let verifier = CachedVerifier::builder(StaticVerifier::new().with_key(&key, Principal::builder("key_1").build()))
///     .positive_ttl(Duration::from_secs(10))
///     .build();
/// assert!(matches!(verifier.verify(&key).await, Ok(Verdict::Valid(_))));
/// assert!(matches!(verifier.verify(&key).await, Ok(Verdict::Valid(_))));
/// assert_eq!((verifier.stats().misses, verifier.stats().hits), (1, 1));
/// # });
/// ```
pub struct CachedVerifier<V> {
    shared: Arc<Shared<V>>,
}

impl<V> Clone for CachedVerifier<V> {
    fn clone(&self) -> Self {
        Self { shared: Arc::clone(&self.shared) }
    }
}

pub(crate) struct Shared<V> {
    inner: V,
    pub(crate) core: Core,
}

/// A cached refusal. The key id rides along so that a cached denial still names its
/// key in usage, and so that [`Core::invalidate_key_id`] can find it.
type Refusal = (Reason, Option<Arc<str>>);

/// Everything that does not depend on the wrapped verifier's type.
pub(crate) struct Core {
    positive: Cache<KeyDigest, Arc<Positive>, DigestHash>,
    negative: Cache<KeyDigest, Refusal, DigestHash>,
    /// key id → digests of the valid verdicts stored for it, only to count what
    /// [`Core::invalidate_key_id`] removes (see the module docs).
    digests_of: Cache<Arc<str>, Arc<[KeyDigest]>>,
    /// Calls to the wrapped verifier in progress, by digest, with the epoch each was
    /// started in. Bounded by the number of lookups in progress: every holder of a
    /// flight removes it when done or cancelled.
    flights: Mutex<Flights>,
    /// Bumped by every invalidation (see the module docs).
    epoch: AtomicU64,
    /// Which cache a per-thread copy came from (see [`copies`]).
    id: u64,
    /// Bumped after every removal of a valid verdict: a per-thread copy taken before it
    /// is never served. Apart from `epoch`, which moves *before* an invalidation so that
    /// in-flight answers are not stored, and which an `Invalid` answer for one key must
    /// not move (every other key's answer in flight would then go uncached).
    copies_generation: AtomicU64,
    config: Config,
    counters: Counters,
    pub(crate) circuit: Circuit,
    /// `None`: [`MissBudget::unlimited`].
    budgets: Option<Budgets>,
    refresh: Refresh,
}

type Flight = OnceCell<Result<Verdict, VerifyError>>;
type Flights = HashMap<KeyDigest, (u64, Arc<Flight>)>;

#[derive(Debug, Clone, Copy)]
struct Config {
    max_capacity: u64,
    negative_capacity: u64,
    positive_ttl: Duration,
    negative_ttl: Duration,
    stale_if_error: Duration,
    stale_retry_interval: Duration,
    failure_policy: FailurePolicy,
    thread_copies: bool,
    circuit: CircuitBreaker,
    miss_budget: MissBudget,
    refresh: RefreshConfig,
}

/// A cached valid verdict. moka drops it at the end of its stale window (`lifetime`);
/// before that it is fresh until `fresh_until`.
struct Positive {
    principal: Principal,
    stored_at: Instant,
    fresh_until: Instant,
    /// From here on a hit queues a background refresh (see [`refresh`]).
    refresh_at: Instant,
    /// Queued for a background refresh already.
    queued: AtomicBool,
    /// The reset generation it was stored in: an older one is unconfirmed.
    generation: u64,
    lifetime: Duration,
    /// Milliseconds after `stored_at` before which a failed refresh is not retried.
    retry_after_ms: AtomicU64,
}

impl Positive {
    fn millis_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.stored_at).as_millis()).unwrap_or(u64::MAX)
    }
}

/// moka's per-entry expiry: each valid verdict lives for its own lifetime, which the
/// key's `expires_at` may shorten.
struct PositiveExpiry;

impl moka::Expiry<KeyDigest, Arc<Positive>> for PositiveExpiry {
    fn expire_after_create(&self, _: &KeyDigest, value: &Arc<Positive>, _: Instant) -> Option<Duration> {
        Some(value.lifetime)
    }

    fn expire_after_update(
        &self,
        _: &KeyDigest,
        value: &Arc<Positive>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.lifetime)
    }
}

/// What the cache holds for a digest.
enum Held {
    /// And whether a background refresh is now due (the caller queues it).
    Fresh(Principal, bool),
    Stale(Arc<Positive>),
    /// Stored before a `reset` and not confirmed since: asked again, never served stale.
    Unconfirmed,
    Refused(Reason, Option<Arc<str>>),
    Nothing,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a handful of map operations that cannot leave the map
    // inconsistent, so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Builds a [`CachedVerifier`]; see [`CachedVerifier::builder`]. Every limit has a
/// default, stated on its method.
#[must_use]
pub struct CachedVerifierBuilder<V> {
    inner: V,
    config: Config,
    name: Option<String>,
}

impl<V> fmt::Debug for CachedVerifierBuilder<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedVerifierBuilder")
            .field("config", &self.config)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<V: Verifier> CachedVerifierBuilder<V> {
    /// Most valid verdicts kept (default [`DEFAULT_CACHE_CAPACITY`], 100 000). Least
    /// recently and least frequently used entries go first (moka's TinyLFU).
    pub fn max_capacity(mut self, entries: u64) -> Self {
        self.config.max_capacity = entries;
        self
    }

    /// Most invalid verdicts kept (default [`DEFAULT_NEGATIVE_CAPACITY`], 10 000), in a
    /// cache of their own so that wrong keys never push valid ones out.
    pub fn negative_capacity(mut self, entries: u64) -> Self {
        self.config.negative_capacity = entries;
        self
    }

    /// How long a valid verdict is served without asking again (default
    /// [`DEFAULT_POSITIVE_TTL`], 30 s). Always capped at the principal's `expires_at`.
    /// Zero turns positive caching off (lookups are still coalesced). Capped at one year.
    pub fn positive_ttl(mut self, ttl: Duration) -> Self {
        self.config.positive_ttl = ttl.min(MAX_DURATION);
        self
    }

    /// How long an invalid verdict is served without asking again (default
    /// [`DEFAULT_NEGATIVE_TTL`], 5 s). This is how long a re-enabled key can still be
    /// refused, and how often one wrong key can reach the wrapped verifier. Zero turns
    /// negative caching off.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.config.negative_ttl = ttl.min(MAX_DURATION);
        self
    }

    /// How long after its TTL a valid verdict may still be served when the wrapped
    /// verifier fails (default [`DEFAULT_STALE_IF_ERROR`], 5 min; zero turns stale
    /// serving off). Never beyond the principal's `expires_at`.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.config.stale_if_error = window.min(MAX_DURATION);
        self
    }

    /// While the wrapped verifier fails, how long a stale entry is served at once
    /// before its refresh is tried again (default [`DEFAULT_STALE_RETRY_INTERVAL`], 1 s).
    pub fn stale_retry_interval(mut self, interval: Duration) -> Self {
        self.config.stale_retry_interval = interval.min(MAX_DURATION);
        self
    }

    /// What to answer when the wrapped verifier fails and nothing stale can be served
    /// (default [`FailurePolicy::FailClosed`]).
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.config.failure_policy = policy;
        self
    }

    /// When to stop calling a verifier that keeps failing, and how to notice it is
    /// back (default [`CircuitBreaker::new`]: open after 5 consecutive failures, probe
    /// after 500 ms, then at most every 10 s). See [`CircuitBreaker`].
    pub fn circuit_breaker(mut self, circuit: CircuitBreaker) -> Self {
        self.config.circuit = circuit;
        self
    }

    /// How many calls to the wrapped verifier keys not in the cache may cause (default
    /// [`MissBudget::new`]: 300 a minute per client, 1 000 a second in all). See
    /// [`MissBudget`].
    pub fn miss_budget(mut self, budget: MissBudget) -> Self {
        self.config.miss_budget = budget;
        self
    }

    /// Keep per-thread copies of hot valid verdicts in front of moka (default `true`).
    ///
    /// A copy costs a slot lookup and a clock read; moka's `get` also pins an epoch,
    /// reads the clock and logs the read for its eviction policy. On the loopback
    /// benchmark, turning copies off cost 4 to 8 % of the production form's capacity.
    /// A copy is served only while fresh and only until the next removal of any valid
    /// verdict from this cache; one hit in 32 still goes through moka, so that its
    /// eviction policy keeps seeing which keys are hot.
    pub fn thread_copies(mut self, enabled: bool) -> Self {
        self.config.thread_copies = enabled;
        self
    }

    /// How long before a valid verdict goes stale a hit on it starts a background refresh
    /// (default [`DEFAULT_REFRESH_AHEAD`], 10 s; zero turns refresh-ahead off). A key in
    /// use is then never refreshed on the request path: its verdict is renewed by a
    /// batch call ([`Verifier::verify_digests`]) while it is still served. The refresh
    /// starts no earlier than halfway through the verdict's fresh time, so that short
    /// TTLs do not turn every hit into a call. Keys not used in that window expire as
    /// before. Needs a verifier that verifies by digest
    /// ([`HttpVerifier`](crate::HttpVerifier), [`StaticVerifier`](crate::StaticVerifier));
    /// with any other, nothing is refreshed ahead. At most 10 000 digests wait for a
    /// refresh; past that, verdicts refresh on the request path.
    pub fn refresh_ahead(mut self, before_stale: Duration) -> Self {
        self.config.refresh.ahead = before_stale.min(MAX_DURATION);
        self
    }

    /// Most digests in one background batch call, refresh-ahead or revalidation (default
    /// [`DEFAULT_REFRESH_BATCH`], 100; at least 1). [`HttpVerifier`](crate::HttpVerifier)
    /// sends up to 500 per request.
    pub fn refresh_batch_size(mut self, digests: usize) -> Self {
        self.config.refresh.batch = digests.max(1);
        self
    }

    /// How many verdicts a second are revalidated in the background after a `reset`
    /// (default [`DEFAULT_REVALIDATION_RATE`], 1 000; at least 1): what one cache adds to
    /// the key service's load when a fleet's event streams all reset at once.
    pub fn revalidation_rate(mut self, per_second: u32) -> Self {
        self.config.refresh.revalidation_rate = per_second.max(1);
        self
    }

    /// How long after a `reset` verdicts held from before it are still served while
    /// they are revalidated (default zero: strict, none is served until confirmed; a key
    /// asked about first is verified on the request path). A window serves, for at most
    /// that long, verdicts the reset said may be wrong (a key revoked while the event
    /// stream was down): choose it no longer than the time you accept a revoked key to
    /// work. Past the window, what is not yet confirmed is treated as under strict.
    pub fn serve_during_revalidation(mut self, window: Duration) -> Self {
        self.config.refresh.serve_during_revalidation = window.min(MAX_DURATION);
        self
    }

    /// A name for this cache (default none): the `cache` label of its metrics, and the
    /// name of its moka caches in moka's own diagnostics.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Builds the verifier. Needs no runtime: moka does its housekeeping on the
    /// callers' threads.
    pub fn build(self) -> CachedVerifier<V> {
        let config = self.config;
        if config.failure_policy == FailurePolicy::FailOpen {
            tracing::warn!(
                "keygate CachedVerifier built with FailurePolicy::FailOpen: while the key service fails, \
                 requests pass as an anonymous principal with no scopes"
            );
        }
        // Invalidation closures on both: removal by key id is a moka predicate.
        let mut positive = Cache::builder()
            .max_capacity(config.max_capacity)
            .expire_after(PositiveExpiry)
            .support_invalidation_closures();
        let mut negative = Cache::builder().max_capacity(config.negative_capacity).support_invalidation_closures();
        // No longer than any valid verdict can live.
        let mut digests_of = Cache::builder().max_capacity(config.max_capacity);
        let lifetime = config.positive_ttl.saturating_add(config.stale_if_error);
        if !lifetime.is_zero() {
            digests_of = digests_of.time_to_live(lifetime);
        }
        if !config.negative_ttl.is_zero() {
            negative = negative.time_to_live(config.negative_ttl);
        }
        if let Some(name) = &self.name {
            positive = positive.name(&format!("{name}-valid"));
            negative = negative.name(&format!("{name}-invalid"));
        }
        let batch_capable = self.inner.verify_digests(&[]).is_some();
        CachedVerifier {
            shared: Arc::new(Shared {
                inner: self.inner,
                core: Core {
                    positive: positive.build_with_hasher(DigestHash::default()),
                    negative: negative.build_with_hasher(DigestHash::default()),
                    digests_of: digests_of.build(),
                    flights: Mutex::new(HashMap::new()),
                    epoch: AtomicU64::new(0),
                    id: copies::new_cache_id(),
                    copies_generation: AtomicU64::new(0),
                    config,
                    counters: Counters::new(self.name.as_deref()),
                    circuit: Circuit::new(config.circuit, self.name.as_deref()),
                    budgets: (config.miss_budget != MissBudget::unlimited()).then(|| Budgets::new(config.miss_budget)),
                    refresh: Refresh::new(config.refresh, batch_capable),
                },
            }),
        }
    }
}

impl<V: Verifier> CachedVerifier<V> {
    /// A cache with every default (see [`CachedVerifier::builder`]).
    #[must_use]
    pub fn new(inner: V) -> Self {
        Self::builder(inner).build()
    }

    /// Starts a builder. Defaults: capacity 100 000 valid and 10 000 invalid verdicts,
    /// positive TTL 30 s (capped at `expires_at`), negative TTL 5 s, stale-if-error
    /// 5 min, stale retry interval 1 s, [`FailurePolicy::FailClosed`], the default
    /// [`CircuitBreaker`] and [`MissBudget`], no name.
    #[must_use = "the builder does nothing until `build` is called"]
    pub fn builder(inner: V) -> CachedVerifierBuilder<V> {
        CachedVerifierBuilder {
            inner,
            config: Config {
                max_capacity: DEFAULT_CACHE_CAPACITY,
                negative_capacity: DEFAULT_NEGATIVE_CAPACITY,
                positive_ttl: DEFAULT_POSITIVE_TTL,
                negative_ttl: DEFAULT_NEGATIVE_TTL,
                stale_if_error: DEFAULT_STALE_IF_ERROR,
                stale_retry_interval: DEFAULT_STALE_RETRY_INTERVAL,
                failure_policy: FailurePolicy::FailClosed,
                thread_copies: true,
                circuit: CircuitBreaker::new(),
                miss_budget: MissBudget::new(),
                refresh: RefreshConfig {
                    ahead: DEFAULT_REFRESH_AHEAD,
                    batch: DEFAULT_REFRESH_BATCH,
                    revalidation_rate: DEFAULT_REVALIDATION_RATE,
                    serve_during_revalidation: Duration::ZERO,
                },
            },
            name: None,
        }
    }

    /// The wrapped verifier.
    pub fn inner(&self) -> &V {
        &self.shared.inner
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CacheStats {
        let c = &self.shared.core.counters;
        CacheStats {
            hits: c.hits.get(),
            misses: c.misses.get(),
            stale_served: c.stale_served.get(),
            negative_hits: c.negative_hits.get(),
            remote_errors: c.remote_errors.get(),
            coalesced_waits: c.coalesced_waits.get(),
            fail_open: c.fail_open.get(),
            invalidations: c.invalidations.get(),
            circuit_rejections: c.circuit_rejections.get(),
            circuit_opened: self.shared.core.circuit.opened_count(),
            throttled: c.throttled.get(),
            refreshed_ahead: c.refreshed_ahead.get(),
            revalidated: c.revalidated.get(),
            refresh_batches: c.refresh_batches.get(),
        }
    }

    /// Whether the circuit is open: lookups that need the wrapped verifier are answered
    /// without calling it (see [`CircuitBreaker`]).
    pub fn is_circuit_open(&self) -> bool {
        self.shared.core.circuit.is_open()
    }

    /// Approximate number of valid and invalid verdicts held (moka updates its counts
    /// lazily).
    pub fn entry_count(&self) -> u64 {
        let core = &self.shared.core;
        core.positive.entry_count() + core.negative.entry_count()
    }

    /// Removes every cached verdict of `key_id`, valid or invalid, fresh or stale, and
    /// returns how many valid verdicts were held for it. A lookup that starts after this
    /// returns asks the wrapped verifier again.
    pub async fn invalidate_key_id(&self, key_id: &str) -> usize {
        self.shared.core.invalidate_key_id(key_id).await
    }

    /// Drops every cached verdict, valid or invalid, fresh or stale.
    pub fn invalidate_all(&self) {
        self.shared.core.invalidate_all();
    }

    /// Treats every valid verdict held as unconfirmed, as
    /// [`RevocationListener`](crate::RevocationListener) does on a `reset`: none is
    /// served again (but within
    /// [`serve_during_revalidation`](CachedVerifierBuilder::serve_during_revalidation))
    /// until the wrapped verifier confirms it, in background batches at the
    /// [`revalidation_rate`](CachedVerifierBuilder::revalidation_rate), or on the request
    /// path for a key asked about first. Cached refusals are dropped. A wrapped verifier
    /// that cannot [verify by digest](Verifier::verify_digests) gets
    /// [`invalidate_all`](Self::invalidate_all) instead. Batches need a Tokio runtime:
    /// called outside one, the revalidation starts with the next lookup queued on one.
    pub fn revalidate_all(&self) {
        self.shared.revalidate_all();
    }

    /// Runs moka's pending housekeeping (evictions, expirations, counts) now instead of
    /// on later calls. Useful in tests and before reading [`entry_count`](Self::entry_count).
    pub async fn run_pending_tasks(&self) {
        self.shared.core.positive.run_pending_tasks();
        self.shared.core.negative.run_pending_tasks();
    }

    #[cfg(feature = "remote")]
    pub(crate) fn downgrade(&self) -> std::sync::Weak<Shared<V>> {
        Arc::downgrade(&self.shared)
    }
}

impl Core {
    pub(crate) async fn invalidate_key_id(&self, key_id: &str) -> usize {
        // Bump first: an answer being fetched right now must not be cached after us.
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.counters.invalidations.add();
        // Counted before the predicate is set, which hides what it covers.
        let held = self
            .digests_of
            .remove(key_id)
            .map_or(0, |digests| digests.iter().filter(|digest| self.positive.contains_key(*digest)).count());
        let id: Arc<str> = Arc::from(key_id);
        let refused_id = Arc::clone(&id);
        // A refusal that names the key id goes too: a disabled key enabled again must
        // not stay refused for the negative TTL.
        let set = self
            .positive
            .invalidate_entries_if(move |_, entry| *entry.principal.key_id() == *id)
            .and(self.negative.invalidate_entries_if(move |_, (_, named)| named.as_deref() == Some(&*refused_id)));
        if let Err(e) = set {
            // Unreachable: both caches are built with invalidation closures.
            tracing::error!(error = %e, "cache: could not remove by key id; dropping every entry");
            self.positive.invalidate_all();
            self.negative.invalidate_all();
        }
        // After the predicate: from here on moka returns none of the key's verdicts, so
        // no copy can be taken of one under the new generation.
        self.retire_copies();
        tracing::debug!(key_id, entries = held, "cache: invalidated key id");
        held
    }

    pub(crate) fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.counters.invalidations.add();
        // moka's `invalidate_all` spares an entry stamped in the very instant of the call,
        // and a verdict fetched before the epoch moved may be stored in that instant: a
        // predicate that takes everything covers entries stamped up to and including now.
        // Only entries older than the call are ever tested against it.
        self.positive.invalidate_all();
        self.negative.invalidate_all();
        self.digests_of.invalidate_all();
        let everything =
            self.positive.invalidate_entries_if(|_, _| true).and(self.negative.invalidate_entries_if(|_, _| true));
        if let Err(e) = everything {
            // Unreachable: both caches are built with invalidation closures.
            tracing::error!(error = %e, "cache: could not register the drop-everything predicate");
        }
        self.retire_copies();
        tracing::debug!("cache: dropped every entry");
    }

    /// What the cache holds for `digest`; fresh verdicts and refusals are counted as hits.
    fn held(&self, digest: &KeyDigest) -> Held {
        // Read before moka: a copy taken across a removal is stale the moment it is made.
        let generation = self.copies_generation.load(Ordering::SeqCst);
        let now = Instant::now();
        if self.config.thread_copies {
            if let Some(principal) = copies::get(self.id, generation, digest, now) {
                self.counters.hits.add();
                return Held::Fresh(principal, false);
            }
        }
        match self.positive.get(digest) {
            Some(entry) if entry.generation != self.refresh.generation() => {
                if now < entry.fresh_until && self.refresh.serving_old(now) {
                    self.counters.hits.add();
                    Held::Fresh(entry.principal.clone(), false)
                } else {
                    Held::Unconfirmed
                }
            }
            Some(entry) if now < entry.fresh_until => {
                self.counters.hits.add();
                let due = now >= entry.refresh_at && !entry.queued.swap(true, Ordering::Relaxed);
                if self.config.thread_copies {
                    // A copy ends where refresh-ahead starts: the hit that queues the
                    // refresh has to come through here.
                    let until = entry.fresh_until.min(entry.refresh_at);
                    copies::put(self.id, generation, digest, &entry.principal, until);
                }
                Held::Fresh(entry.principal.clone(), due)
            }
            Some(entry) => Held::Stale(entry),
            None => match self.negative.get(digest) {
                Some((reason, key_id)) => {
                    self.counters.negative_hits.add();
                    Held::Refused(reason, key_id)
                }
                None => Held::Nothing,
            },
        }
    }

    fn store_valid(&self, digest: KeyDigest, principal: &Principal, epoch: u64) {
        let ttl = self.config.positive_ttl;
        if ttl.is_zero() || self.config.max_capacity == 0 {
            return;
        }
        let mut lifetime = ttl.saturating_add(self.config.stale_if_error);
        let mut fresh = ttl;
        if let Some(expires_at) = principal.expires_at() {
            let left = Duration::try_from(expires_at - OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO);
            lifetime = lifetime.min(left);
            fresh = fresh.min(left);
        }
        if fresh.is_zero() || self.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        let now = Instant::now();
        let entry = Positive {
            principal: principal.clone(),
            stored_at: now,
            fresh_until: now + fresh,
            refresh_at: self.refresh.due_at(now, fresh),
            queued: AtomicBool::new(false),
            generation: self.refresh.generation(),
            lifetime,
            retry_after_ms: AtomicU64::new(0),
        };
        self.positive.insert(digest, Arc::new(entry));
        // An invalidation that started after the check above may have reached moka
        // before this insert did, and so not cover it: take it out ourselves.
        if self.epoch.load(Ordering::SeqCst) != epoch {
            self.positive.invalidate(&digest);
            self.retire_copies();
            return;
        }
        // Digests no longer held are dropped on the way, so the list stays as short as
        // the key id's live verdicts.
        self.digests_of.entry(Arc::clone(principal.key_id_arc())).and_upsert_with(|held| {
            let held = held.map(|e| e.into_value());
            let others = held.iter().flat_map(|d| d.iter()).filter(|d| **d != digest && self.positive.contains_key(*d));
            others.copied().chain([digest]).collect()
        });
    }

    fn store_invalid(&self, digest: KeyDigest, refusal: Refusal, epoch: u64) {
        // Whatever valid verdict was held, stale or not, is wrong now.
        self.positive.invalidate(&digest);
        self.retire_copies();
        if self.config.negative_ttl.is_zero() || self.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        self.negative.insert(digest, refusal);
        if self.epoch.load(Ordering::SeqCst) != epoch {
            self.negative.invalidate(&digest);
        }
    }

    /// Lets the next hit on these verdicts queue their refresh again.
    fn unmark_queued(&self, digests: &[KeyDigest]) {
        for digest in digests {
            if let Some(entry) = self.positive.get(digest) {
                entry.queued.store(false, Ordering::Relaxed);
            }
        }
    }

    /// After a valid verdict left moka: no thread serves its copy of it again.
    fn retire_copies(&self) {
        self.copies_generation.fetch_add(1, Ordering::SeqCst);
    }

    fn serve_stale(&self, entry: &Positive) -> Verdict {
        self.counters.stale_served.add();
        tracing::warn!(key_id = entry.principal.key_id(), "serving stale verdict: the verifier failed");
        Verdict::Valid(entry.principal.clone())
    }

    fn on_error(&self, err: VerifyError) -> Result<Verdict, VerifyError> {
        match self.config.failure_policy {
            FailurePolicy::FailClosed => Err(err),
            FailurePolicy::FailOpen => {
                self.counters.fail_open.add();
                tracing::warn!(error = %err, "verifier failed; FailurePolicy::FailOpen lets the request through anonymously");
                Ok(Verdict::Valid(Principal::fail_open()))
            }
        }
    }
}

impl<V: Verifier> Shared<V> {
    /// One call to the wrapped verifier per digest at a time; everyone else waits for
    /// its answer. `charge`: the client to charge a new call to, for a key the cache
    /// holds nothing for (`None`: free, a stale entry's refresh or a probe).
    async fn flight(
        &self,
        digest: KeyDigest,
        key: &ApiKey,
        charge: Option<Option<IpAddr>>,
    ) -> Result<Verdict, VerifyError> {
        let cell = self.join_or_start(digest, charge).map_err(|retry_after| {
            self.core.counters.throttled.add();
            tracing::debug!(?retry_after, "cache: miss budget spent; not asking the verifier");
            VerifyError::Throttled { retry_after }
        })?;
        let guard = FlightGuard { flights: &self.core.flights, digest, cell: Some(cell) };
        // If the caller running the initializer is cancelled, `get_or_init` lets the
        // next waiter run its own.
        guard.cell().get_or_init(|| self.load(digest, key)).await.clone()
    }

    /// The flight to wait on: the one in progress if it started in the current epoch,
    /// else a new one, charged to `charge`'s client; `Err`: the budget is spent, retry
    /// after this long.
    fn join_or_start(&self, digest: KeyDigest, charge: Option<Option<IpAddr>>) -> Result<Arc<Flight>, Duration> {
        let core = &self.core;
        let mut flights = lock(&core.flights);
        let epoch = core.epoch.load(Ordering::SeqCst);
        let entry = flights.entry(digest);
        if let MapEntry::Occupied(o) = &entry {
            if o.get().0 == epoch {
                core.counters.coalesced_waits.add();
                return Ok(Arc::clone(&o.get().1));
            }
        }
        if let (Some(client), Some(budgets)) = (charge, &core.budgets) {
            budgets.charge(client)?;
        }
        let cell = Arc::new(OnceCell::new());
        // An older flight's holders still get its answer; their guards see that it is
        // no longer the one in the map and leave the map alone.
        match entry {
            MapEntry::Occupied(mut o) => {
                o.insert((epoch, Arc::clone(&cell)));
            }
            MapEntry::Vacant(v) => {
                v.insert((epoch, Arc::clone(&cell)));
            }
        }
        Ok(cell)
    }

    /// Starts the open circuit's probe in the background, on `key`: the lookup that
    /// found it due is not the one to wait for a verifier known to fail.
    fn probe(self: &Arc<Self>, digest: KeyDigest, key: &ApiKey) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to run it on: the next lookup on one tries again.
            self.core.circuit.probe_abandoned();
            return;
        };
        let shared = Arc::clone(self);
        let key = key.clone();
        runtime.spawn(async move {
            let mut guard = ProbeGuard { circuit: &shared.core.circuit, done: false };
            let result = shared.flight(digest, &key, None).await;
            guard.done = true;
            match result {
                Ok(_) => shared.core.circuit.succeeded(),
                Err(_) => shared.core.circuit.failed(true),
            }
        });
    }

    async fn load(&self, digest: KeyDigest, key: &ApiKey) -> Result<Verdict, VerifyError> {
        let core = &self.core;
        // A caller that missed the cache just before the previous flight for this key
        // finished lands here: answer from what that flight cached.
        // It used that flight's answer, as if it had joined it: counted so.
        let confirmed = |e: &Arc<Positive>| Instant::now() < e.fresh_until && e.generation == core.refresh.generation();
        if let Some(entry) = core.positive.get(&digest).filter(confirmed) {
            core.counters.coalesced_waits.add();
            return Ok(Verdict::Valid(entry.principal.clone()));
        }
        if let Some((reason, key_id)) = core.negative.get(&digest) {
            core.counters.coalesced_waits.add();
            return Ok(Verdict::Invalid { reason, key_id });
        }
        let epoch = core.epoch.load(Ordering::SeqCst);
        let result = self.inner.verify(key).await;
        match &result {
            Ok(verdict) => {
                core.circuit.succeeded();
                match verdict {
                    Verdict::Valid(principal) => core.store_valid(digest, principal, epoch),
                    Verdict::Invalid { reason, key_id } => {
                        core.store_invalid(digest, (*reason, key_id.clone()), epoch);
                    }
                }
            }
            // A wrapped verifier's own throttling says nothing about its health.
            Err(VerifyError::Throttled { .. }) => {}
            Err(err) => {
                core.circuit.failed(false);
                core.counters.remote_errors.add();
                tracing::debug!(error = %err, digest = ?digest, "cache: verifier failed");
            }
        }
        result
    }
}

/// Lets another probe go when the probe's task is dropped before it finished (the
/// runtime shutting down).
struct ProbeGuard<'a> {
    circuit: &'a Circuit,
    done: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.circuit.probe_abandoned();
        }
    }
}

/// Removes a finished or abandoned flight from the map. Every clone of a flight's `Arc`
/// outside the map belongs to a guard and is dropped under the map's lock, so the
/// strong count seen there is exact.
struct FlightGuard<'a> {
    flights: &'a Mutex<Flights>,
    digest: KeyDigest,
    cell: Option<Arc<Flight>>,
}

impl FlightGuard<'_> {
    fn cell(&self) -> &Flight {
        self.cell.as_deref().expect("set until drop")
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let Some(cell) = self.cell.take() else { return };
        let mut flights = lock(self.flights);
        let done_or_abandoned = cell.initialized() || Arc::strong_count(&cell) == 2;
        if done_or_abandoned && flights.get(&self.digest).is_some_and(|(_, c)| Arc::ptr_eq(c, &cell)) {
            flights.remove(&self.digest);
        }
        drop(cell);
    }
}

/// Per-thread copies of hot valid verdicts, looked at before moka.
///
/// A copy is keyed by the cache it came from and the digest, and carries the cache's
/// copies generation read *before* the moka lookup it was taken from. Every removal
/// of a valid verdict bumps the generation *after* moka stopped returning it, so a copy
/// is either of a verdict moka still serves, or stale on arrival. Slots are few and
/// fixed: a thread holds at most [`SLOTS`] principals, and a collision only costs the
/// next lookup a trip to moka.
mod copies {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    use crate::key::KeyDigest;
    use crate::principal::Principal;

    pub(super) const SLOTS: usize = 128;
    /// One hit in this many goes through moka, so its eviction policy sees hot keys.
    const MOKA_EVERY: u8 = 32;

    struct Copy {
        cache: u64,
        generation: u64,
        digest: KeyDigest,
        principal: Principal,
        fresh_until: Instant,
        hits: u8,
    }

    thread_local! {
        static COPIES: RefCell<[Option<Copy>; SLOTS]> = const { RefCell::new([const { None }; SLOTS]) };
    }

    pub(super) fn new_cache_id() -> u64 {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    fn slot(digest: &KeyDigest) -> usize {
        // Digests are uniformly random: their first bytes are a good index.
        usize::from(digest.as_bytes()[0]) % SLOTS
    }

    pub(super) fn get(cache: u64, generation: u64, digest: &KeyDigest, now: Instant) -> Option<Principal> {
        COPIES.with(|cell| {
            let mut slots = cell.try_borrow_mut().ok()?;
            let copy = slots[slot(digest)].as_mut()?;
            if copy.cache != cache || copy.generation != generation || copy.digest != *digest || now >= copy.fresh_until
            {
                return None;
            }
            copy.hits += 1;
            if copy.hits >= MOKA_EVERY {
                copy.hits = 0;
                return None;
            }
            Some(copy.principal.clone())
        })
    }

    pub(super) fn put(cache: u64, generation: u64, digest: &KeyDigest, principal: &Principal, fresh_until: Instant) {
        COPIES.with(|cell| {
            if let Ok(mut slots) = cell.try_borrow_mut() {
                slots[slot(digest)] = Some(Copy {
                    cache,
                    generation,
                    digest: *digest,
                    principal: principal.clone(),
                    fresh_until,
                    hits: 0,
                });
            }
        });
    }
}

impl<V: Verifier> Verifier for CachedVerifier<V> {
    fn verify_now(&self, key: &ApiKey) -> Option<Result<Verdict, VerifyError>> {
        // What is held fresh only: anything stale, missing or failing takes the async path.
        let digest = key.digest();
        match self.shared.core.held(&digest) {
            Held::Fresh(principal, due) => {
                if due {
                    self.shared.refresh_ahead(digest);
                }
                Some(Ok(Verdict::Valid(principal)))
            }
            Held::Refused(reason, key_id) => Some(Ok(Verdict::Invalid { reason, key_id })),
            Held::Stale(_) | Held::Unconfirmed | Held::Nothing => None,
        }
    }

    async fn verify(&self, key: &ApiKey) -> Result<Verdict, VerifyError> {
        self.verify_from(key, None).await
    }

    async fn verify_from(&self, key: &ApiKey, client: Option<IpAddr>) -> Result<Verdict, VerifyError> {
        let shared = &*self.shared;
        let core = &shared.core;
        let digest = key.digest();
        let mut known = true;
        let stale = match core.held(&digest) {
            Held::Fresh(principal, due) => {
                if due {
                    self.shared.refresh_ahead(digest);
                }
                return Ok(Verdict::Valid(principal));
            }
            Held::Refused(reason, key_id) => return Ok(Verdict::Invalid { reason, key_id }),
            Held::Stale(entry) => {
                if entry.millis_at(Instant::now()) < entry.retry_after_ms.load(Ordering::Relaxed) {
                    // A refresh failed moments ago: do not make this request wait for
                    // another one.
                    return Ok(core.serve_stale(&entry));
                }
                Some(entry)
            }
            Held::Unconfirmed => None,
            Held::Nothing => {
                known = false;
                None
            }
        };
        core.counters.misses.add();
        let admit = core.circuit.admit();
        if admit != Admit::Call {
            if admit == Admit::Probe {
                self.shared.probe(digest, key);
            }
            core.counters.circuit_rejections.add();
            if let Some(entry) = stale.and_then(|stale| core.positive.get(&digest).filter(|e| Arc::ptr_eq(e, &stale))) {
                return Ok(core.serve_stale(&entry));
            }
            return core.on_error(VerifyError::CircuitOpen);
        }
        // Refreshing or confirming what the cache holds is free; only keys it knows
        // nothing of are charged to the miss budget.
        let charge = (!known).then_some(client);
        let err = match shared.flight(digest, key, charge).await {
            Ok(verdict) => return Ok(verdict),
            // Neither stale nor fail-open: a flood of unknown keys must not get in.
            Err(throttled @ VerifyError::Throttled { .. }) => return Err(throttled),
            Err(err) => err,
        };
        if let Some(stale) = stale {
            // Re-read: the entry may have been invalidated (or expired) while the
            // verifier was asked.
            if let Some(entry) = core.positive.get(&digest).filter(|e| Arc::ptr_eq(e, &stale)) {
                let retry_at = entry.millis_at(Instant::now() + core.config.stale_retry_interval);
                entry.retry_after_ms.fetch_max(retry_at, Ordering::Relaxed);
                return Ok(core.serve_stale(&entry));
            }
        }
        core.on_error(err)
    }
}

impl<V> fmt::Debug for CachedVerifier<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = &self.shared.core;
        f.debug_struct("CachedVerifier")
            .field("max_capacity", &core.config.max_capacity)
            .field("negative_capacity", &core.config.negative_capacity)
            .field("positive_ttl", &core.config.positive_ttl)
            .field("negative_ttl", &core.config.negative_ttl)
            .field("stale_if_error", &core.config.stale_if_error)
            .field("stale_retry_interval", &core.config.stale_retry_interval)
            .field("failure_policy", &core.config.failure_policy)
            .field("circuit_breaker", &core.config.circuit)
            .field("miss_budget", &core.config.miss_budget)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

    use super::*;
    use crate::{ApiKey, StaticVerifier};

    /// Sums every counter increment by name and labels.
    #[derive(Default)]
    struct Totals(Arc<Mutex<HashMap<String, u64>>>);

    struct Named(String, Arc<Mutex<HashMap<String, u64>>>);

    impl CounterFn for Named {
        fn increment(&self, n: u64) {
            *self.1.lock().unwrap().entry(self.0.clone()).or_default() += n;
        }
        fn absolute(&self, _: u64) {}
    }

    impl Recorder for Totals {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            let labels: String = key.labels().map(|l| format!("{{{}={}}}", l.key(), l.value())).collect();
            Counter::from_arc(Arc::new(Named(format!("{}{labels}", key.name()), self.0.clone())))
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn every_count_reaches_metrics_and_stats_exactly() {
        let key = ApiKey::generate("kg").unwrap();
        let unknown = ApiKey::generate("kg").unwrap();
        let recorder = Totals::default();
        let totals = recorder.0.clone();
        // The handles are registered when the cache is built.
        let (plain, named) = metrics::with_local_recorder(&recorder, || {
            let inner = || StaticVerifier::new().with_key(&key, Principal::builder("key_1").build());
            (CachedVerifier::builder(inner()).build(), CachedVerifier::builder(inner()).name("edge").build())
        });
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            plain.verify(&key).await.unwrap();
            plain.verify(&unknown).await.unwrap();
            named.verify(&key).await.unwrap();
        });
        for _ in 0..600 {
            assert!(matches!(plain.verify_now(&key), Some(Ok(Verdict::Valid(_)))));
            assert!(matches!(plain.verify_now(&unknown), Some(Ok(Verdict::Invalid { .. }))));
        }
        named.invalidate_all();
        let stats = plain.stats();
        assert_eq!((stats.hits, stats.negative_hits, stats.misses), (600, 600, 2));
        let totals = totals.lock().unwrap();
        assert_eq!(totals.get("keygate_cache_hits_total"), Some(&600));
        assert_eq!(totals.get("keygate_cache_negative_hits_total"), Some(&600));
        assert_eq!(totals.get("keygate_cache_misses_total"), Some(&2));
        assert_eq!(totals.get("keygate_cache_misses_total{cache=edge}"), Some(&1));
        assert_eq!(totals.get("keygate_cache_invalidations_total{cache=edge}"), Some(&1));
        assert_eq!(totals.get("keygate_cache_invalidations_total"), None);
    }

    #[test]
    fn a_verdict_past_its_ttl_is_stale_and_not_served_now() {
        let key = ApiKey::generate("kg").unwrap();
        let inner = StaticVerifier::new().with_key(&key, Principal::builder("key_1").build());
        let cache = CachedVerifier::builder(inner).positive_ttl(Duration::from_millis(20)).build();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { cache.verify(&key).await.unwrap() });
        assert!(matches!(cache.shared.core.held(&key.digest()), Held::Fresh(..)));
        std::thread::sleep(Duration::from_millis(40));
        assert!(matches!(cache.shared.core.held(&key.digest()), Held::Stale(_)), "kept for the stale window");
        assert!(cache.verify_now(&key).is_none());
    }
}
