//! `HttpUsageExporter` against a real HTTP receiver on 127.0.0.1 that counts what it
//! gets and can fail the first requests, hang, or refuse the token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use keygate::{ExportError, FlushError, HttpExporterBuildError, HttpUsageExporter, UsageBatch, UsageExporter};
use keygate::{Outcome, UsageEvent, UsagePipeline, UsageSink};
use time::OffsetDateTime;

const TOKEN: &str = "svc_test_token_0123456789";

#[derive(Default)]
struct Receiver {
    requests: AtomicU64,
    events: AtomicU64,
    dropped: AtomicU64,
    /// Answer the next this-many requests with 503.
    fail_next: AtomicU64,
    /// Seconds of `Retry-After` on those 503s (0: none).
    retry_after: AtomicU64,
    /// Milliseconds to wait before answering.
    delay_ms: AtomicU64,
}

async fn ingest(
    State(r): State<Arc<Receiver>>,
    headers: HeaderMap,
    Json(batch): Json<UsageBatch>,
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
    if r.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
        let mut h = HeaderMap::new();
        let secs = r.retry_after.load(Ordering::SeqCst);
        if secs > 0 {
            h.insert(header::RETRY_AFTER, secs.into());
        }
        return (StatusCode::SERVICE_UNAVAILABLE, h, Json(serde_json::json!({"error": "unavailable"})));
    }
    r.events.fetch_add(batch.events.len() as u64, Ordering::SeqCst);
    r.dropped.fetch_add(batch.dropped, Ordering::SeqCst);
    (StatusCode::ACCEPTED, HeaderMap::new(), Json(serde_json::json!({"accepted": batch.events.len()})))
}

async fn receiver() -> (Arc<Receiver>, String) {
    let state = Arc::new(Receiver::default());
    let app = Router::new().route("/v1/usage", post(ingest)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (state, format!("http://{addr}"))
}

fn event(i: usize) -> UsageEvent {
    UsageEvent {
        at: OffsetDateTime::now_utc(),
        key_id: Some("key_01".into()),
        owner: Some("acme".into()),
        outcome: if i % 3 == 0 { Outcome::NotFound } else { Outcome::Allowed },
        method: "POST".into(),
        route: "/v1/things".into(),
        status: if i % 3 == 0 { 401 } else { 201 },
        latency: Duration::from_micros(250),
        client_ip: None,
        request_id: None,
    }
}

fn batch(n: usize) -> UsageBatch {
    UsageBatch { events: (0..n).map(event).collect(), dropped: 0 }
}

#[tokio::test]
async fn delivers_every_event_through_the_pipeline() {
    let (rx, base) = receiver().await;
    let exporter = HttpUsageExporter::builder(format!("{base}/")).service_token(TOKEN).build().unwrap();
    assert_eq!(exporter.endpoint(), format!("{base}/v1/usage"));
    let (sink, handle) = UsagePipeline::builder().batch_size(1_000).build(exporter).unwrap();
    for i in 0..2_500 {
        sink.record(event(i));
    }
    let stats = handle.shutdown().await;
    assert_eq!(stats.exported, 2_500);
    assert_eq!(rx.events.load(Ordering::SeqCst), 2_500);
    assert_eq!(rx.requests.load(Ordering::SeqCst), 3);
    assert_eq!(rx.dropped.load(Ordering::SeqCst), 0);
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
    exporter.export(batch(10)).await.unwrap();
    // Waits of at least 10, 20 and 40 ms (half of each doubling backoff).
    assert!(started.elapsed() >= Duration::from_millis(70), "{:?}", started.elapsed());
    assert_eq!(rx.requests.load(Ordering::SeqCst), 4);
    assert_eq!(rx.events.load(Ordering::SeqCst), 10, "delivered once");
}

#[tokio::test]
async fn gives_up_at_the_retry_deadline_and_the_pipeline_reports_the_loss() {
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
    let err = exporter.export(batch(3)).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, ExportError::GaveUp { last, .. } if matches!(*last, ExportError::Status { status: 503 })));
    assert!(took < Duration::from_millis(600), "retry deadline overrun: {took:?}");
    let tries = rx.requests.load(Ordering::SeqCst);
    assert!((2..20).contains(&tries), "{tries} attempts");

    let (sink, handle) = UsagePipeline::builder().flush_interval(Duration::from_secs(3_600)).build(exporter).unwrap();
    for i in 0..10 {
        sink.record(event(i));
    }
    assert_eq!(handle.flush().await, Err(FlushError::Failed { batches: 1, events: 10 }));
    assert_eq!(handle.stats().lost, 10);

    // The receiver recovers: the next batch delivers its events and reports the 10 lost.
    rx.fail_next.store(0, Ordering::SeqCst);
    for i in 0..5 {
        sink.record(event(i));
    }
    handle.flush().await.unwrap();
    assert_eq!(rx.events.load(Ordering::SeqCst), 5);
    assert_eq!(rx.dropped.load(Ordering::SeqCst), 10);
    let stats = handle.shutdown().await;
    assert_eq!((stats.exported, stats.lost, stats.export_failures), (5, 10, 1));
}

#[tokio::test]
async fn stops_after_max_attempts() {
    let (rx, base) = receiver().await;
    rx.fail_next.store(u64::MAX, Ordering::SeqCst);
    let exporter = HttpUsageExporter::builder(&base)
        .service_token(TOKEN)
        .initial_backoff(Duration::from_millis(1))
        .max_attempts(3)
        .build()
        .unwrap();
    let err = exporter.export(batch(1)).await.unwrap_err();
    assert!(matches!(err, ExportError::GaveUp { attempts: 3, .. }), "{err}");
    assert_eq!(rx.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn honors_retry_after_up_to_max_backoff() {
    let (rx, base) = receiver().await;
    rx.fail_next.store(1, Ordering::SeqCst);
    rx.retry_after.store(30, Ordering::SeqCst);
    let exporter = HttpUsageExporter::builder(&base)
        .service_token(TOKEN)
        .initial_backoff(Duration::from_millis(1))
        .max_backoff(Duration::from_millis(200))
        .build()
        .unwrap();
    let started = Instant::now();
    exporter.export(batch(1)).await.unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(2), "{took:?}");
    assert_eq!(rx.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_refused_token_is_not_retried() {
    let (rx, base) = receiver().await;
    let exporter = HttpUsageExporter::builder(&base).service_token("svc_wrong_token").build().unwrap();
    let err = exporter.export(batch(1)).await.unwrap_err();
    assert!(matches!(err, ExportError::Status { status: 401 }), "{err}");
    assert_eq!(rx.requests.load(Ordering::SeqCst), 1);
    assert_eq!(rx.events.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn each_attempt_has_a_timeout() {
    let (rx, base) = receiver().await;
    rx.delay_ms.store(2_000, Ordering::SeqCst);
    let exporter = HttpUsageExporter::builder(&base)
        .service_token(TOKEN)
        .request_timeout(Duration::from_millis(100))
        .initial_backoff(Duration::from_millis(1))
        .max_attempts(2)
        .build()
        .unwrap();
    let started = Instant::now();
    let err = exporter.export(batch(1)).await.unwrap_err();
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
    let exporter = HttpUsageExporter::builder(format!("http://{addr}"))
        .service_token(TOKEN)
        .initial_backoff(Duration::from_millis(1))
        .max_attempts(2)
        .build()
        .unwrap();
    let err = exporter.export(batch(1)).await.unwrap_err();
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
        UsagePipeline::builder().shutdown_deadline(Duration::from_millis(250)).build(exporter).unwrap();
    for i in 0..7 {
        sink.record(event(i));
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
    // Each batch starts at the next URL (round robin); one that starts at the dead one
    // moves on at once, without the minute-long backoff.
    for _ in 0..4 {
        tokio::time::timeout(Duration::from_secs(10), exporter.export(batch(5))).await.unwrap().unwrap();
    }
    assert_eq!((rx.requests.load(Ordering::SeqCst), rx.events.load(Ordering::SeqCst)), (4, 20));
}
