//! The operator's commands around a running key service, run as the built binary:
//! `backup` (a consistent copy while writes go on, restored by starting a server on
//! it), `healthcheck` (what the container image's HEALTHCHECK runs), `serve
//! --metrics-listen`, and the systemd unit's start command with its credential files.

mod server_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use keygate::client::AdminClient;
use server_support::{ADMIN, TestDb, TestServer, new_key};

const BIN: &str = env!("CARGO_BIN_EXE_keygate-server");
const LIMIT: Duration = Duration::from_secs(30);

async fn run(args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(BIN).args(args).stdin(Stdio::null()).output();
    tokio::time::timeout(LIMIT, out).await.expect("the command ends in time").expect("the binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_during_writes_is_consistent_and_a_server_on_it_verifies_the_keys() {
    let t = TestServer::start().await;
    let mut before = Vec::new();
    for i in 0..5 {
        before.push(t.admin.create_key(new_key(&format!("owner{i}"), &["a:read"])).await.unwrap());
    }
    t.admin.revoke(&before[4].key_id).await.unwrap();

    // A writer creating keys until told to stop (bounded either way).
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let admin = AdminClient::new(t.server.url(), ADMIN).unwrap();
        let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
        tokio::spawn(async move {
            for i in 0..2_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                admin.create_key(new_key(&format!("busy{i}"), &["b:write"])).await.unwrap();
                written.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let started = tokio::time::Instant::now();
    while written.load(Ordering::Relaxed) < 3 {
        assert!(started.elapsed() < LIMIT, "the writer makes progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let out_dir = tempfile::tempdir().unwrap();
    // The name the test server helper opens in a directory.
    let copy = out_dir.path().join("keys.db");
    let copy_arg = copy.to_str().unwrap();
    let out = run(&["backup", "--database", &t.db.url(), "--to", copy_arg]).await;
    assert!(out.status.success(), "backup failed: {}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("backed up "), "{}", text(&out.stdout));
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let total = 5 + written.load(Ordering::Relaxed);

    // Refused without --force, and the copy is left as it was.
    let bytes = std::fs::read(&copy).unwrap();
    let out = run(&["backup", "--database", &t.db.url(), "--to", copy_arg]).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("exists"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&copy).unwrap(), bytes);
    let leftovers: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, [std::ffi::OsString::from("keys.db")], "no partial file left behind");

    // The copy is one moment of the store: every key has its secret and its create
    // record, whatever was being written.
    let check = keygate::server::SqliteStore::open(&format!("sqlite://{copy_arg}")).await.unwrap();
    let count = |sql: &'static str| {
        let pool = check.pool().clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.unwrap() }
    };
    let keys = count("SELECT count(*) FROM keys").await;
    assert!(keys >= 5 && keys as usize <= total, "{keys} keys of {total}");
    assert_eq!(count("SELECT count(DISTINCT key_id) FROM key_secrets").await, keys);
    assert_eq!(count("SELECT count(*) FROM audit WHERE action = 'key.create'").await, keys);
    check.close().await;

    // A server started on the copy: the keys verify as they did.
    let restored = TestServer::start_on(TestDb::Sqlite(Arc::new(out_dir)), |b| b).await;
    for k in &before[..4] {
        assert_eq!(restored.code(k.key.expose_secret()).await, "VALID");
    }
    assert_eq!(restored.code(before[4].key.expose_secret()).await, "REVOKED");
    drop(restored);

    // --force replaces the copy (a newer one: every key written by now).
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("copy.db");
    std::fs::write(&again, b"old").unwrap();
    let out = run(&["backup", "--database", &t.db.url(), "--to", again.to_str().unwrap(), "--force"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("backed up {total} keys")), "{}", text(&out.stdout));
}

#[tokio::test]
async fn backup_refuses_what_it_cannot_copy() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("x.db");
    let to = to.to_str().unwrap();
    let pg = run(&["backup", "--database", "postgres://u@127.0.0.1:1/db", "--to", to]).await;
    assert!(!pg.status.success());
    assert!(text(&pg.stderr).contains("pg_dump"), "{}", text(&pg.stderr));
    let memory = run(&["backup", "--database", "sqlite::memory:", "--to", to]).await;
    assert!(!memory.status.success());
    let missing = dir.path().join("missing.db");
    let out = run(&["backup", "--database", &format!("sqlite://{}", missing.display()), "--to", to]).await;
    assert!(!out.status.success());
    assert!(!missing.exists(), "a mistyped source is not created");
    assert!(!dir.path().join("x.db").exists());
}

#[tokio::test]
async fn healthcheck_exits_0_on_a_healthy_service_and_fails_otherwise() {
    let t = TestServer::start().await;
    let ok = run(&["healthcheck", "--url", &t.url("/healthz")]).await;
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert_eq!(text(&ok.stdout).trim(), "ok");

    let not_health = run(&["healthcheck", "--url", &t.url("/no-such-route")]).await;
    assert!(!not_health.status.success());
    assert!(text(&not_health.stderr).contains("404"), "{}", text(&not_health.stderr));

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let down = run(&["healthcheck", "--url", &format!("http://127.0.0.1:{port}/healthz"), "--timeout-s", "2"]).await;
    assert!(!down.status.success());
    assert!(text(&down.stderr).starts_with("error: unhealthy"), "{}", text(&down.stderr));
}

#[test]
fn serve_with_metrics_listen_names_and_serves_the_metrics_address() {
    let mut child = Command::new(BIN)
        .args(["serve", "--db", "sqlite::memory:", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env("KEYGATE_SERVICE_TOKEN", "svc-metrics-flag-0123456789abcdefghij")
        .env("KEYGATE_ADMIN_TOKEN", "adm-metrics-flag-0123456789abcdefghij")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().take(100) {
            let Ok(line) = line else { break };
            if let Some(url) = line.strip_prefix("keygate-server metrics on ") {
                let _ = tx.send(url.to_owned());
                break;
            }
        }
    });
    let url = rx.recv_timeout(LIMIT);
    let body = url.as_ref().ok().map(|url| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
    });
    let _ = child.kill();
    let _ = child.wait();
    let url = url.expect("serve names its metrics address");
    assert!(url.starts_with("http://127.0.0.1:") && url.ends_with("/metrics"), "{url}");
    let body = body.unwrap();
    assert!(body.contains("keygate_server_verify_requests_total{outcome=\"valid\"} 0"), "{body}");
}

const UNIT: &str = include_str!("../deploy/keygate-server.service");

/// The values of a key of the unit's `[Service]` section, in order.
fn unit_values(key: &str) -> Vec<&'static str> {
    UNIT.lines().filter_map(|l| l.strip_prefix(key)?.strip_prefix('=')).collect()
}

/// The `ExecStart=` of deploy/keygate-server.service as systemd runs it: split on
/// spaces (it has no quoting), `%d` the credentials directory, the binary the one built
/// here.
fn unit_start_command(credentials: &std::path::Path) -> Vec<String> {
    let line = unit_values("ExecStart");
    assert_eq!(line.len(), 1, "one ExecStart=");
    let mut words: Vec<String> =
        line[0].split_whitespace().map(|w| w.replace("%d", credentials.to_str().unwrap())).collect();
    assert_eq!(words[0], "/usr/local/bin/keygate-server", "the unit runs the server itself, no shell");
    words[0] = BIN.to_owned();
    words
}

#[test]
fn the_systemd_unit_runs_no_shell_and_keeps_tokens_out_of_the_environment() {
    let credentials = unit_values("LoadCredential");
    assert_eq!(credentials, ["admin-token:/etc/keygate/admin-token", "service-token:/etc/keygate/service-token"]);
    let start = unit_values("ExecStart").join(" ");
    assert!(start.contains("--admin-token-file %d/admin-token"), "{start}");
    assert!(start.contains("--service-token-file %d/service-token"), "{start}");
    assert!(!UNIT.contains("/bin/sh") && !UNIT.contains("CREDENTIALS_DIRECTORY"), "no shell copies a credential");
    for env in unit_values("Environment") {
        assert!(!env.contains("TOKEN"), "a token variable in the unit: {env}");
    }
}

#[tokio::test]
async fn the_systemd_units_command_hands_the_credential_files_to_the_server() {
    let credentials = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let admin = "adm-from-a-credential-file-0123456789abcdef";
    let service = "svc-from-a-credential-file-0123456789abcdef";
    std::fs::write(credentials.path().join("admin-token"), format!("{admin}\n")).unwrap();
    std::fs::write(credentials.path().join("service-token"), format!("{service}\n")).unwrap();
    let words = unit_start_command(credentials.path());
    let mut command = tokio::process::Command::new(&words[0]);
    command.args(&words[1..]).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for env in unit_values("Environment") {
        let (name, value) = env.split_once('=').expect("Environment=NAME=VALUE");
        command.env(name, value);
    }
    // The unit's environment, but a database of this test's and ephemeral ports. A
    // persistent database: without the credential files, the server refuses to start.
    let db = format!("sqlite://{}", state.path().join("keygate.db").display());
    let mut child = command
        .env("KEYGATE_DB", db)
        .env("KEYGATE_LISTEN", "127.0.0.1:0")
        .env("KEYGATE_METRICS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let mut seen = Vec::new();
    let url = tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("keygate-server listening on ") {
                return Some(url.to_owned());
            }
            seen.push(line);
        }
        None
    })
    .await
    .expect("the server starts in time");
    let url = url.unwrap_or_else(|| panic!("the server did not start: {seen:#?}"));
    let keys = AdminClient::new(&url, admin).unwrap().list_keys(None).await.expect("the admin token of the file works");
    assert!(keys.is_empty());
    let verify = reqwest::Client::new()
        .post(format!("{url}/v1/keys/verify"))
        .bearer_auth(service)
        .json(&serde_json::json!({ "key": "kg_nosuchkey" }))
        .send()
        .await
        .unwrap();
    assert_eq!(verify.status(), 200, "the service token of the file works");
    let _ = child.kill().await;
}
