//! Service and admin tokens as data: created, listed and revoked through the admin API
//! and the CLI, without a restart; kept across restarts; the audit actor is the token's
//! name; a persistent database without tokens refuses to start; short tokens refused.

mod server_support;

use std::process::Stdio;
use std::time::Duration;

use keygate::client::{AdminClient, TokenInfo, TokenKind};
use keygate::server::{BOOTSTRAP_ADMIN, KeyServer, RunningKeyServer, ServerError};
use keygate::{ApiKey, CachedVerifier, HttpVerifier, RevocationListener, Verdict, Verifier};
use serde_json::{Value, json};
use server_support::{ADMIN, Events, SERVICE, TestDb, TestServer, eventually, new_key};
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(10);

/// A server on `db` with no configured token: only what the store holds.
async fn start_bare(db: &TestDb) -> Result<RunningKeyServer, ServerError> {
    KeyServer::builder().database(db.url()).listen("127.0.0.1:0".parse().unwrap()).start().await
}

async fn verify_status(server_url: &str, token: &str) -> u16 {
    let res = reqwest::Client::new()
        .post(format!("{server_url}/v1/keys/verify"))
        .bearer_auth(token)
        .json(&json!({ "key": "kg_nothing" }))
        .send()
        .await
        .unwrap();
    res.status().as_u16()
}

fn named<'a>(tokens: &'a [TokenInfo], name: &str) -> &'a TokenInfo {
    tokens.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no token `{name}` in {tokens:?}"))
}

#[tokio::test]
async fn tokens_created_through_the_api_survive_a_restart_without_bootstrap_tokens() {
    let t = TestServer::start().await;
    let ops = t.admin.create_token(TokenKind::Admin, "ops").await.unwrap();
    let fleet = t.admin.create_token(TokenKind::Service, "fleet-eu").await.unwrap();
    assert!(ops.token.starts_with("kga_") && ops.token.len() >= 43, "admin tokens are recognisable");
    assert!(fleet.token.starts_with("kgs_") && fleet.token.len() >= 43);
    assert_eq!((ops.info.kind, fleet.info.kind), (TokenKind::Admin, TokenKind::Service));
    assert!(fleet.token.starts_with(&fleet.info.prefix));
    // Both work at once, next to the bootstrap tokens.
    assert_eq!(verify_status(&t.server.url(), &fleet.token).await, 200);
    assert_eq!(verify_status(&t.server.url(), SERVICE).await, 200);
    assert_eq!(verify_status(&t.server.url(), &ops.token).await, 401, "an admin token is not a service token");
    let db = t.db.clone();
    t.server.shutdown().await;
    // Raw tokens are never stored, only their digests.
    let stored = db.stored_bytes().await;
    for raw in [&ops.token, &fleet.token] {
        assert!(!stored.windows(raw.len()).any(|w| w == raw.as_bytes()), "a raw token is stored");
    }

    // Restarted with no token configured: the stored ones are the tokens.
    let server = start_bare(&db).await.expect("a database with an admin token starts without bootstrap tokens");
    assert_eq!((server.service_token(), server.admin_token()), (None, None), "nothing generated");
    let admin = AdminClient::new(server.url(), &ops.token).unwrap();
    let tokens = admin.list_tokens().await.unwrap();
    assert_eq!(tokens.len(), 2, "no bootstrap token any more: {tokens:?}");
    assert!(tokens.iter().all(|t| !t.bootstrap && t.revoked_at.is_none()));
    // The use before the restart was written (in a batch, at shutdown at the latest).
    assert!(named(&tokens, "fleet-eu").last_used_at.is_some(), "last_used_at kept: {tokens:?}");
    assert_eq!(verify_status(&server.url(), &fleet.token).await, 200);
    assert_eq!(verify_status(&server.url(), SERVICE).await, 401, "the bootstrap token is gone with its configuration");
    assert_eq!(AdminClient::new(server.url(), ADMIN).unwrap().list_keys(None).await.unwrap_err().status(), Some(401));
    server.shutdown().await;
}

#[tokio::test]
async fn a_persistent_database_without_tokens_refuses_to_start_and_names_the_command() {
    let db = TestDb::sqlite();
    let err = start_bare(&db).await.expect_err("no admin token anywhere");
    assert!(matches!(err, ServerError::NoAdminToken), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("keygate-server tokens create --kind admin"), "{message}");
    // A service token alone does not make it administrable either.
    let err = KeyServer::builder()
        .database(db.url())
        .service_token(SERVICE)
        .listen("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .expect_err("no admin token");
    assert!(matches!(err, ServerError::NoAdminToken));

    // `:memory:` is a demo: the tokens not configured are generated, and they work.
    let demo = KeyServer::builder().listen("127.0.0.1:0".parse().unwrap()).start().await.unwrap();
    let (svc, adm) = (demo.service_token().unwrap().to_owned(), demo.admin_token().unwrap().to_owned());
    assert!(svc.starts_with("kgs_") && adm.starts_with("kga_"));
    assert_eq!(verify_status(&demo.url(), &svc).await, 200);
    let listed = AdminClient::new(demo.url(), &adm).unwrap().list_tokens().await.unwrap();
    assert_eq!(
        listed.iter().map(|t| (t.name.as_str(), t.bootstrap)).collect::<Vec<_>>(),
        [("bootstrap-service", true), ("bootstrap-admin", true)]
    );
}

#[tokio::test]
async fn tokens_under_32_characters_are_refused() {
    for (service, admin) in [("short", ADMIN), (SERVICE, "adm"), (SERVICE, &"x".repeat(31)[..])] {
        let err = KeyServer::builder()
            .service_token(service)
            .admin_token(admin)
            .listen("127.0.0.1:0".parse().unwrap())
            .start()
            .await
            .expect_err("refused");
        let message = err.to_string();
        assert!(matches!(err, ServerError::Config(_)) && message.contains("at least 32"), "{message}");
    }
    let same = KeyServer::builder().service_token(ADMIN).admin_token(ADMIN).build().await.err().unwrap();
    assert!(same.to_string().contains("must differ"), "{same}");
}

#[tokio::test]
async fn a_second_service_token_replaces_the_first_without_a_restart() {
    let t = TestServer::start().await;
    let old = t.admin.create_token(TokenKind::Service, "fleet-old").await.unwrap();
    let new = t.admin.create_token(TokenKind::Service, "fleet-new").await.unwrap();
    let k = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();

    // A real middleware on the new token: verifier, cache and revocation listener.
    let url = t.server.url();
    let cache = CachedVerifier::new(HttpVerifier::builder(url.as_str()).service_token(&new.token).build().unwrap());
    let listener = RevocationListener::builder(url.as_str())
        .service_token(&new.token)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .spawn(&cache)
        .unwrap();
    assert!(eventually(WAIT, || async { listener.is_connected() }).await, "listener connected");
    let mut old_stream = Events::connect_as(&t, &old.token).await;
    let mut new_stream = Events::connect_as(&t, &new.token).await;
    assert_eq!(verify_status(&url, &old.token).await, 200);
    assert!(matches!(cache.verify(&k.key).await.unwrap(), Verdict::Valid(_)));
    assert_eq!(t.server.stats().event_subscribers, 3);

    let revoked = t.admin.revoke_token(&old.info.id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    // At once, before any reload interval: the old token is refused and its stream ends.
    assert_eq!(verify_status(&url, &old.token).await, 401);
    let mut ended = false;
    for _ in 0..5 {
        if old_stream.next(WAIT).await.is_none() {
            ended = true;
            break;
        }
    }
    assert!(ended, "the revoked token's event stream is closed");
    assert!(eventually(WAIT, || async { t.server.stats().event_subscribers == 2 }).await);
    let reopened = t.http_stream().get(t.url("/v1/events")).bearer_auth(&old.token).send().await.unwrap();
    assert_eq!(reopened.status(), 401, "and cannot be reopened");

    // The new token's stream and middleware are unaffected.
    t.admin.revoke(&k.key_id).await.unwrap();
    assert_eq!(new_stream.next_change(WAIT).await.unwrap(), ("revoked".into(), json!({ "key_id": k.key_id })));
    assert!(
        eventually(WAIT, || async { matches!(cache.verify(&k.key).await, Ok(Verdict::Invalid { .. })) }).await,
        "the listener on the new token still invalidates"
    );
    let stats = listener.stats();
    assert!(stats.connected && stats.reconnects == 0 && stats.connect_failures == 0, "{stats:?}");
    assert_eq!(verify_status(&url, &new.token).await, 200);
    assert!(matches!(cache.verify(&ApiKey::new("kg_unknown")).await.unwrap(), Verdict::Invalid { .. }));
}

#[tokio::test]
async fn the_audit_actor_is_the_name_of_the_token_that_acted() {
    let t = TestServer::start().await;
    let alice = t.admin.create_token(TokenKind::Admin, "ops-alice").await.unwrap();
    let fleet = t.admin.create_token(TokenKind::Service, "fleet").await.unwrap();
    let as_alice = AdminClient::new(t.server.url(), &alice.token).unwrap();
    let k = as_alice.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    as_alice.put_role("viewer", ["reports:read"]).await.unwrap();
    as_alice.revoke(&k.key_id).await.unwrap();
    as_alice.revoke_token(&fleet.info.id).await.unwrap();

    let records = t.admin.audit(None).await.unwrap();
    let seen: Vec<(&str, &str)> = records.iter().map(|r| (r.actor.as_str(), r.action.as_str())).collect();
    assert_eq!(
        seen,
        [
            (BOOTSTRAP_ADMIN, "token.create"),
            (BOOTSTRAP_ADMIN, "token.create"),
            ("ops-alice", "key.create"),
            ("ops-alice", "role.put"),
            ("ops-alice", "key.revoke"),
            ("ops-alice", "token.revoke"),
        ]
    );
    let created = &records[0].changes;
    assert_eq!((created["name"].as_str(), created["kind"].as_str()), (Some("ops-alice"), Some("admin")));
    assert_eq!(created["token_id"], json!(alice.info.id));
    assert_eq!(records[5].changes["token_id"], json!(fleet.info.id));
    // No record carries a token or its digest.
    let text = serde_json::to_string(&records).unwrap();
    for raw in [&alice.token, &fleet.token] {
        assert!(!text.contains(raw.as_str()));
        assert!(!text.contains(&keygate::KeyDigest::of(raw.as_bytes()).to_hex()));
    }
}

#[tokio::test]
async fn the_last_admin_token_cannot_be_revoked_and_revoking_is_idempotent() {
    let t = TestServer::start().await;
    let ops = t.admin.create_token(TokenKind::Admin, "ops").await.unwrap();
    // A bootstrap token is configuration, not data.
    let err = t.admin.revoke_token(BOOTSTRAP_ADMIN).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("configured at start"), "{err}");
    assert_eq!(t.admin.revoke_token("tok_doesnotexist").await.unwrap_err().status(), Some(404));
    assert_eq!(
        t.admin.create_token(TokenKind::Admin, "ops").await.unwrap_err().status(),
        Some(409),
        "names are unique"
    );
    assert_eq!(t.admin.create_token(TokenKind::Admin, "bad name").await.unwrap_err().status(), Some(400));
    assert_eq!(t.admin.create_token(TokenKind::Admin, "adm\u{202e}ni").await.unwrap_err().status(), Some(400));
    let db = t.db.clone();
    t.server.shutdown().await;

    // Without the bootstrap admin token, `ops` is the only one: refused.
    let server = start_bare(&db).await.unwrap();
    let as_ops = AdminClient::new(server.url(), &ops.token).unwrap();
    let err = as_ops.revoke_token(&ops.info.id).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert!(err.to_string().contains("last active admin token"), "{err}");
    assert!(as_ops.list_keys(None).await.is_ok(), "still works");

    // With a second one, it can go; again is a no-op answered the same way.
    let second = as_ops.create_token(TokenKind::Admin, "ops-2").await.unwrap();
    let as_second = AdminClient::new(server.url(), &second.token).unwrap();
    let first = as_second.revoke_token(&ops.info.id).await.unwrap();
    let again = as_second.revoke_token(&ops.info.id).await.unwrap();
    assert_eq!(first, again);
    assert!(first.revoked_at.is_some());
    assert_eq!(as_ops.list_keys(None).await.unwrap_err().status(), Some(401), "revoked without a restart");
    let revokes = as_second.audit(None).await.unwrap().iter().filter(|r| r.action == "token.revoke").count();
    assert_eq!(revokes, 1, "an idempotent revoke writes no second record");
    assert_eq!(as_second.revoke_token(&second.info.id).await.unwrap_err().status(), Some(409));

    // The listing never shows a token or its digest.
    let res = reqwest::Client::new()
        .get(format!("{}/v1/tokens", server.url()))
        .bearer_auth(&second.token)
        .send()
        .await
        .unwrap();
    let body: Value = res.json().await.unwrap();
    let text = body.to_string();
    for raw in [&ops.token, &second.token] {
        assert!(!text.contains(raw.as_str()) && !text.contains(&keygate::KeyDigest::of(raw.as_bytes()).to_hex()));
    }
    let listed: Vec<TokenInfo> = serde_json::from_value(body["tokens"].clone()).unwrap();
    assert_eq!(
        listed.iter().map(|t| (t.name.as_str(), t.revoked_at.is_some())).collect::<Vec<_>>(),
        // Active tokens first, so that a long history of revoked ones never hides them.
        [("ops-2", false), ("ops", true)]
    );
    server.shutdown().await;
}

/// Two replicas on one PostgreSQL schema: a token created through one is accepted by the
/// other, and revoked through one, refused by the other, its streams there closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_postgres_follow_token_changes_without_a_restart() {
    let Some(db) = TestDb::postgres().await else { return };
    let a = TestServer::start_on(db.clone(), |b| b).await;
    let b = TestServer::start_on(db.clone(), |b| b).await;
    let fleet = a.admin.create_token(TokenKind::Service, "fleet").await.unwrap();
    assert!(eventually(WAIT, || async { verify_status(&b.server.url(), &fleet.token).await == 200 }).await);
    let mut on_b = Events::connect_as(&b, &fleet.token).await;
    a.admin.revoke_token(&fleet.info.id).await.unwrap();
    assert!(eventually(WAIT, || async { verify_status(&b.server.url(), &fleet.token).await == 401 }).await);
    let mut ended = false;
    for _ in 0..5 {
        if on_b.next(WAIT).await.is_none() {
            ended = true;
            break;
        }
    }
    assert!(ended, "replica B closed the revoked token's stream");
    // B's own tokens were never disturbed.
    assert_eq!(verify_status(&b.server.url(), SERVICE).await, 200);
}

// ---- the binary

fn cli() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate-server"));
    for var in [
        "KEYGATE_SERVICE_TOKEN",
        "KEYGATE_ADMIN_TOKEN",
        "KEYGATE_SERVICE_TOKEN_FILE",
        "KEYGATE_ADMIN_TOKEN_FILE",
        "KEYGATE_DB",
        "KEYGATE_URL",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

async fn run(cmd: &mut tokio::process::Command) -> (bool, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("in time").unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

/// The line after "shown once" in the CLI's text output.
fn shown_token(stdout: &str) -> String {
    let mut lines = stdout.lines().skip_while(|l| !l.contains("shown once"));
    lines.next();
    lines.next().expect("a token line").trim().to_owned()
}

/// `keygate-server serve` on `db`; the child and its URL.
async fn serve(db: &str, env: &[(&str, &str)]) -> (tokio::process::Child, String) {
    let mut cmd = cli();
    cmd.args(["serve", "--db", db, "--listen", "127.0.0.1:0"]).stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.split("listening on ").nth(1).filter(|_| line.starts_with("keygate-server")) {
                return url.trim().to_owned();
            }
        }
        panic!("keygate-server ended before listening");
    })
    .await
    .expect("listening within 30 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_lists_and_revokes_tokens_online_and_offline() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("keys.db").display());

    // No token anywhere: `serve` refuses and says what to run.
    let (ok, _, stderr) = run(cli().args(["serve", "--db", &db, "--listen", "127.0.0.1:0"])).await;
    assert!(!ok);
    assert!(stderr.contains("keygate-server tokens create --kind admin --name ops --database"), "{stderr}");
    // A short token is refused with a clear message, and is not echoed.
    let (ok, _, stderr) = run(cli().args(["serve", "--db", &db]).env("KEYGATE_ADMIN_TOKEN", "too-short-token")).await;
    assert!(!ok && stderr.contains("at least 32"), "{stderr}");
    assert!(!stderr.contains("too-short-token"), "{stderr}");
    let file = dir.path().join("admin-token");
    std::fs::write(&file, "short\n").unwrap();
    let (ok, _, stderr) = run(cli().args(["serve", "--db", &db, "--admin-token-file"]).arg(&file)).await;
    assert!(!ok && stderr.contains("at least 32"), "{stderr}");

    // Offline: straight into the database, no server.
    let (ok, stdout, stderr) =
        run(cli().args(["tokens", "create", "--kind", "admin", "--name", "ops", "--database", &db])).await;
    assert!(ok, "{stderr}");
    let ops = shown_token(&stdout);
    assert!(ops.starts_with("kga_"), "{stdout}");
    let (ok, _, stderr) =
        run(cli().args(["tokens", "create", "--kind", "admin", "--name", "ops", "--database", &db])).await;
    assert!(!ok && stderr.contains("exists"), "{stderr}");

    // Now it starts, with nothing configured.
    let (mut child, url) = serve(&db, &[]).await;
    let online = |args: &[&str]| {
        let mut cmd = cli();
        cmd.arg("tokens").args(args).args(["--url", &url]).env("KEYGATE_ADMIN_TOKEN", &ops);
        cmd
    };
    let (ok, stdout, stderr) = run(&mut online(&["create", "--kind", "service", "--name", "fleet-eu"])).await;
    assert!(ok, "{stderr}");
    let fleet = shown_token(&stdout);
    assert!(fleet.starts_with("kgs_"), "{stdout}");
    assert_eq!(verify_status(&url, &fleet).await, 200);

    let (ok, stdout, stderr) = run(&mut online(&["list", "--json"])).await;
    assert!(ok, "{stderr}");
    let listed: Vec<TokenInfo> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        listed.iter().map(|t| (t.name.as_str(), t.kind)).collect::<Vec<_>>(),
        [("ops", TokenKind::Admin), ("fleet-eu", TokenKind::Service)]
    );
    assert!(!stdout.contains(&ops) && !stdout.contains(&fleet));
    let (ok, stdout, _) = run(&mut online(&["list"])).await;
    assert!(ok && stdout.lines().any(|l| l.contains("fleet-eu") && l.contains("active")), "{stdout}");

    let fleet_id = named(&listed, "fleet-eu").id.clone();
    let (ok, stdout, stderr) = run(&mut online(&["revoke", &fleet_id])).await;
    assert!(ok && stdout.contains("revoked"), "{stdout}{stderr}");
    assert_eq!(verify_status(&url, &fleet).await, 401);
    let (ok, _, stderr) = run(&mut online(&["revoke", &fleet_id])).await;
    assert!(ok, "revoking again is fine: {stderr}");
    let ops_id = named(&listed, "ops").id.clone();
    let (ok, _, stderr) = run(&mut online(&["revoke", &ops_id])).await;
    assert!(!ok && stderr.contains("last active admin token"), "{stderr}");

    // The audit names the actors: the offline CLI, then `ops`.
    let admin = AdminClient::new(&url, &ops).unwrap();
    let actors: Vec<(String, String)> =
        admin.audit(None).await.unwrap().into_iter().map(|r| (r.actor, r.action)).collect();
    assert_eq!(
        actors,
        [
            ("offline-cli".to_owned(), "token.create".to_owned()),
            ("ops".to_owned(), "token.create".to_owned()),
            ("ops".to_owned(), "token.revoke".to_owned()),
        ]
    );
    child.kill().await.unwrap();

    // `:memory:` still generates and prints its tokens.
    let mut cmd = cli();
    cmd.args(["serve", "--db", "sqlite::memory:", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut demo = cmd.spawn().unwrap();
    let mut lines = BufReader::new(demo.stderr.take().unwrap()).lines();
    let mut generated = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("generated") {
                generated.push(line.rsplit(' ').next().unwrap().to_owned());
            }
            if line.starts_with("keygate-server listening") {
                break;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(generated.len(), 2);
    assert!(generated[0].starts_with("kgs_") && generated[1].starts_with("kga_"), "{generated:?}");
    demo.kill().await.unwrap();

    // Token files: the trailing newline trimmed, and a file wins over the environment.
    let admin_file = dir.path().join("admin.token");
    let service_file = dir.path().join("service.token");
    std::fs::write(&admin_file, format!("{ADMIN}\n")).unwrap();
    std::fs::write(&service_file, format!("{SERVICE}\n")).unwrap();
    let mut cmd = cli();
    cmd.args(["serve", "--db", "sqlite::memory:", "--listen", "127.0.0.1:0", "--admin-token-file"])
        .arg(&admin_file)
        .arg("--service-token-file")
        .arg(&service_file)
        .env("KEYGATE_ADMIN_TOKEN", "too-short-but-overridden")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut from_files = cmd.spawn().unwrap();
    let mut lines = BufReader::new(from_files.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            assert!(!line.starts_with("generated"), "nothing generated: {line}");
            if let Some(url) = line.strip_prefix("keygate-server listening on ") {
                return url.trim().to_owned();
            }
        }
        panic!("ended before listening");
    })
    .await
    .unwrap();
    assert_eq!(verify_status(&url, SERVICE).await, 200);
    let listed = AdminClient::new(&url, ADMIN).unwrap().list_tokens().await.unwrap();
    assert_eq!(listed.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["bootstrap-service", "bootstrap-admin"]);
    from_files.kill().await.unwrap();
}
