//! `GET /metrics` of a real key service, read with a Prometheus text-format parser: the
//! documented series are there, move by exactly the traffic sent, carry no key
//! material and no raw path, and two servers in one process count apart. The
//! PostgreSQL part (fan-out lag between replicas) needs `KEYGATE_TEST_POSTGRES_URL`.

mod server_support;
mod webhook_support;

use std::net::SocketAddr;
use std::time::Duration;

use keygate::client::{KeyPatch, TokenKind};
use keygate::server::{KeyServer, RetentionConfig, SqliteStore, WebhookConfig};
use prom_text_format_parser::{Scrape as Parsed, Type, ValueType};
use serde_json::json;
use server_support::{
    ADMIN, Events, Req, SERVICE, TestDb, TestServer, aggregate, aggregate_batch, eventually, new_key, this_minute,
};

const LIMIT: Duration = Duration::from_secs(10);

fn with_metrics(b: KeyServer) -> KeyServer {
    b.metrics_listen(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// One scrape: the raw text and what the parser made of it.
struct Scrape {
    text: String,
    parsed: Parsed,
}

impl Scrape {
    async fn of(t: &TestServer) -> Self {
        let addr = t.server.metrics_addr().expect("metrics are on");
        let res = t.http.get(format!("http://{addr}/metrics")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let content_type = res.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
        let text = res.text().await.unwrap();
        let parsed = Parsed::parse(&text).unwrap_or_else(|e| panic!("not the text format: {e:?}\n{text}"));
        Self { text, parsed }
    }

    fn metric(&self, name: &str) -> Option<&prom_text_format_parser::Metric> {
        self.parsed.metrics.iter().find(|m| m.name == name)
    }

    /// The value of `metric`'s sample of `kind` whose labels are exactly `labels`.
    fn sample(&self, metric: &str, kind: ValueType, labels: &[(&str, &str)]) -> Option<f64> {
        let m = self.metric(metric)?;
        m.samples
            .iter()
            .find(|s| {
                s.value.value_type == kind
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.iter().any(|l| l.key == *k && l.value == *v))
            })
            .map(|s| s.value.value.as_f64())
    }

    fn typed(&self, metric: &str, kind: Type, labels: &[(&str, &str)]) -> Option<f64> {
        let m = self.metric(metric)?;
        assert_eq!(m.kind, kind, "{metric}: {:?}, expected {kind:?}", m.kind);
        self.sample(metric, ValueType::Sample, labels)
    }

    /// A counter's value; panics when the series is missing.
    fn counter(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.typed(metric, Type::Counter, labels)
            .unwrap_or_else(|| panic!("{metric}{labels:?}: no such counter\n{}", self.text))
    }

    /// A counter's value, 0 when the series does not exist yet (labels seen first now).
    fn counter_or_zero(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.typed(metric, Type::Counter, labels).unwrap_or(0.0)
    }

    fn gauge(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        self.typed(metric, Type::Gauge, labels)
            .unwrap_or_else(|| panic!("{metric}{labels:?}: no such gauge\n{}", self.text))
    }

    /// Whether the histogram `metric` has a series with these labels.
    fn has_histogram(&self, metric: &str, labels: &[(&str, &str)]) -> bool {
        self.metric(metric).is_some_and(|m| m.kind == Type::Histogram)
            && self.sample(metric, ValueType::Count, labels).is_some()
    }

    /// A histogram's observation count (`_count`, checked against its `+Inf` bucket);
    /// 0 when the series does not exist yet.
    fn observations(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        if !self.has_histogram(metric, labels) {
            return 0.0;
        }
        let count = self.sample(metric, ValueType::Count, labels).unwrap();
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        let inf = self.sample(metric, ValueType::Sample, &with_le);
        assert_eq!(inf, Some(count), "{metric}{labels:?}: _count and the +Inf bucket differ\n{}", self.text);
        count
    }

    fn has_help(&self, metric: &str) -> bool {
        self.metric(metric).is_some_and(|m| m.help_desc.is_some())
    }

    /// Every value of label `name` across all samples.
    fn label_values(&self, name: &str) -> Vec<String> {
        let samples = self.parsed.metrics.iter().flat_map(|m| m.samples.iter());
        samples.flat_map(|s| s.labels.iter()).filter(|l| l.key == name).map(|l| l.value.clone()).collect()
    }
}

const VERIFY: &str = "keygate_server_verify_requests_total";
const VERIFY_TIME: &str = "keygate_server_verify_duration_seconds";
const HTTP: &str = "keygate_server_http_requests_total";
const HTTP_TIME: &str = "keygate_server_http_request_duration_seconds";
const STORE_TIME: &str = "keygate_server_store_operation_duration_seconds";
const STORE_ERRORS: &str = "keygate_server_store_errors_total";
const OUTCOMES: [&str; 6] = ["valid", "not_found", "revoked", "expired", "disabled", "error"];

async fn post_verify(t: &TestServer, body: serde_json::Value, token: &str) -> u16 {
    let res = t.http.post(t.url("/v1/keys/verify")).bearer_auth(token).json(&body).send().await.unwrap();
    res.status().as_u16()
}

#[tokio::test]
async fn the_documented_series_are_there_and_move_by_exactly_the_traffic() {
    let t = TestServer::start_on(TestDb::sqlite(), with_metrics).await;
    let before = Scrape::of(&t).await;

    // Present before any traffic, at 0.
    for outcome in OUTCOMES {
        assert_eq!(before.counter(VERIFY, &[("outcome", outcome)]), 0.0);
    }
    assert_eq!(before.observations(VERIFY_TIME, &[]), 0.0);
    assert!(before.has_histogram(VERIFY_TIME, &[]), "the verify histogram is registered at start");
    for (series, labels) in [
        ("keygate_server_usage_batches_total", &[("result", "applied")][..]),
        ("keygate_server_usage_batches_total", &[("result", "duplicate")]),
        ("keygate_server_usage_rows_received_total", &[]),
        ("keygate_server_usage_rows_refused_total", &[]),
        ("keygate_server_usage_requests_total", &[("result", "stored")]),
        ("keygate_server_usage_requests_total", &[("result", "refused")]),
        ("keygate_server_events_published_total", &[]),
        ("keygate_server_alerts_raised_total", &[]),
    ] {
        assert_eq!(before.counter(series, labels), 0.0, "{series}");
    }
    assert_eq!(before.gauge("keygate_server_event_subscribers", &[]), 0.0);
    assert_eq!(before.gauge("keygate_server_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert!(before.has_help(VERIFY), "HELP text");
    // SQLite has no feed of other replicas' changes: no such series.
    assert!(!before.text.contains("keygate_server_change_feed_connected "), "{}", before.text);

    // ---- traffic
    let valid = t.admin.create_key(new_key("acme", &["a:read"])).await.unwrap();
    let revoked = t.admin.create_key(new_key("acme", &["a:read"])).await.unwrap();
    let disabled = t.admin.create_key(new_key("acme", &["a:read"])).await.unwrap();
    let rotated = t.admin.create_key(new_key("acme", &["a:read"])).await.unwrap();
    t.admin.revoke(&revoked.key_id).await.unwrap();
    t.admin.update_key(&disabled.key_id, &KeyPatch { disabled: Some(true), ..Default::default() }).await.unwrap();
    // Grace 0: the old secret ends now, and verifies as expired.
    t.admin.rotate(&rotated.key_id, 0).await.unwrap();
    let secrets = [&valid, &revoked, &disabled, &rotated].map(|c| c.key.expose_secret().to_owned());

    for _ in 0..3 {
        assert_eq!(t.code(&secrets[0]).await, "VALID");
    }
    let unknown = ["kg_0000000000000000000000000000000000000000", "kg_1111111111111111111111111111111111111111"];
    for k in unknown {
        assert_eq!(t.code(k).await, "NOT_FOUND");
    }
    assert_eq!(t.code(&secrets[1]).await, "REVOKED");
    assert_eq!(t.code(&secrets[2]).await, "DISABLED");
    assert_eq!(t.code(&secrets[3]).await, "EXPIRED");
    assert_eq!(post_verify(&t, json!({ "nope": 1 }), SERVICE).await, 400);
    // Refused at the token: not a verify call, but an HTTP request.
    assert_eq!(post_verify(&t, json!({ "key": secrets[0] }), "wrong-token").await, 401);

    // Admin reads: two found, one not (an id in the path), one unmatched raw path.
    let key_path = format!("/v1/keys/{}", valid.key_id);
    for _ in 0..2 {
        let res = t.http.get(t.url(&key_path)).bearer_auth(ADMIN).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let missing = t.http.get(t.url("/v1/keys/key_doesnotexist0000000000")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let raw = t.http.get(t.url("/no/such/raw-path-42")).send().await.unwrap();
    assert_eq!(raw.status(), 404);

    // Usage: two rows now and one far outside the accepted window (refused), then the
    // same batch again (a duplicate).
    let now = this_minute();
    let req = |minute: i64, route: &'static str| Req {
        minute,
        key_id: Some(valid.key_id.clone()),
        route,
        method: "GET",
        outcome: keygate::Outcome::Allowed,
        status: 200,
        latency_us: 900,
    };
    let reqs = [req(now, "/a"), req(now, "/a"), req(now, "/b"), req(now - 3 * 86_400, "/a")];
    let batch = aggregate_batch(aggregate(&reqs));
    assert_eq!(batch.rows.len(), 3);
    let (status, answer) = t.post_usage(&batch).await;
    assert_eq!((status, answer["accepted"].as_u64(), answer["refused"].as_u64()), (202, Some(3), Some(1)));
    let (status, answer) = t.post_usage(&batch).await;
    assert_eq!((status, answer["duplicate"].as_bool()), (202, Some(true)));

    // An event stream: the gauge counts it while open.
    let events = Events::connect(&t).await;
    let during = Scrape::of(&t).await;
    assert_eq!(during.gauge("keygate_server_event_subscribers", &[]), 1.0);
    drop(events);

    let after = Scrape::of(&t).await;
    let ok = eventually(LIMIT, || async { Scrape::of(&t).await.gauge("keygate_server_event_subscribers", &[]) == 0.0 })
        .await;
    assert!(ok, "the gauge falls back when the stream closes");

    // ---- exact deltas
    let delta = |series: &str, labels: &[(&str, &str)]| {
        after.counter_or_zero(series, labels) - before.counter_or_zero(series, labels)
    };
    for (outcome, n) in [("valid", 3.0), ("not_found", 2.0), ("revoked", 1.0), ("disabled", 1.0), ("expired", 1.0)] {
        assert_eq!(delta(VERIFY, &[("outcome", outcome)]), n, "verify {outcome}");
    }
    assert_eq!(delta(VERIFY, &[("outcome", "error")]), 1.0, "the malformed verify");
    assert_eq!(after.observations(VERIFY_TIME, &[]), 9.0, "one latency per verify call past the token");

    let http = |route: &str, method: &str, status: &str| {
        delta(HTTP, &[("route", route), ("method", method), ("status", status)])
    };
    assert_eq!(http("/v1/keys/verify", "POST", "2xx"), 8.0);
    assert_eq!(http("/v1/keys/verify", "POST", "4xx"), 2.0, "the malformed body and the wrong token");
    assert_eq!(http("/v1/keys", "POST", "2xx"), 4.0);
    assert_eq!(http("/v1/keys/{id}/revoke", "POST", "2xx"), 1.0);
    assert_eq!(http("/v1/keys/{id}/rotate", "POST", "2xx"), 1.0);
    assert_eq!(http("/v1/keys/{id}", "PATCH", "2xx"), 1.0);
    assert_eq!(http("/v1/keys/{id}", "GET", "2xx"), 2.0);
    assert_eq!(http("/v1/keys/{id}", "GET", "4xx"), 1.0);
    assert_eq!(http("/v1/usage", "POST", "2xx"), 2.0);
    assert_eq!(http("/v1/events", "GET", "2xx"), 1.0);
    assert_eq!(http("unmatched", "GET", "4xx"), 1.0);
    let timed = after.observations(HTTP_TIME, &[("route", "/v1/keys/{id}"), ("method", "GET")]);
    assert_eq!(timed, 3.0, "one latency per request, whatever its status");

    assert_eq!(delta("keygate_server_usage_batches_total", &[("result", "applied")]), 1.0);
    assert_eq!(delta("keygate_server_usage_batches_total", &[("result", "duplicate")]), 1.0);
    assert_eq!(delta("keygate_server_usage_rows_received_total", &[]), 3.0);
    assert_eq!(delta("keygate_server_usage_rows_refused_total", &[]), 1.0);
    assert_eq!(delta("keygate_server_usage_requests_total", &[("result", "stored")]), 3.0);
    assert_eq!(delta("keygate_server_usage_requests_total", &[("result", "refused")]), 1.0);
    // revoked, updated, rotated: one event each (and one per alert the usage raised).
    let alerts = delta("keygate_server_alerts_raised_total", &[]);
    assert_eq!(delta("keygate_server_events_published_total", &[]), 3.0 + alerts);

    // The store, by operation: every verify that looked a key up, every key created.
    assert_eq!(after.observations(STORE_TIME, &[("op", "find_by_digest")]), 8.0);
    assert_eq!(after.observations(STORE_TIME, &[("op", "create_key")]), 4.0);
    assert_eq!(after.observations(STORE_TIME, &[("op", "change_key")]), 3.0);
    assert_eq!(after.observations(STORE_TIME, &[("op", "record_usage")]), 2.0);
    assert!(!after.text.contains(STORE_ERRORS), "no store failed: {}", after.text);
    for series in [STORE_TIME, HTTP, HTTP_TIME, VERIFY_TIME] {
        assert!(after.has_help(series), "HELP text of {series}");
    }

    // ---- no key material, no raw path
    for secret in &secrets {
        assert!(!after.text.contains(secret.as_str()), "a key in the metrics");
    }
    for id in [&valid.key_id, &revoked.key_id, &disabled.key_id, &rotated.key_id] {
        assert!(!after.text.contains(id.as_str()), "a key id in the metrics");
    }
    for raw in ["key_doesnotexist", "raw-path-42", "/no/such", "wrong-token", SERVICE, ADMIN, unknown[0]] {
        assert!(!after.text.contains(raw), "`{raw}` in the metrics");
    }
    let templates = [
        "/healthz",
        "/v1/keys/verify",
        "/v1/keys",
        "/v1/keys/{id}",
        "/v1/keys/{id}/rotate",
        "/v1/keys/{id}/revoke",
        "/v1/usage",
        "/v1/events",
        "unmatched",
    ];
    for route in after.label_values("route") {
        assert!(templates.contains(&route.as_str()), "route label `{route}` is not a template");
    }
    for status in after.label_values("status") {
        assert!(["1xx", "2xx", "3xx", "4xx", "5xx"].contains(&status.as_str()), "{status}");
    }
}

#[tokio::test]
async fn a_failing_store_counts_as_a_store_error_and_a_verify_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&format!("sqlite://{}", dir.path().join("k.db").display())).await.unwrap();
    let t = TestServer::start_in(dir, |b| with_metrics(b.store(store.clone()))).await;
    let created = t.admin.create_key(new_key("acme", &["a:read"])).await.unwrap();
    let before = Scrape::of(&t).await;
    store.close().await;

    let res = t
        .http
        .post(t.url("/v1/keys/verify"))
        .bearer_auth(SERVICE)
        .json(&json!({ "key": created.key.expose_secret() }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);

    let after = Scrape::of(&t).await;
    let delta = |series: &str, labels: &[(&str, &str)]| {
        after.counter_or_zero(series, labels) - before.counter_or_zero(series, labels)
    };
    assert_eq!(delta(VERIFY, &[("outcome", "error")]), 1.0);
    assert_eq!(delta(VERIFY, &[("outcome", "valid")]), 0.0);
    assert_eq!(after.counter(STORE_ERRORS, &[("op", "find_by_digest"), ("kind", "unavailable")]), 1.0);
    let http = &[("route", "/v1/keys/verify"), ("method", "POST"), ("status", "5xx")];
    assert_eq!(delta(HTTP, http), 1.0);
}

#[tokio::test]
async fn two_servers_in_one_process_count_apart_and_metrics_are_off_by_default() {
    let a = TestServer::start_on(TestDb::sqlite(), with_metrics).await;
    let b = TestServer::start_on(TestDb::sqlite(), with_metrics).await;
    let off = TestServer::start().await;
    assert_ne!(a.server.metrics_addr(), b.server.metrics_addr());
    for _ in 0..2 {
        assert_eq!(a.code("kg_2222222222222222222222222222222222222222").await, "NOT_FOUND");
    }
    assert_eq!(off.code("kg_2222222222222222222222222222222222222222").await, "NOT_FOUND");
    let (sa, sb) = (Scrape::of(&a).await, Scrape::of(&b).await);
    assert_eq!(sa.counter(VERIFY, &[("outcome", "not_found")]), 2.0);
    assert_eq!(sb.counter(VERIFY, &[("outcome", "not_found")]), 0.0);

    assert_eq!(off.server.metrics_addr(), None);
    assert_eq!(off.server.state().render_metrics(), None);
    // The API listener never serves metrics.
    for t in [&a, &off] {
        let res = t.http.get(t.url("/metrics")).send().await.unwrap();
        assert_eq!(res.status(), 404);
    }
    // The metrics listener serves nothing else.
    let addr = a.server.metrics_addr().unwrap();
    let res = a.http.get(format!("http://{addr}/v1/keys")).send().await.unwrap();
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn postgres_replicas_measure_the_fan_out_lag_of_each_others_changes() {
    let Some(db) = TestDb::postgres().await else { return };
    let a = TestServer::start_on(db.clone(), |b| b).await;
    let b = TestServer::start_on(db.clone(), with_metrics).await;
    let before = Scrape::of(&b).await;
    assert_eq!(before.gauge("keygate_server_change_feed_connected", &[]), 1.0);

    let mut events = Events::connect(&b).await;
    let created = a.admin.create_key(new_key("acme", &["a:read"])).await.unwrap();
    a.admin.revoke(&created.key_id).await.unwrap();
    let mut heard = Vec::new();
    while !heard.iter().any(|(name, _)| name == "revoked") && heard.len() < 5 {
        heard.push(events.next_change(LIMIT).await.expect("the revocation reaches the other replica"));
    }
    assert!(heard.iter().any(|(name, _)| name == "revoked"), "{heard:?}");

    let ok = eventually(LIMIT, || async {
        Scrape::of(&b).await.counter("keygate_server_events_forwarded_total", &[]) >= 1.0
    })
    .await;
    assert!(ok, "the other replica's change is counted as forwarded");
    let after = Scrape::of(&b).await;
    let forwarded = after.counter("keygate_server_events_forwarded_total", &[])
        - before.counter("keygate_server_events_forwarded_total", &[]);
    // Every forwarded note carries its send time: one lag each.
    assert_eq!(after.observations("keygate_server_fanout_lag_seconds", &[]), forwarded);
    assert!(forwarded >= 1.0);
    // Both replicas' find_by_digest etc. are their own: only b's store ops appear here.
    assert_eq!(after.observations(STORE_TIME, &[("op", "create_key")]), 0.0);
}

#[tokio::test]
async fn webhook_subscriber_cap_retention_and_new_store_op_series_move() {
    // The receiver answers 500 to each event's first attempt: one failed attempt, then
    // one delivery.
    let receiver = webhook_support::Receiver::start(1).await;
    let fast = WebhookConfig {
        poll_interval: Duration::from_millis(20),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..WebhookConfig::default()
    };
    let retention = RetentionConfig { enabled: false, minutes: Duration::from_secs(60), ..RetentionConfig::default() };
    let t = TestServer::start_on(TestDb::sqlite(), |b| {
        with_metrics(b).max_event_subscribers(1).allow_internal_webhooks(true).webhooks(fast).retention(retention)
    })
    .await;
    let before = Scrape::of(&t).await;
    for (series, labels) in [
        ("keygate_server_event_subscribers_refused_total", &[][..]),
        ("keygate_server_webhook_deliveries_total", &[("result", "delivered")]),
        ("keygate_server_webhook_deliveries_total", &[("result", "failed")]),
        ("keygate_server_webhook_attempts_failed_total", &[]),
        ("keygate_server_keys_expired_by_policy_total", &[]),
        ("keygate_server_retention_rows_total", &[("action", "minutes_rolled_up")]),
        ("keygate_server_retention_rows_total", &[("action", "hours_deleted")]),
        ("keygate_server_retention_rows_total", &[("action", "batch_ids_deleted")]),
    ] {
        assert_eq!(before.counter(series, labels), 0.0, "{series}{labels:?}");
        assert!(before.has_help(series), "HELP text of {series}");
    }
    let help = before.metric("keygate_server_alerts_raised_total").and_then(|m| m.help_desc.clone()).unwrap();
    assert!(help.contains("key_expiring") && help.contains("key_max_age"), "{help}");

    // A webhook delivered on its second attempt.
    let hook = t.admin.create_webhook(&receiver.url(), ["key.created"], None).await.unwrap();
    receiver.set_secret(&hook.secret);
    let key = t.admin.create_key(new_key("acme", &["a:read"])).await.unwrap();
    let delivered = eventually(LIMIT, || async {
        Scrape::of(&t).await.counter("keygate_server_webhook_deliveries_total", &[("result", "delivered")]) == 1.0
    })
    .await;
    assert!(delivered, "the delivery is counted");

    // One stream open, the second refused at the cap.
    let events = Events::connect(&t).await;
    let refused = t.http.get(t.url("/v1/events")).bearer_auth(SERVICE).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    drop(events);

    // Usage ten minutes old, rolled up by a pass (minute rows are kept 60 s here).
    let req = Req {
        minute: this_minute() - 600,
        key_id: Some(key.key_id.clone()),
        route: "/a",
        method: "GET",
        outcome: keygate::Outcome::Allowed,
        status: 200,
        latency_us: 900,
    };
    assert_eq!(t.post_usage(&aggregate_batch(aggregate(&[req]))).await.0, 202);
    let report = t.server.state().run_retention().await.unwrap();
    assert!(report.minutes_rolled_up >= 1, "{report:?}");

    // Store methods metered since: tokens, webhooks, roles, alerts.
    t.admin.create_token(TokenKind::Service, "fleet").await.unwrap();
    t.admin.list_tokens().await.unwrap();
    t.admin.list_webhooks().await.unwrap();
    t.admin.put_role("ops", ["deploy:run"]).await.unwrap();
    t.admin.delete_role("ops", false).await.unwrap();
    t.admin.list_alerts(Some(false)).await.unwrap();

    let after = Scrape::of(&t).await;
    assert_eq!(after.counter("keygate_server_webhook_deliveries_total", &[("result", "delivered")]), 1.0);
    assert_eq!(after.counter("keygate_server_webhook_deliveries_total", &[("result", "failed")]), 0.0);
    assert_eq!(after.counter("keygate_server_webhook_attempts_failed_total", &[]), 1.0);
    assert_eq!(after.counter("keygate_server_event_subscribers_refused_total", &[]), 1.0);
    let rolled = after.counter("keygate_server_retention_rows_total", &[("action", "minutes_rolled_up")]);
    assert_eq!(rolled, report.minutes_rolled_up as f64);
    for op in [
        "create_webhook",
        "claim_deliveries",
        "finish_delivery",
        "webhook_targets",
        "create_token",
        "list_tokens",
        "active_tokens",
        "webhooks",
        "delete_role",
        "alerts_by_state",
    ] {
        assert!(after.observations(STORE_TIME, &[("op", op)]) >= 1.0, "store op `{op}` timed\n{}", after.text);
    }
}

/// The `keygate_server_*` names in `text`'s lines that `pick` keeps (every name on the
/// line, so that a table row naming several series counts each).
fn series_names(text: &str, pick: impl Fn(&str) -> bool) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| pick(l)) {
        let mut rest = line;
        while let Some(at) = rest.find("keygate_server_") {
            let tail = &rest[at..];
            let end =
                tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

#[test]
fn every_emitted_series_is_in_the_readme_table_and_the_module_docs() {
    let read = |path: &str| std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    // What is emitted: the series names `meters.rs` declares (every series goes through
    // one of them; `HELP` refers to each).
    let emitted = series_names(&read("src/server/meters.rs"), |l| l.trim_start().starts_with("pub(crate) const "));
    assert!(emitted.len() >= 29, "the parser found too few names: {emitted:?}");
    // The first column of the README's metrics table, and of the module docs' table.
    let first_cell = |l: &str| l.split('|').nth(1).map(str::to_owned).unwrap_or_default();
    let readme = read("README.md");
    let readme_rows: String =
        readme.lines().filter(|l| l.starts_with("| `keygate_server_")).map(|l| first_cell(l) + "\n").collect();
    let module = read("src/server/mod.rs");
    let module_rows: String =
        module.lines().filter(|l| l.starts_with("//! | `keygate_server_")).map(|l| first_cell(l) + "\n").collect();
    for (table, rows) in [("README.md", readme_rows), ("the keygate::server docs", module_rows)] {
        let documented = series_names(&rows, |_| true);
        let missing: Vec<_> = emitted.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&emitted).collect();
        assert!(missing.is_empty(), "emitted but not in {table}'s metrics table: {missing:?}");
        assert!(stale.is_empty(), "in {table}'s metrics table but never emitted: {stale:?}");
    }
}
