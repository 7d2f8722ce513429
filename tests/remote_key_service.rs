//! The client side against the real key service (`keygate::server`) on loopback, over
//! a SQLite file: coalescing counted at the key service, revocation through the admin
//! API seen within a second with a 10-minute TTL, event-stream loss across a restart,
//! rotation and scope changes.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, StatusCode, header};
use keygate::RevocationListener;
use keygate::client::{AdminClient, KeyPatch, NewKey};
use keygate::server::{KeyServer, RunningKeyServer};
use keygate::{ApiKey, ApiKeyLayer, CachedVerifier, HttpVerifier, Principal, RequireScopes};
use tower::ServiceExt;

const SERVICE: &str = "svc-remote-test-0123456789abcdefghij";
const ADMIN: &str = "adm-remote-test-0123456789abcdefghij";
const LIMIT: Duration = Duration::from_secs(10);

async fn start(db: &Path, addr: SocketAddr) -> RunningKeyServer {
    KeyServer::builder()
        .database(format!("sqlite://{}", db.display()))
        .service_token(SERVICE)
        .admin_token(ADMIN)
        .listen(addr)
        .start()
        .await
        .expect("key service starts")
}

struct Rig {
    server: RunningKeyServer,
    admin: AdminClient,
    _dir: tempfile::TempDir,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("keys.db"), "127.0.0.1:0".parse().unwrap()).await;
    let admin = AdminClient::new(server.url(), ADMIN).unwrap();
    Rig { server, admin, _dir: dir }
}

fn new_key(scopes: &[&str]) -> NewKey {
    NewKey {
        owner: "acme".into(),
        name: "test".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn cache(url: &str, ttl: Duration) -> CachedVerifier<HttpVerifier> {
    let http = HttpVerifier::builder(url).service_token(SERVICE).build().unwrap();
    CachedVerifier::builder(http).positive_ttl(ttl).negative_ttl(Duration::from_secs(5)).build()
}

fn app(cache: &CachedVerifier<HttpVerifier>) -> Router {
    Router::new()
        .route(
            "/reports",
            get(|p: Principal| async move { format!("{} {}", p.key_id(), p.owner()) })
                .route_layer(RequireScopes::all(["reports:read"])),
        )
        .layer(ApiKeyLayer::new(cache.clone()))
}

async fn call(app: &Router, key: &ApiKey) -> StatusCode {
    let req = Request::get("/reports")
        .header(header::AUTHORIZATION, format!("Bearer {}", key.expose_secret()))
        .body(Body::empty())
        .unwrap();
    tokio::time::timeout(LIMIT, app.clone().oneshot(req)).await.expect("request hung").unwrap().status()
}

async fn concurrently(app: &Router, key: &ApiKey, n: usize) -> Vec<StatusCode> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (app, key) = (app.clone(), key.clone());
            tokio::spawn(async move { call(&app, &key).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_make_one_verify_call() {
    let rig = rig().await;
    let created = rig.admin.create_key(new_key(&["reports:read"])).await.unwrap();
    let cache = cache(&rig.server.url(), Duration::from_millis(800));
    let app = app(&cache);
    let calls = || rig.server.stats().verify_calls;

    let statuses = concurrently(&app, &created.key, 1000).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{:?}", statuses.iter().find(|s| **s != StatusCode::OK));
    assert_eq!(calls(), 1, "one never-seen valid key, 1 000 requests");

    let unknown = ApiKey::generate("kg").unwrap();
    let statuses = concurrently(&app, &unknown, 1000).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::UNAUTHORIZED));
    assert_eq!(calls(), 2, "one unknown well-formed key, 1 000 requests");

    // Cached: no calls until the TTL ends, then one.
    let before = Instant::now();
    for _ in 0..100 {
        assert_eq!(call(&app, &created.key).await, StatusCode::OK);
    }
    assert!(before.elapsed() < Duration::from_millis(800), "the loop ran inside the TTL");
    assert_eq!(calls(), 2);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(call(&app, &created.key).await, StatusCode::OK);
    assert_eq!(calls(), 3);
    println!("cache stats: {:?}", cache.stats());
}

#[tokio::test]
async fn a_revocation_through_the_admin_api_is_refused_within_a_second() {
    let rig = rig().await;
    let created = rig.admin.create_key(new_key(&["reports:read"])).await.unwrap();
    let cache = cache(&rig.server.url(), Duration::from_secs(600));
    let listener = RevocationListener::builder(rig.server.url()).service_token(SERVICE).spawn(&cache).unwrap();
    let app = app(&cache);
    eventually("connected", LIMIT, async || listener.is_connected()).await;
    assert_eq!(call(&app, &created.key).await, StatusCode::OK);
    assert_eq!(call(&app, &created.key).await, StatusCode::OK);
    assert_eq!(rig.server.stats().verify_calls, 1);

    rig.admin.revoke(&created.key_id).await.unwrap();
    let took = eventually("refused", Duration::from_secs(1), async || {
        call(&app, &created.key).await == StatusCode::UNAUTHORIZED
    })
    .await;
    println!("revocation refused after {took:?}");
}

#[tokio::test]
async fn scope_changes_and_disabling_reach_the_cache_at_once() {
    let rig = rig().await;
    let created = rig.admin.create_key(new_key(&["reports:read"])).await.unwrap();
    let cache = cache(&rig.server.url(), Duration::from_secs(600));
    let listener = RevocationListener::builder(rig.server.url()).service_token(SERVICE).spawn(&cache).unwrap();
    let app = app(&cache);
    eventually("connected", LIMIT, async || listener.is_connected()).await;
    assert_eq!(call(&app, &created.key).await, StatusCode::OK);

    let patch = KeyPatch { scopes: Some(vec!["billing:read".into()]), ..Default::default() };
    rig.admin.update_key(&created.key_id, &patch).await.unwrap();
    eventually("scope removed", Duration::from_secs(1), async || {
        call(&app, &created.key).await == StatusCode::FORBIDDEN
    })
    .await;

    let patch = KeyPatch { scopes: Some(vec!["reports:read".into()]), ..Default::default() };
    rig.admin.update_key(&created.key_id, &patch).await.unwrap();
    eventually("scope back", Duration::from_secs(1), async || call(&app, &created.key).await == StatusCode::OK).await;

    let patch = KeyPatch { disabled: Some(true), ..Default::default() };
    rig.admin.update_key(&created.key_id, &patch).await.unwrap();
    eventually("disabled", Duration::from_secs(1), async || call(&app, &created.key).await == StatusCode::UNAUTHORIZED)
        .await;
}

#[tokio::test]
async fn after_a_rotation_the_old_secret_stops_at_the_end_of_its_grace() {
    let rig = rig().await;
    let created = rig.admin.create_key(new_key(&["reports:read"])).await.unwrap();
    let cache = cache(&rig.server.url(), Duration::from_secs(600));
    let listener = RevocationListener::builder(rig.server.url()).service_token(SERVICE).spawn(&cache).unwrap();
    let app = app(&cache);
    eventually("connected", LIMIT, async || listener.is_connected()).await;
    assert_eq!(call(&app, &created.key).await, StatusCode::OK);

    let rotated = rig.admin.rotate(&created.key_id, 1).await.unwrap();
    eventually("rotated event applied", LIMIT, async || listener.stats().invalidations >= 1).await;
    assert_eq!(call(&app, &rotated.key).await, StatusCode::OK);
    assert_eq!(call(&app, &created.key).await, StatusCode::OK, "inside the grace");
    // The old secret's verdict is cached with expires_at = end of grace: no TTL outlives it.
    eventually("old secret refused", Duration::from_secs(3), async || {
        call(&app, &created.key).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(call(&app, &rotated.key).await, StatusCode::OK);
}

#[tokio::test]
async fn a_revocation_while_the_stream_is_down_is_honoured_after_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let server = start(&db, "127.0.0.1:0".parse().unwrap()).await;
    let addr = server.addr();
    let url = server.url();
    let admin = AdminClient::new(&url, ADMIN).unwrap();
    let created = admin.create_key(new_key(&["reports:read"])).await.unwrap();

    let cache = cache(&url, Duration::from_secs(600));
    let listener = RevocationListener::builder(url.as_str())
        .service_token(SERVICE)
        .backoff(Duration::from_millis(50), Duration::from_millis(300))
        .spawn(&cache)
        .unwrap();
    let app = app(&cache);
    eventually("connected", LIMIT, async || listener.is_connected()).await;
    assert_eq!(call(&app, &created.key).await, StatusCode::OK);

    // The key service goes down mid-stream.
    server.shutdown().await;
    eventually("disconnected", LIMIT, async || !listener.is_connected()).await;

    // Another replica on the same database revokes the key; nobody hears about it.
    let other = start(&db, "127.0.0.1:0".parse().unwrap()).await;
    AdminClient::new(other.url(), ADMIN).unwrap().revoke(&created.key_id).await.unwrap();
    other.shutdown().await;
    assert_eq!(call(&app, &created.key).await, StatusCode::OK, "the cache still serves under its TTL");

    // The key service comes back on the same port and database.
    let server = start(&db, addr).await;
    eventually("reconnected", LIMIT, async || listener.is_connected() && listener.reconnects() == 1).await;
    // Connected comes first, the replayed events right after it on the same stream.
    eventually("the revocation was replayed from the change log on reconnect", Duration::from_secs(3), async || {
        call(&app, &created.key).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(listener.stats().resumes, 1);
    server.shutdown().await;
}

#[tokio::test]
async fn disconnected_streams_reconnect_and_heartbeats_keep_a_stream_alive() {
    let dir = tempfile::tempdir().unwrap();
    let server = KeyServer::builder()
        .database(format!("sqlite://{}", dir.path().join("keys.db").display()))
        .service_token(SERVICE)
        .admin_token(ADMIN)
        .listen("127.0.0.1:0".parse().unwrap())
        .heartbeat(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    let cache = cache(&server.url(), Duration::from_secs(600));
    let listener = RevocationListener::builder(server.url())
        .service_token(SERVICE)
        .heartbeat_interval(Duration::from_millis(100))
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .spawn(&cache)
        .unwrap();
    eventually("connected", LIMIT, async || listener.is_connected()).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(listener.reconnects(), 0, "heartbeats every 100 ms keep a 200 ms deadline");

    server.disconnect_event_streams();
    eventually("reconnected", LIMIT, async || listener.reconnects() == 1 && listener.is_connected()).await;
    // Resumed from the stream's position: the cache was dropped once, at the first connection.
    let stats = listener.stats();
    assert_eq!((stats.cache_drops, stats.resumes, stats.resets), (1, 1, 0), "{stats:?}");
}

/// Two replicas on one database: with replica A killed, verifications move to B with no
/// failed request, and the event listener follows B.
#[tokio::test]
async fn when_a_replica_dies_verification_and_events_move_to_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let a = start(&db, "127.0.0.1:0".parse().unwrap()).await;
    let b = start(&db, "127.0.0.1:0".parse().unwrap()).await;
    let urls = vec![a.url(), b.url()];
    let admin_b = AdminClient::new(b.url(), ADMIN).unwrap();
    let mut keys = Vec::new();
    for _ in 0..20 {
        keys.push(admin_b.create_key(new_key(&["reports:read"])).await.unwrap());
    }

    let http = HttpVerifier::builder(urls.clone()).service_token(SERVICE).build().unwrap();
    let cache = CachedVerifier::builder(http).positive_ttl(Duration::from_secs(600)).build();
    let listener = RevocationListener::builder(urls)
        .service_token(SERVICE)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .spawn(&cache)
        .unwrap();
    let app = app(&cache);
    eventually("connected to a", LIMIT, async || listener.is_connected() && listener.current_endpoint() == 0).await;
    for k in &keys[..10] {
        assert_eq!(call(&app, &k.key).await, StatusCode::OK);
    }
    let (on_a, on_b) = (a.stats().verify_calls, b.stats().verify_calls);
    assert_eq!(on_a + on_b, 10);
    assert!(on_a >= 4 && on_b >= 4, "spread across replicas: {on_a} / {on_b}");

    a.shutdown().await;
    for k in &keys[10..] {
        assert_eq!(call(&app, &k.key).await, StatusCode::OK, "no failed request with b up");
    }
    assert_eq!(b.stats().verify_calls, on_b + 10);
    eventually("listener moved to b", LIMIT, async || listener.is_connected() && listener.current_endpoint() == 1)
        .await;

    admin_b.revoke(&keys[0].key_id).await.unwrap();
    eventually("revocation through b", Duration::from_secs(1), async || {
        call(&app, &keys[0].key).await == StatusCode::UNAUTHORIZED
    })
    .await;
    b.shutdown().await;
}

#[tokio::test]
async fn refused_keys_that_exist_are_named_in_the_verdict_and_unknown_ones_are_not() {
    use keygate::{Reason, Verdict, Verifier};
    let rig = rig().await;
    let created = rig.admin.create_key(new_key(&["reports:read"])).await.unwrap();
    rig.admin.revoke(&created.key_id).await.unwrap();
    let http = HttpVerifier::builder(rig.server.url()).service_token(SERVICE).build().unwrap();
    match http.verify(&created.key).await {
        Ok(Verdict::Invalid { reason: Reason::Revoked, key_id: Some(id) }) => assert_eq!(&*id, created.key_id.as_str()),
        other => panic!("expected a named revocation, got {other:?}"),
    }
    let unknown = ApiKey::generate("kg").unwrap();
    assert!(matches!(http.verify(&unknown).await, Ok(Verdict::Invalid { reason: Reason::NotFound, key_id: None })));
    // Through the cache the name survives a negative hit.
    let cached = cache(&rig.server.url(), Duration::from_secs(30));
    for _ in 0..2 {
        let v = cached.verify(&created.key).await.unwrap();
        assert!(matches!(v, Verdict::Invalid { key_id: Some(ref id), .. } if **id == *created.key_id));
    }
    assert_eq!(cached.stats().negative_hits, 1);
}
