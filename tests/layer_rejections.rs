//! A service's own rejections (`ApiKeyLayer::on_rejection`), the stable codes, the
//! `AuthError` handed outward in extensions, optional auth answered in auth terms, and
//! the challenge scheme, over real loopback sockets.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use http::header;
use keygate::quota::{Credits, Limit, Refill};
use keygate::{
    ApiKey, ApiKeyLayer, AuthError, Cost, KeySource, Principal, RateLimit, RequireScopes, ScopeSet, StaticVerifier,
    Verdict, Verifier, VerifyError,
};
use reqwest::StatusCode;
use time::OffsetDateTime;

/// A key service that is down.
struct Down;

impl Verifier for Down {
    async fn verify(&self, _: &ApiKey) -> Result<Verdict, VerifyError> {
        Err(VerifyError::Unreachable("connection refused".into()))
    }
}

/// The service's own error shape: `{"error": {"code", "message"}}` as plain JSON.
fn our_error(err: &AuthError) -> http::Response<Bytes> {
    let body = serde_json::json!({ "error": { "code": err.code(), "message": err.public_detail() } });
    http::Response::builder()
        .status(err.status())
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-error-code", err.code())
        .body(Bytes::from(body.to_string()))
        .unwrap()
}

struct Keys {
    reader: ApiKey,
    limited: ApiKey,
    revoked: ApiKey,
    expired: ApiKey,
}

fn keys() -> Keys {
    Keys {
        reader: ApiKey::generate("kg").unwrap(),
        limited: ApiKey::generate("kg").unwrap(),
        revoked: ApiKey::generate("kg").unwrap(),
        expired: ApiKey::generate("kg").unwrap(),
    }
}

fn verifier(keys: &Keys) -> StaticVerifier {
    let scoped = |id: &str| Principal::builder(id).owner("acme").scopes(ScopeSet::parse(["reports:read"]).unwrap());
    let stat = StaticVerifier::new()
        .with_key(&keys.reader, scoped("key_reader").build())
        .with_key(&keys.limited, scoped("key_limited").ratelimit(Some(RateLimit { limit: 1, period_s: 60 })).build())
        .with_key(&keys.revoked, scoped("key_revoked").build())
        .with_key(
            &keys.expired,
            scoped("key_expired").expires_at(Some(OffsetDateTime::now_utc() - Duration::from_secs(60))).build(),
        );
    stat.revoke("key_revoked");
    stat
}

fn routes() -> Router {
    Router::new()
        .route("/reports", get(|p: Principal| async move { p.key_id().to_owned() }))
        .route("/billing", get(|| async { "billing" }).route_layer(RequireScopes::all(["billing:read"])))
        .route(
            "/whoami",
            get(|p: Option<Principal>| async move { p.map_or("anonymous".into(), |p| p.key_id().to_owned()) }),
        )
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // With the peer address, which network allowlists check.
    let app = router.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn get_with(base: &str, path: &str, headers: &[(&str, String)]) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    req.send().await.unwrap()
}

fn bearer(key: &ApiKey) -> (&'static str, String) {
    ("authorization", format!("Bearer {}", key.expose_secret()))
}

fn header_of(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers().get(name).map(|v| v.to_str().unwrap().to_owned())
}

/// Status, the user's JSON error, the code header the hook set.
async fn ours(res: reqwest::Response) -> (StatusCode, String, String) {
    let status = res.status();
    assert_eq!(header_of(&res, "content-type").as_deref(), Some("application/json"));
    assert_eq!(header_of(&res, "cache-control").as_deref(), Some("no-store"), "keygate adds no-store");
    let code = header_of(&res, "x-error-code").unwrap();
    let body: serde_json::Value = res.json().await.unwrap();
    let body_code = body["error"]["code"].as_str().unwrap().to_owned();
    assert_eq!(code, body_code);
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    (status, body_code, body["error"]["message"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn every_rejection_goes_through_the_hook_with_the_headers_keygate_keeps() {
    let keys = keys();
    let layer = ApiKeyLayer::new(verifier(&keys)).realm("reports").on_rejection(our_error);
    let base = serve(routes().layer(layer)).await;

    let garbage = ("authorization", "Bearer kg_garbage".to_owned());
    for (headers, code) in [
        (vec![], "missing_key"),
        (vec![garbage.clone()], "invalid_key"),
        (vec![bearer(&keys.revoked)], "invalid_key"),
        (vec![bearer(&keys.expired)], "expired_key"),
    ] {
        let res = get_with(&base, "/reports", &headers).await;
        let www = header_of(&res, "www-authenticate").unwrap();
        assert!(www.starts_with(r#"Bearer realm="reports""#), "{code}: {www}");
        assert_eq!(www.contains("invalid_token"), code != "missing_key", "{code}: {www}");
        let (status, body_code, _) = ours(res).await;
        assert_eq!((status, body_code.as_str()), (StatusCode::UNAUTHORIZED, code));
    }

    // Two credentials: 400, the hook's body, no challenge added (it is no 401/403).
    let res =
        get_with(&base, "/reports", &[bearer(&keys.reader), ("x-api-key", keys.reader.expose_secret().to_owned())])
            .await;
    assert_eq!(header_of(&res, "www-authenticate"), None);
    assert_eq!(&ours(res).await.1, "conflicting_credentials");

    // A RequireScopes denial behind the layer goes through the same hook.
    let res = get_with(&base, "/billing", &[bearer(&keys.reader)]).await;
    assert_eq!(
        header_of(&res, "www-authenticate").as_deref(),
        Some(r#"Bearer realm="reports", error="insufficient_scope", scope="billing:read""#)
    );
    let (status, code, message) = ours(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "insufficient_scope"));
    assert!(message.contains("billing:read"), "{message}");

    // Rate limited: 429, `Retry-After` kept.
    assert_eq!(get_with(&base, "/reports", &[bearer(&keys.limited)]).await.status(), StatusCode::OK);
    let res = get_with(&base, "/reports", &[bearer(&keys.limited)]).await;
    let after: u64 = header_of(&res, "retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&after), "{after}");
    assert_eq!(header_of(&res, "ratelimit-policy").as_deref(), Some(r#""requests";q=1;w=60"#));
    assert_eq!(header_of(&res, "ratelimit"), Some(format!(r#""requests";r=0;t={after}"#)));
    assert_eq!(ours(res).await.1, "rate_limited");

    // A good key is untouched by the hook.
    let res = get_with(&base, "/reports", &[bearer(&keys.reader)]).await;
    assert_eq!((res.status(), res.text().await.unwrap().as_str()), (StatusCode::OK, "key_reader"));
}

/// Keys for the cases added after the first seven codes: environments, networks,
/// credits and named limits.
struct LaterKeys {
    test_env: ApiKey,
    partner: ApiKey,
    spent: ApiKey,
    refilling: ApiKey,
    reports_limited: ApiKey,
}

fn later_keys() -> (StaticVerifier, LaterKeys) {
    let k = LaterKeys {
        test_env: ApiKey::generate("kgtest").unwrap(),
        partner: ApiKey::generate("kg").unwrap(),
        spent: ApiKey::generate("kg").unwrap(),
        refilling: ApiKey::generate("kg").unwrap(),
        reports_limited: ApiKey::generate("kg").unwrap(),
    };
    let key = |id: &str| Principal::builder(id).owner("acme").environment("live");
    // Credits and limits are counted by the layer itself (per process): a static
    // principal that states them is enforced exactly like a key service's answer.
    let daily = Credits { remaining: 0, refill: Some(Refill::Daily { amount: 100 }) };
    let v = StaticVerifier::new()
        .with_key(&k.test_env, Principal::builder("key_test").owner("acme").environment("test").build())
        .with_key(&k.partner, key("key_partner").allowed_networks(["203.0.113.0/24".parse().unwrap()]).build())
        .with_key(&k.spent, key("key_spent").credits(Some(Credits { remaining: 0, refill: None })).build())
        .with_key(&k.refilling, key("key_refilling").credits(Some(daily)).build())
        .with_key(&k.reports_limited, key("key_reports").limits([Limit::new("reports", 1, 3600)]).build());
    (v, k)
}

fn later_routes() -> Router {
    Router::new()
        .route("/live", get(|| async { "live" }).route_layer(RequireScopes::environment("live")))
        .route("/reports", get(|| async { "report" }).route_layer(Cost::free().limit("reports", 1)))
}

#[tokio::test]
async fn the_later_codes_go_through_the_hook_with_the_headers_keygate_keeps() {
    let (verifier, k) = later_keys();
    let layer = ApiKeyLayer::new(verifier).realm("reports").on_rejection(our_error);
    let base = serve(later_routes().layer(layer)).await;

    // A test key on a live-only route: 403, the hook's body, keygate's challenge.
    let res = get_with(&base, "/live", &[bearer(&k.test_env)]).await;
    assert_eq!(
        header_of(&res, "www-authenticate").as_deref(),
        Some(r#"Bearer realm="reports", error="insufficient_scope""#)
    );
    let (status, code, message) = ours(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "wrong_environment"));
    assert!(message.contains("live"), "{message}");

    // 127.0.0.1 is outside the key's 203.0.113.0/24: 403, the same challenge.
    let res = get_with(&base, "/live", &[bearer(&k.partner)]).await;
    assert_eq!(
        header_of(&res, "www-authenticate").as_deref(),
        Some(r#"Bearer realm="reports", error="insufficient_scope""#)
    );
    let (status, code, _) = ours(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::FORBIDDEN, "ip_not_allowed"));

    // Credits spent and never refilled: 429 with nothing to wait for, so no Retry-After.
    let res = get_with(&base, "/live", &[bearer(&k.spent)]).await;
    assert_eq!(header_of(&res, "retry-after"), None);
    assert_eq!(header_of(&res, "www-authenticate"), None, "no challenge on a 429");
    let (status, code, _) = ours(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::TOO_MANY_REQUESTS, "usage_exceeded"));

    // Credits spent with a daily refill: Retry-After until the next midnight UTC.
    let res = get_with(&base, "/live", &[bearer(&k.refilling)]).await;
    let after: u64 = header_of(&res, "retry-after").expect("a refill to wait for").parse().unwrap();
    assert!((1..=86_400).contains(&after), "{after}");
    let (status, code, _) = ours(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::TOO_MANY_REQUESTS, "usage_exceeded"));

    // A named limit other than `requests`: 429, Retry-After and fields naming it.
    assert_eq!(get_with(&base, "/reports", &[bearer(&k.reports_limited)]).await.status(), StatusCode::OK);
    let res = get_with(&base, "/reports", &[bearer(&k.reports_limited)]).await;
    let after: u64 = header_of(&res, "retry-after").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&after), "{after}");
    assert_eq!(header_of(&res, "ratelimit-policy").as_deref(), Some(r#""reports";q=1;w=3600"#));
    assert_eq!(header_of(&res, "ratelimit"), Some(format!(r#""reports";r=0;t={after}"#)));
    let (status, code, _) = ours(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"));
}

#[tokio::test]
async fn a_challenge_the_hook_sets_on_a_later_403_is_kept_as_it_is() {
    let (verifier, k) = later_keys();
    let layer = ApiKeyLayer::new(verifier).on_rejection(|err: &AuthError| {
        let mut res = our_error(err);
        res.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static(r#"ApiKey realm="own""#));
        res
    });
    let base = serve(later_routes().layer(layer)).await;
    for (key, code) in [(&k.test_env, "wrong_environment"), (&k.partner, "ip_not_allowed")] {
        let res = get_with(&base, "/live", &[bearer(key)]).await;
        let challenges: Vec<_> =
            res.headers().get_all("www-authenticate").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
        assert_eq!(challenges, [r#"ApiKey realm="own""#], "{code}");
        let (status, body_code, _) = ours(res).await;
        assert_eq!((status, body_code.as_str()), (StatusCode::FORBIDDEN, code));
    }
}

#[tokio::test]
async fn an_unavailable_key_service_goes_through_the_hook_with_retry_after() {
    let layer = ApiKeyLayer::new(Down).retry_after(Duration::from_secs(7)).on_rejection(our_error);
    let base = serve(routes().layer(layer)).await;
    let res = get_with(&base, "/reports", &[bearer(&ApiKey::generate("kg").unwrap())]).await;
    assert_eq!(header_of(&res, "retry-after").as_deref(), Some("7"));
    assert_eq!(header_of(&res, "www-authenticate"), None);
    let (status, code, _) = ours(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "key_service_unavailable"));
}

#[tokio::test]
async fn headers_and_status_the_hook_sets_are_never_replaced() {
    let layer = ApiKeyLayer::new(Down).on_rejection(|err: &AuthError| {
        // Hides every failure as a 404 with its own caching and its own challenge.
        http::Response::builder()
            .status(if err.code() == "missing_key" { 401 } else { 404 })
            .header(header::WWW_AUTHENTICATE, "ApiKey realm=\"custom\"")
            .header(header::CACHE_CONTROL, "private, max-age=0")
            .header(header::RETRY_AFTER, "99")
            .body(Bytes::from_static(b"nope"))
            .unwrap()
    });
    let base = serve(routes().layer(layer)).await;
    let res = get_with(&base, "/reports", &[]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header_of(&res, "www-authenticate").as_deref(), Some("ApiKey realm=\"custom\""));
    assert_eq!(header_of(&res, "cache-control").as_deref(), Some("private, max-age=0"));
    assert_eq!(header_of(&res, "content-type"), None, "keygate guesses no content type");
    assert_eq!(res.text().await.unwrap(), "nope");
    // The hook chose 404 for an unavailable key service: its status stands, its
    // Retry-After too.
    let res = get_with(&base, "/reports", &[bearer(&ApiKey::generate("kg").unwrap())]).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(header_of(&res, "retry-after").as_deref(), Some("99"));
}

/// An outer middleware that reads the `AuthError` keygate left in the response.
async fn code_header(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut res = next.run(req).await;
    let code = res.extensions().get::<AuthError>().map(AuthError::code);
    if let Some(code) = code {
        res.headers_mut().insert("x-seen-code", http::HeaderValue::from_static(code));
    }
    res
}

#[tokio::test]
async fn default_and_custom_rejections_carry_the_auth_error_for_outer_layers() {
    let keys = keys();
    for custom in [false, true] {
        let mut layer = ApiKeyLayer::new(verifier(&keys));
        if custom {
            layer = layer.on_rejection(our_error);
        }
        let app = routes().layer(layer).layer(axum::middleware::from_fn(code_header));
        let base = serve(app).await;
        for (path, headers, code) in [
            ("/reports", vec![], Some("missing_key")),
            ("/reports", vec![bearer(&keys.expired)], Some("expired_key")),
            ("/billing", vec![bearer(&keys.reader)], Some("insufficient_scope")),
            ("/reports", vec![bearer(&keys.reader)], None),
        ] {
            let res = get_with(&base, path, &headers).await;
            assert_eq!(header_of(&res, "x-seen-code").as_deref(), code, "custom={custom} {path}");
            if !custom && code.is_some() {
                let body: serde_json::Value = res.json().await.unwrap();
                assert_eq!(body["code"].as_str(), code, "the default problem body names the code too");
            }
        }
    }
}

#[tokio::test]
async fn grpc_requests_keep_their_status_and_get_only_the_hooks_metadata() {
    let keys = keys();
    let layer = ApiKeyLayer::new(verifier(&keys)).on_rejection(our_error);
    let app = Router::new().route("/echo.Echo/Say", axum::routing::post(|| async { "unreached" })).layer(layer);
    let base = serve(app).await;
    let client = reqwest::Client::new();
    for (auth, grpc_status, code) in
        [(None, "16", "missing_key"), (Some(format!("Bearer {}", keys.expired.expose_secret())), "16", "expired_key")]
    {
        let mut req = client.post(format!("{base}/echo.Echo/Say")).header("content-type", "application/grpc");
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header_of(&res, "content-type").as_deref(), Some("application/grpc"));
        assert_eq!(header_of(&res, "grpc-status").as_deref(), Some(grpc_status));
        assert_eq!(header_of(&res, "x-error-code").as_deref(), Some(code), "the hook's header is metadata");
        assert!(res.bytes().await.unwrap().is_empty(), "trailers-only: the hook's body is dropped");
    }

    // A field keygate sets on a gRPC answer is replaced by the hook's, never doubled.
    let layer = ApiKeyLayer::new(Down).on_rejection(|_: &AuthError| {
        http::Response::builder().header(header::RETRY_AFTER, "42").body(Bytes::new()).unwrap()
    });
    let app = Router::new().route("/echo.Echo/Say", axum::routing::post(|| async { "unreached" })).layer(layer);
    let base = serve(app).await;
    let res = client
        .post(format!("{base}/echo.Echo/Say"))
        .header("content-type", "application/grpc")
        .header("authorization", format!("Bearer {}", keys.reader.expose_secret()))
        .send()
        .await
        .unwrap();
    assert_eq!(header_of(&res, "grpc-status").as_deref(), Some("14"));
    let values: Vec<_> = res.headers().get_all("retry-after").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    assert_eq!(values, ["42"]);
}

#[tokio::test]
async fn optional_auth_answers_a_principal_handler_with_the_layers_401() {
    let keys = keys();
    let base = serve(routes().layer(ApiKeyLayer::new(verifier(&keys)).optional().realm("reports"))).await;
    let res = get_with(&base, "/reports", &[]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header_of(&res, "www-authenticate").as_deref(), Some(r#"Bearer realm="reports""#));
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!((body["status"].as_u64(), body["code"].as_str()), (Some(401), Some("missing_key")));
    let res = get_with(&base, "/reports", &[bearer(&keys.reader)]).await;
    assert_eq!((res.status(), res.text().await.unwrap().as_str()), (StatusCode::OK, "key_reader"));
    // `Option<Principal>`: None without a key, Some with one.
    assert_eq!(get_with(&base, "/whoami", &[]).await.text().await.unwrap(), "anonymous");
    assert_eq!(get_with(&base, "/whoami", &[bearer(&keys.reader)]).await.text().await.unwrap(), "key_reader");
    // A bad key is still refused, even where anonymous callers are welcome.
    let res = get_with(&base, "/whoami", &[("authorization", "Bearer kg_garbage".into())]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);

    // With a hook, the extractor's 401 is the hook's.
    let layer = ApiKeyLayer::new(verifier(&keys)).optional().on_rejection(our_error);
    let base = serve(routes().layer(layer)).await;
    let res = get_with(&base, "/reports", &[]).await;
    assert_eq!(header_of(&res, "www-authenticate").as_deref(), Some(r#"Bearer realm="api""#));
    let (status, code, _) = ours(res).await;
    assert_eq!((status, code.as_str()), (StatusCode::UNAUTHORIZED, "missing_key"));
}

#[tokio::test]
async fn the_challenge_names_the_scheme_the_layer_reads() {
    let keys = keys();
    let only_token = ApiKeyLayer::new(verifier(&keys)).sources([KeySource::authorization("Token")]);
    let base = serve(routes().layer(only_token)).await;
    let res = get_with(&base, "/reports", &[]).await;
    assert_eq!(header_of(&res, "www-authenticate").as_deref(), Some(r#"Token realm="api""#));
    let res = get_with(&base, "/billing", &[("authorization", format!("Token {}", keys.reader.expose_secret()))]).await;
    assert_eq!(
        header_of(&res, "www-authenticate").as_deref(),
        Some(r#"Token realm="api", error="insufficient_scope", scope="billing:read""#)
    );
    // Bearer among the sources: Bearer is named, whatever the order.
    let both = ApiKeyLayer::new(verifier(&keys)).sources([KeySource::authorization("ApiKey"), KeySource::bearer()]);
    let base = serve(routes().layer(both)).await;
    assert_eq!(
        header_of(&get_with(&base, "/reports", &[]).await, "www-authenticate").as_deref(),
        Some(r#"Bearer realm="api""#)
    );
    // No Authorization source at all: Bearer, the scheme RFC 6750 clients know.
    let header_only = ApiKeyLayer::new(verifier(&keys)).sources([KeySource::header("x-api-key")]);
    let base = serve(routes().layer(header_only)).await;
    assert_eq!(
        header_of(&get_with(&base, "/reports", &[]).await, "www-authenticate").as_deref(),
        Some(r#"Bearer realm="api""#)
    );
}
