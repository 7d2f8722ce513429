//! RevocationListener against a real SSE key service on loopback (the misbehaving test
//! server): invalidation by key id, reset, unreadable events, stream loss and gaps,
//! heartbeats, failover, and stopping.

mod remote_support;

use std::future::Future;
use std::time::Duration;

use keygate::RevocationListener;
use keygate::{ApiKey, CachedVerifier, HttpVerifier, Reason, Verdict, Verifier, VerifyError};
use remote_support::{FaultServer, TOKEN};

const LONG_TTL: Duration = Duration::from_secs(600);
const LIMIT: Duration = Duration::from_secs(10);

fn cache(urls: Vec<String>) -> CachedVerifier<HttpVerifier> {
    let http = HttpVerifier::builder(urls).service_token(TOKEN).timeout(Duration::from_millis(500)).build().unwrap();
    CachedVerifier::builder(http).positive_ttl(LONG_TTL).negative_ttl(Duration::from_millis(100)).build()
}

fn listener(urls: Vec<String>) -> keygate::RevocationListenerBuilder {
    RevocationListener::builder(urls)
        .service_token(TOKEN)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `verify` until `done` holds; returns how long it took.
async fn poll_until<F, Fut>(limit: Duration, mut attempt: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    loop {
        if attempt().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn refused(r: &Result<Verdict, VerifyError>) -> bool {
    matches!(r, Ok(Verdict::Invalid { reason: Reason::Revoked, .. }))
}

#[tokio::test]
async fn a_revocation_event_is_seen_within_a_second_despite_a_long_ttl() {
    let server = FaultServer::start().await;
    let key = ApiKey::generate("kg").unwrap();
    server.add_key(&key, "key_1", &[]);
    let cache = cache(vec![server.url()]);
    let l = listener(vec![server.url()]).spawn(&cache).unwrap();
    eventually("connected", || l.is_connected()).await;
    assert!(matches!(cache.verify(&key).await, Ok(Verdict::Valid(_))));
    assert!(matches!(cache.verify(&key).await, Ok(Verdict::Valid(_))));
    assert_eq!(server.calls(), 1);

    server.revoke(&key, "key_1");
    let took = poll_until(Duration::from_secs(1), || async { refused(&cache.verify(&key).await) }).await;
    println!("revocation seen after {took:?}");
    assert_eq!(l.stats().invalidations, 1);
    assert_eq!(l.reconnects(), 0);
}

#[tokio::test]
async fn updated_rotated_and_reset_events_invalidate() {
    let server = FaultServer::start().await;
    let a = ApiKey::generate("kg").unwrap();
    let b = ApiKey::generate("kg").unwrap();
    server.add_key(&a, "key_a", &[]);
    server.add_key(&b, "key_b", &[]);
    let cache = cache(vec![server.url()]);
    let l = listener(vec![server.url()]).spawn(&cache).unwrap();
    eventually("connected", || l.is_connected()).await;
    let warm = || async {
        cache.verify(&a).await.unwrap();
        cache.verify(&b).await.unwrap();
    };
    warm().await;
    assert_eq!(server.calls(), 2);

    server.send_event("updated", r#"{"key_id":"key_a"}"#);
    eventually("updated applied", || l.stats().invalidations == 1).await;
    warm().await;
    assert_eq!(server.calls(), 3, "only key_a was asked again");

    server.send_event("rotated", r#"{"key_id":"key_b"}"#);
    eventually("rotated applied", || l.stats().invalidations == 2).await;
    warm().await;
    assert_eq!(server.calls(), 4);

    // Heartbeats, alerts and unknown events change nothing.
    server.send_raw(": ping\n\nevent: alert\ndata: {\"anything\":1}\n\nevent: novel\ndata: x\n\n");
    server.send_event("reset", "{}");
    eventually("reset applied", || l.stats().cache_drops == 2).await;
    warm().await;
    assert_eq!(server.calls(), 6);
}

#[tokio::test]
async fn an_unreadable_event_drops_the_whole_cache_and_is_counted() {
    let server = FaultServer::start().await;
    let key = ApiKey::generate("kg").unwrap();
    server.add_key(&key, "key_1", &[]);
    let cache = cache(vec![server.url()]);
    let l = listener(vec![server.url()]).spawn(&cache).unwrap();
    eventually("connected", || l.is_connected()).await;
    cache.verify(&key).await.unwrap();
    server.send_event("revoked", "{not json");
    eventually("failure counted", || l.stats().invalidation_failures == 1).await;
    cache.verify(&key).await.unwrap();
    assert_eq!(server.calls(), 2, "the cache was dropped");
}

#[tokio::test]
async fn after_a_gap_the_cache_is_dropped_and_a_revoked_key_refused() {
    let server = FaultServer::start().await;
    let key = ApiKey::generate("kg").unwrap();
    server.add_key(&key, "key_1", &[]);
    let cache = cache(vec![server.url()]);
    let l = listener(vec![server.url()]).spawn(&cache).unwrap();
    eventually("connected", || l.is_connected()).await;
    assert!(matches!(cache.verify(&key).await, Ok(Verdict::Valid(_))));

    // The key service goes away; the key is revoked while nobody listens.
    server.stop();
    eventually("disconnected", || !l.is_connected()).await;
    server.revoke_silently(&key);
    assert!(matches!(cache.verify(&key).await, Ok(Verdict::Valid(_))), "served under its TTL meanwhile");
    eventually("a failed reconnect", || l.stats().connect_failures >= 1).await;

    server.restart().await;
    eventually("reconnected", || l.is_connected() && l.reconnects() == 1).await;
    assert!(refused(&cache.verify(&key).await), "cache dropped on reconnect");
}

#[tokio::test]
async fn a_stream_cut_by_the_server_reconnects_and_drops_the_cache() {
    let server = FaultServer::start().await;
    let key = ApiKey::generate("kg").unwrap();
    server.add_key(&key, "key_1", &[]);
    let cache = cache(vec![server.url()]);
    let l = listener(vec![server.url()]).spawn(&cache).unwrap();
    eventually("connected", || l.is_connected()).await;
    cache.verify(&key).await.unwrap();
    server.revoke_silently(&key);
    server.drop_streams();
    eventually("reconnected", || l.reconnects() == 1 && l.is_connected()).await;
    assert!(refused(&cache.verify(&key).await));
    assert_eq!(server.event_connections(), 2);
}

#[tokio::test]
async fn a_silent_stream_is_declared_dead_after_two_heartbeats() {
    // The server's heartbeat is 15 s; the listener expects one every 200 ms.
    let server = FaultServer::start().await;
    let cache = cache(vec![server.url()]);
    let l = listener(vec![server.url()]).heartbeat_interval(Duration::from_millis(200)).spawn(&cache).unwrap();
    eventually("connected", || l.is_connected()).await;
    eventually("declared dead and reconnected", || l.reconnects() >= 1).await;

    // With heartbeats arriving in time, the stream stays up.
    let server = FaultServer::start_with_heartbeat(Duration::from_millis(100)).await;
    let cache = self::cache(vec![server.url()]);
    let l = listener(vec![server.url()]).heartbeat_interval(Duration::from_millis(200)).spawn(&cache).unwrap();
    eventually("connected", || l.is_connected()).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(l.reconnects(), 0);
}

#[tokio::test]
async fn the_listener_fails_over_to_the_next_url() {
    let a = FaultServer::start().await;
    let b = FaultServer::start().await;
    let key = ApiKey::generate("kg").unwrap();
    a.add_key(&key, "key_1", &[]);
    b.add_key(&key, "key_1", &[]);
    let cache = cache(vec![a.url(), b.url()]);
    let l = listener(vec![a.url(), b.url()]).spawn(&cache).unwrap();
    eventually("connected to a", || l.is_connected() && l.current_endpoint() == 0).await;
    a.stop();
    eventually("connected to b", || l.is_connected() && l.current_endpoint() == 1).await;
    cache.verify(&key).await.unwrap();
    b.revoke(&key, "key_1");
    poll_until(Duration::from_secs(1), || async { refused(&cache.verify(&key).await) }).await;
}

#[tokio::test]
async fn overlong_lines_end_the_connection() {
    let server = FaultServer::start().await;
    let cache = cache(vec![server.url()]);
    let l = listener(vec![server.url()]).max_line_bytes(1024).spawn(&cache).unwrap();
    eventually("connected", || l.is_connected()).await;
    server.send_raw(&format!("data: {}\n\n", "x".repeat(4096)));
    eventually("reconnected", || l.reconnects() >= 1).await;
}

#[tokio::test]
async fn the_listener_stops_on_shutdown_drop_or_when_the_verifier_is_gone() {
    let server = FaultServer::start().await;
    let cache = cache(vec![server.url()]);

    let l = listener(vec![server.url()]).spawn(&cache).unwrap();
    eventually("connected", || l.is_connected()).await;
    tokio::time::timeout(LIMIT, l.shutdown()).await.expect("shutdown hung");

    let l = listener(vec![server.url()]).spawn(&cache).unwrap();
    eventually("connected", || l.is_connected()).await;
    drop(cache);
    eventually("finished after the verifier was dropped", || l.is_finished()).await;
    assert!(!l.is_connected());

    // A wrong token never connects, and keeps trying with backoff.
    let cache = self::cache(vec![server.url()]);
    let l = RevocationListener::builder(server.url())
        .service_token("wrong")
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .spawn(&cache)
        .unwrap();
    eventually("several failures", || l.stats().connect_failures >= 3).await;
    assert_eq!(l.stats().connects, 0);
    drop(l);
}

#[test]
fn spawning_outside_a_runtime_is_an_error() {
    let cache = cache(vec!["http://127.0.0.1:9".into()]);
    assert_eq!(
        RevocationListener::builder("http://127.0.0.1:9").service_token(TOKEN).spawn(&cache).unwrap_err(),
        keygate::RemoteConfigError::NoRuntime
    );
}
