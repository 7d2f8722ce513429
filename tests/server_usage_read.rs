//! `GET /v1/usage`: every grouping, percentiles of a known latency distribution, owner
//! sums, the bounds of a query, and the CLI's table.

mod server_support;

use keygate::client::{UsageBucket, UsageGroupBy, UsageQuery};
use keygate::{LATENCY_RELATIVE_ERROR, Outcome};
use server_support::{ADMIN, Req, TestServer, aggregate, aggregate_batch, new_key, this_minute};
use time::OffsetDateTime;

fn at(s: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(s).unwrap()
}

fn floor(t: i64, size: i64) -> i64 {
    t - t.rem_euclid(size)
}

/// Latencies 1 ms to 1 000 ms, one request each, spread over three minutes an hour
/// apart or more (so in three hours), all allowed with 200 but every tenth a 302.
fn known_distribution(key: &str) -> (Vec<Req>, [i64; 3]) {
    let now = this_minute();
    let minutes = [now - 150 * 60, now - 70 * 60, now - 10 * 60];
    let reqs = (1..=1000u64)
        .map(|ms| Req {
            minute: minutes[(ms % 3) as usize],
            key_id: Some(key.to_owned()),
            route: "/reports/{id}",
            method: "GET",
            outcome: Outcome::Allowed,
            status: if ms % 10 == 0 { 302 } else { 200 },
            latency_us: ms * 1000,
        })
        .collect();
    (reqs, minutes)
}

fn total(buckets: &[UsageBucket]) -> u64 {
    buckets.iter().map(|b| b.requests).sum()
}

fn near(got: Option<f64>, exact: f64) {
    let got = got.expect("a percentile");
    assert!((got - exact).abs() <= exact * LATENCY_RELATIVE_ERROR, "{got} ms is not within the error of {exact} ms");
}

#[tokio::test]
async fn every_grouping_counts_the_same_requests_and_percentiles_are_within_the_error() {
    let t = TestServer::start().await;
    let key = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let (reqs, minutes) = known_distribution(&key);
    // In two batches, as two middlewares would.
    for half in reqs.chunks(500) {
        assert_eq!(t.post_usage(&aggregate_batch(aggregate(half))).await.0, 202);
    }
    let report = |g: UsageGroupBy| {
        let admin = t.admin.clone();
        let key = key.clone();
        async move { admin.usage_report(&UsageQuery::key(key).group_by(g)).await.unwrap() }
    };

    let by_minute = report(UsageGroupBy::Minute).await;
    assert_eq!(by_minute.key_id.as_deref(), Some(key.as_str()));
    assert_eq!(by_minute.group_by, UsageGroupBy::Minute);
    let starts: Vec<i64> = by_minute.buckets.iter().map(|b| b.start.unix_timestamp()).collect();
    assert_eq!(starts, minutes);
    assert_eq!(by_minute.buckets.iter().map(|b| b.requests).collect::<Vec<_>>(), [333, 334, 333]);

    let by_hour = report(UsageGroupBy::Hour).await;
    let starts: Vec<i64> = by_hour.buckets.iter().map(|b| b.start.unix_timestamp()).collect();
    assert_eq!(starts, minutes.map(|m| floor(m, 3600)));
    assert_eq!(total(&by_hour.buckets), 1000);

    let by_day = report(UsageGroupBy::Day).await;
    let mut days: Vec<i64> = minutes.iter().map(|m| floor(*m, 86_400)).collect();
    days.dedup();
    assert_eq!(by_day.buckets.iter().map(|b| b.start.unix_timestamp()).collect::<Vec<_>>(), days);
    assert_eq!(total(&by_day.buckets), 1000);

    let by_route = report(UsageGroupBy::Route).await;
    assert_eq!(by_route.buckets.len(), 1);
    let b = &by_route.buckets[0];
    assert_eq!(
        (b.route.as_deref(), b.method.as_deref(), b.outcome.as_deref()),
        (Some("/reports/{id}"), Some("GET"), Some("allowed"))
    );
    assert_eq!((b.requests, b.allowed, b.denied, b.status_2xx, b.status_3xx), (1000, 1000, 0, 900, 100));
    // The exact percentiles of 1..=1000 ms are 500, 900 and 990 ms; the maximum is exact.
    near(b.latency_ms_p50, 500.0);
    near(b.latency_ms_p90, 900.0);
    near(b.latency_ms_p99, 990.0);
    assert_eq!(b.latency_ms_max, 1000.0);
    assert_eq!(b.latency_ms_sum, 500_500.0);
    assert_eq!(b.start.unix_timestamp(), by_route.since.unwrap().unix_timestamp());
    // The same from hour buckets merged over a day.
    if by_day.buckets.len() == 1 {
        near(by_day.buckets[0].latency_ms_p90, 900.0);
    }
    // A minute's percentiles are its own: the oldest minute holds 3, 6, ..., 999 ms.
    let last = &by_minute.buckets[0];
    near(last.latency_ms_p50, 501.0);

    // `since` and `until` narrow the answer, rounded out to whole buckets.
    let q = UsageQuery::key(&key).since(at(minutes[1] + 1)).until(at(minutes[2] + 1));
    let narrowed = t.admin.usage_report(&q).await.unwrap();
    assert_eq!(narrowed.since.unwrap().unix_timestamp(), minutes[1]);
    assert_eq!(narrowed.until.unwrap().unix_timestamp(), minutes[2] + 60);
    assert_eq!(narrowed.buckets.len(), 2);
}

#[tokio::test]
async fn an_owner_report_sums_the_owners_keys_only() {
    let t = TestServer::start().await;
    let a = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let b = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let other = t.admin.create_key(new_key("globex", &["a:b"])).await.unwrap().key_id;
    let now = this_minute();
    let req = |key: &str, minute: i64| Req {
        minute,
        key_id: Some(key.to_owned()),
        route: "/x",
        method: "GET",
        outcome: Outcome::Allowed,
        status: 200,
        latency_us: 10,
    };
    let mut reqs = vec![req(&a, now); 3];
    reqs.extend(vec![req(&b, now); 4]);
    reqs.extend(vec![req(&b, now - 60); 5]);
    reqs.extend(vec![req(&other, now); 100]);
    assert_eq!(t.post_usage(&aggregate_batch(aggregate(&reqs))).await.0, 202);
    let report = t.admin.usage_report(&UsageQuery::owner("acme")).await.unwrap();
    assert_eq!((report.owner.as_deref(), report.key_id.as_deref()), (Some("acme"), None));
    let got: Vec<(i64, u64)> = report.buckets.iter().map(|b| (b.start.unix_timestamp(), b.requests)).collect();
    assert_eq!(got, [(now - 60, 5), (now, 7)]);
    let day = t.admin.usage_report(&UsageQuery::owner("acme").group_by(UsageGroupBy::Day)).await.unwrap();
    assert_eq!(total(&day.buckets), 12);
}

#[tokio::test]
async fn usage_queries_out_of_bounds_are_400() {
    let t = TestServer::start().await;
    let get = |q: &'static str| {
        let t = &t;
        async move {
            let res = t.http.get(t.url(&format!("/v1/usage?{q}"))).bearer_auth(ADMIN).send().await.unwrap();
            (res.status().as_u16(), res.json::<serde_json::Value>().await.unwrap())
        }
    };
    let cases = [
        ("", "exactly one of `key_id` or `owner`"),
        ("key_id=key_a&owner=acme", "exactly one of `key_id` or `owner`"),
        ("key_id=key_a&group_by=week", "unknown variant `week`"),
        ("key_id=key_a&since=yesterday", "`since` must be an RFC 3339 time"),
        ("key_id=key_a&until=soon", "`until` must be an RFC 3339 time"),
        ("key_id=key_a&since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z", "`since` must be before `until`"),
        ("key_id=key_a&since=2026-01-01T00:00:00Z&until=2026-01-09T00:00:00Z", "at most 10080 buckets"),
        ("key_id=key_a&since=2020-01-01T00:00:00Z&until=2026-01-01T00:00:00Z&group_by=day", "at most 400 days"),
        ("key_id=key_a&limit=5", "unknown field `limit`"),
    ];
    for (q, message) in cases {
        let (status, body) = get(q).await;
        assert_eq!(status, 400, "{q}: {body}");
        assert_eq!(body["error"], "invalid_query", "{q}: {body}");
        assert!(body["message"].as_str().unwrap().contains(message), "{q}: {body}");
    }
    // Wide spans are fine in longer buckets.
    let (status, body) = get("owner=acme&since=2026-01-01T00:00:00Z&until=2026-01-09T00:00:00Z&group_by=hour").await;
    assert_eq!((status, &body["buckets"]), (200, &serde_json::json!([])));
}

#[tokio::test]
async fn the_cli_shows_usage_per_owner_and_route() {
    let t = TestServer::start().await;
    let a = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let b = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let now = this_minute();
    let req = |key: &str, outcome: Outcome, status: u16| Req {
        minute: now,
        key_id: Some(key.to_owned()),
        route: "/reports/{id}",
        method: "GET",
        outcome,
        status,
        latency_us: 2000,
    };
    let mut reqs = vec![req(&a, Outcome::Allowed, 200); 6];
    reqs.extend(vec![req(&b, Outcome::Allowed, 200); 4]);
    reqs.extend(vec![req(&b, Outcome::InsufficientScope, 403); 2]);
    assert_eq!(t.post_usage(&aggregate_batch(aggregate(&reqs))).await.0, 202);

    let run = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate-server"));
        cmd.arg("usage").args(args).args(["--url", &t.server.url()]).env("KEYGATE_ADMIN_TOKEN", ADMIN);
        async move {
            let out = cmd.output().await.unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let text = run(&["--owner", "acme", "--group-by", "route"]).await;
    let lines: Vec<&str> = text.lines().collect();
    let cells = |i: usize| lines[i].split_whitespace().collect::<Vec<_>>();
    assert!(lines[0].starts_with("owner acme (all keys), per route"), "{text}");
    assert_eq!(cells(1)[..6], ["route", "method", "outcome", "requests", "allowed", "denied"], "{text}");
    assert_eq!(cells(2)[..8], ["/reports/{id}", "GET", "allowed", "10", "10", "0", "0", "10"], "{text}");
    assert_eq!(
        cells(3)[..10],
        ["/reports/{id}", "GET", "insufficient_scope", "2", "0", "2", "0", "0", "0", "2"],
        "{text}"
    );
    assert_eq!(cells(4)[..4], ["total", "12", "10", "2"], "{text}");
    // An aligned table: the requests column starts at the same place on every line.
    let at = lines[1].find("requests").unwrap();
    for line in &lines[2..=4] {
        assert!(line[at..].starts_with(|c: char| c.is_ascii_digit()) && line[..at].ends_with(' '), "{text}");
    }

    // The key id as an argument, as before, and JSON on request.
    let text = run(&[&a]).await;
    assert_eq!(text.lines().nth(2).unwrap().split_whitespace().collect::<Vec<_>>()[1..4], ["6", "6", "0"], "{text}");
    let json: serde_json::Value = serde_json::from_str(&run(&["--key-id", &b, "--json"]).await).unwrap();
    assert_eq!(json["buckets"][0]["requests"], 6);
    assert_eq!(json["key_id"], b.as_str());
}
