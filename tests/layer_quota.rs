//! Named limits, credits and route costs enforced by the layer (per process), against a
//! real key service on loopback: a route of cost 10 spends 100 credits in exactly 10
//! requests, a limit other than `requests` binds, an owner's limit is shared by its
//! keys, a refill restores credits, the old single `ratelimit` still limits, gRPC
//! answers `RESOURCE_EXHAUSTED`, and usage events record both refusals.

mod server_support;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use http::{Request, StatusCode, header};
use keygate::client::{NewKey, OwnerQuota};
use keygate::quota::{Credits, Limit, Refill};
use keygate::{
    ApiKeyLayer, CachedVerifier, ChannelSink, Cost, HttpVerifier, Outcome, Principal, RateLimit, RequireScopes,
};
use server_support::{SERVICE, TestServer, new_key};
use tower::ServiceExt;

fn verifier(t: &TestServer) -> HttpVerifier {
    HttpVerifier::builder(t.server.url()).service_token(SERVICE).build().unwrap()
}

/// The protected app: `/items` at the default cost, `/export` at 10 credits,
/// `/reports` drawing 1 from `reports` only, `/status` free, and `/whoami` answering
/// what the principal carries.
fn app(layer: ApiKeyLayer<impl keygate::Verifier>) -> Router {
    Router::new()
        .route("/items", get(|| async { "items" }))
        .route("/export", post(|| async { "export" }).route_layer(Cost::new().credits(10)))
        .route("/reports", get(|| async { "report" }).route_layer(Cost::free().limit("reports", 1)))
        .route("/status", get(|| async { "ok" }).route_layer(Cost::free()))
        .route(
            "/whoami",
            get(|p: Principal| async move {
                axum::Json(serde_json::json!({
                    "limits": p.limits(),
                    "credits": p.credits(),
                    "owner_limits": p.owner_limits(),
                    "owner_credits": p.owner_credits(),
                    "ratelimit": p.ratelimit(),
                }))
            }),
        )
        .layer(layer)
}

async fn call(app: &Router, method: &str, path: &str, key: &str) -> http::Response<Body> {
    let req = Request::builder().method(method).uri(path).header(header::AUTHORIZATION, format!("Bearer {key}"));
    app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap()
}

async fn problem_code(res: http::Response<Body>) -> String {
    let bytes = axum::body::to_bytes(res.into_body(), 64 * 1024).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["code"].as_str().unwrap_or_default().to_owned()
}

fn header_str<'a>(res: &'a http::Response<Body>, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn a_route_of_cost_ten_spends_a_hundred_credits_in_exactly_ten_requests() {
    let t = TestServer::start().await;
    let credits = Credits { remaining: 100, refill: None };
    let k = t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap();
    let (sink, mut rx) = ChannelSink::new(64);
    let app = app(ApiKeyLayer::new(verifier(&t)).usage(sink));
    let key = k.key.expose_secret();
    for i in 0..10 {
        let res = call(&app, "POST", "/export", key).await;
        assert_eq!(res.status(), StatusCode::OK, "request {i}");
    }
    let res = call(&app, "POST", "/export", key).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(res.headers().get(header::RETRY_AFTER).is_none(), "no refill, so no time to wait for");
    assert_eq!(problem_code(res).await, "usage_exceeded");
    // Spent is spent on every route that costs credits. Behind a router-wide layer,
    // which charges the default before routing, a free route is refused too (as
    // documented on `Cost`); a layer of its own that costs nothing lets it through.
    assert_eq!(call(&app, "GET", "/items", key).await.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(call(&app, "GET", "/status", key).await.status(), StatusCode::TOO_MANY_REQUESTS);
    let free =
        Router::new().route("/status", get(|| async { "ok" })).layer(ApiKeyLayer::new(verifier(&t)).cost(Cost::free()));
    assert_eq!(call(&free, "GET", "/status", key).await.status(), StatusCode::OK);
    // Usage events record the refusal as its own outcome.
    let mut outcomes = Vec::new();
    while let Ok(e) = rx.try_recv() {
        outcomes.push((e.outcome, e.status));
    }
    assert_eq!(outcomes.len(), 13);
    assert_eq!(outcomes.iter().filter(|o| **o == (Outcome::Allowed, 200)).count(), 10);
    assert_eq!(outcomes.iter().filter(|o| **o == (Outcome::UsageExceeded, 429)).count(), 3);
    assert_eq!(Outcome::UsageExceeded.as_str(), "usage_exceeded");
}

#[tokio::test]
async fn a_named_limit_other_than_requests_binds_and_says_so() {
    let t = TestServer::start().await;
    let limits = vec![Limit::new("requests", 1000, 1), Limit::new("reports", 3, 3600)];
    let k = t.admin.create_key(NewKey { limits, ..new_key("acme", &["a:b"]) }).await.unwrap();
    let (sink, mut rx) = ChannelSink::new(64);
    let app = app(ApiKeyLayer::new(verifier(&t)).usage(sink));
    let key = k.key.expose_secret();
    for left in (0..3).rev() {
        let res = call(&app, "GET", "/reports", key).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header_str(&res, "ratelimit-policy"), Some("\"reports\";q=3;w=3600"));
        let fields = header_str(&res, "ratelimit").unwrap();
        assert!(fields.starts_with(&format!("\"reports\";r={left};t=")), "{fields}");
    }
    let res = call(&app, "GET", "/reports", key).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = header_str(&res, "retry-after").unwrap().parse().unwrap();
    assert!((1..=1200).contains(&wait), "one report comes back every 1 200 s: {wait}");
    assert_eq!(header_str(&res, "ratelimit-policy"), Some("\"reports\";q=3;w=3600"));
    assert!(header_str(&res, "ratelimit").unwrap().starts_with("\"reports\";r=0;"));
    assert_eq!(problem_code(res).await, "rate_limited");
    // `requests` is another budget: the default route still answers, and says so.
    let res = call(&app, "GET", "/items", key).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header_str(&res, "ratelimit-policy"), Some("\"requests\";q=1000;w=1"));
    let refused: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).filter(|e| e.status == 429).collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].outcome, Outcome::RateLimited);
}

#[tokio::test]
async fn an_owner_limit_is_shared_by_its_keys_and_travels_in_the_answer() {
    let t = TestServer::start().await;
    let quota = OwnerQuota {
        limits: vec![Limit::new("requests", 5, 3600)],
        credits: Some(Credits { remaining: 1000, refill: Some(Refill::Monthly { day: 1, amount: 1000 }) }),
        ..OwnerQuota::default()
    };
    t.admin.put_owner("acme", &quota).await.unwrap();
    let a = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let b = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let other = t.admin.create_key(new_key("globex", &["a:b"])).await.unwrap();
    let cached = CachedVerifier::builder(verifier(&t)).positive_ttl(Duration::from_secs(60)).build();
    let app = app(ApiKeyLayer::new(cached));
    let (a, b) = (a.key.expose_secret(), b.key.expose_secret());

    // The principal carries the owner's limits and credits, marked as the owner's.
    let res = call(&app, "GET", "/whoami", a).await;
    assert_eq!(res.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(res.into_body(), 64 * 1024).await.unwrap();
    let who: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(who["owner_limits"], serde_json::json!([{ "name": "requests", "limit": 5, "period_s": 3600 }]));
    assert_eq!(who["owner_credits"]["remaining"], 1000);
    assert_eq!((who["limits"].clone(), who["credits"].clone()), (serde_json::json!([]), serde_json::Value::Null));

    // 1 spent by /whoami; 4 more between the two keys, then both are refused.
    for key in [b, a, b, a] {
        assert_eq!(call(&app, "GET", "/items", key).await.status(), StatusCode::OK);
    }
    for key in [a, b] {
        let res = call(&app, "GET", "/items", key).await;
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(problem_code(res).await, "rate_limited");
    }
    assert_eq!(call(&app, "GET", "/items", other.key.expose_secret()).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_refill_restores_credits_at_its_time() {
    let t = TestServer::start().await;
    // Every 3 s (UTC multiples of 3 s since the epoch), the count is set back to 2.
    let credits = Credits { remaining: 2, refill: Some(Refill::Every { interval_s: 3, amount: 2 }) };
    let k = t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap();
    let app = app(ApiKeyLayer::new(verifier(&t)));
    let key = k.key.expose_secret();
    // Spend until refused: 2, or up to 4 when a refill falls in between.
    let mut allowed = 0;
    let wait = loop {
        let res = call(&app, "GET", "/items", key).await;
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            let wait: u64 = header_str(&res, "retry-after").expect("a refill to wait for").parse().unwrap();
            assert_eq!(problem_code(res).await, "usage_exceeded");
            break wait;
        }
        allowed += 1;
        assert!(allowed <= 4, "credits never ran out");
    };
    assert!((1..=3).contains(&wait), "the next refill is at most 3 s away: {wait}");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    // Refilled: allowed again (bounded wait, for a slow machine's clock rounding).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if call(&app, "GET", "/items", key).await.status() == StatusCode::OK {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never refilled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_old_single_ratelimit_still_limits() {
    let t = TestServer::start().await;
    let old = NewKey { ratelimit: Some(RateLimit { limit: 2, period_s: 60 }), ..new_key("acme", &["a:b"]) };
    let k = t.admin.create_key(old).await.unwrap();
    let app = app(ApiKeyLayer::new(verifier(&t)));
    let key = k.key.expose_secret();
    for _ in 0..2 {
        let res = call(&app, "GET", "/items", key).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header_str(&res, "ratelimit-policy"), Some("\"requests\";q=2;w=60"));
    }
    let res = call(&app, "GET", "/items", key).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(res.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(problem_code(res).await, "rate_limited");
    // Limits off: nothing is enforced, route costs included.
    let off = app_with_limits_off(&t);
    assert_eq!(call(&off, "GET", "/items", key).await.status(), StatusCode::OK);
}

fn app_with_limits_off(t: &TestServer) -> Router {
    app(ApiKeyLayer::new(verifier(t)).rate_limits(false))
}

/// A gRPC request: `application/grpc`, answered trailers-only.
async fn grpc_call(app: &Router, path: &str, key: &str) -> http::Response<Body> {
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::AUTHORIZATION, format!("Bearer {key}"));
    app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap()
}

#[tokio::test]
async fn grpc_methods_have_costs_and_both_refusals_are_resource_exhausted() {
    let t = TestServer::start().await;
    let new = NewKey {
        limits: vec![Limit::new("exports", 1, 3600)],
        credits: Some(Credits { remaining: 30, refill: None }),
        ..new_key("acme", &["reports:read"])
    };
    let k = t.admin.create_key(new).await.unwrap();
    let policy = RequireScopes::methods()
        .method("/reports.Reports/Get", "reports:read")
        .method("/reports.Reports/Export", "reports:read")
        .method_cost("/reports.Reports/Export", Cost::free().limit("exports", 1))
        .cost(Cost::new().credits(10));
    // The layer's own policy: the method's cost is charged at once, no give-back.
    let app = Router::new()
        .route("/reports.Reports/Get", post(|| async { "get" }))
        .route("/reports.Reports/Export", post(|| async { "export" }))
        .layer(ApiKeyLayer::new(verifier(&t)).require(policy));
    let key = k.key.expose_secret();
    let grpc_status = |res: &http::Response<Body>| header_str(res, "grpc-status").map(str::to_owned);

    let res = grpc_call(&app, "/reports.Reports/Export", key).await;
    assert_eq!((res.status(), grpc_status(&res)), (StatusCode::OK, None), "allowed");
    let res = grpc_call(&app, "/reports.Reports/Export", key).await;
    assert_eq!(grpc_status(&res).as_deref(), Some("8"), "`exports` spent: RESOURCE_EXHAUSTED");
    assert!(res.headers().contains_key(header::RETRY_AFTER));
    assert_eq!(header_str(&res, "ratelimit-policy"), Some("\"exports\";q=1;w=3600"));
    // Get costs 10 credits: 30 last three calls.
    for _ in 0..3 {
        let res = grpc_call(&app, "/reports.Reports/Get", key).await;
        assert_eq!(grpc_status(&res), None);
    }
    let res = grpc_call(&app, "/reports.Reports/Get", key).await;
    assert_eq!(grpc_status(&res).as_deref(), Some("8"), "credits spent: RESOURCE_EXHAUSTED");
    let message = header_str(&res, "grpc-message").unwrap();
    assert!(message.contains("credits"), "{message}");
}

#[tokio::test]
async fn a_refused_policy_costs_nothing() {
    let t = TestServer::start().await;
    let new = NewKey { credits: Some(Credits { remaining: 1, refill: None }), ..new_key("acme", &["a:b"]) };
    let k = t.admin.create_key(new).await.unwrap();
    let app = Router::new()
        .route("/admin", get(|| async { "admin" }).route_layer(RequireScopes::role("admin")))
        .route("/items", get(|| async { "items" }))
        .layer(ApiKeyLayer::new(verifier(&t)));
    let key = k.key.expose_secret();
    for _ in 0..3 {
        assert_eq!(call(&app, "GET", "/admin", key).await.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(call(&app, "GET", "/items", key).await.status(), StatusCode::OK, "the one credit is still there");
    assert_eq!(call(&app, "GET", "/items", key).await.status(), StatusCode::TOO_MANY_REQUESTS);
}

/// A key service of an older version: its answers carry only `ratelimit`.
async fn old_key_service(answer: serde_json::Value) -> String {
    let app = Router::new().route("/v1/keys/verify", post(move || async move { axum::Json(answer.clone()) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test]
async fn an_older_key_services_ratelimit_is_the_requests_limit() {
    let answer = serde_json::json!({
        "valid": true, "key_id": "key_old", "owner": "acme", "scopes": [], "expires_at": null,
        "ratelimit": { "limit": 1, "period_s": 60 },
    });
    let url = old_key_service(answer).await;
    let verifier = HttpVerifier::builder(&url).service_token(SERVICE).build().unwrap();
    let app = app(ApiKeyLayer::new(verifier));
    let key = keygate::ApiKey::generate("kg").unwrap();
    let res = call(&app, "GET", "/whoami", key.expose_secret()).await;
    assert_eq!(res.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(res.into_body(), 64 * 1024).await.unwrap();
    let who: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(who["limits"], serde_json::json!([{ "name": "requests", "limit": 1, "period_s": 60 }]));
    assert_eq!(who["ratelimit"], serde_json::json!({ "limit": 1, "period_s": 60 }));
    assert_eq!(call(&app, "GET", "/items", key.expose_secret()).await.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn an_answer_with_limits_no_key_service_accepts_is_an_error_not_a_grant() {
    let answer = serde_json::json!({
        "valid": true, "key_id": "key_bad", "expires_at": null,
        "limits": [{ "name": "Not A Name", "limit": 1, "period_s": 1 }],
    });
    let url = old_key_service(answer).await;
    let verifier = HttpVerifier::builder(&url).service_token(SERVICE).build().unwrap();
    let app = app(ApiKeyLayer::new(verifier));
    let key = keygate::ApiKey::generate("kg").unwrap();
    assert_eq!(call(&app, "GET", "/items", key.expose_secret()).await.status(), StatusCode::SERVICE_UNAVAILABLE);
}
