//! Expiring-soon alerts and the rotation policy against the real key service, with
//! short windows and a fast sweep configured through the builder.

mod server_support;
mod webhook_support;

use std::time::Duration;

use keygate::client::NewKey;
use keygate::server::{AlertConfig, RotationPolicy, WebhookConfig};
use keygate::wire::AlertKind;
use server_support::{Events, TestDb, TestServer, eventually, new_key};
use time::OffsetDateTime;
use webhook_support::Receiver;

const DEADLINE: Duration = Duration::from_secs(20);

fn fast_sweep(expiring_within: Duration) -> AlertConfig {
    AlertConfig { expiring_within, sweep_interval: Duration::from_millis(50), ..AlertConfig::default() }
}

fn fast_webhooks() -> WebhookConfig {
    WebhookConfig { poll_interval: Duration::from_millis(20), ..WebhookConfig::default() }
}

fn expiring_in(owner: &str, d: Duration) -> NewKey {
    NewKey { expires_at: Some(OffsetDateTime::now_utc() + d), ..new_key(owner, &["reports:read"]) }
}

#[tokio::test]
async fn a_key_expiring_within_the_window_alerts_once_and_one_outside_never() {
    let receiver = Receiver::start(0).await;
    let t = TestServer::start_on(TestDb::sqlite(), |b| {
        b.alerts(fast_sweep(Duration::from_secs(3600))).webhooks(fast_webhooks()).allow_internal_webhooks(true)
    })
    .await;
    let hook = t.admin.create_webhook(&receiver.url(), ["key.expiring"], None).await.unwrap();
    receiver.set_secret(&hook.secret);
    let soon = t.admin.create_key(expiring_in("soon", Duration::from_secs(30 * 60))).await.unwrap();
    let later = t.admin.create_key(expiring_in("later", Duration::from_secs(3 * 3600))).await.unwrap();
    let never = t.admin.create_key(new_key("never", &["reports:read"])).await.unwrap();

    let expiring = |alerts: &[keygate::wire::Alert], key: &str| {
        alerts.iter().filter(|a| a.kind == AlertKind::KeyExpiring && a.key_id == key).count()
    };
    assert!(
        eventually(DEADLINE, || async { expiring(&t.admin.alerts().await.unwrap(), &soon.info.key_id) == 1 }).await,
        "the key expiring in 30 minutes raises key_expiring"
    );
    assert!(eventually(DEADLINE, || async { !receiver.delivered().is_empty() }).await);
    // Several more sweeps (50 ms apart) raise nothing new.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let alerts = t.admin.alerts().await.unwrap();
    assert_eq!(expiring(&alerts, &soon.info.key_id), 1, "once per key: {alerts:?}");
    assert_eq!(expiring(&alerts, &later.info.key_id), 0, "3 hours away is outside the 1 hour window");
    assert_eq!(expiring(&alerts, &never.info.key_id), 0);
    let alert = alerts.iter().find(|a| a.kind == AlertKind::KeyExpiring).unwrap();
    assert_eq!(alert.minute.unix_timestamp() % 60, 0);
    assert_eq!(alert.minute.unix_timestamp() / 60, soon.info.expires_at.unwrap().unix_timestamp() / 60);
    assert!(alert.detail.contains("expires at"), "{}", alert.detail);

    let delivered = receiver.with(|s| s.delivered.clone());
    assert_eq!(delivered.len(), 1, "one key.expiring webhook: {delivered:?}");
    assert_eq!(delivered[0]["type"], "key.expiring");
    assert_eq!(delivered[0]["data"]["key_id"], soon.info.key_id.as_str());
    assert_eq!(delivered[0]["data"]["kind"], "key_expiring");
    assert_eq!(receiver.with(|s| s.bad_signatures), 0);
}

#[tokio::test]
async fn the_rotation_policy_alerts_and_expires_keys_after_the_grace() {
    let policy = RotationPolicy::default()
        .max_age("live", Duration::from_secs(1))
        .max_age_for_owner("patient", Duration::from_secs(3600))
        .expire_after(Duration::from_secs(1));
    let receiver = Receiver::start(0).await;
    let t = TestServer::start_on(TestDb::sqlite(), |b| {
        b.alerts(fast_sweep(Duration::ZERO))
            .rotation_policy(policy)
            .webhooks(fast_webhooks())
            .allow_internal_webhooks(true)
    })
    .await;
    let hook = t.admin.create_webhook(&receiver.url(), ["key.expired", "alert.key_max_age"], None).await.unwrap();
    receiver.set_secret(&hook.secret);
    let mut events = Events::connect(&t).await;
    let old = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let test_env = t
        .admin
        .create_key(NewKey { environment: Some("test".into()), ..new_key("acme", &["reports:read"]) })
        .await
        .unwrap();
    let patient = t.admin.create_key(new_key("patient", &["reports:read"])).await.unwrap();

    // Past 1 s: the alert. Past 1 s more: the key is expired, by `policy`.
    let aged = |alerts: &[keygate::wire::Alert], key: &str| {
        alerts.iter().filter(|a| a.kind == AlertKind::KeyMaxAge && a.key_id == key).count()
    };
    assert!(eventually(DEADLINE, || async { aged(&t.admin.alerts().await.unwrap(), &old.info.key_id) == 1 }).await);
    assert!(eventually(DEADLINE, || async { t.code(old.key.expose_secret()).await == "EXPIRED" }).await);

    // Middlewares hear about it on the event stream, so that their caches drop it.
    let mut heard = false;
    while let Some((name, data)) = events.next_change(DEADLINE).await {
        if name == "updated" && data["key_id"] == old.info.key_id.as_str() {
            heard = true;
            break;
        }
    }
    assert!(heard, "an `updated` event for the expired key");

    let audit = t.admin.audit(None).await.unwrap();
    let by_policy: Vec<_> = audit.iter().filter(|r| r.actor == "policy").collect();
    assert_eq!(by_policy.len(), 1, "{audit:?}");
    assert_eq!(
        (by_policy[0].action.as_str(), by_policy[0].key_id.as_deref()),
        ("key.update", Some(old.info.key_id.as_str()))
    );
    assert!(by_policy[0].changes["expires_at"]["to"].is_string());
    assert!(by_policy[0].changes["expires_at"]["from"].is_null());

    // More sweeps: still one alert, one policy change; the other keys are untouched.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alerts = t.admin.alerts().await.unwrap();
    assert_eq!(aged(&alerts, &old.info.key_id), 1, "once per secret: {alerts:?}");
    assert_eq!(aged(&alerts, &test_env.info.key_id), 0, "no maximum for `test`");
    assert_eq!(aged(&alerts, &patient.info.key_id), 0, "the owner's hour wins over the environment's second");
    assert_eq!(t.code(test_env.key.expose_secret()).await, "VALID");
    assert_eq!(t.code(patient.key.expose_secret()).await, "VALID");
    assert_eq!(t.admin.audit(None).await.unwrap().iter().filter(|r| r.actor == "policy").count(), 1);
    assert_eq!(t.server.stats().keys_expired_by_policy, 1);

    // Webhooks: the alert, then the expiry, once each.
    assert!(eventually(DEADLINE, || async { receiver.delivered().len() >= 2 }).await);
    let kinds: Vec<String> = receiver.delivered().into_iter().map(|(_, kind)| kind).collect();
    assert_eq!(kinds, ["alert.key_max_age", "key.expired"]);
    let expired = receiver.with(|s| s.delivered[1].clone());
    assert_eq!(expired["data"]["key_id"], old.info.key_id.as_str());
    assert_eq!(expired["data"]["actor"], "policy");
}

#[tokio::test]
async fn postgres_replicas_expire_a_key_once() {
    let Some(db) = TestDb::postgres().await else { return };
    let policy =
        || RotationPolicy::default().max_age("live", Duration::from_secs(1)).expire_after(Duration::from_secs(1));
    let one =
        TestServer::start_on(db.clone(), |b| b.alerts(fast_sweep(Duration::ZERO)).rotation_policy(policy())).await;
    let two =
        TestServer::start_on(db.clone(), |b| b.alerts(fast_sweep(Duration::ZERO)).rotation_policy(policy())).await;
    let mut keys = Vec::new();
    for i in 0..5 {
        keys.push(one.admin.create_key(new_key(&format!("o{i}"), &["a:b"])).await.unwrap());
    }
    for k in &keys {
        assert!(eventually(DEADLINE, || async { two.code(k.key.expose_secret()).await == "EXPIRED" }).await);
    }
    // Several more sweeps of both replicas.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let audit = one.admin.audit(None).await.unwrap();
    let alerts = one.admin.alerts().await.unwrap();
    for k in &keys {
        let id = Some(k.info.key_id.as_str());
        let changes = audit.iter().filter(|r| r.actor == "policy" && r.key_id.as_deref() == id).count();
        assert_eq!(changes, 1, "expired once, by one replica");
        let raised = alerts.iter().filter(|a| a.key_id == k.info.key_id && a.kind == AlertKind::KeyMaxAge).count();
        assert_eq!(raised, 1);
    }
    assert_eq!(one.server.stats().keys_expired_by_policy + two.server.stats().keys_expired_by_policy, 5);
}

#[tokio::test]
async fn rotation_restarts_the_age() {
    // Alert only, no expiry; max age 2 s.
    let policy = RotationPolicy::default().max_age("live", Duration::from_secs(2));
    let t =
        TestServer::start_on(TestDb::sqlite(), |b| b.alerts(fast_sweep(Duration::ZERO)).rotation_policy(policy)).await;
    let key = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let count = || async {
        t.admin
            .alerts()
            .await
            .unwrap()
            .iter()
            .filter(|a| a.kind == AlertKind::KeyMaxAge && a.key_id == key.info.key_id)
            .count()
    };
    assert!(eventually(DEADLINE, || async { count().await == 1 }).await);
    let rotated = t.admin.rotate(&key.info.key_id, 0).await.unwrap();
    // The new secret is young: no new alert until it, too, is 2 s old; then one more.
    assert_eq!(count().await, 1);
    assert!(eventually(DEADLINE, || async { count().await == 2 }).await, "the rotated secret ages again");
    assert_eq!(t.code(rotated.key.expose_secret()).await, "VALID", "no grace configured: alerts only");
}
