//! Verify throughput of the reference key service: `POST /v1/keys/verify` over HTTP/1.1
//! on loopback, against a SQLite file holding 1 000 keys, with 32 concurrent clients;
//! and the store's digest lookup alone. Prints verifies per second.
//!
//! `cargo bench --bench verify_throughput` (set `VERIFY_BENCH_SECS` to change the 3 s run).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keygate::client::{AdminClient, NewKey};
use keygate::server::KeyServer;

const KEYS: usize = 1000;
const CONCURRENCY: usize = 32;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let secs: u64 = std::env::var("VERIFY_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let server = KeyServer::builder()
        .database(format!("sqlite://{}", dir.path().join("bench.db").display()))
        .service_token("svc-bench-0123456789abcdefghijklmnop")
        .admin_token("adm-bench-0123456789abcdefghijklmnop")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .start()
        .await
        .expect("server");
    let admin = AdminClient::new(server.url(), "adm-bench-0123456789abcdefghijklmnop").expect("client");
    admin.put_role("reader", ["reports:read", "dashboards:read"]).await.expect("role");
    let mut keys = Vec::with_capacity(KEYS);
    for i in 0..KEYS {
        let new = NewKey {
            owner: format!("owner{}", i % 50),
            name: format!("key {i}"),
            scopes: vec!["billing:read".into()],
            roles: vec!["reader".into()],
            ..Default::default()
        };
        keys.push(admin.create_key(new).await.expect("create").key.expose_secret().to_owned());
    }
    let keys = Arc::new(keys);

    // The store alone.
    let store = server.state().store().clone();
    let digests: Vec<_> = keys.iter().map(|k| keygate::KeyDigest::of(k.as_bytes())).collect();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        for d in digests.iter().take(100) {
            assert!(store.find_by_digest(d).await.expect("lookup").is_some());
            n += 1;
        }
    }
    let store_rate = n as f64 / start.elapsed().as_secs_f64();

    // Over HTTP.
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let url = format!("{}/v1/keys/verify", server.url());
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|w| {
            let (keys, done, url) = (keys.clone(), done.clone(), url.clone());
            tokio::spawn(async move {
                let http =
                    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
                // The middleware sends the key's digest, never the key.
                let digests: Vec<String> =
                    keys.iter().map(|k| keygate::ApiKey::new(k.to_string()).digest().to_hex()).collect();
                let mut i = w;
                while Instant::now() < deadline {
                    let body = format!("{{\"digest\":\"{}\"}}", digests[i % digests.len()]);
                    let res = http
                        .post(&url)
                        .bearer_auth("svc-bench-0123456789abcdefghijklmnop")
                        .body(body)
                        .send()
                        .await
                        .expect("verify");
                    assert!(res.status().is_success());
                    let answer = res.bytes().await.expect("body");
                    assert!(answer.starts_with(b"{\"valid\":true"));
                    done.fetch_add(1, Ordering::Relaxed);
                    i += CONCURRENCY;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("worker");
    }
    let http_rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    println!("verify_throughput/store_lookup: {store_rate:.0} lookups/s (one task, SQLite file, {KEYS} keys)");
    println!(
        "verify_throughput/http: {http_rate:.0} verifies/s ({CONCURRENCY} concurrent clients, loopback, HTTP/1.1, {KEYS} keys, 1 role)"
    );
    assert_eq!(server.stats().verify_calls, done.load(Ordering::Relaxed));
    server.shutdown().await;
}
