//! `examples/protected.rs` as a user runs it: the compiled example as its own process,
//! against the real key service on loopback. Its routes, its JSON, instant revocation
//! through the event stream, and a graceful stop on SIGTERM that delivers the usage.

#![cfg(unix)]

mod server_support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keygate::client::NewKey;
use serde_json::Value;
use server_support::{SERVICE, TestServer};

const LIMIT: Duration = Duration::from_secs(20);

/// The example's binary, which `cargo test` builds next to this test (every example is
/// built for a test run). `None` when the test was run alone (`--test`), without it.
fn example_binary() -> Option<PathBuf> {
    // target/<profile>/deps/example_protected-<hash> → target/<profile>/examples/protected
    let deps = std::env::current_exe().unwrap().parent()?.to_path_buf();
    let path = deps.parent()?.join("examples").join("protected");
    path.exists().then_some(path)
}

/// The running example; killed if the test fails before stopping it.
struct Protected {
    child: Child,
    url: String,
}

impl Protected {
    fn start(binary: PathBuf, key_service: &str) -> Self {
        Self::start_with(binary, key_service, &[])
    }

    fn start_with(binary: PathBuf, key_service: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(binary)
            .args(["--key-service", key_service, "--service-token", SERVICE, "--listen", "127.0.0.1:0"])
            .args(extra)
            .args(["--cache-ttl", "600"])
            // Usage goes out only on the way out, so the test knows when to look.
            .args(["--usage-interval-ms", "600000"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the example starts");
        // The first line on stdout names the address; read it on a thread so that a
        // silent child cannot hang the test.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx.recv_timeout(LIMIT).expect("the example prints its address");
        let addr = line.strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line: {line}"));
        Self { child, url: format!("http://{addr}") }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < LIMIT, "the example did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Protected {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn new_key(scopes: &[&str], roles: &[&str]) -> NewKey {
    NewKey {
        owner: "acme".into(),
        name: "example".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        roles: roles.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let res = tokio::time::timeout(LIMIT, req.send()).await.expect("request hung").unwrap();
    let status = res.status().as_u16();
    let body = res.text().await.unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protected_example_serves_its_routes_and_stops_on_sigterm() {
    let Some(binary) = example_binary() else {
        // Cargo holds its build lock while tests run, so the test cannot build it itself.
        eprintln!(
            "SKIPPED: examples/protected is not built; run `cargo test` without --test, or `cargo build --example protected` first"
        );
        return;
    };
    let ks = TestServer::start().await;
    let reader = ks.admin.create_key(new_key(&["reports:read"], &[])).await.unwrap();
    let writer = ks.admin.create_key(new_key(&["reports:read", "reports:write"], &[])).await.unwrap();
    ks.admin.put_role("admin", Vec::<String>::new()).await.unwrap();
    let admin = ks.admin.create_key(new_key(&[], &["admin"])).await.unwrap();

    let mut app = Protected::start(binary, &ks.server.url());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let get = |path: &str, key: Option<&keygate::ApiKey>| {
        let req = http.get(format!("{}{path}", app.url));
        match key {
            Some(k) => req.bearer_auth(k.expose_secret()),
            None => req,
        }
    };

    let (status, body) = send(get("/health", None)).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));

    let (status, body) = send(get("/reports", Some(&reader.key))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["caller"]["key_id"], reader.key_id.as_str());
    assert_eq!(body["caller"]["owner"], "acme");

    let post = |key: &keygate::ApiKey| http.post(format!("{}/reports", app.url)).bearer_auth(key.expose_secret());
    let (status, _) = send(post(&reader.key)).await;
    assert_eq!(status, 403, "reports:read cannot write");
    let (status, body) = send(post(&writer.key)).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["caller"]["key_id"], writer.key_id.as_str());

    assert_eq!(send(get("/admin", Some(&reader.key))).await.0, 403);
    let (status, body) = send(get("/admin", Some(&admin.key))).await;
    assert_eq!((status, body["caller"]["key_id"].as_str()), (200, Some(admin.key_id.as_str())));

    assert_eq!(send(get("/reports", None)).await.0, 401);
    assert_eq!(send(get("/reports", Some(&keygate::ApiKey::new("kg_garbage")))).await.0, 401);

    // Revoked at the key service: refused within a second although the example caches
    // verdicts for ten minutes.
    ks.admin.revoke(&reader.key_id).await.unwrap();
    let started = Instant::now();
    loop {
        let (status, _) = send(get("/reports", Some(&reader.key))).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 200);
        assert!(started.elapsed() < Duration::from_secs(1), "revocation not seen within 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // N requests, then SIGTERM: the usage interval has not come round, so everything the
    // key service learns it learns on the way out.
    const N: u64 = 137;
    for _ in 0..N {
        assert_eq!(send(get("/reports", Some(&writer.key))).await.0, 200);
    }
    let before = ks.admin.usage(&writer.key_id, None).await.unwrap();
    assert_eq!(before.buckets.iter().map(|b| b.requests).sum::<u64>(), 0, "nothing exported before the interval");

    let status = tokio::task::spawn_blocking(move || {
        let status = app.terminate();
        drop(app);
        status
    })
    .await
    .unwrap();
    assert!(status.success(), "graceful stop exits 0, got {status}");
    let after = ks.admin.usage(&writer.key_id, None).await.unwrap();
    let (requests, allowed) = after.buckets.iter().fold((0, 0), |(r, a), b| (r + b.requests, a + b.allowed));
    // The N reads and the one write earlier.
    assert_eq!((requests, allowed), (N + 1, N + 1), "usage flushed on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_protected_example_closes_a_connection_that_never_finishes_its_headers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(binary) = example_binary() else {
        eprintln!(
            "SKIPPED: examples/protected is not built; run `cargo test` without --test, or `cargo build --example protected` first"
        );
        return;
    };
    let ks = TestServer::start().await;
    let mut app = Protected::start_with(binary, &ks.server.url(), &["--header-read-timeout-ms", "300"]);
    let addr = app.url.strip_prefix("http://").unwrap().to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: example\r\nX-Half: ").await.unwrap();
    let closed = tokio::time::timeout(LIMIT, async {
        let mut buf = [0u8; 512];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the half-sent request's connection is still open after {LIMIT:?}");
    // Whole requests are still served.
    let (status, _) = send(reqwest::Client::new().get(format!("{}/health", app.url))).await;
    assert_eq!(status, 200);
    assert!(app.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_redis_share_fifty_credits_exactly() {
    let Some(binary) = example_binary() else {
        eprintln!("SKIPPED: examples/protected is not built; run `cargo test` without --test");
        return;
    };
    let Some(redis) = std::env::var("KEYGATE_TEST_REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        eprintln!("skipped: set KEYGATE_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379) to run the example with --redis");
        return;
    };
    let ks = TestServer::start().await;
    let credits = keygate::quota::Credits { remaining: 50, refill: None };
    let key = ks.admin.create_key(NewKey { credits: Some(credits), ..new_key(&["reports:read"], &[]) }).await.unwrap();
    let prefix = format!("kgtest:{:016x}:", fastrand::u64(..));
    let flags = ["--redis", &redis, "--strict-credits", "--redis-prefix", &prefix, "--expected-instances", "2"];
    let mut apps = [
        Protected::start_with(binary.clone(), &ks.server.url(), &flags),
        Protected::start_with(binary, &ks.server.url(), &flags),
    ];
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    // 200 requests, alternately to each instance, 20 at a time.
    let mut allowed = 0;
    for round in 0..10 {
        let mut batch = Vec::new();
        for i in 0..20 {
            let url = format!("{}/reports", apps[(round * 20 + i) % 2].url);
            batch.push(send(http.get(url).bearer_auth(key.key.expose_secret())));
        }
        for (status, body) in futures_util::future::join_all(batch).await {
            match status {
                200 => allowed += 1,
                429 => assert_eq!(body["code"], "usage_exceeded"),
                other => panic!("unexpected {other}: {body}"),
            }
        }
    }
    assert_eq!(allowed, 50, "two instances, one count of 50 credits");
    for app in &mut apps {
        assert!(app.terminate().success());
    }
}
