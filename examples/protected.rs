//! A protected axum service run against your own key service, set up as in production
//! with one `RemoteAuth`: remote verification behind a cache, the key service's event stream for instant
//! revocation, and usage aggregated in memory and exported to the key service every
//! 10 s (`--usage-interval-ms`), and once more on the way out.
//!
//! ```sh
//! cargo run --example protected --features server -- \
//!     --key-service http://127.0.0.1:7700 --service-token "$KEYGATE_SERVICE_TOKEN" --listen 127.0.0.1:8080
//! ```
//!
//! `--key-service` may be given once per key-service replica. Routes:
//!
//! | route | needs |
//! | --- | --- |
//! | `GET /health` | nothing (answers as soon as the service listens) |
//! | `GET /reports` | scope `reports:read` |
//! | `POST /reports` | scope `reports:write` |
//! | `GET /admin` | role `admin` |
//!
//! A connection has 10 s (`--header-read-timeout-ms`) to send a request's headers and a
//! request body may pause 30 s (`--request-body-timeout-ms`): `axum::serve` bounds
//! neither, so the example serves through hyper's HTTP/1 builder (see
//! `examples/support/serve.rs`).
//!
//! With `--redis redis://127.0.0.1:6379`, a key's limits and credits are counted
//! fleet-wide (every instance on the same Redis shares them; `--strict-credits` for one
//! atomic Redis call per request, `--expected-instances N` for the share each counts
//! while Redis is down) instead of per process; build it with `--features server,redis`.
//!
//! Each protected route answers JSON naming the caller's key id and owner. The address
//! it listens on is printed (`listening on 127.0.0.1:8080`), so `--listen 127.0.0.1:0`
//! works too. Ctrl-C or SIGTERM stops it gracefully: it stops taking connections, lets
//! requests in flight finish, then delivers the usage not yet exported (within 5 s)
//! before it exits. Try it:
//!
//! ```sh
//! curl -s localhost:8080/health
//! curl -s -H "Authorization: Bearer $KEY" localhost:8080/reports
//! ```

#[path = "support/serve.rs"]
mod serve;

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use keygate::{Principal, RedisLimits, RemoteAuth, RequireScopes};
use serde_json::{Value, json};

/// A protected axum service in front of a keygate key service.
#[derive(Parser)]
struct Args {
    /// Base URL of the key service; repeat for several replicas.
    #[arg(long = "key-service", required = true)]
    key_service: Vec<String>,
    /// The token this service presents to the key service.
    #[arg(long, env = "KEYGATE_SERVICE_TOKEN", hide_env_values = true)]
    service_token: String,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// How long a valid verdict is cached, in seconds.
    #[arg(long, default_value_t = 30)]
    cache_ttl: u64,
    /// How often aggregated usage is sent to the key service, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    usage_interval_ms: u64,
    /// How long a connection has to send a request's headers, in milliseconds (also the
    /// longest an idle keep-alive connection stays open).
    #[arg(long, default_value_t = 10_000)]
    header_read_timeout_ms: u64,
    /// How long a request body may pause, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    request_body_timeout_ms: u64,
    /// Enforce limits and credits fleet-wide on this Redis (`redis://host:6379`)
    /// instead of per process.
    #[arg(long)]
    redis: Option<String>,
    /// With `--redis`: charge credits with one atomic Redis call per request (exact,
    /// no leases).
    #[arg(long, requires = "redis")]
    strict_credits: bool,
    /// With `--redis`: the prefix of the engine's Redis keys.
    #[arg(long, requires = "redis", default_value = "keygate:")]
    redis_prefix: String,
    /// With `--redis`: how many instances share the limits (the share each counts
    /// while Redis is down).
    #[arg(long, requires = "redis", default_value_t = 1)]
    expected_instances: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,keygate=info".into()),
        )
        .init();
    let args = Args::parse();

    // Remote verification behind a cache; the key service's event stream, through which
    // revocations, scope changes and rotations reach the cache within a second (after
    // any gap in the stream the cache is dropped); every decided request one addition
    // into a bounded in-memory table that goes to the key service once per interval,
    // each batch applied there at most once.
    let mut setup = RemoteAuth::builder(args.key_service, args.service_token)
        .cache(move |c| c.positive_ttl(Duration::from_secs(args.cache_ttl)))
        .usage(|u| u.flush_interval(Duration::from_millis(args.usage_interval_ms.max(1))));
    // Limits and credits shared by every instance on the same Redis; without it, each
    // process counts on its own.
    if let Some(url) = &args.redis {
        let limits = RedisLimits::builder(url)
            .prefix(&args.redis_prefix)
            .strict_credits(args.strict_credits)
            .expected_instances(args.expected_instances)
            .build()?;
        setup = setup.fleet_limits(limits);
    }
    let (auth, remote) = setup.build()?;

    let protected = Router::new()
        .route(
            "/reports",
            get(list_reports)
                .route_layer(RequireScopes::all(["reports:read"]))
                .merge(post(create_report).route_layer(RequireScopes::all(["reports:write"]))),
        )
        .route("/admin", get(admin).route_layer(RequireScopes::role("admin")))
        .layer(auth);
    let app = Router::new().route("/health", get(health)).merge(protected);

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "protected service listening");
    // On standard output too, for scripts (and tests) that listen on port 0.
    println!("listening on {addr}");
    let header_read_timeout = Duration::from_millis(args.header_read_timeout_ms.max(1));
    let body_timeout = Duration::from_millis(args.request_body_timeout_ms);
    serve::serve(listener, app, header_read_timeout, body_timeout, serve::shutdown_signal()).await;

    // The server has stopped and every request in flight is decided: what the aggregator
    // holds now is all the usage there will be.
    let cache = remote.verifier().stats();
    let usage = remote.shutdown().await;
    tracing::info!(?cache, ?usage, "stopped");
    Ok(())
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

fn caller(p: &Principal) -> Value {
    json!({ "key_id": p.key_id(), "owner": p.owner() })
}

async fn list_reports(p: Principal) -> Json<Value> {
    Json(json!({ "caller": caller(&p), "reports": [] }))
}

async fn create_report(p: Principal) -> (http::StatusCode, Json<Value>) {
    (http::StatusCode::CREATED, Json(json!({ "caller": caller(&p), "created": true })))
}

async fn admin(p: Principal) -> Json<Value> {
    Json(json!({ "caller": caller(&p), "admin": true }))
}
