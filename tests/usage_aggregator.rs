//! The usage aggregator: exact totals under concurrency, bounded rows and networks under a
//! flood, minutes, retries with the same batch, pending overflow, shutdown. Exporters
//! here are real implementations of the trait that keep what they receive.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keygate::{AggregateBatch, AggregateExporter, AggregatorBuildError, ExportError, FlushError, UsageAggregator};
use keygate::{DecidedRequest, OVERFLOW_METHOD, OVERFLOW_ROUTE, Outcome, UsageSink};

/// Keeps every batch it is offered (attempts included); fails the first `fail_first`
/// calls, before or after keeping the batch.
#[derive(Default)]
struct Collect {
    offered: Mutex<Vec<AggregateBatch>>,
    fail_first: AtomicU64,
    /// Keep the batch, then fail: an answer lost after the receiver committed.
    commit_then_fail: AtomicBool,
    /// Answer 413 to everything.
    refuse: AtomicBool,
}

impl Collect {
    fn failing(n: u64) -> Self {
        Self { fail_first: AtomicU64::new(n), ..Self::default() }
    }

    /// The batches delivered, each once, in order (an attempt that failed before the
    /// receiver kept it is not here; one that committed and failed is, once).
    fn delivered(&self) -> Vec<AggregateBatch> {
        let mut seen = HashSet::new();
        self.offered.lock().unwrap().iter().filter(|b| seen.insert(b.batch_id.clone())).cloned().collect()
    }

    fn requests(&self) -> u64 {
        self.delivered().iter().map(AggregateBatch::requests).sum()
    }
}

impl AggregateExporter for Collect {
    async fn export(&self, batch: &AggregateBatch) -> Result<(), ExportError> {
        if self.refuse.load(Ordering::SeqCst) {
            return Err(ExportError::Status { status: 413 });
        }
        let fail = self.fail_first.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if fail && !self.commit_then_fail.load(Ordering::SeqCst) {
            return Err(ExportError::other("receiver is down"));
        }
        self.offered.lock().unwrap().push(batch.clone());
        if fail { Err(ExportError::Timeout) } else { Ok(()) }
    }
}

/// Takes a batch and never answers.
struct Hang;

impl AggregateExporter for Hang {
    async fn export(&self, _: &AggregateBatch) -> Result<(), ExportError> {
        std::future::pending().await
    }
}

/// One request as the layer hands it over.
struct Req {
    started: Instant,
    key: Option<Arc<str>>,
    route: String,
    method: http::Method,
    status: u16,
    outcome: Outcome,
    latency: Duration,
    ip: Option<IpAddr>,
}

impl Req {
    fn new(key: Option<&str>, route: &str) -> Self {
        Self {
            started: Instant::now(),
            key: key.map(Arc::from),
            route: route.to_owned(),
            method: http::Method::GET,
            status: 200,
            outcome: Outcome::Allowed,
            latency: Duration::from_micros(100),
            ip: None,
        }
    }

    fn outcome(mut self, outcome: Outcome, status: u16) -> Self {
        self.outcome = outcome;
        self.status = status;
        self
    }

    fn record(&self, sink: &impl UsageSink) {
        let mut r = DecidedRequest::new(self.started, &self.method, &self.route, self.status, self.outcome)
            .with_latency(self.latency)
            .with_client_ip(self.ip);
        if let Some(key) = &self.key {
            r = r.with_key(key, None);
        }
        sink.record(&r);
    }
}

/// Row key without the minute, for totals.
type Key = (Option<String>, String, String, Outcome);

fn totals(batches: &[AggregateBatch]) -> HashMap<Key, u64> {
    let mut out = HashMap::new();
    for b in batches {
        for r in &b.rows {
            let key = (r.key_id.as_deref().map(str::to_owned), r.route.to_string(), r.method.to_string(), r.outcome);
            *out.entry(key).or_default() += r.requests;
        }
    }
    out
}

/// Every row well formed: no (minute, key, route, method, outcome) twice in a batch,
/// requests equal to the histogram's and the status classes' counts.
fn check_rows(batches: &[AggregateBatch]) {
    for b in batches {
        assert_eq!(b.batch_id.len(), 32);
        let mut keys = HashSet::new();
        for r in &b.rows {
            assert!(keys.insert((r.minute, r.key_id.clone(), r.route.clone(), r.method.clone(), r.outcome)), "{r:?}");
            assert_eq!(r.minute % 60, 0);
            assert_eq!((r.latency.count(), r.status.total()), (r.requests, r.requests), "{r:?}");
        }
    }
}

fn unix_ms_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

const HOUR: Duration = Duration::from_secs(3_600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_are_exact_under_concurrent_recording_and_cuts() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 50_000;
    let exporter = Arc::new(Collect::default());
    // Cuts every 20 ms, while the threads record.
    let (sink, handle) =
        UsageAggregator::builder().flush_interval(Duration::from_millis(20)).build(exporter.clone()).unwrap();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let sink = sink.clone();
            std::thread::spawn(move || {
                let keys = ["key_a", "key_b", "key_c"];
                let reqs: Vec<Req> = (0..30)
                    .map(|i| {
                        let req = Req::new(Some(keys[i % 3]), ["/a", "/b/{id}", "/c"][(i / 3) % 3]);
                        if i % 5 == 0 { req.outcome(Outcome::InsufficientScope, 403) } else { req }
                    })
                    .collect();
                for i in 0..PER_THREAD {
                    reqs[(i + t) % reqs.len()].record(&sink);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = handle.shutdown().await;
    let n = (THREADS * PER_THREAD) as u64;
    assert_eq!((stats.recorded, stats.exported, stats.lost, stats.overflowed), (n, n, 0, 0), "{stats:?}");
    let batches = exporter.delivered();
    check_rows(&batches);
    assert_eq!(exporter.requests(), n);

    // Per key, route and outcome: what each thread recorded, added up.
    let mut expected: HashMap<Key, u64> = HashMap::new();
    for t in 0..THREADS {
        for i in 0..PER_THREAD {
            let j = (i + t) % 30;
            let key = ["key_a", "key_b", "key_c"][j % 3];
            let route = ["/a", "/b/{id}", "/c"][(j / 3) % 3];
            let outcome = if j % 5 == 0 { Outcome::InsufficientScope } else { Outcome::Allowed };
            *expected.entry((Some(key.into()), route.into(), "GET".into(), outcome)).or_default() += 1;
        }
    }
    assert_eq!(totals(&batches), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_paths_and_keys_stays_under_the_row_cap_and_adds_up() {
    const FLOOD: u64 = 1_000_000;
    const MAX_ROWS: usize = 10_000;
    const MAX_OVERFLOW: usize = 1_000;
    let exporter = Arc::new(Collect::default());
    let (sink, handle) = UsageAggregator::builder()
        .max_rows(MAX_ROWS)
        .max_overflow_rows(MAX_OVERFLOW)
        .flush_interval(HOUR)
        .build(exporter.clone())
        .unwrap();
    let method = http::Method::GET;
    let started = Instant::now();
    let mut path = String::new();
    let mut key_ids: Vec<Arc<str>> = Vec::new();
    for i in 0..FLOOD {
        use std::fmt::Write;
        path.clear();
        write!(path, "/files/{i}").unwrap();
        // Half without a key (distinct unknown keys: no key id), half from 20 000
        // distinct existing keys, every request on a new raw path.
        let k = (i / 2 % 20_000) as usize;
        if i % 2 == 1 && key_ids.len() <= k {
            key_ids.push(format!("key_{k:05}").into());
        }
        let r = DecidedRequest::new(started, &method, &path, 401, Outcome::NotFound);
        if i % 2 == 0 {
            sink.record(&r)
        } else {
            sink.record(&r.with_key(&key_ids[k], None))
        }
        if i % 100_000 == 0 {
            let rows = sink.stats().rows;
            assert!(rows <= MAX_ROWS + MAX_OVERFLOW + 1_024, "{rows} rows");
        }
    }
    let during = sink.stats();
    assert!(during.rows <= MAX_ROWS + MAX_OVERFLOW + 1_024, "{during:?}");
    let stats = handle.shutdown().await;
    assert_eq!((stats.recorded, stats.exported, stats.lost), (FLOOD, FLOOD, 0), "{stats:?}");
    let batches = exporter.delivered();
    assert_eq!(batches.len(), 1);
    let batch = &batches[0];
    check_rows(&batches);
    assert_eq!(batch.requests(), FLOOD, "nothing lost");
    assert!(batch.rows.len() <= MAX_ROWS + MAX_OVERFLOW + 1_024, "{} rows", batch.rows.len());
    let detailed = batch.rows.iter().filter(|r| &*r.route != OVERFLOW_ROUTE).count() as u64;
    assert_eq!(detailed, MAX_ROWS as u64, "the table filled up to its cap");
    assert_eq!(batch.overflowed, FLOOD - detailed, "every request past the cap is counted as overflowed");
    assert_eq!(stats.overflowed, batch.overflowed);
    let overflow: Vec<_> = batch.rows.iter().filter(|r| &*r.route == OVERFLOW_ROUTE).collect();
    assert!(overflow.iter().all(|r| &*r.method == OVERFLOW_METHOD && r.outcome == Outcome::NotFound));
    let per_key = overflow.iter().filter(|r| r.key_id.is_some()).count();
    assert_eq!(per_key, MAX_OVERFLOW, "per-key overflow rows up to their cap");
    assert!(overflow.iter().any(|r| r.key_id.is_none()), "then the table-wide row");

    // Per key, the totals are exact as long as the key got its overflow row.
    let mut by_key: HashMap<&str, u64> = HashMap::new();
    for r in batch.rows.iter().filter(|r| r.key_id.is_some()) {
        *by_key.entry(r.key_id.as_deref().unwrap()).or_default() += r.requests;
    }
    let with_overflow_row: HashSet<&str> = overflow.iter().filter_map(|r| r.key_id.as_deref()).collect();
    for key in with_overflow_row {
        assert_eq!(by_key[key], FLOOD / 2 / 20_000, "{key}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn overflow_keeps_totals_per_key_and_outcome_exact() {
    let exporter = Arc::new(Collect::default());
    let (sink, handle) = UsageAggregator::builder()
        .max_rows(2)
        .max_overflow_rows(2)
        .flush_interval(HOUR)
        .build(exporter.clone())
        .unwrap();
    // Two rows fit; key_a's and key_b's further routes overflow into their own rows, per
    // outcome; key_c finds the overflow rows used up too and goes to the table-wide row.
    Req::new(Some("key_a"), "/1").record(&sink);
    Req::new(Some("key_a"), "/2").record(&sink);
    for route in ["/3", "/4", "/5"] {
        Req::new(Some("key_a"), route).record(&sink);
    }
    Req::new(Some("key_b"), "/6").outcome(Outcome::RateLimited, 429).record(&sink);
    Req::new(Some("key_c"), "/7").record(&sink);
    Req::new(None, "/8").outcome(Outcome::NoKey, 401).record(&sink);
    // Existing rows keep taking requests.
    Req::new(Some("key_a"), "/1").record(&sink);
    handle.flush().await.unwrap();
    let t = totals(&exporter.delivered());
    let row = |key: Option<&str>, route: &str, method: &str, outcome| {
        t.get(&(key.map(str::to_owned), route.to_owned(), method.to_owned(), outcome)).copied()
    };
    assert_eq!(row(Some("key_a"), "/1", "GET", Outcome::Allowed), Some(2));
    assert_eq!(row(Some("key_a"), "/2", "GET", Outcome::Allowed), Some(1));
    assert_eq!(row(Some("key_a"), OVERFLOW_ROUTE, OVERFLOW_METHOD, Outcome::Allowed), Some(3));
    assert_eq!(row(Some("key_b"), OVERFLOW_ROUTE, OVERFLOW_METHOD, Outcome::RateLimited), Some(1));
    assert_eq!(row(None, OVERFLOW_ROUTE, OVERFLOW_METHOD, Outcome::Allowed), Some(1), "key_c");
    assert_eq!(row(None, OVERFLOW_ROUTE, OVERFLOW_METHOD, Outcome::NoKey), Some(1));
    assert_eq!(t.len(), 6);
    let delivered = exporter.delivered();
    assert_eq!(delivered[0].overflowed, 6);

    // The next interval starts with room again.
    Req::new(Some("key_a"), "/9").record(&sink);
    handle.flush().await.unwrap();
    assert_eq!(&*exporter.delivered()[1].rows[0].route, "/9");
    let stats = handle.shutdown().await;
    assert_eq!((stats.recorded, stats.overflowed, stats.exported), (10, 6, 10));
}

#[tokio::test(flavor = "current_thread")]
async fn minute_boundaries_split_rows() {
    let exporter = Arc::new(Collect::default());
    let (sink, handle) = UsageAggregator::builder().flush_interval(HOUR).build(exporter.clone()).unwrap();
    let now = Instant::now();
    let now_ms = unix_ms_now();
    let this_minute = now_ms.div_euclid(60_000) * 60_000;
    // The request that started at Unix time `at_ms`.
    let at = |at_ms: i64| {
        let back = Duration::from_millis((now_ms - at_ms) as u64);
        let mut r = Req::new(Some("key_m"), "/m");
        r.started = now.checked_sub(back).expect("the monotonic clock goes back three minutes");
        r
    };
    // Mid-minute in three consecutive minutes (2, 3 and 1 requests), and two requests
    // half a second on either side of a boundary.
    let minutes = [this_minute - 180_000, this_minute - 120_000, this_minute - 60_000];
    for (m, n) in minutes.iter().zip([2, 3, 1]) {
        for _ in 0..n {
            at(m + 30_000).record(&sink);
        }
    }
    at(this_minute - 60_000 - 500).record(&sink);
    at(this_minute - 60_000 + 500).record(&sink);
    handle.flush().await.unwrap();
    let batch = exporter.delivered().pop().unwrap();
    let mut by_minute: Vec<(i64, u64)> = batch.rows.iter().map(|r| (r.minute, r.requests)).collect();
    by_minute.sort_unstable();
    let s = |ms: i64| ms / 1_000;
    assert_eq!(by_minute, [(s(minutes[0]), 2), (s(minutes[1]), 3 + 1), (s(minutes[2]), 1 + 1)]);
    for r in &batch.rows {
        // The last request of each row, in Unix milliseconds, inside its minute.
        assert!(r.last_at_ms >= r.minute * 1_000 && r.last_at_ms < (r.minute + 60) * 1_000, "{r:?}");
    }
    let boundary_row = batch.rows.iter().find(|r| r.minute == s(minutes[2])).unwrap();
    assert!((boundary_row.last_at_ms - (minutes[2] + 30_000)).abs() < 200, "{boundary_row:?}");
    handle.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_committed_then_failed_is_sent_again_unchanged() {
    let exporter = Arc::new(Collect { commit_then_fail: AtomicBool::new(true), ..Collect::failing(2) });
    let (sink, handle) = UsageAggregator::builder().flush_interval(HOUR).build(exporter.clone()).unwrap();
    for i in 0..50 {
        let mut r = Req::new(Some("key_x"), ["/a", "/b"][i % 2]);
        r.latency = Duration::from_micros(10 * i as u64);
        r.ip = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, (i % 3) as u8)));
        r.record(&sink);
    }
    assert_eq!(handle.flush().await, Err(FlushError::Pending { batches: 1, requests: 50 }));
    // New requests while the batch is pending go into the next batch, not into it.
    Req::new(Some("key_x"), "/c").record(&sink);
    assert_eq!(handle.flush().await, Err(FlushError::Pending { batches: 2, requests: 51 }));
    handle.flush().await.unwrap();

    let offered = exporter.offered.lock().unwrap().clone();
    assert_eq!(offered.len(), 4, "two failed attempts, the retry, the next batch");
    let first = serde_json::to_vec(&offered[0]).unwrap();
    assert_eq!(serde_json::to_vec(&offered[1]).unwrap(), first, "the same bytes under the same id");
    assert_eq!(serde_json::to_vec(&offered[2]).unwrap(), first);
    assert_ne!(offered[3].batch_id, offered[0].batch_id);
    assert_eq!((offered[0].requests(), offered[3].requests()), (50, 1));
    assert_eq!(offered[0].networks.len(), 1, "one /24 for key_x");
    let stats = handle.shutdown().await;
    assert_eq!((stats.exported, stats.lost, stats.export_failures, stats.batches_exported), (51, 0, 2, 2));
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_pending_queue_gives_up_the_oldest_and_reports_it_in_the_next_delivered_batch() {
    let exporter = Arc::new(Collect::failing(u64::MAX));
    let (sink, handle) =
        UsageAggregator::builder().max_pending_batches(2).flush_interval(HOUR).build(exporter.clone()).unwrap();
    // Three intervals of 3, 4 and 5 requests while the receiver is down: the first is
    // pushed out when the third is cut.
    for n in [3, 4, 5] {
        for _ in 0..n {
            Req::new(Some("key_p"), "/p").record(&sink);
        }
        assert!(matches!(handle.flush().await, Err(FlushError::Pending { .. })));
    }
    let stats = handle.stats();
    assert_eq!((stats.pending_batches, stats.pending_requests, stats.lost), (2, 9, 3), "{stats:?}");

    exporter.fail_first.store(0, Ordering::SeqCst);
    handle.flush().await.unwrap();
    let delivered = exporter.delivered();
    assert_eq!(delivered.iter().map(|b| (b.requests(), b.dropped)).collect::<Vec<_>>(), [(4, 3), (5, 0)]);
    let stats = handle.shutdown().await;
    assert_eq!((stats.recorded, stats.exported, stats.lost), (12, 9, 3));
}

#[tokio::test(flavor = "current_thread")]
async fn a_refused_batch_is_given_up_at_once_and_a_drop_count_travels_alone_if_it_must() {
    let exporter = Arc::new(Collect::default());
    exporter.refuse.store(true, Ordering::SeqCst);
    let (sink, handle) = UsageAggregator::builder().flush_interval(HOUR).build(exporter.clone()).unwrap();
    for _ in 0..6 {
        Req::new(Some("key_r"), "/r").record(&sink);
    }
    handle.flush().await.unwrap();
    assert_eq!((handle.stats().lost, handle.stats().pending_batches, handle.stats().export_failures), (6, 0, 1));
    exporter.refuse.store(false, Ordering::SeqCst);
    // No requests since: the drop count goes out in an otherwise empty batch.
    handle.flush().await.unwrap();
    let delivered = exporter.delivered();
    assert_eq!(delivered.len(), 1);
    assert_eq!((delivered[0].rows.len(), delivered[0].dropped), (0, 6));
    handle.flush().await.unwrap();
    assert_eq!(exporter.delivered().len(), 1, "an empty interval sends nothing");
    handle.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn empty_intervals_send_nothing() {
    let exporter = Arc::new(Collect::default());
    let (sink, handle) =
        UsageAggregator::builder().flush_interval(Duration::from_millis(20)).build(exporter.clone()).unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(exporter.offered.lock().unwrap().is_empty());
    Req::new(None, "/").record(&sink);
    let mut waited = 0;
    while exporter.offered.lock().unwrap().is_empty() && waited < 2_000 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 5;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(exporter.delivered().len(), 1, "one interval had a request");
    handle.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_delivers_the_last_interval_within_the_deadline() {
    let exporter = Arc::new(Collect::failing(2));
    let (sink, handle) = UsageAggregator::builder()
        .flush_interval(HOUR)
        .shutdown_deadline(Duration::from_secs(5))
        .build(exporter.clone())
        .unwrap();
    for _ in 0..9 {
        Req::new(Some("key_s"), "/s").record(&sink);
    }
    let started = Instant::now();
    let stats = handle.shutdown().await;
    // Two failures, then retries after a backoff (about 0.5–1 s, then 1–2 s): delivered
    // before the deadline.
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!((stats.exported, stats.lost, stats.export_failures), (9, 0, 2), "{stats:?}");
    assert_eq!(exporter.requests(), 9);

    // From then on, requests are refused and counted.
    Req::new(None, "/").record(&sink);
    assert_eq!(sink.stats().dropped, 1);
    assert_eq!(sink.flush().await, Err(FlushError::Closed));
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_with_a_hanging_exporter_returns_in_time_and_counts_the_loss() {
    let (sink, handle) = UsageAggregator::builder().shutdown_deadline(Duration::from_millis(150)).build(Hang).unwrap();
    for _ in 0..10 {
        Req::new(Some("key_h"), "/h").record(&sink);
    }
    let started = Instant::now();
    let stats = handle.shutdown().await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(140) && took < Duration::from_millis(600), "took {took:?}");
    assert_eq!((stats.recorded, stats.exported, stats.lost, stats.pending_batches), (10, 0, 10, 0));
}

#[tokio::test(flavor = "current_thread")]
async fn dropping_every_handle_delivers_what_was_recorded() {
    let exporter = Arc::new(Collect::default());
    let (sink, handle) = UsageAggregator::builder().flush_interval(HOUR).build(exporter.clone()).unwrap();
    let other = handle.aggregator();
    drop(handle);
    Req::new(Some("key_d"), "/d").record(&sink);
    drop(sink);
    Req::new(Some("key_d"), "/d").record(&other);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(exporter.offered.lock().unwrap().is_empty(), "a live clone keeps the worker aggregating");
    drop(other);
    for _ in 0..400 {
        if exporter.requests() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(exporter.requests(), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn client_networks_are_bounded_per_key_and_in_total() {
    let exporter = Arc::new(Collect::default());
    let (sink, handle) = UsageAggregator::builder()
        .max_networks_per_key(4)
        .max_networks(10)
        .flush_interval(HOUR)
        .build(exporter.clone())
        .unwrap();
    // key_n from 9 networks (two addresses each, on two routes); 5 more keys from 2 each.
    for net in 0..9u8 {
        for (host, route) in [(1, "/x"), (2, "/y")] {
            let mut r = Req::new(Some("key_n"), route);
            r.ip = Some(IpAddr::V4(Ipv4Addr::new(198, 51, net, host)));
            r.record(&sink);
        }
    }
    for k in 0..5 {
        for net in 0..2u8 {
            let mut r = Req::new(Some(&format!("key_{k}")), "/x");
            r.ip = Some(IpAddr::V4(Ipv4Addr::new(203, 0, net, 9)));
            r.record(&sink);
        }
    }
    // Without a key, no network is kept.
    let mut anonymous = Req::new(None, "/x");
    anonymous.ip = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    anonymous.record(&sink);
    handle.flush().await.unwrap();
    let batch = exporter.delivered().pop().unwrap();
    let of_n: HashSet<&str> =
        batch.networks.iter().filter(|n| &*n.key_id == "key_n").map(|n| n.network.as_str()).collect();
    assert_eq!(of_n.len(), 4, "{:?}", batch.networks);
    assert!(of_n.contains("198.51.0.0/24"), "the first ones seen are kept");
    assert_eq!(batch.networks.len(), 10, "the total cap");
    assert!(batch.networks_dropped >= 5 + 4, "{}", batch.networks_dropped);
    assert!(batch.networks.iter().all(|n| n.minute % 60 == 0));
    handle.shutdown().await;
}

#[test]
fn builder_refuses_impossible_settings() {
    let err = |b: keygate::UsageAggregatorBuilder| b.build(Hang).map(|_| ()).unwrap_err();
    assert_eq!(err(UsageAggregator::builder()), AggregatorBuildError::NoRuntime);
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        assert_eq!(err(UsageAggregator::builder().max_rows(0)), AggregatorBuildError::Zero("max_rows"));
        assert_eq!(
            err(UsageAggregator::builder().max_pending_batches(0)),
            AggregatorBuildError::Zero("max_pending_batches")
        );
        assert_eq!(
            err(UsageAggregator::builder().flush_interval(Duration::ZERO)),
            AggregatorBuildError::Zero("flush_interval")
        );
        let (sink, handle) = UsageAggregator::builder().build(Hang).unwrap();
        assert_eq!((sink.max_rows(), sink.flush_interval()), (10_000, Duration::from_secs(10)));
        drop((sink, handle));
    });
}

/// Whatever a client writes in its request line, the rows stay ones the key service
/// takes: a long extension method counts as `*`, a raw path stops before a control
/// character. (One odd request must not spoil a whole interval's batch.)
#[tokio::test(flavor = "current_thread")]
async fn odd_methods_and_paths_from_clients_make_rows_the_key_service_takes() {
    use axum::body::Body;
    use tower::ServiceExt;

    let exporter = Arc::new(Collect::default());
    let (sink, handle) = UsageAggregator::builder().flush_interval(HOUR).build(exporter.clone()).unwrap();
    let service = tower::ServiceBuilder::new()
        .layer(keygate::ApiKeyLayer::new(keygate::StaticVerifier::new()).usage(sink))
        .service_fn(|_: http::Request<Body>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        });
    let long = http::Method::from_bytes(&[b'X'; 40]).unwrap();
    let short = http::Method::from_bytes(b"PROPFIND").unwrap();
    for (method, path) in
        [(long, "/a"), (short, "/b"), (http::Method::GET, "/c\u{85}d"), (http::Method::GET, "/\u{85}")]
    {
        let req = http::Request::builder().method(method).uri(path).body(Body::empty()).unwrap();
        assert_eq!(service.clone().oneshot(req).await.unwrap().status(), 401);
    }
    handle.shutdown().await;
    let mut rows: Vec<(String, String)> = exporter
        .delivered()
        .iter()
        .flat_map(|b| b.rows.iter())
        .map(|r| (r.method.to_string(), r.route.to_string()))
        .collect();
    rows.sort();
    let expected = [("*", "/a"), ("GET", "/"), ("GET", "/c"), ("PROPFIND", "/b")];
    assert_eq!(rows, expected.map(|(m, r)| (m.to_owned(), r.to_owned())));
}
