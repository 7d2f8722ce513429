//! keygate in one file: an axum app with public, scoped and role-protected routes.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! It starts on an ephemeral loopback port, calls itself with no key, a bad key, a good
//! key and a key without the needed scope, prints each answer and exits.

use axum::Router;
use axum::routing::get;
use keygate::{ApiKey, ApiKeyLayer, Principal, RequireScopes, ScopeSet, StaticVerifier};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keys as the key service would issue them: `kg_` + 30 random + 6 checksum chars.
    let analyst = ApiKey::generate("kg")?;
    let admin = ApiKey::generate("kg")?;
    let verifier = StaticVerifier::new()
        .with_key(
            &analyst,
            Principal::builder("key_analyst").owner("acme").scopes(ScopeSet::parse(["reports:read"])?).build(),
        )
        .with_key(&admin, Principal::builder("key_admin").owner("acme").roles(["admin"]).build());

    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/whoami", get(|p: Option<Principal>| async move { format!("{p:?}") }))
        .route(
            "/reports",
            get(|p: Principal| async move { format!("reports for {} (key {})", p.owner(), p.key_id()) })
                .route_layer(RequireScopes::all(["reports:read"])),
        )
        .route("/admin", get(|| async { "admin area" }).route_layer(RequireScopes::expr("admin")))
        // `optional`: requests without a key pass with no principal; any key present
        // must be good, and scoped routes still need one.
        .layer(ApiKeyLayer::new(verifier).optional());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    println!("keygate quickstart listening on {base}\n");

    let client = reqwest::Client::new();
    let bad = "kg_thisisnotarealkeyatallxxxxxxxxxxxxxxx".to_owned();
    let calls: [(&str, &str, Option<&str>); 6] = [
        ("public route, no key", "/health", None),
        ("scoped route, no key", "/reports", None),
        ("scoped route, garbage key", "/reports", Some(&bad)),
        ("scoped route, good key", "/reports", Some(analyst.expose_secret())),
        ("admin route, analyst key (missing role)", "/admin", Some(analyst.expose_secret())),
        ("admin route, admin key", "/admin", Some(admin.expose_secret())),
    ];
    for (what, path, key) in calls {
        let mut req = client.get(format!("{base}{path}"));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        let res = req.send().await?;
        let status = res.status();
        let www = res.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or("?").to_owned());
        let body = res.text().await?;
        println!("{what}\n  GET {path} -> {status}");
        if let Some(www) = www {
            println!("  WWW-Authenticate: {www}");
        }
        println!("  {body}\n");
    }
    server.abort();
    Ok(())
}
