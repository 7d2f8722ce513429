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
/// and restored, as Redis stopping and coming back looks to its clients; or hung
/// (connections accepted, bytes held unread both ways, as a stopped Redis process
/// leaves them) and released; or made slow to answer (each answer held `delay`).
struct CuttableRedis {
    addr: std::net::SocketAddr,
    up: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    hung: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
}

/// Copies `from` to `to`, holding each chunk while the proxy is hung (and, answers
/// only, for the delay).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hung: Arc<AtomicBool>,
    delay_ms: Option<Arc<AtomicU64>>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(d) = delay_ms.as_ref().map(|d| d.load(Ordering::SeqCst)).filter(|&d| d > 0) {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        while hung.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl CuttableRedis {
    async fn start(redis: &str) -> Self {
        let target = redis.trim_start_matches("redis://").split('/').next().unwrap().to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, generation) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
        let (hung, delay_ms) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (up2, gen2, hung2, delay2) = (up.clone(), generation.clone(), hung.clone(), delay_ms.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if !up2.load(Ordering::SeqCst) {
                    let _ = client.shutdown().await;
                    continue;
                }
                let (target, gen2, hung2, delay2) = (target.clone(), gen2.clone(), hung2.clone(), delay2.clone());
                let born = gen2.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else { return };
                    let ((cr, cw), (sr, sw)) = (client.into_split(), server.into_split());
                    let up = pump(cr, sw, hung2.clone(), None);
                    let down = pump(sr, cw, hung2, Some(delay2));
                    let cut = async {
                        while gen2.load(Ordering::SeqCst) == born {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    };
                    tokio::select! { _ = up => {}, _ = down => {}, _ = cut => {} }
                });
            }
        });
        Self { addr, up, generation, hung, delay_ms }
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

    fn hang(&self, hung: bool) {
        self.hung.store(hung, Ordering::SeqCst);
    }

    fn delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
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
    // More than a lease holds (at most `max_lease`, 1 000, ahead): the lease runs low
    // and its top-ups fail, whatever rate the warm-up showed.
    for _ in 0..1200 {
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

/// `GET path` with a 5 s bound: its status and `RateLimit` field.
async fn call_with_fields(app: &Router, path: &str, key: &str) -> (StatusCode, Option<String>) {
    let req = Request::builder().uri(path).header(header::AUTHORIZATION, format!("Bearer {key}"));
    let res = tokio::time::timeout(Duration::from_secs(5), app.clone().oneshot(req.body(Body::empty()).unwrap()))
        .await
        .expect("no request hangs")
        .unwrap();
    let field = res.headers().get("ratelimit").and_then(|v| v.to_str().ok()).map(str::to_owned);
    (res.status(), field)
}

/// The `r=` of a `RateLimit` field.
fn remaining_of(field: &str) -> u64 {
    let r = field.split(';').find_map(|p| p.strip_prefix("r=")).expect("r= in the RateLimit field");
    r.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_redis_times_out_switches_to_the_fallback_and_back() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    let proxy = CuttableRedis::start(&url).await;
    let credits = Credits { remaining: 1_000_000, refill: None };
    let k = t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap();
    let limits = RedisLimits::builder(proxy.url()).prefix(prefix()).strict_credits(true).build().unwrap();
    let app = app(&t, limits.clone());
    let key = k.key.expose_secret();
    for _ in 0..5 {
        assert_eq!(call(&app, "GET", "/items", key).await, StatusCode::OK);
    }
    proxy.hang(true);
    // Connections stay open and nothing answers: each call waits its 250 ms timeout at
    // most (`call` allows 5 s), the third failure switches, then no call waits at all.
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (app, key) = (app.clone(), key.to_owned());
        clients.push(tokio::spawn(async move { call(&app, "GET", "/items", &key).await }));
    }
    for c in clients {
        assert_eq!(c.await.unwrap(), StatusCode::OK, "answered by the fallback");
    }
    assert!(limits.stats().on_fallback, "{:?}", limits.stats());
    assert_eq!(limits.stats().switched_to_fallback, 1);
    for _ in 0..50 {
        assert_eq!(call(&app, "GET", "/items", key).await, StatusCode::OK);
    }
    proxy.hang(false);
    let back = server_support::eventually(Duration::from_secs(10), || async { !limits.stats().on_fallback }).await;
    assert!(back, "switched back once Redis answers again: {:?}", limits.stats());
    let before = limits.stats().redis_calls;
    assert_eq!(call(&app, "GET", "/items", key).await, StatusCode::OK);
    assert!(limits.stats().redis_calls > before, "charged in Redis again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_with_redis_hanging_gives_up_after_the_switch() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    let proxy = CuttableRedis::start(&url).await;
    let limits = RedisLimits::builder(proxy.url()).prefix(prefix()).build().unwrap();
    let app = app(&t, limits.clone());
    let mut keys = Vec::new();
    for _ in 0..40 {
        let credits = Credits { remaining: 1000, refill: None };
        let k = t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap();
        keys.push(k.key.expose_secret().to_owned());
    }
    // Warm every key's verification, then spend quickly: the second fetch of each key
    // takes a lease ahead of need.
    for key in &keys {
        assert_eq!(call(&app, "GET", "/items", key).await, StatusCode::OK);
    }
    for key in &keys {
        for _ in 0..3 {
            assert_eq!(call(&app, "GET", "/items", key).await, StatusCode::OK);
        }
    }
    let stats = limits.stats();
    assert!(stats.units_taken > 40 * 4 + 20 * 10, "leases held ahead of need: {stats:?}");
    proxy.hang(true);
    // Giving back 40 leases one 250 ms timeout each would take 10 s; after the third
    // failure Redis is known to be away and the rest cannot be given back anyway.
    let done = tokio::time::timeout(Duration::from_secs(5), limits.shutdown()).await;
    proxy.hang(false);
    assert!(done.is_ok(), "shutdown is bounded when Redis hangs: {:?}", limits.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_charge_gives_back_what_redis_took() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    let proxy = CuttableRedis::start(&url).await;
    for strict in [true, false] {
        let credits = Credits { remaining: 100, refill: None };
        let k = t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap();
        let prefix = prefix();
        let limits = RedisLimits::builder(proxy.url())
            .prefix(&prefix)
            .strict_credits(strict)
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        let app = app(&t, limits.clone());
        let key = k.key.expose_secret();
        // The key service's answer is cached; Redis's connection is up.
        assert_eq!(call(&app, "GET", "/items", key).await, StatusCode::OK);
        // Redis applies each charge at once and its answer comes 500 ms later; the
        // client goes away after 100 ms, while the charge waits on that answer.
        proxy.delay(Duration::from_millis(500));
        // One ran already; a request that found a unit in its lease (given back by a
        // cancelled one) runs at once, and is counted.
        let mut ran = 1;
        for _ in 0..5 {
            let req = Request::builder().uri("/items").header(header::AUTHORIZATION, format!("Bearer {key}"));
            let fut = app.clone().oneshot(req.body(Body::empty()).unwrap());
            if let Ok(res) = tokio::time::timeout(Duration::from_millis(100), fut).await {
                assert!(!strict, "strict: every charge waits on Redis");
                assert_eq!(res.unwrap().status(), StatusCode::OK);
                ran += 1;
            }
        }
        proxy.delay(Duration::ZERO);
        // Let the late answers arrive.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        limits.shutdown().await;
        let counted = format!("{prefix}credits:k:{}", k.key_id);
        let exact = server_support::eventually(Duration::from_secs(5), || async {
            credits_left(&url, &counted).await == 100 - ran
        })
        .await;
        let left = credits_left(&url, &counted).await;
        assert!(exact, "strict {strict}: {ran} requests ran, the rest went away: {left} of 100 left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_a_busy_keys_limit_is_not_a_redis_failure() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    let k = t
        .admin
        .create_key(NewKey { limits: vec![Limit::new("requests", 1, 1).burst(10)], ..new_key("acme", &["a:b"]) })
        .await
        .unwrap();
    let limits = RedisLimits::builder(&url).prefix(prefix()).strict_limit("requests").build().unwrap();
    let key = k.key.expose_secret();
    let before = app(&t, limits.clone());
    for _ in 0..10 {
        assert_eq!(call(&before, "GET", "/items", key).await, StatusCode::OK);
    }
    assert_eq!(call(&before, "GET", "/items", key).await, StatusCode::TOO_MANY_REQUESTS);
    // The limit's next unit is 1 s away and its burst 10 s; at 1 000 a second with the
    // same burst, the count Redis holds is 10 s ahead of a 10 ms burst.
    let patch = keygate::client::KeyPatch {
        limits: Some(vec![Limit::new("requests", 1000, 1).burst(10)]),
        ..Default::default()
    };
    t.admin.update_key(&k.key_id, &patch).await.unwrap();
    let after = app(&t, limits.clone());
    for _ in 0..3 {
        assert_eq!(call(&after, "GET", "/items", key).await, StatusCode::TOO_MANY_REQUESTS, "{:?}", limits.stats());
    }
    let stats = limits.stats();
    assert_eq!((stats.redis_errors, stats.on_fallback), (0, false), "Redis answered every call: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_above_the_burst_is_refused_and_does_not_lock_out_small_requests() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    for strict in [true, false] {
        // One unit every 6 s, burst 10: 20 units at once are never there.
        let limit = Limit::new("requests", 10, 60).burst(10);
        let k = t.admin.create_key(NewKey { limits: vec![limit], ..new_key("acme", &["a:b"]) }).await.unwrap();
        let mut builder = RedisLimits::builder(&url).prefix(prefix());
        if strict {
            builder = builder.strict_limit("requests");
        }
        let limits = builder.build().unwrap();
        let verifier = HttpVerifier::builder(t.server.url()).service_token(SERVICE).build().unwrap();
        let cached = CachedVerifier::builder(verifier).positive_ttl(Duration::from_secs(60)).build();
        let app = Router::new()
            .route("/items", get(|| async { "items" }))
            .route("/big", get(|| async { "big" }).route_layer(Cost::new().limit("requests", 20)))
            .layer(ApiKeyLayer::new(cached).fleet_limits(limits.clone()));
        let key = k.key.expose_secret();
        let (status, field) = call_with_fields(&app, "/items", key).await;
        assert_eq!(status, StatusCode::OK);
        let r = remaining_of(&field.expect("a RateLimit field"));
        assert!(r <= 10, "strict {strict}: remaining {r} is above the burst");
        for _ in 0..2 {
            assert_eq!(call(&app, "GET", "/big", key).await, StatusCode::TOO_MANY_REQUESTS, "strict {strict}");
        }
        for i in 0..5 {
            let (status, field) = call_with_fields(&app, "/items", key).await;
            assert_eq!(status, StatusCode::OK, "strict {strict}: request {i} of one unit, with 8 left");
            let r = remaining_of(&field.expect("a RateLimit field"));
            assert!(r <= 10, "strict {strict}: remaining {r} is above the burst");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credits_spent_while_redis_was_down_from_the_start_are_debited() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    let proxy = CuttableRedis::start(&url).await;
    proxy.cut();
    let credits = Credits { remaining: 100, refill: None };
    let k = t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap();
    let prefix = prefix();
    let limits = RedisLimits::builder(proxy.url()).prefix(&prefix).build().unwrap();
    let app = app(&t, limits.clone());
    let key = k.key.expose_secret();
    // A new instance (or a key new to it) while Redis is away: its lease never had a
    // grant, so it knows the count only from the key's stated credits.
    for _ in 0..10 {
        assert_eq!(call(&app, "GET", "/items", key).await, StatusCode::OK);
    }
    assert!(limits.stats().on_fallback);
    proxy.restore();
    let counted = format!("{prefix}credits:k:{}", k.key_id);
    let debited =
        server_support::eventually(Duration::from_secs(10), || async { credits_left(&url, &counted).await == 90 })
            .await;
    let left = credits_left(&url, &counted).await;
    assert!(debited, "the 10 spent while down are debited once Redis is back: {left} left; {:?}", limits.stats());
    assert_eq!(call(&app, "GET", "/items", key).await, StatusCode::OK);
    limits.shutdown().await;
    assert_eq!(credits_left(&url, &counted).await, 89);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_refusal_gives_the_charge_back_whatever_the_routes_cost() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    for strict in [true, false] {
        let credits = Credits { remaining: 100, refill: None };
        let k = t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap();
        let prefix = prefix();
        let limits = RedisLimits::builder(&url).prefix(&prefix).strict_credits(strict).build().unwrap();
        let verifier = HttpVerifier::builder(t.server.url()).service_token(SERVICE).build().unwrap();
        let cached = CachedVerifier::builder(verifier).positive_ttl(Duration::from_secs(60)).build();
        let denied = |cost: Option<Cost>| {
            let policy = keygate::RequireScopes::all(["x:y"]);
            get(|| async { "no" }).route_layer(match cost {
                Some(c) => policy.cost(c),
                None => policy,
            })
        };
        let app = Router::new()
            .route("/items", get(|| async { "items" }))
            .route("/denied", denied(None))
            .route("/denied-big", denied(Some(Cost::new().credits(10))))
            .route("/denied-free", denied(Some(Cost::free())))
            .route(
                "/free",
                get(|| async { "free" }).route_layer(keygate::RequireScopes::all(["a:b"]).cost(Cost::free())),
            )
            .route(
                "/big",
                get(|| async { "big" }).route_layer(keygate::RequireScopes::all(["a:b"]).cost(Cost::new().credits(10))),
            )
            .layer(ApiKeyLayer::new(cached).fleet_limits(limits.clone()));
        let key = k.key.expose_secret();
        for path in ["/denied", "/denied-big", "/denied-free"] {
            for _ in 0..3 {
                assert_eq!(call(&app, "GET", path, key).await, StatusCode::FORBIDDEN, "strict {strict}: {path}");
            }
        }
        for _ in 0..3 {
            assert_eq!(call(&app, "GET", "/free", key).await, StatusCode::OK);
        }
        assert_eq!(call(&app, "GET", "/items", key).await, StatusCode::OK);
        assert_eq!(call(&app, "GET", "/big", key).await, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(300)).await;
        limits.shutdown().await;
        let counted = format!("{prefix}credits:k:{}", k.key_id);
        let exact =
            server_support::eventually(Duration::from_secs(5), || async { credits_left(&url, &counted).await == 89 })
                .await;
        let left = credits_left(&url, &counted).await;
        assert!(exact, "strict {strict}: 1 + 10 spent, the refused and the free ones cost nothing: {left} left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_keys_stays_within_max_leases_and_is_charged_exactly_beyond() {
    let Some(url) = redis_url() else { return };
    let t = TestServer::start().await;
    let prefix = prefix();
    let limits = RedisLimits::builder(&url).prefix(&prefix).max_leases(8).build().unwrap();
    let app = app(&t, limits.clone());
    let mut keys = Vec::new();
    for _ in 0..20 {
        let credits = Credits { remaining: 5, refill: None };
        keys.push(t.admin.create_key(NewKey { credits: Some(credits), ..new_key("acme", &["a:b"]) }).await.unwrap());
    }
    for k in &keys {
        let mut allowed = 0;
        for _ in 0..8 {
            if call(&app, "GET", "/items", k.key.expose_secret()).await == StatusCode::OK {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 5, "each key its 5 credits, leased or strict");
        assert!(limits.stats().leases <= 8, "{:?}", limits.stats());
    }
    limits.shutdown().await;
    for k in &keys {
        assert_eq!(credits_left(&url, &format!("{prefix}credits:k:{}", k.key_id)).await, 0);
    }
}
