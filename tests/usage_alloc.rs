//! `UsageAggregator::record` allocates nothing once a request's row exists: counted by a
//! global allocator of this test binary, per thread, around each `record` call, for
//! requests built by hand and for requests decided by the real layer.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use keygate::{AggregateBatch, AggregateExporter, ExportError, UsageAggregator};
use keygate::{
    ApiKey, ApiKeyLayer, DecidedRequest, Outcome, Principal, RequireScopes, ScopeSet, StaticVerifier, UsageSink,
};
use tower::ServiceExt;

struct Counting;

thread_local! {
    // Const-initialized and without a destructor: reading it never allocates.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches
// only a thread-local counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Discard;

impl AggregateExporter for Discard {
    async fn export(&self, _: &AggregateBatch) -> Result<(), ExportError> {
        Ok(())
    }
}

/// Passes every request to the aggregator and notes how many allocations that call made.
struct Probe {
    inner: UsageAggregator,
    seen: Mutex<Vec<u64>>,
}

impl UsageSink for Probe {
    fn record(&self, request: &DecidedRequest<'_>) {
        let before = allocations();
        self.inner.record(request);
        let made = allocations() - before;
        self.seen.lock().unwrap().push(made);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn recording_into_existing_rows_allocates_nothing() {
    let (sink, handle) = UsageAggregator::builder().flush_interval(Duration::from_secs(3_600)).build(Discard).unwrap();
    let keys: Vec<Arc<str>> = (0..10).map(|i| Arc::from(format!("key_{i}"))).collect();
    let routes = ["/a", "/b/{id}", "/c"];
    let methods = [http::Method::GET, http::Method::POST];
    let ip: IpAddr = "203.0.113.9".parse().unwrap();
    let started = Instant::now();
    let round = |sink: &UsageAggregator| {
        for (i, key) in keys.iter().enumerate() {
            for route in routes {
                for method in &methods {
                    let outcome = if i % 2 == 0 { Outcome::Allowed } else { Outcome::InsufficientScope };
                    let r = DecidedRequest::new(started, method, route, 200, outcome)
                        .with_key(key, None)
                        .with_latency(Duration::from_micros(50 * i as u64))
                        .with_client_ip(Some(ip));
                    sink.record(&r);
                }
            }
        }
    };
    round(&sink);
    let before = allocations();
    for _ in 0..100 {
        round(&sink);
    }
    assert_eq!(allocations() - before, 0, "6 000 requests into 60 existing rows");
    let stats = handle.shutdown().await;
    assert_eq!(stats.recorded, 6_060);
}

#[tokio::test(flavor = "current_thread")]
async fn requests_through_the_layer_allocate_nothing_in_the_aggregator() {
    let key = ApiKey::generate("kg").unwrap();
    let verifier = StaticVerifier::new()
        .with_key(&key, Principal::builder("key_1").owner("acme").scopes(ScopeSet::parse(["r:read"]).unwrap()).build());
    let (aggregator, handle) =
        UsageAggregator::builder().flush_interval(Duration::from_secs(3_600)).build(Discard).unwrap();
    let probe = Arc::new(Probe { inner: aggregator, seen: Mutex::new(Vec::new()) });
    let app = Router::new()
        .route("/reports/{id}", get(|| async { "ok" }).route_layer(RequireScopes::all(["r:read"])))
        .layer(ApiKeyLayer::new(verifier).usage(probe.clone()).client_ip_from_header("x-forwarded-for"));
    let bearer = format!("Bearer {}", key.expose_secret());
    for i in 0..200 {
        let request = axum::http::Request::get(format!("/reports/{i}"))
            .header("authorization", &bearer)
            .header("x-forwarded-for", "198.51.100.7")
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(request).await.unwrap();
        assert_eq!(res.status(), 200);
        // A request without a key: a row of its own, also reused.
        let res = app.clone().oneshot(axum::http::Request::get("/reports/1").body(Body::empty()).unwrap()).await;
        assert_eq!(res.unwrap().status(), 401);
    }
    let seen = probe.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 400);
    assert!(seen[0] > 0 && seen[1] > 0, "the first request of each row creates it: {:?}", &seen[..2]);
    assert!(seen[2..].iter().all(|&n| n == 0), "{:?}", seen.iter().filter(|&&n| n > 0).count());
    let stats = handle.shutdown().await;
    assert_eq!((stats.recorded, stats.exported), (400, 400));
}
