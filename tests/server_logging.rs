//! `keygate-server serve`'s log as an operator sees it: the built binary as its own
//! process, its stderr read line by line up to the line that names its address.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(30);

/// Starts `serve` on an in-memory store with `log_format` and `rust_log`, and returns
/// its stderr lines up to (without) `keygate-server listening on …`.
fn log_until_listening(log_format: &str, rust_log: Option<&str>) -> Vec<String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate-server"));
    cmd.args(["serve", "--db", "sqlite::memory:", "--listen", "127.0.0.1:0", "--log-format", log_format])
        .env("KEYGATE_SERVICE_TOKEN", "svc-log-test-0123456789abcdefghijklm")
        .env("KEYGATE_ADMIN_TOKEN", "adm-log-test-0123456789abcdefghijklm")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(filter) = rust_log {
        cmd.env("RUST_LOG", filter);
    }
    let mut child = cmd.spawn().expect("keygate-server runs");
    let stderr = child.stderr.take().unwrap();
    // Read on a thread, so that a silent child cannot hang the test.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().take(200) {
            let Ok(line) = line else { break };
            if line.starts_with("keygate-server listening on") {
                break;
            }
            lines.push(line);
        }
        let _ = tx.send(lines);
    });
    let lines = rx.recv_timeout(LIMIT);
    let _ = child.kill();
    let _ = child.wait();
    lines.expect("keygate-server starts and names its address")
}

#[test]
fn json_format_prints_one_object_a_line_and_rust_log_directives_enable_debug() {
    let lines = log_until_listening("json", Some("keygate=debug,sqlx=warn"));
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let has = |level: &str, message: &str| {
        records.iter().any(|r| {
            r["level"] == level
                && r["fields"]["message"] == message
                && r["target"].as_str().is_some_and(|t| t.starts_with("keygate"))
        })
    };
    assert!(has("DEBUG", "key service configured"), "{lines:#?}");
    assert!(has("INFO", "key service listening"), "{lines:#?}");
    assert!(records.iter().all(|r| r["timestamp"].is_string()), "{lines:#?}");
}

#[test]
fn text_format_logs_info_by_default_and_no_debug() {
    let lines = log_until_listening("text", None);
    assert!(lines.iter().any(|l| l.contains("INFO") && l.contains("key service listening")), "{lines:#?}");
    assert!(!lines.iter().any(|l| l.contains("DEBUG") || l.contains("key service configured")), "{lines:#?}");
    assert!(lines.iter().all(|l| serde_json::from_str::<Value>(l).is_err()), "{lines:#?}");
}

#[test]
fn a_directive_for_another_target_leaves_keygate_at_its_own_level() {
    // `keygate=warn` silences keygate's info lines; the bare level `info` would not.
    let lines = log_until_listening("text", Some("info,keygate=warn"));
    assert!(!lines.iter().any(|l| l.contains("key service listening")), "{lines:#?}");
}
