//! The raw key never leaves the middleware: a recording proxy between the one-call
//! production setup (`RemoteAuth`: verifier, event stream, usage export) and the real
//! key service sees every byte sent, and none of it is a key or any part of one's
//! secret, while the key service still verifies and counts every request.

mod server_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::Request;
use keygate::client::UsageQuery;
use keygate::{ApiKey, Principal, RemoteAuth};
use server_support::{SERVICE, TestServer, new_key};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// Most bytes recorded: far more than the test sends, and a bound all the same.
const MAX_RECORDED: usize = 16 << 20;

/// Forwards every connection to `upstream`, keeping what the client sent.
async fn recording_proxy(upstream: std::net::SocketAddr) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sent = Arc::new(Mutex::new(Vec::new()));
    let record = sent.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else { return };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = async {
                    let mut buf = [0u8; 8192];
                    while let Ok(n @ 1..) = client_read.read(&mut buf).await {
                        {
                            let mut sent = record.lock().unwrap();
                            let room = MAX_RECORDED.saturating_sub(sent.len());
                            sent.extend_from_slice(&buf[..n.min(room)]);
                        }
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = server_write.shutdown().await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    let _ = client_write.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    (url, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_to_the_key_service_carries_a_raw_key() {
    let ks = TestServer::start().await;
    let upstream = ks.server.addr();
    let (url, sent) = recording_proxy(upstream).await;
    let good = ks.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let unknown = ApiKey::generate("kg").unwrap();

    let (auth, remote) = RemoteAuth::builder(url.as_str(), SERVICE)
        .cache(|c| c.positive_ttl(Duration::from_millis(50)).negative_ttl(Duration::from_millis(50)))
        .build()
        .unwrap();
    let app = Router::new().route("/r", get(|p: Principal| async move { p.key_id().to_owned() })).layer(auth);
    let call = |key: &ApiKey| {
        let req = Request::get("/r").header("x-api-key", key.expose_secret()).body(Body::empty()).unwrap();
        let app = app.clone();
        async move { app.oneshot(req).await.unwrap().status().as_u16() }
    };
    for _ in 0..5 {
        assert_eq!(call(&good.key).await, 200);
        assert_eq!(call(&unknown).await, 401);
        // Past both TTLs: every round asks the key service again.
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    remote.shutdown().await;

    // The key service did the work: verify calls and the usage it was sent.
    assert!(ks.server.stats().verify_calls >= 10, "{:?}", ks.server.stats().verify_calls);
    let report = ks.admin.usage_report(&UsageQuery::key(&good.info.key_id)).await.unwrap();
    assert_eq!(report.buckets.iter().map(|b| b.requests).sum::<u64>(), 5);

    let sent = sent.lock().unwrap();
    let text = String::from_utf8_lossy(&sent);
    assert!(text.matches("POST /v1/keys/verify").count() >= 10, "the verify calls went through the proxy");
    assert!(text.contains("GET /v1/events"), "so did the event stream");
    assert!(text.contains("POST /v1/usage"), "and the usage export");
    for key in [&good.key, &unknown] {
        let secret = key.expose_secret();
        // The whole key, and its random part alone (what follows the prefix).
        let random = &secret[secret.find('_').unwrap() + 1..];
        assert!(!text.contains(secret) && !text.contains(random), "a raw key crossed the network");
        assert!(text.contains(&key.digest().to_hex()), "what was sent instead: the digest");
    }
}
