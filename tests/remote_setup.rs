//! `RemoteAuth`, the one-call production setup, against the real key service on
//! loopback: requests through its layer, a revocation that beats a long cache TTL, usage
//! totals exact after `shutdown()`, and the ways it can be misused (no runtime, a
//! dropped handle, a key service that hangs).

mod server_support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::Request;
use keygate::RequireScopes;
use keygate::client::UsageQuery;
use keygate::{ApiKey, ApiKeyLayer, CachedVerifier, HttpVerifier, Principal, RemoteAuth, RemoteConfigError};
use server_support::{SERVICE, TestServer, new_key};
use tower::ServiceExt;

fn app(auth: ApiKeyLayer<CachedVerifier<HttpVerifier>>) -> Router {
    Router::new()
        .route(
            "/reports",
            get(|p: Principal| async move { p.key_id().to_owned() }).route_layer(RequireScopes::all(["reports:read"])),
        )
        .layer(auth)
}

async fn call(app: &Router, key: Option<&ApiKey>) -> u16 {
    let mut req = Request::get("/reports");
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {}", key.expose_secret()));
    }
    let res = tokio::time::timeout(Duration::from_secs(10), app.clone().oneshot(req.body(Body::empty()).unwrap()))
        .await
        .expect("request hung")
        .unwrap();
    res.status().as_u16()
}

/// (requests, allowed, denied) the key service holds for `key_id`.
async fn usage_of(ks: &TestServer, key_id: &str) -> (u64, u64, u64) {
    let report = ks.admin.usage_report(&UsageQuery::key(key_id)).await.unwrap();
    report.buckets.iter().fold((0, 0, 0), |(r, a, d), b| (r + b.requests, a + b.allowed, d + b.denied))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_call_setup_verifies_revokes_within_a_second_and_delivers_exact_usage_on_shutdown() {
    let ks = TestServer::start().await;
    let reader = ks.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let other = ks.admin.create_key(new_key("acme", &["billing:read"])).await.unwrap();

    let (auth, remote) = RemoteAuth::builder(ks.server.url(), SERVICE)
        // A TTL far longer than the test: only the event stream can make the revocation
        // bite in time.
        .cache(|c| c.positive_ttl(Duration::from_secs(600)))
        // No interval comes round during the test: everything arrives at shutdown.
        .usage(|u| u.flush_interval(Duration::from_secs(600)))
        .build()
        .unwrap();
    let app = app(auth);

    // The listener must be following the stream before the revocation, or it would
    // (correctly) drop the cache on connecting and hide what is tested.
    let connected = server_support::eventually(Duration::from_secs(10), || async {
        remote.listener().is_some_and(|l| l.is_connected())
    })
    .await;
    assert!(connected, "the revocation listener connects");

    assert_eq!(call(&app, Some(&reader.key)).await, 200);
    assert_eq!(call(&app, Some(&reader.key)).await, 200);
    let stats = remote.verifier().stats();
    assert_eq!((stats.misses, stats.hits), (1, 1), "the second request is served from the cache");

    ks.admin.revoke(&reader.key_id).await.unwrap();
    let started = Instant::now();
    let mut after_revoke = (0u64, 0u64); // (allowed, denied) while the revocation travels
    loop {
        match call(&app, Some(&reader.key)).await {
            401 => {
                after_revoke.1 += 1;
                break;
            }
            200 => after_revoke.0 += 1,
            other => panic!("unexpected status {other}"),
        }
        assert!(started.elapsed() < Duration::from_secs(1), "revocation not seen within 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(remote.listener_stats().unwrap().invalidations >= 1);

    // Known outcomes: the revoked key is refused, the other key lacks the scope.
    const N: u64 = 25;
    for _ in 0..N {
        assert_eq!(call(&app, Some(&reader.key)).await, 401);
        assert_eq!(call(&app, Some(&other.key)).await, 403);
    }
    assert_eq!(usage_of(&ks, &reader.key_id).await, (0, 0, 0), "nothing exported before shutdown");

    let stats = remote.shutdown().await.expect("usage is on");
    assert_eq!(stats.lost, 0);
    assert_eq!(stats.dropped, 0);
    assert_eq!(stats.recorded, stats.exported);

    let reader_allowed = 2 + after_revoke.0;
    let reader_denied = N + after_revoke.1;
    assert_eq!(
        usage_of(&ks, &reader.key_id).await,
        (reader_allowed + reader_denied, reader_allowed, reader_denied),
        "every request of the revoked key, allowed and denied, counted once"
    );
    assert_eq!(usage_of(&ks, &other.key_id).await, (N, 0, N), "every scope denial counted once");
    assert_eq!(stats.exported, reader_allowed + reader_denied + N);
}

#[tokio::test(flavor = "current_thread")]
async fn the_parts_can_be_switched_off() {
    let ks = TestServer::start().await;
    let key = ks.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let (auth, remote) =
        RemoteAuth::builder(vec![ks.server.url()], SERVICE).no_revocations().no_usage().build().unwrap();
    assert!(remote.listener().is_none() && remote.aggregator().is_none() && remote.usage_sink().is_none());
    let app = app(auth.realm("reports"));
    assert_eq!(call(&app, Some(&key.key)).await, 200);
    assert_eq!(call(&app, None).await, 401);
    assert_eq!(remote.shutdown().await, None);
    assert_eq!(usage_of(&ks, &key.key_id).await, (0, 0, 0), "no usage was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_can_come_from_a_file_for_every_part() {
    let ks = TestServer::start().await;
    let key = ks.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("service-token");
    std::fs::write(&path, format!("{SERVICE}\n")).unwrap();
    let (auth, remote) = RemoteAuth::builder_with_token_file(vec![ks.server.url()], &path).build().unwrap();
    let app = app(auth);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !remote.listener().unwrap().is_connected() {
        assert!(Instant::now() < deadline, "the listener connects with the file's token");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(call(&app, Some(&key.key)).await, 200, "the verifier uses the file's token");
    let stats = remote.shutdown().await.unwrap();
    assert_eq!((stats.exported, stats.lost), (1, 0), "the exporter uses it too");
    assert_eq!(usage_of(&ks, &key.key_id).await.0, 1);
    // A file without a token is refused when the setup is built, not at the first request.
    std::fs::write(&path, "\n").unwrap();
    let err = RemoteAuth::builder_with_token_file(vec![ks.server.url()], &path).build().unwrap_err();
    assert!(matches!(err, RemoteConfigError::TokenFile { .. }), "{err:?}");
}

#[test]
fn build_outside_a_runtime_is_an_error_not_a_panic() {
    let built = RemoteAuth::builder("http://127.0.0.1:9", "token").build();
    assert_eq!(built.err(), Some(RemoteConfigError::NoRuntime));
}

#[tokio::test(flavor = "current_thread")]
async fn settings_are_checked_before_anything_runs() {
    let zero = RemoteAuth::builder("http://127.0.0.1:9", "token").usage(|u| u.flush_interval(Duration::ZERO)).build();
    assert_eq!(zero.err(), Some(RemoteConfigError::Zero("flush_interval")));
    let zero = RemoteAuth::builder("http://127.0.0.1:9", "token").exporter(|e| e.max_attempts(0)).build();
    assert_eq!(zero.err(), Some(RemoteConfigError::Zero("max_attempts")));
    assert_eq!(
        RemoteAuth::builder("http://127.0.0.1:9", "").build().err(),
        Some(RemoteConfigError::InvalidServiceToken)
    );
    assert_eq!(RemoteAuth::builder(Vec::<String>::new(), "token").build().err(), Some(RemoteConfigError::NoUrl));
    let builder = RemoteAuth::builder("http://127.0.0.1:9", "s3cret-token").cache(|c| c.name("edge"));
    assert!(!format!("{builder:?}").contains("s3cret-token"), "Debug never shows the token");
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

const DROP_WARNING: &str = "RemoteAuth dropped without `shutdown().await`";

#[tokio::test(flavor = "current_thread")]
async fn dropping_the_handle_without_shutdown_warns_and_shutdown_does_not() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // This test's thread only: the current-thread runtime runs everything here.
    let _guard = tracing::subscriber::set_default(subscriber);
    let ks = TestServer::start().await;

    let (_auth, remote) = RemoteAuth::builder(ks.server.url(), SERVICE).build().unwrap();
    remote.shutdown().await;
    assert!(!captured.text().contains(DROP_WARNING), "no warning after shutdown: {}", captured.text());

    let (_auth, remote) = RemoteAuth::builder(ks.server.url(), SERVICE).build().unwrap();
    drop(remote);
    let logs = captured.text();
    assert!(logs.contains("WARN") && logs.contains(DROP_WARNING), "warning on drop: {logs}");
    assert!(!logs.contains(SERVICE), "the service token is never logged");
}

/// A key service that accepts connections and never answers.
async fn hanging_key_service() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_the_key_service_hangs() {
    let (url, hanging) = hanging_key_service().await;
    let (auth, remote) = RemoteAuth::builder(url, SERVICE)
        .verifier(|v| v.timeout(Duration::from_millis(200)))
        .usage(|u| u.flush_interval(Duration::from_secs(600)).shutdown_deadline(Duration::from_millis(500)))
        .build()
        .unwrap();
    let app = app(auth);
    let key = ApiKey::generate("kg").unwrap();
    for _ in 0..3 {
        assert_eq!(call(&app, Some(&key)).await, 503, "a verifier that times out is 503");
    }
    assert_eq!(remote.verifier().stats().remote_errors, 3);

    let started = Instant::now();
    let stats = tokio::time::timeout(Duration::from_secs(10), remote.shutdown())
        .await
        .expect("shutdown returns although the key service never answers")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "bounded by the deadline: {:?}", started.elapsed());
    assert_eq!((stats.recorded, stats.exported, stats.lost), (3, 0, 3), "undelivered usage is counted as lost");
    hanging.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_the_key_service_is_gone() {
    let ks = TestServer::start().await;
    let key = ks.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let (auth, remote) = RemoteAuth::builder(ks.server.url(), SERVICE)
        .usage(|u| u.flush_interval(Duration::from_secs(600)).shutdown_deadline(Duration::from_millis(500)))
        .build()
        .unwrap();
    let app = app(auth);
    assert_eq!(call(&app, Some(&key.key)).await, 200);
    let TestServer { server, .. } = ks;
    server.shutdown().await;

    let started = Instant::now();
    let stats = tokio::time::timeout(Duration::from_secs(10), remote.shutdown()).await.expect("bounded").unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "bounded by the deadline: {:?}", started.elapsed());
    assert_eq!((stats.recorded, stats.exported, stats.lost), (1, 0, 1));
}
