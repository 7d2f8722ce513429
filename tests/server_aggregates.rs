//! `POST /v1/usage` with aggregate batches, on real key services (SQLite, and two
//! PostgreSQL replicas when `KEYGATE_TEST_POSTGRES_URL` is set): totals that add up
//! exactly per key, route and outcome, batch ids applied once, refusals, the time
//! window, unknown keys, and alerts from aggregates.

mod server_support;

use std::collections::BTreeMap;
use std::time::Duration;

use keygate::client::{UsageGroupBy, UsageQuery};
use keygate::server::{AlertConfig, KeyServer, ServerStats};
use keygate::wire::AlertKind;
use keygate::{AggregateBatch, ClientNetwork, Outcome, UsageEvent};
use serde_json::{Value, json};
use server_support::{Req, TestDb, TestServer, aggregate, aggregate_batch, new_key, this_minute};

/// A deterministic mix of requests over `keys`, three routes, two methods, three
/// outcomes and the last three minutes.
fn traffic(seed: u64, n: usize, keys: &[String]) -> Vec<Req> {
    let routes = ["/reports/{id}", "/reports", "/admin"];
    let methods = ["GET", "POST"];
    let now = this_minute();
    (0..n as u64)
        .map(|i| {
            // splitmix64: spread without a dependency.
            let mut x = seed.wrapping_mul(1_000_003).wrapping_add(i).wrapping_add(0x9e37_79b9_7f4a_7c15);
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^= x >> 31;
            let (outcome, status) = match x % 5 {
                0 => (Outcome::InsufficientScope, 403),
                1 => (Outcome::RateLimited, 429),
                2 => (Outcome::Allowed, 500),
                _ => (Outcome::Allowed, 200),
            };
            Req {
                minute: now - 60 * ((x >> 8) % 3) as i64,
                key_id: Some(keys[((x >> 16) % keys.len() as u64) as usize].clone()),
                route: routes[((x >> 24) % 3) as usize],
                method: methods[((x >> 32) % 2) as usize],
                outcome,
                status,
                latency_us: 100 + (x >> 40) % 50_000,
            }
        })
        .collect()
}

type RouteKey = (String, String, String);

/// Requests per (route, method, outcome) of the requests of `key`.
fn per_route(reqs: &[Req], key: &str) -> BTreeMap<RouteKey, u64> {
    let mut m = BTreeMap::new();
    for r in reqs.iter().filter(|r| r.key_id.as_deref() == Some(key)) {
        *m.entry((r.route.to_owned(), r.method.to_owned(), r.outcome.as_str().to_owned())).or_default() += 1;
    }
    m
}

async fn route_report(t: &TestServer, q: UsageQuery) -> BTreeMap<RouteKey, u64> {
    let report = t.admin.usage_report(&q.group_by(UsageGroupBy::Route)).await.unwrap();
    let mut m = BTreeMap::new();
    for b in report.buckets {
        assert_eq!(b.status_1xx + b.status_2xx + b.status_3xx + b.status_4xx + b.status_5xx, b.requests);
        assert_eq!(b.allowed + b.denied, b.requests);
        let key = (b.route.unwrap(), b.method.unwrap(), b.outcome.unwrap());
        assert!(m.insert(key, b.requests).is_none(), "one bucket per route, method and outcome");
    }
    m
}

/// A counter summed over the servers (once when both are the same).
fn total(targets: [&TestServer; 2], f: fn(&ServerStats) -> u64) -> u64 {
    if std::ptr::eq(targets[0], targets[1]) {
        f(&targets[0].server.stats())
    } else {
        f(&targets[0].server.stats()) + f(&targets[1].server.stats())
    }
}

/// Two middlewares send N₁ and N₂ requests, in several batches each, all at once, to
/// `targets` in turn; the key service's totals are exact per key, route and outcome.
async fn two_middlewares_add_up(targets: [&TestServer; 2]) {
    let t = targets[0];
    let acme1 = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let acme2 = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let globex = t.admin.create_key(new_key("globex", &["a:b"])).await.unwrap().key_id;
    let keys = [acme1.clone(), acme2.clone(), globex.clone()];
    let (n1, n2) = (3000, 2000);
    let first = traffic(1, n1, &keys);
    let second = traffic(2, n2, &keys);
    // Each middleware ships its rows in batches of its own; rows of one key, minute and
    // route meet in several batches and on both replicas.
    let mut batches: Vec<AggregateBatch> = Vec::new();
    for (reqs, parts) in [(&first, 3), (&second, 2)] {
        for part in reqs.chunks(reqs.len().div_ceil(parts)) {
            batches.push(aggregate_batch(aggregate(part)));
        }
    }
    let answers =
        futures_util::future::join_all(batches.iter().enumerate().map(|(i, b)| targets[i % 2].post_usage(b))).await;
    let mut accepted = 0;
    for (status, body) in answers {
        assert_eq!(status, 202, "{body}");
        assert_eq!(body.get("duplicate"), None);
        accepted += body["accepted"].as_u64().unwrap();
    }
    assert_eq!(accepted, (n1 + n2) as u64);

    let all: Vec<Req> = first.iter().chain(&second).cloned().collect();
    for key in &keys {
        let want = per_route(&all, key);
        assert_eq!(route_report(targets[1], UsageQuery::key(key)).await, want, "per route of {key}");
        let minutes = targets[1].admin.usage_report(&UsageQuery::key(key)).await.unwrap();
        let total: u64 = minutes.buckets.iter().map(|b| b.requests).sum();
        assert_eq!(total, want.values().sum::<u64>(), "per minute of {key}");
        assert!(minutes.buckets.len() <= 3);
        let denied: u64 = minutes.buckets.iter().map(|b| b.denied).sum();
        let want_denied = all.iter().filter(|r| r.key_id.as_ref() == Some(key) && !r.outcome.is_allowed()).count();
        assert_eq!(denied, want_denied as u64);
        assert!(t.admin.get_key(key).await.unwrap().last_used_at.is_some());
    }
    // Per owner: the sum of the owner's keys.
    let mut acme = per_route(&all, &acme1);
    for (k, n) in per_route(&all, &acme2) {
        *acme.entry(k).or_default() += n;
    }
    assert_eq!(route_report(t, UsageQuery::owner("acme")).await, acme);
    assert_eq!(route_report(t, UsageQuery::owner("globex")).await, per_route(&all, &globex));
    assert!(route_report(t, UsageQuery::owner("nobody")).await.is_empty());
    assert_eq!(total(targets, |s| s.usage_requests), (n1 + n2) as u64);
    assert_eq!(total(targets, |s| s.usage_batches), batches.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_middlewares_add_up_exactly_per_key_route_and_outcome_on_sqlite() {
    let t = TestServer::start().await;
    two_middlewares_add_up([&t, &t]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_middlewares_add_up_exactly_per_key_route_and_outcome_on_two_postgres_replicas() {
    let Some(db) = TestDb::postgres().await else { return };
    let a = TestServer::start_on(db.clone(), |b| b).await;
    let b = TestServer::start_on(db.clone(), |b| b).await;
    two_middlewares_add_up([&a, &b]).await;
}

/// The same batch sent `copies` times at once to `targets` in turn is applied once.
async fn applied_once(targets: [&TestServer; 2], copies: usize) {
    let t = targets[0];
    let key = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let batch = aggregate_batch(aggregate(&traffic(7, 500, std::slice::from_ref(&key))));
    let answers = futures_util::future::join_all((0..copies).map(|i| targets[i % 2].post_usage(&batch))).await;
    let mut fresh = 0;
    for (status, body) in &answers {
        assert_eq!(*status, 202, "{body}");
        // A duplicate is answered as the first copy was.
        assert_eq!(body["accepted"], 500, "{body}");
        if body.get("duplicate").is_none() {
            fresh += 1;
        } else {
            assert_eq!(body["duplicate"], true);
        }
    }
    assert_eq!(fresh, 1, "exactly one copy applied: {answers:?}");
    // And later, once more.
    let (status, body) = targets[1].post_usage(&batch).await;
    assert_eq!((status, &body["duplicate"]), (202, &json!(true)));
    let report = t.admin.usage_report(&UsageQuery::key(&key)).await.unwrap();
    assert_eq!(report.buckets.iter().map(|b| b.requests).sum::<u64>(), 500);
    assert_eq!(total(targets, |s| s.usage_duplicates), copies as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_is_applied_once_on_sqlite() {
    let t = TestServer::start().await;
    applied_once([&t, &t], 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_sent_to_two_postgres_replicas_at_once_is_applied_once() {
    let Some(db) = TestDb::postgres().await else { return };
    let a = TestServer::start_on(db.clone(), |b| b).await;
    let b = TestServer::start_on(db.clone(), |b| b).await;
    applied_once([&a, &b], 8).await;
}

async fn refused(t: &TestServer, body: &Value, code: &str, message: &str) {
    let (status, answer) = t.post_usage(body).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"], code, "{answer}");
    let got = answer["message"].as_str().unwrap();
    assert!(got.contains(message), "`{got}` does not say `{message}`");
}

#[tokio::test]
async fn malformed_aggregate_batches_are_400_naming_the_problem() {
    let t = TestServer::start().await;
    let key = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let good = serde_json::to_value(aggregate_batch(aggregate(&traffic(3, 20, std::slice::from_ref(&key))))).unwrap();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    refused(
        &t,
        &with(&|v| v["batch_id"] = json!("ABCDEF0123456789abcdef0123456789")),
        "invalid_batch_id",
        "32 lowercase hex",
    )
    .await;
    refused(&t, &with(&|v| v["batch_id"] = json!("abc")), "invalid_batch_id", "`abc`").await;
    refused(&t, &with(&|v| v["rows"][0]["requests"] = json!(9999)), "invalid_row", "rows[0]: `requests` (9999)").await;
    refused(&t, &with(&|v| v["rows"][1]["status"]["2xx"] = json!(777)), "invalid_row", "rows[1]").await;
    refused(&t, &with(&|v| v["rows"][0]["minute"] = json!(61)), "invalid_row", "multiple of 60").await;
    refused(&t, &with(&|v| v["rows"][0]["outcome"] = json!("maybe")), "invalid_request", "unknown variant").await;
    let lying_histogram = json!({"count": 1, "sum_us": 1, "max_us": 1, "buckets": [[300, 1]]});
    refused(&t, &with(&|v| v["rows"][0]["latency"] = lying_histogram.clone()), "invalid_request", "latency bucket 300")
        .await;
    let network = json!({"key_id": key, "network": "10.1.2.3/24", "minute": this_minute()});
    refused(&t, &with(&|v| v["networks"] = json!([network])), "invalid_network", "networks[0]").await;
    refused(&t, &with(&|v| v["events"] = json!([])), "invalid_request", "not both").await;
    let row = good["rows"][0].clone();
    refused(&t, &with(&|v| v["rows"] = json!(vec![row.clone(); 20_001])), "too_many_rows", "at most 20000 rows").await;
    let network = json!({"key_id": key, "network": "10.1.2.0/24", "minute": this_minute()});
    let many = vec![network; 20_001];
    refused(&t, &with(&|v| v["networks"] = json!(many)), "too_many_networks", "at most 20000 networks").await;
    // Larger than 16 MiB: 413, before parsing.
    let big = with(&|v| v["pad"] = json!("x".repeat(17 * 1024 * 1024)));
    assert_eq!(t.post_usage(&big).await.0, 413);
    // A raw batch keeps its own 4 MiB limit.
    let raw = json!({ "events": [], "pad": "x".repeat(5 * 1024 * 1024) });
    assert_eq!(t.post_usage(&raw).await.0, 413);

    let stats = t.server.stats();
    assert_eq!((stats.usage_batches, stats.usage_requests), (0, 0), "nothing refused was stored");
    assert!(t.admin.usage_report(&UsageQuery::key(&key)).await.unwrap().buckets.is_empty());
    assert_eq!(t.post_usage(&good).await.0, 202, "the server is still up and takes the good batch");

    // A route or method no report could show costs its row, not the batch.
    for (field, bad) in [("route", json!("")), ("route", json!("/x\u{85}")), ("method", json!("G\nET"))] {
        let mut odd = with(&|v| v["rows"][0][field] = bad.clone());
        odd["batch_id"] = json!(format!("{:032x}", getrandom::u64().unwrap()));
        let row_requests = odd["rows"][0]["requests"].as_u64().unwrap();
        let (status, answer) = t.post_usage(&odd).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["refused"].as_u64(), Some(row_requests), "{field}: {answer}");
        assert!(answer["accepted"].as_u64().unwrap() > 0, "the other rows are stored: {answer}");
    }
}

#[tokio::test]
async fn rows_outside_the_window_and_of_unknown_keys_are_counted_not_stored() {
    let t = TestServer::start().await;
    let key = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let now = this_minute();
    let req = |minute: i64, key_id: Option<&str>| Req {
        minute,
        key_id: key_id.map(str::to_owned),
        route: "/reports",
        method: "GET",
        outcome: Outcome::Allowed,
        status: 200,
        latency_us: 1500,
    };
    let mut rows = Vec::new();
    // One key, route and minute in two rows of the batch: merged (2 + 3).
    rows.extend(aggregate(&vec![req(now, Some(&key)); 2]));
    rows.extend(aggregate(&vec![req(now, Some(&key)); 3]));
    rows.extend(aggregate(&vec![req(now - 25 * 3600, Some(&key)); 3]));
    rows.extend(aggregate(&vec![req(now + 600, Some(&key)); 2]));
    rows.extend(aggregate(&vec![req(now, Some("key_0000000000000000000000")); 4]));
    rows.extend(aggregate(&vec![req(now, Some("not-a-key-id")); 1]));
    rows.extend(aggregate(&vec![req(now, None); 6]));
    let mut batch = aggregate_batch(rows);
    batch.dropped = 7;
    batch.overflowed = 11;
    batch.networks_dropped = 13;
    let (status, answer) = t.post_usage(&batch).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer, json!({ "accepted": 5, "refused": 5, "unknown": 5, "unattributed": 6 }));

    let s = t.server.stats();
    assert_eq!(s.usage_rows, 7);
    assert_eq!((s.usage_requests, s.usage_rows_refused, s.usage_requests_refused), (5, 2, 5));
    assert_eq!((s.usage_unknown, s.usage_unattributed), (5, 6));
    assert_eq!((s.usage_dropped_reported, s.usage_overflowed_reported, s.usage_networks_dropped_reported), (7, 11, 13));
    let report = t.admin.usage_report(&UsageQuery::key(&key)).await.unwrap();
    assert_eq!(report.buckets.len(), 1);
    assert_eq!((report.buckets[0].requests, report.buckets[0].start.unix_timestamp()), (5, now));
    // `last_used_at` is the rows' last request.
    let last = t.admin.get_key(&key).await.unwrap().last_used_at.unwrap();
    assert_eq!(last.unix_timestamp(), now + 30);
}

#[tokio::test]
async fn raw_events_fold_into_the_same_rows() {
    let t = TestServer::start().await;
    let key = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let now = time::OffsetDateTime::now_utc();
    let event = |key_id: &str, outcome: Outcome, status: u16| UsageEvent {
        at: now,
        key_id: Some(key_id.into()),
        owner: None,
        outcome,
        method: "GET".into(),
        route: "/reports/{id}".into(),
        status,
        latency: Duration::from_millis(3),
        client_ip: None,
        request_id: None,
    };
    let mut events = vec![event(&key, Outcome::Allowed, 200); 4];
    events.push(event(&key, Outcome::Revoked, 401));
    events.push(event("key_0000000000000000000000", Outcome::Allowed, 200));
    let (status, answer) = t.post_usage(&json!({ "events": events, "dropped": 2 })).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer, json!({ "accepted": 5, "unknown": 1 }));
    let routes = t.admin.usage_report(&UsageQuery::key(&key).group_by(UsageGroupBy::Route)).await.unwrap();
    let got: Vec<(&str, &str, &str, u64)> = routes
        .buckets
        .iter()
        .map(|b| (b.route.as_deref().unwrap(), b.method.as_deref().unwrap(), b.outcome.as_deref().unwrap(), b.requests))
        .collect();
    assert_eq!(got, [("/reports/{id}", "GET", "allowed", 4), ("/reports/{id}", "GET", "revoked", 1)]);
    let p50 = routes.buckets[0].latency_ms_p50.unwrap();
    assert!((p50 - 3.0).abs() <= 3.0 * keygate::LATENCY_RELATIVE_ERROR, "{p50}");
    assert_eq!(routes.buckets[0].latency_ms_max, 3.0);
    let s = t.server.stats();
    assert_eq!((s.usage_events, s.usage_requests, s.usage_dropped_reported), (6, 5, 2));
}

#[tokio::test]
async fn aggregates_raise_the_same_alerts() {
    let config = AlertConfig { rate_min: 100_000, ..AlertConfig::default() };
    let t = TestServer::start_on(TestDb::sqlite(), |b: KeyServer| b.alerts(config)).await;
    let key = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let now = this_minute();
    let req = |minute: i64, outcome: Outcome, status: u16| Req {
        minute,
        key_id: Some(key.clone()),
        route: "/reports",
        method: "GET",
        outcome,
        status,
        latency_us: 900,
    };
    // Ten minutes of 60 requests with 4 denials, then this minute's burst of 150 more.
    let mut reqs = Vec::new();
    for m in 1..=10 {
        for i in 0..60 {
            let (outcome, status) = if i < 4 { (Outcome::InsufficientScope, 403) } else { (Outcome::Allowed, 200) };
            reqs.push(req(now - 60 * m, outcome, status));
        }
    }
    let mut steady = aggregate_batch(aggregate(&reqs));
    let network = |n: &str| ClientNetwork { key_id: key.as_str().into(), network: n.into(), minute: now - 600 };
    steady.networks = vec![network("203.0.113.0/24")];
    assert_eq!(t.post_usage(&steady).await.0, 202);
    assert!(t.admin.alerts().await.unwrap().is_empty(), "steady traffic and a first network raise nothing");

    let mut burst: Vec<Req> = (0..4).map(|_| req(now, Outcome::InsufficientScope, 403)).collect();
    burst.extend((0..150).map(|_| req(now, Outcome::NotFound, 401)));
    let mut burst = aggregate_batch(aggregate(&burst));
    burst.networks = vec![network("203.0.113.0/24"), network("198.51.100.0/24")];
    assert_eq!(t.post_usage(&burst).await.0, 202);
    let alerts = t.admin.alerts().await.unwrap();
    let spike = alerts.iter().find(|a| a.kind == AlertKind::DenialSpike).expect("a denial spike");
    assert_eq!((spike.minute.unix_timestamp(), spike.observed), (now, 154));
    assert!((spike.baseline - 4.0).abs() < 1e-9);
    let new = alerts.iter().find(|a| a.kind == AlertKind::NewNetwork).expect("a new network");
    assert!(new.detail.contains("198.51.100.0/24"));
    assert_eq!(alerts.len(), 2, "{alerts:?}");
}
