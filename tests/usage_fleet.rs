//! Usage from a fleet, end to end through the real key service: two middleware instances
//! aggregate at the edge and export to the key service (SQLite, and PostgreSQL with two
//! replicas); the key service's totals must equal what was sent exactly, per key, per
//! route, per outcome, also when an answer to an ingest is lost after it was committed.

mod server_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keygate::UsageAggregator;
use keygate::client::NewKey;
use keygate::{AggregatorHandle, ApiKey, ApiKeyLayer, CachedVerifier, HttpUsageExporter, HttpVerifier, RequireScopes};
use serde_json::Value;
use server_support::{ADMIN, SERVICE, TestDb, TestServer, new_key};
use tower::ServiceExt;

/// (key id, route, method, outcome) → requests.
type Totals = BTreeMap<(String, String, String, String), u64>;

/// One middleware instance: its app and its usage aggregator's handle.
fn instance(key_service: &str, usage_to: &str) -> (Router, AggregatorHandle) {
    let verifier =
        CachedVerifier::builder(HttpVerifier::builder(key_service).service_token(SERVICE).build().unwrap()).build();
    let exporter = HttpUsageExporter::builder(usage_to).service_token(SERVICE).build().unwrap();
    let (sink, handle) = UsageAggregator::builder().flush_interval(Duration::from_millis(200)).build(exporter).unwrap();
    let app = Router::new()
        .route(
            "/reports/{id}",
            get(|| async { "report" }).route_layer(RequireScopes::all(["reports:read"])).merge(
                axum::routing::post(|| async { StatusCode::CREATED })
                    .route_layer(RequireScopes::all(["reports:write"])),
            ),
        )
        .route("/things/{id}", get(|| async { "thing" }))
        .layer(ApiKeyLayer::new(verifier).usage(sink));
    (app, handle)
}

/// Sends `n` requests of one kind through `app`, checks each status, and counts them.
async fn send(
    app: &Router,
    totals: &mut Totals,
    key: (&str, &ApiKey),
    method: &str,
    route: (&str, &str),
    n: u64,
    expect: (StatusCode, &str),
) {
    for i in 0..n {
        let req = Request::builder()
            .method(method)
            .uri(route.1.replace("{id}", &i.to_string()))
            .header("authorization", format!("Bearer {}", key.1.expose_secret()))
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), expect.0, "{method} {}", route.1);
    }
    *totals.entry((key.0.to_owned(), route.0.to_owned(), method.to_owned(), expect.1.to_owned())).or_default() += n;
}

/// What the key service reports per (route, method, outcome) for `key_id`.
async fn reported(ks: &TestServer, key_id: &str, into: &mut Totals) {
    let url = ks.url(&format!("/v1/usage?key_id={key_id}&group_by=route"));
    let res = reqwest::Client::new().get(url).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    for b in body["buckets"].as_array().expect("buckets") {
        let row = (
            key_id.to_owned(),
            b["route"].as_str().unwrap().to_owned(),
            b["method"].as_str().unwrap().to_owned(),
            b["outcome"].as_str().unwrap().to_owned(),
        );
        *into.entry(row).or_default() += b["requests"].as_u64().unwrap();
    }
}

async fn two_instances_add_up(db: TestDb) {
    let a = TestServer::start_on(db.clone(), |b| b).await;
    // On PostgreSQL a second replica of the same deployment; on SQLite the same server.
    let b = match db {
        TestDb::Postgres(_) => Some(TestServer::start_on(db.clone(), |b| b).await),
        TestDb::Sqlite(_) => None,
    };
    let b_url = b.as_ref().map_or_else(|| a.server.url(), |b| b.server.url());
    let reader = a.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let writer = a.admin.create_key(new_key("acme", &["reports:read", "reports:write"])).await.unwrap();
    let other = a.admin.create_key(NewKey { allow_empty: true, ..new_key("globex", &[]) }).await.unwrap();

    let (one, one_usage) = instance(&a.server.url(), &a.server.url());
    let (two, two_usage) = instance(&b_url, &b_url);
    let mut sent = Totals::new();
    let reports = ("/reports/{id}", "/reports/{id}");
    let things = ("/things/{id}", "/things/{id}");
    let (r, w, o) = ((&*reader.key_id, &reader.key), (&*writer.key_id, &writer.key), (&*other.key_id, &other.key));
    // N₁ through instance one, N₂ through instance two, overlapping keys and routes.
    send(&one, &mut sent, r, "GET", reports, 300, (StatusCode::OK, "allowed")).await;
    send(&one, &mut sent, r, "POST", reports, 40, (StatusCode::FORBIDDEN, "insufficient_scope")).await;
    send(&one, &mut sent, w, "POST", reports, 120, (StatusCode::CREATED, "allowed")).await;
    send(&two, &mut sent, r, "GET", reports, 210, (StatusCode::OK, "allowed")).await;
    send(&two, &mut sent, w, "GET", reports, 90, (StatusCode::OK, "allowed")).await;
    send(&two, &mut sent, o, "GET", reports, 33, (StatusCode::FORBIDDEN, "insufficient_scope")).await;
    send(&two, &mut sent, o, "GET", things, 77, (StatusCode::OK, "allowed")).await;

    drop((one, two));
    let (s1, s2) = tokio::join!(one_usage.shutdown(), two_usage.shutdown());
    assert_eq!((s1.lost, s2.lost), (0, 0), "{s1:?} {s2:?}");

    let mut got = Totals::new();
    for key in [&reader.key_id, &writer.key_id, &other.key_id] {
        reported(&a, key, &mut got).await;
    }
    assert_eq!(got, sent);
    a.server.shutdown().await;
    if let Some(b) = b {
        b.server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_middlewares_add_up_exactly_on_sqlite() {
    two_instances_add_up(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_middlewares_on_two_postgres_replicas_add_up_exactly() {
    let Some(db) = TestDb::postgres().await else { return };
    two_instances_add_up(db).await;
}

/// A proxy in front of the key service that forwards the first usage upload, waits for
/// the key service to answer (so the batch is committed), and then cuts the connection
/// instead of passing the answer on.
struct CuttingProxy {
    url: String,
    uploads: Arc<AtomicU64>,
    duplicates: Arc<AtomicU64>,
}

async fn cutting_proxy(upstream: String) -> CuttingProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let uploads = Arc::new(AtomicU64::new(0));
    let duplicates = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let (up, dup) = (uploads.clone(), duplicates.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (client, upstream, up, dup) = (client.clone(), upstream.clone(), up.clone(), dup.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (client, upstream, up, dup) = (client.clone(), upstream.clone(), up.clone(), dup.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
                        let is_upload = parts.method == http::Method::POST && parts.uri.path() == "/v1/usage";
                        let mut forward = client.request(parts.method.clone(), format!("{upstream}{}", parts.uri));
                        for (name, value) in &parts.headers {
                            if name != http::header::HOST && name != http::header::CONTENT_LENGTH {
                                forward = forward.header(name, value);
                            }
                        }
                        let answer = forward.body(body).send().await.map_err(|e| e.to_string())?;
                        let status = answer.status();
                        let bytes = answer.bytes().await.map_err(|e| e.to_string())?;
                        if is_upload {
                            let n = up.fetch_add(1, Ordering::SeqCst);
                            let said: Value = serde_json::from_slice(&bytes).unwrap_or_default();
                            if said["duplicate"] == true {
                                dup.fetch_add(1, Ordering::SeqCst);
                            }
                            if n == 0 {
                                // Committed upstream; the middleware never hears of it.
                                return Err::<hyper::Response<Full<Bytes>>, String>("cut".into());
                            }
                        }
                        let mut res = hyper::Response::new(Full::new(bytes));
                        *res.status_mut() = status;
                        Ok(res)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    CuttingProxy { url, uploads, duplicates }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_lost_after_commit_is_retried_and_counted_once() {
    let ks = TestServer::start().await;
    let reader = ks.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let proxy = cutting_proxy(ks.server.url()).await;
    let (app, usage) = instance(&ks.server.url(), &proxy.url);
    let mut sent = Totals::new();
    send(
        &app,
        &mut sent,
        (&reader.key_id, &reader.key),
        "GET",
        ("/reports/{id}", "/reports/{id}"),
        250,
        (StatusCode::OK, "allowed"),
    )
    .await;
    drop(app);
    let stats = usage.shutdown().await;
    assert_eq!(stats.lost, 0, "{stats:?}");
    assert!(proxy.uploads.load(Ordering::SeqCst) >= 2, "the cut upload was sent again");
    assert_eq!(
        proxy.duplicates.load(Ordering::SeqCst),
        1,
        "the key service saw the batch id again and did not apply it"
    );
    let mut got = Totals::new();
    reported(&ks, &reader.key_id, &mut got).await;
    assert_eq!(got, sent);
    ks.server.shutdown().await;
}
