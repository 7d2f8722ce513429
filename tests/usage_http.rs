//! `HttpUsageExporter` (alone, and behind a `UsageAggregator`) against a real HTTP
//! receiver on 127.0.0.1 that parses `AggregateBatch`, applies each batch id once, and
//! can fail requests, fail after committing, hang, refuse a batch or refuse the token.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use keygate::{AggregateBatch, AggregateExporter, AggregateRow, ExportError, FlushError, HttpExporterBuildError};
use keygate::{DecidedRequest, HttpUsageExporter, LatencyHistogram, Outcome, StatusCounts, UsageAggregator, UsageSink};

const TOKEN: &str = "svc_test_token_0123456789";

#[derive(Default)]
struct Receiver {
    requests: AtomicU64,
    /// Requests counted, each batch id once.
    counted: AtomicU64,
    dropped: AtomicU64,
    duplicates: AtomicU64,
    ids: Mutex<HashSet<String>>,
    /// Every batch as it arrived, attempts included.
    seen: Mutex<Vec<AggregateBatch>>,
    /// Answer the next this-many requests with 503 before looking at them.
    fail_next: AtomicU64,
    /// Store the next this-many batches, then answer 503 as if the answer were lost.
    commit_then_fail_next: AtomicU64,
    /// Answer the next this-many requests with 413.
    refuse_next: AtomicU64,
    /// Seconds of `Retry-After` on the 503s (0: none).
    retry_after: AtomicU64,
    /// Milliseconds to wait before answering.
    delay_ms: AtomicU64,
    /// Milliseconds to wait after storing a batch, before answering.
    slow_answer_ms: AtomicU64,
}

fn take(counter: &AtomicU64) -> bool {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

async fn ingest(
    State(r): State<Arc<Receiver>>,
    headers: HeaderMap,
    Json(batch): Json<AggregateBatch>,
) -> impl IntoResponse {
    r.requests.fetch_add(1, Ordering::SeqCst);
    let expected = format!("Bearer {TOKEN}");
    if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return (StatusCode::UNAUTHORIZED, HeaderMap::new(), Json(serde_json::json!({"error": "unauthorized"})));
    }
    let delay = r.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    r.seen.lock().unwrap().push(batch.clone());
    if take(&r.fail_next) {
        let mut h = HeaderMap::new();
        let secs = r.retry_after.load(Ordering::SeqCst);
        if secs > 0 {
            h.insert(header::RETRY_AFTER, secs.into());
        }
        return (StatusCode::SERVICE_UNAVAILABLE, h, Json(serde_json::json!({"error": "unavailable"})));
    }
    if take(&r.refuse_next) {
        return (StatusCode::PAYLOAD_TOO_LARGE, HeaderMap::new(), Json(serde_json::json!({"error": "too_large"})));
    }
    let fresh = r.ids.lock().unwrap().insert(batch.batch_id.clone());
    if fresh {
        r.counted.fetch_add(batch.requests(), Ordering::SeqCst);
        r.dropped.fetch_add(batch.dropped, Ordering::SeqCst);
    } else {
        r.duplicates.fetch_add(1, Ordering::SeqCst);
    }
    let slow = r.slow_answer_ms.load(Ordering::SeqCst);
    if slow > 0 {
        tokio::time::sleep(Duration::from_millis(slow)).await;
    }
    if take(&r.commit_then_fail_next) {
        return (StatusCode::SERVICE_UNAVAILABLE, HeaderMap::new(), Json(serde_json::json!({"error": "lost answer"})));
    }
    let answer = serde_json::json!({"accepted": batch.requests(), "duplicate": !fresh});
    (StatusCode::ACCEPTED, HeaderMap::new(), Json(answer))
}

async fn receiver() -> (Arc<Receiver>, String) {
    let state = Arc::new(Receiver::default());
    let app = Router::new().route("/v1/usage", post(ingest)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (state, format!("http://{addr}"))
}

/// Records request `i` through `sink`: key `key_01`, one of three routes, a third of them
/// denied.
fn record(sink: &impl UsageSink, i: usize) {
    let key: Arc<str> = "key_01".into();
    let route = ["/v1/things", "/v1/things/{id}", "/v1/other"][i % 3];
    let (outcome, status) = if i % 3 == 0 { (Outcome::NotFound, 401) } else { (Outcome::Allowed, 201) };
    let request = DecidedRequest::new(Instant::now(), &http::Method::POST, route, status, outcome)
        .with_key(&key, None)
        .with_latency(Duration::from_micros(250));
    sink.record(&request);
}

/// A batch of `n` requests in one row.
fn batch(n: u64) -> AggregateBatch {
    let mut latency = LatencyHistogram::new();
    let mut status = StatusCounts::default();
    for _ in 0..n {
        latency.record(Duration::from_micros(250));
        status.add(200);
    }
    AggregateBatch {
        batch_id: format!("{:032x}", n),
        rows: vec![AggregateRow {
            minute: 1_764_585_600,
            key_id: Some("key_01".into()),
            route: "/v1/things".into(),
            method: "GET".into(),
            outcome: Outcome::Allowed,
            requests: n,
            status,
            latency,
            last_at_ms: 1_764_585_601_000,
        }],
        networks: vec![],
        dropped: 0,
        overflowed: 0,
        networks_dropped: 0,
    }
}

fn quick(base: &str) -> keygate::HttpUsageExporterBuilder {
    HttpUsageExporter::builder(base).service_token(TOKEN).initial_backoff(Duration::from_millis(1))
}

#[tokio::test]
async fn delivers_every_request_through_the_aggregator() {
    let (rx, base) = receiver().await;
    let exporter = HttpUsageExporter::builder(format!("{base}/")).service_token(TOKEN).build().unwrap();
    assert_eq!(exporter.endpoint(), format!("{base}/v1/usage"));
    let (sink, handle) = UsageAggregator::builder().build(exporter).unwrap();
    for i in 0..2_500 {
        record(&sink, i);
    }
    let stats = handle.shutdown().await;
    assert_eq!((stats.recorded, stats.exported, stats.lost), (2_500, 2_500, 0), "{stats:?}");
    assert_eq!(rx.counted.load(Ordering::SeqCst), 2_500);
    assert_eq!(rx.requests.load(Ordering::SeqCst), 1, "one request per interval");
    let seen = rx.seen.lock().unwrap();
    let rows = &seen[0].rows;
    // Three routes, two outcomes on one of them: at most 4 rows a minute (6 across a
    // minute boundary).
    assert!((3..=6).contains(&rows.len()), "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r.outcome == Outcome::NotFound).map(|r| r.requests).sum::<u64>(), 834);
    assert_eq!(rx.dropped.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_answer_lost_after_commit_is_retried_with_the_same_batch_and_counted_once() {
    let (rx, base) = receiver().await;
    // Every in-call retry of the first export meets "stored, then 503"; the aggregator
    // keeps the batch and sends it again on flush.
    rx.commit_then_fail_next.store(3, Ordering::SeqCst);
    let exporter = quick(&base).max_attempts(3).build().unwrap();
    let (sink, handle) = UsageAggregator::builder().flush_interval(Duration::from_secs(3_600)).build(exporter).unwrap();
    for i in 0..300 {
        record(&sink, i);
    }
    assert_eq!(handle.flush().await, Err(FlushError::Pending { batches: 1, requests: 300 }));
    assert_eq!(handle.stats().pending_requests, 300);
    handle.flush().await.unwrap();
    let stats = handle.shutdown().await;

    assert_eq!(rx.counted.load(Ordering::SeqCst), 300, "applied once");
    assert_eq!(rx.duplicates.load(Ordering::SeqCst), 3, "two in-call retries and the aggregator's");
    let seen = rx.seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    assert!(seen.iter().all(|b| *b == seen[0]), "every attempt is the same batch");
    assert_eq!((stats.exported, stats.lost, stats.batches_exported), (300, 0, 1));
}

#[tokio::test]
async fn an_answer_lost_to_a_timeout_is_counted_once() {
    let (rx, base) = receiver().await;
    // Stored at once, answered after the client gave up waiting.
    rx.slow_answer_ms.store(300, Ordering::SeqCst);
    let exporter = quick(&base).request_timeout(Duration::from_millis(100)).max_attempts(1).build().unwrap();
    let b = batch(7);
    assert!(matches!(exporter.export(&b).await, Err(ExportError::GaveUp { .. })));
    assert_eq!(rx.counted.load(Ordering::SeqCst), 7);
    rx.slow_answer_ms.store(0, Ordering::SeqCst);
    exporter.export(&b).await.unwrap();
    assert_eq!((rx.counted.load(Ordering::SeqCst), rx.duplicates.load(Ordering::SeqCst)), (7, 1));
}

#[tokio::test]
async fn retries_with_backoff_until_delivered() {
    let (rx, base) = receiver().await;
    rx.fail_next.store(3, Ordering::SeqCst);
    let exporter = HttpUsageExporter::builder(&base)
        .service_token(TOKEN)
        .initial_backoff(Duration::from_millis(20))
        .build()
        .unwrap();
    let started = Instant::now();
    exporter.export(&batch(10)).await.unwrap();
    // Waits of at least 10, 20 and 40 ms (half of each doubling backoff).
    assert!(started.elapsed() >= Duration::from_millis(70), "{:?}", started.elapsed());
    assert_eq!(rx.requests.load(Ordering::SeqCst), 4);
    assert_eq!(rx.counted.load(Ordering::SeqCst), 10, "delivered once");
}

#[tokio::test]
async fn a_batch_that_outlives_the_retry_deadline_stays_pending_and_goes_later() {
    let (rx, base) = receiver().await;
    rx.fail_next.store(u64::MAX, Ordering::SeqCst);
    let exporter = HttpUsageExporter::builder(&base)
        .service_token(TOKEN)
        .initial_backoff(Duration::from_millis(40))
        .max_attempts(1_000)
        .retry_deadline(Duration::from_millis(300))
        .build()
        .unwrap();

    let started = Instant::now();
    let err = exporter.export(&batch(3)).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, ExportError::GaveUp { last, .. } if matches!(*last, ExportError::Status { status: 503 })));
    assert!(took < Duration::from_millis(600), "retry deadline overrun: {took:?}");
    let tries = rx.requests.load(Ordering::SeqCst);
    assert!((2..20).contains(&tries), "{tries} attempts");

    let (sink, handle) = UsageAggregator::builder().flush_interval(Duration::from_secs(3_600)).build(exporter).unwrap();
    for i in 0..10 {
        record(&sink, i);
    }
    assert_eq!(handle.flush().await, Err(FlushError::Pending { batches: 1, requests: 10 }));
    let stats = handle.stats();
    assert_eq!((stats.lost, stats.pending_batches, stats.pending_requests), (0, 1, 10));

    // The receiver recovers: the pending batch goes first, then the new one.
    rx.fail_next.store(0, Ordering::SeqCst);
    for i in 0..5 {
        record(&sink, i);
    }
    handle.flush().await.unwrap();
    assert_eq!(rx.counted.load(Ordering::SeqCst), 15);
    let stats = handle.shutdown().await;
    assert_eq!((stats.exported, stats.lost, stats.batches_exported), (15, 0, 2));
    assert!(stats.export_failures >= 1);
}

#[tokio::test]
async fn a_refused_batch_is_given_up_at_once_and_reported_in_the_next() {
    let (rx, base) = receiver().await;
    rx.refuse_next.store(1, Ordering::SeqCst);
    let exporter = quick(&base).build().unwrap();
    let (sink, handle) = UsageAggregator::builder().flush_interval(Duration::from_secs(3_600)).build(exporter).unwrap();
    for i in 0..4 {
        record(&sink, i);
    }
    handle.flush().await.unwrap();
    assert_eq!(rx.requests.load(Ordering::SeqCst), 1, "413 is not retried");
    let stats = handle.stats();
    assert_eq!((stats.lost, stats.pending_batches, stats.export_failures), (4, 0, 1));

    record(&sink, 0);
    handle.flush().await.unwrap();
    assert_eq!((rx.counted.load(Ordering::SeqCst), rx.dropped.load(Ordering::SeqCst)), (1, 4));
    handle.shutdown().await;
}

#[tokio::test]
async fn stops_after_max_attempts() {
    let (rx, base) = receiver().await;
    rx.fail_next.store(u64::MAX, Ordering::SeqCst);
    let exporter = quick(&base).max_attempts(3).build().unwrap();
    let err = exporter.export(&batch(1)).await.unwrap_err();
    assert!(matches!(err, ExportError::GaveUp { attempts: 3, .. }), "{err}");
    assert!(!err.is_permanent());
    assert_eq!(rx.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn honors_retry_after_up_to_max_backoff() {
    let (rx, base) = receiver().await;
    rx.fail_next.store(1, Ordering::SeqCst);
    rx.retry_after.store(30, Ordering::SeqCst);
    let exporter = quick(&base).max_backoff(Duration::from_millis(200)).build().unwrap();
    let started = Instant::now();
    exporter.export(&batch(1)).await.unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(2), "{took:?}");
    assert_eq!(rx.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_refused_token_is_not_retried() {
    let (rx, base) = receiver().await;
    let exporter = HttpUsageExporter::builder(&base).service_token("svc_wrong_token").build().unwrap();
    let err = exporter.export(&batch(1)).await.unwrap_err();
    assert!(matches!(err, ExportError::Status { status: 401 }), "{err}");
    assert!(!err.is_permanent(), "a token can be fixed; the batch stays");
    assert_eq!(rx.requests.load(Ordering::SeqCst), 1);
    assert_eq!(rx.counted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn each_attempt_has_a_timeout() {
    let (rx, base) = receiver().await;
    rx.delay_ms.store(2_000, Ordering::SeqCst);
    let exporter = quick(&base).request_timeout(Duration::from_millis(100)).max_attempts(2).build().unwrap();
    let started = Instant::now();
    let err = exporter.export(&batch(1)).await.unwrap_err();
    assert!(
        matches!(&err, ExportError::GaveUp { attempts: 2, last } if matches!(**last, ExportError::Timeout)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
}

#[tokio::test]
async fn an_unreachable_receiver_is_a_transport_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let exporter = quick(&format!("http://{addr}")).max_attempts(2).build().unwrap();
    let err = exporter.export(&batch(1)).await.unwrap_err();
    assert!(
        matches!(&err, ExportError::GaveUp { attempts: 2, last } if matches!(**last, ExportError::Transport(_))),
        "{err}"
    );
}

#[tokio::test]
async fn shutdown_cuts_a_retrying_export_at_its_deadline() {
    let (rx, base) = receiver().await;
    rx.fail_next.store(u64::MAX, Ordering::SeqCst);
    let exporter = HttpUsageExporter::builder(&base)
        .service_token(TOKEN)
        .initial_backoff(Duration::from_millis(20))
        .build()
        .unwrap();
    let (sink, handle) =
        UsageAggregator::builder().shutdown_deadline(Duration::from_millis(250)).build(exporter).unwrap();
    for i in 0..7 {
        record(&sink, i);
    }
    let started = Instant::now();
    let stats = handle.shutdown().await;
    assert!(started.elapsed() < Duration::from_millis(250 + 100 + 250), "{:?}", started.elapsed());
    assert_eq!((stats.exported, stats.lost), (0, 7));
    assert!(rx.requests.load(Ordering::SeqCst) >= 1);
}

#[test]
fn debug_never_shows_the_token_and_bad_settings_are_refused() {
    let builder = HttpUsageExporter::builder("http://127.0.0.1:9").service_token(TOKEN);
    assert!(!format!("{builder:?}").contains(TOKEN));
    let exporter = builder.build().unwrap();
    let debug = format!("{exporter:?}");
    assert!(!debug.contains(TOKEN) && debug.contains("<redacted>"), "{debug}");
    assert!(debug.contains("retry_deadline: 5s"), "the default fits a flush interval: {debug}");

    let err = |b: keygate::HttpUsageExporterBuilder| b.build().unwrap_err();
    assert!(matches!(
        err(HttpUsageExporter::builder("not a url").service_token(TOKEN)),
        HttpExporterBuildError::InvalidUrl(_)
    ));
    assert!(matches!(
        err(HttpUsageExporter::builder("ftp://h").service_token(TOKEN)),
        HttpExporterBuildError::InvalidUrl(_)
    ));
    assert!(matches!(
        err(HttpUsageExporter::builder("http://h").service_token("")),
        HttpExporterBuildError::InvalidToken
    ));
    assert!(matches!(
        err(HttpUsageExporter::builder("http://h").service_token("a b")),
        HttpExporterBuildError::InvalidToken
    ));
    assert!(matches!(
        err(HttpUsageExporter::builder("http://h").service_token("t\r\nx")),
        HttpExporterBuildError::InvalidToken
    ));
    assert!(matches!(
        err(HttpUsageExporter::builder("http://h").service_token(TOKEN).max_attempts(0)),
        HttpExporterBuildError::Zero("max_attempts")
    ));
    // The error message does not carry the token either.
    let msg = err(HttpUsageExporter::builder("http://h").service_token("bad token")).to_string();
    assert!(!msg.contains("bad token"));
}

#[tokio::test]
async fn a_refused_connection_moves_the_batch_to_the_next_url() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let (rx, base) = receiver().await;
    let exporter = HttpUsageExporter::builder([dead_url, base])
        .service_token(TOKEN)
        .initial_backoff(Duration::from_secs(60))
        .max_attempts(3)
        .build()
        .unwrap();
    // Each export starts at the next URL (round robin); one that starts at the dead one
    // moves on at once, without the minute-long backoff.
    for i in 1..=4 {
        tokio::time::timeout(Duration::from_secs(10), exporter.export(&batch(i))).await.unwrap().unwrap();
    }
    assert_eq!((rx.requests.load(Ordering::SeqCst), rx.counted.load(Ordering::SeqCst)), (4, 10));
}
