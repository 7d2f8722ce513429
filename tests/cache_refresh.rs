//! Batched refresh (issue 15) against a real key service: `POST /v1/keys/verify-batch`,
//! refresh-ahead of hot verdicts (no request waits for the key service after the
//! first), and revalidation after a `reset` at a bounded rate, strict by default.

mod server_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::wire::MAX_VERIFY_BATCH;
use keygate::{
    ApiKey, CachedVerifier, HttpVerifier, KeyDigest, MissBudget, Reason, RevocationListener, Verdict, Verifier,
};
use serde_json::{Value, json};
use server_support::*;

const SERVICE: &str = "svc-test-token-0123456789abcdefghij";
const LIMIT: Duration = Duration::from_secs(15);

fn http(t: &TestServer) -> HttpVerifier {
    HttpVerifier::builder(t.server.url()).service_token(SERVICE).build().unwrap()
}

async fn keys(t: &TestServer, n: usize, roles: &[&str]) -> Vec<(String, ApiKey)> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut new = new_key(&format!("owner{}", i % 7), &["reports:read"]);
        new.roles = roles.iter().map(|r| r.to_string()).collect();
        let created = t.admin.create_key(new).await.unwrap();
        out.push((created.key_id, created.key));
    }
    out
}

async fn batch(t: &TestServer, body: Value) -> (u16, Value) {
    let res = t.http.post(t.url("/v1/keys/verify-batch")).bearer_auth(SERVICE).json(&body).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_batch_call_answers_each_digest_in_order_and_refuses_bad_batches() {
    batch_call_on(TestDb::sqlite()).await;
}

#[tokio::test]
async fn the_batch_call_answers_the_same_on_postgres() {
    let Some(db) = TestDb::postgres().await else {
        eprintln!("skipped: KEYGATE_TEST_POSTGRES_URL is not set");
        return;
    };
    batch_call_on(db).await;
}

async fn batch_call_on(db: TestDb) {
    let t = TestServer::start_on(db, |b| b).await;
    let made = keys(&t, 3, &[]).await;
    t.admin.revoke(&made[1].0).await.unwrap();
    let unknown = ApiKey::generate("kg").unwrap();
    let digests: Vec<String> =
        [&made[0].1, &made[1].1, &unknown, &made[2].1, &made[0].1].iter().map(|k| k.digest().to_hex()).collect();
    let (status, body) = batch(&t, json!({ "digests": digests })).await;
    assert_eq!(status, 200, "{body}");
    let answers = body["answers"].as_array().unwrap();
    assert_eq!(answers.len(), 5);
    assert_eq!((answers[0]["valid"].clone(), answers[0]["key_id"].clone()), (json!(true), json!(made[0].0)));
    assert_eq!((answers[1]["code"].clone(), answers[1]["key_id"].clone()), (json!("REVOKED"), json!(made[1].0)));
    assert_eq!(answers[2], json!({"valid": false, "code": "NOT_FOUND"}));
    assert_eq!(answers[3]["key_id"], json!(made[2].0));
    assert_eq!(answers[4], answers[0], "a repeated digest is answered twice");
    let stats = t.server.stats();
    assert_eq!((stats.verify_batches, stats.verify_batch_digests, stats.verify_calls), (1, 5, 0));

    // Raw keys are not taken, nor empty or oversized batches, nor anything but hex.
    let raw = made[0].1.expose_secret().to_owned();
    let too_many = vec![made[0].1.digest().to_hex(); MAX_VERIFY_BATCH + 1];
    for bad in [
        json!({ "digests": [] }),
        json!({ "digests": too_many }),
        json!({ "digests": ["xyz"] }),
        json!({ "keys": [raw.clone()] }),
        json!({ "digests": [raw.clone()] }),
    ] {
        let (status, body) = batch(&t, bad).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"], "invalid_request");
        assert!(!body.to_string().contains(&raw), "the answer repeats what it was sent: {body}");
    }
    let res = t.http.post(t.url("/v1/keys/verify-batch")).json(&json!({"digests": []})).send().await.unwrap();
    assert_eq!(res.status(), 401, "the service token is required");

    // HttpVerifier splits what is larger than one call takes.
    let mut many: Vec<KeyDigest> = vec![made[2].1.digest(); MAX_VERIFY_BATCH + 7];
    many[MAX_VERIFY_BATCH + 3] = made[1].1.digest();
    let verdicts = http(&t).verify_digests(&many).unwrap().await.unwrap();
    assert_eq!(verdicts.len(), many.len());
    assert!(matches!(&verdicts[MAX_VERIFY_BATCH + 3], Verdict::Invalid { reason: Reason::Revoked, .. }));
    assert!(matches!(&verdicts[MAX_VERIFY_BATCH + 6], Verdict::Valid(p) if p.key_id() == made[2].0));
    assert_eq!(t.server.stats().verify_batches, 3);
}

#[tokio::test]
async fn a_hot_key_is_refreshed_in_the_background_and_never_waits_after_its_first_request() {
    let t = TestServer::start().await;
    let made = keys(&t, 2, &[]).await;
    let (hot_id, hot) = made[0].clone();
    // Fresh for 600 ms; hits from 300 ms on queue a refresh.
    let cache = CachedVerifier::builder(http(&t))
        .positive_ttl(Duration::from_millis(600))
        .refresh_ahead(Duration::from_millis(400))
        .build();
    assert!(matches!(cache.verify(&hot).await, Ok(Verdict::Valid(_))), "the first request: a miss");
    let started = Instant::now();
    let mut answers = 0u32;
    while started.elapsed() < Duration::from_secs(3) {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (cache, hot) = (cache.clone(), hot.clone());
            tasks.push(tokio::spawn(async move { cache.verify(&hot).await }));
        }
        for task in tasks {
            let verdict = task.await.unwrap().unwrap();
            assert!(matches!(verdict, Verdict::Valid(p) if p.key_id() == hot_id));
            answers += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = cache.stats();
    let server = t.server.stats();
    eprintln!("{answers} answers, {stats:?}, server: {server:?}");
    assert_eq!(stats.misses, 1, "only the first request asked the key service");
    assert_eq!(server.verify_calls, 1, "one single verify: the first request's");
    assert!(server.verify_batches >= 3, "about one refresh per 300 to 600 ms over 3 s: {}", server.verify_batches);
    assert!(stats.refreshed_ahead >= 3 && stats.refresh_batches >= 3, "{stats:?}");
    assert_eq!(stats.stale_served, 0);

    // A refresh also carries what the event stream would have: here there is none, and a
    // revocation still lands within one TTL.
    t.admin.revoke(&hot_id).await.unwrap();
    let revoked = eventually(Duration::from_secs(5), || async {
        matches!(cache.verify(&hot).await, Ok(Verdict::Invalid { reason: Reason::Revoked, .. }))
    })
    .await;
    assert!(revoked, "the background refresh (or the TTL) brings the revocation in");

    // A key not used in its refresh window is not refreshed: it expires.
    let (_, cold) = made[1].clone();
    let before = t.server.stats();
    cache.verify(&cold).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = t.server.stats();
    assert_eq!(after.verify_calls, before.verify_calls + 1);
    assert_eq!(after.verify_batch_digests, before.verify_batch_digests, "nothing refreshed for a cold key");
}

#[tokio::test]
async fn after_a_reset_nothing_old_is_served_until_confirmed_and_batches_keep_to_the_rate() {
    let t = TestServer::start().await;
    let made = keys(&t, 300, &[]).await;
    let cache = CachedVerifier::builder(http(&t))
        .positive_ttl(Duration::from_secs(600))
        .refresh_batch_size(50)
        .revalidation_rate(100)
        .miss_budget(MissBudget::unlimited())
        .build();
    for (_, key) in &made {
        assert!(matches!(cache.verify(key).await, Ok(Verdict::Valid(_))));
    }
    // Revoked while (say) the event stream was down: the cache cannot know.
    let (revoked_id, revoked) = made[7].clone();
    t.admin.revoke(&revoked_id).await.unwrap();
    assert!(matches!(cache.verify_now(&revoked), Some(Ok(Verdict::Valid(_)))), "still cached before the reset");
    let before = t.server.stats();

    let reset_at = Instant::now();
    cache.revalidate_all();
    // Strict: the revoked key is asked about on the request path, not served from before.
    assert!(cache.verify_now(&revoked).is_none());
    assert!(matches!(cache.verify(&revoked).await, Ok(Verdict::Invalid { reason: Reason::Revoked, .. })));
    assert_eq!(t.server.stats().verify_calls, before.verify_calls + 1);

    tokio::time::sleep(Duration::from_secs(1).saturating_sub(reset_at.elapsed())).await;
    let at_one_second = cache.stats().revalidated;
    assert!(at_one_second <= 150, "100 a second, in batches of 50: {at_one_second} after 1 s");
    assert!(
        eventually(LIMIT, || async { cache.stats().revalidated >= 299 }).await,
        "everything else is revalidated: {:?}",
        cache.stats()
    );
    let after = t.server.stats();
    let digests = after.verify_batch_digests - before.verify_batch_digests;
    let batches = after.verify_batches - before.verify_batches;
    assert!(digests <= 300 && batches <= 7, "{batches} batches, {digests} digests: batches of at most 50");
    // Confirmed verdicts are served again without a call; the revoked one stays refused.
    let misses = cache.stats().misses;
    for (id, key) in &made {
        let verdict = cache.verify(key).await.unwrap();
        if *id == revoked_id {
            assert!(matches!(verdict, Verdict::Invalid { reason: Reason::Revoked, .. }));
        } else {
            assert!(matches!(verdict, Verdict::Valid(_)));
        }
    }
    assert_eq!(cache.stats().misses, misses, "no request waits for the key service after revalidation");
    assert_eq!(t.server.stats().verify_calls, after.verify_calls);
}

#[tokio::test]
async fn a_serve_window_keeps_old_verdicts_for_at_most_that_long() {
    let t = TestServer::start().await;
    let made = keys(&t, 20, &[]).await;
    let cache = CachedVerifier::builder(http(&t))
        .positive_ttl(Duration::from_secs(600))
        .refresh_batch_size(5)
        .revalidation_rate(1)
        .serve_during_revalidation(Duration::from_millis(800))
        .build();
    for (_, key) in &made {
        cache.verify(key).await.unwrap();
    }
    let (revoked_id, revoked) = made[19].clone();
    t.admin.revoke(&revoked_id).await.unwrap();
    cache.revalidate_all();
    // Inside the window: served as before, no call.
    let calls = t.server.stats().verify_calls;
    assert!(matches!(cache.verify(&revoked).await, Ok(Verdict::Valid(_))), "the window serves the old verdict");
    assert_eq!(t.server.stats().verify_calls, calls);
    // Past it (at 1 verdict a second, most batches are far off): refused, whether its
    // batch came first or the request asked.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(matches!(cache.verify(&revoked).await, Ok(Verdict::Invalid { reason: Reason::Revoked, .. })));
    assert!(cache.stats().revalidated < 20, "{:?}", cache.stats());
}

#[tokio::test]
async fn a_bulk_reset_from_the_key_service_revalidates_instead_of_dropping() {
    let t = TestServer::start().await;
    t.admin.put_role("viewer", ["reports:read"]).await.unwrap();
    // More keys than one change lists: redefining their role is a `reset` (bulk).
    let made = keys(&t, keygate::server::MAX_EVENTS_PER_CHANGE + 4, &["viewer"]).await;
    let cache = CachedVerifier::builder(http(&t)).positive_ttl(Duration::from_secs(600)).build();
    let listener = RevocationListener::builder(t.server.url()).service_token(SERVICE).spawn(&cache).unwrap();
    assert!(eventually(LIMIT, || async { listener.is_connected() }).await);
    for (_, key) in &made {
        cache.verify(key).await.unwrap();
    }
    let before = t.server.stats();
    t.admin.put_role("viewer", ["reports:read", "reports:write"]).await.unwrap();
    assert!(eventually(LIMIT, || async { listener.stats().resets == 1 }).await, "{:?}", listener.stats());
    assert!(
        eventually(LIMIT, || async { cache.stats().revalidated >= made.len() as u64 }).await,
        "{:?}",
        cache.stats()
    );
    // Every verdict now carries the role's new scope, and none took a single verify.
    for (_, key) in &made {
        let Some(Ok(Verdict::Valid(principal))) = cache.verify_now(key) else { panic!("confirmed and cached") };
        assert!(principal.scopes().iter().any(|s| s.as_str() == "reports:write"));
    }
    let after = t.server.stats();
    assert_eq!(after.verify_calls, before.verify_calls);
    assert!(after.verify_batches - before.verify_batches <= 3, "{} keys in batches of 100", made.len());
    drop(listener);
}

/// An older key service has no batch call: the cache notices (404), refreshes on the
/// request path as before, and its circuit stays closed.
#[tokio::test]
async fn a_key_service_without_batch_verify_is_not_a_failure() {
    use axum::routing::post;
    let t = Arc::new(TestServer::start().await);
    let made = keys(&t, 1, &[]).await;
    // Only the single verify, forwarded to the real key service.
    let upstream = Arc::clone(&t);
    let old = axum::Router::new().route(
        "/v1/keys/verify",
        post(move |body: axum::body::Bytes| {
            let t = Arc::clone(&upstream);
            async move {
                let res = t.http.post(t.url("/v1/keys/verify")).bearer_auth(SERVICE).body(body).send().await.unwrap();
                let status = axum::http::StatusCode::from_u16(res.status().as_u16()).unwrap();
                (status, [("content-type", "application/json")], res.bytes().await.unwrap())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, old).await });
    let remote = HttpVerifier::builder(url).service_token(SERVICE).build().unwrap();
    let cache = CachedVerifier::builder(remote)
        .positive_ttl(Duration::from_millis(400))
        .refresh_ahead(Duration::from_millis(300))
        .build();
    let key = &made[0].1;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        assert!(matches!(cache.verify(key).await, Ok(Verdict::Valid(_))));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = cache.stats();
    assert!(!cache.is_circuit_open());
    assert_eq!(stats.circuit_opened, 0);
    assert_eq!(stats.refresh_batches, 1, "tried once, then not again: {stats:?}");
    assert!(stats.misses >= 3, "refreshed on the request path instead: {stats:?}");
    // A reset then drops the cache rather than waiting on batches that cannot come.
    cache.revalidate_all();
    assert!(cache.verify_now(key).is_none());
}
