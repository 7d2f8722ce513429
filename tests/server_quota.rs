//! Named limits and credits in the key service (issue 16): create, update and show
//! through the admin API and the CLI, owners' shared limits, validation refusals, the
//! audit trail, `updated` events, and what the verify answer carries; the single
//! `ratelimit` field keeps meaning the limit named `requests`.

mod server_support;

use std::time::Duration;

use keygate::RateLimit;
use keygate::client::{ClientError, KeyPatch, NewKey, OwnerQuota};
use keygate::quota::{Credits, Limit, Refill};
use serde_json::{Value, json};
use server_support::{ADMIN, Events, SERVICE, TestDb, TestServer, new_key};

const WAIT: Duration = Duration::from_secs(10);

fn refused(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, code, .. } => (status, code),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn limits_and_credits_round_trip_and_reach_the_verify_answer() {
    round_trip(TestServer::start().await).await;
}

#[tokio::test]
async fn limits_and_credits_round_trip_on_postgres() {
    let Some(db) = TestDb::postgres().await else { return };
    round_trip(TestServer::start_on(db, |b| b).await).await;
}

async fn round_trip(t: TestServer) {
    let new = NewKey {
        limits: vec![Limit::new("requests", 100, 1).burst(20), Limit::new("reports", 1000, 3600)],
        credits: Some(Credits { remaining: 10_000, refill: Some(Refill::Monthly { day: 31, amount: 10_000 }) }),
        ..new_key("acme", &["reports:read"])
    };
    let created = t.admin.create_key(new).await.unwrap();
    assert_eq!(created.info.limits.len(), 2);
    // The `requests` limit is also the single `ratelimit` older clients read.
    assert_eq!(created.info.ratelimit, Some(RateLimit { limit: 100, period_s: 1 }));
    let shown = t.admin.get_key(&created.key_id).await.unwrap();
    assert_eq!(shown, created.info);
    assert_eq!(shown.credits.as_ref().unwrap().refill, Some(Refill::Monthly { day: 31, amount: 10_000 }));

    let v = t.verify(created.key.expose_secret()).await;
    assert_eq!(v["valid"], true);
    assert_eq!(v["ratelimit"], json!({ "limit": 100, "period_s": 1 }));
    assert_eq!(
        v["limits"],
        json!([
            { "name": "requests", "limit": 100, "period_s": 1, "burst": 20 },
            { "name": "reports", "limit": 1000, "period_s": 3600 },
        ])
    );
    assert_eq!(
        v["credits"],
        json!({ "remaining": 10000, "refill": { "kind": "monthly", "day": 31, "amount": 10000 } })
    );
    assert!(v.get("owner_limits").is_none() && v.get("owner_credits").is_none(), "{v}");

    // An owner's limits and credits come with every one of its keys' answers, marked
    // as the owner's, and every key of the owner hears `updated`.
    let mut events = Events::connect(&t).await;
    let quota = OwnerQuota {
        limits: vec![Limit::new("requests", 1000, 60)],
        credits: Some(Credits { remaining: 50, refill: Some(Refill::Daily { amount: 50 }) }),
        ..OwnerQuota::default()
    };
    let owner = t.admin.put_owner("acme", &quota).await.unwrap();
    assert_eq!((owner.limits.clone(), owner.credits.clone()), (quota.limits.clone(), quota.credits.clone()));
    assert!(owner.updated_at.is_some());
    assert_eq!(events.next_change(WAIT).await.unwrap(), ("updated".into(), json!({ "key_id": created.key_id })));
    assert_eq!(t.admin.get_owner("acme").await.unwrap(), owner);
    let v = t.verify(created.key.expose_secret()).await;
    assert_eq!(v["owner_limits"], json!([{ "name": "requests", "limit": 1000, "period_s": 60 }]));
    assert_eq!(v["owner_credits"], json!({ "remaining": 50, "refill": { "kind": "daily", "amount": 50 } }));
    assert_eq!(v["limits"].as_array().unwrap().len(), 2, "the key's own stay its own");
    // An owner nothing was set for shows empty settings.
    let none = t.admin.get_owner("globex").await.unwrap();
    assert!(none.limits.is_empty() && none.credits.is_none() && none.updated_at.is_none());

    // Update: the list is replaced, credits removed with null; the audit says what changed.
    let patch =
        KeyPatch { limits: Some(vec![Limit::new("reports", 5, 60)]), credits: Some(None), ..Default::default() };
    let changed = t.admin.update_key(&created.key_id, &patch).await.unwrap();
    assert_eq!(changed.limits, [Limit::new("reports", 5, 60)]);
    assert_eq!((changed.ratelimit, changed.credits), (None, None));
    assert_eq!(events.next_change(WAIT).await.unwrap(), ("updated".into(), json!({ "key_id": created.key_id })));
    let audit = t.admin.audit(None).await.unwrap();
    let update = audit.iter().rfind(|r| r.action == "key.update").unwrap();
    assert!(update.changes.get("limits").is_some() && update.changes.get("credits").is_some(), "{:?}", update.changes);
    assert_eq!(update.changes["ratelimit"]["to"], Value::Null);
    let put = audit.iter().rfind(|r| r.action == "owner.put").unwrap();
    assert_eq!(put.actor, "bootstrap-admin");
    assert_eq!(put.changes["owner"], "acme");
    let v = t.verify(created.key.expose_secret()).await;
    assert!(v.get("credits").is_none() && v["ratelimit"].is_null(), "{v}");
}

#[tokio::test]
async fn the_old_ratelimit_field_is_the_requests_limit() {
    let t = TestServer::start().await;
    let old = NewKey { ratelimit: Some(RateLimit { limit: 10, period_s: 60 }), ..new_key("acme", &["a:b"]) };
    let k = t.admin.create_key(old).await.unwrap();
    assert_eq!(k.info.limits, [Limit::new("requests", 10, 60)]);
    let v = t.verify(k.key.expose_secret()).await;
    assert_eq!(v["ratelimit"], json!({ "limit": 10, "period_s": 60 }));
    assert_eq!(v["limits"], json!([{ "name": "requests", "limit": 10, "period_s": 60 }]));
    // Patching `ratelimit` keeps the other limits; `null` removes only `requests`.
    let both = KeyPatch { limits: Some(vec![Limit::new("reports", 1, 1)]), ..Default::default() };
    t.admin.update_key(&k.key_id, &both).await.unwrap();
    let rl = KeyPatch { ratelimit: Some(Some(RateLimit { limit: 7, period_s: 1 })), ..Default::default() };
    let info = t.admin.update_key(&k.key_id, &rl).await.unwrap();
    assert_eq!(info.limits, [Limit::new("requests", 7, 1), Limit::new("reports", 1, 1)]);
    let info = t.admin.update_key(&k.key_id, &KeyPatch { ratelimit: Some(None), ..Default::default() }).await.unwrap();
    assert_eq!((info.limits, info.ratelimit), (vec![Limit::new("reports", 1, 1)], None));
}

#[tokio::test]
async fn bad_limits_and_credits_are_refused() {
    let t = TestServer::start().await;
    let with = |limits: Vec<Limit>, credits: Option<Credits>| NewKey { limits, credits, ..new_key("acme", &["a:b"]) };
    let many = (0..17).map(|i| Limit::new(format!("l{i}"), 1, 1)).collect();
    let cases = [
        (with(vec![Limit::new("Reports", 1, 1)], None), "invalid_limit"),
        (with(vec![Limit::new("a b", 1, 1)], None), "invalid_limit"),
        (with(vec![Limit::new("r", 0, 1)], None), "invalid_limit"),
        (with(vec![Limit::new("r", 1, 0)], None), "invalid_limit"),
        (with(vec![Limit::new("r", 1, 32 * 86_400)], None), "invalid_limit"),
        (with(vec![Limit::new("r", 1, 1).burst(0)], None), "invalid_limit"),
        (with(vec![Limit::new("r", 1, 1), Limit::new("r", 2, 1)], None), "invalid_limit"),
        (with(many, None), "invalid_limit"),
        (
            with(Vec::new(), Some(Credits { remaining: 1, refill: Some(Refill::Monthly { day: 0, amount: 1 }) })),
            "invalid_credits",
        ),
        (
            with(Vec::new(), Some(Credits { remaining: 1, refill: Some(Refill::Every { interval_s: 0, amount: 1 }) })),
            "invalid_credits",
        ),
        (with(Vec::new(), Some(Credits { remaining: u64::MAX, refill: None })), "invalid_credits"),
        (
            NewKey {
                ratelimit: Some(RateLimit { limit: 1, period_s: 1 }),
                ..with(vec![Limit::new("requests", 2, 1)], None)
            },
            "invalid_limit",
        ),
    ];
    for (new, code) in cases {
        let shown = format!("{:?} {:?}", new.limits, new.credits);
        let e = t.admin.create_key(new).await.unwrap_err();
        assert_eq!(refused(e), (400, code.to_owned()), "{shown}");
    }
    let bad_owner = OwnerQuota { limits: vec![Limit::new("", 1, 1)], ..OwnerQuota::default() };
    assert_eq!(refused(t.admin.put_owner("acme", &bad_owner).await.unwrap_err()), (400, "invalid_limit".into()));
    // Unknown fields are refused too: a typo must not silently mean "no limit".
    let res = t
        .http
        .put(t.url("/v1/owners/acme"))
        .bearer_auth(ADMIN)
        .json(&json!({ "limits": [{ "name": "r", "limit": 1, "period_s": 1, "bursts": 2 }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    // The service token may not set them.
    let res = t.http.put(t.url("/v1/owners/acme")).bearer_auth(SERVICE).json(&json!({})).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert!(t.admin.list_keys(None).await.unwrap().is_empty(), "nothing refused was stored");
}

/// Runs `keygate-server ARGS --url URL --json` with the admin token in the environment.
async fn cli_json(t: &TestServer, args: &[&str]) -> Value {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate-server"));
    cmd.args(args)
        .args(["--url", &t.server.url(), "--json"])
        .env("KEYGATE_ADMIN_TOKEN", ADMIN)
        .env_remove("KEYGATE_URL");
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("the CLI ends").unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn the_cli_sets_limits_credits_and_owner_settings() {
    let t = TestServer::start().await;
    let k = cli_json(
        &t,
        &[
            "keys",
            "create",
            "--owner",
            "acme",
            "--name",
            "ci",
            "--scope",
            "a:b",
            "--limit",
            "requests=100/1s,burst=20",
            "--limit",
            "reports=1000/1h",
            "--credits",
            "10000",
            "--refill",
            "monthly:10000@1",
        ],
    )
    .await;
    assert_eq!(k["limits"][0], json!({ "name": "requests", "limit": 100, "period_s": 1, "burst": 20 }));
    assert_eq!(k["limits"][1], json!({ "name": "reports", "limit": 1000, "period_s": 3600 }));
    assert_eq!(k["credits"], json!({ "remaining": 10000, "refill": { "kind": "monthly", "day": 1, "amount": 10000 } }));
    let id = k["key_id"].as_str().unwrap();
    let u = cli_json(&t, &["keys", "update", id, "--credits", "5", "--refill", "every:3600s:500"]).await;
    assert_eq!(
        u["credits"],
        json!({ "remaining": 5, "refill": { "kind": "every", "interval_s": 3600, "amount": 500 } })
    );
    assert_eq!(u["limits"], k["limits"], "limits not given stay");
    let u = cli_json(&t, &["keys", "update", id, "--clear-limits", "--no-credits"]).await;
    assert_eq!((u["limits"].clone(), u["credits"].clone()), (json!([]), Value::Null));

    let o = cli_json(
        &t,
        &["owners", "set", "acme", "--limit", "requests=10/1s", "--credits", "100", "--refill", "daily:100"],
    )
    .await;
    assert_eq!(o["limits"], json!([{ "name": "requests", "limit": 10, "period_s": 1 }]));
    assert_eq!(o["credits"], json!({ "remaining": 100, "refill": { "kind": "daily", "amount": 100 } }));
    assert_eq!(cli_json(&t, &["owners", "show", "acme"]).await, o);
    let cleared = cli_json(&t, &["owners", "set", "acme"]).await;
    assert_eq!((cleared["limits"].clone(), cleared["credits"].clone()), (json!([]), Value::Null));

    // Bad input stops in the CLI (exit 2) before any request.
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate-server"));
    cmd.args(["keys", "create", "--owner", "a", "--name", "b", "--limit", "requests=0/1s", "--url", &t.server.url()])
        .env("KEYGATE_ADMIN_TOKEN", ADMIN);
    let out = cmd.output().await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn aggregates_keep_both_refusals_apart() {
    use keygate::Outcome;
    use keygate::client::{UsageGroupBy, UsageQuery};
    use server_support::{Req, aggregate, aggregate_batch, this_minute};

    let t = TestServer::start().await;
    let k = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let req = |outcome, status| Req {
        minute: this_minute(),
        key_id: Some(k.key_id.clone()),
        route: "/export",
        method: "POST",
        outcome,
        status,
        latency_us: 100,
    };
    let reqs = [
        req(Outcome::Allowed, 200),
        req(Outcome::RateLimited, 429),
        req(Outcome::UsageExceeded, 429),
        req(Outcome::UsageExceeded, 429),
    ];
    let (status, _) = t.post_usage(&aggregate_batch(aggregate(&reqs))).await;
    assert_eq!(status, 202);
    let report = t.admin.usage_report(&UsageQuery::key(&k.key_id).group_by(UsageGroupBy::Route)).await.unwrap();
    let mut by_outcome: Vec<(String, u64)> =
        report.buckets.iter().map(|b| (b.outcome.clone().unwrap(), b.requests)).collect();
    by_outcome.sort();
    assert_eq!(
        by_outcome,
        [("allowed".to_owned(), 1), ("rate_limited".to_owned(), 1), ("usage_exceeded".to_owned(), 2)]
    );
}
