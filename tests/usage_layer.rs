//! Usage events through the real layer over loopback: one per decided request, allowed
//! and every denial kind, with the right fields, and never the key.

use std::net::IpAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use keygate::ChannelSink;
use keygate::{
    ApiKey, ApiKeyLayer, Outcome, Principal, RateLimit, RequireScopes, ScopeSet, StaticVerifier, UsageEvent, Verdict,
    Verifier, VerifyError,
};
use time::OffsetDateTime;
use tokio::sync::mpsc;

struct Down;

impl Verifier for Down {
    async fn verify(&self, _: &ApiKey) -> Result<Verdict, VerifyError> {
        Err(VerifyError::Unreachable("connection refused".into()))
    }
}

fn principal(id: &str, scopes: &[&str]) -> keygate::PrincipalBuilder {
    Principal::builder(id).owner("acme").scopes(ScopeSet::parse(scopes).unwrap())
}

fn routes() -> Router {
    Router::new()
        .route("/reports/{id}", get(|| async { "report" }).post(|| async { (axum::http::StatusCode::CREATED, "made") }))
        .route_layer(RequireScopes::all(["reports:read"]))
        .route("/admin", get(|| async { "admin" }).route_layer(RequireScopes::all(["admin:*"])))
        .route("/open", get(|| async { "open" }))
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

async fn next(rx: &mut mpsc::Receiver<UsageEvent>) -> UsageEvent {
    tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.expect("a usage event").expect("channel open")
}

struct Keys {
    reader: ApiKey,
    limited: ApiKey,
    revoked: ApiKey,
    disabled: ApiKey,
    expired: ApiKey,
    unknown: ApiKey,
}

#[tokio::test]
async fn every_decision_emits_one_event_with_the_right_fields() {
    let keys = Keys {
        reader: ApiKey::generate("kg").unwrap(),
        limited: ApiKey::generate("kg").unwrap(),
        revoked: ApiKey::generate("kg").unwrap(),
        disabled: ApiKey::generate("kg").unwrap(),
        expired: ApiKey::generate("kg").unwrap(),
        unknown: ApiKey::generate("kg").unwrap(),
    };
    let verifier = StaticVerifier::new()
        .with_key(&keys.reader, principal("key_reader", &["reports:read"]).build())
        .with_key(
            &keys.limited,
            principal("key_limited", &["reports:read"])
                .ratelimit(Some(RateLimit { limit: 1, period_s: 3_600 }))
                .build(),
        )
        .with_key(&keys.revoked, principal("key_revoked", &["reports:read"]).build())
        .with_key(&keys.disabled, principal("key_disabled", &["reports:read"]).build())
        .with_key(
            &keys.expired,
            principal("key_expired", &["reports:read"])
                .expires_at(Some(OffsetDateTime::now_utc() - Duration::from_secs(60)))
                .build(),
        );
    verifier.revoke("key_revoked");
    verifier.set_disabled("key_disabled", true);

    let (sink, mut rx) = ChannelSink::new(64);
    let layer = ApiKeyLayer::new(verifier).usage(sink.clone()).client_ip_from_header("x-forwarded-for");
    let base = serve(routes().layer(layer)).await;
    let client = reqwest::Client::new();
    let bearer = |k: &ApiKey| format!("Bearer {}", k.expose_secret());

    // Allowed: the template, not the path; who, what, how long, from where, which request.
    let before = OffsetDateTime::now_utc();
    let res = client
        .post(format!("{base}/reports/42"))
        .header("authorization", bearer(&keys.reader))
        .header("x-forwarded-for", "198.51.100.1, 203.0.113.9")
        .header("x-request-id", "req-abc")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let e = next(&mut rx).await;
    assert_eq!(e.outcome, Outcome::Allowed);
    assert_eq!(e.key_id.as_deref(), Some("key_reader"));
    assert_eq!(e.owner.as_deref(), Some("acme"));
    assert_eq!(e.method, "POST");
    assert_eq!(&*e.route, "/reports/{id}");
    assert_eq!(e.status, 201);
    assert_eq!(e.client_ip, Some("203.0.113.9".parse::<IpAddr>().unwrap()), "the last hop the proxy added");
    assert_eq!(e.request_id.as_deref(), Some("req-abc"));
    assert!(e.at >= before - Duration::from_secs(1) && e.at <= OffsetDateTime::now_utc());
    assert!(e.latency > Duration::ZERO && e.latency < Duration::from_secs(2));

    // (request, expected status, outcome, key id known?)
    let cases: Vec<(reqwest::RequestBuilder, u16, Outcome, Option<&str>)> = vec![
        (client.get(format!("{base}/reports/1")), 401, Outcome::NoKey, None),
        (
            client
                .get(format!("{base}/reports/1"))
                .header("authorization", bearer(&keys.reader))
                .header("authorization", bearer(&keys.reader)),
            400,
            Outcome::Conflict,
            None,
        ),
        (
            client.get(format!("{base}/reports/1")).header("authorization", "Bearer kg_notavalidkey"),
            401,
            Outcome::Malformed,
            None,
        ),
        (
            client.get(format!("{base}/reports/1")).header("x-api-key", keys.unknown.expose_secret()),
            401,
            Outcome::NotFound,
            None,
        ),
        (
            client.get(format!("{base}/reports/1")).header("authorization", bearer(&keys.revoked)),
            401,
            Outcome::Revoked,
            // A refused key that exists is still named (never to the client).
            Some("key_revoked"),
        ),
        (
            client.get(format!("{base}/reports/1")).header("authorization", bearer(&keys.disabled)),
            401,
            Outcome::Disabled,
            // A refused key that exists is still named (never to the client).
            Some("key_disabled"),
        ),
        (
            client.get(format!("{base}/reports/1")).header("authorization", bearer(&keys.expired)),
            401,
            Outcome::Expired,
            // A refused key that exists is still named (never to the client).
            Some("key_expired"),
        ),
        (
            client.get(format!("{base}/admin")).header("authorization", bearer(&keys.reader)),
            403,
            Outcome::InsufficientScope,
            Some("key_reader"),
        ),
        (
            client.get(format!("{base}/reports/1")).header("authorization", bearer(&keys.limited)),
            200,
            Outcome::Allowed,
            Some("key_limited"),
        ),
        (
            client.get(format!("{base}/reports/1")).header("authorization", bearer(&keys.limited)),
            429,
            Outcome::RateLimited,
            Some("key_limited"),
        ),
    ];
    let mut seen = vec![];
    for (request, status, outcome, key_id) in cases {
        let res = request.send().await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{outcome:?}");
        let e = next(&mut rx).await;
        assert_eq!((e.outcome, e.status), (outcome, status));
        assert_eq!(e.key_id.as_deref(), key_id, "{outcome:?}");
        assert_eq!(e.method, "GET");
        assert!(e.route.starts_with('/'), "{outcome:?}: {}", e.route);
        assert!(e.client_ip.is_none(), "no forwarding header, no address");
        seen.push(e);
    }
    assert!(rx.try_recv().is_err(), "exactly one event per request");
    assert_eq!(sink.dropped(), 0);

    // No event carries key material, however it is printed.
    let dump = format!("{:?}{}", seen, serde_json::to_string(&seen).unwrap());
    for k in [&keys.reader, &keys.limited, &keys.revoked, &keys.disabled, &keys.expired, &keys.unknown] {
        let secret = k.expose_secret();
        assert!(!dump.contains(secret) && !dump.contains(&secret[3..20]), "key material in a usage event");
    }
}

#[tokio::test]
async fn a_key_service_outage_is_recorded_as_unavailable() {
    let (sink, mut rx) = ChannelSink::new(8);
    let base = serve(routes().layer(ApiKeyLayer::new(Down).usage(sink))).await;
    let key = ApiKey::generate("kg").unwrap();
    let res = reqwest::Client::new()
        .get(format!("{base}/reports/7"))
        .header("x-api-key", key.expose_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    let e = next(&mut rx).await;
    assert_eq!((e.outcome, e.status, e.key_id.as_deref()), (Outcome::Unavailable, 503, None));
}

#[tokio::test]
async fn an_optional_layer_records_anonymous_requests() {
    let (sink, mut rx) = ChannelSink::new(8);
    let base = serve(routes().layer(ApiKeyLayer::new(StaticVerifier::new()).optional().usage(sink))).await;
    let res = reqwest::Client::new().get(format!("{base}/open")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let e = next(&mut rx).await;
    assert_eq!((e.outcome, e.status, e.key_id.as_deref(), &*e.route), (Outcome::Anonymous, 200, None, "/open"));
}

#[tokio::test]
async fn an_anonymous_request_refused_by_the_principal_extractor_is_recorded_as_no_key() {
    let (sink, mut rx) = ChannelSink::new(8);
    let key = ApiKey::generate("kg").unwrap();
    let app = Router::new().route("/me/{id}", get(|p: Principal| async move { p.key_id().to_owned() })).layer(
        ApiKeyLayer::new(StaticVerifier::new().with_key(&key, principal("key_1", &[]).build())).optional().usage(sink),
    );
    let base = serve(app).await;
    let client = reqwest::Client::new();
    let res = client.get(format!("{base}/me/7")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let e = next(&mut rx).await;
    // Not "anonymous, 401": the request was refused for want of a key, on its route.
    assert_eq!((e.outcome, e.status, e.key_id.as_deref(), &*e.route), (Outcome::NoKey, 401, None, "/me/{id}"));
    let res = client.get(format!("{base}/me/7")).bearer_auth(key.expose_secret()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let e = next(&mut rx).await;
    assert_eq!((e.outcome, e.status, e.key_id.as_deref()), (Outcome::Allowed, 200, Some("key_1")));
}

#[tokio::test]
async fn a_sink_that_never_drains_does_not_slow_requests() {
    // Capacity 1 and nobody reading: every event after the first is dropped and counted,
    // and requests are answered as usual.
    let (sink, _rx) = ChannelSink::new(1);
    let key = ApiKey::generate("kg").unwrap();
    let verifier = StaticVerifier::new().with_key(&key, principal("key_1", &["reports:read"]).build());
    let base = serve(routes().layer(ApiKeyLayer::new(verifier).usage(sink.clone()))).await;
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    for _ in 0..50 {
        let res =
            client.get(format!("{base}/reports/1")).header("x-api-key", key.expose_secret()).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(sink.dropped(), 49);
}

/// `ApiKeyLayer::require`: one layer per route that authenticates and authorizes,
/// answering and recording exactly as the layer plus a `RequireScopes` would.
#[tokio::test]
async fn a_layer_with_its_own_policy_authorizes_and_records_the_route() {
    let reader = ApiKey::generate("kg").unwrap();
    let admin = ApiKey::generate("kg").unwrap();
    let verifier = StaticVerifier::new()
        .with_key(&reader, principal("key_reader", &["reports:read"]).build())
        .with_key(&admin, principal("key_admin", &[]).roles(["admin"]).build());
    let (sink, mut rx) = ChannelSink::new(64);
    let auth = ApiKeyLayer::new(verifier).realm("reports").usage(sink);
    let app = Router::new()
        .route(
            "/reports/{id}",
            get(|p: Principal| async move { p.key_id().to_owned() })
                .layer(auth.clone().require(RequireScopes::all(["reports:read"]))),
        )
        .route(
            "/admin",
            get(|| async { "admin" }).layer(auth.require(RequireScopes::role("admin").realm("back-office"))),
        )
        .route("/open", get(|| async { "open" }));
    let base = serve(app).await;
    let client = reqwest::Client::new();
    let get = |path: &str, key: Option<&ApiKey>| {
        let mut req = client.get(format!("{base}{path}"));
        if let Some(key) = key {
            req = req.bearer_auth(key.expose_secret());
        }
        req.send()
    };

    let res = get("/reports/7", Some(&reader)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "key_reader");
    let e = next(&mut rx).await;
    assert_eq!((e.outcome, e.status, &*e.route), (Outcome::Allowed, 200, "/reports/{id}"));
    assert_eq!(e.key_id.as_deref(), Some("key_reader"));

    // A valid key without the scope: 403 in the layer's realm, recorded as a denial
    // that names the key.
    let res = get("/reports/7", Some(&admin)).await.unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(
        res.headers()["www-authenticate"],
        r#"Bearer realm="reports", error="insufficient_scope", scope="reports:read""#
    );
    let e = next(&mut rx).await;
    assert_eq!((e.outcome, e.status, &*e.route), (Outcome::InsufficientScope, 403, "/reports/{id}"));
    assert_eq!(e.key_id.as_deref(), Some("key_admin"));

    // The policy's own realm wins for its denials; a missing key is the layer's 401.
    let res = get("/admin", Some(&reader)).await.unwrap();
    assert_eq!(res.status(), 403);
    assert!(res.headers()["www-authenticate"].to_str().unwrap().starts_with(r#"Bearer realm="back-office""#));
    let res = get("/admin", None).await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], r#"Bearer realm="reports""#);
    let res = get("/admin", Some(&admin)).await.unwrap();
    assert_eq!(res.status(), 200);

    // Routes without the layer are not touched.
    assert_eq!(get("/open", None).await.unwrap().status(), 200);
}

/// A layer wrapped around the whole router runs before routing: the template comes
/// back from the route's `RequireScopes`, and the raw path stands in where none does.
#[tokio::test]
async fn a_layer_outside_the_router_still_records_route_templates() {
    use tower::{Layer, ServiceExt};

    let reader = ApiKey::generate("kg").unwrap();
    let verifier = StaticVerifier::new().with_key(&reader, principal("key_reader", &["reports:read"]).build());
    let (sink, mut rx) = ChannelSink::new(64);
    let app = ApiKeyLayer::new(verifier).usage(sink).layer(routes());
    let request = |path: &str| {
        axum::http::Request::get(path)
            .header("authorization", format!("Bearer {}", reader.expose_secret()))
            .body(axum::body::Body::empty())
            .unwrap()
    };

    let res = app.clone().oneshot(request("/reports/7")).await.unwrap();
    assert_eq!(res.status(), 200);
    let e = next(&mut rx).await;
    assert_eq!((e.outcome, &*e.route), (Outcome::Allowed, "/reports/{id}"));
    let res = app.oneshot(request("/open?x=1")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(&*next(&mut rx).await.route, "/open");
}
