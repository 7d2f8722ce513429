//! Usage cost: what `record` costs a request, in the aggregator (the default path to the
//! key service) and in the raw-event pipeline; what one flush of the aggregator costs at
//! 10 000 distinct rows; how many events per second the pipeline moves.
//!
//! `cargo bench --bench usage_pipeline` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_main};
use keygate::{AggregateBatch, AggregateExporter, ExportError, UsageAggregator, UsageBatch, UsageExporter};
use keygate::{DecidedRequest, Outcome, UsagePipeline, UsageSink};

/// Counts and forgets.
#[derive(Default)]
struct Discard(AtomicU64);

impl UsageExporter for Discard {
    async fn export(&self, batch: UsageBatch) -> Result<(), ExportError> {
        self.0.fetch_add(batch.events.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Encodes each batch as `HttpUsageExporter` would, and forgets it.
#[derive(Default)]
struct Encode {
    bytes: AtomicUsize,
    rows: AtomicUsize,
}

impl AggregateExporter for Encode {
    async fn export(&self, batch: &AggregateBatch) -> Result<(), ExportError> {
        let body = serde_json::to_vec(batch).map_err(ExportError::Encode)?;
        self.bytes.store(body.len(), Ordering::Relaxed);
        self.rows.store(batch.rows.len(), Ordering::Relaxed);
        Ok(())
    }
}

/// Never finishes: keeps the queue full.
struct Hang;

impl UsageExporter for Hang {
    async fn export(&self, _: UsageBatch) -> Result<(), ExportError> {
        std::future::pending().await
    }
}

/// What the layer hands a sink per request.
struct Request {
    started: Instant,
    key: Arc<str>,
    owner: Arc<str>,
    route: String,
}

impl Request {
    fn new(key: &str, route: &str) -> Self {
        Self { started: Instant::now(), key: key.into(), owner: "acme".into(), route: route.into() }
    }

    fn decided(&self) -> DecidedRequest<'_> {
        DecidedRequest::new(self.started, &http::Method::GET, &self.route, 200, Outcome::Allowed)
            .with_key(&self.key, Some(&self.owner))
            .with_latency(Duration::from_micros(420))
            .with_client_ip(Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))))
            .with_request_id(Some("01J8Z4"))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    // One worker thread for the background task, the bench thread records: the two cores.
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
}

/// Times `iters` calls to `record` in chunks; `between` runs untimed after each chunk.
fn time_records(
    sink: &impl UsageSink,
    request: &DecidedRequest<'_>,
    iters: u64,
    mut between: impl FnMut(),
) -> Duration {
    const CHUNK: u64 = 16_384;
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        let started = Instant::now();
        for _ in 0..n {
            sink.record(black_box(request));
        }
        total += started.elapsed();
        left -= n;
        between();
    }
    total
}

fn record(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("usage_record");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(3));
    let request = Request::new("key_2bT9x0", "/reports/{id}");
    let decided = request.decided();

    // The aggregator, the row existing: hash, lock, add.
    let (aggregator, handle) =
        UsageAggregator::builder().flush_interval(Duration::from_secs(3_600)).build(Encode::default()).expect("agg");
    aggregator.record(&decided);
    group.bench_function("aggregator_existing_row", |b| {
        b.iter_custom(|iters| time_records(&aggregator, &decided, iters, || ()))
    });

    // A thousand live rows (100 keys × 10 routes), requests cycling through them.
    let requests: Vec<Request> =
        (0..1_000).map(|i| Request::new(&format!("key_{:04}", i / 10), &format!("/route/{}", i % 10))).collect();
    let decided_all: Vec<DecidedRequest<'_>> = requests.iter().map(Request::decided).collect();
    for d in &decided_all {
        aggregator.record(d);
    }
    group.bench_function("aggregator_1000_rows", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for i in 0..iters {
                aggregator.record(black_box(&decided_all[i as usize % decided_all.len()]));
            }
            started.elapsed()
        })
    });
    let stats = aggregator.stats();
    assert_eq!(stats.overflowed, 0, "{stats:?}");
    drop(aggregator);
    rt.block_on(handle.shutdown());

    // The raw-event pipeline with room: the owned event is built (route and request id
    // allocated) and pushed; the queue is emptied outside the timing between chunks.
    let (sink, handle) = UsagePipeline::builder().capacity(65_536).build(Discard::default()).expect("pipeline");
    group.bench_function("pipeline_with_room", |b| {
        b.iter_custom(|iters| time_records(&sink, &decided, iters, || rt.block_on(handle.flush()).expect("flush")))
    });
    let stats = sink.stats();
    assert_eq!(stats.dropped, 0, "the queue had room: {stats:?}");
    rt.block_on(handle.shutdown());

    // The queue is full and the exporter hangs: the drop path.
    let (sink, handle) = UsagePipeline::builder().capacity(1_024).batch_size(1_024).build(Hang).expect("pipeline");
    for _ in 0..2_048 {
        sink.record(&decided);
    }
    group.bench_function("pipeline_when_full", |b| b.iter_custom(|iters| time_records(&sink, &decided, iters, || ())));
    drop(sink);
    drop(handle);
    group.finish();
}

fn export(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("usage_export");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    const ROWS: usize = 10_000;
    group.throughput(Throughput::Elements(ROWS as u64));

    // 1 000 keys × 10 routes, each row with a few requests; the clock runs from the flush
    // call (cut, merge, JSON encoding) to its answer.
    let requests: Vec<Request> =
        (0..ROWS).map(|i| Request::new(&format!("key_{:04}", i / 10), &format!("/route/{}", i % 10))).collect();
    let exporter = Arc::new(Encode::default());
    let (aggregator, handle) = UsageAggregator::builder()
        .flush_interval(Duration::from_secs(3_600))
        .build(exporter.clone())
        .expect("aggregator");
    group.bench_function("flush_10000_rows", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for r in &requests {
                    let d = r.decided();
                    for _ in 0..3 {
                        aggregator.record(&d);
                    }
                }
                let started = Instant::now();
                rt.block_on(handle.flush()).expect("flush");
                total += started.elapsed();
                assert_eq!(exporter.rows.load(Ordering::Relaxed), ROWS);
            }
            total
        })
    });
    eprintln!(
        "usage_export: {} rows encode to {} bytes of JSON",
        exporter.rows.load(Ordering::Relaxed),
        exporter.bytes.load(Ordering::Relaxed)
    );
    drop(aggregator);
    rt.block_on(handle.shutdown());
    group.finish();
}

fn sustained(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("usage_sustained");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    const EVENTS: u64 = 1_000_000;
    group.throughput(Throughput::Elements(EVENTS));

    // One producer records as fast as it can; the clock stops when the exporter has
    // every event that got in.
    let exporter = Arc::new(Discard::default());
    let (sink, handle) = UsagePipeline::builder().build(exporter.clone()).expect("pipeline");
    let request = Request::new("key_2bT9x0", "/reports/{id}");
    let dropped_before = sink.stats().dropped;
    group.bench_function("pipeline_1M_events_into_discard", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let before = exporter.0.load(Ordering::Relaxed);
                let dropped = sink.stats().dropped;
                let started = Instant::now();
                for _ in 0..EVENTS {
                    sink.record(&request.decided());
                }
                let accepted = EVENTS - (sink.stats().dropped - dropped);
                rt.block_on(handle.flush()).expect("flush");
                total += started.elapsed();
                assert_eq!(exporter.0.load(Ordering::Relaxed) - before, accepted);
            }
            total
        })
    });
    let stats = sink.stats();
    eprintln!(
        "usage_sustained: {} events offered, {} exported, {} dropped ({:.3}%)",
        stats.enqueued + stats.dropped,
        stats.exported,
        stats.dropped - dropped_before,
        100.0 * (stats.dropped - dropped_before) as f64 / (stats.enqueued + stats.dropped).max(1) as f64
    );
    drop(sink);
    rt.block_on(handle.shutdown());
    group.finish();
}

/// `criterion_group!` makes an undocumented `pub fn`; keep `missing_docs` quiet about it.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::record, super::export, super::sustained);
}
criterion_main!(group::benches);
