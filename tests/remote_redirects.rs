//! A key-service address that answers `307 Temporary Redirect` must not move any of
//! keygate's clients: the verifier fails (503 at the layer), the listener does not
//! connect, the exporter gives the batch up, and the redirect's target receives nothing.
//! Both servers are real axum servers on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{StatusCode, header};
use keygate::{AggregateBatch, AggregateExporter, ExportError, HttpUsageExporter};
use keygate::{
    ApiKey, ApiKeyLayer, CachedVerifier, HttpVerifier, Principal, RevocationListener, Verifier, VerifyError,
};
use tower::ServiceExt;

const TOKEN: &str = "svc-redirect-test";
const LIMIT: Duration = Duration::from_secs(10);

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The redirect's target: counts every request, and would grant any key.
async fn target() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .fallback(|State(hits): State<Arc<AtomicUsize>>| async move {
            hits.fetch_add(1, Ordering::SeqCst);
            let body = r#"{"valid":true,"key_id":"key_evil","scopes":["reports:read"],"expires_at":null}"#;
            ([(header::CONTENT_TYPE, "application/json")], body)
        })
        .with_state(Arc::clone(&hits));
    (serve(app).await, hits)
}

/// Answers every request with a 307 to the same path on `to`.
async fn redirector(to: SocketAddr) -> String {
    let app = Router::new().fallback(move |req: Request| async move {
        let location = format!("http://{to}{}", req.uri().path());
        let mut res: Response = StatusCode::TEMPORARY_REDIRECT.into_response();
        res.headers_mut().insert(header::LOCATION, location.parse().unwrap());
        res
    });
    format!("http://{}", serve(app).await)
}

#[tokio::test]
async fn the_verifier_and_the_layer_do_not_follow_a_redirect() {
    let (to, hits) = target().await;
    let url = redirector(to).await;
    let key = ApiKey::generate("kg").unwrap();

    let http = HttpVerifier::builder(url.as_str()).service_token(TOKEN).build().unwrap();
    assert!(matches!(http.verify(&key).await, Err(VerifyError::Status(307))));

    let app = Router::new()
        .route("/reports", get(|p: Principal| async move { p.key_id().to_owned() }))
        .layer(ApiKeyLayer::new(CachedVerifier::new(http)));
    let req = axum::http::Request::get("/reports")
        .header(header::AUTHORIZATION, format!("Bearer {}", key.expose_secret()))
        .body(Body::empty())
        .unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect's target received nothing");
}

#[tokio::test]
async fn the_listener_does_not_follow_a_redirect() {
    let (to, hits) = target().await;
    let url = redirector(to).await;
    let cache = CachedVerifier::new(HttpVerifier::builder(url.as_str()).service_token(TOKEN).build().unwrap());
    let listener = RevocationListener::builder(url.as_str())
        .service_token(TOKEN)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .spawn(&cache)
        .unwrap();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while listener.stats().connect_failures < 3 {
        assert!(tokio::time::Instant::now() < deadline, "no failed connection attempts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(listener.stats().connects, 0);
    assert!(!listener.is_connected());
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect's target received nothing");
}

#[tokio::test]
async fn the_exporter_does_not_follow_a_redirect() {
    let (to, hits) = target().await;
    let url = redirector(to).await;
    let exporter = HttpUsageExporter::builder(url.as_str()).service_token(TOKEN).build().unwrap();
    let batch = AggregateBatch {
        batch_id: "0123456789abcdef0123456789abcdef".into(),
        rows: vec![],
        networks: vec![],
        dropped: 1,
        overflowed: 0,
        networks_dropped: 0,
    };
    let result = tokio::time::timeout(LIMIT, exporter.export(&batch)).await;
    assert!(matches!(result, Ok(Err(ExportError::Status { status: 307 }))), "{result:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect's target received nothing");
}
