//! A fixed, mergeable latency histogram: log-linear buckets over microseconds.
//!
//! Why not `hdrhistogram` or a DDSketch crate: the edge keeps one histogram per usage row
//! (up to 10 000 rows per interval by default), recorded on every request and merged on
//! the key service inside a database transaction. That asks for a fixed layout both
//! sides agree on without negotiation, an index computed with two bit operations (no
//! logarithm on the request path), a dense array small enough to keep per row (208
//! buckets of `u32`, 832 bytes) and a sparse form small enough to store per minute.
//! `hdrhistogram` at the same precision over the same range keeps about 3.4 KB of `u64`
//! per histogram, and DDSketch's index is a logarithm; both would be more code to carry
//! across the wire than the 60 lines below.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Sub-buckets per power of two: 2³.
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Largest power of two with buckets of its own: `[2^27, 2^28)` µs.
const TOP_POWER: u32 = 27;

/// How many buckets a [`LatencyHistogram`] has: 208.
pub const LATENCY_BUCKETS: usize = (TOP_POWER as usize - SUB_BITS as usize + 2) * SUB;

/// Relative error bound of a reported quantile between 8 µs and 2^28 µs (about 268 s):
/// 6.25 %. Below, quantiles are exact; above, they are reported as about 268 s (the
/// exact maximum is kept beside the buckets).
pub const LATENCY_RELATIVE_ERROR: f64 = 1.0 / 16.0;

/// The bucket a latency of `us` microseconds falls in.
#[inline]
pub(crate) fn bucket_of(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let k = 63 - us.leading_zeros();
    if k > TOP_POWER {
        return LATENCY_BUCKETS - 1;
    }
    let sub = ((us >> (k - SUB_BITS)) as usize) & (SUB - 1);
    (k - SUB_BITS + 1) as usize * SUB + sub
}

/// The lowest latency of bucket `i`, and its width, in microseconds.
fn bounds_of(i: usize) -> (u64, u64) {
    if i < SUB {
        return (i as u64, 1);
    }
    let k = (i / SUB) as u32 + SUB_BITS - 1;
    let width = 1u64 << (k - SUB_BITS);
    ((1u64 << k) + (i % SUB) as u64 * width, width)
}

/// Latencies of the requests in one usage row: counts per bucket, their sum and maximum.
///
/// Merging two histograms adds their counts, so rows from many middlewares and many
/// intervals combine exactly. On the wire it is sparse:
/// `{"count": n, "sum_us": n, "max_us": n, "buckets": [[index, count], ...]}`, indexes
/// increasing, zero counts left out.
///
/// # Layout
///
/// Values are whole microseconds. Values 0 to 7 have a bucket each. Above, every power of
/// two `[2^k, 2^(k+1))` is cut into 8 equal sub-buckets, up to `2^28` µs (about 268 s);
/// longer latencies fall in the last bucket (the exact maximum is kept beside it). Bucket
/// `i` for `i >= 8` covers `[lower, lower + width)` with `k = i / 8 + 2`,
/// `width = 2^(k-3)`, `lower = 2^k + (i % 8) * width`.
///
/// A quantile is reported as the middle of its bucket, so it is within **6.25 %** of a
/// latency the quantile could have been (a bucket is at most 1/8 of its lower bound
/// wide), exact below 8 µs, and never above the recorded maximum.
///
/// ```
/// use std::time::Duration;
/// use keygate::LatencyHistogram;
///
/// let mut h = LatencyHistogram::new();
/// for ms in 1..=100 {
///     h.record(Duration::from_millis(ms));
/// }
/// let p50 = h.quantile(0.5).unwrap().as_secs_f64() * 1000.0;
/// assert!((p50 - 50.0).abs() <= 50.0 * keygate::LATENCY_RELATIVE_ERROR);
/// assert_eq!(h.max(), Duration::from_millis(100));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    buckets: Box<[u32; LATENCY_BUCKETS]>,
    count: u64,
    sum_us: u64,
    max_us: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram (allocates its 832-byte bucket array once).
    pub fn new() -> Self {
        Self { buckets: Box::new([0; LATENCY_BUCKETS]), count: 0, sum_us: 0, max_us: 0 }
    }

    /// Adds one latency. Counters saturate rather than wrap.
    #[inline]
    pub fn record(&mut self, latency: std::time::Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.record_us(us, 1);
    }

    #[inline]
    pub(crate) fn record_us(&mut self, us: u64, n: u32) {
        let b = &mut self.buckets[bucket_of(us)];
        *b = b.saturating_add(n);
        self.count = self.count.saturating_add(u64::from(n));
        self.sum_us = self.sum_us.saturating_add(us.saturating_mul(u64::from(n)));
        self.max_us = self.max_us.max(us);
    }

    /// Adds every count of `other` into this one.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a = a.saturating_add(*b);
        }
        self.count = self.count.saturating_add(other.count);
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self.max_us = self.max_us.max(other.max_us);
    }

    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Sum of the latencies recorded (saturating), for a mean.
    pub fn sum(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.sum_us)
    }

    /// The largest latency recorded, exact.
    pub fn max(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.max_us)
    }

    /// The latency below which a fraction `q` (0.0 to 1.0) of the requests fell, within
    /// [`LATENCY_RELATIVE_ERROR`]; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<std::time::Duration> {
        if self.count == 0 {
            return None;
        }
        let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
        // The rank of the quantile, 1-based: the smallest value with at least q·n below it.
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                let (lower, width) = bounds_of(i);
                let mid = if width == 1 { lower } else { lower + width / 2 };
                return Some(std::time::Duration::from_micros(mid.min(self.max_us)));
            }
        }
        Some(self.max())
    }

    /// `(index, count)` of the buckets that are not empty, in increasing order.
    pub fn buckets(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.buckets.iter().enumerate().filter(|(_, n)| **n > 0).map(|(i, n)| (i, *n))
    }

    /// Clears every count, keeping the allocation.
    // The edge moves its histograms into batches rather than clearing them; kept for
    // code that reuses one.
    #[allow(dead_code)]
    pub(crate) fn clear(&mut self) {
        self.buckets.fill(0);
        self.count = 0;
        self.sum_us = 0;
        self.max_us = 0;
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count)
            .field("sum_us", &self.sum_us)
            .field("max_us", &self.max_us)
            .field("buckets", &self.buckets().collect::<Vec<_>>())
            .finish()
    }
}

/// A histogram on the wire: its totals and the buckets that are not empty.
#[derive(Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
struct Sparse {
    /// Latencies recorded.
    count: u64,
    /// Their sum, microseconds.
    sum_us: u64,
    /// The largest, microseconds.
    max_us: u64,
    /// `[index, count]` pairs, indexes increasing, counts adding up to `count`.
    #[cfg_attr(feature = "server", schema(value_type = Vec<Vec<u64>>))]
    buckets: Vec<(usize, u32)>,
}

// The document describes the wire form: the sparse one.
#[cfg(feature = "server")]
impl utoipa::PartialSchema for LatencyHistogram {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        <Sparse as utoipa::PartialSchema>::schema()
    }
}

#[cfg(feature = "server")]
impl utoipa::ToSchema for LatencyHistogram {}

impl Serialize for LatencyHistogram {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Sparse { count: self.count, sum_us: self.sum_us, max_us: self.max_us, buckets: self.buckets().collect() }
            .serialize(s)
    }
}

impl<'de> Deserialize<'de> for LatencyHistogram {
    /// Refuses indexes out of range or out of order, and counts that do not add up to
    /// `count`: a histogram that reads is one that merges.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let sparse = Sparse::deserialize(d)?;
        let mut h = Self::new();
        let mut last = None;
        let mut total = 0u64;
        for (i, n) in sparse.buckets {
            if i >= LATENCY_BUCKETS {
                return Err(D::Error::custom(format_args!("latency bucket {i} out of range (0..{LATENCY_BUCKETS})")));
            }
            if last.is_some_and(|l| l >= i) {
                return Err(D::Error::custom("latency buckets must be in increasing order"));
            }
            last = Some(i);
            h.buckets[i] = n;
            total = total.saturating_add(u64::from(n));
        }
        if total != sparse.count {
            return Err(D::Error::custom(format_args!(
                "latency bucket counts add up to {total}, not count {}",
                sparse.count
            )));
        }
        if sparse.count > 0 && bucket_of(sparse.max_us) < last.unwrap_or(0) {
            return Err(D::Error::custom("latency max_us is below the highest bucket"));
        }
        h.count = sparse.count;
        h.sum_us = sparse.sum_us;
        h.max_us = sparse.max_us;
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_tile_the_range() {
        let mut expected_lower = 0;
        for i in 0..LATENCY_BUCKETS {
            let (lower, width) = bounds_of(i);
            assert_eq!(lower, expected_lower, "bucket {i}");
            assert_eq!(bucket_of(lower), i);
            assert_eq!(bucket_of(lower + width - 1), i);
            assert!(width == 1 || width as f64 / lower as f64 <= 1.0 / 8.0);
            expected_lower = lower + width;
        }
        assert_eq!(expected_lower, 1 << (TOP_POWER + 1));
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn quantiles_within_the_stated_error() {
        // A known distribution: 10 000 latencies, 1 µs apart from 100 µs up, plus a tail.
        let mut h = LatencyHistogram::new();
        let mut values: Vec<u64> = (0..10_000).map(|i| 100 + i * 7).collect();
        values.extend([1_000_000, 2_000_000, 250_000_000]);
        for &v in &values {
            h.record(Duration::from_micros(v));
        }
        values.sort_unstable();
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
            let exact = values[rank - 1] as f64;
            let got = h.quantile(q).unwrap().as_micros() as f64;
            assert!((got - exact).abs() <= exact * LATENCY_RELATIVE_ERROR, "q={q}: {got} vs {exact}");
        }
        assert_eq!(h.max(), Duration::from_micros(250_000_000));
        assert_eq!(h.count(), values.len() as u64);
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let (mut a, mut b, mut all) = (LatencyHistogram::new(), LatencyHistogram::new(), LatencyHistogram::new());
        for v in 0..5_000u64 {
            let us = v * v % 100_003;
            if v % 3 == 0 { &mut a } else { &mut b }.record_us(us, 1);
            all.record_us(us, 1);
        }
        a.merge(&b);
        assert_eq!(a, all);
    }

    #[test]
    fn sparse_form_round_trips_and_refuses_lies() {
        let mut h = LatencyHistogram::new();
        for us in [3, 3, 900, 70_000] {
            h.record_us(us, 1);
        }
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<LatencyHistogram>(&json).unwrap(), h);
        for bad in [
            r#"{"count":1,"sum_us":1,"max_us":1,"buckets":[[208,1]]}"#,
            r#"{"count":2,"sum_us":1,"max_us":9,"buckets":[[9,1],[8,1]]}"#,
            r#"{"count":5,"sum_us":1,"max_us":1,"buckets":[[1,1]]}"#,
            r#"{"count":1,"sum_us":1,"max_us":1,"buckets":[[100,1]]}"#,
            r#"{"count":0,"sum_us":0,"max_us":0,"buckets":[],"extra":1}"#,
        ] {
            assert!(serde_json::from_str::<LatencyHistogram>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_has_no_quantile() {
        assert_eq!(LatencyHistogram::new().quantile(0.5), None);
    }
}
