//! A service's own error shape for every rejection keygate makes.
//!
//! ```sh
//! cargo run --example custom_errors
//! ```
//!
//! The service answers errors as `{"error": {"code", "message", ...}}` everywhere, so
//! keygate's rejections must look the same. `ApiKeyLayer::on_rejection` renders them:
//! `AuthError::code()` tells the cases apart (stable snake_case strings), and keygate
//! keeps what HTTP requires (`WWW-Authenticate` on 401/403, `Retry-After` on 429/503,
//! the `RateLimit` fields) unless the hook sets its own.
//!
//! The example serves the app on a loopback port, calls it once for every case (every
//! value `AuthError::code()` has), prints each answer and exits.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::{Response, header};
use keygate::quota::{Credits, Refill};
use keygate::{
    ApiKey, ApiKeyLayer, AuthError, Principal, RateLimit, RequireScopes, ScopeSet, StaticVerifier, Verdict, Verifier,
    VerifyError,
};
use time::OffsetDateTime;

/// The service's error shape, for every case keygate has.
fn api_error(err: &AuthError) -> Response<Bytes> {
    let mut error = serde_json::json!({ "code": err.code(), "message": err.public_detail() });
    match err {
        AuthError::InsufficientScope { scopes, roles, .. } => {
            error["required"] = serde_json::json!({ "scopes": scopes, "roles": roles });
        }
        AuthError::WrongEnvironment { required } => {
            error["required"] = serde_json::json!({ "environments": required });
        }
        AuthError::RateLimited { retry_after, .. }
        | AuthError::Unavailable { retry_after }
        | AuthError::UsageExceeded { retry_after: Some(retry_after) } => {
            // Rounded up, as `Retry-After` is: a client waiting that long is never early.
            error["retry_after_s"] = (retry_after.as_millis().div_ceil(1000).max(1) as u64).into();
        }
        _ => {}
    }
    Response::builder()
        .status(err.status())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(serde_json::json!({ "error": error }).to_string()))
        .expect("a status, one header and bytes")
}

/// The hook belongs to a layer, so a route with no `ApiKeyLayer` in front of its
/// `RequireScopes` (a setup mistake, `misconfigured`) gets keygate's own problem+json.
/// That answer carries the `AuthError` in its extensions, so one outer layer puts it in
/// the service's shape too, keeping keygate's headers.
async fn in_our_shape(res: axum::response::Response) -> axum::response::Response {
    let problem = res.headers().get(header::CONTENT_TYPE).is_some_and(|v| v == "application/problem+json");
    let Some(err) = res.extensions().get::<AuthError>().filter(|_| problem).cloned() else { return res };
    let (ours, body) = api_error(&err).into_parts();
    let (mut parts, _) = res.into_parts();
    parts.status = ours.status;
    for (name, value) in &ours.headers {
        parts.headers.insert(name, value.clone());
    }
    axum::response::Response::from_parts(parts, axum::body::Body::from(body))
}

/// A request's extra headers.
type Headers = Vec<(&'static str, String)>;

/// A key service that cannot be reached, for the 503 case.
struct Unreachable;

impl Verifier for Unreachable {
    async fn verify(&self, _: &ApiKey) -> Result<Verdict, VerifyError> {
        Err(VerifyError::Unreachable("connection refused".into()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reader = ApiKey::generate("kg")?;
    let limited = ApiKey::generate("kg")?;
    let revoked = ApiKey::generate("kg")?;
    let expired = ApiKey::generate("kg")?;
    let test_key = ApiKey::generate("kgtest")?;
    let partner = ApiKey::generate("kg")?;
    let spent = ApiKey::generate("kg")?;
    let scopes = ScopeSet::parse(["reports:read"])?;
    let key = |id: &str| Principal::builder(id).owner("acme").environment("live").scopes(scopes.clone());
    // Credits spent, back to 100 at the next midnight UTC (counted by the layer).
    let spent_credits = Credits { remaining: 0, refill: Some(Refill::Daily { amount: 100 }) };
    let verifier = StaticVerifier::new()
        .with_key(&reader, key("key_reader").build())
        .with_key(&limited, key("key_limited").ratelimit(Some(RateLimit { limit: 1, period_s: 60 })).build())
        .with_key(&revoked, key("key_revoked").build())
        .with_key(
            &expired,
            key("key_expired").expires_at(Some(OffsetDateTime::now_utc() - Duration::from_secs(60))).build(),
        )
        .with_key(&test_key, key("key_test").environment("test").build())
        // Usable from a partner's network only; the example's client calls from 127.0.0.1.
        .with_key(&partner, key("key_partner").allowed_networks(["203.0.113.0/24".parse()?]).build())
        .with_key(&spent, key("key_spent").credits(Some(spent_credits)).build());
    verifier.revoke("key_revoked");

    let app = Router::new()
        .route("/reports", get(|p: Principal| async move { format!("reports for {}", p.owner()) }))
        .route("/admin", get(|| async { "admin" }).route_layer(RequireScopes::role("admin")))
        .route("/billing", get(|| async { "billing" }).route_layer(RequireScopes::all(["billing:read"])))
        .route("/live", get(|| async { "live data" }).route_layer(RequireScopes::environment("live")))
        .route("/", get(|p: Option<Principal>| async move { if p.is_some() { "hello, key" } else { "hello" } }))
        // Anonymous callers reach `/`; `/reports` takes `Principal`, so they get the 401.
        .layer(ApiKeyLayer::new(verifier).optional().on_rejection(api_error))
        .merge(
            Router::new()
                .route("/status", get(|| async { "up" }))
                .layer(ApiKeyLayer::new(Unreachable).on_rejection(api_error)),
        )
        // The mistake: a requirement with no layer in front of it.
        .route("/forgotten", get(|| async { "unreached" }).route_layer(RequireScopes::all(["reports:read"])))
        .layer(axum::middleware::map_response(in_our_shape));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    // With the peer address, which the partner key's network allowlist is checked against.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let client = reqwest::Client::new();
    let secret = |k: &ApiKey| format!("Bearer {}", k.expose_secret());
    let cases: Vec<(&str, &str, Headers)> = vec![
        ("no key", "/reports", vec![]),
        ("garbage key", "/reports", vec![("authorization", "Bearer kg_not-a-real-key".into())]),
        ("revoked key", "/reports", vec![("authorization", secret(&revoked))]),
        ("expired key", "/reports", vec![("authorization", secret(&expired))]),
        (
            "two keys",
            "/reports",
            vec![("authorization", secret(&reader)), ("x-api-key", reader.expose_secret().into())],
        ),
        ("missing scope", "/billing", vec![("authorization", secret(&reader))]),
        ("missing role", "/admin", vec![("authorization", secret(&reader))]),
        ("within its limit", "/reports", vec![("authorization", secret(&limited))]),
        ("over its limit", "/reports", vec![("authorization", secret(&limited))]),
        ("test key, live route", "/live", vec![("authorization", secret(&test_key))]),
        ("outside its networks", "/reports", vec![("authorization", secret(&partner))]),
        ("credits spent", "/reports", vec![("authorization", secret(&spent))]),
        ("key service down", "/status", vec![("authorization", secret(&reader))]),
        ("no layer in front", "/forgotten", vec![("authorization", secret(&reader))]),
        ("good key", "/reports", vec![("authorization", secret(&reader))]),
        ("anonymous, public route", "/", vec![]),
    ];
    for (what, path, headers) in cases {
        let mut req = client.get(format!("{base}{path}"));
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let res = req.send().await?;
        let status = res.status().as_u16();
        let kept: Vec<String> = ["www-authenticate", "retry-after", "ratelimit"]
            .into_iter()
            .filter_map(|name| res.headers().get(name).map(|v| format!("{name}: {}", v.to_str().unwrap_or("?"))))
            .collect();
        let body = res.text().await?;
        println!("{what:<24} GET {path:<10} → {status} {body}");
        for header in kept {
            println!("{:<24}   {header}", "");
        }
    }
    server.abort();
    Ok(())
}
