//! The miss budget against the real key service on loopback: one client flooding the
//! layer with distinct unknown keys gets 429s past its budget and costs the key service
//! no more than the budget's worth of verify calls; another client's cached key is let in
//! throughout.

mod server_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use http::{Request, StatusCode, header};
use keygate::{ApiKey, ApiKeyLayer, CachedVerifier, HttpVerifier, MissBudget, Principal};
use server_support::{SERVICE, TestServer, new_key};
use tower::ServiceExt;

const PER_CLIENT: u64 = 50;
const PER: Duration = Duration::from_secs(60);

async fn call(app: &Router, key: &str, from: SocketAddr) -> (StatusCode, Option<String>) {
    let mut req =
        Request::get("/reports").header(header::AUTHORIZATION, format!("Bearer {key}")).body(Body::empty()).unwrap();
    // What axum's `into_make_service_with_connect_info` puts there.
    req.extensions_mut().insert(ConnectInfo(from));
    let res = app.clone().oneshot(req).await.unwrap();
    let retry = res.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_owned());
    (res.status(), retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_keys_is_throttled_per_client_and_cached_keys_pass() {
    let t = TestServer::start().await;
    let good = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let http = HttpVerifier::builder(t.server.url()).service_token(SERVICE).build().unwrap();
    let cache = CachedVerifier::builder(http)
        .miss_budget(MissBudget::new().per_client(PER_CLIENT, PER).overall(10_000, Duration::from_secs(1)))
        .build();
    let app = Router::new()
        .route("/reports", get(|p: Principal| async move { p.key_id().to_owned() }))
        .layer(ApiKeyLayer::new(cache.clone()));
    let flooder: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let customer: SocketAddr = "198.51.100.3:50000".parse().unwrap();
    assert_eq!(call(&app, good.key.expose_secret(), customer).await.0, StatusCode::OK);

    let before = t.server.stats().verify_calls;
    let started = Instant::now();
    let (mut refused, mut throttled) = (0u64, 0u64);
    for i in 0..10_000 {
        let stranger = ApiKey::generate("kg").unwrap();
        match call(&app, stranger.expose_secret(), flooder).await {
            (StatusCode::UNAUTHORIZED, _) => refused += 1,
            (StatusCode::TOO_MANY_REQUESTS, Some(retry)) => {
                let secs: u64 = retry.parse().expect("Retry-After in seconds");
                assert!((1..=60).contains(&secs), "Retry-After {secs}");
                throttled += 1;
            }
            other => panic!("request {i}: {other:?}"),
        }
        if i % 1_000 == 0 {
            assert_eq!(call(&app, good.key.expose_secret(), customer).await.0, StatusCode::OK, "at {i}");
        }
    }
    let elapsed = started.elapsed();
    // The budget: a burst of 50, then one every 1.2 s.
    let allowed = PER_CLIENT + (elapsed.as_secs_f64() * PER_CLIENT as f64 / PER.as_secs_f64()).ceil() as u64;
    assert!(refused >= PER_CLIENT && refused <= allowed, "{refused} answered 401, budget {allowed} over {elapsed:?}");
    assert_eq!(refused + throttled, 10_000);
    let calls = t.server.stats().verify_calls - before;
    assert!(calls <= allowed, "{calls} verify calls reached the key service, budget {allowed}");
    assert_eq!(cache.stats().throttled, throttled);
    // Another client's first miss still goes through.
    let newcomer = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    assert_eq!(call(&app, newcomer.key.expose_secret(), customer).await.0, StatusCode::OK);
}

#[tokio::test]
async fn requests_on_one_new_key_cost_one_miss_and_a_known_refusal_costs_none() {
    let t = TestServer::start().await;
    let good = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let http = HttpVerifier::builder(t.server.url()).service_token(SERVICE).build().unwrap();
    let cache = CachedVerifier::builder(http).miss_budget(MissBudget::new().per_client(1, PER).no_overall()).build();
    let app = Router::new()
        .route("/reports", get(|p: Principal| async move { p.key_id().to_owned() }))
        .layer(ApiKeyLayer::new(cache.clone()));
    let client: SocketAddr = "192.0.2.8:1234".parse().unwrap();
    // Twenty requests at once on a key the cache does not know: one flight, one charge.
    let all: Vec<_> = (0..20).map(|_| call(&app, good.key.expose_secret(), client)).collect();
    for (status, _) in futures_util::future::join_all(all).await {
        assert_eq!(status, StatusCode::OK);
    }
    // The budget is spent: a second unknown key is throttled, the cached one is not.
    let stranger = ApiKey::generate("kg").unwrap();
    assert_eq!(call(&app, stranger.expose_secret(), client).await.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(call(&app, good.key.expose_secret(), client).await.0, StatusCode::OK);
    assert_eq!(cache.stats().throttled, 1);
}
