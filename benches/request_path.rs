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
//!   `CachedVerifier` holding 10 000 keys, with usage events into a `UsagePipeline`,
//!   requests rotating over all 10 000 keys (cold memory: the worst case);
//! - `keygate_cached_usage_hot_key`: the same, one key calling;
//! - `keygate_one_layer_cached_usage`: the same cache and usage, with the route's
//!   requirement enforced by the layer itself (`ApiKeyLayer::require`): one layer
//!   per route instead of two;
//! - `keygate_one_layer_cached_usage_hot_key`: the same, one key calling.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request};
use keygate::usage::ExportError;
use keygate::{
    ApiKey, ApiKeyLayer, CachedVerifier, Principal, RequireScopes, ScopeSet, StaticVerifier, UsageBatch, UsageExporter,
    UsagePipeline, Verifier,
};
use tower::ServiceExt;

const KEYS: usize = 10_000;

struct Discard;

impl UsageExporter for Discard {
    async fn export(&self, batch: UsageBatch) -> Result<(), ExportError> {
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

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut group = c.benchmark_group("request_path");
    group.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));

    let run = |router: Router, header: Vec<HeaderValue>| {
        // What `axum::serve` does once per connection.
        let router: Router = router.with_state(());
        let mut i = 0usize;
        move || {
            i = (i + 1) % header.len();
            let req = Request::get("/reports").header("authorization", header[i].clone());
            let router = router.clone();
            async move {
                let res = router.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
                assert_eq!(res.status(), 200);
                black_box(res)
            }
        }
    };

    let (headers, verifier) = keys();
    group.bench_function("no_auth", |b| b.to_async(&rt).iter(run(route(), headers.clone())));

    #[allow(deprecated)] // the deprecated layer is the point of comparison, not a dependency
    let bearer = tower_http::validate_request::ValidateRequestHeaderLayer::bearer("fixed-token-0123456789");
    let token = vec![HeaderValue::from_static("Bearer fixed-token-0123456789")];
    group.bench_function("static_bearer", |b| b.to_async(&rt).iter(run(route().layer(bearer.clone()), token.clone())));

    let verifier = Arc::new(verifier);
    let layer = ApiKeyLayer::from_arc(verifier.clone());
    group.bench_function("keygate_static", |b| {
        b.to_async(&rt).iter(run(keyed_route().layer(layer.clone()), headers.clone()))
    });

    let cached =
        CachedVerifier::builder(verifier.clone()).max_capacity(100_000).positive_ttl(Duration::from_secs(3600)).build();
    // The pipeline's worker runs on its own runtime thread, as it would beside a
    // multi-threaded server: the benchmark's single thread never yields to it.
    let background = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (pipeline, handle) = background.block_on(async { UsagePipeline::builder().build(Discard).unwrap() });
    let cached = Arc::new(cached);
    rt.block_on(async {
        // Warm: every key verified once through the cache.
        for h in &headers {
            let key = ApiKey::new(h.to_str().unwrap().trim_start_matches("Bearer "));
            cached.verify(&key).await.unwrap();
        }
    });
    let layer = ApiKeyLayer::from_arc(cached.clone()).usage(pipeline);
    group.bench_function("keygate_cached_usage", |b| {
        b.to_async(&rt).iter(run(keyed_route().layer(layer.clone()), headers.clone()))
    });
    // The same cache of 10 000 keys, but one hot key calling: the common production
    // shape, where the key's cache lines stay warm.
    group.bench_function("keygate_cached_usage_hot_key", |b| {
        b.to_async(&rt).iter(run(keyed_route().layer(layer.clone()), vec![headers[0].clone()]))
    });
    group.bench_function("keygate_one_layer_cached_usage", |b| {
        b.to_async(&rt).iter(run(one_layer_route(layer.clone()), headers.clone()))
    });
    group.bench_function("keygate_one_layer_cached_usage_hot_key", |b| {
        b.to_async(&rt).iter(run(one_layer_route(layer.clone()), vec![headers[0].clone()]))
    });
    group.finish();
    let stats = cached.stats();
    println!("cache after the run: {stats:?}");
    println!("usage pipeline after the run: {:?}", handle.stats());
    background.block_on(handle.shutdown());
}

criterion_group!(benches, bench);
criterion_main!(benches);
