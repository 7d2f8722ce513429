//! `POST /v1/usage` ingestion, per-minute aggregates, `last_used_at`, and alerts.

mod server_support;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use keygate::server::AlertConfig;
use keygate::wire::AlertKind;
use keygate::{Outcome, UsageEvent};
use serde_json::json;
use server_support::{Events, SERVICE, TestServer, new_key};
use time::OffsetDateTime;

fn event(key_id: &str, at: OffsetDateTime, outcome: Outcome, status: u16, ms: u64, ip: Option<&str>) -> UsageEvent {
    UsageEvent {
        at,
        key_id: Some(Arc::from(key_id)),
        owner: Some(Arc::from("acme")),
        outcome,
        method: "GET".into(),
        route: Arc::from("/reports/{id}"),
        status,
        latency: Duration::from_millis(ms),
        client_ip: ip.map(|s| s.parse::<IpAddr>().unwrap()),
        request_id: None,
    }
}

async fn ingest(t: &TestServer, events: &[UsageEvent]) -> u64 {
    let res = t
        .http
        .post(t.url("/v1/usage"))
        .bearer_auth(SERVICE)
        .json(&json!({ "events": events, "dropped": 0 }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    res.json::<serde_json::Value>().await.unwrap()["accepted"].as_u64().unwrap()
}

fn minute(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_second(0).unwrap().replace_nanosecond(0).unwrap()
}

#[tokio::test]
async fn concurrent_batches_add_up_exactly() {
    let t = TestServer::start().await;
    let k = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let now = OffsetDateTime::now_utc();
    let this_minute = minute(now);
    let prev_minute = this_minute - time::Duration::minutes(1);
    // 8 concurrent batches of 250 events over two minutes: 2 000 events.
    let batches: Vec<Vec<UsageEvent>> = (0..8)
        .map(|b| {
            (0..250)
                .map(|i| {
                    let at =
                        if i % 2 == 0 { this_minute } else { prev_minute } + time::Duration::seconds((i % 60) as i64);
                    let (outcome, status) = match (b + i) % 4 {
                        0 => (Outcome::Revoked, 401),
                        1 => (Outcome::Allowed, 500),
                        _ => (Outcome::Allowed, 200),
                    };
                    event(&k.key_id, at, outcome, status, (i % 7) as u64 + 1, None)
                })
                .collect()
        })
        .collect();
    let accepted = futures_util::future::join_all(batches.iter().map(|b| ingest(&t, b))).await;
    assert_eq!(accepted.iter().sum::<u64>(), 2000);

    let report = t.admin.usage(&k.key_id, None).await.unwrap();
    assert_eq!(report.key_id.as_deref(), Some(k.key_id.as_str()));
    assert_eq!(report.buckets.len(), 2);
    assert_eq!(report.buckets[0].start, prev_minute);
    assert_eq!(report.buckets[1].start, this_minute);
    let sum = |f: fn(&keygate::client::UsageBucket) -> u64| report.buckets.iter().map(f).sum::<u64>();
    assert_eq!(sum(|b| b.requests), 2000);
    assert_eq!(sum(|b| b.allowed) + sum(|b| b.denied), 2000);
    assert_eq!(sum(|b| b.denied), 500);
    assert_eq!(sum(|b| b.status_2xx) + sum(|b| b.status_4xx) + sum(|b| b.status_5xx), 2000);
    assert_eq!(sum(|b| b.status_4xx), 500);
    let expected_latency: u64 = batches.iter().flatten().map(|e| e.latency.as_millis() as u64).sum();
    let latency: f64 = report.buckets.iter().map(|b| b.latency_ms_sum).sum();
    assert!((latency - expected_latency as f64).abs() < 1e-6);
    assert!(report.buckets.iter().all(|b| b.latency_ms_max == 7.0));

    // last_used_at moves to the newest event and shows in the key list.
    let listed = t.admin.list_keys(Some("acme")).await.unwrap();
    let last = listed[0].last_used_at.expect("last_used_at");
    assert!(last >= this_minute && last < this_minute + time::Duration::minutes(1));
    assert_eq!(t.server.stats().usage_events, 2000);
    // `since` narrows the answer.
    let later = t.admin.usage(&k.key_id, Some(this_minute)).await.unwrap();
    assert_eq!(later.buckets.len(), 1);
}

#[tokio::test]
async fn bad_batches_are_refused_whole() {
    let t = TestServer::start().await;
    let res = t
        .http
        .post(t.url("/v1/usage"))
        .bearer_auth(SERVICE)
        .body(r#"{"events":[{"at":"not a time"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let too_many: Vec<UsageEvent> =
        (0..10_001).map(|_| event("key_x", OffsetDateTime::now_utc(), Outcome::Allowed, 200, 1, None)).collect();
    let res =
        t.http.post(t.url("/v1/usage")).bearer_auth(SERVICE).json(&json!({ "events": too_many })).send().await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["error"], "too_many_events");
    assert_eq!(t.server.stats().usage_events, 0);
}

#[tokio::test]
async fn a_denial_burst_raises_an_alert_and_steady_traffic_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = AlertConfig { rate_min: 100_000, ..AlertConfig::default() };
    let t = TestServer::start_in(dir, |b| b.alerts(config)).await;
    let steady = t.admin.create_key(new_key("steady", &["a:b"])).await.unwrap();
    let bursty = t.admin.create_key(new_key("bursty", &["a:b"])).await.unwrap();
    let mut events = Events::connect(&t).await;
    let now = minute(OffsetDateTime::now_utc());

    // Eleven minutes of the same traffic for both keys: 60 requests, 4 denials a minute.
    for m in (0..=10).rev() {
        let at = now - time::Duration::minutes(m);
        let mut batch = Vec::new();
        for key in [&steady.key_id, &bursty.key_id] {
            for i in 0..60 {
                let outcome = if i < 4 { Outcome::InsufficientScope } else { Outcome::Allowed };
                batch.push(event(
                    key,
                    at + time::Duration::seconds(i),
                    outcome,
                    if i < 4 { 403 } else { 200 },
                    2,
                    None,
                ));
            }
        }
        ingest(&t, &batch).await;
    }
    assert!(t.admin.alerts().await.unwrap().is_empty(), "steady traffic raised an alert");

    // Then one key sees a burst of denials in the current minute.
    let burst: Vec<UsageEvent> = (0..150)
        .map(|i| event(&bursty.key_id, now + time::Duration::seconds(i % 60), Outcome::NotFound, 401, 1, None))
        .collect();
    ingest(&t, &burst).await;
    let alerts = t.admin.alerts().await.unwrap();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let a = &alerts[0];
    assert_eq!(a.key_id, bursty.key_id);
    assert_eq!(a.kind, AlertKind::DenialSpike);
    assert_eq!(a.minute, now);
    assert_eq!(a.observed, 154);
    assert!((a.baseline - 4.0).abs() < 1e-9);
    assert_eq!(a.threshold, 20.0);
    // Published once on the event stream, and not raised twice for the same minute.
    let (name, data) = events.next_change(Duration::from_secs(5)).await.unwrap();
    assert_eq!(name, "alert");
    assert_eq!(data["kind"], "denial_spike");
    assert_eq!(data["key_id"], bursty.key_id.as_str());
    ingest(&t, &burst).await;
    assert_eq!(t.admin.alerts().await.unwrap().len(), 1);
    assert_eq!(t.server.stats().alerts_raised, 1);
}

#[tokio::test]
async fn a_new_client_network_raises_an_alert() {
    let t = TestServer::start().await;
    let k = t.admin.create_key(new_key("acme", &["a:b"])).await.unwrap();
    let now = OffsetDateTime::now_utc();
    // First network ever, and other addresses in the same /24: nothing.
    ingest(&t, &[event(&k.key_id, now, Outcome::Allowed, 200, 1, Some("203.0.113.7"))]).await;
    ingest(&t, &[event(&k.key_id, now, Outcome::Allowed, 200, 1, Some("203.0.113.200"))]).await;
    assert!(t.admin.alerts().await.unwrap().is_empty());
    // Another network: an alert naming it.
    ingest(&t, &[event(&k.key_id, now, Outcome::Allowed, 200, 1, Some("198.51.100.9"))]).await;
    let alerts = t.admin.alerts().await.unwrap();
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].kind, AlertKind::NewNetwork);
    assert!(alerts[0].detail.contains("198.51.100.0/24"));
}
