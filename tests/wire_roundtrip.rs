//! Every answer the real key service gives, read back with the client's `wire` types:
//! verify answers (valid, each refusal code, digest and raw-key requests), every event
//! kind on the stream, the usage answer and each error body that can be triggered.

use std::sync::Arc;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use keygate::client::{AdminClient, KeyPatch, NewKey};
use keygate::server::{KeyServer, RunningKeyServer};
use keygate::wire::{
    Alert, AlertKind, ErrorBody, EventName, Heartbeat, KeyChanged, KeyEvent, Refusal, ResetData, UsageAccepted,
    VerifyAnswer, VerifyRequest,
};
use keygate::{ApiKey, Outcome, Reason, UsageBatch, UsageEvent};
use reqwest::StatusCode;
use time::OffsetDateTime;
use tokio::sync::mpsc;

const SERVICE: &str = "svc-wire-test-0123456789abcdefghijkl";
const ADMIN: &str = "adm-wire-test-0123456789abcdefghijkl";
const LIMIT: Duration = Duration::from_secs(10);

struct Rig {
    server: RunningKeyServer,
    admin: AdminClient,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let server = KeyServer::builder()
        .database(format!("sqlite://{}", dir.path().join("keys.db").display()))
        .service_token(SERVICE)
        .admin_token(ADMIN)
        .heartbeat(Duration::from_millis(200))
        .listen("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .expect("key service starts");
    let admin = AdminClient::new(server.url(), ADMIN).unwrap();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    Rig { server, admin, http, _dir: dir }
}

fn new_key(roles: &[&str]) -> NewKey {
    NewKey {
        owner: "acme".into(),
        name: "wire".into(),
        scopes: vec!["reports:read".into()],
        roles: roles.iter().map(|r| r.to_string()).collect(),
        environment: Some("test".into()),
        meta: Some(serde_json::json!({ "team": "blue" })),
        ratelimit: Some(keygate::RateLimit { limit: 10, period_s: 60 }),
        ..Default::default()
    }
}

impl Rig {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    /// `POST /v1/keys/verify` with `request`, read as the middleware reads it.
    async fn verify(&self, request: &VerifyRequest) -> VerifyAnswer {
        let res = self.http.post(self.url("/v1/keys/verify")).bearer_auth(SERVICE).json(request).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        serde_json::from_slice(&res.bytes().await.unwrap()).expect("a verify answer the client reads")
    }

    async fn refusal(&self, key: &ApiKey) -> Refusal {
        match self.verify(&VerifyRequest::Digest(key.digest())).await {
            VerifyAnswer::Invalid(refusal) => refusal,
            other => panic!("a refusal expected, got {other:?}"),
        }
    }

    async fn error(&self, request: reqwest::RequestBuilder, status: StatusCode) -> ErrorBody {
        let res = request.send().await.unwrap();
        assert_eq!(res.status(), status);
        serde_json::from_slice(&res.bytes().await.unwrap()).expect("an error body the client reads")
    }
}

#[tokio::test]
async fn verify_answers_parse_with_the_client_types() {
    let rig = rig().await;
    let created = rig.admin.create_key(new_key(&[])).await.unwrap();

    for request in [VerifyRequest::Digest(created.key.digest()), VerifyRequest::Key(created.key.clone())] {
        let VerifyAnswer::Valid(valid) = rig.verify(&request).await else { panic!("valid expected") };
        assert_eq!(valid.key_id, created.key_id);
        assert_eq!((valid.owner.as_str(), valid.name.as_str(), valid.environment.as_str()), ("acme", "wire", "test"));
        assert_eq!(valid.scopes, ["reports:read"]);
        assert!(valid.roles.is_empty());
        assert_eq!(valid.expires_at, None);
        assert_eq!(valid.meta, serde_json::json!({ "team": "blue" }));
        assert_eq!(valid.ratelimit, Some(keygate::RateLimit { limit: 10, period_s: 60 }));
    }

    let unknown = ApiKey::generate("kg").unwrap();
    assert_eq!(rig.refusal(&unknown).await, Refusal { code: Reason::NotFound, key_id: None });

    let disabled = rig.admin.create_key(new_key(&[])).await.unwrap();
    let patch = KeyPatch { disabled: Some(true), ..Default::default() };
    rig.admin.update_key(&disabled.key_id, &patch).await.unwrap();
    assert_eq!(rig.refusal(&disabled.key).await, Refusal { code: Reason::Disabled, key_id: Some(disabled.key_id) });

    // A rotation without grace: the old secret has expired.
    let rotated = rig.admin.create_key(new_key(&[])).await.unwrap();
    let fresh = rig.admin.rotate(&rotated.key_id, 0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        rig.refusal(&rotated.key).await,
        Refusal { code: Reason::Expired, key_id: Some(rotated.key_id.clone()) }
    );
    let VerifyAnswer::Valid(valid) = rig.verify(&VerifyRequest::Digest(fresh.key.digest())).await else {
        panic!("the new secret is valid")
    };
    assert_eq!(valid.key_id, rotated.key_id);

    rig.admin.revoke(&created.key_id).await.unwrap();
    assert_eq!(rig.refusal(&created.key).await, Refusal { code: Reason::Revoked, key_id: Some(created.key_id) });
}

#[tokio::test]
async fn error_bodies_parse_with_the_client_types() {
    let rig = rig().await;
    let verify = rig.url("/v1/keys/verify");

    let body = rig.error(rig.http.post(&verify).bearer_auth("wrong").body("{}"), StatusCode::UNAUTHORIZED).await;
    assert_eq!(body.error, "unauthorized");
    let body = rig
        .error(rig.http.post(&verify).bearer_auth(SERVICE).body("{\"digest\":\"zz\"}"), StatusCode::BAD_REQUEST)
        .await;
    assert_eq!(body.error, "invalid_request");
    assert!(body.message.contains("digest"), "{}", body.message);
    let body = rig
        .error(
            rig.http.post(&verify).bearer_auth(SERVICE).body("{\"key\": \"kg_secret_value\", \"x\": 1}"),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert!(!body.message.contains("kg_secret_value"), "{}", body.message);
    let body = rig
        .error(rig.http.post(&verify).bearer_auth(SERVICE).body(vec![b' '; 70 * 1024]), StatusCode::PAYLOAD_TOO_LARGE)
        .await;
    assert_eq!(body.error, "payload_too_large");
    let body = rig.error(rig.http.get(rig.url("/v1/nowhere")).bearer_auth(SERVICE), StatusCode::NOT_FOUND).await;
    assert_eq!(body.error, "not_found");
    let body = rig.error(rig.http.delete(&verify).bearer_auth(SERVICE), StatusCode::METHOD_NOT_ALLOWED).await;
    assert_eq!(body.error, "method_not_allowed");
    // 405 names what the route does accept (RFC 9110 15.5.6).
    for (method, path, allowed) in [
        (reqwest::Method::DELETE, "/v1/keys/verify", &["POST"][..]),
        (reqwest::Method::PUT, "/v1/keys", &["GET", "POST"]),
        (reqwest::Method::POST, "/v1/keys/key_x", &["GET", "PATCH"]),
    ] {
        let res = rig.http.request(method.clone(), rig.url(path)).bearer_auth(ADMIN).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        let allow = res.headers().get("allow").unwrap_or_else(|| panic!("{method} {path}: no Allow header"));
        let mut listed: Vec<&str> = allow.to_str().unwrap().split(',').map(str::trim).collect();
        listed.retain(|m| *m != "HEAD");
        listed.sort_unstable();
        assert_eq!(listed, allowed, "{method} {path}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["error"], "method_not_allowed");
    }
    let body =
        rig.error(rig.http.post(rig.url("/v1/keys")).bearer_auth(ADMIN).body("{"), StatusCode::BAD_REQUEST).await;
    assert_eq!(body.error, "invalid_json");

    let created = rig.admin.create_key(new_key(&[])).await.unwrap();
    rig.admin.revoke(&created.key_id).await.unwrap();
    let patch = rig.http.patch(rig.url(&format!("/v1/keys/{}", created.key_id))).bearer_auth(ADMIN);
    let body = rig.error(patch.body(r#"{"name":"again"}"#), StatusCode::CONFLICT).await;
    assert_eq!(body.error, "conflict");
}

fn usage_event(key_id: &str, ip: &str) -> UsageEvent {
    UsageEvent {
        at: OffsetDateTime::now_utc(),
        key_id: Some(Arc::from(key_id)),
        owner: Some(Arc::from("acme")),
        outcome: Outcome::Allowed,
        method: "GET".into(),
        route: Arc::from("/reports"),
        status: 200,
        latency: Duration::from_millis(3),
        client_ip: Some(ip.parse().unwrap()),
        request_id: None,
    }
}

/// Reads `GET /v1/events` with the listener's parser into a channel of (name, data).
async fn subscribe(rig: &Rig) -> mpsc::Receiver<(String, String)> {
    let res = rig.http.get(rig.url("/v1/events")).bearer_auth(SERVICE).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut events = std::pin::pin!(res.bytes_stream().eventsource());
        while let Some(Ok(event)) = events.next().await {
            if tx.send((event.event, event.data)).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// The data of the next event called `name`, skipping others.
async fn next_named(rx: &mut mpsc::Receiver<(String, String)>, name: EventName) -> String {
    let wait = async {
        loop {
            let (event, data) = rx.recv().await.expect("the stream stays open");
            assert!(EventName::parse(&event).is_some(), "an event the client knows: {event}");
            if event == name.name() {
                return data;
            }
        }
    };
    tokio::time::timeout(LIMIT, wait).await.unwrap_or_else(|_| panic!("no `{}` event", name.name()))
}

#[tokio::test]
async fn every_event_kind_and_the_usage_answer_parse_with_the_client_types() {
    let rig = rig().await;
    let mut rx = subscribe(&rig).await;

    let heartbeat: Heartbeat = serde_json::from_str(&next_named(&mut rx, EventName::Heartbeat).await).unwrap();
    assert!(heartbeat.at <= OffsetDateTime::now_utc());

    let key = rig.admin.create_key(new_key(&[])).await.unwrap();
    let patch = KeyPatch { name: Some("renamed".into()), ..Default::default() };
    rig.admin.update_key(&key.key_id, &patch).await.unwrap();
    rig.admin.rotate(&key.key_id, 60).await.unwrap();
    for kind in [KeyEvent::Updated, KeyEvent::Rotated] {
        let data: KeyChanged = serde_json::from_str(&next_named(&mut rx, EventName::Key(kind)).await).unwrap();
        assert_eq!(data.key_id, key.key_id);
    }

    // Usage: the answer, and an alert once the key shows up from a second network.
    for ip in ["10.0.0.1", "10.9.0.1"] {
        let batch = UsageBatch { events: vec![usage_event(&key.key_id, ip); 3], dropped: 1 };
        let res = rig.http.post(rig.url("/v1/usage")).bearer_auth(SERVICE).json(&batch).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        let accepted: UsageAccepted = serde_json::from_slice(&res.bytes().await.unwrap()).unwrap();
        assert_eq!((accepted.accepted, accepted.duplicate), (3, false));
    }
    let alert: Alert = serde_json::from_str(&next_named(&mut rx, EventName::Alert).await).unwrap();
    assert_eq!((alert.key_id.as_str(), alert.kind), (key.key_id.as_str(), AlertKind::NewNetwork));

    rig.admin.revoke(&key.key_id).await.unwrap();
    let data: KeyChanged = serde_json::from_str(&next_named(&mut rx, EventName::Key(KeyEvent::Revoked)).await).unwrap();
    assert_eq!(data.key_id, key.key_id);

    // A role held by more keys than one change lists: one `reset`. (Keys may hold
    // defined roles only; defining it before anyone holds it publishes nothing.)
    rig.admin.put_role("ops", ["reports:read"]).await.unwrap();
    let many = futures_util::future::join_all((0..257).map(|_| rig.admin.create_key(new_key(&["ops"])))).await;
    assert!(many.iter().all(Result::is_ok));
    rig.admin.put_role("ops", ["reports:write"]).await.unwrap();
    let reset: ResetData = serde_json::from_str(&next_named(&mut rx, EventName::Reset).await).unwrap();
    assert_eq!(reset, ResetData { reason: "bulk".into(), missed: None });
}
