//! The circuit breaker of `CachedVerifier<HttpVerifier>` against a key service on
//! loopback that hangs: once open, stale keys are answered from the cache at once, one
//! probe at a time reaches the key service, and the circuit closes when it answers again.

mod remote_support;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, StatusCode, header};
use keygate::{ApiKey, ApiKeyLayer, CachedVerifier, CircuitBreaker, HttpVerifier, Principal};
use remote_support::{FaultServer, Mode, TOKEN};
use tower::ServiceExt;

/// Long, so that a request that waited on the hanging key service is unmistakable.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(3);
const TTL: Duration = Duration::from_millis(100);
const LIMIT: Duration = Duration::from_secs(20);

struct Rig {
    server: FaultServer,
    cache: CachedVerifier<HttpVerifier>,
    app: Router,
    keys: Vec<ApiKey>,
}

async fn rig(keys: usize, circuit: CircuitBreaker) -> Rig {
    let server = FaultServer::start().await;
    let keys: Vec<ApiKey> = (0..keys).map(|_| ApiKey::generate("kg").unwrap()).collect();
    for (i, key) in keys.iter().enumerate() {
        server.add_key(key, &format!("key_{i}"), &["reports:read"]);
    }
    let http = HttpVerifier::builder(server.url()).service_token(TOKEN).timeout(VERIFY_TIMEOUT).build().unwrap();
    let cache = CachedVerifier::builder(http)
        .positive_ttl(TTL)
        .stale_if_error(Duration::from_secs(600))
        .circuit_breaker(circuit)
        .build();
    let app = Router::new()
        .route("/reports", get(|p: Principal| async move { p.key_id().to_owned() }))
        .layer(ApiKeyLayer::new(cache.clone()));
    Rig { server, cache, app, keys }
}

impl Rig {
    async fn call(&self, key: &ApiKey) -> (StatusCode, Duration) {
        let req = Request::get("/reports")
            .header(header::AUTHORIZATION, format!("Bearer {}", key.expose_secret()))
            .body(Body::empty())
            .unwrap();
        let start = Instant::now();
        let res = tokio::time::timeout(LIMIT, self.app.clone().oneshot(req)).await.expect("answered").unwrap();
        (res.status(), start.elapsed())
    }

    async fn warm(&self) {
        for key in &self.keys {
            assert_eq!(self.call(key).await.0, StatusCode::OK);
        }
        tokio::time::sleep(TTL * 2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_key_service_hanging_stale_keys_answer_at_once_and_one_probe_runs() {
    let circuit = CircuitBreaker::new().open_after(3).first_probe_after(Duration::from_millis(200));
    let rig = rig(103, circuit).await;
    rig.warm().await;
    rig.server.set(Mode::Hang);

    // Three stale keys wait out the timeout (served stale then): three failures open it.
    let opening: Vec<_> = rig.keys[100..].iter().map(|k| rig.call(k)).collect();
    for (status, took) in futures_util::future::join_all(opening).await {
        assert_eq!(status, StatusCode::OK, "served stale");
        assert!(took >= VERIFY_TIMEOUT, "these did wait: {took:?}");
    }
    assert!(rig.cache.is_circuit_open());
    assert_eq!(rig.cache.stats().circuit_opened, 1);
    let calls_before = rig.server.calls();

    // 100 requests on stale keys, all at once, while the key service hangs, across
    // more than one probe interval.
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for round in 0..2 {
        let all: Vec<_> = rig.keys[..100].iter().map(|k| rig.call(k)).collect();
        for (status, took) in futures_util::future::join_all(all).await {
            assert_eq!(status, StatusCode::OK, "round {round}: stale verdicts served");
            slowest = slowest.max(took);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Far below the verify timeout: nobody waited on the hanging key service.
    assert!(slowest < VERIFY_TIMEOUT / 3, "slowest answer {slowest:?}");
    eprintln!("circuit open: slowest of 200 stale answers {slowest:?} over {:?}", started.elapsed());
    // The probes are the only calls, one at a time: the first still hangs when the
    // second would be due, so no second probe was sent.
    let probes = rig.server.calls() - calls_before;
    assert_eq!(probes, 1, "one probe in flight at most");
    assert!(rig.cache.stats().circuit_rejections >= 200);
    assert!(rig.cache.is_circuit_open());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_fails_unknown_keys_fast_and_closes_when_the_service_answers() {
    let circuit = CircuitBreaker::new()
        .open_after(2)
        .first_probe_after(Duration::from_millis(50))
        .max_probe_interval(Duration::from_millis(200));
    let rig = rig(1, circuit).await;
    rig.server.set(Mode::Status500);
    let strangers: Vec<ApiKey> = (0..2).map(|_| ApiKey::generate("kg").unwrap()).collect();
    for key in &strangers {
        assert_eq!(rig.call(key).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(rig.cache.is_circuit_open());
    let calls = rig.server.calls();
    // Open: a key the cache knows nothing of is 503 without a call (no probe due yet).
    let (status, _) = rig.call(&rig.keys[0]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(rig.server.calls() <= calls + 1, "at most the probe");

    // Failing probes back off: in 600 ms with waits of 50, 100, 200, 200 ms (+25 %), at
    // most 4 probes, although every lookup wanted one.
    let until = Instant::now() + Duration::from_millis(600);
    let calls = rig.server.calls();
    while Instant::now() < until {
        assert_eq!(rig.call(&rig.keys[0]).await.0, StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let probes = rig.server.calls() - calls;
    assert!((1..=4).contains(&probes), "{probes} probes");

    // Back: a probe closes the circuit, and the key is let in.
    rig.server.set(Mode::Ok);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if rig.call(&rig.keys[0]).await.0 == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "the circuit never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!rig.cache.is_circuit_open());
    assert_eq!(rig.cache.stats().circuit_opened, 1);
}

#[tokio::test]
async fn a_disabled_circuit_keeps_calling() {
    let rig = rig(1, CircuitBreaker::disabled()).await;
    rig.server.set(Mode::Status500);
    for _ in 0..10 {
        assert_eq!(rig.call(&ApiKey::generate("kg").unwrap()).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(!rig.cache.is_circuit_open());
    assert_eq!(rig.server.calls(), 10);
}
