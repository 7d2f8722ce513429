//! End to end through the real key service: requests through the layer (verified
//! remotely) of two middleware instances, folded by their `UsageAggregator`s and sent by
//! `HttpUsageExporter` as aggregate batches, read back per key with `GET /v1/usage`. The
//! numbers must add up exactly.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use keygate::HttpUsageExporter;
use keygate::client::{AdminClient, NewKey, UsageBucket};
use keygate::server::{KeyServer, RunningKeyServer};
use keygate::{
    ApiKey, ApiKeyLayer, CachedVerifier, DecidedRequest, HttpVerifier, Outcome, RequireScopes, UsageAggregator,
    UsageSink,
};
use tower::ServiceExt;

const SERVICE: &str = "svc-usage-e2e-token-0123456789abcdef";
const ADMIN: &str = "adm-usage-e2e-token-0123456789abcdef";

struct Rig {
    server: RunningKeyServer,
    admin: AdminClient,
    _dir: tempfile::TempDir,
}

async fn start() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let server = KeyServer::builder()
        .database(format!("sqlite://{}", dir.path().join("keys.db").display()))
        .service_token(SERVICE)
        .admin_token(ADMIN)
        .listen("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .expect("key service starts");
    let admin = AdminClient::new(server.url(), ADMIN).unwrap();
    Rig { server, admin, _dir: dir }
}

async fn create(admin: &AdminClient, scopes: &[&str]) -> (String, ApiKey) {
    let created = admin
        .create_key(NewKey {
            owner: "acme".into(),
            name: "usage test".into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    (created.key_id, created.key)
}

fn exporter(rig: &Rig) -> HttpUsageExporter {
    HttpUsageExporter::builder(rig.server.url()).service_token(SERVICE).build().unwrap()
}

/// A key's buckets added up.
#[derive(Debug, Default, PartialEq)]
struct Total {
    requests: u64,
    allowed: u64,
    denied: u64,
    status_2xx: u64,
    status_4xx: u64,
    status_5xx: u64,
    latency_ms_sum: f64,
    latency_ms_max: f64,
}

fn total(buckets: &[UsageBucket]) -> Total {
    buckets.iter().fold(Total::default(), |mut t, b| {
        t.requests += b.requests;
        t.allowed += b.allowed;
        t.denied += b.denied;
        t.status_2xx += b.status_2xx;
        t.status_4xx += b.status_4xx;
        t.status_5xx += b.status_5xx;
        t.latency_ms_sum += b.latency_ms_sum;
        t.latency_ms_max = t.latency_ms_max.max(b.latency_ms_max);
        t
    })
}

async fn usage_of(rig: &Rig, key_id: &str) -> Total {
    total(&rig.admin.usage(key_id, None).await.unwrap().buckets)
}

/// One middleware instance: its own cache, its own aggregator, the same key service.
fn middleware(rig: &Rig) -> (Router, keygate::AggregatorHandle) {
    // A short interval: many batches per instance.
    let (sink, handle) =
        UsageAggregator::builder().flush_interval(Duration::from_millis(100)).build(exporter(rig)).unwrap();
    let verifier =
        CachedVerifier::builder(HttpVerifier::builder(rig.server.url()).service_token(SERVICE).build().unwrap())
            .build();
    let app = Router::new()
        .route("/reports/{id}", get(|| async { "report" }).route_layer(RequireScopes::all(["reports:read"])))
        .route("/billing", get(|| async { "billing" }).route_layer(RequireScopes::all(["billing:read"])))
        .layer(ApiKeyLayer::new(verifier).usage(sink));
    (app, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_middlewares_add_up_exactly_in_the_key_service() {
    let rig = start().await;
    let (reader_id, reader) = create(&rig.admin, &["reports:read"]).await;
    let (biller_id, biller) = create(&rig.admin, &["billing:read"]).await;

    // (instance, key, path, requests, expected status)
    let plan: [(usize, Option<&ApiKey>, &str, u64, StatusCode); 6] = [
        (0, Some(&reader), "/reports/{i}", 300, StatusCode::OK),
        (0, Some(&biller), "/reports/{i}", 70, StatusCode::FORBIDDEN),
        (0, None, "/reports/{i}", 25, StatusCode::UNAUTHORIZED),
        (1, Some(&reader), "/reports/{i}", 200, StatusCode::OK),
        (1, Some(&biller), "/billing", 150, StatusCode::OK),
        (1, Some(&reader), "/billing", 40, StatusCode::FORBIDDEN),
    ];
    let instances = [middleware(&rig), middleware(&rig)];
    let mut tasks = tokio::task::JoinSet::new();
    for (instance, key, path, n, expected) in plan {
        for i in 0..n {
            let app = instances[instance].0.clone();
            let auth = key.map(|k| format!("Bearer {}", k.expose_secret()));
            let path = path.replace("{i}", &i.to_string());
            tasks.spawn(async move {
                let mut req = Request::get(path);
                if let Some(auth) = auth {
                    req = req.header("authorization", auth);
                }
                let res = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
                assert_eq!(res.status(), expected);
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let [(app_a, handle_a), (app_b, handle_b)] = instances;
    drop((app_a, app_b));
    let (a, b) = (handle_a.shutdown().await, handle_b.shutdown().await);
    assert_eq!((a.recorded, a.exported, a.lost), (395, 395, 0), "{a:?}");
    assert_eq!((b.recorded, b.exported, b.lost), (390, 390, 0), "{b:?}");

    let reader_usage = usage_of(&rig, &reader_id).await;
    assert_eq!(
        (reader_usage.requests, reader_usage.allowed, reader_usage.denied, reader_usage.status_2xx),
        (540, 500, 40, 500)
    );
    assert!(reader_usage.latency_ms_sum > 0.0 && reader_usage.latency_ms_max > 0.0);
    let biller_usage = usage_of(&rig, &biller_id).await;
    assert_eq!(
        (biller_usage.requests, biller_usage.allowed, biller_usage.denied, biller_usage.status_4xx),
        (220, 150, 70, 70)
    );
    assert!(rig.admin.get_key(&reader_id).await.unwrap().last_used_at.is_some());
    rig.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_for_one_key_add_up_exactly() {
    const N: u64 = 25_000;
    let rig = start().await;
    let (key_id, _key) = create(&rig.admin, &["reports:read"]).await;
    let (sink, handle) =
        UsageAggregator::builder().flush_interval(Duration::from_millis(50)).build(exporter(&rig)).unwrap();
    let key_id_arc: std::sync::Arc<str> = key_id.as_str().into();
    let routes = ["/reports/{id}", "/reports", "/exports/{id}"];
    for i in 0..N {
        let denied = i % 10 == 0;
        let (outcome, status) = match (denied, i % 7 == 0) {
            (true, _) => (Outcome::InsufficientScope, 403),
            (false, true) => (Outcome::Allowed, 500),
            (false, false) => (Outcome::Allowed, 200),
        };
        let request = DecidedRequest::new(
            std::time::Instant::now(),
            &http::Method::GET,
            routes[i as usize % routes.len()],
            status,
            outcome,
        )
        .with_key(&key_id_arc, None)
        .with_latency(Duration::from_millis(2));
        sink.record(&request);
        if i % 5_000 == 0 {
            // Let a few intervals pass while recording.
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }
    let stats = handle.shutdown().await;
    assert_eq!((stats.recorded, stats.exported, stats.lost), (N, N, 0), "{stats:?}");
    assert!(stats.batches_exported >= 2, "{stats:?}");

    let usage = usage_of(&rig, &key_id).await;
    let denied = N.div_ceil(10);
    let errors = (0..N).filter(|i| i % 10 != 0 && i % 7 == 0).count() as u64;
    assert_eq!(usage.requests, N);
    assert_eq!((usage.allowed, usage.denied), (N - denied, denied));
    assert_eq!((usage.status_2xx, usage.status_4xx, usage.status_5xx), (N - denied - errors, denied, errors));
    // Histogram sums are exact in whole microseconds.
    assert!((usage.latency_ms_sum - 2.0 * N as f64).abs() < 1.0, "{}", usage.latency_ms_sum);
    rig.server.shutdown().await;
}
