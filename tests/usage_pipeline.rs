//! The usage pipeline: bounded queue, batching by size and interval, drop accounting,
//! flush and shutdown. Exporters here are real implementations of the trait that keep
//! what they receive.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygate::{
    ChannelSink, ExportError, FlushError, PipelineBuildError, TracingSink, UsageBatch, UsageExporter, UsagePipeline,
};
use keygate::{DecidedRequest, Outcome, UsageEvent, UsageSink};

/// Records request `i` as the layer would: key `key_01` of `acme`, `GET /reports/{id}`,
/// 200, `i` µs, from 127.0.0.1, request id `req-{i}`.
fn record(sink: &impl UsageSink, i: usize) {
    record_as(sink, i, Outcome::Allowed, 200);
}

fn record_as(sink: &impl UsageSink, i: usize, outcome: Outcome, status: u16) {
    let (key, owner): (Arc<str>, Arc<str>) = ("key_01".into(), "acme".into());
    let id = format!("req-{i}");
    let request = DecidedRequest::new(std::time::Instant::now(), &http::Method::GET, "/reports/{id}", status, outcome)
        .with_key(&key, Some(&owner))
        .with_latency(Duration::from_micros(i as u64))
        .with_client_ip(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)))
        .with_request_id(Some(&id));
    sink.record(&request);
}

/// Keeps every batch; fails the first `fail_first` calls.
#[derive(Default)]
struct Collect {
    batches: Mutex<Vec<UsageBatch>>,
    fail_first: AtomicU64,
}

impl Collect {
    fn failing(n: u64) -> Self {
        Self { fail_first: AtomicU64::new(n), ..Self::default() }
    }

    fn sizes(&self) -> Vec<usize> {
        self.batches.lock().unwrap().iter().map(|b| b.events.len()).collect()
    }

    fn events(&self) -> Vec<UsageEvent> {
        self.batches.lock().unwrap().iter().flat_map(|b| b.events.clone()).collect()
    }

    fn dropped(&self) -> Vec<u64> {
        self.batches.lock().unwrap().iter().map(|b| b.dropped).collect()
    }
}

impl UsageExporter for Collect {
    async fn export(&self, batch: UsageBatch) -> Result<(), ExportError> {
        if self.fail_first.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(ExportError::other("receiver is down"));
        }
        self.batches.lock().unwrap().push(batch);
        Ok(())
    }
}

/// Takes a batch and never finishes: a receiver that hangs.
struct Hang;

impl UsageExporter for Hang {
    async fn export(&self, _batch: UsageBatch) -> Result<(), ExportError> {
        std::future::pending().await
    }
}

/// Polls `cond` every millisecond (virtual or real), at most `limit_ms` times.
async fn wait_until(limit_ms: u64, mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..limit_ms {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    cond()
}

#[tokio::test(flavor = "current_thread")]
async fn full_queue_drops_and_counts_without_blocking() {
    const CAPACITY: usize = 1_024;
    let (sink, handle) = UsagePipeline::builder()
        .capacity(CAPACITY)
        .batch_size(128)
        .shutdown_deadline(Duration::from_millis(200))
        .build(Hang)
        .unwrap();

    // The worker shares this thread, so it cannot drain while we record: exactly
    // CAPACITY get in and the rest are refused.
    let started = std::time::Instant::now();
    for i in 0..10 * CAPACITY {
        record(&sink, i);
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(500), "10× capacity took {elapsed:?}");
    let stats = sink.stats();
    assert_eq!(stats.enqueued, CAPACITY as u64);
    assert_eq!(stats.dropped, 9 * CAPACITY as u64);
    assert_eq!(stats.queued, CAPACITY);

    // Let the worker take one batch into the hanging exporter; the queue then has room
    // for exactly one more batch and no more.
    assert!(wait_until(1_000, || sink.stats().queued == CAPACITY - 128).await);
    for i in 0..1_000 {
        record(&sink, i);
    }
    let stats = sink.stats();
    assert_eq!(stats.enqueued, CAPACITY as u64 + 128);
    assert_eq!(stats.dropped, 9 * CAPACITY as u64 + 1_000 - 128);

    // Shutdown cannot deliver anything to a receiver that hangs, but it returns on time
    // and accounts for every event.
    let started = tokio::time::Instant::now();
    let stats = handle.shutdown().await;
    assert!(started.elapsed() < Duration::from_millis(200 + 100 + 200), "shutdown took {:?}", started.elapsed());
    assert_eq!(stats.exported, 0);
    assert_eq!(stats.lost, stats.enqueued);
    assert_eq!(stats.queued, 0);
    assert_eq!(stats.enqueued + stats.dropped, (10 * CAPACITY + 1_000) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_draining_sink_never_blocks_producers_on_other_threads() {
    const CAPACITY: usize = 4_096;
    const BATCH: usize = 256;
    let (sink, handle) = UsagePipeline::builder()
        .capacity(CAPACITY)
        .batch_size(BATCH)
        .shutdown_deadline(Duration::from_millis(100))
        .build(Hang)
        .unwrap();
    let producers: Vec<_> = (0..2)
        .map(|_| {
            let sink = sink.clone();
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                for i in 0..5 * CAPACITY {
                    record(&sink, i);
                }
                started.elapsed()
            })
        })
        .collect();
    for p in producers {
        let elapsed = p.join().unwrap();
        assert!(elapsed < Duration::from_secs(2), "producer took {elapsed:?}");
    }
    let stats = sink.stats();
    assert_eq!(stats.enqueued + stats.dropped, 10 * CAPACITY as u64);
    // The queue, plus at most the one batch stuck in the exporter.
    assert!(stats.enqueued <= (CAPACITY + BATCH) as u64, "{stats:?}");
    let stats = handle.shutdown().await;
    assert_eq!(stats.enqueued + stats.dropped, 10 * CAPACITY as u64);
    assert_eq!(stats.lost, stats.enqueued);
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_flushes_everything_queued() {
    let exporter = Arc::new(Collect::default());
    let (sink, handle) = UsagePipeline::builder()
        .batch_size(1_000)
        .flush_interval(Duration::from_secs(3_600))
        .build(exporter.clone())
        .unwrap();
    for i in 0..2_500 {
        record(&sink, i);
    }
    let stats = handle.shutdown().await;
    assert_eq!(stats.exported, 2_500);
    assert_eq!((stats.dropped, stats.lost, stats.export_failures, stats.queued), (0, 0, 0, 0));
    assert_eq!(exporter.sizes(), [1_000, 1_000, 500]);
    let ids: Vec<String> = exporter.events().iter().map(|e| e.request_id.as_deref().unwrap().to_owned()).collect();
    let expected: Vec<String> = (0..2_500).map(|i| format!("req-{i}")).collect();
    assert_eq!(ids, expected, "every event once, in order");

    // After shutdown, clones refuse and count; flush says why.
    record(&sink, 0);
    assert_eq!(sink.stats().dropped, 1);
    assert_eq!(sink.flush().await, Err(FlushError::Closed));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn batches_by_size_then_by_interval() {
    let exporter = Arc::new(Collect::default());
    let (sink, handle) = UsagePipeline::builder()
        .batch_size(100)
        .flush_interval(Duration::from_secs(1))
        .build(exporter.clone())
        .unwrap();
    let started = tokio::time::Instant::now();
    for i in 0..250 {
        record(&sink, i);
    }
    // Two full batches go at once, long before the interval.
    assert!(wait_until(100, || exporter.sizes().len() == 2).await);
    assert!(started.elapsed() < Duration::from_millis(200));
    assert_eq!(exporter.sizes(), [100, 100]);
    // The remaining 50 wait for the tick at 1 s, not before.
    tokio::time::sleep_until(started + Duration::from_millis(990)).await;
    assert_eq!(exporter.sizes(), [100, 100]);
    tokio::time::sleep_until(started + Duration::from_millis(1_010)).await;
    assert_eq!(exporter.sizes(), [100, 100, 50]);
    handle.shutdown().await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_trickle_is_flushed_by_the_interval() {
    let exporter = Arc::new(Collect::default());
    let (sink, handle) = UsagePipeline::builder()
        .batch_size(1_000)
        .flush_interval(Duration::from_millis(250))
        .build(exporter.clone())
        .unwrap();
    let started = tokio::time::Instant::now();
    for i in 0..5 {
        record(&sink, i);
    }
    tokio::time::sleep_until(started + Duration::from_millis(240)).await;
    assert!(exporter.sizes().is_empty());
    tokio::time::sleep_until(started + Duration::from_millis(260)).await;
    assert_eq!(exporter.sizes(), [5]);
    // Nothing to say: no empty batches.
    tokio::time::sleep_until(started + Duration::from_millis(1_260)).await;
    assert_eq!(exporter.sizes(), [5]);
    handle.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn drops_are_reported_downstream_once() {
    let exporter = Arc::new(Collect::default());
    let (sink, handle) = UsagePipeline::builder()
        .capacity(10)
        .batch_size(10)
        .flush_interval(Duration::from_secs(3_600))
        .build(exporter.clone())
        .unwrap();
    for i in 0..25 {
        record(&sink, i);
    }
    handle.flush().await.unwrap();
    assert_eq!(exporter.sizes(), [10]);
    assert_eq!(exporter.dropped(), [15]);

    record(&sink, 25);
    handle.flush().await.unwrap();
    assert_eq!(exporter.dropped(), [15, 0], "a drop is reported once");

    // Drops with no events to carry them still go out.
    for i in 0..11 {
        record(&sink, i);
    }
    handle.flush().await.unwrap();
    assert_eq!(exporter.dropped(), [15, 0, 1]);
    let stats = handle.shutdown().await;
    assert_eq!(stats.dropped, 16);
    assert_eq!(stats.exported, 21);
}

#[tokio::test(flavor = "current_thread")]
async fn a_failed_batch_is_counted_lost_and_reported_in_the_next() {
    let exporter = Arc::new(Collect::failing(1));
    let (sink, handle) =
        UsagePipeline::builder().flush_interval(Duration::from_secs(3_600)).build(exporter.clone()).unwrap();
    for i in 0..5 {
        record(&sink, i);
    }
    assert_eq!(handle.flush().await, Err(FlushError::Failed { batches: 1, events: 5 }));
    let stats = handle.stats();
    assert_eq!((stats.lost, stats.export_failures, stats.exported), (5, 1, 0));

    for i in 5..7 {
        record(&sink, i);
    }
    handle.flush().await.unwrap();
    assert_eq!(exporter.sizes(), [2]);
    assert_eq!(exporter.dropped(), [5], "the lost events travel in the next batch");
    let stats = handle.shutdown().await;
    assert_eq!((stats.enqueued, stats.exported, stats.lost), (7, 2, 5));
}

#[tokio::test(flavor = "current_thread")]
async fn dropping_every_handle_drains_the_queue() {
    let exporter = Arc::new(Collect::default());
    let (sink, handle) =
        UsagePipeline::builder().flush_interval(Duration::from_secs(3_600)).build(exporter.clone()).unwrap();
    let other = handle.pipeline();
    drop(handle);
    for i in 0..10 {
        record(&sink, i);
    }
    drop(sink);
    record(&other, 10);
    assert!(!wait_until(50, || exporter.events().len() == 11).await, "a live clone keeps the worker batching");
    drop(other);
    assert!(wait_until(2_000, || exporter.events().len() == 11).await);
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_is_bounded_by_its_deadline() {
    let (sink, handle) = UsagePipeline::builder().shutdown_deadline(Duration::from_millis(150)).build(Hang).unwrap();
    for i in 0..10 {
        record(&sink, i);
    }
    let started = std::time::Instant::now();
    let stats = handle.shutdown().await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(140) && took < Duration::from_millis(600), "took {took:?}");
    assert_eq!((stats.lost, stats.exported, stats.queued), (10, 0, 0));
}

#[test]
fn builder_refuses_impossible_settings() {
    let err = |b: keygate::UsagePipelineBuilder| b.build(Hang).map(|_| ()).unwrap_err();
    assert_eq!(err(UsagePipeline::builder()), PipelineBuildError::NoRuntime);
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    rt.block_on(async {
        assert_eq!(err(UsagePipeline::builder().capacity(0)), PipelineBuildError::Zero("capacity"));
        assert_eq!(err(UsagePipeline::builder().batch_size(0)), PipelineBuildError::Zero("batch_size"));
        assert_eq!(
            err(UsagePipeline::builder().flush_interval(Duration::ZERO)),
            PipelineBuildError::Zero("flush_interval")
        );
        assert_eq!(
            err(UsagePipeline::builder().capacity(10).batch_size(11)),
            PipelineBuildError::BatchLargerThanQueue { batch_size: 11, capacity: 10 }
        );
        let (sink, handle) = UsagePipeline::builder().build(Hang).unwrap();
        assert_eq!((sink.capacity(), sink.batch_size()), (65_536, 1_000));
        drop((sink, handle));
    });
}

#[tokio::test(flavor = "current_thread")]
async fn channel_sink_drops_when_full() {
    let (sink, mut rx) = ChannelSink::new(2);
    for i in 0..5 {
        record(&sink, i);
    }
    assert_eq!(sink.dropped(), 3);
    assert_eq!(rx.recv().await.unwrap().request_id.as_deref(), Some("req-0"));
    assert_eq!(rx.recv().await.unwrap().request_id.as_deref(), Some("req-1"));
    assert!(rx.try_recv().is_err());
    drop(rx);
    record(&sink, 9);
    assert_eq!(sink.dropped(), 4, "a closed channel drops too");
}

#[test]
fn tracing_sink_logs_fields() {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        record_as(&TracingSink::new(), 7, Outcome::Revoked, 401);
        record_as(&TracingSink::new().level(tracing::Level::TRACE), 7, Outcome::Revoked, 401);
    });
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert_eq!(out.lines().count(), 1, "TRACE is below the subscriber's level: {out}");
    for needle in ["INFO", "keygate::usage", "key_01", "revoked", "/reports/{id}", "status=401", "127.0.0.1", "req-7"] {
        assert!(out.contains(needle), "{needle} missing from {out}");
    }
}
