//! The row table requests are folded into: shards of small hash tables, each behind a
//! mutex that is only ever held for one addition or one swap.
//!
//! A thread writes into its own shard (assigned round robin the first time it records),
//! so threads on different cores do not share a lock or a cache line; when its shard is
//! busy it takes the next free one. A row is found by hashing the request's borrowed
//! (minute, key id, route, method, outcome): nothing is allocated unless the row is new.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::mem;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::HashTable;

use crate::outcome::Outcome;
use crate::usage::{DecidedRequest, LatencyHistogram};
use crate::usage::{NetworkPrefix, OVERFLOW_METHOD, OVERFLOW_ROUTE, StatusCounts};

/// How many table-wide overflow rows (no key, one per minute and outcome) may be created
/// for requests' own minutes in one interval. Past it, such requests count in the minute
/// their interval began, of which there are at most two per shard and outcome, so the
/// table stays bounded even when requests that started hours apart overflow together.
pub(super) const MAX_WIDE_ROWS: usize = 1_024;

/// Caps, as the builder was given them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_rows: usize,
    pub(super) max_overflow_rows: usize,
    pub(super) max_networks_per_key: usize,
    pub(super) max_networks: usize,
}

/// Unix time without reading the wall clock per request: a fixed `Instant` and the Unix
/// milliseconds it corresponds to, which the worker refreshes every interval (so a step
/// of the wall clock is followed within one interval).
pub(super) struct Clock {
    base: Instant,
    /// Unix milliseconds at `base`.
    offset_ms: AtomicI64,
    /// The minute the current interval began (Unix seconds), for the last-resort rows.
    interval_minute: AtomicI64,
}

impl Clock {
    fn new() -> Self {
        let clock = Self { base: Instant::now(), offset_ms: AtomicI64::new(0), interval_minute: AtomicI64::new(0) };
        clock.refresh();
        clock
    }

    pub(super) fn refresh(&self) {
        let now = Instant::now();
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, millis);
        self.offset_ms.store(unix - millis(now.saturating_duration_since(self.base)), Ordering::Relaxed);
        self.interval_minute.store(minute_of(unix), Ordering::Relaxed);
    }

    /// Unix milliseconds of `at`.
    #[inline]
    pub(super) fn unix_ms(&self, at: Instant) -> i64 {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        match at.checked_duration_since(self.base) {
            Some(after) => offset + millis(after),
            None => offset - millis(self.base.saturating_duration_since(at)),
        }
    }
}

#[inline]
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2_000).saturating_mul(1_000) + i64::from(d.subsec_millis())
}

#[inline]
fn micros(d: Duration) -> u64 {
    d.as_secs().saturating_mul(1_000_000).saturating_add(u64::from(d.subsec_micros()))
}

/// The start of the minute of `unix_ms`, in Unix seconds.
#[inline]
pub(super) fn minute_of(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(60_000) * 60
}

/// The standard methods, by the index rows compare instead of the method's name.
const STANDARD_METHODS: [http::Method; 9] = [
    http::Method::GET,
    http::Method::POST,
    http::Method::PUT,
    http::Method::DELETE,
    http::Method::PATCH,
    http::Method::HEAD,
    http::Method::OPTIONS,
    http::Method::CONNECT,
    http::Method::TRACE,
];
/// The method id of overflow rows ([`OVERFLOW_METHOD`]).
const ANY_METHOD: u8 = STANDARD_METHODS.len() as u8;
/// The method id of extension methods, compared by name.
const EXTENSION_METHOD: u8 = ANY_METHOD + 1;

/// Longest extension method kept by name (the key service's limit); longer ones count
/// as [`OVERFLOW_METHOD`], so a client cannot grow rows or spoil a batch with them.
const MAX_METHOD_LEN: usize = 32;

#[inline]
fn method_id(m: &http::Method) -> u8 {
    match STANDARD_METHODS.iter().position(|s| s == m) {
        Some(i) => i as u8,
        None if m.as_str().len() <= MAX_METHOD_LEN => EXTENSION_METHOD,
        None => ANY_METHOD,
    }
}

/// What identifies a row, borrowed from the request.
#[derive(Clone, Copy)]
struct Fields<'a> {
    minute: i64,
    key_id: Option<&'a Arc<str>>,
    route: &'a str,
    method: &'a http::Method,
    method_id: u8,
    outcome: Outcome,
}

impl Fields<'_> {
    fn method_name(&self) -> &str {
        if self.method_id == ANY_METHOD { OVERFLOW_METHOD } else { self.method.as_str() }
    }

    fn overflow(self) -> Self {
        Self { route: OVERFLOW_ROUTE, method_id: ANY_METHOD, ..self }
    }

    fn wide(self) -> Self {
        Self { key_id: None, ..self.overflow() }
    }
}

/// One row as the request path keeps it.
pub(super) struct Row {
    /// The hash of the row's key, kept so that growing a table or merging shards never
    /// hashes again.
    pub(super) hash: u64,
    pub(super) minute: i64,
    pub(super) key_id: Option<Arc<str>>,
    pub(super) route: Arc<str>,
    pub(super) method: Arc<str>,
    method_id: u8,
    pub(super) outcome: Outcome,
    pub(super) requests: u64,
    pub(super) status: StatusCounts,
    pub(super) latency: LatencyHistogram,
    /// When the row's last request started; made Unix time when the table is cut.
    pub(super) last_at: Instant,
    /// The network of the row's last request: while requests keep coming from it, the
    /// network set is not looked at.
    last_network: Option<NetworkPrefix>,
}

/// `a` and `b` hold the same text; the pointer test first, because a key id's `Arc`
/// comes from the same `Principal` request after request.
#[inline]
fn same(a: &Arc<str>, b: &str) -> bool {
    (std::ptr::eq(a.as_ptr(), b.as_ptr()) && a.len() == b.len()) || **a == *b
}

impl Row {
    #[inline]
    fn is(&self, f: &Fields<'_>) -> bool {
        self.minute == f.minute
            && self.outcome == f.outcome
            && match (&self.key_id, f.key_id) {
                (Some(a), Some(b)) => same(a, b),
                (None, None) => true,
                _ => false,
            }
            && self.method_id == f.method_id
            && same(&self.route, f.route)
            && (f.method_id != EXTENSION_METHOD || same(&self.method, f.method.as_str()))
    }

    fn new(hash: u64, f: &Fields<'_>, at: Instant, methods: &Methods) -> Self {
        Self {
            hash,
            minute: f.minute,
            key_id: f.key_id.cloned(),
            route: if f.route == OVERFLOW_ROUTE { methods.overflow_route.clone() } else { Arc::from(f.route) },
            method: methods.get(f.method_id, f.method_name()),
            method_id: f.method_id,
            outcome: f.outcome,
            requests: 0,
            status: StatusCounts::default(),
            latency: LatencyHistogram::new(),
            last_at: at,
            last_network: None,
        }
    }

    #[inline]
    fn add(&mut self, status: u16, latency_us: u64, at: Instant) {
        self.requests = self.requests.saturating_add(1);
        self.status.add(status);
        self.latency.record_us(latency_us, 1);
        if at > self.last_at {
            self.last_at = at;
        }
    }
}

/// The method names rows share, so that a new row of a standard method allocates only
/// its route.
struct Methods {
    standard: [Arc<str>; STANDARD_METHODS.len()],
    any: Arc<str>,
    overflow_route: Arc<str>,
}

impl Methods {
    fn new() -> Self {
        Self {
            standard: STANDARD_METHODS.map(|m| Arc::from(m.as_str())),
            any: Arc::from(OVERFLOW_METHOD),
            overflow_route: Arc::from(OVERFLOW_ROUTE),
        }
    }

    fn get(&self, id: u8, name: &str) -> Arc<str> {
        match self.standard.get(usize::from(id)) {
            Some(shared) => shared.clone(),
            None if id == ANY_METHOD => self.any.clone(),
            None => Arc::from(name),
        }
    }
}

/// The networks one key was seen from in the interval, in this shard.
pub(super) struct KeyNetworks {
    pub(super) hash: u64,
    pub(super) key_id: Arc<str>,
    /// Each network with the first minute it was seen.
    pub(super) networks: Vec<(NetworkPrefix, i64)>,
}

/// What one shard holds for the current interval; the worker swaps it out whole.
#[derive(Default)]
pub(super) struct Tables {
    pub(super) rows: HashTable<Row>,
    pub(super) networks: HashTable<KeyNetworks>,
}

/// How many entries of each capped kind a shard's tables hold, to give back to the
/// global counts when the tables are cut.
#[derive(Default, Clone, Copy)]
struct Held {
    rows: usize,
    overflow_rows: usize,
    wide_rows: usize,
    networks: usize,
}

/// The current minute as a span of `Instant`s, so that a request's minute is two
/// comparisons rather than arithmetic on its start time.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
    minute: i64,
}

#[derive(Default)]
pub(super) struct Shard {
    tables: Tables,
    /// The minute of this shard's last request; dropped at each cut, when the clock
    /// anchor is refreshed.
    window: Option<Window>,
    held: Held,
    /// Requests of this interval folded into overflow rows.
    overflowed: u64,
    /// Networks of this interval not kept.
    networks_dropped: u64,
    /// Since the start, never reset: the counters `stats()` reads.
    totals: Totals,
}

/// Running totals of one shard, or of all of them.
#[derive(Default, Clone, Copy, Debug)]
pub(super) struct Totals {
    pub(super) recorded: u64,
    pub(super) overflowed: u64,
    pub(super) networks_dropped: u64,
}

/// Keeps each shard's lock and counters on cache lines of their own.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// What one cut took out of the shards besides their tables.
#[derive(Default, Debug, Clone, Copy)]
pub(super) struct CutCounts {
    pub(super) overflowed: u64,
    pub(super) networks_dropped: u64,
}

pub(super) struct Table {
    shards: Box<[Padded<Mutex<Shard>>]>,
    mask: usize,
    hasher: foldhash::fast::RandomState,
    limits: Limits,
    methods: Methods,
    pub(super) clock: Clock,
    rows: AtomicUsize,
    overflow_rows: AtomicUsize,
    wide_rows: AtomicUsize,
    networks: AtomicUsize,
}

/// Every thread's number, handed out the first time it records: its shard is this
/// number modulo the shard count.
static NEXT_HOME: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static HOME: Cell<usize> = const { Cell::new(usize::MAX) };
}

#[inline]
fn home() -> usize {
    HOME.with(|home| {
        let mut h = home.get();
        if h == usize::MAX {
            h = NEXT_HOME.fetch_add(1, Ordering::Relaxed);
            home.set(h);
        }
        h
    })
}

/// Takes one slot of `count` if fewer than `max` are taken.
#[inline]
fn reserve(count: &AtomicUsize, max: usize) -> bool {
    // A load first: once the cap is reached, a flood of new rows does not keep writing
    // the shared counter.
    if count.load(Ordering::Relaxed) >= max {
        return false;
    }
    if count.fetch_add(1, Ordering::Relaxed) < max {
        return true;
    }
    // Lost the race for the last slot.
    count.fetch_sub(1, Ordering::Relaxed);
    false
}

impl Table {
    pub(super) fn new(limits: Limits, shards: usize) -> Self {
        let shards = shards.next_power_of_two();
        Self {
            shards: (0..shards).map(|_| Padded::default()).collect(),
            mask: shards - 1,
            hasher: foldhash::fast::RandomState::default(),
            limits,
            methods: Methods::new(),
            clock: Clock::new(),
            rows: AtomicUsize::new(0),
            overflow_rows: AtomicUsize::new(0),
            wide_rows: AtomicUsize::new(0),
            networks: AtomicUsize::new(0),
        }
    }

    pub(super) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Rows (of every kind) in the current tables.
    pub(super) fn rows(&self) -> usize {
        self.rows.load(Ordering::Relaxed)
            + self.overflow_rows.load(Ordering::Relaxed)
            + self.wide_rows.load(Ordering::Relaxed)
    }

    #[inline]
    fn hash(&self, f: &Fields<'_>) -> u64 {
        // Four writes rather than a tuple's ten: the fixed-size fields packed into one
        // word (a minute is a multiple of 60, far below 2^55), then the three strings.
        // Field boundaries need not be marked: equal hashes are always compared in full.
        let mut h = self.hasher.build_hasher();
        h.write_u64(
            (u64::from(f.method_id) << 56)
                ^ ((f.minute as u64) << 8)
                ^ ((f.outcome as u64) << 1)
                ^ u64::from(f.key_id.is_some()),
        );
        h.write(f.key_id.map_or(&b""[..], |k| k.as_bytes()));
        h.write(f.route.as_bytes());
        if f.method_id == EXTENSION_METHOD {
            h.write(f.method.as_str().as_bytes());
        }
        h.finish()
    }

    #[inline]
    fn lock(&self) -> MutexGuard<'_, Shard> {
        let home = home();
        for i in 0..self.shards.len() {
            match self.shards[(home + i) & self.mask].0.try_lock() {
                Ok(shard) => return shard,
                // A panic while holding the lock cannot leave a row half-added in a way
                // that matters more than losing the count.
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.shards[home & self.mask].0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[inline]
    /// Folds one request into its row; `false` (and nothing recorded) once `closed` is
    /// set. The flag is read under the shard's lock: a request that takes the lock after
    /// the last cut released it sees the flag, so none can slip in after that cut.
    pub(super) fn record(&self, r: &DecidedRequest<'_>, closed: &AtomicBool) -> bool {
        let started = r.started();
        let method = r.method();
        let method_id = method_id(method);
        let latency_us = micros(r.latency());
        let network = match (r.key_id(), r.client_ip()) {
            (Some(_), Some(ip)) => Some(NetworkPrefix::of(ip)),
            _ => None,
        };

        let mut guard = self.lock();
        if closed.load(Ordering::Relaxed) {
            return false;
        }
        let shard = &mut *guard;
        let minute = match shard.window {
            Some(w) if started >= w.start && started < w.end => w.minute,
            _ => self.enter_minute(&mut shard.window, started),
        };
        let f = Fields { minute, key_id: r.key_id(), route: r.route(), method, method_id, outcome: r.outcome() };
        let hash = self.hash(&f);
        shard.totals.recorded += 1;
        let row = match shard.tables.rows.find_entry(hash, |row| row.is(&f)) {
            Ok(row) => row.into_mut(),
            Err(_) => self.new_row(shard, hash, &f, started),
        };
        row.add(r.status(), latency_us, started);
        if let (Some(network), Some(key_id)) = (network, f.key_id) {
            if row.last_network != Some(network) {
                row.last_network = Some(network);
                self.note_network(shard, key_id, network, f.minute);
            }
        }
        true
    }

    /// The minute `at` falls in, remembered as the shard's window.
    #[cold]
    fn enter_minute(&self, window: &mut Option<Window>, at: Instant) -> i64 {
        let at_ms = self.clock.unix_ms(at);
        let minute = minute_of(at_ms);
        let into = Duration::from_millis((at_ms - minute * 1_000) as u64);
        *window = at.checked_sub(into).and_then(|start| {
            let end = start.checked_add(Duration::from_secs(60))?;
            Some(Window { start, end, minute })
        });
        minute
    }

    /// The row a request with no row of its own goes to: a new one while the table has
    /// room, else the key's overflow row, else the table-wide one.
    #[cold]
    fn new_row<'s>(&self, shard: &'s mut Shard, hash: u64, f: &Fields<'_>, at: Instant) -> &'s mut Row {
        let limits = &self.limits;
        let mut rows = &mut shard.tables.rows;
        if reserve(&self.rows, limits.max_rows) {
            shard.held.rows += 1;
            return self.insert(rows, hash, f, at);
        }
        shard.overflowed += 1;
        shard.totals.overflowed += 1;
        if f.key_id.is_some() {
            let of = f.overflow();
            let hash = self.hash(&of);
            rows = match rows.find_entry(hash, |row| row.is(&of)) {
                Ok(row) => return row.into_mut(),
                Err(absent) => absent.into_table(),
            };
            if reserve(&self.overflow_rows, limits.max_overflow_rows) {
                shard.held.overflow_rows += 1;
                return self.insert(rows, hash, &of, at);
            }
        }
        let wide = f.wide();
        let hash = self.hash(&wide);
        rows = match rows.find_entry(hash, |row| row.is(&wide)) {
            Ok(row) => return row.into_mut(),
            Err(absent) => absent.into_table(),
        };
        if self.wide_rows.load(Ordering::Relaxed) < MAX_WIDE_ROWS {
            self.wide_rows.fetch_add(1, Ordering::Relaxed);
            shard.held.wide_rows += 1;
            return self.insert(rows, hash, &wide, at);
        }
        // The last resort: the minute this interval began.
        let last = Fields { minute: self.clock.interval_minute.load(Ordering::Relaxed), ..wide };
        let hash = self.hash(&last);
        rows = match rows.find_entry(hash, |row| row.is(&last)) {
            Ok(row) => return row.into_mut(),
            Err(absent) => absent.into_table(),
        };
        self.wide_rows.fetch_add(1, Ordering::Relaxed);
        shard.held.wide_rows += 1;
        self.insert(rows, hash, &last, at)
    }

    fn insert<'s>(&self, rows: &'s mut HashTable<Row>, hash: u64, f: &Fields<'_>, at: Instant) -> &'s mut Row {
        rows.insert_unique(hash, Row::new(hash, f, at, &self.methods), |row| row.hash).into_mut()
    }

    #[cold]
    fn note_network(&self, shard: &mut Shard, key_id: &Arc<str>, network: NetworkPrefix, minute: i64) {
        let hash = self.hasher.hash_one(&**key_id);
        let table = match shard.tables.networks.find_entry(hash, |k| same(&k.key_id, key_id)) {
            Ok(entry) => {
                let key = entry.into_mut();
                if let Some((_, first)) = key.networks.iter_mut().find(|(n, _)| *n == network) {
                    *first = (*first).min(minute);
                } else if key.networks.len() < self.limits.max_networks_per_key
                    && reserve(&self.networks, self.limits.max_networks)
                {
                    shard.held.networks += 1;
                    key.networks.push((network, minute));
                } else {
                    shard.networks_dropped += 1;
                    shard.totals.networks_dropped += 1;
                }
                return;
            }
            Err(absent) => absent.into_table(),
        };
        if reserve(&self.networks, self.limits.max_networks) {
            shard.held.networks += 1;
            table.insert_unique(
                hash,
                KeyNetworks { hash, key_id: key_id.clone(), networks: vec![(network, minute)] },
                |k| k.hash,
            );
        } else {
            shard.networks_dropped += 1;
            shard.totals.networks_dropped += 1;
        }
    }

    /// Swaps every shard's tables with the (empty) ones in `spares`, so that recording
    /// goes on into those while the caller merges what was cut. Each lock is held for a
    /// swap of a few words.
    pub(super) fn cut(&self, spares: &mut [Tables]) -> CutCounts {
        debug_assert_eq!(spares.len(), self.shards.len());
        let mut counts = CutCounts::default();
        for (shard, spare) in self.shards.iter().zip(spares.iter_mut()) {
            let (held, overflowed, networks_dropped) = {
                let mut shard = shard.0.lock().unwrap_or_else(PoisonError::into_inner);
                mem::swap(&mut shard.tables, spare);
                shard.window = None;
                (mem::take(&mut shard.held), mem::take(&mut shard.overflowed), mem::take(&mut shard.networks_dropped))
            };
            // Given back after the lock: a request that finds the cap reached in between
            // only overflows a little early.
            self.rows.fetch_sub(held.rows, Ordering::Relaxed);
            self.overflow_rows.fetch_sub(held.overflow_rows, Ordering::Relaxed);
            self.wide_rows.fetch_sub(held.wide_rows, Ordering::Relaxed);
            self.networks.fetch_sub(held.networks, Ordering::Relaxed);
            counts.overflowed += overflowed;
            counts.networks_dropped += networks_dropped;
        }
        counts
    }

    /// The running totals of every shard (takes each lock in turn).
    pub(super) fn totals(&self) -> Totals {
        let mut all = Totals::default();
        for shard in self.shards.iter() {
            let t = shard.0.lock().unwrap_or_else(PoisonError::into_inner).totals;
            all.recorded += t.recorded;
            all.overflowed += t.overflowed;
            all.networks_dropped += t.networks_dropped;
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_round_down_also_before_1970() {
        assert_eq!(minute_of(0), 0);
        assert_eq!(minute_of(59_999), 0);
        assert_eq!(minute_of(60_000), 60);
        assert_eq!(minute_of(-1), -60);
    }

    #[test]
    fn the_clock_maps_instants_to_unix_time() {
        let clock = Clock::new();
        let now = Instant::now();
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
        assert!((clock.unix_ms(now) - unix).abs() < 50);
        let earlier = clock.base.checked_sub(Duration::from_secs(90)).unwrap();
        assert!((clock.unix_ms(earlier) - (unix - 90_000)).abs() < 50);
    }

    #[test]
    fn row_size() {
        // The figures the builder's docs quote (64-bit targets).
        if cfg!(target_pointer_width = "64") {
            assert!(mem::size_of::<Row>() <= 176, "{}", mem::size_of::<Row>());
            assert!(mem::size_of::<crate::AggregateRow>() <= 168, "{}", mem::size_of::<crate::AggregateRow>());
        }
        assert_eq!(mem::size_of::<[u32; crate::LATENCY_BUCKETS]>(), 832);
    }
}
