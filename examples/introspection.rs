//! An axum service that accepts the opaque OAuth2 access tokens of an authorization
//! server you already run (Keycloak, Ory Hydra, Zitadel, Authentik, ...), verified by
//! RFC 7662 token introspection behind keygate's cache.
//!
//! ```sh
//! INTROSPECTION_CLIENT_SECRET=... cargo run --example introspection --features introspection -- \
//!     --endpoint https://auth.example.com/oauth2/introspect --client-id my-api \
//!     --audience https://api.example.com --map-scope read=reports:read --listen 127.0.0.1:8080
//! ```
//!
//! Every flag may come from the environment instead (`INTROSPECTION_ENDPOINT`,
//! `INTROSPECTION_CLIENT_ID`, `INTROSPECTION_CLIENT_SECRET`, ...). Routes:
//!
//! | route | needs |
//! | --- | --- |
//! | `GET /health` | nothing |
//! | `GET /reports` | scope `reports:read` (map the server's own name with `--map-scope`) |
//!
//! A connection has 10 s (`--header-read-timeout-ms`) to send a request's headers and a
//! request body may pause 30 s (`--request-body-timeout-ms`), as in
//! `examples/protected.rs` (both serve through `examples/support/serve.rs`). Ctrl-C or
//! SIGTERM stops it gracefully.
//!
//! The address it listens on is printed (`listening on 127.0.0.1:8080`), so
//! `--listen 127.0.0.1:0` works too. Try it with a token from your server:
//!
//! ```sh
//! curl -s -H "Authorization: Bearer $ACCESS_TOKEN" localhost:8080/reports
//! ```

#[path = "support/serve.rs"]
mod serve;

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use clap::{Parser, ValueEnum};
use keygate::{ApiKeyLayer, CachedVerifier, IntrospectionVerifier, KeyFormat, Principal, RequireScopes};
use serde_json::json;

#[derive(Clone, Copy, ValueEnum)]
enum AuthMethod {
    /// HTTP Basic with the client id and secret.
    ClientSecretBasic,
    /// The client id and secret in the form body.
    ClientSecretPost,
    /// `Authorization: Bearer <client secret>`.
    Bearer,
}

/// A protected axum service in front of an OAuth2 authorization server.
#[derive(Parser)]
struct Args {
    /// The introspection endpoint's full URL.
    #[arg(long, env = "INTROSPECTION_ENDPOINT")]
    endpoint: String,
    /// This service's client id at the authorization server.
    #[arg(long, env = "INTROSPECTION_CLIENT_ID", default_value = "")]
    client_id: String,
    /// Its client secret (or, with `--auth-method bearer`, its bearer token).
    #[arg(long, env = "INTROSPECTION_CLIENT_SECRET", hide_env_values = true)]
    client_secret: String,
    /// How this service authenticates to the introspection endpoint.
    #[arg(long, env = "INTROSPECTION_AUTH_METHOD", value_enum, default_value = "client-secret-basic")]
    auth_method: AuthMethod,
    /// Accept only tokens issued for this audience.
    #[arg(long, env = "INTROSPECTION_AUDIENCE")]
    audience: Option<String>,
    /// Accept only tokens from this issuer.
    #[arg(long, env = "INTROSPECTION_ISSUER")]
    issuer: Option<String>,
    /// A foreign scope read as a keygate scope, `foreign=resource:action`; repeatable.
    #[arg(long = "map-scope", value_parser = parse_mapping)]
    map_scope: Vec<(String, String)>,
    /// How long a valid verdict is cached, in seconds (never past the token's `exp`).
    #[arg(long, default_value_t = 30)]
    cache_ttl: u64,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// How long a connection has to send a request's headers, in milliseconds (also the
    /// longest an idle keep-alive connection stays open).
    #[arg(long, default_value_t = 10_000)]
    header_read_timeout_ms: u64,
    /// How long a request body may pause, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    request_body_timeout_ms: u64,
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    let (foreign, scope) = s.split_once('=').ok_or("expected foreign=resource:action")?;
    Ok((foreign.to_owned(), scope.to_owned()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,keygate=info".into()),
        )
        .init();
    let args = Args::parse();

    let mut builder = IntrospectionVerifier::builder(args.endpoint).token_type_hint("access_token");
    builder = match args.auth_method {
        AuthMethod::ClientSecretBasic => builder.client_secret_basic(args.client_id, args.client_secret),
        AuthMethod::ClientSecretPost => builder.client_secret_post(args.client_id, args.client_secret),
        AuthMethod::Bearer => builder.bearer_token(args.client_secret),
    };
    if let Some(audience) = args.audience {
        builder = builder.audience(audience);
    }
    if let Some(issuer) = args.issuer {
        builder = builder.issuer(issuer);
    }
    for (foreign, scope) in args.map_scope {
        builder = builder.map_scope(foreign, scope);
    }
    let verifier = CachedVerifier::builder(builder.build()?).positive_ttl(Duration::from_secs(args.cache_ttl)).build();

    // Opaque tokens: no keygate format check, and room for longer tokens than
    // keygate's own keys (the default limit is 256 bytes).
    let auth = ApiKeyLayer::new(verifier).format(KeyFormat::opaque()).max_key_len(4096);

    let app = Router::new()
        .route("/reports", get(|p: Principal| async move { Json(json!({"client": p.key_id(), "owner": p.owner()})) }))
        .route_layer(RequireScopes::all(["reports:read"]))
        .layer(auth)
        .route("/health", get(|| async { "ok" }));

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let header_read_timeout = Duration::from_millis(args.header_read_timeout_ms.max(1));
    let body_timeout = Duration::from_millis(args.request_body_timeout_ms);
    serve::serve(listener, app, header_read_timeout, body_timeout, serve::shutdown_signal()).await;
    Ok(())
}
