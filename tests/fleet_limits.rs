//! Fleet-wide limits and credits on a real Redis (`KEYGATE_TEST_REDIS_URL`), with keys
//! issued by a real key service: several middleware instances (each its own
//! `RedisLimits` engine, as separate processes would have) share one count.
//!
//! - credits exact: strict allows exactly 1 000 of 1 000 credits; leases never overspend
//!   (the documented bound is 0) and, once given back, nothing is lost;
//! - a rate of 100/s with burst 20 over 10 s is about 1 020 across three instances and
//!   alone;
//! - an owner's credits are shared by two keys used from two instances;
//! - a refill restores credits once per interval across instances;
//! - Redis cut mid-run: the fallback answers at once, both switches are counted, and
//!   enforcement resumes;
//! - a route of cost 10 exhausts 100 credits in 10 requests;
//! - the key service's reconciler shows what Redis holds, and an operator's new credits
//!   restart the count.

mod server_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use http::{Request, StatusCode, header};
use keygate::client::{NewKey, OwnerQuota};
use keygate::quota::{Credits, Limit, Refill};
use keygate::{ApiKeyLayer, CachedVerifier, Cost, HttpVerifier, RedisDown, RedisLimits};
use server_support::{SERVICE, TestServer, new_key};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

const REDIS_ENV: &str = "KEYGATE_TEST_REDIS_URL";

fn redis_url() -> Option<String> {
    let url = std::env::var(REDIS_ENV).ok().filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!("skipped: set {REDIS_ENV} (e.g. redis://127.0.0.1:6379) to run the fleet-wide limit tests");
    }
    url
}

/// A prefix no other test (or earlier run) uses.
fn prefix() -> String {
    let n = fastrand::u64(..);
    format!("kgtest:{n:016x}:")
}

fn app(t: &TestServer, limits: RedisLimits) -> Router {
    let verifier = HttpVerifier::builder(t.server.url()).service_token(SERVICE).build().unwrap();
    let cached = CachedVerifier::builder(verifier).positive_ttl(Duration::from_secs(60)).build();
    Router::new()
        .route("/items", get(|| async { "items" }))
        .route("/export", post(|| async { "export" }).route_layer(Cost::new().credits(10)))
        .layer(ApiKeyLayer::new(cached).fleet_limits(limits))
}

async fn call(app: &Router, method: &str, path: &str, key: &str) -> StatusCode {
    let req = Request::builder().method(method).uri(path).header(header::AUTHORIZATION, format!("Bearer {key}"));
    let res = tokio::time::timeout(Duration::from_secs(5), app.clone().oneshot(req.body(Body::empty()).unwrap()))
        .await
        .expect("no request hangs")
        .unwrap();
    res.status()
}

async fn problem_code(app: &Router, key: &str) -> (StatusCode, String) {
    let req = Request::builder().uri("/items").header(header::AUTHORIZATION, format!("Bearer {key}"));
    let res = app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 64 * 1024).await.unwrap();
    let code = serde_json::from_slice::<serde_json::Value>(&bytes).map(|v| v["code"].as_str().unwrap_or("").to_owned());
    (status, code.unwrap_or_default())
}

/// `clients` tasks per app send `GET /items` until `total` requests were sent in all;
/// the number answered 200.
async fn hammer(apps: &[Router], key: &str, clients: usize, total: u64) -> u64 {
    let sent = Arc::new(AtomicU64::new(0));
    let allowed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for app in apps {
        for _ in 0..clients {
            let (app, key, sent, allowed) = (app.clone(), key.to_owned(), sent.clone(), allowed.clone());
            tasks.push(tokio::spawn(async move {
                while sent.fetch_add(1, Ordering::Relaxed) < total {
                    match call(&app, "GET", "/items", &key).await {
                        StatusCode::OK => {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                        StatusCode::TOO_MANY_REQUESTS => {}
                        other => panic!("unexpected status {other}"),
                    }
                    // A request answered from a lease never waits: without a yield, these
                    // loops would starve the runtime's other tasks (Redis's connection
                    // among them), as no real client on a socket could.
                    tokio::task::yield_now().await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    allowed.load(Ordering::Relaxed)
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn credits_left(url: &str, key: &str) -> i64 {
    let mut conn = redis_conn(url).await;
    redis::cmd("HGET").arg(key).arg("rem").query_async::<Option<i64>>(&mut conn).await.unwrap().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_are_exact_across_three_instances_strict_and_leased() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    for strict in [true, false] {
        let prefix = prefix();
        let credits = Credits { remaining: 1000, refill: None };
        let k = t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap();
        let engines: Vec<RedisLimits> = (0..3)
            .map(|_| {
                RedisLimits::builder(&url).prefix(&prefix).strict_credits(strict).expected_instances(3).build().unwrap()
            })
            .collect();
        let apps: Vec<Router> = engines.iter().map(|e| app(&t, e.clone())).collect();
        let allowed = hammer(&apps, k.key.expose_secret(), 50, 1600).await;
        let mode = if strict { "strict" } else { "leases" };
        // The documented bound on overspending is 0 in both modes while Redis answers.
        let stats: Vec<_> = engines.iter().map(|e| e.stats()).collect();
        assert_eq!(allowed, 1000, "{mode}: exactly the credits; {stats:?}");
        for e in &engines {
            e.shutdown().await;
            assert_eq!(e.stats().switched_to_fallback, 0, "{mode}: Redis answered throughout");
        }
        let left = credits_left(&url, &format!("{prefix}credits:k:{}", k.key_id)).await;
        assert_eq!(left, 0, "{mode}: nothing given back that was spent, nothing lost");
        let calls: u64 = stats.iter().map(|s| s.redis_calls).sum();
        if strict {
            // One call per allowed request; refusals are repeated locally for a while.
            assert!((1000..1300).contains(&calls), "strict: {calls} Redis calls for 1 000 allowed, 600 refused");
        } else {
            assert!(calls < 1000, "leases spare round trips: {calls} Redis calls for 1 600 requests");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_is_shared_by_three_instances_as_by_one() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    let limit = Limit::new("requests", 100, 1).burst(20);
    let fleet_key =
        t.admin.create_key(NewKey { limits: vec![limit.clone()], ..new_key("acme", &["a:b"]) }).await.unwrap();
    let alone_key = t.admin.create_key(NewKey { limits: vec![limit], ..new_key("acme", &["a:b"]) }).await.unwrap();
    let prefix = prefix();
    let engines: Vec<RedisLimits> =
        (0..4).map(|_| RedisLimits::builder(&url).prefix(&prefix).expected_instances(3).build().unwrap()).collect();
    let fleet: Vec<Router> = engines[..3].iter().map(|e| app(&t, e.clone())).collect();
    let alone = vec![app(&t, engines[3].clone())];
    // The same offered load, about 3 000 requests a second, to three instances and to one.
    let run = |apps: Vec<Router>, key: String, per_app: usize| async move {
        let allowed = Arc::new(AtomicU64::new(0));
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for app in &apps {
            for _ in 0..per_app {
                let (app, key, allowed) = (app.clone(), key.clone(), allowed.clone());
                tasks.push(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(50));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tick.tick().await;
                        if start.elapsed() >= Duration::from_secs(10) {
                            return;
                        }
                        if call(&app, "GET", "/items", &key).await == StatusCode::OK {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        allowed.load(Ordering::Relaxed)
    };
    let (fleet_allowed, alone_allowed) = tokio::join!(
        run(fleet, fleet_key.key.expose_secret().to_owned(), 50),
        run(alone, alone_key.key.expose_secret().to_owned(), 150),
    );
    // burst 20 + 100 a second for 10 s.
    for (what, allowed) in [("three instances", fleet_allowed), ("one instance", alone_allowed)] {
        assert!((969..=1071).contains(&allowed), "{what}: {allowed} allowed, not within 5 % of 1 020");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owners_credits_are_shared_by_two_keys_on_two_instances() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    let owner = format!("owner-{:x}", fastrand::u32(..));
    let quota = OwnerQuota { credits: Some(Credits { remaining: 100, refill: None }), ..OwnerQuota::default() };
    t.admin.put_owner(&owner, &quota).await.unwrap();
    let a = t.admin.create_key(new_key(&owner, &["a:b"])).await.unwrap();
    let b = t.admin.create_key(new_key(&owner, &["a:b"])).await.unwrap();
    let prefix = prefix();
    let one = app(&t, RedisLimits::builder(&url).prefix(&prefix).build().unwrap());
    let two = app(&t, RedisLimits::builder(&url).prefix(&prefix).build().unwrap());
    let (from_a, from_b) = tokio::join!(
        hammer(std::slice::from_ref(&one), a.key.expose_secret(), 20, 150),
        hammer(std::slice::from_ref(&two), b.key.expose_secret(), 20, 150),
    );
    assert_eq!(from_a + from_b, 100, "the owner's 100 credits, spent by both keys ({from_a} + {from_b})");
    assert!(from_a > 0 && from_b > 0, "both keys spent some");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refill_restores_credits_once_per_interval_across_instances() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    let credits = Credits { remaining: 5, refill: Some(Refill::Every { interval_s: 2, amount: 5 }) };
    let k = t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap();
    let prefix = prefix();
    let apps: Vec<Router> =
        (0..3).map(|_| app(&t, RedisLimits::builder(&url).prefix(&prefix).build().unwrap())).collect();
    let key = k.key.expose_secret().to_owned();
    // Each allowed request with the refill period (Unix seconds / 2) it was sent and
    // answered in; a request that straddles two periods is not counted in either.
    let allowed = Arc::new(std::sync::Mutex::new(Vec::<(u64, u64)>::new()));
    let stop = Instant::now() + Duration::from_millis(6500);
    let period = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 2;
    let mut tasks = Vec::new();
    for app in &apps {
        for _ in 0..10 {
            let (app, key, allowed) = (app.clone(), key.clone(), allowed.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    let before = period();
                    let ok = call(&app, "GET", "/items", &key).await == StatusCode::OK;
                    let after = period();
                    if ok {
                        allowed.lock().unwrap().push((before, after));
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let allowed = allowed.lock().unwrap().clone();
    let periods: std::collections::BTreeSet<u64> = allowed.iter().map(|&(b, _)| b).collect();
    assert!(periods.len() >= 3, "the run spans at least three refill periods: {periods:?}");
    for &p in &periods {
        let certain = allowed.iter().filter(|&&(b, a)| b == p && a == p).count();
        let straddling = allowed.iter().filter(|&&(b, a)| b != a && (b == p || a == p)).count();
        assert!(certain <= 5, "period {p}: {certain} allowed, more than one refill's worth");
        let first = p == *periods.iter().next().unwrap();
        let last = p == *periods.iter().next_back().unwrap();
        if !first && !last {
            assert!(
                certain + straddling >= 5,
                "period {p}: only {certain} (+{straddling}) allowed, the refill was missed"
            );
        }
    }
}

/// A TCP proxy to Redis that can be cut (every connection dropped, new ones refused)
/// and restored, as Redis stopping and coming back looks to its clients.
struct CuttableRedis {
    addr: std::net::SocketAddr,
    up: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
}

impl CuttableRedis {
    async fn start(redis: &str) -> Self {
        let target = redis.trim_start_matches("redis://").split('/').next().unwrap().to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, generation) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
        let (up2, gen2) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown().await;
                    continue;
                }
                let (target, gen2) = (target.clone(), gen2.clone());
                let born = gen2.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&target).await else { return };
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                    let cut = async {
                        while gen2.load(Ordering::SeqCst) == born {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    };
                    tokio::select! { _ = copy => {}, _ = cut => {} }
                });
            }
        });
        Self { addr, up, generation }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_going_away_switches_to_the_fallback_and_back() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    let proxy = CuttableRedis::start(&url).await;
    let credits = Credits { remaining: 1_000_000, refill: None };
    let k = t.admin.create_key(NewKey { credits: Some(credits.clone()), ..new_key("acme", &["a:b"]) }).await.unwrap();
    let closed = t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap();
    let prefix = prefix();
    let shared = RedisLimits::builder(proxy.url()).prefix(&prefix).expected_instances(2).build().unwrap();
    let strict = RedisLimits::builder(proxy.url())
        .prefix(&prefix)
        .strict_credits(true)
        .credits_when_down(RedisDown::FailClosed)
        .build()
        .unwrap();
    let (open_app, closed_app) = (app(&t, shared.clone()), app(&t, strict.clone()));
    let (key, closed_key) = (k.key.expose_secret(), closed.key.expose_secret());
    for _ in 0..20 {
        assert_eq!(call(&open_app, "GET", "/items", key).await, StatusCode::OK);
        assert_eq!(call(&closed_app, "GET", "/items", closed_key).await, StatusCode::OK);
    }
    let counted = format!("{prefix}credits:k:{}", k.key_id);
    assert!(credits_left(&url, &counted).await < 1_000_000, "counted in Redis");

    proxy.cut();
    // Every request is answered (none hangs: `call` gives each 5 s), by the fallback or
    // by a lease still held, and the fail-closed engine refuses with 503.
    let started = Instant::now();
    for _ in 0..200 {
        assert_eq!(call(&open_app, "GET", "/items", key).await, StatusCode::OK);
    }
    assert!(started.elapsed() < Duration::from_secs(5), "the fallback answers without waiting on Redis each time");
    // Each refused at once; the third failed call in a row switches the engine.
    for _ in 0..3 {
        let (status, code) = problem_code(&closed_app, closed_key).await;
        assert_eq!((status, code.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "limits_unavailable"));
    }
    assert_eq!(shared.stats().switched_to_fallback, 1, "one switch, however many requests");
    assert!(shared.stats().on_fallback);
    assert_eq!(strict.stats().switched_to_fallback, 1);

    proxy.restore();
    let back = server_support::eventually(Duration::from_secs(10), || async {
        shared.stats().switched_back == 1 && strict.stats().switched_back == 1
    })
    .await;
    assert!(back, "both engines switch back with no restart: {:?} {:?}", shared.stats(), strict.stats());
    assert!(!shared.stats().on_fallback);
    assert_eq!(call(&closed_app, "GET", "/items", closed_key).await, StatusCode::OK, "enforced in Redis again");
    let before = credits_left(&url, &format!("{prefix}credits:k:{}", closed.key_id)).await;
    assert_eq!(call(&closed_app, "GET", "/items", closed_key).await, StatusCode::OK);
    let after = credits_left(&url, &format!("{prefix}credits:k:{}", closed.key_id)).await;
    assert_eq!(before - after, 1, "a strict charge is one unit in Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_of_cost_ten_exhausts_a_hundred_credits_in_ten_requests() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    for strict in [true, false] {
        let credits = Credits { remaining: 100, refill: None };
        let k = t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap();
        let limits = RedisLimits::builder(&url).prefix(prefix()).strict_credits(strict).build().unwrap();
        let app = app(&t, limits);
        for i in 0..10 {
            assert_eq!(call(&app, "POST", "/export", k.key.expose_secret()).await, StatusCode::OK, "request {i}");
        }
        assert_eq!(call(&app, "POST", "/export", k.key.expose_secret()).await, StatusCode::TOO_MANY_REQUESTS);
        let (status, code) = problem_code(&app, k.key.expose_secret()).await;
        assert_eq!((status, code.as_str()), (StatusCode::TOO_MANY_REQUESTS, "usage_exceeded"), "strict {strict}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_instances_spend_is_reconciled_into_the_store_and_a_top_up_restarts_the_count() {
    let Some(url) = redis_url() else { return };
    let prefix = prefix();
    let (u, p) = (url.clone(), prefix.clone());
    let t = TestServer::start_in(tempfile::tempdir().unwrap(), move |s| {
        s.reconcile_credits(u, Duration::from_millis(200)).redis_prefix(p)
    })
    .await;
    let credits = Credits { remaining: 100, refill: None };
    let k = t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap();
    let key = k.key.expose_secret();
    let limits = RedisLimits::builder(&url).prefix(&prefix).strict_credits(true).build().unwrap();
    let first = app(&t, limits);
    for _ in 0..30 {
        assert_eq!(call(&first, "GET", "/items", key).await, StatusCode::OK);
    }
    let shown = server_support::eventually(Duration::from_secs(5), || async {
        t.admin.get_key(&k.key_id).await.unwrap().credits.map(|c| c.remaining) == Some(70)
    })
    .await;
    assert!(shown, "the admin API shows the 70 credits left in Redis: {:?}", t.admin.get_key(&k.key_id).await.unwrap());

    // An operator sets the credits to 5: an instance that reads the new answer (here a
    // new one, with a cold cache) counts from 5, not from what Redis had.
    let patch =
        keygate::client::KeyPatch { credits: Some(Some(Credits { remaining: 5, refill: None })), ..Default::default() };
    t.admin.update_key(&k.key_id, &patch).await.unwrap();
    let fresh = app(&t, RedisLimits::builder(&url).prefix(&prefix).strict_credits(true).build().unwrap());
    let allowed = hammer(std::slice::from_ref(&fresh), key, 4, 20).await;
    assert_eq!(allowed, 5, "the new credits, counted afresh");
}
