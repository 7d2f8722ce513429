//! `IntrospectionVerifier` against a real authorization server nobody here wrote:
//! authlib's RFC 7662 introspection endpoint (tests/introspection/authz_server.py, a
//! Flask app on authlib), started on loopback by each test and killed when it ends.
//! Tokens are issued by that server's own token endpoint (client credentials grant).
//! Skipped, with a notice, when `python3 -c "import authlib, flask"` fails (`.ci/run`
//! installs both).
//!
//! The fault tests at the end (redirect, unexpected status, nonsense, oversized or slow
//! answers) run against small axum servers of ours: no real server answers like that
//! on purpose.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use http::{Request, StatusCode, header};
use keygate::{
    ApiKey, ApiKeyLayer, CachedVerifier, IntrospectionVerifier, IntrospectionVerifierBuilder, KeyFormat, Principal,
    RequireScopes, Verifier,
};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tower::ServiceExt;

/// Hang guard for the server's start and for waits on the clock.
const LIMIT: Duration = Duration::from_secs(20);
const API: &str = "https://api.test";
/// rs-basic's secret at the server: `:`, ` `, `%` and `+` must all survive
/// client_secret_basic's form encoding.
const BASIC_SECRET: &str = "s3cr:t %basic+";

fn authlib_installed() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import authlib, flask"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: python3 with authlib and flask is not installed (pip install authlib flask; .ci/run does)");
    }
    ok
}

/// The authlib server, killed on drop.
struct AuthServer {
    _child: tokio::process::Child,
    base: String,
    http: reqwest::Client,
}

impl AuthServer {
    async fn start() -> Option<Self> {
        if !authlib_installed() {
            return None;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/introspection/authz_server.py");
        let mut child = tokio::process::Command::new("python3")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        tokio::time::timeout(LIMIT, tokio::io::BufReader::new(stdout).read_line(&mut line))
            .await
            .expect("the server prints its port in time")
            .unwrap();
        let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("a port, not {line:?}"));
        Some(Self { _child: child, base: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() })
    }

    fn introspection_url(&self) -> String {
        format!("{}/oauth/introspect", self.base)
    }

    /// A token from the server's token endpoint, for one of its clients.
    async fn token(&self, client: &str, scope: &str) -> String {
        let res = self
            .http
            .post(format!("{}/oauth/token", self.base))
            .basic_auth(client, Some("app-secret"))
            .form(&[("grant_type", "client_credentials"), ("scope", scope)])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn revoke(&self, client: &str, token: &str) {
        let res = self
            .http
            .post(format!("{}/oauth/revoke", self.base))
            .basic_auth(client, Some("app-secret"))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }

    /// Introspection requests the server has received.
    async fn introspections(&self) -> u64 {
        let body: Value =
            self.http.get(format!("{}/test/introspections", self.base)).send().await.unwrap().json().await.unwrap();
        body["count"].as_u64().unwrap()
    }

    /// A verifier as a service would set it up: client_secret_basic, the access-token
    /// hint, the API's audience, two scopes mapped.
    fn verifier(&self) -> IntrospectionVerifierBuilder {
        IntrospectionVerifier::builder(self.introspection_url())
            .client_secret_basic("rs-basic", BASIC_SECRET)
            .token_type_hint("access_token")
            .audience(API)
            .map_scope("read", "reports:read")
            .map_scope("write", "reports:write")
    }
}

/// `/reports` needs `reports:read` and answers what the principal holds; `/purge`
/// needs `reports:delete`. Behind the layer as the docs say for opaque tokens.
fn app(verifier: CachedVerifier<IntrospectionVerifier>) -> Router {
    let reports = get(|p: Principal| async move {
        let mut scopes: Vec<String> = p.scopes().iter().map(|s| s.as_str().to_owned()).collect();
        scopes.sort();
        axum::Json(json!({
            "key_id": p.key_id(),
            "owner": p.owner(),
            "scopes": scopes,
            "expires_at": p.expires_at().map(|t| t.unix_timestamp()),
            "meta": p.meta(),
        }))
    });
    let reports = Router::new().route("/reports", reports).route_layer(RequireScopes::all(["reports:read"]));
    let purge =
        Router::new().route("/purge", post(|| async { "purged" })).route_layer(RequireScopes::all(["reports:delete"]));
    reports.merge(purge).layer(ApiKeyLayer::new(verifier).format(KeyFormat::opaque()).max_key_len(4096))
}

async fn call(app: &Router, method: &str, path: &str, token: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_active_token_passes_with_its_scopes_mapped() {
    let Some(server) = AuthServer::start().await else { return };
    let app = app(CachedVerifier::new(server.verifier().build().unwrap()));
    let token = server.token("app", "read write reports:export profile").await;

    let (status, body) = call(&app, "GET", "/reports", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["key_id"], "app", "client_id is the key id");
    assert_eq!(body["owner"], "acme", "sub is the owner");
    // read and write mapped, reports:export kept as it is, profile (no keygate scope) dropped.
    assert_eq!(body["scopes"], json!(["reports:export", "reports:read", "reports:write"]));
    assert_eq!(body["meta"]["tenant"], "t-1", "other members go to meta");
    assert_eq!(body["meta"]["iss"], "https://authz.test");
    assert!(body["meta"].get("scope").is_none());
    assert!(body["expires_at"].as_i64().unwrap() > time::OffsetDateTime::now_utc().unix_timestamp());

    // A scope the token does not map to: 403, and the verdict came from the cache.
    let (status, _) = call(&app, "POST", "/purge", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(call(&app, "GET", "/reports", &token).await.0, StatusCode::OK);
    assert_eq!(server.introspections().await, 1, "one introspection, then the cache");
}

#[tokio::test]
async fn client_secret_basic_post_and_bearer_all_authenticate() {
    let Some(server) = AuthServer::start().await else { return };
    let token = server.token("app", "read").await;
    let url = server.introspection_url();
    // Each resource-server client is allowed one method only at the server.
    let verifiers = [
        ("basic", IntrospectionVerifier::builder(&url).client_secret_basic("rs-basic", BASIC_SECRET)),
        ("post", IntrospectionVerifier::builder(&url).client_secret_post("rs-post", "rs-post-secret")),
        ("bearer", IntrospectionVerifier::builder(&url).bearer_token("rs-bearer-token")),
    ];
    for (method, builder) in verifiers {
        let app = app(CachedVerifier::new(builder.map_scope("read", "reports:read").build().unwrap()));
        let (status, body) = call(&app, "GET", "/reports", &token).await;
        assert_eq!(status, StatusCode::OK, "{method}: {body}");
        assert_eq!(body["scopes"], json!(["reports:read"]), "{method}");
    }

    // Wrong credentials, or the right ones by a method the client may not use: the
    // server answers 401, and that is keygate's problem, not the caller's: 503.
    let wrong = [
        IntrospectionVerifier::builder(&url).client_secret_basic("rs-basic", "wrong"),
        IntrospectionVerifier::builder(&url).client_secret_post("rs-basic", BASIC_SECRET),
        IntrospectionVerifier::builder(&url).bearer_token("wrong"),
    ];
    for builder in wrong {
        let app = app(CachedVerifier::new(builder.map_scope("read", "reports:read").build().unwrap()));
        assert_eq!(call(&app, "GET", "/reports", &token).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
}

#[tokio::test]
async fn an_inactive_token_is_refused_and_negatively_cached() {
    let Some(server) = AuthServer::start().await else { return };
    let app = app(CachedVerifier::new(server.verifier().build().unwrap()));

    // Unknown to the server: `active: false`.
    let unknown = "nO7aRealT0kenButWellFormed1234567890abcdef";
    for _ in 0..5 {
        assert_eq!(call(&app, "GET", "/reports", unknown).await.0, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(server.introspections().await, 1, "asked once, then refused from the negative cache");

    // Issued, then revoked at the server (RFC 7009) before first use.
    let token = server.token("app", "read").await;
    server.revoke("app", &token).await;
    for _ in 0..3 {
        assert_eq!(call(&app, "GET", "/reports", &token).await.0, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(server.introspections().await, 2);
}

#[tokio::test]
async fn a_verdict_is_not_cached_past_the_tokens_exp() {
    let Some(server) = AuthServer::start().await else { return };
    // A positive TTL far longer than the token lives (and the default 5 min stale window):
    // only `exp` can end the entry.
    let cached =
        CachedVerifier::builder(server.verifier().build().unwrap()).positive_ttl(Duration::from_secs(3600)).build();
    let app = app(cached);
    // app-short's tokens live 3 s.
    let token = server.token("app-short", "read").await;
    let (status, body) = call(&app, "GET", "/reports", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let exp = body["expires_at"].as_i64().expect("exp became expires_at");
    assert_eq!(call(&app, "GET", "/reports", &token).await.0, StatusCode::OK);
    assert_eq!(server.introspections().await, 1, "cached while it lives");

    // Wait for the clock to pass `exp` (bounded).
    let deadline = tokio::time::Instant::now() + LIMIT;
    while time::OffsetDateTime::now_utc().unix_timestamp() <= exp {
        assert!(tokio::time::Instant::now() < deadline, "the clock did not pass exp");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(call(&app, "GET", "/reports", &token).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(server.introspections().await, 2, "past exp the cache held nothing: the server was asked again");
}

#[tokio::test]
async fn a_token_for_another_audience_or_issuer_is_refused() {
    let Some(server) = AuthServer::start().await else { return };
    let app_api = app(CachedVerifier::new(server.verifier().build().unwrap()));
    let ours = server.token("app", "read").await;
    let theirs = server.token("app-other", "read").await;
    assert_eq!(call(&app_api, "GET", "/reports", &ours).await.0, StatusCode::OK);
    assert_eq!(call(&app_api, "GET", "/reports", &theirs).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app_api, "GET", "/reports", &theirs).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(server.introspections().await, 2, "the refusal is cached like any other");

    // The other audience's service takes it (`aud` is an array there).
    let other = server.verifier().audience("https://other.test").build().unwrap();
    assert_eq!(call(&app(CachedVerifier::new(other)), "GET", "/reports", &theirs).await.0, StatusCode::OK);

    // An issuer check: the server's own passes, another one refuses.
    let issuer = server.verifier().issuer("https://authz.test").build().unwrap();
    assert_eq!(call(&app(CachedVerifier::new(issuer)), "GET", "/reports", &ours).await.0, StatusCode::OK);
    let issuer = server.verifier().issuer("https://evil.test").build().unwrap();
    assert_eq!(call(&app(CachedVerifier::new(issuer)), "GET", "/reports", &ours).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn an_authorization_server_that_is_down_is_503_never_401() {
    let Some(server) = AuthServer::start().await else { return };
    let app = app(CachedVerifier::new(server.verifier().build().unwrap()));
    let token = server.token("app", "read").await;
    let url = server.introspection_url();
    drop(server);
    // The port is closed once the process is gone (bounded wait).
    let deadline = tokio::time::Instant::now() + LIMIT;
    while reqwest::Client::new().get(&url).send().await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "the server did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let req = Request::get("/reports").header(header::AUTHORIZATION, format!("Bearer {token}")).body(Body::empty());
    let res = app.clone().oneshot(req.unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key(header::RETRY_AFTER));
}

#[tokio::test]
async fn without_the_opaque_format_a_token_is_refused_before_any_introspection() {
    let Some(server) = AuthServer::start().await else { return };
    let token = server.token("app", "read").await;
    let verifier = CachedVerifier::new(server.verifier().build().unwrap());
    let app = Router::new().route("/reports", get(|| async { "ok" })).layer(ApiKeyLayer::new(verifier));
    let req = Request::get("/reports").header(header::AUTHORIZATION, format!("Bearer {token}")).body(Body::empty());
    assert_eq!(app.oneshot(req.unwrap()).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(server.introspections().await, 0, "keygate's key format check refused it locally");
}

// Faults no real server produces on purpose: small axum servers of ours.

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn status_through_layer(url: String, timeout: Duration) -> StatusCode {
    let verifier = IntrospectionVerifier::builder(url).bearer_token("t").timeout(timeout).build().unwrap();
    let app = app(CachedVerifier::new(verifier));
    call(&app, "GET", "/reports", "some-opaque-token").await.0
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_is_503() {
    let hits = Arc::new(AtomicUsize::new(0));
    let granted = Arc::clone(&hits);
    let target = serve(Router::new().fallback(move || {
        granted.fetch_add(1, Ordering::SeqCst);
        async { axum::Json(json!({"active": true, "client_id": "evil", "scope": "reports:read"})) }
    }))
    .await;
    let redirector = serve(Router::new().fallback(move || async move {
        (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, format!("http://{target}/introspect"))])
    }))
    .await;
    let status = status_through_layer(format!("http://{redirector}/introspect"), Duration::from_secs(5)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect's target received nothing");
}

#[tokio::test]
async fn unexpected_status_nonsense_and_oversized_answers_are_503() {
    let big = format!(r#"{{"active":true,"client_id":"a","pad":"{}"}}"#, "x".repeat(100 * 1024));
    let cases: Vec<(&str, Router)> = vec![
        ("500", Router::new().fallback(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "{\"active\":false}") })),
        ("400", Router::new().fallback(|| async { (StatusCode::BAD_REQUEST, "{\"error\":\"invalid_request\"}") })),
        ("html", Router::new().fallback(|| async { "<html>login</html>" })),
        ("no active", Router::new().fallback(|| async { axum::Json(json!({"client_id": "a"})) })),
        ("active string", Router::new().fallback(|| async { axum::Json(json!({"active": "false"})) })),
        ("oversized", Router::new().fallback(move || async move { big })),
    ];
    for (name, server) in cases {
        let addr = serve(server).await;
        let status = status_through_layer(format!("http://{addr}/introspect"), Duration::from_secs(5)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{name}");
    }
}

#[tokio::test]
async fn a_slow_answer_times_out_as_503() {
    let addr = serve(Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        axum::Json(json!({"active": true, "client_id": "late"}))
    }))
    .await;
    let status = status_through_layer(format!("http://{addr}/introspect"), Duration::from_millis(300)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

/// What the authorization server receives: the form, and nothing of the token
/// anywhere but its `token` field.
#[tokio::test]
async fn the_request_is_an_rfc_7662_form() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(Option<String>, String)>::new()));
    let record = Arc::clone(&seen);
    let addr = serve(Router::new().route(
        "/introspect",
        post(move |headers: http::HeaderMap, body: String| {
            let auth = headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap().to_owned());
            record.lock().unwrap().push((auth, body));
            async { axum::Json(json!({"active": false})) }
        }),
    ))
    .await;
    let url = format!("http://{addr}/introspect");
    let token = "tok en/+&=%";
    // A space is not visible ASCII, so the layer would refuse such a key itself: the
    // verifier is called directly.
    let post = IntrospectionVerifier::builder(&url)
        .client_secret_post("rs post", "p&ss=1")
        .token_type_hint("access_token")
        .build()
        .unwrap();
    post.verify(&ApiKey::new(token)).await.unwrap();
    let bearer = IntrospectionVerifier::builder(&url).bearer_token("rs-bearer").build().unwrap();
    bearer.verify(&ApiKey::new(token)).await.unwrap();
    let seen = seen.lock().unwrap();
    let form = |body: &str| -> Vec<(String, String)> {
        body.split('&')
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap();
                let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8().unwrap().into_owned();
                (decode(k), decode(v))
            })
            .collect()
    };
    assert_eq!(seen[0].0, None);
    assert_eq!(
        form(&seen[0].1),
        [
            ("token".into(), token.into()),
            ("token_type_hint".into(), "access_token".into()),
            ("client_id".into(), "rs post".into()),
            ("client_secret".into(), "p&ss=1".into()),
        ]
    );
    assert_eq!(seen[1].0.as_deref(), Some("Bearer rs-bearer"));
    assert_eq!(form(&seen[1].1), [("token".to_string(), token.to_string())]);
}

#[derive(Clone, Default)]
struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line down to TRACE (keygate's, reqwest's, hyper's), every error and the
/// verifier's `Debug`, through a grant, a refusal, a wrong audience and a failure:
/// none holds a token or the client secret.
#[tokio::test(flavor = "current_thread")]
async fn no_token_or_client_secret_in_logs_errors_or_debug() {
    let Some(server) = AuthServer::start().await else { return };
    let good = server.token("app", "read").await;
    let foreign = server.token("app-other", "read").await;
    let revoked = server.token("app", "read").await;
    server.revoke("app", &revoked).await;

    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let verifier = server.verifier().build().unwrap();
    let debug = format!("{verifier:?}");
    let app = app(CachedVerifier::new(verifier));
    assert_eq!(call(&app, "GET", "/reports", &good).await.0, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/reports", &revoked).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app, "GET", "/reports", &foreign).await.0, StatusCode::UNAUTHORIZED);
    // Refused client credentials, then the server gone: errors.
    let wrong =
        IntrospectionVerifier::builder(server.introspection_url()).client_secret_basic("rs-basic", "wr0ng-secret");
    let wrong = wrong.build().unwrap();
    let refused = wrong.verify(&ApiKey::new(good.clone())).await.unwrap_err();
    let verifier = server.verifier().build().unwrap();
    drop(server);
    let mut down = None;
    for _ in 0..100 {
        match verifier.verify(&ApiKey::new(good.clone())).await {
            Err(e) => {
                down = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let down = down.expect("the server stopped");

    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("introspect"), "the log was captured");
    let everything = format!("{logs}\n{debug}\n{refused} {refused:?}\n{down} {down:?}");
    for secret in [&good, &foreign, &revoked, BASIC_SECRET, "wr0ng-secret"] {
        assert!(!everything.contains(secret), "a secret in the output");
    }
    // Nor the secret's Basic encoding.
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode("rs-basic:s3cr%3At%20%25basic%2B");
    assert!(!everything.contains(&basic));
}
