//! Key lifecycle against the real key service over HTTP (protocol v1, see the `wire` module), on
//! every store: each test body below takes the database it runs on, and
//! `on_every_store!` runs it once on a SQLite file (`sqlite::…`) and once on a
//! PostgreSQL schema of its own (`postgres::…`, when `KEYGATE_TEST_POSTGRES_URL` is
//! set; skipped with a notice otherwise). One suite, two stores.

mod server_support;

use std::time::Duration;

use keygate::client::{KeyPatch, NewKey};
use serde_json::json;
use server_support::{TestDb, TestServer, eventually, new_key};
use time::OffsetDateTime;

/// Runs each named `async fn(TestDb)` as a test per store.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::TestDb::sqlite()).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(db) = super::TestDb::postgres().await {
                        super::$name(db).await
                    }
                }
            )*
        }
    };
}

on_every_store!(
    create_then_verify_returns_effective_scopes,
    unknown_revoked_disabled_and_expired_keys,
    rotation_keeps_the_id_and_the_old_key_until_the_grace_ends,
    role_changes_and_patches_show_in_verify,
    audit_has_one_record_per_admin_action_and_no_secret,
    the_database_holds_no_raw_key,
    a_restart_on_the_same_database_keeps_everything,
    list_filters_by_owner_and_counts_verify_calls,
);

async fn create_then_verify_returns_effective_scopes(db: TestDb) {
    let t = TestServer::start_on(db, |b| b).await;
    t.admin.put_role("analyst", ["reports:read", "dashboards:read"]).await.unwrap();
    let mut req = new_key("acme", &["reports:read", "billing:write"]);
    req.roles = vec!["analyst".into()];
    req.environment = Some("test".into());
    req.meta = Some(json!({ "team": "data" }));
    req.ratelimit = Some(keygate::RateLimit { limit: 100, period_s: 60 });
    let created = t.admin.create_key(req).await.unwrap();
    assert!(created.key_id.starts_with("key_"));
    // A test key carries its environment's prefix.
    assert!(created.key.expose_secret().starts_with("kgtest_"));
    assert!(keygate::KeyFormat::keygate().check(&created.key).is_ok());
    assert_eq!(created.info.key_prefix, created.key.display_prefix());

    let v = t.verify(created.key.expose_secret()).await;
    assert_eq!(v["valid"], true);
    assert_eq!(v["key_id"], created.key_id.as_str());
    assert_eq!(v["owner"], "acme");
    assert_eq!(v["environment"], "test");
    // Own scopes plus the role's, deduplicated and sorted.
    assert_eq!(v["scopes"], json!(["billing:write", "dashboards:read", "reports:read"]));
    assert_eq!(v["roles"], json!(["analyst"]));
    assert_eq!(v["expires_at"], json!(null));
    assert_eq!(v["meta"], json!({ "team": "data" }));
    assert_eq!(v["ratelimit"], json!({ "limit": 100, "period_s": 60 }));

    // The admin view never shows the key.
    let shown = t.admin.get_key(&created.key_id).await.unwrap();
    assert_eq!(shown.owner, "acme");
    let raw = t.http.get(t.url(&format!("/v1/keys/{}", created.key_id))).bearer_auth(server_support::ADMIN);
    let body = raw.send().await.unwrap().text().await.unwrap();
    assert!(!body.contains(created.key.expose_secret()));
    assert!(!body.contains(&created.key.digest().to_hex()));
}

async fn unknown_revoked_disabled_and_expired_keys(db: TestDb) {
    let t = TestServer::start_on(db, |b| b).await;
    let unknown = keygate::ApiKey::generate("kg").unwrap();
    assert_eq!(t.code(unknown.expose_secret()).await, "NOT_FOUND");
    assert_eq!(t.code("").await, "NOT_FOUND");

    let a = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    t.admin.revoke(&a.key_id).await.unwrap();
    assert_eq!(t.code(a.key.expose_secret()).await, "REVOKED");
    // Revocation is final, and idempotent: again is a success that changes nothing.
    let again = t.admin.revoke_key(&a.key_id).await.unwrap();
    assert!(again.already_revoked && again.info.revoked);
    assert_eq!(t.code(a.key.expose_secret()).await, "REVOKED");

    let b = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let patch = KeyPatch { disabled: Some(true), ..Default::default() };
    assert!(t.admin.update_key(&b.key_id, &patch).await.unwrap().disabled);
    assert_eq!(t.code(b.key.expose_secret()).await, "DISABLED");
    let patch = KeyPatch { disabled: Some(false), ..Default::default() };
    t.admin.update_key(&b.key_id, &patch).await.unwrap();
    assert_eq!(t.code(b.key.expose_secret()).await, "VALID");

    let soon = OffsetDateTime::now_utc() + time::Duration::milliseconds(1200);
    let c = t.admin.create_key(NewKey { expires_at: Some(soon), ..new_key("acme", &["a:b"]) }).await.unwrap();
    let v = t.verify(c.key.expose_secret()).await;
    assert_eq!(v["valid"], true);
    assert!(v["expires_at"].is_string());
    let key = c.key.expose_secret().to_owned();
    assert!(eventually(Duration::from_secs(5), || async { t.code(&key).await == "EXPIRED" }).await);
}

async fn rotation_keeps_the_id_and_the_old_key_until_the_grace_ends(db: TestDb) {
    let t = TestServer::start_on(db, |b| b).await;
    let old = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let new = t.admin.rotate(&old.key_id, 2).await.unwrap();
    assert_eq!(new.key_id, old.key_id, "rotation keeps the key id");
    assert_ne!(new.key.expose_secret(), old.key.expose_secret());
    let grace_end = new.previous_expires_at.expect("grace end");

    let v_old = t.verify(old.key.expose_secret()).await;
    assert_eq!(v_old["valid"], true);
    let reported =
        OffsetDateTime::parse(v_old["expires_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339)
            .unwrap();
    assert_eq!(reported, grace_end, "old key reports the end of its grace");
    let v_new = t.verify(new.key.expose_secret()).await;
    assert_eq!(v_new["valid"], true);
    assert_eq!(v_new["expires_at"], json!(null));

    let old_raw = old.key.expose_secret().to_owned();
    assert!(eventually(Duration::from_secs(6), || async { t.code(&old_raw).await == "EXPIRED" }).await);
    assert_eq!(t.code(new.key.expose_secret()).await, "VALID");

    // Rotating with no grace ends the previous key at once.
    let newer = t.admin.rotate(&old.key_id, 0).await.unwrap();
    assert_eq!(t.code(new.key.expose_secret()).await, "EXPIRED");
    assert_eq!(t.code(newer.key.expose_secret()).await, "VALID");
}

async fn role_changes_and_patches_show_in_verify(db: TestDb) {
    let t = TestServer::start_on(db, |b| b).await;
    t.admin.put_role("ops", ["deploy:run"]).await.unwrap();
    // A role must exist to be held; one without scopes yet grants nothing.
    t.admin.put_role("later", Vec::<String>::new()).await.unwrap();
    let k = t
        .admin
        .create_key(NewKey { roles: vec!["ops".into(), "later".into()], ..new_key("acme", &["a:b"]) })
        .await
        .unwrap();
    assert_eq!(t.verify(k.key.expose_secret()).await["scopes"], json!(["a:b", "deploy:run"]));

    t.admin.put_role("ops", ["deploy:run", "deploy:rollback"]).await.unwrap();
    t.admin.put_role("later", ["logs:read"]).await.unwrap();
    assert_eq!(
        t.verify(k.key.expose_secret()).await["scopes"],
        json!(["a:b", "deploy:rollback", "deploy:run", "logs:read"])
    );

    let patch = KeyPatch { scopes: Some(vec!["x:y".into()]), roles: Some(vec![]), ..Default::default() };
    t.admin.update_key(&k.key_id, &patch).await.unwrap();
    let v = t.verify(k.key.expose_secret()).await;
    assert_eq!(v["scopes"], json!(["x:y"]));
    assert_eq!(v["roles"], json!([]));
}

async fn audit_has_one_record_per_admin_action_and_no_secret(db: TestDb) {
    let t = TestServer::start_on(db, |b| b).await;
    let start = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    t.admin.put_role("ops", ["deploy:run"]).await.unwrap();
    let k = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    t.admin.update_key(&k.key_id, &KeyPatch { name: Some("renamed".into()), ..Default::default() }).await.unwrap();
    let r = t.admin.rotate(&k.key_id, 60).await.unwrap();
    t.admin.revoke(&k.key_id).await.unwrap();
    // Reads, refused calls and a repeated revocation are not actions.
    t.admin.get_key(&k.key_id).await.unwrap();
    t.admin.list_keys(None).await.unwrap();
    assert!(t.admin.rotate(&k.key_id, 0).await.is_err());
    assert!(t.admin.revoke_key(&k.key_id).await.unwrap().already_revoked);

    let records = t.admin.audit(Some(start)).await.unwrap();
    let actions: Vec<&str> = records.iter().map(|r| r.action.as_str()).collect();
    assert_eq!(actions, ["role.put", "key.create", "key.update", "key.rotate", "key.revoke"]);
    assert!(
        records.iter().all(|r| r.actor == keygate::server::BOOTSTRAP_ADMIN),
        "the configured admin token acts as `bootstrap-admin`"
    );
    assert!(records[1..].iter().all(|r| r.key_id.as_deref() == Some(k.key_id.as_str())));
    assert_eq!(records[2].changes, json!({ "name": { "from": "acme key", "to": "renamed" } }));
    assert_eq!(t.admin.audit(None).await.unwrap().len(), 5);

    let text =
        t.http.get(t.url("/v1/audit")).bearer_auth(server_support::ADMIN).send().await.unwrap().text().await.unwrap();
    for secret in [&k.key, &r.key] {
        assert!(!text.contains(secret.expose_secret()));
        assert!(!text.contains(&secret.expose_secret()[3..]));
        assert!(!text.contains(&secret.digest().to_hex()));
    }
}

async fn the_database_holds_no_raw_key(db: TestDb) {
    let t = TestServer::start_on(db, |b| b).await;
    let mut keys = Vec::new();
    for i in 0..20 {
        let k = t.admin.create_key(new_key(&format!("owner{i}"), &["a:b"])).await.unwrap();
        keys.push(k.key);
        if i % 5 == 0 {
            keys.push(t.admin.rotate(&k.key_id, 30).await.unwrap().key);
        }
    }
    let bytes = t.db.stored_bytes().await;
    assert!(bytes.len() > 4096, "read the database");
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    for key in &keys {
        let raw = key.expose_secret();
        assert!(!contains(raw.as_bytes()), "raw key stored");
        // The random body (after `kg_` and the 4 display characters) appears nowhere.
        assert!(!contains(&raw.as_bytes()[7..]), "key body stored");
        assert!(!contains(&raw.as_bytes()[7..20]), "part of the key body stored");
        // The digest is how it is found.
        assert!(contains(key.digest().as_bytes()));
    }
}

async fn a_restart_on_the_same_database_keeps_everything(db: TestDb) {
    let t = TestServer::start_on(db, |b| b).await;
    t.admin.put_role("ops", ["deploy:run"]).await.unwrap();
    let live = t.admin.create_key(NewKey { roles: vec!["ops".into()], ..new_key("acme", &["a:b"]) }).await.unwrap();
    let gone = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    t.admin.revoke(&gone.key_id).await.unwrap();
    let TestServer { server, db, .. } = t;
    server.shutdown().await;

    let t = TestServer::start_on(db, |b| b).await;
    let v = t.verify(live.key.expose_secret()).await;
    assert_eq!(v["valid"], true);
    assert_eq!(v["scopes"], json!(["a:b", "deploy:run"]));
    assert_eq!(t.code(gone.key.expose_secret()).await, "REVOKED");
    assert_eq!(t.admin.list_keys(Some("acme")).await.unwrap().len(), 2);
    assert_eq!(t.admin.audit(None).await.unwrap().len(), 4);
}

async fn list_filters_by_owner_and_counts_verify_calls(db: TestDb) {
    let t = TestServer::start_on(db, |b| b).await;
    t.admin.create_key(new_key("a", &["x:y"])).await.unwrap();
    let b = t.admin.create_key(new_key("b", &["x:y"])).await.unwrap();
    let listed = t.admin.list_keys(Some("b")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key_id, b.key_id);
    assert_eq!(t.admin.list_keys(None).await.unwrap().len(), 2);
    let before = t.server.stats().verify_calls;
    t.verify(b.key.expose_secret()).await;
    t.verify("nope").await;
    assert_eq!(t.server.stats().verify_calls, before + 2);
    let health = t.http.get(t.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}
