//! [`CachedVerifier`]: a moka cache in front of any [`Verifier`].

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::clock::Instant;

// The sync cache: its `get` is a plain call (no future to build and poll), markedly
// cheaper on the hit path that every request takes, and nothing here ever waits.
use moka::notification::RemovalCause;
use moka::sync::Cache;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use super::{Reason, Verdict, Verifier, VerifyError};
use crate::key::{ApiKey, DigestHash, KeyDigest};
use crate::principal::Principal;

/// Default number of valid verdicts kept: 100 000.
pub const DEFAULT_CAPACITY: u64 = 100_000;
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

/// Durations are capped here so that `Instant + duration` can never overflow.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

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
/// `keygate_cache_coalesced_waits_total`, `keygate_cache_fail_open_total` and
/// `keygate_cache_invalidations_total`. Hits and negative hits reach the facade in
/// steps of 256, so that a hit never pays for a recorder's registry lookup; the
/// counters here are exact.
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
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale_served: AtomicU64,
    negative_hits: AtomicU64,
    remote_errors: AtomicU64,
    coalesced_waits: AtomicU64,
    fail_open: AtomicU64,
    invalidations: AtomicU64,
}

macro_rules! count {
    ($counters:expr, $field:ident, $metric:literal) => {{
        $counters.$field.fetch_add(1, Ordering::Relaxed);
        metrics::counter!($metric).increment(1);
    }};
}

/// Hits reach the `metrics` facade in steps of this many: a recorder's registry lookup
/// costs more than the cache hit it would count.
const HIT_METRIC_STEP: u64 = 256;

/// Counts a hit; every [`HIT_METRIC_STEP`]th one reports the step to `metrics`.
macro_rules! count_hit {
    ($counters:expr, $field:ident, $metric:literal) => {{
        let n = $counters.$field.fetch_add(1, Ordering::Relaxed) + 1;
        if n % HIT_METRIC_STEP == 0 {
            metrics::counter!($metric).increment(HIT_METRIC_STEP);
        }
    }};
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
/// # Invalidation
///
/// [`invalidate_key_id`](CachedVerifier::invalidate_key_id) removes every entry of a
/// key id (a rotated key has two digests under one id) and
/// [`invalidate_all`](CachedVerifier::invalidate_all) drops everything; a lookup after
/// either returns never sees the removed entries, not even as stale ones, and an answer
/// the wrapped verifier gave before an invalidation is not cached after it.
/// [`RevocationListener`](crate::verify::RevocationListener) (feature `remote`) calls
/// them from the key service's event stream.
///
/// # Per-thread copies
///
/// Each thread keeps copies of up to 128 fresh valid verdicts it has read from moka, and
/// looks there first: a hit then costs a slot lookup rather than moka's `get`. Copies are
/// never served past their TTL, and any removal of a valid verdict (invalidations, an
/// `Invalid` answer for a cached key) retires every thread's copies at once, so the
/// guarantees above hold unchanged. Turn them off with
/// [`thread_copies(false)`](CachedVerifierBuilder::thread_copies).
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

/// Everything that does not depend on the wrapped verifier's type.
pub(crate) struct Core {
    positive: Cache<KeyDigest, Arc<Positive>, DigestHash>,
    // The key id rides along so that a cached denial still names its key in usage.
    negative: Cache<KeyDigest, (Reason, Option<Arc<str>>), DigestHash>,
    /// key id → digests of the valid entries held for it, so that one key id can be
    /// invalidated at once. Kept in step with `positive` by the eviction listener; its
    /// size is bounded by the positive capacity.
    index: Arc<Mutex<Index>>,
    /// Calls to the wrapped verifier in progress, by digest, with the epoch each was
    /// started in. Bounded by the number of lookups in progress: every holder of a
    /// flight removes it when done or cancelled.
    flights: Mutex<Flights>,
    /// Bumped by every invalidation: a verdict fetched across a bump is not cached.
    epoch: AtomicU64,
    /// Bumped after every removal of valid verdicts (invalidations included): per-thread
    /// copies taken before a bump are never served (see [`front`]).
    copies_epoch: AtomicU64,
    serial: AtomicU64,
    /// Time origin of the `next_refresh_ms` fields.
    origin: Instant,
    /// Tells this cache's per-thread copies from another cache's (see [`front`]).
    id: u64,
    config: Config,
    counters: Counters,
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
}

/// A cached valid verdict.
struct Positive {
    principal: Principal,
    serial: u64,
    fresh_until: Instant,
    stale_until: Instant,
    /// How long moka keeps the entry: until `stale_until`.
    lifetime: Duration,
    /// Milliseconds after `Core::origin` before which a failed refresh is not retried.
    next_refresh_ms: AtomicU64,
}

struct PositiveExpiry;

impl moka::Expiry<KeyDigest, Arc<Positive>> for PositiveExpiry {
    fn expire_after_create(&self, _: &KeyDigest, value: &Arc<Positive>, _: std::time::Instant) -> Option<Duration> {
        Some(value.lifetime)
    }

    fn expire_after_update(
        &self,
        _: &KeyDigest,
        value: &Arc<Positive>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.lifetime)
    }
}

#[derive(Default)]
struct Index {
    by_key_id: HashMap<Arc<str>, Vec<(KeyDigest, u64)>>,
}

impl Index {
    fn add(&mut self, key_id: &Arc<str>, digest: KeyDigest, serial: u64) {
        let list = self.by_key_id.entry(Arc::clone(key_id)).or_default();
        match list.iter_mut().find(|(d, _)| *d == digest) {
            Some(slot) => slot.1 = serial,
            None => list.push((digest, serial)),
        }
    }

    /// Removes `digest` only if the index still refers to the entry `serial`: an
    /// eviction reported late must not unindex a newer entry for the same digest.
    fn remove_exact(&mut self, key_id: &str, digest: &KeyDigest, serial: u64) {
        if let Some(list) = self.by_key_id.get_mut(key_id) {
            list.retain(|(d, s)| !(d == digest && *s == serial));
            if list.is_empty() {
                self.by_key_id.remove(key_id);
            }
        }
    }

    fn take(&mut self, key_id: &str) -> Vec<(KeyDigest, u64)> {
        self.by_key_id.remove(key_id).unwrap_or_default()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
        f.debug_struct("CachedVerifierBuilder").field("config", &self.config).finish_non_exhaustive()
    }
}

impl<V: Verifier> CachedVerifierBuilder<V> {
    /// Most valid verdicts kept (default 100 000). Least recently and least frequently
    /// used entries go first (moka's TinyLFU).
    pub fn max_capacity(mut self, entries: u64) -> Self {
        self.config.max_capacity = entries;
        self
    }

    /// Most invalid verdicts kept (default 10 000), in a cache of their own so that
    /// wrong keys never push valid ones out.
    pub fn negative_capacity(mut self, entries: u64) -> Self {
        self.config.negative_capacity = entries;
        self
    }

    /// How long a valid verdict is served without asking again (default 30 s). Always
    /// capped at the principal's `expires_at`. Zero turns positive caching off (lookups
    /// are still coalesced). Capped at one year.
    pub fn positive_ttl(mut self, ttl: Duration) -> Self {
        self.config.positive_ttl = ttl.min(MAX_DURATION);
        self
    }

    /// How long an invalid verdict is served without asking again (default 5 s). This
    /// is how long a re-enabled key can still be refused, and how often one wrong key
    /// can reach the wrapped verifier. Zero turns negative caching off.
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.config.negative_ttl = ttl.min(MAX_DURATION);
        self
    }

    /// How long after its TTL a valid verdict may still be served when the wrapped
    /// verifier fails (default 5 min; zero turns stale serving off). Never beyond the
    /// principal's `expires_at`.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.config.stale_if_error = window.min(MAX_DURATION);
        self
    }

    /// While the wrapped verifier fails, how long a stale entry is served at once
    /// before its refresh is tried again (default 1 s).
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

    /// Keep per-thread copies of the hottest fresh valid verdicts in front of moka
    /// (default `true`).
    ///
    /// A hit on a copy costs a slot lookup instead of moka's `get` (which hashes, pins,
    /// reads the system clock and logs the read for its eviction policy): about 100 ns
    /// a request on a small virtual machine. A copy is only ever served while it is
    /// fresh, and every invalidation ([`invalidate_key_id`](CachedVerifier::invalidate_key_id),
    /// [`invalidate_all`](CachedVerifier::invalidate_all), an `Invalid` answer for a
    /// cached key) retires all copies at once. Each thread holds at most
    /// 128 copies; a copy outlives its moka entry only when moka evicts it for capacity,
    /// and never its TTL. One hit in 32 still goes through moka so that its eviction
    /// policy keeps seeing which keys are hot.
    pub fn thread_copies(mut self, enabled: bool) -> Self {
        self.config.thread_copies = enabled;
        self
    }

    /// A name for the underlying moka caches (shows in moka's own diagnostics).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Builds the verifier. Needs no runtime: moka does its housekeeping on the
    /// callers' tasks.
    pub fn build(self) -> CachedVerifier<V> {
        let config = self.config;
        if config.failure_policy == FailurePolicy::FailOpen {
            tracing::warn!(
                "keygate CachedVerifier built with FailurePolicy::FailOpen: while the key service fails, \
                 requests pass as an anonymous principal with no scopes"
            );
        }
        let index = Arc::new(Mutex::new(Index::default()));
        let listener_index = Arc::clone(&index);
        let mut positive = Cache::builder()
            .max_capacity(config.max_capacity)
            .expire_after(PositiveExpiry)
            .eviction_listener(move |digest: Arc<KeyDigest>, entry: Arc<Positive>, cause| {
                // A replaced entry keeps its digest in the cache; the newer entry's
                // serial is recorded when it is inserted.
                if cause != RemovalCause::Replaced {
                    lock(&listener_index).remove_exact(entry.principal.key_id(), &digest, entry.serial);
                }
            });
        // Invalidation closures: a refusal that names a key id is dropped with that key
        // id (a disabled key enabled again must not stay refused for the negative TTL).
        let mut negative = Cache::builder().max_capacity(config.negative_capacity).support_invalidation_closures();
        if !config.negative_ttl.is_zero() {
            negative = negative.time_to_live(config.negative_ttl);
        }
        if let Some(name) = &self.name {
            positive = positive.name(&format!("{name}-valid"));
            negative = negative.name(&format!("{name}-invalid"));
        }
        CachedVerifier {
            shared: Arc::new(Shared {
                inner: self.inner,
                core: Core {
                    positive: positive.build_with_hasher(DigestHash::default()),
                    negative: negative.build_with_hasher(DigestHash::default()),
                    index,
                    flights: Mutex::new(HashMap::new()),
                    epoch: AtomicU64::new(0),
                    copies_epoch: AtomicU64::new(0),
                    serial: AtomicU64::new(0),
                    origin: Instant::now(),
                    id: front::new_cache_id(),
                    config,
                    counters: Counters::default(),
                },
            }),
        }
    }
}

impl<V: Verifier> CachedVerifier<V> {
    /// A cache with every default (see [`CachedVerifier::builder`]).
    pub fn new(inner: V) -> Self {
        Self::builder(inner).build()
    }

    /// Starts a builder. Defaults: capacity 100 000 valid and 10 000 invalid verdicts,
    /// positive TTL 30 s (capped at `expires_at`), negative TTL 5 s, stale-if-error
    /// 5 min, stale retry interval 1 s, [`FailurePolicy::FailClosed`], per-thread
    /// copies of hot verdicts on.
    pub fn builder(inner: V) -> CachedVerifierBuilder<V> {
        CachedVerifierBuilder {
            inner,
            config: Config {
                max_capacity: DEFAULT_CAPACITY,
                negative_capacity: DEFAULT_NEGATIVE_CAPACITY,
                positive_ttl: DEFAULT_POSITIVE_TTL,
                negative_ttl: DEFAULT_NEGATIVE_TTL,
                stale_if_error: DEFAULT_STALE_IF_ERROR,
                stale_retry_interval: DEFAULT_STALE_RETRY_INTERVAL,
                failure_policy: FailurePolicy::FailClosed,
                thread_copies: true,
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
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            hits: get(&c.hits),
            misses: get(&c.misses),
            stale_served: get(&c.stale_served),
            negative_hits: get(&c.negative_hits),
            remote_errors: get(&c.remote_errors),
            coalesced_waits: get(&c.coalesced_waits),
            fail_open: get(&c.fail_open),
            invalidations: get(&c.invalidations),
        }
    }

    /// Approximate number of valid and invalid verdicts held (moka updates its counts
    /// lazily).
    pub fn entry_count(&self) -> u64 {
        let core = &self.shared.core;
        core.positive.entry_count() + core.negative.entry_count()
    }

    /// Removes every cached verdict of `key_id` (fresh or stale) and returns how many
    /// valid verdicts were held for it. A lookup that starts after this returns asks the
    /// wrapped verifier again.
    pub async fn invalidate_key_id(&self, key_id: &str) -> usize {
        self.shared.core.invalidate_key_id(key_id).await
    }

    /// Drops every cached verdict, valid or invalid, fresh or stale.
    pub fn invalidate_all(&self) {
        self.shared.core.invalidate_all();
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
        // Bump first: a verdict being fetched right now must not be cached after us.
        self.epoch.fetch_add(1, Ordering::AcqRel);
        count!(self.counters, invalidations, "keygate_cache_invalidations_total");
        let digests = lock(&self.index).take(key_id);
        for (digest, _) in &digests {
            self.positive.invalidate(digest);
        }
        self.retire_copies();
        let id: Arc<str> = Arc::from(key_id);
        // moka applies the predicate to every read from here on, so no later lookup
        // sees a matching refusal; a failure here means closures were not enabled.
        if let Err(e) = self.negative.invalidate_entries_if(move |_, (_, named)| named.as_deref() == Some(&*id)) {
            tracing::error!(error = %e, "cache: could not drop the key id's refusals; dropping all refusals");
            self.negative.invalidate_all();
        }
        tracing::debug!(key_id, entries = digests.len(), "cache: invalidated key id");
        digests.len()
    }

    pub(crate) fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        count!(self.counters, invalidations, "keygate_cache_invalidations_total");
        // moka guarantees that entries inserted before this call are never returned again.
        self.positive.invalidate_all();
        self.retire_copies();
        self.negative.invalidate_all();
        lock(&self.index).by_key_id.clear();
        tracing::debug!("cache: dropped every entry");
    }

    /// Makes every thread's copies unservable. Called *after* a valid verdict leaves
    /// moka: a copy taken before the removal carries the old epoch, and a lookup after
    /// it cannot find the verdict in moka to copy it again.
    fn retire_copies(&self) {
        self.copies_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// A fresh valid verdict for `digest`, from this thread's copies or from moka.
    /// `Err` carries what moka holds when it is not fresh (stale, or nothing).
    fn fresh(&self, digest: &KeyDigest, now: Instant) -> Result<Principal, Option<Arc<Positive>>> {
        let copies = self.config.thread_copies;
        if copies {
            if let Some(principal) = front::get(self, digest, now) {
                return Ok(principal);
            }
        }
        // Read before moka: an invalidation between the two makes the copy stale at once.
        let epoch = self.copies_epoch.load(Ordering::Acquire);
        match self.positive.get(digest) {
            Some(entry) if now < entry.fresh_until => {
                if copies {
                    front::put(self, *digest, epoch, &entry);
                }
                Ok(entry.principal.clone())
            }
            other => Err(other),
        }
    }

    fn millis_since_origin(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(u64::MAX)
    }

    async fn store_valid(&self, digest: KeyDigest, principal: &Principal, epoch: u64) {
        let ttl = self.config.positive_ttl;
        if ttl.is_zero() || self.config.max_capacity == 0 {
            return;
        }
        let now = Instant::now();
        let mut keep = ttl.saturating_add(self.config.stale_if_error);
        let mut fresh = ttl;
        if let Some(expires_at) = principal.expires_at() {
            let left = expires_at - OffsetDateTime::now_utc();
            let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
            keep = keep.min(left);
            fresh = fresh.min(left);
        }
        if fresh.is_zero() {
            return;
        }
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Positive {
            principal: principal.clone(),
            serial,
            fresh_until: now + fresh,
            stale_until: now + keep,
            lifetime: keep,
            next_refresh_ms: AtomicU64::new(0),
        });
        self.positive.insert(digest, entry);
        lock(&self.index).add(principal.key_id_arc(), digest, serial);
        // An invalidation that read the index before we added to it has missed this
        // entry: take it out ourselves.
        if self.epoch.load(Ordering::Acquire) != epoch {
            self.positive.invalidate(&digest);
            self.retire_copies();
        }
    }

    async fn store_invalid(&self, digest: KeyDigest, reason: Reason, key_id: Option<Arc<str>>, epoch: u64) {
        if self.positive.remove(&digest).is_some() {
            self.retire_copies();
        }
        if self.config.negative_ttl.is_zero() || self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        self.negative.insert(digest, (reason, key_id));
    }

    fn serve_stale(&self, entry: &Positive) -> Verdict {
        count!(self.counters, stale_served, "keygate_cache_stale_served_total");
        tracing::warn!(key_id = entry.principal.key_id(), "serving stale verdict: the verifier failed");
        Verdict::Valid(entry.principal.clone())
    }

    fn on_error(&self, err: VerifyError) -> Result<Verdict, VerifyError> {
        match self.config.failure_policy {
            FailurePolicy::FailClosed => Err(err),
            FailurePolicy::FailOpen => {
                count!(self.counters, fail_open, "keygate_cache_fail_open_total");
                tracing::warn!(error = %err, "verifier failed; FailurePolicy::FailOpen lets the request through anonymously");
                Ok(Verdict::Valid(Principal::fail_open()))
            }
        }
    }
}

impl<V: Verifier> Shared<V> {
    /// One call to the wrapped verifier per digest at a time; everyone else waits for
    /// its answer.
    async fn flight(&self, digest: KeyDigest, key: &ApiKey) -> Result<Verdict, VerifyError> {
        let core = &self.core;
        let cell = self.join_or_start(digest);
        let guard = FlightGuard { flights: &core.flights, digest, cell: Some(cell) };
        // If the caller running the initializer is cancelled, `get_or_init` lets the
        // next waiter run its own.
        guard.cell().get_or_init(|| self.load(digest, key)).await.clone()
    }

    /// The flight to wait on: the one in progress if it started in the current epoch,
    /// else a new one. A flight started before an invalidation may carry an answer from
    /// before it, which a lookup starting after the invalidation must not get.
    fn join_or_start(&self, digest: KeyDigest) -> Arc<Flight> {
        let core = &self.core;
        let mut flights = lock(&core.flights);
        let epoch = core.epoch.load(Ordering::Acquire);
        match flights.entry(digest) {
            MapEntry::Occupied(o) if o.get().0 == epoch => {
                count!(core.counters, coalesced_waits, "keygate_cache_coalesced_waits_total");
                Arc::clone(&o.get().1)
            }
            // The older flight's holders still get its answer; their guards see that it
            // is no longer the one in the map and leave the map alone.
            MapEntry::Occupied(mut o) => {
                let cell = Arc::new(OnceCell::new());
                o.insert((epoch, Arc::clone(&cell)));
                cell
            }
            MapEntry::Vacant(v) => Arc::clone(&v.insert((epoch, Arc::new(OnceCell::new()))).1),
        }
    }

    async fn load(&self, digest: KeyDigest, key: &ApiKey) -> Result<Verdict, VerifyError> {
        let core = &self.core;
        // A caller that missed the cache just before the previous flight for this key
        // finished lands here: answer from what that flight cached.
        if let Some(entry) = core.positive.get(&digest).filter(|e| Instant::now() < e.fresh_until) {
            return Ok(Verdict::Valid(entry.principal.clone()));
        }
        if let Some((reason, key_id)) = core.negative.get(&digest) {
            return Ok(Verdict::Invalid { reason, key_id });
        }
        let epoch = core.epoch.load(Ordering::Acquire);
        let result = self.inner.verify(key).await;
        match &result {
            Ok(Verdict::Valid(principal)) => core.store_valid(digest, principal, epoch).await,
            Ok(Verdict::Invalid { reason, key_id }) => core.store_invalid(digest, *reason, key_id.clone(), epoch).await,
            Err(err) => {
                count!(core.counters, remote_errors, "keygate_cache_remote_errors_total");
                tracing::debug!(error = %err, digest = ?digest, "cache: verifier failed");
            }
        }
        result
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

/// Per-thread copies of fresh valid verdicts, looked up before moka.
///
/// A copy is served only if it belongs to the asking cache, was taken in the cache's
/// current copies epoch (bumped after every removal of a valid verdict, invalidations
/// included) and is still fresh. The epoch is read before moka is, so a copy taken
/// across a removal is born stale.
mod front {
    use std::cell::RefCell;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::{Core, Positive};
    use crate::clock::Instant;
    use crate::key::KeyDigest;
    use crate::principal::Principal;

    /// Slots per thread: enough for the keys that make most of one thread's traffic,
    /// small enough to stay in its L1/L2 cache.
    pub(super) const SLOTS: usize = 128;
    /// One hit in this many goes to moka anyway, so that its frequency sketch still
    /// sees hot keys (else it would evict them first under capacity pressure).
    const MOKA_SAMPLE: u32 = 32;

    static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(1);

    pub(super) fn new_cache_id() -> u64 {
        NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed)
    }

    struct Slot {
        cache: u64,
        epoch: u64,
        digest: KeyDigest,
        entry: Arc<Positive>,
    }

    #[derive(Default)]
    struct Copies {
        slots: Vec<Option<Slot>>,
        lookups: u32,
    }

    thread_local! {
        static COPIES: RefCell<Copies> = RefCell::default();
    }

    fn index(digest: &KeyDigest) -> usize {
        // A SHA-256 digest is uniform: its first bytes are as good as any hash.
        let b = digest.as_bytes();
        usize::from(u16::from_le_bytes([b[0], b[1]])) % SLOTS
    }

    pub(super) fn get(core: &Core, digest: &KeyDigest, now: Instant) -> Option<Principal> {
        COPIES.with(|cell| {
            let mut copies = cell.try_borrow_mut().ok()?;
            copies.lookups = copies.lookups.wrapping_add(1);
            if copies.lookups % MOKA_SAMPLE == 0 {
                return None;
            }
            let slot = copies.slots.get(index(digest))?.as_ref()?;
            let current = slot.cache == core.id
                && slot.epoch == core.copies_epoch.load(Ordering::Acquire)
                && slot.digest == *digest
                && now < slot.entry.fresh_until;
            current.then(|| slot.entry.principal.clone())
        })
    }

    pub(super) fn put(core: &Core, digest: KeyDigest, epoch: u64, entry: &Arc<Positive>) {
        COPIES.with(|cell| {
            let Ok(mut copies) = cell.try_borrow_mut() else { return };
            if copies.slots.is_empty() {
                copies.slots.resize_with(SLOTS, || None);
            }
            copies.slots[index(&digest)] = Some(Slot { cache: core.id, epoch, digest, entry: Arc::clone(entry) });
        });
    }
}

impl<V: Verifier> Verifier for CachedVerifier<V> {
    fn verify_now(&self, key: &ApiKey) -> Option<Result<Verdict, VerifyError>> {
        // Fresh hits only: anything stale, missing or failing takes the async path.
        let core = &self.shared.core;
        let digest = key.digest();
        match core.fresh(&digest, Instant::now()) {
            Ok(principal) => {
                count_hit!(core.counters, hits, "keygate_cache_hits_total");
                return Some(Ok(Verdict::Valid(principal)));
            }
            Err(Some(_stale)) => return None,
            Err(None) => {}
        }
        let (reason, key_id) = core.negative.get(&digest)?;
        count_hit!(core.counters, negative_hits, "keygate_cache_negative_hits_total");
        Some(Ok(Verdict::Invalid { reason, key_id }))
    }

    async fn verify(&self, key: &ApiKey) -> Result<Verdict, VerifyError> {
        let shared = &*self.shared;
        let core = &shared.core;
        let digest = key.digest();
        let now = Instant::now();
        let stale = match core.fresh(&digest, now) {
            Ok(principal) => {
                count_hit!(core.counters, hits, "keygate_cache_hits_total");
                return Ok(Verdict::Valid(principal));
            }
            Err(Some(entry)) => {
                if now < entry.stale_until
                    && core.millis_since_origin(now) < entry.next_refresh_ms.load(Ordering::Relaxed)
                {
                    // A refresh failed moments ago: do not make this request wait for
                    // another one.
                    return Ok(core.serve_stale(&entry));
                }
                Some(entry)
            }
            Err(None) => {
                if let Some((reason, key_id)) = core.negative.get(&digest) {
                    count_hit!(core.counters, negative_hits, "keygate_cache_negative_hits_total");
                    return Ok(Verdict::Invalid { reason, key_id });
                }
                None
            }
        };
        count!(core.counters, misses, "keygate_cache_misses_total");
        let err = match shared.flight(digest, key).await {
            Ok(verdict) => return Ok(verdict),
            Err(err) => err,
        };
        if let Some(entry) = stale {
            // Re-read: the entry may have been invalidated while the verifier was asked.
            let current = core.positive.get(&digest).filter(|e| e.serial == entry.serial);
            let now = Instant::now();
            if let Some(entry) = current.filter(|e| now < e.stale_until) {
                let retry_at = now + core.config.stale_retry_interval;
                entry.next_refresh_ms.fetch_max(core.millis_since_origin(retry_at), Ordering::Relaxed);
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
            .field("failure_policy", &core.config.failure_policy)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

    use super::*;
    use crate::{ApiKey, StaticVerifier};

    /// Sums every counter increment by name.
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
            Counter::from_arc(Arc::new(Named(key.name().to_owned(), self.0.clone())))
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn hits_reach_metrics_in_steps_and_stats_exactly() {
        let key = ApiKey::generate("kg").unwrap();
        let unknown = ApiKey::generate("kg").unwrap();
        let inner = StaticVerifier::new().with_key(&key, Principal::builder("key_1").build());
        let cache = CachedVerifier::builder(inner).build();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            cache.verify(&key).await.unwrap();
            cache.verify(&unknown).await.unwrap();
        });
        let recorder = Totals::default();
        let totals = recorder.0.clone();
        metrics::with_local_recorder(&recorder, || {
            for _ in 0..600 {
                assert!(matches!(cache.verify_now(&key), Some(Ok(Verdict::Valid(_)))));
                assert!(matches!(cache.verify_now(&unknown), Some(Ok(Verdict::Invalid { .. }))));
            }
        });
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.negative_hits, stats.misses), (600, 600, 2));
        let totals = totals.lock().unwrap();
        assert_eq!(totals.get("keygate_cache_hits_total"), Some(&(2 * HIT_METRIC_STEP)));
        assert_eq!(totals.get("keygate_cache_negative_hits_total"), Some(&(2 * HIT_METRIC_STEP)));
    }
}
