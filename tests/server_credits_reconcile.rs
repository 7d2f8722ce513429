//! Credit revisions and the credit reconciler (issue 16), against a real key service
//! and a real Redis (`KEYGATE_TEST_REDIS_URL`; the Redis tests skip with a notice when
//! it is unset): a revision changes on every operator set and on nothing else, both
//! verify answers carry it, and the reconciler writes Redis's count into the store only
//! when it started from the current revision, on SQLite and on PostgreSQL, and keeps
//! going through a Redis that does not answer.
#![cfg(all(feature = "server", feature = "redis"))]

mod server_support;

use std::time::Duration;

use keygate::client::{KeyPatch, NewKey, OwnerQuota};
use keygate::quota::{Credits, Limit, Refill};
use serde_json::{Value, json};
use server_support::{SERVICE, TestDb, TestServer, eventually, new_key};

const WAIT: Duration = Duration::from_secs(15);
const PASS: Duration = Duration::from_millis(100);

fn redis_url() -> Option<String> {
    let url = std::env::var("KEYGATE_TEST_REDIS_URL").ok().filter(|u| !u.is_empty());
    if url.is_none() {
        eprintln!("skipped: KEYGATE_TEST_REDIS_URL is not set");
    }
    url
}

/// A prefix of this test's own, so that tests running at once never share a hash.
fn unique_prefix() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("kgtest:{hex}:")
}

async fn redis(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Writes a credits hash as the fleet-wide engine does; it expires, so that a failed
/// test leaves nothing behind for long.
async fn set_count(conn: &mut redis::aio::MultiplexedConnection, key: &str, rem: i64, rev: &str) {
    redis::pipe()
        .cmd("HSET")
        .arg(key)
        .arg("rem")
        .arg(rem)
        .arg("rev")
        .arg(rev)
        .arg("at")
        .arg(0)
        .ignore()
        .cmd("EXPIRE")
        .arg(key)
        .arg(600)
        .ignore()
        .query_async::<()>(conn)
        .await
        .unwrap();
}

fn credits(remaining: u64) -> Option<Credits> {
    Some(Credits { remaining, refill: None })
}

async fn batch_answer(t: &TestServer, key: &keygate::ApiKey) -> Value {
    let body = json!({ "digests": [key.digest().to_hex()] });
    let res = t.http.post(t.url("/v1/keys/verify-batch")).bearer_auth(SERVICE).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let mut v: Value = res.json().await.unwrap();
    v["answers"][0].take()
}

#[tokio::test]
async fn a_revision_changes_on_every_set_of_credits_and_reaches_both_verify_answers() {
    revisions(TestServer::start().await).await;
}

#[tokio::test]
async fn a_revision_changes_on_every_set_of_credits_on_postgres() {
    let Some(db) = TestDb::postgres().await else {
        eprintln!("skipped: KEYGATE_TEST_POSTGRES_URL is not set");
        return;
    };
    revisions(TestServer::start_on(db, |b| b).await).await;
}

async fn revisions(t: TestServer) {
    let made = t.admin.create_key(NewKey { credits: credits(1000), ..new_key("acme", &["a:b"]) }).await.unwrap();
    let r1 = made.info.credits_revision.expect("a key created with credits has a revision");
    assert_eq!(made.info.credits_reconciled_at, None);
    let v = t.verify(made.key.expose_secret()).await;
    assert_eq!(v["credits_revision"], json!(r1), "{v}");
    assert_eq!(batch_answer(&t, &made.key).await["credits_revision"], json!(r1));

    // Changes of anything else keep it.
    let rename = KeyPatch { name: Some("n".into()), ..Default::default() };
    assert_eq!(t.admin.update_key(&made.key_id, &rename).await.unwrap().credits_revision, Some(r1));
    let limited = KeyPatch { limits: Some(vec![Limit::new("requests", 5, 1)]), ..Default::default() };
    assert_eq!(t.admin.update_key(&made.key_id, &limited).await.unwrap().credits_revision, Some(r1));

    // Every set of credits is a new, larger one, the same credits included.
    let same = KeyPatch { credits: Some(credits(1000)), ..Default::default() };
    let r2 = t.admin.update_key(&made.key_id, &same).await.unwrap().credits_revision.unwrap();
    assert!(r2 > r1, "{r2} after {r1}");
    let refilled = KeyPatch {
        credits: Some(Some(Credits { remaining: 5, refill: Some(Refill::Daily { amount: 5 }) })),
        ..Default::default()
    };
    let r3 = t.admin.update_key(&made.key_id, &refilled).await.unwrap().credits_revision.unwrap();
    assert!(r3 > r2);
    assert_eq!(t.admin.get_key(&made.key_id).await.unwrap().credits_revision, Some(r3));
    assert_eq!(t.verify(made.key.expose_secret()).await["credits_revision"], json!(r3));
    let audit = t.admin.audit(None).await.unwrap();
    let last = audit.iter().rev().find(|a| a.action == "key.update").unwrap();
    assert_eq!(last.changes["credits_revision"], json!({ "from": r2, "to": r3 }));

    // A key without credits has none, and its answer carries none.
    let plain = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    assert_eq!(plain.info.credits_revision, None);
    let v = t.verify(plain.key.expose_secret()).await;
    assert!(v.get("credits_revision").is_none(), "{v}");

    // An owner's: a PUT that changes the credits is a set; one that keeps them is not.
    assert_eq!(t.admin.get_owner("acme").await.unwrap().credits_revision, None);
    let quota = OwnerQuota { credits: credits(50), ..OwnerQuota::default() };
    let o1 = t.admin.put_owner("acme", &quota).await.unwrap().credits_revision.unwrap();
    let v = t.verify(made.key.expose_secret()).await;
    assert_eq!((v["owner_credits_revision"].clone(), v["credits_revision"].clone()), (json!(o1), json!(r3)));
    assert_eq!(batch_answer(&t, &made.key).await["owner_credits_revision"], json!(o1));
    let limits_only = OwnerQuota { limits: vec![Limit::new("requests", 9, 1)], ..quota.clone() };
    assert_eq!(t.admin.put_owner("acme", &limits_only).await.unwrap().credits_revision, Some(o1));
    let more = OwnerQuota { credits: credits(60), ..limits_only };
    let o2 = t.admin.put_owner("acme", &more).await.unwrap().credits_revision.unwrap();
    assert!(o2 > o1);
    assert_eq!(t.admin.get_owner("acme").await.unwrap().credits_revision, Some(o2));
    assert_eq!(t.verify(made.key.expose_secret()).await["owner_credits_revision"], json!(o2));
}

#[tokio::test]
async fn the_reconciler_writes_the_count_of_the_current_revision_into_the_store() {
    let Some(url) = redis_url() else { return };
    reconciles(TestDb::sqlite(), &url).await;
}

#[tokio::test]
async fn the_reconciler_writes_conditionally_on_postgres() {
    let Some(url) = redis_url() else { return };
    let Some(db) = TestDb::postgres().await else {
        eprintln!("skipped: KEYGATE_TEST_POSTGRES_URL is not set");
        return;
    };
    reconciles(db, &url).await;
}

/// Waits until the reconciler has run `passes` more passes than now.
async fn passes(t: &TestServer, passes: u64) {
    let until = t.server.stats().credits_reconcile_passes + passes;
    assert!(eventually(WAIT, || async { t.server.stats().credits_reconcile_passes >= until }).await, "no passes");
}

async fn reconciles(db: TestDb, url: &str) {
    let prefix = unique_prefix();
    let t = TestServer::start_on(db, |b| {
        b.reconcile_credits(url, PASS).redis_prefix(&prefix).metrics_listen("127.0.0.1:0".parse().unwrap())
    })
    .await;
    let mut conn = redis(url).await;
    let refill = Some(Refill::Every { interval_s: 3600, amount: 1000 });
    let spent = t
        .admin
        .create_key(NewKey { credits: Some(Credits { remaining: 1000, refill }), ..new_key("acme", &["a:b"]) })
        .await
        .unwrap();
    let stale = t.admin.create_key(NewKey { credits: credits(1000), ..new_key("acme", &["a:b"]) }).await.unwrap();
    let owner = t.admin.put_owner("acme", &OwnerQuota { credits: credits(500), ..Default::default() }).await.unwrap();
    let (r_spent, r_stale, r_owner) =
        (spent.info.credits_revision.unwrap(), stale.info.credits_revision.unwrap(), owner.credits_revision.unwrap());
    let audit_before = t.admin.audit(None).await.unwrap().len();

    set_count(&mut conn, &format!("{prefix}credits:k:{}", spent.key_id), 640, &r_spent.to_string()).await;
    // A count from before the operator's last set: not this revision's.
    set_count(&mut conn, &format!("{prefix}credits:k:{}", stale.key_id), 1, &(r_stale - 1).to_string()).await;
    set_count(&mut conn, &format!("{prefix}credits:o:acme"), 77, &r_owner.to_string()).await;

    assert!(
        eventually(WAIT, || async {
            let s = t.server.stats();
            s.credits_reconciled_keys >= 1 && s.credits_reconciled_owners >= 1
        })
        .await,
        "nothing reconciled: {:?}",
        t.server.stats()
    );
    passes(&t, 2).await;
    let shown = t.admin.get_key(&spent.key_id).await.unwrap();
    assert_eq!(shown.credits, Some(Credits { remaining: 640, refill }), "the refill stays");
    assert_eq!(shown.credits_revision, Some(r_spent), "reconciling is not a set");
    assert!(shown.credits_reconciled_at.is_some());
    let v = t.verify(spent.key.expose_secret()).await;
    assert_eq!((v["credits"]["remaining"].clone(), v["credits_revision"].clone()), (json!(640), json!(r_spent)));
    let left = t.admin.get_key(&stale.key_id).await.unwrap();
    assert_eq!((left.credits, left.credits_reconciled_at), (credits(1000), None), "an older revision's count");
    let o = t.admin.get_owner("acme").await.unwrap();
    assert_eq!((o.credits, o.credits_revision), (credits(77), Some(r_owner)));
    assert!(o.credits_reconciled_at.is_some());
    // Written once: the same count again changes nothing, and nothing is audited.
    let s = t.server.stats();
    assert_eq!((s.credits_reconciled_keys, s.credits_reconciled_owners), (1, 1));
    assert_eq!(t.admin.audit(None).await.unwrap().len(), audit_before);
    let metrics = t.server.state().render_metrics().unwrap();
    assert!(metrics.contains("keygate_server_credits_reconciled_total{holder=\"key\"} 1"), "{metrics}");
    assert!(metrics.contains("keygate_server_credits_reconcile_errors_total{kind=\"redis\"} 0"), "{metrics}");

    // The engine counts on; the store follows.
    set_count(&mut conn, &format!("{prefix}credits:k:{}", spent.key_id), 600, &r_spent.to_string()).await;
    assert!(
        eventually(WAIT, || async { t.admin.get_key(&spent.key_id).await.unwrap().credits.unwrap().remaining == 600 })
            .await
    );

    // An operator's set wins over the count of the revision before it.
    let set = KeyPatch { credits: Some(credits(2000)), ..Default::default() };
    let after_set = t.admin.update_key(&spent.key_id, &set).await.unwrap();
    assert!(after_set.credits_revision.unwrap() > r_spent);
    assert_eq!(after_set.credits_reconciled_at, None);
    passes(&t, 3).await;
    let shown = t.admin.get_key(&spent.key_id).await.unwrap();
    assert_eq!((shown.credits, shown.credits_revision), (credits(2000), after_set.credits_revision));

    // A revoked key is left alone.
    t.admin.revoke(&stale.key_id).await.unwrap();
    set_count(&mut conn, &format!("{prefix}credits:k:{}", stale.key_id), 3, &r_stale.to_string()).await;
    passes(&t, 3).await;
    assert_eq!(t.admin.get_key(&stale.key_id).await.unwrap().credits, credits(1000));
    assert_eq!(t.server.stats().credits_reconcile_redis_errors, 0);
}

#[tokio::test]
async fn a_redis_that_does_not_answer_is_retried_while_the_service_serves_on() {
    let Some(url) = redis_url() else { return };
    // A port nothing listens on yet: taken and let go.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let prefix = unique_prefix();
    let t = TestServer::start_on(TestDb::sqlite(), |b| {
        b.reconcile_credits(format!("redis://{addr}"), PASS).redis_prefix(&prefix)
    })
    .await;
    let made = t.admin.create_key(NewKey { credits: credits(100), ..new_key("acme", &["a:b"]) }).await.unwrap();
    let rev = made.info.credits_revision.unwrap();
    assert!(
        eventually(WAIT, || async { t.server.stats().credits_reconcile_redis_errors >= 2 }).await,
        "{:?}",
        t.server.stats()
    );
    assert_eq!(t.code(made.key.expose_secret()).await, "VALID");
    assert_eq!(t.admin.get_key(&made.key_id).await.unwrap().credits, credits(100));

    // Redis appears at that address (the real one, behind a forwarder): the next pass
    // reconciles.
    let mut conn = redis(&url).await;
    set_count(&mut conn, &format!("{prefix}credits:k:{}", made.key_id), 42, &rev.to_string()).await;
    let target = url.trim_start_matches("redis://").split('/').next().unwrap().to_owned();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let forwarder = tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { return };
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    assert!(
        eventually(WAIT, || async { t.admin.get_key(&made.key_id).await.unwrap().credits.unwrap().remaining == 42 })
            .await,
        "{:?}",
        t.server.stats()
    );
    assert_eq!(t.server.stats().credits_reconciled_keys, 1);
    forwarder.abort();
}

#[tokio::test]
async fn a_bad_redis_url_fails_the_start() {
    let err = keygate::server::KeyServer::builder()
        .reconcile_credits("not a url", PASS)
        .listen("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Redis URL"), "{err}");
    let err = keygate::server::KeyServer::builder()
        .reconcile_credits("redis://127.0.0.1:1", Duration::ZERO)
        .listen("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("interval"), "{err}");
}
