//! Webhooks against the real key service: signed deliveries of lifecycle events and
//! alerts to a receiver started here, retries after 500s with every event delivered
//! once, redirects not followed, the delivery log, the queue bound, a restart, and two
//! PostgreSQL replicas sharing one outbox.

mod server_support;
mod webhook_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keygate::client::{DeliveryState, KeyPatch};
use keygate::server::{KeyServer, WebhookConfig};
use keygate::{AggregateBatch, ClientNetwork};
use serde_json::{Value, json};
use server_support::{ADMIN, TestDb, TestServer, aggregate_batch, eventually, new_key, this_minute};
use webhook_support::{Receiver, counts};

const DEADLINE: Duration = Duration::from_secs(20);

/// Fast retries so that a test's failed attempts take milliseconds.
fn fast() -> WebhookConfig {
    WebhookConfig {
        poll_interval: Duration::from_millis(20),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..WebhookConfig::default()
    }
}

/// A usage batch of `key` from `networks`.
fn seen_from(key: &str, networks: &[&str]) -> AggregateBatch {
    let mut batch = aggregate_batch(Vec::new());
    batch.networks = networks
        .iter()
        .map(|n| ClientNetwork { key_id: key.into(), network: (*n).into(), minute: this_minute() })
        .collect();
    batch
}

#[tokio::test]
async fn every_event_arrives_signed_and_exactly_once_despite_500s() {
    let receiver = Receiver::start(2).await;
    let t = TestServer::start_on(TestDb::sqlite(), |b| b.allow_internal_webhooks(true).webhooks(fast())).await;
    let hook = t.admin.create_webhook(&receiver.url(), Vec::<String>::new(), Some("all events")).await.unwrap();
    assert!(hook.secret.starts_with("whsec_"));
    receiver.set_secret(&hook.secret);

    let a = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let b = t.admin.create_key(new_key("globex", &["reports:read"])).await.unwrap();
    let rotated = t.admin.rotate(&a.info.key_id, 0).await.unwrap();
    let disable = KeyPatch { disabled: Some(true), ..KeyPatch::default() };
    t.admin.update_key(&b.info.key_id, &disable).await.unwrap();
    // Disabling a disabled key changes nothing: no second `key.disabled`.
    t.admin.update_key(&b.info.key_id, &disable).await.unwrap();
    let enable = KeyPatch { disabled: Some(false), ..KeyPatch::default() };
    t.admin.update_key(&b.info.key_id, &enable).await.unwrap();
    let rename = KeyPatch { name: Some("renamed".into()), ..KeyPatch::default() };
    t.admin.update_key(&b.info.key_id, &rename).await.unwrap();
    // The same name again changes nothing: no second `key.updated`.
    t.admin.update_key(&b.info.key_id, &rename).await.unwrap();
    t.admin.revoke(&a.info.key_id).await.unwrap();
    // A first network raises nothing; a second one is a `new_network` alert.
    assert_eq!(t.post_usage(&seen_from(&b.info.key_id, &["203.0.113.0/24"])).await.0, 202);
    assert_eq!(t.post_usage(&seen_from(&b.info.key_id, &["198.51.100.0/24"])).await.0, 202);

    let expected = [
        ("key.created", &a.info.key_id),
        ("key.created", &b.info.key_id),
        ("key.rotated", &a.info.key_id),
        ("key.disabled", &b.info.key_id),
        ("key.enabled", &b.info.key_id),
        ("key.updated", &b.info.key_id),
        ("key.revoked", &a.info.key_id),
        ("alert.new_network", &b.info.key_id),
    ];
    assert!(
        eventually(DEADLINE, || async { receiver.delivered().len() >= expected.len() }).await,
        "delivered: {:?}",
        receiver.delivered()
    );
    // Long enough for a wrongly repeated delivery to show (retries are 20-100 ms apart).
    tokio::time::sleep(Duration::from_millis(300)).await;

    receiver.with(|seen| {
        assert_eq!(seen.bad_signatures, 0, "every attempt carries a valid signature");
        let mut got: Vec<(String, String)> = seen
            .delivered
            .iter()
            .map(|e| (e["type"].as_str().unwrap().to_owned(), e["data"]["key_id"].as_str().unwrap().to_owned()))
            .collect();
        let mut want: Vec<(String, String)> = expected.iter().map(|(k, id)| ((*k).to_owned(), (*id).clone())).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "each lifecycle event and the alert, and nothing else");
        let ids = counts(seen.delivered.iter().map(|e| e["id"].as_str().unwrap().to_owned()));
        assert!(ids.values().all(|n| *n == 1), "every event id delivered exactly once: {ids:?}");
        assert_eq!(ids.len(), expected.len());
        // Each event's first two attempts were answered 500 and retried.
        let attempts = counts(seen.attempts.iter().map(|(id, _)| id.clone()));
        assert!(ids.keys().all(|id| attempts[id] == 3), "{attempts:?}");
        for e in &seen.delivered {
            assert!(e["id"].as_str().unwrap().starts_with("evt_"));
            assert!(e["created_at"].is_string());
        }
        // No key material: no raw key, no digest, not even the display prefix.
        for raw in &seen.raw {
            for secret in [&a.key, &b.key, &rotated.key] {
                assert!(!raw.contains(secret.expose_secret()));
                assert!(!raw.contains(&secret.digest().to_hex()));
                assert!(!raw.contains(&secret.display_prefix()));
            }
        }
    });
    let alert = receiver.with(|s| s.delivered.iter().find(|e| e["type"] == "alert.new_network").cloned()).unwrap();
    assert_eq!(alert["data"]["kind"], "new_network");
    let updated = receiver.with(|s| s.delivered.iter().find(|e| e["type"] == "key.updated").cloned()).unwrap();
    assert_eq!((updated["data"]["name"].as_str(), &updated["data"]["changed"]), (Some("renamed"), &json!(["name"])));

    // The delivery log: every delivery delivered on its third attempt, newest first.
    let page = t.admin.webhook_deliveries(&hook.endpoint.id, None, None).await.unwrap();
    assert_eq!(page.deliveries.len(), expected.len());
    assert!(page.deliveries.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    for d in &page.deliveries {
        assert_eq!(d.state, DeliveryState::Delivered, "{d:?}");
        assert_eq!((d.attempts, d.last_status), (3, Some(204)));
        assert!(d.delivered_at.is_some() && d.next_attempt_at.is_none());
    }
    assert_eq!((page.pending, page.dropped), (0, 0));
    // Paged: two at a time, then the rest from `next_before`.
    let first = t.admin.webhook_deliveries(&hook.endpoint.id, None, Some(2)).await.unwrap();
    assert_eq!(first.deliveries.len(), 2);
    let rest = t.admin.webhook_deliveries(&hook.endpoint.id, first.next_before, Some(100)).await.unwrap();
    assert_eq!(rest.deliveries.len(), expected.len() - 2);
    assert!(rest.next_before.is_none());
    let stats = t.server.stats();
    assert_eq!(stats.webhook_delivered, expected.len() as u64);
    assert_eq!(stats.webhook_attempts_failed, 2 * expected.len() as u64);
}

#[tokio::test]
async fn a_redirect_is_a_failed_attempt_and_never_followed() {
    // The target a redirect points to: it must never be asked anything.
    let target_hits = Arc::new(AtomicUsize::new(0));
    let hits = target_hits.clone();
    let target = axum::Router::new().fallback(move || {
        hits.fetch_add(1, Ordering::SeqCst);
        async { "thanks" }
    });
    let target_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_url = format!("http://{}/stolen", target_listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(target_listener, target).await.unwrap() });

    let redirects = Arc::new(AtomicUsize::new(0));
    let counted = redirects.clone();
    let redirector = axum::Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        let location = target_url.clone();
        async move { (axum::http::StatusCode::TEMPORARY_REDIRECT, [("location", location)]) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, redirector).await.unwrap() });

    let t = TestServer::start_on(TestDb::sqlite(), |b| {
        b.allow_internal_webhooks(true).webhooks(WebhookConfig { max_attempts: 3, ..fast() })
    })
    .await;
    let hook = t.admin.create_webhook(&hook_url, ["key.created"], None).await.unwrap();
    t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();

    let failed = eventually(DEADLINE, || async {
        let page = t.admin.webhook_deliveries(&hook.endpoint.id, None, None).await.unwrap();
        page.deliveries.first().is_some_and(|d| d.state == DeliveryState::Failed)
    })
    .await;
    assert!(failed, "the delivery is given up on after its attempts");
    let page = t.admin.webhook_deliveries(&hook.endpoint.id, None, None).await.unwrap();
    let d = &page.deliveries[0];
    assert_eq!((d.attempts, d.last_status), (3, Some(307)));
    assert!(d.last_error.as_deref().unwrap().contains("redirect"), "{d:?}");
    assert_eq!(redirects.load(Ordering::SeqCst), 3);
    assert_eq!(target_hits.load(Ordering::SeqCst), 0, "the redirect target got nothing");
    assert_eq!(t.server.stats().webhook_failed, 1);
}

#[tokio::test]
async fn endpoints_are_validated_listed_filtered_audited_and_removed() {
    let receiver = Receiver::start(0).await;
    let t = TestServer::start_on(TestDb::sqlite(), |b| b.allow_internal_webhooks(true).webhooks(fast())).await;
    let post = |body: Value| {
        let req = t.http.post(t.url("/v1/webhooks")).bearer_auth(ADMIN).json(&body);
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    for (body, code) in [
        (json!({ "url": "ftp://127.0.0.1/hook" }), "invalid_url"),
        (json!({ "url": "http://user:pw@127.0.0.1/hook" }), "invalid_url"),
        (json!({ "url": format!("http://127.0.0.1/{}", "a".repeat(3000)) }), "invalid_url"),
        (json!({ "url": "not a url" }), "invalid_url"),
        (json!({ "url": receiver.url(), "events": ["key.exploded"] }), "invalid_events"),
        (json!({ "url": receiver.url(), "secret": "mine" }), "invalid_request"),
    ] {
        let (status, answer) = post(body.clone()).await;
        assert_eq!((status, answer["error"].as_str().unwrap()), (400, code), "{body} -> {answer}");
    }
    let unauthorized = t.http.get(t.url("/v1/webhooks")).bearer_auth("svc-test-token").send().await.unwrap();
    assert_eq!(unauthorized.status(), 401);

    let hook = t.admin.create_webhook(&receiver.url(), ["key.revoked"], Some("revocations")).await.unwrap();
    receiver.set_secret(&hook.secret);
    let listed = t.admin.list_webhooks().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id.as_str(), listed[0].events.as_slice()),
        (hook.endpoint.id.as_str(), &["key.revoked".to_owned()][..])
    );
    let raw_list = t.http.get(t.url("/v1/webhooks")).bearer_auth(ADMIN).send().await.unwrap().text().await.unwrap();
    assert!(!raw_list.contains(&hook.secret), "the secret is shown once, at creation");

    // Only the subscribed type arrives.
    let k = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    t.admin.revoke(&k.info.key_id).await.unwrap();
    assert!(eventually(DEADLINE, || async { !receiver.delivered().is_empty() }).await);
    let page = t.admin.webhook_deliveries(&hook.endpoint.id, None, None).await.unwrap();
    assert_eq!(page.deliveries.len(), 1);
    assert_eq!(page.deliveries[0].event_type, "key.revoked");
    assert_eq!(receiver.delivered()[0].1, "key.revoked");

    let removed = t.admin.delete_webhook(&hook.endpoint.id).await.unwrap();
    assert_eq!(removed.id, hook.endpoint.id);
    assert!(t.admin.list_webhooks().await.unwrap().is_empty());
    let gone =
        t.http.delete(t.url(&format!("/v1/webhooks/{}", hook.endpoint.id))).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(gone.status(), 404);
    let log = t
        .http
        .get(t.url(&format!("/v1/webhooks/{}/deliveries", hook.endpoint.id)))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(log.status(), 404);

    let audit = t.admin.audit(None).await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|r| r.action.as_str()).collect();
    assert!(actions.contains(&"webhook.create") && actions.contains(&"webhook.delete"), "{actions:?}");
    let created = audit.iter().find(|r| r.action == "webhook.create").unwrap();
    assert_eq!(created.changes["id"], hook.endpoint.id.as_str());
    assert!(!created.changes.to_string().contains(&hook.secret), "no secret in the audit log");
}

#[tokio::test]
async fn a_full_queue_drops_the_oldest_and_counts_them() {
    // Nothing is delivered (delivery off): the queue only grows.
    let config = WebhookConfig { enabled: false, max_pending: 3, ..fast() };
    let t = TestServer::start_on(TestDb::sqlite(), |b| b.allow_internal_webhooks(true).webhooks(config)).await;
    let hook = t.admin.create_webhook("http://127.0.0.1:9/never", ["key.created"], None).await.unwrap();
    for i in 0..5 {
        t.admin.create_key(new_key(&format!("owner{i}"), &["reports:read"])).await.unwrap();
    }
    let page = t.admin.webhook_deliveries(&hook.endpoint.id, None, None).await.unwrap();
    assert_eq!((page.pending, page.dropped), (3, 2));
    let states: Vec<DeliveryState> = page.deliveries.iter().map(|d| d.state).collect();
    use DeliveryState::{Dropped, Pending};
    assert_eq!(states, [Pending, Pending, Pending, Dropped, Dropped], "the two oldest were dropped");
    let listed = t.admin.list_webhooks().await.unwrap();
    assert_eq!((listed[0].pending, listed[0].dropped), (3, 2));
}

#[tokio::test]
async fn queued_deliveries_survive_a_restart() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let receiver = Receiver::start(0).await;
    // First run: delivery off, so the events stay in the outbox on disk.
    let first = TestServer::start_on(TestDb::Sqlite(dir.clone()), |b| {
        b.allow_internal_webhooks(true).webhooks(WebhookConfig { enabled: false, ..fast() })
    })
    .await;
    let hook = first.admin.create_webhook(&receiver.url(), Vec::<String>::new(), None).await.unwrap();
    receiver.set_secret(&hook.secret);
    let key = first.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    first.admin.revoke(&key.info.key_id).await.unwrap();
    first.server.shutdown().await;
    assert!(receiver.delivered().is_empty());

    let second =
        TestServer::start_on(TestDb::Sqlite(dir.clone()), |b| b.allow_internal_webhooks(true).webhooks(fast())).await;
    assert!(eventually(DEADLINE, || async { receiver.delivered().len() >= 2 }).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got: Vec<String> = receiver.delivered().into_iter().map(|(_, kind)| kind).collect();
    assert_eq!(got, ["key.created", "key.revoked"], "in order, once each");
    let page = second.admin.webhook_deliveries(&hook.endpoint.id, None, None).await.unwrap();
    assert!(page.deliveries.iter().all(|d| d.state == DeliveryState::Delivered && d.attempts == 1));
}

#[tokio::test]
async fn postgres_replicas_deliver_each_event_once() {
    let Some(db) = TestDb::postgres().await else { return };
    let receiver = Receiver::start(1).await;
    let one = TestServer::start_on(db.clone(), |b| b.allow_internal_webhooks(true).webhooks(fast())).await;
    let two = TestServer::start_on(db.clone(), |b: KeyServer| b.allow_internal_webhooks(true).webhooks(fast())).await;
    let hook = one.admin.create_webhook(&receiver.url(), ["key.created"], None).await.unwrap();
    receiver.set_secret(&hook.secret);
    let n = 30;
    for i in 0..n {
        let via = if i % 2 == 0 { &one } else { &two };
        via.admin.create_key(new_key(&format!("owner{i}"), &["reports:read"])).await.unwrap();
    }
    assert!(eventually(DEADLINE, || async { receiver.delivered().len() >= n }).await, "{}", receiver.delivered().len());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids = counts(receiver.delivered().into_iter().map(|(id, _)| id));
    assert_eq!(ids.len(), n);
    assert!(ids.values().all(|c| *c == 1), "no event delivered twice: {ids:?}");
    // Each event was attempted exactly twice (a 500, then a 204): never by both replicas.
    let attempts = receiver.with(|s| counts(s.attempts.iter().map(|(id, _)| id.clone())));
    assert!(attempts.values().all(|c| *c == 2), "{attempts:?}");
    let (s1, s2) = (one.server.stats(), two.server.stats());
    assert_eq!(s1.webhook_delivered + s2.webhook_delivered, n as u64);
}

#[tokio::test]
async fn the_cli_adds_lists_reads_the_log_of_and_removes_endpoints() {
    let receiver = Receiver::start(0).await;
    let t = TestServer::start_on(TestDb::sqlite(), |b| b.allow_internal_webhooks(true).webhooks(fast())).await;
    let run = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate-server"));
        cmd.arg("webhooks").args(args).args(["--url", &t.server.url()]).env("KEYGATE_ADMIN_TOKEN", ADMIN);
        async move {
            let out = cmd.output().await.unwrap();
            (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
        }
    };
    let (ok, out, err) =
        run(&["add", &receiver.url(), "--event", "key.created", "--description", "cli", "--json"]).await;
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    receiver.set_secret(created["secret"].as_str().unwrap());

    let (ok, out, _) = run(&["list"]).await;
    assert!(ok && out.contains(&id) && out.contains("key.created") && out.contains("cli"), "{out}");
    assert!(!out.contains(created["secret"].as_str().unwrap()), "the secret is shown only by `add`");

    t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    assert!(eventually(DEADLINE, || async { receiver.delivered().len() == 1 }).await);
    let (ok, out, _) = run(&["deliveries", &id]).await;
    assert!(ok && out.contains("key.created") && out.contains("delivered"), "{out}");

    let (ok, _, err) = run(&["add", "ftp://127.0.0.1/hook"]).await;
    assert!(!ok && err.contains("http:// or https://"), "{err}");
    let (ok, _, _) = run(&["remove", &id]).await;
    assert!(ok);
    let (ok, _, err) = run(&["remove", &id]).await;
    assert!(!ok && err.contains("no webhook"), "{err}");
}

#[tokio::test]
async fn a_patch_sends_key_updated_naming_what_changed_and_only_when_something_did() {
    let receiver = Receiver::start(0).await;
    let t = TestServer::start_on(TestDb::sqlite(), |b| b.allow_internal_webhooks(true).webhooks(fast())).await;
    t.admin.put_role("ops", ["deploy:run"]).await.unwrap();
    let hook = t.admin.create_webhook(&receiver.url(), ["key.updated", "key.disabled"], None).await.unwrap();
    receiver.set_secret(&hook.secret);
    let k = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let id = &k.info.key_id;
    let patches = [
        KeyPatch { scopes: Some(vec!["reports:read".into(), "reports:write".into()]), ..KeyPatch::default() },
        KeyPatch { roles: Some(vec!["ops".into()]), ..KeyPatch::default() },
        KeyPatch {
            expires_at: Some(Some(time::OffsetDateTime::now_utc() + time::Duration::days(30))),
            ..KeyPatch::default()
        },
        KeyPatch { meta: Some(json!({ "team": "billing" })), ..KeyPatch::default() },
        KeyPatch { ratelimit: Some(Some(keygate::RateLimit { limit: 100, period_s: 60 })), ..KeyPatch::default() },
        // Two fields at once, and a disable beside them: `key.disabled` and one `key.updated`.
        KeyPatch { name: Some("two".into()), meta: Some(json!({})), disabled: Some(true), ..KeyPatch::default() },
        // The same values again: nothing changes, nothing is sent.
        KeyPatch { name: Some("two".into()), meta: Some(json!({})), ..KeyPatch::default() },
        KeyPatch { ratelimit: Some(Some(keygate::RateLimit { limit: 100, period_s: 60 })), ..KeyPatch::default() },
    ];
    for p in &patches {
        t.admin.update_key(id, p).await.unwrap();
    }
    assert!(eventually(DEADLINE, || async { receiver.delivered().len() >= 7 }).await, "{:?}", receiver.delivered());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got: Vec<(String, Value)> = receiver.with(|s| {
        s.delivered.iter().map(|e| (e["type"].as_str().unwrap().to_owned(), e["data"]["changed"].clone())).collect()
    });
    let mut want: Vec<(String, Value)> = [
        ("key.updated", json!(["scopes"])),
        ("key.updated", json!(["roles"])),
        ("key.updated", json!(["expires_at"])),
        ("key.updated", json!(["meta"])),
        // `ratelimit` is the limit named `requests`: both changed.
        ("key.updated", json!(["ratelimit", "limits"])),
        ("key.disabled", Value::Null),
        ("key.updated", json!(["name", "meta"])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut got_sorted = got.clone();
    got_sorted.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.to_string().cmp(&b.1.to_string())));
    want.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.to_string().cmp(&b.1.to_string())));
    assert_eq!(got_sorted, want, "in order of sending: {got:?}");
}

#[tokio::test]
async fn urls_on_internal_addresses_are_refused_unless_allowed() {
    let t = TestServer::start_on(TestDb::sqlite(), |b| b.webhooks(WebhookConfig { enabled: false, ..fast() })).await;
    let post = |url: &str| {
        let req = t.http.post(t.url("/v1/webhooks")).bearer_auth(ADMIN).json(&json!({ "url": url }));
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    for url in [
        "http://127.0.0.1:9/hook",
        "http://127.9.9.9/",
        "http://[::1]:8080/hook",
        "http://10.1.2.3/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0:7700/",
        "http://100.64.0.1/",
        "http://[fe80::1]/",
        "http://[fd12:3456::1]/",
        "http://[::ffff:10.0.0.1]/",
        "http://[::]/",
        // Spellings the URL parser turns into 127.0.0.1.
        "http://2130706433/",
        "http://0x7f.1/",
        "http://localhost:7700/",
        "http://LOCALHOST./",
        "http://hooks.localhost/",
    ] {
        let (status, answer) = post(url).await;
        assert_eq!((status, answer["error"].as_str()), (400, Some("invalid_url")), "{url} -> {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains("internal address") && message.contains("--webhook-allow-internal"), "{message}");
    }
    for url in ["https://hooks.example.com/keygate", "http://203.0.113.7/hook", "http://[2001:db8::1]/hook"] {
        let (status, answer) = post(url).await;
        assert_eq!(status, 201, "{url} -> {answer}");
    }

    let allowing = TestServer::start_on(TestDb::sqlite(), |b| b.allow_internal_webhooks(true).webhooks(fast())).await;
    let res = allowing.admin.create_webhook("http://127.0.0.1:9/hook", ["key.created"], None).await;
    assert!(res.is_ok(), "{res:?}");
}

#[tokio::test]
async fn an_internal_endpoint_stored_earlier_is_not_sent_to_once_refused() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let receiver = Receiver::start(0).await;
    let first = TestServer::start_on(TestDb::Sqlite(dir.clone()), |b| {
        b.allow_internal_webhooks(true).webhooks(WebhookConfig { enabled: false, ..fast() })
    })
    .await;
    let hook = first.admin.create_webhook(&receiver.url(), ["key.created"], None).await.unwrap();
    first.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    first.server.shutdown().await;

    // Restarted without allowing internal addresses: the attempt fails before any request.
    let second =
        TestServer::start_on(TestDb::Sqlite(dir.clone()), |b| b.webhooks(WebhookConfig { max_attempts: 2, ..fast() }))
            .await;
    let failed = eventually(DEADLINE, || async {
        let page = second.admin.webhook_deliveries(&hook.endpoint.id, None, None).await.unwrap();
        page.deliveries.first().is_some_and(|d| d.state == DeliveryState::Failed)
    })
    .await;
    assert!(failed, "the delivery is given up on");
    let page = second.admin.webhook_deliveries(&hook.endpoint.id, None, None).await.unwrap();
    let d = &page.deliveries[0];
    assert_eq!(d.last_status, None);
    assert!(d.last_error.as_deref().unwrap().contains("internal address (loopback)"), "{d:?}");
    assert_eq!(receiver.with(|s| s.attempts.len()), 0, "the receiver was never asked");
}

/// The endpoint cap holds when many are added at once, through two replicas on
/// PostgreSQL (where each transaction would otherwise count only what committed before
/// it) and on SQLite.
async fn the_cap_holds_under_concurrent_adds(db: TestDb) {
    let config = |b: KeyServer| b.webhooks(WebhookConfig { enabled: false, ..fast() });
    let one = TestServer::start_on(db.clone(), config).await;
    let two = TestServer::start_on(db.clone(), config).await;
    let url = "https://hooks.example.com/keygate";
    for _ in 0..995 {
        one.admin.create_webhook(url, ["key.created"], None).await.unwrap();
    }
    let adds = (0..20).map(|i| {
        let t = if i % 2 == 0 { &one } else { &two };
        async move { t.admin.create_webhook(url, ["key.created"], None).await }
    });
    let results = futures_util::future::join_all(adds).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 5, "exactly up to the cap of 1 000");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(r.to_string().contains("at most 1000 webhook endpoints"), "{r}");
    }
    assert_eq!(one.admin.list_webhooks().await.unwrap().len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_cap_holds_under_concurrent_adds_on_sqlite() {
    the_cap_holds_under_concurrent_adds(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_cap_holds_under_concurrent_adds_on_postgres() {
    let Some(db) = TestDb::postgres().await else { return };
    the_cap_holds_under_concurrent_adds(db).await;
}
