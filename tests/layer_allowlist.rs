//! Network allowlists (issue 17): a key, or its owner, limited to networks; the address
//! checked is the peer's, or a forwarded one only behind trusted proxies.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;
use keygate::{
    ApiKey, ApiKeyLayer, DecidedRequest, Outcome, Principal, RequireScopes, ScopeSet, StaticVerifier, UsageSink,
};
use serde_json::Value;

#[derive(Clone, Default)]
struct Recorded(Arc<Mutex<Vec<Outcome>>>);

impl UsageSink for Recorded {
    fn record(&self, request: &DecidedRequest<'_>) {
        self.0.lock().unwrap().push(request.outcome());
    }
}

struct Keys {
    loopback: ApiKey,
    partner: ApiKey,
    partner_unscoped: ApiKey,
    v6: ApiKey,
    owner_limited: ApiKey,
    anywhere: ApiKey,
}

fn keys() -> (StaticVerifier, Keys) {
    let k = Keys {
        loopback: ApiKey::generate("kg").unwrap(),
        partner: ApiKey::generate("kg").unwrap(),
        partner_unscoped: ApiKey::generate("kg").unwrap(),
        v6: ApiKey::generate("kg").unwrap(),
        owner_limited: ApiKey::generate("kg").unwrap(),
        anywhere: ApiKey::generate("kg").unwrap(),
    };
    let nets = |list: &[&str]| list.iter().map(|n| n.parse().unwrap()).collect::<Vec<ipnet::IpNet>>();
    let scoped = |id: &str| Principal::builder(id).scopes(ScopeSet::parse(["reports:read"]).unwrap());
    let v = StaticVerifier::new()
        .with_key(&k.loopback, scoped("key_lo").allowed_networks(nets(&["127.0.0.0/8"])).build())
        .with_key(&k.partner, scoped("key_partner").allowed_networks(nets(&["203.0.113.0/24"])).build())
        .with_key(
            &k.partner_unscoped,
            Principal::builder("key_partner_bare").allowed_networks(nets(&["203.0.113.0/24"])).build(),
        )
        .with_key(&k.v6, scoped("key_v6").allowed_networks(nets(&["2001:db8::/32"])).build())
        .with_key(&k.owner_limited, scoped("key_owned").owner_allowed_networks(nets(&["198.51.100.0/24"])).build())
        .with_key(&k.anywhere, scoped("key_any").build());
    (v, k)
}

async fn serve(layer: ApiKeyLayer<StaticVerifier>) -> String {
    let app = Router::new()
        .route("/reports", get(|| async { "ok" }).route_layer(RequireScopes::all(["reports:read"])))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await.unwrap()
    });
    url
}

async fn get_as(url: &str, key: &ApiKey, headers: &[(&str, &str)]) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = client.get(format!("{url}/reports")).header("x-api-key", key.expose_secret());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_peer_address_decides_and_forwarded_headers_from_it_are_ignored() {
    let (verifier, k) = keys();
    let usage = Recorded::default();
    let url = serve(ApiKeyLayer::new(verifier).usage(usage.clone())).await;
    assert_eq!(get_as(&url, &k.loopback, &[]).await.0, 200, "inside: 127.0.0.1 is in 127.0.0.0/8");
    assert_eq!(get_as(&url, &k.anywhere, &[]).await.0, 200, "no list: anywhere");
    let (status, body) = get_as(&url, &k.partner, &[]).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("ip_not_allowed")));
    // The same answer whether or not the key could use the route otherwise.
    let (status, unscoped) = get_as(&url, &k.partner_unscoped, &[]).await;
    assert_eq!((status, &unscoped), (403, &body));
    // The peer is no trusted proxy: what it says the client is counts for nothing.
    let spoofed = [("x-forwarded-for", "203.0.113.5"), ("forwarded", "for=203.0.113.5")];
    assert_eq!(get_as(&url, &k.partner, &spoofed).await.0, 403);
    // The owner's list applies to its key.
    assert_eq!(get_as(&url, &k.owner_limited, &[]).await.1["code"], "ip_not_allowed");
    let outcomes = usage.0.lock().unwrap().clone();
    assert_eq!(outcomes.iter().filter(|o| **o == Outcome::IpNotAllowed).count(), 4, "{outcomes:?}");
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_rightmost_untrusted_hop_is_the_client() {
    let (verifier, k) = keys();
    let url = serve(ApiKeyLayer::new(verifier).trusted_proxies(["127.0.0.1", "10.0.0.0/8"])).await;
    let xff = |v: &'static str| [("x-forwarded-for", v)];
    assert_eq!(get_as(&url, &k.partner, &xff("203.0.113.5")).await.0, 200);
    assert_eq!(get_as(&url, &k.partner, &xff("6.6.6.6, 203.0.113.5, 10.2.3.4")).await.0, 200);
    // A client that writes the partner's address first gains nothing.
    assert_eq!(get_as(&url, &k.partner, &xff("203.0.113.5, 6.6.6.6")).await.0, 403);
    // IPv6, through `Forwarded`.
    let fwd = [("forwarded", r#"for="[2001:db8::5]:4711";proto=https"#)];
    assert_eq!(get_as(&url, &k.v6, &fwd).await.0, 200);
    assert_eq!(get_as(&url, &k.v6, &[("forwarded", r#"for="[2001:db9::5]""#)]).await.0, 403);
    // The owner's list, from behind the proxy.
    assert_eq!(get_as(&url, &k.owner_limited, &xff("198.51.100.20")).await.0, 200);
    // No forwarding header: the proxy itself is the client.
    assert_eq!(get_as(&url, &k.loopback, &[]).await.0, 200);
}
