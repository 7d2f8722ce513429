//! Usage pipeline cost: what `record` costs a request, and how many events per second the
//! pipeline moves into an exporter that discards them.
//!
//! `cargo bench --bench usage_pipeline` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_main};
use keygate::{ExportError, UsageBatch, UsageExporter, UsagePipeline};
use keygate::{Outcome, UsageEvent, UsageSink};
use time::OffsetDateTime;

/// Counts and forgets.
#[derive(Default)]
struct Discard(AtomicU64);

impl UsageExporter for Discard {
    async fn export(&self, batch: UsageBatch) -> Result<(), ExportError> {
        self.0.fetch_add(batch.events.len() as u64, Ordering::Relaxed);
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

/// What the layer builds per request.
fn event() -> UsageEvent {
    UsageEvent {
        at: OffsetDateTime::now_utc(),
        key_id: Some("key_2bT9x0".into()),
        owner: Some("acme".into()),
        outcome: Outcome::Allowed,
        method: "GET".into(),
        route: "/reports/{id}".into(),
        status: 200,
        latency: Duration::from_micros(420),
        client_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))),
        request_id: Some("01J8Z4".into()),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    // One worker thread for the pipeline, the bench thread produces: the two cores.
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
}

/// Times `iters` calls to `record` with events built beforehand, in chunks so that the
/// events in hand stay few; `between` runs untimed after each chunk.
fn time_records(sink: &UsagePipeline, template: &UsageEvent, iters: u64, mut between: impl FnMut()) -> Duration {
    const CHUNK: u64 = 16_384;
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        let events: Vec<UsageEvent> = (0..n).map(|_| template.clone()).collect();
        let started = Instant::now();
        for e in events {
            sink.record(black_box(e));
        }
        total += started.elapsed();
        left -= n;
        between();
    }
    total
}

fn enqueue(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let mut group = c.benchmark_group("usage_enqueue");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(3));

    // The queue has room: time only `record`, in chunks that fit the queue, emptying it
    // (outside the timing) between chunks. Events are built outside the timing too.
    let (sink, handle) = UsagePipeline::builder().capacity(65_536).build(Discard::default()).expect("pipeline");
    let template = event();
    group.bench_function("record_with_room", |b| {
        b.iter_custom(|iters| time_records(&sink, &template, iters, || rt.block_on(handle.flush()).expect("flush")))
    });
    let stats = sink.stats();
    assert_eq!(stats.dropped, 0, "the queue had room: {stats:?}");
    rt.block_on(handle.shutdown());

    // The queue is full and the exporter hangs: the drop path (the event is freed here).
    let (sink, handle) = UsagePipeline::builder().capacity(1_024).batch_size(1_024).build(Hang).expect("pipeline");
    for _ in 0..2_048 {
        sink.record(event());
    }
    group.bench_function("record_when_full", |b| b.iter_custom(|iters| time_records(&sink, &template, iters, || ())));
    drop(sink);
    drop(handle);
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

    // One producer builds events (as the layer would) and records them as fast as it can;
    // the clock stops when the exporter has every event that got in.
    let exporter = Arc::new(Discard::default());
    let (sink, handle) = UsagePipeline::builder().build(exporter.clone()).expect("pipeline");
    let dropped_before = sink.stats().dropped;
    group.bench_function("1M_events_into_discard", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let before = exporter.0.load(Ordering::Relaxed);
                let dropped = sink.stats().dropped;
                let started = Instant::now();
                for _ in 0..EVENTS {
                    sink.record(event());
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
    criterion::criterion_group!(benches, super::enqueue, super::sustained);
}
criterion_main!(group::benches);
