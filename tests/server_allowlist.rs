//! Network allowlists through the key service (issue 17): stored, validated, audited,
//! carried in the verify answer for keys and owners, and enforced by a middleware.

mod server_support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use keygate::client::{KeyPatch, OwnerQuota};
use keygate::{ApiKey, ApiKeyLayer, CachedVerifier, HttpVerifier, RevocationListener};
use serde_json::{Value, json};
use server_support::*;

async fn protected(t: &TestServer) -> (String, RevocationListener) {
    let remote = HttpVerifier::builder(t.server.url()).service_token(SERVICE).build().unwrap();
    let cache = CachedVerifier::builder(remote).positive_ttl(Duration::from_secs(600)).build();
    let listener = RevocationListener::builder(t.server.url()).service_token(SERVICE).spawn(&cache).unwrap();
    assert!(eventually(Duration::from_secs(10), || async { listener.is_connected() }).await);
    let app = Router::new().route("/x", get(|| async { "ok" })).layer(ApiKeyLayer::new(cache));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/x", tcp.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(tcp, app.into_make_service_with_connect_info::<SocketAddr>()).await });
    (url, listener)
}

async fn call(url: &str, key: &ApiKey) -> (u16, Value) {
    let res = reqwest::Client::new().get(url).header("x-api-key", key.expose_secret()).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn allowlists_are_stored_answered_and_enforced() {
    let t = TestServer::start().await;
    let mut new = new_key("acme", &["a:b"]);
    new.allowed_networks = vec!["203.0.113.7".into(), "10.9.8.7/8".into(), "10.0.0.0/8".into()];
    let partner = t.admin.create_key(new).await.unwrap();
    assert_eq!(partner.info.allowed_networks, ["203.0.113.7/32", "10.0.0.0/8"], "canonical, repeats dropped");
    let answer = t.verify(partner.key.expose_secret()).await;
    assert_eq!(answer["allowed_networks"], json!(["203.0.113.7/32", "10.0.0.0/8"]));

    // Refused lists, whole.
    let too_many: Vec<String> = (0..33).map(|i| format!("192.0.2.{i}")).collect();
    for bad in [vec!["not-a-net".to_owned()], vec!["10.0.0.0/33".to_owned()], too_many] {
        let mut new = new_key("acme", &["a:b"]);
        new.allowed_networks = bad;
        let err = t.admin.create_key(new).await.unwrap_err().to_string();
        assert!(err.contains("invalid_network"), "{err}");
    }

    let (url, listener) = protected(&t).await;
    let local = {
        let mut new = new_key("acme", &["a:b"]);
        new.allowed_networks = vec!["127.0.0.0/8".into()];
        t.admin.create_key(new).await.unwrap()
    };
    assert_eq!(call(&url, &local.key).await.0, 200);
    let (status, body) = call(&url, &partner.key).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("ip_not_allowed")));

    // An owner's list applies to every key of the owner, on top of the key's own.
    let other = t.admin.create_key(new_key("globex", &["a:b"])).await.unwrap();
    assert_eq!(call(&url, &other.key).await.0, 200);
    let quota = OwnerQuota { allowed_networks: vec!["198.51.100.0/24".into()], ..OwnerQuota::default() };
    let owner = t.admin.put_owner("globex", &quota).await.unwrap();
    assert_eq!(owner.allowed_networks, ["198.51.100.0/24"]);
    assert_eq!(t.verify(other.key.expose_secret()).await["owner_allowed_networks"], json!(["198.51.100.0/24"]));
    let refused = eventually(Duration::from_secs(2), || async { call(&url, &other.key).await.0 == 403 }).await;
    assert!(refused, "the owner change reached the middleware's cache");

    // Clearing the key's list: any network again, audited.
    let patch = KeyPatch { allowed_networks: Some(vec![]), ..KeyPatch::default() };
    let cleared = t.admin.update_key(&partner.key_id, &patch).await.unwrap();
    assert!(cleared.allowed_networks.is_empty());
    assert!(eventually(Duration::from_secs(2), || async { call(&url, &partner.key).await.0 == 200 }).await);
    let audit = t.admin.audit(None).await.unwrap();
    let record = audit.iter().rev().find(|r| r.action == "key.update").unwrap();
    assert_eq!(record.changes["allowed_networks"]["from"], json!(["203.0.113.7/32", "10.0.0.0/8"]));
    assert!(
        audit
            .iter()
            .any(|r| r.action == "owner.put" && r.changes["allowed_networks"]["to"] == json!(["198.51.100.0/24"]))
    );
    drop(listener);
}
