//! Edges found by attacking a running key service: the cap on event-stream subscribers,
//! connections that never finish their headers or their body, and admin text with
//! invisible or bidirectional-override characters.

mod server_support;

use std::time::Duration;

use keygate::client::{ClientError, NewKey};
use keygate::server::KeyServer;
use server_support::{ADMIN, Events, SERVICE, TestDb, TestServer, eventually, new_key};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn event_subscribers_are_capped_and_the_count_drops_when_a_stream_ends() {
    // A short heartbeat: a stream whose client left is noticed at the next write.
    let t = TestServer::start_on(TestDb::sqlite(), |b: KeyServer| {
        b.max_event_subscribers(3).heartbeat(Duration::from_millis(100))
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(Events::connect(&t).await);
    }
    assert_eq!(t.server.stats().event_subscribers, 3);

    let refused = t.http.get(t.url("/v1/events")).bearer_auth(SERVICE).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    let retry: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "{retry}");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "too_many_subscribers");
    assert!(body["message"].as_str().unwrap().contains('3'), "{body}");
    assert_eq!(t.server.stats().event_subscribers, 3, "a refused stream is not counted");
    assert_eq!(t.server.stats().event_subscribers_refused, 1);

    drop(open.pop());
    assert!(
        eventually(Duration::from_secs(10), || async { t.server.stats().event_subscribers == 2 }).await,
        "the closed stream still counts: {}",
        t.server.stats().event_subscribers
    );
    let mut again = Events::connect(&t).await;
    assert_eq!(again.next(Duration::from_secs(5)).await.unwrap().0, "heartbeat");
    assert_eq!(t.server.stats().event_subscribers, 3);
}

/// Reads until the server closes the connection; what it sent, or `None` if it is still
/// open after `limit`.
async fn until_closed(conn: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 1024];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.ok()?;
    Some(got)
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_headers_is_closed() {
    let t =
        TestServer::start_on(TestDb::sqlite(), |b: KeyServer| b.header_read_timeout(Duration::from_millis(300))).await;
    let mut conn = tokio::net::TcpStream::connect(t.server.addr()).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: keygate\r\nX-Half: ").await.unwrap();
    let got = until_closed(&mut conn, Duration::from_secs(10)).await;
    let got = got.expect("the half-sent request's connection is still open after 10 s");
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"), "answered a half-sent request");

    // A whole request on a fresh connection is still served.
    let res = t.http.get(t.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_body_that_stops_arriving_fails_the_request() {
    let t =
        TestServer::start_on(TestDb::sqlite(), |b: KeyServer| b.request_body_timeout(Duration::from_millis(300))).await;
    let mut conn = tokio::net::TcpStream::connect(t.server.addr()).await.unwrap();
    let head = format!(
        "POST /v1/keys HTTP/1.1\r\nHost: keygate\r\nAuthorization: Bearer {ADMIN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"owner\":"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("no answer 10 s after the body stopped")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    assert!(t.admin.list_keys(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn admin_text_with_invisible_or_bidi_characters_is_refused_precisely() {
    let t = TestServer::start().await;
    let refused = |e: ClientError| match e {
        ClientError::Api { status, message, .. } => (status, message),
        other => panic!("{other}"),
    };
    let e = t.admin.create_key(new_key("adm\u{202e}ni\u{200b}", &["a:b"])).await.unwrap_err();
    assert_eq!(refused(e), (400, "owner: U+202E (right-to-left override) at char 3 is not allowed".into()));
    let e = t.admin.create_key(NewKey { name: "ci\u{00ad}".into(), ..new_key("acme", &["a:b"]) }).await.unwrap_err();
    assert_eq!(refused(e), (400, "name: U+00AD (soft hyphen) at char 2 is not allowed".into()));
    let e = t
        .admin
        .create_key(NewKey { meta: Some(serde_json::json!({ "team": "\u{2066}blue" })), ..new_key("acme", &["a:b"]) })
        .await
        .unwrap_err();
    assert_eq!(refused(e), (400, "meta.team: U+2066 (left-to-right isolate) at char 0 is not allowed".into()));
    // And on update.
    let k = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let patch = keygate::client::KeyPatch { name: Some("x\u{feff}".into()), ..Default::default() };
    let e = t.admin.update_key(&k.key_id, &patch).await.unwrap_err();
    assert_eq!(refused(e), (400, "name: U+FEFF (zero width no-break space) at char 1 is not allowed".into()));
    // Ordinary non-ASCII text is fine.
    t.admin.create_key(new_key("Müller & Söhne 東京", &["a:b"])).await.unwrap();
    assert_eq!(t.admin.list_keys(None).await.unwrap().len(), 2);
}

/// More verifications at once than `max_concurrent_verifies` are shed with a fast 503
/// `overloaded` and `Retry-After`, not queued; the ones in progress finish normally. The
/// verifications are held inside the store by a lock on the keys table (PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifications_past_the_cap_are_shed_at_once() {
    use sqlx::Connection;
    let Some(db) = TestDb::postgres().await else { return };
    let TestDb::Postgres(schema) = &db else { unreachable!() };
    let t = TestServer::start_on(db.clone(), |b: KeyServer| b.max_concurrent_verifies(2)).await;
    let key = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let digest = keygate::ApiKey::new(key.key.expose_secret().to_owned()).digest().to_hex();
    let verify = || {
        let req =
            t.http.post(t.url("/v1/keys/verify")).bearer_auth(SERVICE).json(&serde_json::json!({ "digest": digest }));
        async move { req.send().await.unwrap() }
    };
    assert_eq!(verify().await.status(), 200);

    let mut lock = schema.admin_connection().await;
    let mut tx = lock.begin().await.unwrap();
    sqlx::query(&format!("LOCK TABLE {}.keys IN ACCESS EXCLUSIVE MODE", schema.name)).execute(&mut *tx).await.unwrap();
    let before = t.server.stats().verify_calls;
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(verify())).collect();
    // Counted once a slot is taken: both slots are, and the two wait on the lock.
    assert!(eventually(Duration::from_secs(10), || async { t.server.stats().verify_calls == before + 2 }).await);
    let shed = verify().await;
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers()["retry-after"], "1");
    let body: serde_json::Value = shed.json().await.unwrap();
    assert_eq!(body["error"], "overloaded");
    assert_eq!(t.server.stats().verify_shed, 1);
    assert!(held.iter().all(|h| !h.is_finished()), "the two in progress still wait");

    tx.rollback().await.unwrap();
    for h in held {
        let res = tokio::time::timeout(Duration::from_secs(10), h).await.expect("answered").unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(verify().await.status(), 200, "the slots are free again");
}

#[tokio::test]
async fn a_zero_verify_cap_is_refused_at_start() {
    let err = KeyServer::builder()
        .database(TestDb::sqlite().url())
        .service_token(SERVICE)
        .admin_token(ADMIN)
        .listen("127.0.0.1:0".parse().unwrap())
        .max_concurrent_verifies(0)
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_concurrent_verifies"), "{err}");
}
