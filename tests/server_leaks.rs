//! GitHub secret scanning (issue 17): `POST /v1/leaks/github` against reports signed
//! the way GitHub signs them (ECDSA P-256 over the raw body), with the public keys
//! document served on loopback.

mod server_support;

use std::time::Duration;

use keygate::server::{LEAK_ACTOR, LeakAction, SecretScanning};
use keygate::{ApiKey, CachedVerifier, HttpVerifier, Reason, RevocationListener, Verdict, Verifier};
use serde_json::{Value, json};
use server_support::github::{KeysDocument, sign, signing_key};
use server_support::*;

const SERVICE: &str = "svc-test-token-0123456789abcdefghij";

fn report(tokens: &[&str]) -> Vec<u8> {
    let items: Vec<Value> = tokens
        .iter()
        .map(|t| {
            json!({ "token": t, "type": "keygate_api_key",
                    "url": "https://github.com/octo/hello/blob/abc123/config.py", "source": "content" })
        })
        .collect();
    serde_json::to_vec(&items).unwrap()
}

async fn post(t: &TestServer, id: Option<&str>, signature: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut req = t.http.post(t.url("/v1/leaks/github")).header("content-type", "application/json").body(body);
    if let Some(id) = id {
        req = req.header("Github-Public-Key-Identifier", id);
    }
    if let Some(signature) = signature {
        req = req.header("Github-Public-Key-Signature", signature);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

async fn server(doc_url: &str, action: LeakAction) -> TestServer {
    let scanning =
        SecretScanning::github().keys_url(doc_url).action(action).refetch_interval(Duration::from_millis(300));
    TestServer::start_on(TestDb::sqlite(), move |b| b.secret_scanning(scanning)).await
}

#[tokio::test]
async fn a_signed_report_revokes_the_key_and_every_middleware_refuses_it_within_a_second() {
    let doc = KeysDocument::default();
    let github = doc.add("k1");
    let t = server(&doc.serve().await, LeakAction::Revoke).await;
    let leaked = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let other = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();

    // A middleware with a long TTL: only the event stream can tell it.
    let remote = HttpVerifier::builder(t.server.url()).service_token(SERVICE).build().unwrap();
    let cache = CachedVerifier::builder(remote).positive_ttl(Duration::from_secs(600)).build();
    let listener = RevocationListener::builder(t.server.url()).service_token(SERVICE).spawn(&cache).unwrap();
    assert!(eventually(Duration::from_secs(10), || async { listener.is_connected() }).await);
    assert!(matches!(cache.verify(&leaked.key).await, Ok(Verdict::Valid(_))));

    let unknown = ApiKey::generate("kg").unwrap();
    let body = report(&[leaked.key.expose_secret(), unknown.expose_secret()]);
    let (status, labels) = post(&t, Some("k1"), Some(&sign(&github, &body)), body.clone()).await;
    assert_eq!(status, 200, "{labels}");
    assert_eq!(labels[0]["label"], "true_positive");
    assert_eq!(labels[0]["token_raw"], leaked.key.expose_secret());
    assert_eq!(labels[0]["token_type"], "keygate_api_key");
    assert_eq!(labels[1]["label"], "false_positive");

    let refused = eventually(Duration::from_secs(1), || async {
        matches!(cache.verify_now(&leaked.key), None | Some(Ok(Verdict::Invalid { .. })))
            && matches!(cache.verify(&leaked.key).await, Ok(Verdict::Invalid { reason: Reason::Revoked, .. }))
    })
    .await;
    assert!(refused, "the middleware refuses the leaked key within 1 s");
    assert!(matches!(cache.verify(&other.key).await, Ok(Verdict::Valid(_))), "other keys are untouched");

    let audit = t.admin.audit(None).await.unwrap();
    let records: Vec<_> = audit.iter().filter(|r| r.actor == LEAK_ACTOR).collect();
    assert_eq!(records.len(), 1, "{audit:?}");
    assert_eq!(records[0].action, "key.revoke");
    assert_eq!(records[0].key_id.as_deref(), Some(leaked.key_id.as_str()));
    assert_eq!(records[0].changes["report"]["url"], "https://github.com/octo/hello/blob/abc123/config.py");
    let alerts = t.admin.alerts().await.unwrap();
    let leaks: Vec<_> = alerts.iter().filter(|a| a.kind.as_str() == "leaked").collect();
    assert_eq!(leaks.len(), 1);
    assert!(leaks[0].detail.contains("config.py"), "{}", leaks[0].detail);

    // The same report again: the same answer, nothing new.
    let (status, again) = post(&t, Some("k1"), Some(&sign(&github, &body)), body).await;
    assert_eq!((status, &again), (200, &labels));
    assert_eq!(t.admin.audit(None).await.unwrap().len(), audit.len());
    assert_eq!(t.admin.alerts().await.unwrap().len(), alerts.len());
    drop(listener);
}

#[tokio::test]
async fn bad_signatures_change_nothing_and_unknown_identifiers_refetch_once() {
    let doc = KeysDocument::default();
    let github = doc.add("k1");
    let t = server(&doc.serve().await, LeakAction::Revoke).await;
    let key = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let body = report(&[key.key.expose_secret()]);
    let good = sign(&github, &body);

    let mut tampered = body.clone();
    let at = tampered.iter().position(|b| *b == b'o').unwrap();
    tampered[at] = b'0';
    let stranger = signing_key();
    for (id, signature, body) in [
        (None, Some(good.as_str()), body.clone()),
        (Some("k1"), None, body.clone()),
        (Some("k1"), Some(good.as_str()), tampered),
        (Some("k1"), Some(&*sign(&stranger, &body)), body.clone()),
        (Some("k1"), Some("not base64!"), body.clone()),
        (Some("k1"), Some("AAAA"), body.clone()),
    ] {
        let (status, answer) = post(&t, id, signature, body).await;
        assert_eq!(status, 401, "{answer}");
        assert_eq!(answer["error"], "unauthorized");
    }
    assert!(!t.server.state().store().get_key(&key.key_id).await.unwrap().unwrap().revoked, "nothing revoked");
    assert_eq!(doc.fetches(), 1, "fetched once, for the first report");

    // A key GitHub added since: the unknown identifier makes one refetch.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rotated = doc.add("k2");
    let (status, _) = post(&t, Some("k2"), Some(&sign(&rotated, &body)), body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(doc.fetches(), 2);
    assert!(t.server.state().store().get_key(&key.key_id).await.unwrap().unwrap().revoked);
    // An identifier that does not exist: one refetch, then none until the interval passed.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..5 {
        let (status, _) = post(&t, Some("k-forged"), Some(&good), body.clone()).await;
        assert_eq!(status, 401);
    }
    assert_eq!(doc.fetches(), 3, "forged identifiers do not hammer the document's host");
}

#[tokio::test]
async fn the_disable_action_disables_and_an_unconfigured_service_has_no_endpoint() {
    let doc = KeysDocument::default();
    let github = doc.add("k1");
    let t = server(&doc.serve().await, LeakAction::Disable).await;
    let key = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let body = report(&[key.key.expose_secret()]);
    let (status, labels) = post(&t, Some("k1"), Some(&sign(&github, &body)), body).await;
    assert_eq!((status, &labels[0]["label"]), (200, &json!("true_positive")));
    let info = t.server.state().store().get_key(&key.key_id).await.unwrap().unwrap();
    assert!(info.disabled && !info.revoked);
    assert_eq!(t.code(key.key.expose_secret()).await, "DISABLED");

    let plain = TestServer::start().await;
    let body = report(&["kg_x"]);
    let (status, answer) = post(&plain, Some("k1"), Some(&sign(&github, &body)), body).await;
    assert_eq!((status, &answer["error"]), (404, &json!("not_found")));
}

#[tokio::test]
async fn a_keys_document_that_cannot_be_fetched_is_503_and_too_large_reports_413() {
    let t = server("http://127.0.0.1:9/nothing-listens-here", LeakAction::Revoke).await;
    let github = signing_key();
    let body = report(&["kg_x"]);
    let (status, answer) = post(&t, Some("k1"), Some(&sign(&github, &body)), body).await;
    assert_eq!(status, 503, "{answer}");
    let huge = vec![b' '; keygate::server::REPORT_BODY_LIMIT + 1];
    let (status, _) = post(&t, Some("k1"), Some("AAAA"), huge).await;
    assert_eq!(status, 413);
}
