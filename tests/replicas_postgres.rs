//! Several key-service replicas on one PostgreSQL database:
//! migrations raced at start, changes fanned out through `LISTEN/NOTIFY` to every
//! replica's event stream exactly once, usage ingested concurrently by two replicas,
//! a lost `LISTEN` connection, and a replica killed under a middleware.
//!
//! Each test runs on a schema of its own (so on a channel of its own) on
//! `KEYGATE_TEST_POSTGRES_URL`, and is skipped with a notice when it is unset.

mod server_support;

use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::RevocationListener;
use keygate::client::{KeyPatch, NewKey};
use keygate::server::PostgresStore;
use keygate::{ApiKey, CachedVerifier, HttpVerifier, Outcome, Reason, UsageEvent, Verdict, Verifier};
use serde_json::{Value, json};
use server_support::{ADMIN, Events, SERVICE, TestDb, TestServer, new_key};
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, BufReader};

const LIMIT: Duration = Duration::from_secs(10);

async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn pg_schema(db: &TestDb) -> &server_support::PgSchema {
    match db {
        TestDb::Postgres(schema) => schema,
        TestDb::Sqlite(_) => unreachable!("PostgreSQL tests run on PostgreSQL"),
    }
}

fn middleware(urls: &[&str], ttl: Duration) -> (HttpVerifier, CachedVerifier<HttpVerifier>) {
    let http = HttpVerifier::builder(urls.to_vec()).service_token(SERVICE).build().unwrap();
    let cache = CachedVerifier::builder(http.clone()).positive_ttl(ttl).negative_ttl(Duration::from_secs(5)).build();
    (http, cache)
}

async fn code(v: &impl Verifier, key: &ApiKey) -> Result<&'static str, String> {
    match tokio::time::timeout(LIMIT, v.verify(key)).await.expect("verify hung") {
        Ok(Verdict::Valid(_)) => Ok("VALID"),
        Ok(Verdict::Invalid { reason, .. }) => Ok(reason.code()),
        Err(e) => Err(e.to_string()),
    }
}

/// The next change on a stream, heartbeats skipped.
async fn change(events: &mut Events) -> (String, Value) {
    events.next_change(LIMIT).await.expect("stream open")
}

/// Nothing but heartbeats for `quiet`.
async fn no_more_changes(events: &mut Events, quiet: Duration) {
    let until = tokio::time::Instant::now() + quiet;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        match events.within(left).await {
            Err(_) => return,
            Ok(Some((name, _))) if name == "heartbeat" => {}
            Ok(other) => panic!("unexpected event: {other:?}"),
        }
    }
}

#[tokio::test]
async fn replicas_starting_together_migrate_once_and_the_audit_is_append_only() {
    let Some(db) = TestDb::postgres().await else { return };
    let url = db.url();
    let stores = futures_util::future::join_all((0..6).map(|_| PostgresStore::open(&url))).await;
    let stores: Vec<PostgresStore> = stores.into_iter().map(|s| s.expect("every replica starts")).collect();
    let pool = stores[0].pool();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version").fetch_all(pool).await.unwrap();
    // Every migration in the source tree, each once (the list follows new migrations).
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/server/store/migrations/postgres");
    let mut expected: Vec<i64> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().split('_').next().unwrap().parse().unwrap())
        .collect();
    expected.sort();
    assert!(expected.starts_with(&[1, 2]));
    assert_eq!(versions, expected, "each migration applied once");
    assert_eq!(stores[0].schema(), pg_schema(&db).name);
    assert_eq!(stores[0].channel(), format!("keygate_events_{}", pg_schema(&db).name));

    let t = TestServer::start_on(db.clone(), |b| b).await;
    let k = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    t.admin.revoke(&k.key_id).await.unwrap();
    for sql in ["UPDATE audit SET actor = 'mallory'", "DELETE FROM audit", "TRUNCATE audit"] {
        let err = sqlx::query(sql).execute(pool).await.expect_err(sql).to_string();
        assert!(err.contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(t.admin.audit(None).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_replica_b_is_refused_by_a_middleware_on_replica_a_within_a_second() {
    let Some(db) = TestDb::postgres().await else { return };
    let a = TestServer::start_on(db.clone(), |b| b).await;
    let b = TestServer::start_on(db.clone(), |b| b).await;
    assert!(a.server.stats().change_feed_connected && b.server.stats().change_feed_connected);
    let created = b.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();

    // The middleware knows replica A only, and caches valid verdicts for 10 minutes.
    let (_, cache) = middleware(&[&a.server.url()], Duration::from_secs(600));
    let listener = RevocationListener::builder(a.server.url()).service_token(SERVICE).spawn(&cache).unwrap();
    eventually("listener connected to A", LIMIT, async || listener.is_connected()).await;
    assert_eq!(code(&cache, &created.key).await.unwrap(), "VALID");
    let calls = a.server.stats().verify_calls;
    assert_eq!(code(&cache, &created.key).await.unwrap(), "VALID");
    assert_eq!(a.server.stats().verify_calls, calls, "served from the cache");

    let started = Instant::now();
    b.admin.revoke(&created.key_id).await.unwrap();
    let mut refused = None;
    while started.elapsed() < Duration::from_secs(1) {
        if code(&cache, &created.key).await.unwrap() == Reason::Revoked.code() {
            refused = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = refused.expect("refused within 1 s of the revocation through replica B");
    println!("revocation through B refused by the middleware on A after {refused:?}");
    assert!(a.server.stats().events_forwarded >= 1);
    assert_eq!(listener.stats().invalidations, 1);
}

#[tokio::test]
async fn every_change_reaches_the_streams_of_every_replica_exactly_once() {
    let Some(db) = TestDb::postgres().await else { return };
    let a = TestServer::start_on(db.clone(), |b| b).await;
    let b = TestServer::start_on(db.clone(), |b| b).await;
    a.admin.put_role("ops", ["deploy:run"]).await.unwrap();
    let k1 = a.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let k2 = a.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let k3 = a.admin.create_key(NewKey { roles: vec!["ops".into()], ..new_key("acme", &["a:b"]) }).await.unwrap();
    let mut on_a = Events::connect(&a).await;
    let mut on_b = Events::connect(&b).await;

    let key = |k: &keygate::client::CreatedKey| json!({ "key_id": k.key_id });
    a.admin.revoke(&k1.key_id).await.unwrap();
    b.admin.update_key(&k2.key_id, &KeyPatch { disabled: Some(true), ..Default::default() }).await.unwrap();
    a.admin.rotate(&k2.key_id, 0).await.unwrap();
    b.admin.put_role("ops", ["deploy:run", "deploy:rollback"]).await.unwrap();
    // A refused change, and a repeated revocation, publish nothing.
    assert!(b.admin.rotate(&k1.key_id, 0).await.is_err());
    assert!(b.admin.revoke_key(&k1.key_id).await.unwrap().already_revoked);
    let expected = [
        ("revoked".to_owned(), key(&k1)),
        ("updated".to_owned(), key(&k2)),
        ("rotated".to_owned(), key(&k2)),
        ("updated".to_owned(), key(&k3)),
    ];
    for events in [&mut on_a, &mut on_b] {
        for want in &expected {
            assert_eq!(&change(events).await, want);
        }
        no_more_changes(events, Duration::from_millis(500)).await;
    }
    // Each replica forwarded what the other one did, and nothing of its own.
    assert_eq!(a.server.stats().events_forwarded, 2);
    assert_eq!(b.server.stats().events_forwarded, 2);
}

fn usage_event(key_id: &str, at: OffsetDateTime, allowed: bool, ms: u64) -> UsageEvent {
    UsageEvent {
        at,
        key_id: Some(Arc::from(key_id)),
        owner: Some(Arc::from("acme")),
        outcome: if allowed { Outcome::Allowed } else { Outcome::Revoked },
        method: "GET".into(),
        route: Arc::from("/reports/{id}"),
        status: if allowed { 200 } else { 401 },
        latency: Duration::from_millis(ms),
        client_ip: Some("10.1.2.3".parse::<IpAddr>().unwrap()),
        request_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_ingested_by_two_replicas_at_once_adds_up_exactly() {
    let Some(db) = TestDb::postgres().await else { return };
    let a = TestServer::start_on(db.clone(), |b| b).await;
    let b = TestServer::start_on(db.clone(), |b| b).await;
    let k1 = a.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let k2 = a.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let now = OffsetDateTime::now_utc();
    let minute = now.replace_second(0).unwrap().replace_nanosecond(0).unwrap();

    // 24 batches of 400 events, half to each replica, all of them for the same two
    // keys and the same minute, the keys interleaved differently per batch.
    const BATCHES: usize = 24;
    const PER_BATCH: usize = 400;
    let batches: Vec<Vec<UsageEvent>> = (0..BATCHES)
        .map(|n| {
            (0..PER_BATCH)
                .map(|i| {
                    let k = if (i + n) % 3 == 0 { &k2.key_id } else { &k1.key_id };
                    // One slow request in one batch: the maximum to find.
                    let ms = if n == 17 && i == 5 { 950 } else { (i % 9) as u64 + 1 };
                    usage_event(k, minute + time::Duration::seconds((i % 60) as i64), i % 5 != 0, ms)
                })
                .collect()
        })
        .collect();
    let want = |key: &str| {
        let events: Vec<&UsageEvent> = batches.iter().flatten().filter(|e| e.key_id.as_deref() == Some(key)).collect();
        let allowed = events.iter().filter(|e| e.outcome == Outcome::Allowed).count() as u64;
        let ms: u64 = events.iter().map(|e| e.latency.as_millis() as u64).sum();
        let max = events.iter().map(|e| e.latency.as_millis() as u64).max().unwrap();
        (events.len() as u64, allowed, ms, max)
    };

    let post = |server: &TestServer, batch: &Vec<UsageEvent>| {
        let req = server.http.post(server.url("/v1/usage")).bearer_auth(SERVICE);
        req.json(&json!({ "events": batch, "dropped": 0 })).send()
    };
    let started = Instant::now();
    let answers = futures_util::future::join_all(
        batches.iter().enumerate().map(|(n, batch)| post(if n % 2 == 0 { &a } else { &b }, batch)),
    )
    .await;
    let took = started.elapsed();
    for answer in answers {
        assert_eq!(answer.unwrap().status(), 202);
    }
    println!("{} events in {BATCHES} concurrent batches over two replicas: {took:?}", BATCHES * PER_BATCH);
    assert_eq!(a.server.stats().usage_batches + b.server.stats().usage_batches, BATCHES as u64);

    for k in [&k1, &k2] {
        let (requests, allowed, ms_sum, ms_max) = want(&k.key_id);
        let report = b.admin.usage(&k.key_id, None).await.unwrap();
        assert_eq!(report.buckets.len(), 1, "one key, one minute");
        let bucket = &report.buckets[0];
        assert_eq!(bucket.start, minute);
        assert_eq!(bucket.requests, requests);
        assert_eq!(bucket.allowed, allowed);
        assert_eq!(bucket.denied, requests - allowed);
        assert_eq!(bucket.status_2xx, allowed);
        assert_eq!(bucket.status_4xx, requests - allowed);
        assert_eq!(bucket.latency_ms_sum, ms_sum as f64);
        assert_eq!(bucket.latency_ms_max, ms_max as f64);
        assert!(a.admin.get_key(&k.key_id).await.unwrap().last_used_at.is_some());
    }
    assert_eq!(want(&k1.key_id).3, 950);
}

#[tokio::test]
async fn a_lost_listen_connection_reconnects_and_catches_up_from_the_change_log() {
    let Some(db) = TestDb::postgres().await else { return };
    let store = PostgresStore::open(&db.url()).await.unwrap();
    let listen_name = store.listen_application_name();
    let a = TestServer::start_on(db.clone(), |b| b.store(store)).await;
    let b = TestServer::start_on(db.clone(), |b| b).await;
    let k = b.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let k2 = b.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let mut on_a = Events::connect(&a).await;
    assert_eq!(a.server.stats().change_feed_reconnects, 0);

    let mut conn = pg_schema(&db).admin_connection().await;
    let killed: Vec<bool> =
        sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1")
            .bind(&listen_name)
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(killed, [true], "replica A's LISTEN connection, and only it");
    // Changed through B while A may not be listening: A reads it from the log when it
    // listens again, or hears it; either way exactly once, and no reset.
    b.admin.revoke(&k.key_id).await.unwrap();
    assert_eq!(change(&mut on_a).await, ("revoked".to_owned(), json!({ "key_id": k.key_id })));
    eventually("A's feed reconnected", LIMIT, async || {
        a.server.stats().change_feed_reconnects == 1 && a.server.stats().change_feed_connected
    })
    .await;
    assert_eq!(b.server.stats().change_feed_reconnects, 0);
    // Listening again: a change through B reaches A's stream, next in line.
    b.admin.revoke(&k2.key_id).await.unwrap();
    assert_eq!(change(&mut on_a).await, ("revoked".to_owned(), json!({ "key_id": k2.key_id })));
}

/// A replica as its own `keygate-server` process, to be killed.
struct Process {
    child: tokio::process::Child,
    url: String,
}

async fn spawn_replica(db: &TestDb) -> Process {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate-server"))
        .args(["serve", "--db", &db.url(), "--listen", "127.0.0.1:0"])
        .env("KEYGATE_SERVICE_TOKEN", SERVICE)
        .env("KEYGATE_ADMIN_TOKEN", ADMIN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("keygate-server runs");
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
    .expect("keygate-server listens within 30 s");
    // Keep reading its log so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Process { child, url }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_a_killed_verifications_move_to_b_and_the_event_listener_follows() {
    let Some(db) = TestDb::postgres().await else { return };
    let mut a = spawn_replica(&db).await;
    let b = TestServer::start_on(db.clone(), |b| b).await;
    let k = b.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let r = b.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();

    let (http, cache) = middleware(&[&a.url, &b.server.url()], Duration::from_secs(600));
    let listener = RevocationListener::builder(vec![a.url.clone(), b.server.url()])
        .service_token(SERVICE)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .spawn(&cache)
        .unwrap();
    eventually("listener connected to A", LIMIT, async || listener.is_connected()).await;
    assert_eq!(listener.current_endpoint(), 0, "follows A first");
    assert_eq!(code(&cache, &r.key).await.unwrap(), "VALID");

    // Four workers verify (uncached) back to back, spread over A and B, while A is
    // killed: each may lose at most the one request it had in flight.
    let stop = Arc::new(tokio::sync::Notify::new());
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (http, key, stop) = (http.clone(), k.key.clone(), stop.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                let stopped = stop.notified();
                tokio::pin!(stopped);
                loop {
                    tokio::select! {
                        _ = &mut stopped => return results,
                        r = code(&http, &key) => results.push((Instant::now(), r)),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b_calls_before = b.server.stats().verify_calls;
    a.child.kill().await.expect("kill replica A");
    let killed_at = Instant::now();
    eventually("listener moved to B", LIMIT, async || listener.is_connected() && listener.current_endpoint() == 1)
        .await;
    let moved = killed_at.elapsed();
    assert!(listener.stats().reconnects >= 1);
    tokio::time::sleep(Duration::from_millis(1000).saturating_sub(moved)).await;
    stop.notify_waiters();
    let (mut before, mut after, mut failures) = (0, 0, 0);
    for worker in workers {
        let results = worker.await.unwrap();
        let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
        assert!(failed.len() <= 1, "more than the request in flight failed: {failed:?}");
        assert!(results.iter().all(|(_, r)| r.as_ref().map_or(true, |c| *c == "VALID")));
        failures += failed.len();
        before += results.iter().filter(|(at, _)| *at < killed_at).count();
        after += results.iter().filter(|(at, r)| *at > killed_at && r.is_ok()).count();
    }
    println!(
        "verifications: {before} before the kill, {after} answered after it, {failures} failed; \
         event listener on B {moved:?} after the kill"
    );
    // Round robin: while both lived, each replica answered a good share.
    let on_b = b_calls_before as usize;
    assert!(on_b * 5 >= before && on_b * 5 <= before * 4, "{on_b} of {before} on B: not spread");
    assert!(after >= 20, "verifications went on after the kill ({after})");
    assert!(b.server.stats().verify_calls - b_calls_before >= after as u64, "answered by replica B");

    // And it hears B: a revocation through B is refused within a second.
    let started = Instant::now();
    b.admin.revoke(&r.key_id).await.unwrap();
    eventually("revocation through B seen", Duration::from_secs(1), async || {
        code(&cache, &r.key).await.unwrap() == "REVOKED"
    })
    .await;
    println!("revocation through B refused after {:?}", started.elapsed());
}

#[tokio::test]
async fn an_alert_raised_by_one_replica_reaches_the_streams_of_the_others() {
    let Some(db) = TestDb::postgres().await else { return };
    let a = TestServer::start_on(db.clone(), |b| b).await;
    let b = TestServer::start_on(db.clone(), |b| b).await;
    let k = a.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let mut on_a = Events::connect(&a).await;
    let now = OffsetDateTime::now_utc();
    for ip in ["203.0.113.7", "198.51.100.9"] {
        let mut event = usage_event(&k.key_id, now, true, 1);
        event.client_ip = Some(ip.parse().unwrap());
        let req = b.http.post(b.url("/v1/usage")).bearer_auth(SERVICE);
        let res = req.json(&json!({ "events": [event], "dropped": 0 })).send().await.unwrap();
        assert_eq!(res.status(), 202);
    }
    let (name, alert) = change(&mut on_a).await;
    assert_eq!(name, "alert");
    assert_eq!(alert["key_id"], k.key_id.as_str());
    assert_eq!(alert["kind"], "new_network");
    assert_eq!(b.server.stats().alerts_raised, 1);
    no_more_changes(&mut on_a, Duration::from_millis(300)).await;
}
