//! `examples/introspection.rs` as a user runs it: its listener bounds header reads like
//! every listener the crate ships (a half-sent request's connection is closed), still
//! serves whole requests, and stops on SIGTERM.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(20);

/// The example's binary, which `cargo test --all-features` builds next to this test.
/// `None` when the test was run alone (`--test`), without it.
fn example_binary() -> Option<PathBuf> {
    let deps = std::env::current_exe().unwrap().parent()?.to_path_buf();
    let path = deps.parent()?.join("examples").join("introspection");
    path.exists().then_some(path)
}

/// The running example; killed if the test fails before stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_introspection_example_closes_a_connection_that_never_finishes_its_headers() {
    let Some(binary) = example_binary() else {
        eprintln!(
            "SKIPPED: examples/introspection is not built; run `cargo test --all-features` without --test, or `cargo build --features introspection --example introspection` first"
        );
        return;
    };
    // Nothing listens at the endpoint: `/health` and the header timeout need no token
    // ever to be introspected.
    let mut child = Command::new(binary)
        .args(["--endpoint", "http://127.0.0.1:9/introspect", "--client-id", "api", "--listen", "127.0.0.1:0"])
        .args(["--header-read-timeout-ms", "300"])
        .env("INTROSPECTION_CLIENT_SECRET", "not-a-real-secret")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the example starts");
    let stdout = child.stdout.take().unwrap();
    let mut app = Running(child);
    // Read the first line on a thread so that a silent child cannot hang the test.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    let line = rx.recv_timeout(LIMIT).expect("the example prints its address");
    let addr = line.strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected first line: {line}")).to_owned();

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
    let res = tokio::time::timeout(LIMIT, reqwest::get(format!("http://{addr}/health"))).await.unwrap().unwrap();
    assert_eq!((res.status().as_u16(), res.text().await.unwrap().as_str()), (200, "ok"));

    let status = Command::new("kill").args(["-TERM", &app.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = app.0.try_wait().unwrap() {
            break exit;
        }
        assert!(started.elapsed() < LIMIT, "the example did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit:?}");
}
