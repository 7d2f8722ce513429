//! What keygate costs per request, next to no auth and a fixed bearer token.
//!
//! ```sh
//! cargo bench --bench request_path
//! ```
//!
//! All variants call the same axum route in-process (`oneshot`, no sockets) with the
//! same request, `Authorization` header included, so the differences are the
//! middleware's own cost. Each router is finished with `with_state(())`, as
//! `axum::serve` does: otherwise axum turns the handler into a service, layers
//! included, on every request, a cost no server pays.
//! - `no_auth`: the bare route;
//! - `static_bearer`: tower-http's `ValidateRequestHeaderLayer::bearer` (one fixed token,
//!   the floor of any auth layer);
//! - `keygate_static`: `ApiKeyLayer` + `RequireScopes` over a `StaticVerifier`;
//! - `keygate_cached_usage`: `ApiKeyLayer` + `RequireScopes` over a warm
//!   `CachedVerifier` holding 10 000 keys, with usage folded by a `UsageAggregator`,
//!   requests rotating over all 10 000 keys (cold memory: the worst case);
//! - `keygate_cached_usage_hot_key`: the same, one key calling;
//! - `keygate_one_layer_cached_usage`: the same cache and usage, with the route's
//!   requirement enforced by the layer itself (`ApiKeyLayer::require`): one layer
//!   per route instead of two;
//! - `keygate_one_layer_cached_usage_hot_key`: the same, one key calling;
//! - `keygate_static_limited`: `keygate_static` with every key carrying a `requests`
//!   limit (GCRA per key, per process), one key calling;
//! - `keygate_static_credits`: the same key with credits too, on a route whose
//!   `RequireScopes` states a cost of 1 from `requests` and 2 credits;
//! - `keygate_static_fleet_limited`: `keygate_static_limited` with
//!   `ApiKeyLayer::fleet_limits` on a `RedisLimits` (defaults, a key prefix of its own
//!   per run): the limit counted in Redis and spent here from leases;
//! - `keygate_static_fleet_credits`: `keygate_static_credits` the same way.
//!
//! The two fleet variants run only when `KEYGATE_BENCH_REDIS_URL` names a Redis (e.g.
//! `redis://127.0.0.1:6379`); otherwise a line says they were skipped. Their engine
//! runs on the benchmark's current-thread runtime, so its lease top-ups (one Redis
//! script per lease of up to 1 000 units) are paid inside the timed requests; a request
//! that finds its lease empty waits for Redis there too. Their difference from the
//! matching per-process variant is what a lease-backed check costs, amortized. The
//! paired rounds print those differences, and the engine's counters follow the run.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request};
use keygate::{AggregateBatch, AggregateExporter, ExportError};
use keygate::{
    ApiKey, ApiKeyLayer, CachedVerifier, Principal, RedisLimits, RequireScopes, ScopeSet, StaticVerifier,
    UsageAggregator, Verifier,
};
use tower::ServiceExt;

const KEYS: usize = 10_000;
const REDIS_ENV: &str = "KEYGATE_BENCH_REDIS_URL";

struct Discard;

impl AggregateExporter for Discard {
    async fn export(&self, batch: &AggregateBatch) -> Result<(), ExportError> {
        black_box(batch);
        Ok(())
    }
}

fn route() -> Router {
    Router::new().route("/reports", get(|| async { "ok" }))
}

fn keyed_route() -> Router {
    Router::new().route("/reports", get(|| async { "ok" }).route_layer(RequireScopes::all(["reports:read"])))
}

fn one_layer_route<V: Verifier>(layer: ApiKeyLayer<V>) -> Router {
    Router::new().route("/reports", get(|| async { "ok" }).layer(layer.require(RequireScopes::all(["reports:read"]))))
}

fn costed_route() -> Router {
    let policy = RequireScopes::all(["reports:read"]).cost(keygate::Cost::new().credits(2));
    Router::new().route("/reports", get(|| async { "ok" }).route_layer(policy))
}

/// One key with a limit no benchmark run reaches (and credits, when `credits`).
fn limited_key(credits: bool) -> (Vec<HeaderValue>, StaticVerifier) {
    let verifier = StaticVerifier::new();
    let key = ApiKey::generate("kg").unwrap();
    let huge = 1_000_000_000_000_000;
    let p = Principal::builder("key_limited")
        .owner("acme")
        .scopes(ScopeSet::parse(["reports:read"]).unwrap())
        .limits([keygate::quota::Limit::new("requests", huge, 1)])
        .credits(credits.then_some(keygate::quota::Credits { remaining: huge, refill: None }))
        .build();
    verifier.insert(&key, p);
    (vec![HeaderValue::from_str(&format!("Bearer {}", key.expose_secret())).unwrap()], verifier)
}

fn keys() -> (Vec<HeaderValue>, StaticVerifier) {
    let verifier = StaticVerifier::new();
    let scopes = ScopeSet::parse(["reports:read", "reports:write"]).unwrap();
    let headers = (0..KEYS)
        .map(|i| {
            let key = ApiKey::generate("kg").unwrap();
            verifier.insert(&key, Principal::builder(format!("key_{i}")).owner("acme").scopes(scopes.clone()).build());
            HeaderValue::from_str(&format!("Bearer {}", key.expose_secret())).unwrap()
        })
        .collect();
    (headers, verifier)
}

/// One variant: a name, its router (finished as `axum::serve` finishes it) and the
/// `Authorization` values its requests rotate over.
struct Variant {
    name: &'static str,
    router: Router,
    headers: Vec<HeaderValue>,
}

impl Variant {
    fn new(name: &'static str, router: Router, headers: Vec<HeaderValue>) -> Self {
        // What `axum::serve` does once per connection.
        Self { name, router: router.with_state(()), headers }
    }

    /// One request, the same shape for every variant.
    async fn call(&self, i: usize) {
        let header = self.headers[i % self.headers.len()].clone();
        let req = Request::get("/reports").header("authorization", header).body(Body::empty()).unwrap();
        let res = self.router.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        black_box(res);
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (headers, verifier) = keys();
    let verifier = Arc::new(verifier);

    // No miss budget: warming 10 000 keys in a loop is setup, and would spend it.
    let cached = CachedVerifier::builder(verifier.clone())
        .max_capacity(100_000)
        .positive_ttl(Duration::from_secs(3600))
        .miss_budget(keygate::MissBudget::unlimited())
        .build();
    // The aggregator's worker runs on its own runtime thread, as it would beside a
    // multi-threaded server: the benchmark's single thread never yields to it.
    let background = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (aggregator, handle) = background.block_on(async { UsageAggregator::builder().build(Discard).unwrap() });
    let cached = Arc::new(cached);
    rt.block_on(async {
        // Warm: every key verified once through the cache.
        for h in &headers {
            let key = ApiKey::new(h.to_str().unwrap().trim_start_matches("Bearer "));
            cached.verify(&key).await.unwrap();
        }
    });

    #[allow(deprecated)] // the deprecated layer is the point of comparison, not a dependency
    let bearer = tower_http::validate_request::ValidateRequestHeaderLayer::bearer("fixed-token-0123456789");
    let token = vec![HeaderValue::from_static("Bearer fixed-token-0123456789")];
    let static_layer = ApiKeyLayer::from_arc(verifier.clone());
    let layer = ApiKeyLayer::from_arc(cached.clone()).usage(aggregator);
    let hot = vec![headers[0].clone()];
    let (limited, limited_verifier) = limited_key(false);
    let (credited, credited_verifier) = limited_key(true);
    let (limited_verifier, credited_verifier) = (Arc::new(limited_verifier), Arc::new(credited_verifier));
    let mut variants = vec![
        Variant::new("no_auth", route(), headers.clone()),
        Variant::new("static_bearer", route().layer(bearer), token),
        Variant::new("keygate_static", keyed_route().layer(static_layer), headers.clone()),
        Variant::new("keygate_cached_usage", keyed_route().layer(layer.clone()), headers.clone()),
        // The same cache of 10 000 keys, but one hot key calling: the common production
        // shape, where the key's cache lines stay warm.
        Variant::new("keygate_cached_usage_hot_key", keyed_route().layer(layer.clone()), hot.clone()),
        Variant::new("keygate_one_layer_cached_usage", one_layer_route(layer.clone()), headers.clone()),
        Variant::new("keygate_one_layer_cached_usage_hot_key", one_layer_route(layer), hot.clone()),
        Variant::new("keygate_static_hot_key", keyed_route().layer(ApiKeyLayer::from_arc(verifier.clone())), hot),
        Variant::new(
            "keygate_static_limited",
            keyed_route().layer(ApiKeyLayer::from_arc(limited_verifier.clone())),
            limited.clone(),
        ),
        Variant::new(
            "keygate_static_credits",
            costed_route().layer(ApiKeyLayer::from_arc(credited_verifier.clone())),
            credited.clone(),
        ),
    ];
    let fleet = fleet_limits(&rt);
    if let Some((limits, _, _)) = &fleet {
        // The same keys and routes as the per-process pair: only the engine differs.
        let fleet_layer = |v: &Arc<StaticVerifier>| ApiKeyLayer::from_arc(v.clone()).fleet_limits(limits.clone());
        variants.push(Variant::new(
            "keygate_static_fleet_limited",
            keyed_route().layer(fleet_layer(&limited_verifier)),
            limited.clone(),
        ));
        variants.push(Variant::new(
            "keygate_static_fleet_credits",
            costed_route().layer(fleet_layer(&credited_verifier)),
            credited.clone(),
        ));
    }

    let mut group = c.benchmark_group("request_path");
    group.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    for v in &variants {
        group.bench_function(v.name, |b| {
            let mut i = 0usize;
            b.to_async(&rt).iter(|| {
                i += 1;
                v.call(i)
            })
        });
    }
    group.finish();
    paired_rounds(
        &rt,
        &variants,
        &[
            ("keygate_static_fleet_limited", "keygate_static_limited"),
            ("keygate_static_fleet_limited", "keygate_static_hot_key"),
            ("keygate_static_fleet_credits", "keygate_static_credits"),
            ("keygate_static_fleet_credits", "keygate_static_hot_key"),
        ],
    );

    let stats = cached.stats();
    println!("cache after the run: {stats:?}");
    println!("usage aggregator after the run: {:?}", handle.stats());
    background.block_on(handle.shutdown());
    if let Some((limits, url, prefix)) = fleet {
        drop(variants);
        println!("fleet limits after the run: {:?}", limits.stats());
        rt.block_on(async {
            limits.shutdown().await;
            forget_prefix(&url, &prefix).await;
        });
    }
}

/// The fleet variants' engine, its Redis URL and its key prefix, when
/// `KEYGATE_BENCH_REDIS_URL` is set.
fn fleet_limits(rt: &tokio::runtime::Runtime) -> Option<(RedisLimits, String, String)> {
    let Some(url) = std::env::var(REDIS_ENV).ok().filter(|u| !u.is_empty()) else {
        println!("keygate_static_fleet_limited, keygate_static_fleet_credits skipped: set {REDIS_ENV} to run them");
        return None;
    };
    // A prefix of its own: no earlier run's counts, nor a test's, are met.
    let prefix = format!("kgbench:{:016x}:", fastrand::u64(..));
    // The engine's sweeper runs on the benchmark's runtime, as a server's would on its own.
    let _in_runtime = rt.enter();
    let limits = RedisLimits::builder(url.clone()).prefix(prefix.clone()).build().expect("fleet limits");
    Some((limits, url, prefix))
}

/// Deletes the Redis keys under `prefix` (credits counts live 40 days otherwise).
async fn forget_prefix(url: &str, prefix: &str) {
    let client = redis::Client::open(url).expect("redis url");
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        eprintln!("could not reach Redis to delete the keys under {prefix}");
        return;
    };
    let mut cursor = 0u64;
    // Bounded: the run made a handful of keys; 1 000 pages of 100 is far beyond them.
    for _ in 0..1000 {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(100)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.expect("DEL");
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
}

/// Rounds of every variant in turn, each round's overhead taken against that round's
/// `no_auth`: on a shared machine whose speed drifts between criterion's sequential
/// runs, paired differences are the figures to trust.
/// `pairs` name differences to print as well, `(variant, against)`, each paired round
/// by round (a pair with a variant not run is left out).
fn paired_rounds(rt: &tokio::runtime::Runtime, variants: &[Variant], pairs: &[(&str, &str)]) {
    const ROUNDS: usize = 15;
    const REQUESTS: usize = 20_000;
    let mut ns = vec![Vec::with_capacity(ROUNDS); variants.len()];
    for _ in 0..ROUNDS {
        for (v, out) in variants.iter().zip(&mut ns) {
            let start = std::time::Instant::now();
            rt.block_on(async {
                for i in 0..REQUESTS {
                    v.call(i).await;
                }
            });
            out.push(start.elapsed().as_nanos() as f64 / REQUESTS as f64);
        }
    }
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    println!("\npaired rounds ({ROUNDS} rounds x {REQUESTS} requests per variant, medians):");
    println!("| variant | ns / request | over no auth |");
    println!("| --- | ---: | ---: |");
    for (v, times) in variants.iter().zip(&ns) {
        let over: Vec<f64> = times.iter().zip(&ns[0]).map(|(t, base)| t - base).collect();
        println!("| {} | {:.0} | {:+.0} |", v.name, median(times.clone()), median(over));
    }
    let index = |name: &str| variants.iter().position(|v| v.name == name);
    for (a, b) in pairs {
        let (Some(a_i), Some(b_i)) = (index(a), index(b)) else { continue };
        let diff: Vec<f64> = ns[a_i].iter().zip(&ns[b_i]).map(|(x, y)| x - y).collect();
        let (lo, hi) = diff.iter().fold((f64::MAX, f64::MIN), |(lo, hi), d| (lo.min(*d), hi.max(*d)));
        println!("{a} over {b}: {:+.0} ns / request (median; rounds {lo:+.0} to {hi:+.0})", median(diff.clone()));
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
