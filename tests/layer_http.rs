//! The request path over real loopback sockets: extraction, format check, verdicts,
//! scopes and the exact rejections (`AuthError`: status, `WWW-Authenticate`, body).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use keygate::{
    ApiKey, ApiKeyLayer, KeySource, Principal, Reason, RequireScopes, ScopeSet, StaticVerifier, Verdict, Verifier,
    VerifyError,
};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Counts calls to the verifier it wraps: proves what never reaches verification.
struct Counting<V> {
    inner: V,
    calls: AtomicUsize,
}

impl<V: Verifier> Verifier for Counting<V> {
    async fn verify(&self, key: &ApiKey) -> Result<Verdict, VerifyError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.verify(key).await
    }
}

/// A verifier that always fails, like a key service that is down.
struct Down;

impl Verifier for Down {
    async fn verify(&self, _: &ApiKey) -> Result<Verdict, VerifyError> {
        Err(VerifyError::Unreachable("connection refused".into()))
    }
}

struct Keys {
    reader: ApiKey,
    admin: ApiKey,
    auditor: ApiKey,
    revoked: ApiKey,
    disabled: ApiKey,
    expired: ApiKey,
    unknown: ApiKey,
}

struct App {
    base: String,
    verifier: Arc<Counting<StaticVerifier>>,
    keys: Keys,
    client: reqwest::Client,
}

impl App {
    fn calls(&self) -> usize {
        self.verifier.calls.load(Ordering::SeqCst)
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.client.get(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }
}

fn principal(id: &str, scopes: &[&str], roles: &[&str]) -> Principal {
    Principal::builder(id).owner("acme").scopes(ScopeSet::parse(scopes).unwrap()).roles(roles.iter().copied()).build()
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

fn routes() -> Router {
    Router::new()
        .route(
            "/reports",
            get(|p: Principal, headers: HeaderMap, uri: axum::http::Uri| async move {
                // The handler must never see the credential.
                assert!(headers.get("authorization").is_none() && headers.get("x-api-key").is_none());
                assert!(!uri.to_string().contains("api_key"));
                axum::Json(serde_json::json!({"key_id": p.key_id(), "owner": p.owner()}))
            })
            .route_layer(RequireScopes::all(["reports:read"])),
        )
        .route(
            "/admin",
            get(|p: Principal| async move { p.key_id().to_owned() })
                .route_layer(RequireScopes::expr("reports:write OR role(admin)")),
        )
        .route("/console", get(|| async { "console" }).route_layer(RequireScopes::role("admin")))
        .route("/staff", get(|| async { "staff" }).route_layer(RequireScopes::any(["role(ops)", "role(admin)"])))
        .route(
            "/audit",
            get(|| async { "audit" })
                .route_layer(RequireScopes::expr("reports:read AND (billing:read OR role(auditor))")),
        )
        .route(
            "/whoami",
            get(|p: Option<Principal>| async move { p.map_or("anonymous".into(), |p| p.key_id().to_owned()) }),
        )
}

async fn start_with(
    layer: impl FnOnce(ApiKeyLayer<Counting<StaticVerifier>>) -> ApiKeyLayer<Counting<StaticVerifier>>,
) -> App {
    let keys = Keys {
        reader: ApiKey::generate("kg").unwrap(),
        admin: ApiKey::generate("kg").unwrap(),
        auditor: ApiKey::generate("kg").unwrap(),
        revoked: ApiKey::generate("kg").unwrap(),
        disabled: ApiKey::generate("kg").unwrap(),
        expired: ApiKey::generate("kg").unwrap(),
        unknown: ApiKey::generate("kg").unwrap(),
    };
    let stat = StaticVerifier::new()
        .with_key(&keys.reader, principal("key_reader", &["reports:read"], &[]))
        .with_key(&keys.admin, principal("key_admin", &[], &["admin"]))
        .with_key(&keys.auditor, principal("key_auditor", &["reports:read"], &["auditor"]))
        .with_key(&keys.revoked, principal("key_revoked", &["reports:read"], &[]))
        .with_key(&keys.disabled, principal("key_disabled", &["reports:read"], &[]))
        .with_key(
            &keys.expired,
            Principal::builder("key_expired")
                .scopes(ScopeSet::parse(["reports:read"]).unwrap())
                .expires_at(Some(OffsetDateTime::now_utc() - Duration::from_secs(60)))
                .build(),
        );
    stat.revoke("key_revoked");
    stat.set_disabled("key_disabled", true);
    let verifier = Arc::new(Counting { inner: stat, calls: AtomicUsize::new(0) });
    let layer = layer(ApiKeyLayer::from_arc(verifier.clone()).realm("reports"));
    let base = serve(routes().layer(layer)).await;
    App { base, verifier, keys, client: reqwest::Client::new() }
}

async fn start() -> App {
    start_with(|l| l).await
}

fn bearer(key: &ApiKey) -> String {
    format!("Bearer {}", key.expose_secret())
}

fn www(res: &reqwest::Response) -> String {
    res.headers().get(WWW_AUTHENTICATE).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

async fn problem(res: reqwest::Response) -> serde_json::Value {
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    res.json().await.unwrap()
}

#[tokio::test]
async fn no_key_is_401_without_error_code_and_no_verifier_call() {
    let app = start().await;
    let res = app.get("/reports", &[]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(www(&res), r#"Bearer realm="reports""#);
    let body = problem(res).await;
    assert_eq!(body["status"], 401);
    assert_eq!(body["title"], "Missing API key");
    assert_eq!(app.calls(), 0);
}

#[tokio::test]
async fn good_key_reaches_the_handler_with_its_principal() {
    let app = start().await;
    let res = app.get("/reports", &[("authorization", &bearer(&app.keys.reader))]).await;
    assert_eq!(res.status(), StatusCode::OK);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"key_id": "key_reader", "owner": "acme"}));
    // x-api-key works the same way.
    let res = app.get("/reports", &[("x-api-key", app.keys.reader.expose_secret())]).await;
    assert_eq!(res.status(), StatusCode::OK);
    // A role satisfies an expression naming it.
    let res = app.get("/admin", &[("authorization", &bearer(&app.keys.admin))]).await;
    assert_eq!((res.status(), res.text().await.unwrap().as_str()), (StatusCode::OK, "key_admin"));
}

#[tokio::test]
async fn missing_scope_is_403_with_scope_attribute_and_problem_body() {
    let app = start().await;
    let res = app.get("/admin", &[("authorization", &bearer(&app.keys.reader))]).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(www(&res), r#"Bearer realm="reports", error="insufficient_scope", scope="reports:write""#);
    let body = problem(res).await;
    assert_eq!(body["required_scopes"], serde_json::json!(["reports:write"]));
    assert_eq!(body["required_roles"], serde_json::json!(["admin"]));
    assert_eq!(body["detail"], "the API key does not meet the requirement: reports:write OR role(admin)");
    assert_eq!(body["status"], 403);
}

#[tokio::test]
async fn a_role_route_grants_the_role_and_its_denial_names_the_role() {
    let app = start().await;
    let res = app.get("/console", &[("authorization", &bearer(&app.keys.admin))]).await;
    assert_eq!((res.status(), res.text().await.unwrap().as_str()), (StatusCode::OK, "console"));
    // Another role, or scopes only, do not do.
    for key in [&app.keys.auditor, &app.keys.reader] {
        let res = app.get("/console", &[("authorization", &bearer(key))]).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        // No scope would help, so none is listed.
        assert_eq!(www(&res), r#"Bearer realm="reports", error="insufficient_scope""#);
        let body = problem(res).await;
        assert_eq!(body["title"], "Insufficient scope");
        assert_eq!(body["required_roles"], serde_json::json!(["admin"]));
        assert_eq!(body["required_scopes"], serde_json::json!([]));
        assert_eq!(body["detail"], "the API key lacks the required role: admin");
    }
}

#[tokio::test]
async fn any_of_several_roles_is_told_as_alternatives() {
    let app = start().await;
    let res = app.get("/staff", &[("authorization", &bearer(&app.keys.admin))]).await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = app.get("/staff", &[("authorization", &bearer(&app.keys.auditor))]).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(www(&res), r#"Bearer realm="reports", error="insufficient_scope""#);
    let body = problem(res).await;
    assert_eq!(body["required_roles"], serde_json::json!(["ops", "admin"]));
    assert_eq!(body["required_scopes"], serde_json::json!([]));
    assert_eq!(body["detail"], "the API key lacks one of the roles: ops, admin");
}

#[tokio::test]
async fn a_mixed_requirement_lists_only_its_scopes_in_the_scope_attribute() {
    let app = start().await;
    // reports:read and the auditor role: met.
    let res = app.get("/audit", &[("authorization", &bearer(&app.keys.auditor))]).await;
    assert_eq!(res.status(), StatusCode::OK);
    // reports:read alone, or the admin role alone: not met.
    for key in [&app.keys.reader, &app.keys.admin] {
        let res = app.get("/audit", &[("authorization", &bearer(key))]).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            www(&res),
            r#"Bearer realm="reports", error="insufficient_scope", scope="reports:read billing:read""#
        );
        let body = problem(res).await;
        assert_eq!(body["required_scopes"], serde_json::json!(["reports:read", "billing:read"]));
        assert_eq!(body["required_roles"], serde_json::json!(["auditor"]));
        assert_eq!(
            body["detail"],
            "the API key does not meet the requirement: reports:read AND (billing:read OR role(auditor))"
        );
    }
}

#[test]
fn a_bare_word_requirement_fails_when_the_route_is_built() {
    let e = RequireScopes::try_expr("reports:read AND admin").unwrap_err();
    assert_eq!(e.at, 17);
    assert_eq!(
        e.to_string(),
        "at byte 17: `admin` is neither a scope (`resource:action`) nor a role (write `role(admin)`)"
    );
    assert_eq!(RequireScopes::try_any(["reports:read", "admin"]).unwrap_err().at, 0);
    assert_eq!(RequireScopes::try_role("Admin").unwrap_err().at, 0);
    assert!(RequireScopes::try_role("admin").is_ok());
    let panic = std::panic::catch_unwind(|| RequireScopes::all(["admin"])).unwrap_err();
    let msg = panic.downcast_ref::<String>().unwrap();
    assert!(msg.contains("write `role(admin)`"), "{msg}");
    let panic = std::panic::catch_unwind(|| RequireScopes::role("role(admin)")).unwrap_err();
    assert!(panic.downcast_ref::<String>().unwrap().starts_with("RequireScopes::role(\"role(admin)\")"));
}

#[tokio::test]
async fn invalid_keys_get_identical_401s() {
    let app = start().await;
    let mut bad_checksum = app.keys.unknown.expose_secret().to_owned();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'a' { 'b' } else { 'a' });
    let cases = [
        ("unknown", app.keys.unknown.expose_secret().to_owned()),
        ("revoked", app.keys.revoked.expose_secret().to_owned()),
        ("disabled", app.keys.disabled.expose_secret().to_owned()),
        ("bad checksum", bad_checksum),
        ("garbage", "garbage".to_owned()),
    ];
    let mut seen: Option<(StatusCode, String, bytes::Bytes)> = None;
    for (what, key) in cases {
        let res = app.get("/reports", &[("authorization", &format!("Bearer {key}"))]).await;
        let got = (res.status(), www(&res), res.bytes().await.unwrap());
        assert_eq!(got.0, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(got.1, r#"Bearer realm="reports", error="invalid_token""#, "{what}");
        if let Some(first) = &seen {
            assert_eq!(first, &got, "{what} differs from the first invalid key's response");
        }
        seen = Some(got);
    }
    // Unknown, revoked and disabled were asked; the checksum and garbage cases were not.
    assert_eq!(app.calls(), 3);
}

#[tokio::test]
async fn expired_key_says_so() {
    let app = start().await;
    let res = app.get("/reports", &[("authorization", &bearer(&app.keys.expired))]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(www(&res), r#"Bearer realm="reports", error="invalid_token", error_description="key expired""#);
    assert_eq!(problem(res).await["detail"], "the API key has expired");
}

#[tokio::test]
async fn a_key_failing_its_checksum_never_reaches_the_verifier() {
    let app = start().await;
    let good = app.keys.reader.expose_secret();
    // Every one-character change of a real key is turned away locally.
    let alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    for pos in 3..good.len() {
        let original = good.as_bytes()[pos] as char;
        let replacement = alphabet.chars().find(|&c| c != original).unwrap();
        let mut mutated = good.to_owned();
        mutated.replace_range(pos..pos + 1, &replacement.to_string());
        let res = app.get("/reports", &[("x-api-key", &mutated)]).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "mutation at {pos}");
    }
    assert_eq!(app.calls(), 0);
}

#[tokio::test]
async fn scheme_is_case_insensitive_and_the_key_byte_exact() {
    let app = start().await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let v = format!("{scheme} {}", app.keys.reader.expose_secret());
        assert_eq!(app.get("/reports", &[("authorization", &v)]).await.status(), StatusCode::OK, "{scheme}");
    }
    let spaced = format!("Bearer    {}", app.keys.reader.expose_secret());
    assert_eq!(app.get("/reports", &[("authorization", &spaced)]).await.status(), StatusCode::OK);
    // The key itself is case-sensitive: a lower-cased key is a different (invalid) key.
    let lowered = format!("Bearer {}", app.keys.reader.expose_secret().to_lowercase());
    assert_eq!(app.get("/reports", &[("authorization", &lowered)]).await.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn odd_bearer_shapes_are_clean_401s() {
    let app = start().await;
    let key = app.keys.reader.expose_secret();
    for v in ["Bearer".to_owned(), "Bearer ".to_owned(), format!("Bearer\t{key}"), format!("Bearer \t{key}")] {
        let res = app.get("/reports", &[("authorization", &v)]).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{v:?}");
        assert_eq!(www(&res), r#"Bearer realm="reports", error="invalid_token""#, "{v:?}");
    }
    assert_eq!(app.calls(), 0);
}

#[tokio::test]
async fn two_authorization_headers_are_400_same_or_different() {
    let app = start().await;
    for second in [bearer(&app.keys.reader), bearer(&app.keys.admin)] {
        let mut headers = HeaderMap::new();
        headers.append(AUTHORIZATION, HeaderValue::from_str(&bearer(&app.keys.reader)).unwrap());
        headers.append(AUTHORIZATION, HeaderValue::from_str(&second).unwrap());
        let res = app.client.get(format!("{}/reports", app.base)).headers(headers).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST);
        assert_eq!(www(&res), r#"Bearer realm="reports", error="invalid_request""#);
    }
    // A key in Authorization and x-api-key at once.
    let res = app
        .get(
            "/reports",
            &[("authorization", &bearer(&app.keys.reader)), ("x-api-key", app.keys.reader.expose_secret())],
        )
        .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(app.calls(), 0);
}

#[tokio::test]
async fn query_source_is_opt_in_conflicts_and_is_stripped() {
    // Not configured: a query key is not a credential at all.
    let app = start().await;
    let res = app.get(&format!("/reports?api_key={}", app.keys.reader.expose_secret()), &[]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(www(&res), r#"Bearer realm="reports""#);

    let app = start_with(|l| l.sources([KeySource::bearer(), KeySource::query("api_key")])).await;
    let key = app.keys.reader.expose_secret();
    // The handler asserts the parameter is gone from the URI.
    assert_eq!(app.get(&format!("/reports?x=1&api_key={key}"), &[]).await.status(), StatusCode::OK);
    let res = app.get(&format!("/reports?api_key={key}"), &[("authorization", &bearer(&app.keys.reader))]).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = app.get(&format!("/reports?api_key={key}&api_key={key}"), &[]).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let res = app.get(&format!("/reports?api_key[]={key}"), &[]).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    // Zero-width space and NUL smuggled through percent-encoding.
    let res = app.get(&format!("/reports?api_key={key}%E2%80%8B"), &[]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = app.get(&format!("/reports?api_key={key}%00"), &[]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.calls(), 1);
}

#[tokio::test]
async fn cookie_source_works_when_enabled() {
    let app = start_with(|l| l.sources([KeySource::cookie("kg_session")])).await;
    let cookie = format!("theme=dark; kg_session={}", app.keys.reader.expose_secret());
    assert_eq!(app.get("/reports", &[("cookie", &cookie)]).await.status(), StatusCode::OK);
}

/// Sends raw bytes: clients refuse to build these requests.
async fn raw_status(base: &str, head: &[u8]) -> u16 {
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    // No answer at all (the server closed the connection) counts as a rejection too.
    text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(400)
}

#[tokio::test]
async fn control_and_non_ascii_bytes_never_reach_the_verifier() {
    let app = start().await;
    let key = app.keys.reader.expose_secret();
    let evil: Vec<Vec<u8>> = vec![
        format!("{key}\0").into_bytes(),
        format!("{}\r\nx-api-key: {key}", &key[..10]).into_bytes(),
        [key.as_bytes(), "\u{200b}".as_bytes()].concat(),
        [key.as_bytes(), b"\xff"].concat(),
        [&key.as_bytes()[..5], "\u{0430}".as_bytes(), &key.as_bytes()[6..]].concat(), // Cyrillic look-alike
    ];
    for bad in evil {
        let mut head = b"GET /reports HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-api-key: ".to_vec();
        head.extend_from_slice(&bad);
        head.extend_from_slice(b"\r\n\r\n");
        let status = raw_status(&app.base, &head).await;
        assert!(status == 400 || status == 401, "got {status} for {:?}", String::from_utf8_lossy(&bad));
    }
    assert_eq!(app.calls(), 0);
}

#[tokio::test]
async fn huge_credentials_are_rejected_before_verification() {
    let app = start().await;
    for size in [8 * 1024, 64 * 1024] {
        let big = "A".repeat(size);
        for header in ["authorization", "x-api-key"] {
            let value = if header == "authorization" { format!("Bearer kg_{big}") } else { format!("kg_{big}") };
            let res = app.client.get(format!("{}/reports", app.base)).header(header, value).send().await;
            match res {
                // hyper may refuse an oversized head outright (431) or close the connection.
                Ok(res) => assert!(
                    [StatusCode::UNAUTHORIZED, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE].contains(&res.status()),
                    "{header} {size}: {}",
                    res.status()
                ),
                Err(e) => assert!(e.is_request() || e.is_connect() || e.is_body(), "{e}"),
            }
        }
    }
    assert_eq!(app.calls(), 0);
}

#[tokio::test]
async fn optional_layer_lets_anonymous_through_but_not_bad_keys() {
    let app = start_with(|l| l.optional()).await;
    let res = app.get("/whoami", &[]).await;
    assert_eq!((res.status(), res.text().await.unwrap().as_str()), (StatusCode::OK, "anonymous"));
    let res = app.get("/whoami", &[("authorization", &bearer(&app.keys.reader))]).await;
    assert_eq!(res.text().await.unwrap(), "key_reader");
    assert_eq!(app.get("/whoami", &[("authorization", "Bearer nope")]).await.status(), StatusCode::UNAUTHORIZED);
    // A scoped route behind an optional layer still needs a key: 401, not 403.
    let res = app.get("/reports", &[]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // RequireScopes answers with the realm of the ApiKeyLayer in front of it.
    assert_eq!(www(&res), r#"Bearer realm="reports""#);
}

#[tokio::test]
async fn verifier_failure_is_503_with_retry_after_never_401() {
    let key = ApiKey::generate("kg").unwrap();
    let base = serve(routes().layer(ApiKeyLayer::new(Down).retry_after(Duration::from_secs(7)))).await;
    let res = reqwest::Client::new()
        .get(format!("{base}/reports"))
        .header("x-api-key", key.expose_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "7");
    assert!(res.headers().get(WWW_AUTHENTICATE).is_none());
    assert_eq!(problem(res).await["status"], 503);
}

#[tokio::test]
async fn head_and_options_are_authenticated_and_cors_goes_outside() {
    let app = start().await;
    for method in [reqwest::Method::HEAD, reqwest::Method::OPTIONS] {
        let res = app.client.request(method.clone(), format!("{}/reports", app.base)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{method}");
        let res = app
            .client
            .request(method.clone(), format!("{}/reports", app.base))
            .header("authorization", bearer(&app.keys.reader))
            .send()
            .await
            .unwrap();
        assert_ne!(res.status(), StatusCode::UNAUTHORIZED, "{method}");
    }

    // With CorsLayer outside keygate, a preflight is answered before authentication.
    let verifier = StaticVerifier::new();
    let cors = tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_headers([AUTHORIZATION])
        .allow_methods([axum::http::Method::GET]);
    let base = serve(routes().layer(ApiKeyLayer::new(verifier)).layer(cors)).await;
    let res = reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, format!("{base}/reports"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn path_variants_cannot_skip_the_route_requirement() {
    let app = start().await;
    let key = bearer(&app.keys.admin); // admin has no reports:read
    for path in
        ["/reports", "/reports/", "//reports", "/REPORTS", "/x/../reports", "/%72eports", "/reports%2F", "/reports#x"]
    {
        let res = app.get(path, &[("authorization", &key)]).await;
        assert!(
            [StatusCode::FORBIDDEN, StatusCode::NOT_FOUND].contains(&res.status()),
            "{path} answered {}",
            res.status()
        );
    }
}

#[tokio::test]
async fn require_scopes_without_the_layer_is_a_500_not_an_open_door() {
    let base = serve(routes()).await;
    let res = reqwest::Client::new().get(format!("{base}/reports")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn revoked_and_disabled_reasons_reach_the_verdict() {
    // The verdicts differ even though the responses do not.
    let app = start().await;
    let v = &app.verifier.inner;
    assert!(matches!(v.verify(&app.keys.revoked).await, Ok(Verdict::Invalid { reason: Reason::Revoked, .. })));
    assert!(matches!(v.verify(&app.keys.disabled).await, Ok(Verdict::Invalid { reason: Reason::Disabled, .. })));
}

#[tokio::test]
async fn a_key_over_its_rate_limit_gets_429_with_retry_after() {
    let key = ApiKey::generate("kg").unwrap();
    let limited = Principal::builder("key_limited")
        .scopes(ScopeSet::parse(["reports:read"]).unwrap())
        .ratelimit(Some(keygate::RateLimit { limit: 2, period_s: 60 }))
        .build();
    let base = serve(routes().layer(ApiKeyLayer::new(StaticVerifier::new().with_key(&key, limited)))).await;
    let client = reqwest::Client::new();
    let get = || client.get(format!("{base}/reports")).header("x-api-key", key.expose_secret()).send();
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);
    assert_eq!(get().await.unwrap().status(), StatusCode::OK);
    let res = get().await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((29..=31).contains(&wait), "retry-after {wait}");
    assert!(res.headers().get(WWW_AUTHENTICATE).is_none());
    assert_eq!(problem(res).await["status"], 429);
}

fn ratelimit_fields(res: &reqwest::Response) -> (Option<String>, Option<String>) {
    let field = |name: &str| res.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    (field("ratelimit-policy"), field("ratelimit"))
}

#[tokio::test]
async fn rate_limited_keys_are_told_where_they_stand_in_ietf_fields() {
    let limited = ApiKey::generate("kg").unwrap();
    let unlimited = ApiKey::generate("kg").unwrap();
    let scopes = ScopeSet::parse(["reports:read"]).unwrap();
    let verifier = || {
        StaticVerifier::new()
            .with_key(
                &limited,
                Principal::builder("key_limited")
                    .scopes(scopes.clone())
                    .ratelimit(Some(keygate::RateLimit { limit: 3, period_s: 60 }))
                    .build(),
            )
            .with_key(&unlimited, Principal::builder("key_unlimited").scopes(scopes.clone()).build())
    };
    let base = serve(routes().layer(ApiKeyLayer::new(verifier()))).await;
    let client = reqwest::Client::new();
    let get = |key: &ApiKey| client.get(format!("{base}/reports")).header("x-api-key", key.expose_secret()).send();
    let policy = Some(r#""requests";q=3;w=60"#.to_owned());
    // 3 per 60 s comes back one request every 20 s: the first request leaves 2.
    let res = get(&limited).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(ratelimit_fields(&res), (policy.clone(), Some(r#""requests";r=2;t=20"#.to_owned())));
    let res = get(&limited).await.unwrap();
    assert_eq!(ratelimit_fields(&res), (policy.clone(), Some(r#""requests";r=1;t=20"#.to_owned())));
    // The last allowed one.
    let res = get(&limited).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(ratelimit_fields(&res), (policy.clone(), Some(r#""requests";r=0;t=20"#.to_owned())));
    // Refused: nothing left, and `t` is the same wait as `Retry-After`.
    let res = get(&limited).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "20");
    assert_eq!(ratelimit_fields(&res), (policy, Some(r#""requests";r=0;t=20"#.to_owned())));
    // A key without a limit gets no fields.
    let res = get(&unlimited).await.unwrap();
    assert_eq!((res.status(), ratelimit_fields(&res)), (StatusCode::OK, (None, None)));

    // One switch turns them off, on allowed answers and 429s.
    let base = serve(routes().layer(ApiKeyLayer::new(verifier()).rate_limit_headers(false))).await;
    let get = |key: &ApiKey| client.get(format!("{base}/reports")).header("x-api-key", key.expose_secret()).send();
    for expected in [StatusCode::OK, StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS] {
        let res = get(&limited).await.unwrap();
        assert_eq!((res.status(), ratelimit_fields(&res)), (expected, (None, None)));
    }
}

#[tokio::test]
async fn principal_extractor_without_the_layer_is_a_clear_500() {
    let app = Router::new().route("/me", get(|p: Principal| async move { p.key_id().to_owned() }));
    let base = serve(app).await;
    let res = reqwest::Client::new().get(format!("{base}/me")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    // The client learns that the server is set up wrongly, not how: the log says that.
    let body = problem(res).await;
    assert_eq!(body["code"], "misconfigured");
    assert_eq!(body["detail"], "authentication is misconfigured on this server");
}

#[tokio::test]
async fn opaque_format_accepts_foreign_keys_and_prefixed_format_limits_prefixes() {
    let foreign = ApiKey::new("sk-live-3f9a2b7c1d");
    let verifier = StaticVerifier::new().with_key(&foreign, principal("key_foreign", &["reports:read"], &[]));
    let base = serve(routes().layer(ApiKeyLayer::new(verifier).format(keygate::KeyFormat::opaque()))).await;
    let client = reqwest::Client::new();
    let res = client.get(format!("{base}/reports")).bearer_auth(foreign.expose_secret()).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    // A keygate key with another service's prefix is turned away before verification.
    let other = ApiKey::generate("other").unwrap();
    let verifier = Arc::new(Counting { inner: StaticVerifier::new(), calls: AtomicUsize::new(0) });
    let layer = ApiKeyLayer::from_arc(verifier.clone()).format(keygate::KeyFormat::prefixed("kg").unwrap());
    let base = serve(routes().layer(layer)).await;
    let res = client.get(format!("{base}/reports")).bearer_auth(other.expose_secret()).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(verifier.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_cookie_key_beside_a_bearer_key_is_a_conflict_however_the_cookie_is_written() {
    let app = start_with(|l| l.sources([KeySource::bearer(), KeySource::cookie("kg_session")])).await;
    let (reader, admin) = (app.keys.reader.expose_secret(), app.keys.admin.expose_secret());
    // Spaces around the name: cookie parsers (the `cookie` crate, axum-extra) trim them.
    let res = app
        .get("/reports", &[("authorization", &bearer(&app.keys.reader)), ("cookie", &format!("kg_session ={admin}"))])
        .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    // A Cookie header with a non-ASCII byte elsewhere in it still holds the key.
    let mut head = format!(
        "GET /reports HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: Bearer {reader}\r\ncookie: kg_session={admin}; theme=caf"
    )
    .into_bytes();
    head.extend_from_slice(b"\xe9\r\n\r\n");
    assert_eq!(raw_status(&app.base, &head).await, 400);
    assert_eq!(app.calls(), 0);
}

/// An optional layer behind one that already verified (and stripped) the key must not
/// call the request anonymous: the outer layer's principal is what the route checks.
#[tokio::test]
async fn an_optional_layer_behind_a_verifying_one_keeps_its_principal() {
    let key = ApiKey::generate("kg").unwrap();
    let verifier = StaticVerifier::new().with_key(&key, principal("key_reader", &["reports:read"], &[]));
    let router = Router::new()
        .route("/reports", get(|p: Principal| async move { p.key_id().to_owned() }))
        .route_layer(RequireScopes::all(["reports:read"]))
        .layer(ApiKeyLayer::new(StaticVerifier::new()).optional())
        .layer(ApiKeyLayer::new(verifier));
    let base = serve(router).await;
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let bearer = format!("Bearer {}", key.expose_secret());
    let res = client.get(format!("{base}/reports")).header(AUTHORIZATION, bearer).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.text().await.unwrap(), "key_reader");
    // Without a key the outer layer still answers 401.
    let res = client.get(format!("{base}/reports")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn another_authorization_scheme_works_only_when_configured() {
    // Not configured: `Token …` is not a credential at all.
    let app = start().await;
    let token = format!("Token {}", app.keys.reader.expose_secret());
    let res = app.get("/reports", &[("authorization", &token)]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(problem(res).await["title"], "Missing API key");

    let app = start_with(|l| l.sources([KeySource::authorization("Token"), KeySource::header("x-api-key")])).await;
    let key = app.keys.reader.expose_secret();
    // The handler asserts the Authorization header is gone.
    for scheme in ["Token", "token", "TOKEN"] {
        let res = app.get("/reports", &[("authorization", &format!("{scheme} {key}"))]).await;
        assert_eq!(res.status(), StatusCode::OK, "{scheme}");
        assert_eq!(res.json::<serde_json::Value>().await.unwrap()["key_id"], "key_reader");
    }
    // Bearer is not a `Token` source's.
    let res = app.get("/reports", &[("authorization", &bearer(&app.keys.reader))]).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(problem(res).await["title"], "Missing API key");
    // The same key in two places is a conflict.
    let res = app.get("/reports", &[("authorization", &format!("Token {key}")), ("x-api-key", key)]).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(app.calls(), 3);
}
