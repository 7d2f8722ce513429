//! End to end through the real key service: requests through the layer (verified
//! remotely), usage events through the pipeline and `HttpUsageExporter`, aggregates read
//! back with `GET /v1/usage`. The numbers must add up exactly.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use keygate::HttpUsageExporter;
use keygate::server::{AdminClient, KeyServer, NewKey, RunningKeyServer, UsageBucket};
use keygate::{
    ApiKey, ApiKeyLayer, CachedVerifier, HttpVerifier, Outcome, RequireScopes, UsageEvent, UsagePipeline, UsageSink,
};
use time::OffsetDateTime;
use tower::ServiceExt;

const SERVICE: &str = "svc-usage-e2e-token";
const ADMIN: &str = "adm-usage-e2e-token";

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

fn total(buckets: &[UsageBucket]) -> UsageBucket {
    buckets.iter().fold(
        UsageBucket {
            start: OffsetDateTime::UNIX_EPOCH,
            requests: 0,
            allowed: 0,
            denied: 0,
            status_2xx: 0,
            status_4xx: 0,
            status_5xx: 0,
            latency_ms_sum: 0.0,
            latency_ms_max: 0.0,
        },
        |mut t, b| {
            t.requests += b.requests;
            t.allowed += b.allowed;
            t.denied += b.denied;
            t.status_2xx += b.status_2xx;
            t.status_4xx += b.status_4xx;
            t.status_5xx += b.status_5xx;
            t.latency_ms_sum += b.latency_ms_sum;
            t.latency_ms_max = t.latency_ms_max.max(b.latency_ms_max);
            t
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_the_layer_add_up_exactly_in_the_key_service() {
    const ALLOWED: u64 = 400;
    const FORBIDDEN: u64 = 100;
    const NO_KEY: u64 = 25;

    let rig = start().await;
    let (reader_id, reader) = create(&rig.admin, &["reports:read"]).await;
    let (other_id, other) = create(&rig.admin, &["billing:read"]).await;

    // Small batches and a short interval: many batches, some by size, some by time.
    let (sink, handle) = UsagePipeline::builder()
        .batch_size(64)
        .flush_interval(Duration::from_millis(100))
        .build(exporter(&rig))
        .unwrap();
    let verifier =
        CachedVerifier::builder(HttpVerifier::builder(rig.server.url()).service_token(SERVICE).build().unwrap())
            .build();
    let app = Router::new()
        .route("/reports/{id}", get(|| async { "report" }).route_layer(RequireScopes::all(["reports:read"])))
        .layer(ApiKeyLayer::new(verifier).usage(sink.clone()));

    let mut tasks = tokio::task::JoinSet::new();
    let plan = [
        (Some(&reader), ALLOWED, StatusCode::OK),
        (Some(&other), FORBIDDEN, StatusCode::FORBIDDEN),
        (None, NO_KEY, StatusCode::UNAUTHORIZED),
    ];
    for (key, n, expected) in plan {
        for i in 0..n {
            let app = app.clone();
            let auth = key.map(|k| format!("Bearer {}", k.expose_secret()));
            tasks.spawn(async move {
                let mut req = Request::get(format!("/reports/{i}"));
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

    let sent = ALLOWED + FORBIDDEN + NO_KEY;
    drop(app);
    let stats = handle.shutdown().await;
    assert_eq!((stats.enqueued, stats.exported, stats.dropped, stats.lost), (sent, sent, 0, 0), "{stats:?}");

    let served = rig.server.stats();
    assert_eq!(served.usage_events, sent);
    assert_eq!(served.usage_unattributed, NO_KEY, "no-key events have no key to count against");
    assert_eq!(served.usage_dropped_reported, 0);

    let reader_usage = total(&rig.admin.usage(&reader_id, None).await.unwrap().buckets);
    assert_eq!(
        (reader_usage.requests, reader_usage.allowed, reader_usage.denied, reader_usage.status_2xx),
        (ALLOWED, ALLOWED, 0, ALLOWED)
    );
    assert!(reader_usage.latency_ms_sum > 0.0 && reader_usage.latency_ms_max > 0.0);
    let other_usage = total(&rig.admin.usage(&other_id, None).await.unwrap().buckets);
    assert_eq!(
        (other_usage.requests, other_usage.allowed, other_usage.denied, other_usage.status_4xx),
        (FORBIDDEN, 0, FORBIDDEN, FORBIDDEN)
    );
    assert!(rig.admin.get_key(&reader_id).await.unwrap().last_used_at.is_some());
    rig.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_events_for_one_key_add_up_exactly() {
    const N: u64 = 25_000;
    let rig = start().await;
    let (key_id, _key) = create(&rig.admin, &["reports:read"]).await;
    // Defaults: N fits in the 65 536-event queue, so nothing is dropped however fast we go.
    let (sink, handle) = UsagePipeline::builder().build(exporter(&rig)).unwrap();
    let key_id_arc: std::sync::Arc<str> = key_id.as_str().into();
    for i in 0..N {
        let denied = i % 10 == 0;
        sink.record(UsageEvent {
            at: OffsetDateTime::now_utc(),
            key_id: Some(key_id_arc.clone()),
            owner: Some("acme".into()),
            outcome: if denied { Outcome::InsufficientScope } else { Outcome::Allowed },
            method: "GET".into(),
            route: "/reports/{id}".into(),
            status: if denied {
                403
            } else if i % 7 == 0 {
                500
            } else {
                200
            },
            latency: Duration::from_millis(2),
            client_ip: None,
            request_id: None,
        });
    }
    let stats = handle.shutdown().await;
    assert_eq!((stats.exported, stats.dropped, stats.lost), (N, 0, 0), "{stats:?}");

    let usage = total(&rig.admin.usage(&key_id, None).await.unwrap().buckets);
    let denied = N.div_ceil(10);
    let errors = (0..N).filter(|i| i % 10 != 0 && i % 7 == 0).count() as u64;
    assert_eq!(usage.requests, N);
    assert_eq!((usage.allowed, usage.denied), (N - denied, denied));
    assert_eq!((usage.status_2xx, usage.status_4xx, usage.status_5xx), (N - denied - errors, denied, errors));
    assert!((usage.latency_ms_sum - 2.0 * N as f64).abs() < 1.0, "{}", usage.latency_ms_sum);
    rig.server.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn drops_are_reported_to_the_key_service() {
    let rig = start().await;
    let (key_id, _key) = create(&rig.admin, &[]).await;
    let (sink, handle) = UsagePipeline::builder().capacity(100).batch_size(100).build(exporter(&rig)).unwrap();
    let key_id_arc: std::sync::Arc<str> = key_id.as_str().into();
    // The worker shares this thread: 100 fit, 50 are dropped.
    for _ in 0..150 {
        sink.record(UsageEvent {
            at: OffsetDateTime::now_utc(),
            key_id: Some(key_id_arc.clone()),
            owner: None,
            outcome: Outcome::NotFound,
            method: "GET".into(),
            route: "/".into(),
            status: 401,
            latency: Duration::from_micros(100),
            client_ip: None,
            request_id: None,
        });
    }
    let stats = handle.shutdown().await;
    assert_eq!((stats.exported, stats.dropped), (100, 50));
    let served = rig.server.stats();
    assert_eq!((served.usage_events, served.usage_dropped_reported), (100, 50));
    assert_eq!(total(&rig.admin.usage(&key_id, None).await.unwrap().buckets).denied, 100);
    rig.server.shutdown().await;
}
