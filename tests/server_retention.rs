//! Usage retention, run by the key service: minute rows older than the window are
//! rolled up into hour rows and deleted, with the totals unchanged; old hour rows and
//! batch ids are deleted; on PostgreSQL, two replicas running passes at once roll up
//! each minute once.

mod server_support;

use std::time::Duration;

use keygate::Outcome;
use keygate::client::{UsageBucket, UsageGroupBy, UsageQuery, UsageReport};
use keygate::server::{KeyServer, RetentionConfig};
use server_support::{Req, TestDb, TestServer, aggregate, aggregate_batch, new_key, this_minute};
use time::OffsetDateTime;

/// Minute rows qualify two minutes after their minute; passes only when the test asks.
fn short(hours: Duration) -> impl FnOnce(KeyServer) -> KeyServer {
    move |b| {
        b.retention(RetentionConfig {
            enabled: false,
            minutes: Duration::from_secs(120),
            hours,
            rows_per_transaction: 2,
            ..RetentionConfig::default()
        })
    }
}

const DEFAULT_HOURS: Duration = Duration::from_secs(90 * 86_400);

fn traffic(keys: &[&str], minutes: &[i64]) -> Vec<Req> {
    let mut reqs = Vec::new();
    for (k, key) in keys.iter().enumerate() {
        for (m, minute) in minutes.iter().enumerate() {
            for i in 0..(10 + k * 3 + m) as u64 {
                reqs.push(Req {
                    minute: *minute,
                    key_id: Some((*key).to_owned()),
                    route: if i % 2 == 0 { "/a" } else { "/b" },
                    method: "GET",
                    outcome: if i % 5 == 0 { Outcome::NotFound } else { Outcome::Allowed },
                    status: if i % 5 == 0 { 401 } else { 200 },
                    latency_us: 1000 + 997 * i,
                });
            }
        }
    }
    reqs
}

async fn report(t: &TestServer, q: UsageQuery) -> UsageReport {
    t.admin.usage_report(&q).await.unwrap()
}

/// Requests, allowed, denied and the latency sum in microseconds (exact integers).
fn sum(buckets: &[UsageBucket]) -> (u64, u64, u64, u64) {
    buckets.iter().fold((0, 0, 0, 0), |(r, a, d, l), b| {
        (r + b.requests, a + b.allowed, d + b.denied, l + (b.latency_ms_sum * 1000.0).round() as u64)
    })
}

/// Posts traffic at 30, 20 and 10 minutes ago and now, runs passes on `targets` at
/// once, and checks what moved.
async fn rolls_up(targets: [&TestServer; 2]) {
    let t = targets[0];
    let k1 = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let k2 = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let now = this_minute();
    let old = [now - 30 * 60, now - 20 * 60, now - 10 * 60];
    let minutes = [old[0], old[1], old[2], now];
    assert_eq!(t.post_usage(&aggregate_batch(aggregate(&traffic(&[&k1, &k2], &minutes)))).await.0, 202);

    let queries = |key: &str| {
        [UsageGroupBy::Hour, UsageGroupBy::Day, UsageGroupBy::Route].map(|g| UsageQuery::key(key).group_by(g))
    };
    let mut before = Vec::new();
    for key in [&k1, &k2] {
        for q in queries(key) {
            before.push(report(t, q).await.buckets);
        }
    }
    let minutes_before = report(t, UsageQuery::key(&k1)).await.buckets;
    assert_eq!(minutes_before.len(), 4);
    let old_total = sum(&minutes_before[..3]);

    // Both replicas at once (or one server twice at once).
    let (ra, rb) = tokio::join!(targets[0].server.state().run_retention(), targets[1].server.state().run_retention());
    let rolled = ra.unwrap().minutes_rolled_up + rb.unwrap().minutes_rolled_up;
    assert_eq!(rolled, 6, "three old minutes of two keys, each rolled up once");

    // The minute rows are gone...
    let minutes_after = report(t, UsageQuery::key(&k1)).await.buckets;
    assert_eq!(minutes_after, minutes_before[3..]);
    // ...and hours, days and routes count exactly what they did: the hour rows hold
    // the removed minutes' totals, histograms merged.
    let mut after = Vec::new();
    for key in [&k1, &k2] {
        for q in queries(key) {
            after.push(report(targets[1], q).await.buckets);
        }
    }
    assert_eq!(after, before);
    let hours = report(t, UsageQuery::key(&k1).group_by(UsageGroupBy::Hour)).await.buckets;
    assert_eq!(sum(&hours), {
        let recent = sum(&minutes_before[3..]);
        (old_total.0 + recent.0, old_total.1 + recent.1, old_total.2 + recent.2, old_total.3 + recent.3)
    });
    let rolled_stat: u64 = if std::ptr::eq(targets[0], targets[1]) {
        t.server.stats().retention_minutes_rolled_up
    } else {
        targets.iter().map(|s| s.server.stats().retention_minutes_rolled_up).sum()
    };
    assert_eq!(rolled_stat, 6);
    assert_eq!(t.server.state().run_retention().await.unwrap().minutes_rolled_up, 0, "nothing left");

    // A late row for a rolled-up minute is stored, then rolled up into the same hour.
    let late = traffic(&[&k1], &[old[1]]);
    assert_eq!(t.post_usage(&aggregate_batch(aggregate(&late))).await.0, 202);
    let day_query = UsageQuery::key(&k1).group_by(UsageGroupBy::Day);
    let with_late = sum(&report(t, day_query.clone()).await.buckets).0;
    assert_eq!(with_late, sum(&before[1]).0 + late.len() as u64);
    assert_eq!(t.server.state().run_retention().await.unwrap().minutes_rolled_up, 1);
    assert_eq!(sum(&report(t, day_query).await.buckets).0, with_late);
}

#[tokio::test]
async fn old_minutes_roll_up_into_hours_with_the_same_totals_on_sqlite() {
    let t = TestServer::start_on(TestDb::sqlite(), short(DEFAULT_HOURS)).await;
    rolls_up([&t, &t]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_replicas_rolling_up_at_once_roll_each_minute_up_once() {
    let Some(db) = TestDb::postgres().await else { return };
    let a = TestServer::start_on(db.clone(), short(DEFAULT_HOURS)).await;
    let b = TestServer::start_on(db.clone(), short(DEFAULT_HOURS)).await;
    rolls_up([&a, &b]).await;
}

#[tokio::test]
async fn old_hour_rows_and_batch_ids_are_deleted() {
    let t = TestServer::start_on(TestDb::sqlite(), short(Duration::from_secs(120))).await;
    let key = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap().key_id;
    let now = this_minute();
    let old = [now - 3 * 3600, now - 2 * 3600];
    let batch = aggregate_batch(aggregate(&traffic(&[&key], &[old[0], old[1], now])));
    assert_eq!(t.post_usage(&batch).await.0, 202);
    // A batch id applied 26 hours ago, written as the key service would have.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", t.db_path().display())).await.unwrap();
    let long_ago = (OffsetDateTime::now_utc() - time::Duration::hours(26)).unix_timestamp() * 1000;
    sqlx::query("INSERT INTO usage_batches (batch_id, applied_at, accepted) VALUES ($1, $2, 0)")
        .bind("0".repeat(32))
        .bind(long_ago)
        .execute(&pool)
        .await
        .unwrap();

    let done = t.server.state().run_retention().await.unwrap();
    assert_eq!(done.minutes_rolled_up, 2);
    assert_eq!(done.batch_ids_deleted, 1);
    // Two rolled-up hours and their route rows (two routes, two outcomes each) are past
    // two minutes; the current hour's route rows may be too.
    assert!(done.hours_deleted >= 2 + 2 * 4, "{done:?}");
    let old_span = UsageQuery::key(&key)
        .since(OffsetDateTime::from_unix_timestamp(old[0]).unwrap())
        .until(OffsetDateTime::from_unix_timestamp(old[1] + 60).unwrap());
    assert!(report(&t, old_span.clone().group_by(UsageGroupBy::Hour)).await.buckets.is_empty());
    assert!(report(&t, old_span.group_by(UsageGroupBy::Route)).await.buckets.is_empty());
    // The current minute stays, and so does the recent batch id.
    assert_eq!(report(&t, UsageQuery::key(&key)).await.buckets.len(), 1);
    let (status, again) = t.post_usage(&batch).await;
    assert_eq!((status, &again["duplicate"]), (202, &serde_json::json!(true)));
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_batches").fetch_one(&pool).await.unwrap();
    assert_eq!(left, 1);
    assert_eq!(t.server.stats().retention_batch_ids_deleted, 1);
}

#[tokio::test]
async fn retention_settings_are_checked_at_start() {
    for bad in [
        RetentionConfig { minutes: Duration::from_secs(30), ..RetentionConfig::default() },
        RetentionConfig { hours: Duration::from_secs(3600), ..RetentionConfig::default() },
        RetentionConfig { interval: Duration::ZERO, ..RetentionConfig::default() },
        RetentionConfig { rows_per_transaction: 0, ..RetentionConfig::default() },
    ] {
        let err = KeyServer::builder().retention(bad.clone()).build().await.expect_err("refused");
        assert!(err.to_string().starts_with("configuration:"), "{bad:?}: {err}");
    }
}
