//! The pipeline's and the aggregator's counters reach the `metrics` facade. A binary of
//! its own: it installs the process-wide recorder.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygate::usage_metrics as metric;
use keygate::{AggregateBatch, AggregateExporter, UsageAggregator};
use keygate::{DecidedRequest, Outcome, UsageSink};
use keygate::{ExportError, FlushError, UsageBatch, UsageExporter, UsagePipeline};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Keeps every counter and gauge as an atomic, by name.
#[derive(Default)]
struct Atomics(Mutex<HashMap<String, Arc<AtomicU64>>>);

impl Atomics {
    fn cell(&self, name: &str) -> Arc<AtomicU64> {
        self.0.lock().unwrap().entry(name.to_owned()).or_default().clone()
    }

    fn counter(&self, name: &str) -> u64 {
        self.cell(name).load(Ordering::SeqCst)
    }

    fn gauge(&self, name: &str) -> f64 {
        f64::from_bits(self.cell(name).load(Ordering::SeqCst))
    }
}

struct Shared(&'static Atomics);

impl Recorder for Shared {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.0.cell(key.name()))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.0.cell(key.name()))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Fails its first batch, keeps count of the rest.
#[derive(Default)]
struct FailOnce(AtomicU64);

impl UsageExporter for FailOnce {
    async fn export(&self, _: UsageBatch) -> Result<(), ExportError> {
        if self.0.fetch_add(1, Ordering::SeqCst) == 0 { Err(ExportError::other("first batch fails")) } else { Ok(()) }
    }
}

/// A request without a key, as the layer records it.
fn record(sink: &impl UsageSink) {
    let request = DecidedRequest::new(std::time::Instant::now(), &http::Method::GET, "/", 401, Outcome::NoKey)
        .with_latency(Duration::from_micros(5));
    sink.record(&request);
}

/// The process-wide recorder, installed once for every test of this binary (their
/// metric names do not overlap).
fn recorder() -> &'static Atomics {
    static ATOMICS: std::sync::OnceLock<&'static Atomics> = std::sync::OnceLock::new();
    ATOMICS.get_or_init(|| {
        let atomics: &'static Atomics = Box::leak(Box::default());
        metrics::set_global_recorder(Shared(atomics)).unwrap();
        atomics
    })
}

#[tokio::test(flavor = "current_thread")]
async fn counters_reach_the_metrics_facade() {
    let atomics = recorder();

    let (sink, handle) = UsagePipeline::builder()
        .capacity(8)
        .batch_size(8)
        .flush_interval(Duration::from_secs(3_600))
        .build(FailOnce::default())
        .unwrap();
    for _ in 0..12 {
        record(&sink);
    }
    assert_eq!(atomics.counter(metric::DROPPED), 4, "drops are counted as they happen");
    assert_eq!(handle.flush().await, Err(FlushError::Failed { batches: 1, events: 8 }));
    for _ in 0..3 {
        record(&sink);
    }
    let stats = handle.shutdown().await;

    assert_eq!(atomics.counter(metric::ENQUEUED), stats.enqueued);
    assert_eq!(atomics.counter(metric::DROPPED), stats.dropped);
    assert_eq!(atomics.counter(metric::EXPORTED), stats.exported);
    assert_eq!(atomics.counter(metric::EXPORT_FAILURES), stats.export_failures);
    assert_eq!(atomics.counter(metric::LOST), stats.lost);
    assert_eq!((stats.enqueued, stats.dropped, stats.exported, stats.export_failures, stats.lost), (11, 4, 3, 1, 8));
    assert_eq!(atomics.gauge(metric::QUEUE_DEPTH), 0.0);
}

/// Fails its first batch, takes the rest.
#[derive(Default)]
struct FailFirstBatch(AtomicU64);

impl AggregateExporter for FailFirstBatch {
    async fn export(&self, _: &AggregateBatch) -> Result<(), ExportError> {
        if self.0.fetch_add(1, Ordering::SeqCst) == 0 { Err(ExportError::other("first attempt fails")) } else { Ok(()) }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn aggregator_counters_reach_the_metrics_facade() {
    let atomics = recorder();
    let (sink, handle) = UsageAggregator::builder()
        .max_rows(1)
        .flush_interval(Duration::from_secs(3_600))
        .build(FailFirstBatch::default())
        .unwrap();
    let key: std::sync::Arc<str> = "key_m".into();
    for route in ["/a", "/b", "/c"] {
        let request = DecidedRequest::new(std::time::Instant::now(), &http::Method::GET, route, 200, Outcome::Allowed)
            .with_key(&key, None)
            .with_client_ip(Some("10.0.0.1".parse().unwrap()));
        sink.record(&request);
    }
    assert!(matches!(handle.flush().await, Err(FlushError::Pending { batches: 1, requests: 3 })));
    assert_eq!(atomics.gauge(metric::BATCHES_PENDING), 1.0);
    handle.flush().await.unwrap();
    let stats = handle.shutdown().await;
    record(&sink);

    assert_eq!(atomics.counter(metric::AGGREGATED), stats.recorded);
    assert_eq!(atomics.counter(metric::OVERFLOWED), stats.overflowed);
    assert_eq!(atomics.counter(metric::REQUESTS_EXPORTED), stats.exported);
    assert_eq!(atomics.counter(metric::BATCHES_EXPORTED), stats.batches_exported);
    assert_eq!(atomics.counter(metric::AGGREGATE_EXPORT_FAILURES), stats.export_failures);
    assert_eq!(atomics.counter(metric::REQUESTS_LOST), stats.lost);
    assert_eq!(atomics.counter(metric::NETWORKS_DROPPED), stats.networks_dropped);
    assert_eq!(atomics.counter(metric::REQUESTS_REFUSED), 1);
    assert_eq!(atomics.gauge(metric::BATCHES_PENDING), 0.0);
    assert_eq!(atomics.gauge(metric::ROWS), 0.0, "the last cut found the table empty");
    assert_eq!(
        (stats.recorded, stats.overflowed, stats.exported, stats.batches_exported, stats.export_failures, stats.lost),
        (3, 2, 3, 1, 1, 0)
    );
}
