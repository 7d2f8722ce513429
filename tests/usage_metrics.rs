//! The pipeline's counters reach the `metrics` facade. A binary of its own: it installs
//! the process-wide recorder.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygate::usage_metrics as metric;
use keygate::{ExportError, FlushError, UsageBatch, UsageExporter, UsagePipeline};
use keygate::{Outcome, UsageEvent, UsageSink};
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

fn event() -> UsageEvent {
    UsageEvent {
        at: time::OffsetDateTime::UNIX_EPOCH,
        key_id: None,
        owner: None,
        outcome: Outcome::NoKey,
        method: "GET".into(),
        route: "/".into(),
        status: 401,
        latency: Duration::from_micros(5),
        client_ip: None,
        request_id: None,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn counters_reach_the_metrics_facade() {
    let atomics: &'static Atomics = Box::leak(Box::default());
    metrics::set_global_recorder(Shared(atomics)).unwrap();

    let (sink, handle) = UsagePipeline::builder()
        .capacity(8)
        .batch_size(8)
        .flush_interval(Duration::from_secs(3_600))
        .build(FailOnce::default())
        .unwrap();
    for _ in 0..12 {
        sink.record(event());
    }
    assert_eq!(atomics.counter(metric::DROPPED), 4, "drops are counted as they happen");
    assert_eq!(handle.flush().await, Err(FlushError::Failed { batches: 1, events: 8 }));
    for _ in 0..3 {
        sink.record(event());
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
