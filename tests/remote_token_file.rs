//! Middlewares reading their service token from a file: a rotation (new token created,
//! file rewritten, old token revoked) against the real key service costs no failed
//! request; the file is read again on a poll and after a 401; bad files are refused at
//! build and ignored later.

mod server_support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keygate::client::TokenKind;
use keygate::{
    AggregateExporter, CachedVerifier, HttpUsageExporter, HttpVerifier, Outcome, RemoteConfigError, RevocationListener,
    Verdict, Verifier,
};
use server_support::{Req, TestServer, aggregate, aggregate_batch, eventually, new_key, this_minute};

const WAIT: Duration = Duration::from_secs(10);

/// Replaces the file's contents at once, the way Kubernetes swaps a secret.
fn rewrite(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_middleware_whose_token_file_is_replaced_keeps_working_across_the_switch() {
    let t = TestServer::start().await;
    let url = t.server.url();
    let old = t.admin.create_token(TokenKind::Service, "fleet-1").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("service-token");
    std::fs::write(&file, format!("{}\n", old.token)).unwrap();
    let k = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();

    // A poll interval longer than the test: the switch is found through the 401.
    let poll = Duration::from_secs(600);
    let http =
        HttpVerifier::builder(url.as_str()).service_token_file(&file).service_token_file_poll(poll).build().unwrap();
    let debug = format!("{http:?}");
    assert!(!debug.contains(&old.token), "{debug}");
    let cache = CachedVerifier::new(
        HttpVerifier::builder(url.as_str()).service_token_file(&file).service_token_file_poll(poll).build().unwrap(),
    );
    let listener = RevocationListener::builder(url.as_str())
        .service_token_file(&file)
        .service_token_file_poll(poll)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .spawn(&cache)
        .unwrap();
    let exporter = HttpUsageExporter::builder(url.as_str())
        .service_token_file(&file)
        .service_token_file_poll(poll)
        .build()
        .unwrap();
    assert!(eventually(WAIT, || async { listener.is_connected() }).await);
    assert!(matches!(cache.verify(&k.key).await.unwrap(), Verdict::Valid(_)));

    // Workers verify back to back (uncached) through the whole switch.
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (http, key, stop, calls) = (http.clone(), k.key.clone(), stop.clone(), calls.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match http.verify(&key).await {
                        Ok(Verdict::Valid(_)) => {}
                        other => failures.push(format!("{other:?}")),
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                }
                failures
            })
        })
        .collect();
    assert!(eventually(WAIT, || async { calls.load(Ordering::Relaxed) >= 20 }).await);

    // The rotation: the new token is valid before the old one is revoked.
    let new = t.admin.create_token(TokenKind::Service, "fleet-2").await.unwrap();
    rewrite(&file, &format!("{}\n", new.token));
    t.admin.revoke_token(&old.info.id).await.unwrap();
    let at_revoke = calls.load(Ordering::Relaxed);
    assert!(eventually(WAIT, || async { calls.load(Ordering::Relaxed) >= at_revoke + 50 }).await);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let failures = w.await.unwrap();
        assert!(failures.is_empty(), "failed requests across the switch: {failures:?}");
    }

    // The listener's stream on the old token was closed; it came back on the new one
    // and still invalidates.
    assert!(
        eventually(WAIT, || async { listener.is_connected() && listener.stats().connects >= 2 }).await,
        "{:?}",
        listener.stats()
    );
    t.admin.revoke(&k.key_id).await.unwrap();
    assert!(
        eventually(WAIT, || async { matches!(cache.verify(&k.key).await, Ok(Verdict::Invalid { .. })) }).await,
        "the listener follows events with the new token"
    );
    // The exporter, which never used the new token yet, delivers on the first call.
    let k2 = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let req = Req {
        minute: this_minute(),
        key_id: Some(k2.key_id.clone()),
        route: "/r",
        method: "GET",
        outcome: Outcome::Allowed,
        status: 200,
        latency_us: 1000,
    };
    exporter.export(&aggregate_batch(aggregate(&[req]))).await.expect("usage delivered with the new token");
    // The server saw only the new token from then on.
    let tokens = t.admin.list_tokens().await.unwrap();
    let fleet2 = tokens.iter().find(|t| t.name == "fleet-2").unwrap();
    assert!(fleet2.last_used_at.is_some());
}

#[tokio::test]
async fn the_file_is_read_again_on_its_poll_interval() {
    let t = TestServer::start().await;
    let url = t.server.url();
    let a = t.admin.create_token(TokenKind::Service, "a").await.unwrap();
    let b = t.admin.create_token(TokenKind::Service, "b").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, &a.token).unwrap();
    let http = HttpVerifier::builder(url.as_str())
        .service_token_file(&file)
        .service_token_file_poll(Duration::from_millis(50))
        .build()
        .unwrap();
    let unknown = keygate::ApiKey::new("kg_unknown");
    assert!(matches!(http.verify(&unknown).await.unwrap(), Verdict::Invalid { .. }));
    rewrite(&file, &format!("{}\r\n", b.token));
    tokio::time::sleep(Duration::from_millis(120)).await;
    // The first call after the interval reads the file; the next one carries `b`.
    http.verify(&unknown).await.unwrap();
    http.verify(&unknown).await.unwrap();
    let tokens = t.admin.list_tokens().await.unwrap();
    let used = |name: &str| tokens.iter().find(|t| t.name == name).unwrap().last_used_at;
    assert!(used("b").is_some(), "the new token was picked up without any refusal: {tokens:?}");

    // A file that turns empty or unreadable keeps the token read before.
    rewrite(&file, "\n");
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(matches!(http.verify(&unknown).await.unwrap(), Verdict::Invalid { .. }));
    std::fs::remove_file(&file).unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(matches!(http.verify(&unknown).await.unwrap(), Verdict::Invalid { .. }));
    // A refused token with nothing new in the file is an error, not a loop.
    t.admin.revoke_token(&b.info.id).await.unwrap();
    assert!(matches!(http.verify(&unknown).await, Err(keygate::VerifyError::Status(401))));
}

#[tokio::test]
async fn unusable_token_files_are_refused_when_building() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    let build = |path: &Path| HttpVerifier::builder("http://127.0.0.1:9").service_token_file(path).build();
    let missing = build(&dir.path().join("nope")).unwrap_err();
    assert!(matches!(missing, RemoteConfigError::TokenFile { .. }), "{missing}");
    std::fs::write(&file, "\n").unwrap();
    assert!(build(&file).unwrap_err().to_string().contains("empty"));
    std::fs::write(&file, "x".repeat(keygate::MAX_TOKEN_FILE_BYTES + 1)).unwrap();
    assert!(build(&file).unwrap_err().to_string().contains("larger than"));
    std::fs::write(&file, "secret with spaces\n").unwrap();
    let bad = build(&file).unwrap_err();
    assert_eq!(bad, RemoteConfigError::InvalidServiceToken);
    assert!(!bad.to_string().contains("secret"));
    std::fs::write(&file, "secret-ok\n").unwrap();
    assert!(build(&file).is_ok());
    // The exporter and the listener read it the same way.
    let err = HttpUsageExporter::builder("http://127.0.0.1:9").service_token_file(dir.path().join("nope")).build();
    assert!(matches!(err, Err(keygate::HttpExporterBuildError::TokenFile(_))));
    let cache = CachedVerifier::new(build(&file).unwrap());
    let err =
        RevocationListener::builder("http://127.0.0.1:9").service_token_file(dir.path().join("nope")).spawn(&cache);
    assert!(matches!(err, Err(RemoteConfigError::TokenFile { .. })));
    // `service_token` after `service_token_file` wins, and the other way round.
    assert!(
        HttpVerifier::builder("http://127.0.0.1:9")
            .service_token_file(dir.path().join("nope"))
            .service_token("fixed")
            .build()
            .is_ok()
    );
}
