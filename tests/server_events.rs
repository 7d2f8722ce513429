//! `GET /v1/events`: admin changes reach connected subscribers; lagging subscribers
//! are told to reset; heartbeats; dropping streams on demand.

mod server_support;

use std::time::Duration;

use keygate::client::KeyPatch;
use serde_json::json;
use server_support::{Events, TestServer, new_key};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn admin_changes_are_published_after_commit() {
    let t = TestServer::start().await;
    let mut events = Events::connect(&t).await;
    let k = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();

    t.admin.revoke(&k.key_id).await.unwrap();
    assert_eq!(events.next_change(WAIT).await.unwrap(), ("revoked".into(), json!({ "key_id": k.key_id })));

    // Defining a role no key holds yet publishes nothing.
    t.admin.put_role("ops", ["a:b"]).await.unwrap();
    let k2 = t
        .admin
        .create_key(keygate::client::NewKey { roles: vec!["ops".into()], ..new_key("acme", &["a:b"]) })
        .await
        .unwrap();
    t.admin.update_key(&k2.key_id, &KeyPatch { disabled: Some(true), ..Default::default() }).await.unwrap();
    assert_eq!(events.next_change(WAIT).await.unwrap(), ("updated".into(), json!({ "key_id": k2.key_id })));
    t.admin.rotate(&k2.key_id, 10).await.unwrap();
    assert_eq!(events.next_change(WAIT).await.unwrap(), ("rotated".into(), json!({ "key_id": k2.key_id })));
    // A role change is an update of every key holding it (the revoked one is left out).
    t.admin.put_role("ops", ["deploy:run"]).await.unwrap();
    assert_eq!(events.next_change(WAIT).await.unwrap(), ("updated".into(), json!({ "key_id": k2.key_id })));
    // A refused change, and revoking a revoked key again, publish nothing: the next
    // event is the heartbeat-free next change.
    assert!(t.admin.rotate(&k.key_id, 0).await.is_err());
    assert!(t.admin.revoke_key(&k.key_id).await.unwrap().already_revoked);
    t.admin.revoke(&k2.key_id).await.unwrap();
    assert_eq!(events.next_change(WAIT).await.unwrap(), ("revoked".into(), json!({ "key_id": k2.key_id })));
    assert_eq!(t.server.stats().event_subscribers, 1);
}

#[tokio::test]
async fn heartbeats_and_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestServer::start_in(dir, |b| b.heartbeat(Duration::from_millis(200))).await;
    let mut events = Events::connect(&t).await;
    let (name, data) = events.next(WAIT).await.unwrap();
    assert_eq!(name, "heartbeat");
    assert!(data.contains("\"at\""));
    t.server.disconnect_event_streams();
    // The stream ends (after at most the events already in flight).
    let mut ended = false;
    for _ in 0..5 {
        if events.next(WAIT).await.is_none() {
            ended = true;
            break;
        }
    }
    assert!(ended, "stream ended");
    assert!(server_support::eventually(WAIT, || async { t.server.stats().event_subscribers == 0 }).await);
    // A new subscriber is served as before.
    let mut again = Events::connect(&t).await;
    assert_eq!(again.next(WAIT).await.unwrap().0, "heartbeat");
}

/// A subscriber whose stream is not polled while events pile up (over a network,
/// socket buffers hide this, so the hub is driven directly).
#[tokio::test]
async fn a_lagging_subscriber_is_told_to_reset() {
    use axum::response::IntoResponse;
    use http_body_util::BodyExt;
    use keygate::server::EventHub;
    use keygate::wire::KeyEvent;

    let hub = EventHub::new(4, Duration::from_secs(60));
    let stream = hub.subscribe();
    for i in 0..10 {
        hub.key(KeyEvent::Updated, &format!("key_{i}"));
    }
    let mut body = axum::response::Sse::new(stream).into_response().into_body();
    let mut text = String::new();
    while !text.contains("key_9") {
        let frame = tokio::time::timeout(WAIT, body.frame()).await.unwrap().unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&frame.into_data().unwrap()));
    }
    let reset = text.find("event: reset\ndata: {\"missed\":6,\"reason\":\"lagged\"}").expect(&text);
    // Never silently lost: the reset comes before the first event after the gap, and
    // nothing older than the buffer is delivered.
    assert!(reset < text.find("key_6").unwrap());
    assert!(!text.contains("key_5"));
    assert_eq!(hub.subscribers(), 1);
    drop(body);
    assert_eq!(hub.subscribers(), 0);
}
