//! Logs, spans, usage events, aggregated usage batches and Debug output of a whole request
//! path never contain a key's secret.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use keygate::{AggregateBatch, AggregateExporter, ExportError, UsageAggregator};
use keygate::{
    ApiKey, ApiKeyLayer, DecidedRequest, Principal, RequireScopes, ScopeSet, StaticVerifier, UsageEvent, UsageSink,
};
use time::OffsetDateTime;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
struct Collect(Mutex<Vec<UsageEvent>>);

impl UsageSink for Collect {
    fn record(&self, request: &DecidedRequest<'_>) {
        self.0.lock().unwrap().push(request.to_event());
    }
}

/// Keeps every aggregate batch, as JSON.
#[derive(Default)]
struct Batches(Mutex<Vec<String>>);

impl AggregateExporter for Batches {
    async fn export(&self, batch: &AggregateBatch) -> Result<(), ExportError> {
        self.0.lock().unwrap().push(serde_json::to_string(batch).unwrap());
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn no_key_material_in_logs_spans_events_or_debug() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let good = ApiKey::generate("kg").unwrap();
    let expired = ApiKey::generate("kg").unwrap();
    let revoked = ApiKey::generate("kg").unwrap();
    let unknown = ApiKey::generate("kg").unwrap();
    let verifier = StaticVerifier::new()
        .with_key(&good, Principal::builder("key_good").scopes(ScopeSet::parse(["a:read"]).unwrap()).build())
        .with_key(&revoked, Principal::builder("key_revoked").build())
        .with_key(
            &expired,
            Principal::builder("key_expired")
                .expires_at(Some(OffsetDateTime::now_utc() - Duration::from_secs(5)))
                .build(),
        );
    verifier.revoke("key_revoked");
    let sink = Arc::new(Collect::default());
    let batches = Arc::new(Batches::default());
    let (aggregator, handle) = UsageAggregator::builder().build(batches.clone()).unwrap();
    let app = Router::new()
        .route(
            "/a",
            get(|p: Principal| async move {
                tracing::info!(?p, "handler ran");
                "ok"
            })
            .route_layer(RequireScopes::all(["a:read"])),
        )
        .route("/b", get(|| async { "b" }).route_layer(RequireScopes::all(["b:write"])))
        .layer(
            ApiKeyLayer::new(verifier)
                .usage((sink.clone(), aggregator.clone()))
                .client_ip_from_header("x-forwarded-for"),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let client = reqwest::Client::new();
    let mut bad_checksum = good.expose_secret().to_owned();
    bad_checksum.replace_range(5..6, if &bad_checksum[5..6] == "x" { "y" } else { "x" });
    let requests: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("/a", vec![("authorization", format!("Bearer {}", good.expose_secret()))]),
        ("/b", vec![("authorization", format!("Bearer {}", good.expose_secret()))]),
        ("/a", vec![("x-api-key", expired.expose_secret().to_owned())]),
        ("/a", vec![("x-api-key", revoked.expose_secret().to_owned())]),
        ("/a", vec![("x-api-key", unknown.expose_secret().to_owned())]),
        ("/a", vec![("x-api-key", bad_checksum.clone())]),
        (
            "/a",
            vec![
                ("x-api-key", good.expose_secret().to_owned()),
                ("authorization", format!("Bearer {}", good.expose_secret())),
            ],
        ),
    ];
    for (path, headers) in &requests {
        let mut req = client.get(format!("{base}{path}")).header("x-forwarded-for", "203.0.113.9");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req.send().await.unwrap();
    }

    let stats = handle.shutdown().await;
    assert_eq!(stats.exported, requests.len() as u64);
    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let events = format!("{:?}{:?}", sink.0.lock().unwrap(), aggregator);
    let rows = batches.0.lock().unwrap().join("\n");
    assert!(rows.contains("key_good") && rows.contains("203.0.113.0/24"), "{rows}");
    // The capture worked: the key id is attached to the handler's event through the span.
    assert!(logs.contains(r#"keygate{key_id="key_good"}"#), "{logs}");
    assert!(logs.contains("handler ran"), "{logs}");
    assert!(logs.contains("reason="), "{logs}");
    assert_eq!(sink.0.lock().unwrap().len(), requests.len());
    for key in [&good, &expired, &revoked, &unknown] {
        let body = &key.expose_secret()[3..];
        // Any 12 consecutive characters of the random body would be a leak.
        for window in body.as_bytes().windows(12) {
            let w = std::str::from_utf8(window).unwrap();
            assert!(!logs.contains(w), "logs contain key material {w}");
            assert!(!events.contains(w), "usage events contain key material {w}");
            assert!(!rows.contains(w), "usage batches contain key material {w}");
        }
    }
    assert!(!logs.contains(&bad_checksum[3..]));
}
