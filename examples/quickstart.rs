//! keygate end to end in one process: the reference key service, a protected axum app
//! verifying against it through a cache, instant revocation, and usage reporting.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! 1. starts the key service on an ephemeral loopback port (in-memory SQLite);
//! 2. creates a role and two keys through the admin API;
//! 3. starts an app protected by `ApiKeyLayer` over `CachedVerifier<HttpVerifier>`,
//!    following the key service's event stream, and recording usage events;
//! 4. calls it: no key, garbage, good key, wrong scope, role route;
//! 5. revokes a key and shows the very next request refused, long before the cache TTL;
//! 6. prints the usage the key service recorded for each key, and exits.

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use keygate::RevocationListener;
use keygate::client::{AdminClient, NewKey};
use keygate::server::KeyServer;
use keygate::{
    ApiKeyLayer, CachedVerifier, HttpUsageExporter, HttpVerifier, Principal, RequireScopes, UsageAggregator,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The key service.
    let keys = KeyServer::builder()
        .database("sqlite::memory:")
        .service_token("demo-service-token-0123456789abcdef")
        .admin_token("demo-admin-token-0123456789abcdefgh")
        .listen("127.0.0.1:0".parse()?)
        .start()
        .await?;
    println!("key service on {}", keys.url());

    // 2. A role and two keys, through the admin API.
    let admin = AdminClient::new(keys.url(), "demo-admin-token-0123456789abcdefgh")?;
    admin.put_role("auditor", vec!["audit:read".to_owned()]).await?;
    let analyst = admin
        .create_key(NewKey {
            owner: "acme".into(),
            name: "analyst laptop".into(),
            scopes: vec!["reports:read".into()],
            ..Default::default()
        })
        .await?;
    let auditor = admin
        .create_key(NewKey {
            owner: "acme".into(),
            name: "audit job".into(),
            roles: vec!["auditor".into()],
            ..Default::default()
        })
        .await?;
    println!("created {} (reports:read) and {} (role auditor)\n", analyst.key_id, auditor.key_id);

    // 3. The protected app: remote verification behind a cache (a 10-minute TTL, to
    // show that revocation does not wait for it), the event stream, usage events.
    let remote =
        HttpVerifier::builder(vec![keys.url()]).service_token("demo-service-token-0123456789abcdef").build()?;
    let verifier = CachedVerifier::builder(remote).positive_ttl(Duration::from_secs(600)).build();
    let events = RevocationListener::builder(vec![keys.url()])
        .service_token("demo-service-token-0123456789abcdef")
        .spawn(&verifier)?;
    let exporter =
        HttpUsageExporter::builder(keys.url()).service_token("demo-service-token-0123456789abcdef").build()?;
    let (usage, aggregator) = UsageAggregator::builder().flush_interval(Duration::from_millis(200)).build(exporter)?;

    let app = Router::new()
        .route(
            "/reports",
            get(|p: Principal| async move { format!("reports for {} (key {})", p.owner(), p.key_id()) })
                .route_layer(RequireScopes::all(["reports:read"])),
        )
        .route("/billing", get(|| async { "billing" }).route_layer(RequireScopes::all(["billing:write"])))
        .route("/audit", get(|| async { "audit log" }).route_layer(RequireScopes::expr("role(auditor) OR audit:read")))
        .layer(ApiKeyLayer::new(verifier.clone()).usage(usage));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    println!("protected app on {base}\n");

    // 4. Calls.
    // Redirects are never followed by keygate's own clients, nor by this one.
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let call = |what: &'static str, path: &'static str, key: Option<String>| {
        let client = client.clone();
        let base = base.clone();
        async move {
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
            Ok::<_, reqwest::Error>(status)
        }
    };
    let good = Some(analyst.key.expose_secret().to_owned());
    let garbage = Some("kg_thisisnotarealkeyatallxxxxxxxxxxxxxxx".to_owned());
    call("no key", "/reports", None).await?;
    call("garbage key (fails its checksum: no call to the key service)", "/reports", garbage).await?;
    call("good key", "/reports", good.clone()).await?;
    call("good key, again (served from the cache)", "/reports", good.clone()).await?;
    call("good key, wrong scope", "/billing", good.clone()).await?;
    call("role key on a route that names the role", "/audit", Some(auditor.key.expose_secret().to_owned())).await?;

    // 5. Revocation reaches the cache through the event stream, not the 10-minute TTL.
    admin.revoke(&analyst.key_id).await?;
    println!("revoked {} through the admin API", analyst.key_id);
    let mut refused = false;
    for _ in 0..50 {
        let res = client.get(format!("{base}/reports")).bearer_auth(analyst.key.expose_secret()).send().await?;
        if res.status() == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{}\n", if refused { "  the revoked key is refused on the next request" } else { "  NOT refused!" });
    call("revoked key", "/reports", good).await?;
    println!("cache: {:?}", verifier.stats());

    // 6. Usage, as the key service aggregated it.
    aggregator.flush().await?;
    for (name, key_id) in [("analyst", &analyst.key_id), ("auditor", &auditor.key_id)] {
        let report = admin.usage(key_id, None).await?;
        let (mut requests, mut allowed, mut denied) = (0, 0, 0);
        for b in &report.buckets {
            requests += b.requests;
            allowed += b.allowed;
            denied += b.denied;
        }
        println!("usage of {name} ({key_id}): {requests} requests, {allowed} allowed, {denied} denied");
    }

    aggregator.shutdown().await;
    events.shutdown().await;
    server.abort();
    keys.shutdown().await;
    if !refused {
        return Err("revocation was not seen".into());
    }
    Ok(())
}
