//! The `keygate-server` admin commands, run as the real binary against a real key
//! service on 127.0.0.1: exit codes, idempotent revoke, refused input, updates that
//! verify sees, roles delete, alerts ack, environment prefixes, tables and `--json`.

mod server_support;

use std::process::Output;

use keygate::ClientNetwork;
use keygate::server::KeyServer;
use serde_json::Value;
use server_support::{ADMIN, Req, TestDb, TestServer, aggregate, aggregate_batch, this_minute};

/// Runs `keygate-server ARGS --url URL` with the admin token in the environment.
async fn cli_with(url: &str, token: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate-server"));
    cmd.args(args).args(["--url", url]).env("KEYGATE_ADMIN_TOKEN", token).env_remove("KEYGATE_URL");
    tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output()).await.expect("the CLI ends").unwrap()
}

async fn cli(t: &TestServer, args: &[&str]) -> Output {
    cli_with(&t.server.url(), ADMIN, args).await
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command that must succeed and parses its `--json` output.
async fn json(t: &TestServer, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = cli(t, &args).await;
    assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", stdout(&out)))
}

/// Creates a key through the CLI; its JSON (with `key`).
async fn create(t: &TestServer, extra: &[&str]) -> Value {
    let mut args = vec!["keys", "create", "--owner", "acme", "--name", "ci"];
    args.extend_from_slice(extra);
    json(t, &args).await
}

#[tokio::test]
async fn exit_codes_name_the_failure() {
    let t = TestServer::start().await;
    // 3: not found.
    let out = cli(&t, &["keys", "show", "key_doesnotexist"]).await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));
    // 4: refused input (400) and conflict (409).
    let out = cli(&t, &["keys", "create", "--owner", "acme", "--name", "ci", "--scope", "not a scope"]).await;
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let k = create(&t, &["--scope", "a:b"]).await;
    let id = k["key_id"].as_str().unwrap();
    assert_eq!(code(&cli(&t, &["keys", "revoke", id]).await), 0);
    let out = cli(&t, &["keys", "rotate", id]).await;
    assert_eq!(code(&out), 4, "rotating a revoked key is a conflict: {}", stderr(&out));
    assert!(stderr(&out).contains("409"), "{}", stderr(&out));
    // 5: a wrong admin token.
    let out = cli_with(&t.server.url(), "not-the-admin-token", &["keys", "list"]).await;
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    // 6: nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let out = cli_with(&format!("http://{closed}"), ADMIN, &["keys", "list"]).await;
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    // 2: usage, before any request.
    let out = cli(&t, &["keys", "create", "--owner", "acme", "--name", "ci", "--expires-in", "soon"]).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = cli(&t, &["keys", "update", id]).await;
    assert_eq!(code(&out), 2, "an update of nothing: {}", stderr(&out));
    // The codes are documented in --help.
    let help = stdout(&cli(&t, &["--help"]).await);
    for line in ["3  not found", "4  conflict or refused input", "5  unauthorized", "6  unreachable"] {
        assert!(help.contains(line), "--help lacks {line:?}: {help}");
    }
}

#[tokio::test]
async fn revoke_is_idempotent() {
    let t = TestServer::start().await;
    let k = create(&t, &["--scope", "a:b"]).await;
    let id = k["key_id"].as_str().unwrap();
    let first = cli(&t, &["keys", "revoke", id]).await;
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    assert!(stdout(&first).starts_with(&format!("revoked {id}")), "{}", stdout(&first));
    let again = cli(&t, &["keys", "revoke", id]).await;
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    assert!(stdout(&again).contains("already revoked"), "{}", stdout(&again));
    let v = json(&t, &["keys", "revoke", id]).await;
    assert_eq!((v["already_revoked"].clone(), v["revoked"].clone()), (Value::Bool(true), Value::Bool(true)));
    // One audit record, not three.
    let audit = json(&t, &["audit"]).await;
    let revokes = audit.as_array().unwrap().iter().filter(|r| r["action"] == "key.revoke").count();
    assert_eq!(revokes, 1);
    assert_eq!(t.code(k["key"].as_str().unwrap()).await, "REVOKED");
}

#[tokio::test]
async fn unknown_roles_and_empty_keys_are_refused() {
    let t = TestServer::start().await;
    let out = cli(&t, &["keys", "create", "--owner", "acme", "--name", "ci", "--role", "nosuchrole"]).await;
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("role `nosuchrole` does not exist"), "{}", stderr(&out));
    assert_eq!(json(&t, &["keys", "list"]).await, Value::Array(vec![]), "nothing was created");

    let out = cli(&t, &["keys", "create", "--owner", "acme", "--name", "ci"]).await;
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("neither scopes nor roles"), "{}", stderr(&out));
    let empty = create(&t, &["--allow-empty"]).await;
    assert_eq!(t.verify(empty["key"].as_str().unwrap()).await["valid"], true);

    // The same on update: an unknown role, and clearing every scope of a key without roles.
    let k = create(&t, &["--scope", "a:b"]).await;
    let id = k["key_id"].as_str().unwrap();
    let out = cli(&t, &["keys", "update", id, "--role", "ghost"]).await;
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("role `ghost` does not exist"), "{}", stderr(&out));
    let out = cli(&t, &["keys", "update", id, "--clear-scopes"]).await;
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let v = json(&t, &["keys", "update", id, "--clear-scopes", "--allow-empty"]).await;
    assert_eq!(v["scopes"], Value::Array(vec![]));
}

#[tokio::test]
async fn update_disable_and_enable_change_what_verify_answers() {
    let t = TestServer::start().await;
    assert_eq!(code(&cli(&t, &["roles", "put", "ops", "--scope", "deploy:run"]).await), 0);
    let k = create(&t, &["--scope", "a:b", "--expires-in", "30d", "--rate-limit", "100/60s"]).await;
    let id = k["key_id"].as_str().unwrap();
    let secret = k["key"].as_str().unwrap();
    let expires =
        time::OffsetDateTime::parse(k["expires_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339)
            .unwrap();
    let in_30d = time::OffsetDateTime::now_utc() + time::Duration::days(30);
    assert!((expires - in_30d).abs() < time::Duration::minutes(5), "{expires}");
    let v = t.verify(secret).await;
    assert_eq!((v["scopes"].clone(), v["ratelimit"]["limit"].clone()), (serde_json::json!(["a:b"]), 100.into()));

    let updated = json(
        &t,
        &[
            "keys",
            "update",
            id,
            "--name",
            "deploy bot",
            "--scope",
            "x:y",
            "--scope",
            "a:b",
            "--role",
            "ops",
            "--meta",
            r#"{"team":"blue"}"#,
            "--expires-in",
            "12h",
            "--rate-limit",
            "5/1m",
        ],
    )
    .await;
    assert_eq!(updated["name"], "deploy bot");
    let v = t.verify(secret).await;
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["scopes"], serde_json::json!(["a:b", "deploy:run", "x:y"]));
    assert_eq!(v["roles"], serde_json::json!(["ops"]));
    assert_eq!(v["meta"], serde_json::json!({ "team": "blue" }));
    assert_eq!(v["ratelimit"], serde_json::json!({ "limit": 5, "period_s": 60 }));
    assert_eq!(v["name"], "deploy bot");
    let expires =
        time::OffsetDateTime::parse(v["expires_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339)
            .unwrap();
    assert!(expires < time::OffsetDateTime::now_utc() + time::Duration::hours(13));

    let cleared = json(&t, &["keys", "update", id, "--no-expiry", "--no-rate-limit", "--clear-roles"]).await;
    assert_eq!((cleared["expires_at"].clone(), cleared["ratelimit"].clone()), (Value::Null, Value::Null));
    let v = t.verify(secret).await;
    assert_eq!((v["scopes"].clone(), v["ratelimit"].clone()), (serde_json::json!(["a:b", "x:y"]), Value::Null));

    let out = cli(&t, &["keys", "disable", id]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(t.code(secret).await, "DISABLED");
    assert_eq!(code(&cli(&t, &["keys", "enable", id]).await), 0);
    assert_eq!(t.code(secret).await, "VALID");
}

#[tokio::test]
async fn roles_delete_is_refused_while_keys_hold_the_role_unless_detached() {
    let t = TestServer::start().await;
    assert_eq!(code(&cli(&t, &["roles", "put", "ops", "--scope", "deploy:run"]).await), 0);
    let a = create(&t, &["--role", "ops"]).await;
    let b = create(&t, &["--role", "ops", "--scope", "a:b"]).await;
    let mut events = server_support::Events::connect(&t).await;

    let out = cli(&t, &["roles", "delete", "ops"]).await;
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("2 keys hold it"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--detach"), "{}", stderr(&out));
    assert_eq!(t.verify(b["key"].as_str().unwrap()).await["scopes"], serde_json::json!(["a:b", "deploy:run"]));

    let out = cli(&t, &["roles", "delete", "nosuchrole"]).await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));

    let deleted = json(&t, &["roles", "delete", "ops", "--detach"]).await;
    let mut detached: Vec<&str> = deleted["detached"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    detached.sort_unstable();
    let mut both = vec![a["key_id"].as_str().unwrap(), b["key_id"].as_str().unwrap()];
    both.sort_unstable();
    assert_eq!(detached, both);
    // Middlewares hear each key `updated`, and verify no longer grants the role's scopes.
    let mut heard = Vec::new();
    for _ in 0..2 {
        let (name, data) = events.next_change(std::time::Duration::from_secs(10)).await.unwrap();
        assert_eq!(name, "updated");
        heard.push(data["key_id"].as_str().unwrap().to_owned());
    }
    heard.sort_unstable();
    assert_eq!(heard, both);
    let v = t.verify(b["key"].as_str().unwrap()).await;
    assert_eq!((v["scopes"].clone(), v["roles"].clone()), (serde_json::json!(["a:b"]), serde_json::json!([])));
    assert_eq!(json(&t, &["roles", "list"]).await, Value::Array(vec![]));
    // Audited: one key.update per key, then role.delete.
    let audit = json(&t, &["audit"]).await;
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(&actions[actions.len() - 3..], ["key.update", "key.update", "role.delete"]);
}

#[tokio::test]
async fn alerts_are_acknowledged_and_then_hidden() {
    let t = TestServer::start().await;
    let key = create(&t, &["--scope", "a:b"]).await["key_id"].as_str().unwrap().to_owned();
    let now = this_minute();
    let req = Req {
        minute: now,
        key_id: Some(key.clone()),
        route: "/r",
        method: "GET",
        outcome: keygate::Outcome::Allowed,
        status: 200,
        latency_us: 100,
    };
    for (i, net) in ["203.0.113.0/24", "198.51.100.0/24"].into_iter().enumerate() {
        let mut batch = aggregate_batch(aggregate(std::slice::from_ref(&req)));
        batch.networks =
            vec![ClientNetwork { key_id: key.as_str().into(), network: net.into(), minute: now - 60 * (2 - i as i64) }];
        assert_eq!(t.post_usage(&batch).await.0, 202);
    }
    let open = json(&t, &["alerts", "list"]).await;
    let open = open.as_array().unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["kind"], "new_network");
    assert_eq!(open[0]["acknowledged_at"], Value::Null);
    let id = open[0]["id"].as_u64().unwrap().to_string();

    let out = cli(&t, &["alerts", "ack", &id]).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("acknowledged alert {id}")), "{}", stdout(&out));
    assert_eq!(json(&t, &["alerts", "list"]).await, Value::Array(vec![]));
    let all = json(&t, &["alerts", "list", "--all"]).await;
    assert!(all[0]["acknowledged_at"].is_string(), "{all}");
    // Twice is fine and keeps the first time; an unknown id is 3.
    let again = json(&t, &["alerts", "ack", &id]).await;
    assert_eq!(again["acknowledged_at"], all[0]["acknowledged_at"]);
    assert_eq!(code(&cli(&t, &["alerts", "ack", "999999"]).await), 3);
    let audit = json(&t, &["audit"]).await;
    let acks = audit.as_array().unwrap().iter().filter(|r| r["action"] == "alert.ack").count();
    assert_eq!(acks, 1);
}

#[tokio::test]
async fn test_keys_carry_their_environment_prefix() {
    let t = TestServer::start().await;
    let test = create(&t, &["--scope", "a:b", "--env", "test"]).await;
    let live = create(&t, &["--scope", "a:b"]).await;
    assert!(test["key"].as_str().unwrap().starts_with("kgtest_"), "{test}");
    assert!(live["key"].as_str().unwrap().starts_with("kg_"), "{live}");
    // Both pass the middleware's default format check and verify.
    for k in [&test, &live] {
        let secret = k["key"].as_str().unwrap();
        keygate::KeyFormat::keygate().check_str(secret).unwrap();
        assert_eq!(t.verify(secret).await["valid"], true);
    }
    // Rotation keeps the environment's prefix.
    let rotated = json(&t, &["keys", "rotate", test["key_id"].as_str().unwrap()]).await;
    assert!(rotated["key"].as_str().unwrap().starts_with("kgtest_"), "{rotated}");

    // A configured map replaces the default.
    let t = TestServer::start_on(TestDb::sqlite(), |b: KeyServer| {
        b.env_prefix("test", "sandbox").env_prefix("live", "acme")
    })
    .await;
    assert!(create(&t, &["--scope", "a:b", "--env", "test"]).await["key"].as_str().unwrap().starts_with("sandbox_"));
    assert!(create(&t, &["--scope", "a:b"]).await["key"].as_str().unwrap().starts_with("acme_"));
    // A prefix outside the key format is refused at start.
    let err = KeyServer::builder().env_prefix("test", "Bad-Prefix").build().await.unwrap_err();
    assert!(err.to_string().contains("Bad-Prefix"), "{err}");
}

/// Where each header of a table starts, in characters.
fn column_starts(header: &str, names: &[&str]) -> Vec<usize> {
    names
        .iter()
        .map(|n| {
            let at = header.find(n).unwrap_or_else(|| panic!("no column {n} in {header:?}"));
            header[..at].chars().count()
        })
        .collect()
}

#[tokio::test]
async fn tables_are_aligned_and_json_parses() {
    let t = TestServer::start().await;
    create(&t, &["--scope", "a:b"]).await;
    let out =
        cli(&t, &["keys", "create", "--owner", "a much longer owner name", "--name", "x", "--scope", "a:b"]).await;
    assert_eq!(code(&out), 0);
    assert_eq!(code(&cli(&t, &["roles", "put", "ops", "--scope", "deploy:run"]).await), 0);

    let text = stdout(&cli(&t, &["keys", "list"]).await);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 3, "{text}");
    let names = ["key_id", "prefix", "owner", "name", "env", "state", "expires_at", "last_used_at"];
    let starts = column_starts(lines[0], &names);
    for row in &lines[1..] {
        let chars: Vec<char> = row.chars().collect();
        for (i, &at) in starts.iter().enumerate().skip(1) {
            // Every cell starts where its header does, after at least one space.
            assert!(chars[at] != ' ' && chars[at - 1] == ' ', "column {} misaligned:\n{text}", names[i]);
        }
    }
    assert!(lines[1].starts_with("key_"), "{text}");
    assert!(lines.iter().any(|l| l.contains("a much longer owner name")), "{text}");
    // Owner filter.
    let only = json(&t, &["keys", "list", "--owner", "acme"]).await;
    assert_eq!(only.as_array().unwrap().len(), 1);
    assert_eq!(only[0]["owner"], "acme");

    for args in [&["roles", "list"][..], &["audit"], &["alerts", "list"]] {
        let v = json(&t, args).await;
        assert!(v.is_array(), "{args:?}: {v}");
    }
    let roles = stdout(&cli(&t, &["roles", "list"]).await);
    let header = roles.lines().next().unwrap();
    let s = column_starts(header, &["name", "scopes", "updated_at"]);
    let row: Vec<char> = roles.lines().nth(1).unwrap().chars().collect();
    assert_eq!(row[s[1]..].iter().take(10).collect::<String>(), "deploy:run", "{roles}");
    let audit = stdout(&cli(&t, &["audit"]).await);
    let header = audit.lines().next().unwrap();
    let s = column_starts(header, &["at", "actor", "action", "key_id", "changes"]);
    for row in audit.lines().skip(1) {
        let row: Vec<char> = row.chars().collect();
        // The actor is the name of the token that acted: the configured one here.
        assert_eq!(row[s[1]..s[1] + 15].iter().collect::<String>(), "bootstrap-admin", "{audit}");
    }
}

/// The store statements behind roles delete and alerts ack on PostgreSQL (skipped
/// without `KEYGATE_TEST_POSTGRES_URL`).
#[tokio::test]
async fn roles_delete_and_alerts_ack_on_postgres() {
    let Some(db) = TestDb::postgres().await else { return };
    let t = TestServer::start_on(db, |b| b).await;
    t.admin.put_role("ops", ["deploy:run"]).await.unwrap();
    let k = t
        .admin
        .create_key(keygate::client::NewKey { roles: vec!["ops".into()], ..server_support::new_key("acme", &[]) })
        .await
        .unwrap();
    let refused = t.admin.delete_role("ops", false).await.unwrap_err();
    assert_eq!(refused.status(), Some(409));
    assert_eq!(t.admin.delete_role("ops", true).await.unwrap().detached, std::slice::from_ref(&k.key_id));
    assert!(t.admin.get_key(&k.key_id).await.unwrap().roles.is_empty());

    let now = this_minute();
    let req = Req {
        minute: now,
        key_id: Some(k.key_id.clone()),
        route: "/r",
        method: "GET",
        outcome: keygate::Outcome::Allowed,
        status: 200,
        latency_us: 100,
    };
    for (i, net) in ["203.0.113.0/24", "198.51.100.0/24"].into_iter().enumerate() {
        let mut batch = aggregate_batch(aggregate(std::slice::from_ref(&req)));
        let minute = now - 60 * (2 - i as i64);
        batch.networks = vec![ClientNetwork { key_id: k.key_id.as_str().into(), network: net.into(), minute }];
        assert_eq!(t.post_usage(&batch).await.0, 202);
    }
    let open = t.admin.list_alerts(Some(false)).await.unwrap();
    assert_eq!(open.len(), 1);
    let acked = t.admin.ack_alert(open[0].id.unwrap()).await.unwrap();
    assert!(acked.acknowledged_at.is_some());
    assert!(t.admin.list_alerts(Some(false)).await.unwrap().is_empty());
    assert_eq!(t.admin.list_alerts(Some(true)).await.unwrap().len(), 1);
}

#[tokio::test]
async fn serve_checks_its_environment_prefixes() {
    let serve = |prefix: &'static str| async move {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate-server"));
        cmd.args(["serve", "--db", "sqlite::memory:", "--listen", "127.0.0.1:0", "--env-prefix", prefix]);
        cmd.env_remove("KEYGATE_ADMIN_TOKEN").env_remove("KEYGATE_SERVICE_TOKEN").kill_on_drop(true);
        tokio::time::timeout(std::time::Duration::from_secs(30), cmd.output())
            .await
            .expect("serve refuses at once")
            .unwrap()
    };
    let out = serve("test=Bad-Prefix").await;
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("key prefix `Bad-Prefix` of environment `test`"), "{}", stderr(&out));
    let out = serve("no-equals-sign").await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("ENV=PREFIX"), "{}", stderr(&out));
}

#[tokio::test]
async fn keys_list_pages_with_a_cursor_or_all_of_them() {
    let t = TestServer::start().await;
    for _ in 0..5 {
        create(&t, &["--scope", "a:b"]).await;
    }
    let first = cli(&t, &["keys", "list", "--json", "--limit", "2"]).await;
    assert_eq!(code(&first), 0);
    let keys: Value = serde_json::from_str(&stdout(&first)).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let err = stderr(&first);
    let cursor = err.trim().strip_prefix("more keys: --after ").unwrap_or_else(|| panic!("{err}")).to_owned();
    let second = json(&t, &["keys", "list", "--limit", "2", "--after", &cursor]).await;
    assert_eq!(second.as_array().unwrap().len(), 2);
    assert_ne!(second[0]["key_id"], keys[0]["key_id"]);
    assert_ne!(second[0]["key_id"], keys[1]["key_id"]);
    let all = json(&t, &["keys", "list", "--limit", "2", "--all"]).await;
    assert_eq!(all.as_array().unwrap().len(), 5, "three pages followed");
    let ids: std::collections::BTreeSet<&str> =
        all.as_array().unwrap().iter().map(|k| k["key_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 5, "each once");
    assert_eq!(json(&t, &["keys", "list", "--state", "revoked"]).await, Value::Array(vec![]));
}
