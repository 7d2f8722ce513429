//! Upgrading a key service that already holds keys and usage: a SQLite database made by
//! schema 1 (before edge aggregation) is migrated at start, its keys keep verifying, its
//! minute rows (which have no latency histogram) stay readable, and new aggregate batches
//! add to them exactly.

mod server_support;

use std::sync::Arc;
use std::time::Duration;

use keygate::LatencyHistogram;
use keygate::client::UsageQuery;
use serde_json::json;
use server_support::{TestDb, TestServer, this_minute};

const OLD_KEY: &str = "key_AAAAAAAAAAAAAAAAAAAAAA";

/// A database as schema 1 left it: migrated by the first migration alone (so that the
/// server finds it recorded with the same checksum), with a key and a minute of usage.
async fn schema_one(dir: &tempfile::TempDir, minute: i64) {
    let only_first = dir.path().join("migrations");
    std::fs::create_dir(&only_first).unwrap();
    let first = concat!(env!("CARGO_MANIFEST_DIR"), "/src/server/store/migrations/sqlite/0001_initial.sql");
    std::fs::copy(first, only_first.join("0001_initial.sql")).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("keys.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::migrate::Migrator::new(only_first.as_path()).await.unwrap().run(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO keys (key_id, owner, name, scopes, roles, environment, meta, key_prefix, created_at) \
         VALUES ($1, 'acme', 'old', '[\"reports:read\"]', '[]', 'live', '{}', 'kg_AAAA', $2)",
    )
    .bind(OLD_KEY)
    .bind(minute * 1000)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_minutes (key_id, minute, requests, allowed, denied, status_2xx, status_4xx, status_5xx, \
         latency_us_sum, latency_us_max) VALUES ($1, $2, 7, 5, 2, 5, 2, 0, 700, 300)",
    )
    .bind(OLD_KEY)
    .bind(minute)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_one_database_is_migrated_and_its_usage_adds_up_with_new_batches() {
    let dir = tempfile::tempdir().unwrap();
    let minute = this_minute() - 120;
    schema_one(&dir, minute).await;
    let t = TestServer::start_on(TestDb::Sqlite(Arc::new(dir)), |b| b).await;

    let before = t.admin.usage_report(&UsageQuery::key(OLD_KEY)).await.unwrap();
    let total = |r: &keygate::client::UsageReport| {
        r.buckets.iter().map(|b| (b.requests, b.allowed)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    assert_eq!(total(&before), (7, 5), "schema-1 usage is still there: {before:?}");

    let mut latency = LatencyHistogram::new();
    for _ in 0..3 {
        latency.record(Duration::from_micros(100));
    }
    let batch = json!({
        "batch_id": "00000000000000000000000000000012",
        "rows": [{
            "minute": minute, "key_id": OLD_KEY, "route": "/reports", "method": "GET", "outcome": "allowed",
            "requests": 3, "status": {"2xx": 3}, "latency": latency, "last_at_ms": minute * 1000 + 1,
        }],
    });
    let (status, answer) = t.post_usage(&batch).await;
    assert_eq!((status, answer["accepted"].as_u64()), (202, Some(3)), "{answer}");

    let after = t.admin.usage_report(&UsageQuery::key(OLD_KEY)).await.unwrap();
    assert_eq!(total(&after), (10, 8), "{after:?}");
    assert!(t.admin.get_key(OLD_KEY).await.unwrap().last_used_at.is_some());
}
