//! The key service's OpenAPI document against the real key service: the served
//! document is the committed `docs/openapi.json`, every route the router mounts is in
//! it, and every answer of every route, successes and refusals, validates against the
//! schema the document gives for its path, method and status.
//!
//! Regenerate the committed copy after an API change with
//! `KEYGATE_UPDATE_OPENAPI=1 cargo test --all-features --test server_openapi`.

mod server_support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use keygate::server::{AlertConfig, WebhookConfig};
use reqwest::Method;
use serde_json::{Value, json};
use server_support::{ADMIN, Events, SERVICE, TestDb, TestServer, aggregate, aggregate_batch, eventually, this_minute};

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
const UPDATE_ENV: &str = "KEYGATE_UPDATE_OPENAPI";
const REGENERATE: &str = "KEYGATE_UPDATE_OPENAPI=1 cargo test --all-features --test server_openapi";
const DEADLINE: Duration = Duration::from_secs(20);

async fn served(t: &TestServer) -> String {
    let res = t.http.get(t.url("/openapi.json")).send().await.unwrap();
    assert_eq!(res.status(), 200, "GET /openapi.json needs no token");
    assert_eq!(res.headers()["content-type"], "application/json");
    res.text().await.unwrap()
}

#[tokio::test]
async fn the_served_document_is_the_committed_one() {
    let t = TestServer::start().await;
    let doc = served(&t).await;
    let parsed: Value = serde_json::from_str(&doc).expect("the document is JSON");
    assert_eq!(parsed["openapi"], "3.1.0");
    assert_eq!(parsed["info"]["version"], env!("CARGO_PKG_VERSION"));
    // A second server of another configuration serves the same bytes: nothing in the
    // document depends on the instance (address, tokens, time).
    let other = TestServer::start_on(TestDb::sqlite(), |b| b.key_prefix("other")).await;
    assert_eq!(served(&other).await, doc, "the document must not depend on the server's configuration");
    if std::env::var_os(UPDATE_ENV).is_some() {
        std::fs::create_dir_all(std::path::Path::new(COMMITTED).parent().unwrap()).unwrap();
        std::fs::write(COMMITTED, &doc).unwrap();
        eprintln!("{UPDATE_ENV} is set: wrote {COMMITTED}");
        return;
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    if committed != doc {
        let line = committed.lines().zip(doc.lines()).position(|(a, b)| a != b).map_or_else(
            || format!("the files differ in length ({} and {} lines)", committed.lines().count(), doc.lines().count()),
            |i| format!("first difference at line {}", i + 1),
        );
        panic!(
            "docs/openapi.json is not the document the key service serves ({line}). If the API change is meant, \
             regenerate it with `{REGENERATE}` and commit the file."
        );
    }
}

/// Drives requests, and checks each answer against the document.
struct Checker {
    t: TestServer,
    doc: Value,
    /// (path template, method) → statuses seen.
    seen: Mutex<BTreeMap<(String, String), BTreeSet<u16>>>,
}

enum Body {
    None,
    Json(Value),
    Raw(Vec<u8>),
}

impl Checker {
    /// `#/a/b` of the document.
    fn pointer(&self, reference: &str) -> &Value {
        let p = reference.strip_prefix('#').unwrap_or_else(|| panic!("a remote $ref: {reference}"));
        self.doc.pointer(p).unwrap_or_else(|| panic!("$ref {reference} points at nothing"))
    }

    fn operation(&self, template: &str, method: &Method) -> &Value {
        let op = &self.doc["paths"][template][method.as_str().to_lowercase()];
        assert!(op.is_object(), "{method} {template} is not in the document");
        op
    }

    /// The documented answer for `status`, `$ref`s followed.
    fn response(&self, template: &str, method: &Method, status: u16) -> &Value {
        let op = self.operation(template, method);
        let mut r = &op["responses"][status.to_string()];
        assert!(r.is_object(), "{method} {template} answered {status}, a status the document does not list for it");
        while let Some(reference) = r.get("$ref").and_then(Value::as_str) {
            r = self.pointer(reference);
        }
        r
    }

    /// Validates `instance` against `schema`: the document's schemas, and no field
    /// the document does not name.
    fn validate(&self, what: &str, schema: &Value, instance: &Value) {
        let mut errors = schema_errors(&self.doc, schema, instance);
        undocumented_fields(&self.doc, schema, instance, "", &mut errors);
        assert!(
            errors.is_empty(),
            "{what}: the answer does not match the document:\n{}\nanswer: {instance}",
            errors.join("\n")
        );
    }

    /// Sends `method path` (an instance of `template`) with `token`, checks the answer
    /// against the document, and returns its status and JSON.
    async fn call(&self, method: Method, template: &str, path: &str, token: Option<&str>, body: Body) -> (u16, Value) {
        let mut req = self.t.http.request(method.clone(), self.t.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req = match body {
            Body::None => req,
            Body::Json(v) => req.json(&v),
            Body::Raw(b) => req.header("content-type", "application/json").body(b),
        };
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let content_type = res.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        self.check(&method, template, status, content_type.as_deref(), &text, token);
        if status == 401 {
            assert_eq!(headers["www-authenticate"], "Bearer realm=\"keygate\"", "the documented challenge");
        }
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A GitHub secret scanning report, signed with `signature` (no token).
    async fn report(&self, id: &str, signature: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let template = "/v1/leaks/github";
        let mut req = self.t.http.post(self.t.url(template)).header("content-type", "application/json").body(body);
        req = req.header("Github-Public-Key-Identifier", id);
        if let Some(signature) = signature {
            req = req.header("Github-Public-Key-Signature", signature);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let content_type = res.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
        let text = res.text().await.unwrap();
        self.check(&Method::POST, template, status, content_type.as_deref(), &text, None);
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn check(
        &self,
        method: &Method,
        template: &str,
        status: u16,
        content_type: Option<&str>,
        text: &str,
        token: Option<&str>,
    ) {
        let what = format!("{method} {template} → {status}");
        self.seen
            .lock()
            .unwrap()
            .entry((template.to_owned(), method.as_str().to_lowercase()))
            .or_default()
            .insert(status);
        let op = self.operation(template, method);
        // A route's security is the token kind it takes; an answer past the token
        // check shows which.
        if (200..300).contains(&status) {
            let schemes: Vec<&str> = op["security"]
                .as_array()
                .map(|reqs| reqs.iter().flat_map(|r| r.as_object().unwrap().keys().map(String::as_str)).collect())
                .unwrap_or_default();
            let expected: Vec<&str> = match token {
                Some(ADMIN) => vec!["admin_token"],
                Some(SERVICE) => vec!["service_token"],
                None => vec![],
                Some(_) => schemes.clone(),
            };
            assert_eq!(schemes, expected, "{what}: the security the document states");
        }
        let response = self.response(template, method, status);
        let content = response["content"].as_object().unwrap_or_else(|| panic!("{what}: no documented body"));
        let media = content_type.unwrap_or_default().split(';').next().unwrap().trim().to_owned();
        let documented = content.get(&media).unwrap_or_else(|| {
            panic!("{what}: answered `{media}`, documented {:?}", content.keys().collect::<Vec<_>>())
        });
        if media == "application/json" {
            let instance: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
            self.validate(&what, &documented["schema"], &instance);
        }
    }

    /// Validates an event's data against the component the document names for it.
    fn event_data(&self, event: &str, component: &str, data: &str) {
        let schema = json!({ "$ref": format!("#/components/schemas/{component}") });
        let data: Value = serde_json::from_str(data).unwrap();
        self.validate(&format!("event `{event}`"), &schema, &data);
    }
}

/// What JSON Schema 2020-12 finds wrong with `instance` against `schema`, whose
/// `#/components/...` references resolve in `doc`. Formats (`date-time`) are checked.
fn schema_errors(doc: &Value, schema: &Value, instance: &Value) -> Vec<String> {
    let mut root = schema.clone();
    root.as_object_mut().expect("a schema object").insert("components".into(), doc["components"].clone());
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("the document's schema does not compile: {e}"));
    validator.iter_errors(instance).map(|e| format!("{e} at `{}`", e.instance_path())).collect()
}

/// The subschemas that say what `schema` allows in place (`$ref`, `allOf`, `oneOf`,
/// `anyOf` followed).
fn in_place<'a>(doc: &'a Value, schema: &'a Value, out: &mut Vec<&'a Value>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        in_place(doc, doc.pointer(r.trim_start_matches('#')).expect("a $ref into the document"), out);
    }
    for key in ["allOf", "oneOf", "anyOf"] {
        for sub in schema.get(key).and_then(Value::as_array).into_iter().flatten() {
            in_place(doc, sub, out);
        }
    }
    out.push(schema);
}

/// Fields of `instance` that no object schema of `schema` names, where it names some
/// (a free-form object such as `meta` names none): an answer with a field the document
/// does not have disagrees with it as much as one missing a required field.
fn undocumented_fields(doc: &Value, schema: &Value, instance: &Value, at: &str, errors: &mut Vec<String>) {
    let mut parts = Vec::new();
    in_place(doc, schema, &mut parts);
    match instance {
        Value::Object(fields) => {
            let props: Vec<&serde_json::Map<String, Value>> =
                parts.iter().filter_map(|p| p.get("properties").and_then(Value::as_object)).collect();
            if props.is_empty() {
                return;
            }
            for (name, value) in fields {
                match props.iter().find_map(|p| p.get(name)) {
                    Some(sub) => undocumented_fields(doc, sub, value, &format!("{at}/{name}"), errors),
                    None => errors.push(format!("`{at}/{name}` is not in the document")),
                }
            }
        }
        Value::Array(items) => {
            if let Some(sub) = parts.iter().find_map(|p| p.get("items")) {
                for (i, item) in items.iter().enumerate() {
                    undocumented_fields(doc, sub, item, &format!("{at}/{i}"), errors);
                }
            }
        }
        _ => {}
    }
}

/// The checks above fail on what they should: a wrong type, a missing required field,
/// a bad time, an unknown field, also behind `$ref`s and `allOf`.
#[test]
fn the_checks_refuse_answers_that_disagree_with_the_document() {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(COMMITTED).unwrap()).unwrap();
    let created = json!({ "$ref": "#/components/schemas/CreatedKey" });
    let good = json!({ "key": "kg_x", "key_id": "key_a", "owner": "o", "name": "n", "scopes": [], "roles": [],
        "environment": "live", "expires_at": null, "disabled": false, "revoked": false, "meta": { "any": [1] },
        "ratelimit": null, "created_at": "2026-01-01T00:00:00Z", "last_used_at": null, "key_prefix": "kg_x" });
    assert_eq!(schema_errors(&doc, &created, &good), Vec::<String>::new());
    let mut errors = Vec::new();
    undocumented_fields(&doc, &created, &good, "", &mut errors);
    assert_eq!(errors, Vec::<String>::new());
    for (field, bad) in [("key_id", json!(5)), ("created_at", json!("yesterday")), ("revoked", json!("no"))] {
        let mut wrong = good.clone();
        wrong[field] = bad;
        assert!(!schema_errors(&doc, &created, &wrong).is_empty(), "{field}: {wrong}");
    }
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("key");
    assert!(!schema_errors(&doc, &created, &missing).is_empty(), "the raw key is required");
    let mut extra = good.clone();
    extra["secret_hash"] = json!("00");
    let mut errors = Vec::new();
    undocumented_fields(&doc, &created, &extra, "", &mut errors);
    assert_eq!(errors, ["`/secret_hash` is not in the document"]);
    let list = json!({ "$ref": "#/components/schemas/KeyList" });
    extra.as_object_mut().unwrap().remove("key");
    let mut errors = Vec::new();
    undocumented_fields(&doc, &list, &json!({ "keys": [extra] }), "", &mut errors);
    assert_eq!(errors, ["`/keys/0/secret_hash` is not in the document"]);
}

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PUT: Method = Method::PUT;
const PATCH: Method = Method::PATCH;
const DELETE: Method = Method::DELETE;

/// Statuses the document lists that this test cannot cause on a single SQLite server,
/// with why. Every other 2xx, 400, 401, 404 and 409 the document lists must be seen.
const NOT_DRIVEN: &[(&str, &str, u16, &str)] = &[
    ("/v1/usage", "post", 409, "PostgreSQL only: usage rows changing under a batch on every retry"),
    ("/v1/webhooks", "post", 409, "the endpoint cap (too many endpoints to add in a test)"),
    ("/v1/leaks/github", "post", 404, "secret scanning off: tests/server_leaks.rs (this server has it on)"),
];

#[tokio::test]
async fn every_route_answers_as_the_document_says() {
    let github_keys = server_support::github::KeysDocument::default();
    let github = github_keys.add("k1");
    let keys_url = github_keys.serve().await;
    let t = TestServer::start_on(TestDb::sqlite(), |b| {
        b.secret_scanning(keygate::server::SecretScanning::github().keys_url(keys_url))
            .heartbeat(Duration::from_millis(200))
            .max_event_subscribers(1)
            .alerts(AlertConfig { sweep_interval: Duration::from_millis(50), ..AlertConfig::default() })
            // Deliveries stay pending in the log: nothing is sent anywhere.
            .webhooks(WebhookConfig { enabled: false, ..WebhookConfig::default() })
    })
    .await;
    let doc: Value = serde_json::from_str(&served(&t).await).unwrap();
    let c = Checker { t, doc, seen: Mutex::new(BTreeMap::new()) };
    let big = Body::Raw(vec![b' '; 70 * 1024]);
    let a = Some(ADMIN);
    let s = Some(SERVICE);
    let none = None;

    // ---- health and this document
    assert_eq!(c.call(GET, "/healthz", "/healthz", none, Body::None).await.0, 200);
    assert_eq!(c.call(GET, "/openapi.json", "/openapi.json", none, Body::None).await.0, 200);

    // ---- roles
    let role = json!({ "scopes": ["reports:read"] });
    assert_eq!(c.call(PUT, "/v1/roles/{name}", "/v1/roles/reader", a, Body::Json(role.clone())).await.0, 200);
    assert_eq!(c.call(PUT, "/v1/roles/{name}", "/v1/roles/Not%20a%20name", a, Body::Json(role.clone())).await.0, 400);
    assert_eq!(c.call(PUT, "/v1/roles/{name}", "/v1/roles/reader", none, Body::Json(role.clone())).await.0, 401);
    assert_eq!(c.call(PUT, "/v1/roles/{name}", "/v1/roles/reader", a, Body::Raw(vec![b' '; 70 * 1024])).await.0, 413);
    assert_eq!(c.call(GET, "/v1/roles", "/v1/roles", a, Body::None).await.0, 200);

    // ---- owners' limits and credits
    let owner = "/v1/owners/{owner}";
    let quota =
        json!({ "limits": [{ "name": "requests", "limit": 10, "period_s": 1 }], "credits": { "remaining": 5 } });
    assert_eq!(c.call(PUT, owner, "/v1/owners/acme", a, Body::Json(quota.clone())).await.0, 200);
    let bad = json!({ "limits": [{ "name": "Requests", "limit": 10, "period_s": 1 }] });
    assert_eq!(c.call(PUT, owner, "/v1/owners/acme", a, Body::Json(bad)).await.0, 400);
    assert_eq!(c.call(PUT, owner, "/v1/owners/acme", none, Body::Json(quota.clone())).await.0, 401);
    assert_eq!(c.call(PUT, owner, "/v1/owners/acme", a, Body::Raw(vec![b' '; 70 * 1024])).await.0, 413);
    assert_eq!(c.call(GET, owner, "/v1/owners/acme", a, Body::None).await.0, 200);
    assert_eq!(c.call(GET, owner, "/v1/owners/a%0Ab", a, Body::None).await.0, 400);
    assert_eq!(c.call(GET, owner, "/v1/owners/acme", s, Body::None).await.0, 401);
    assert_eq!(c.call(GET, "/v1/roles", "/v1/roles", s, Body::None).await.0, 401);

    // ---- keys
    let expires = (time::OffsetDateTime::now_utc() + Duration::from_secs(3600))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let new = json!({ "owner": "acme", "name": "ci", "scopes": ["reports:write"], "roles": ["reader"],
                      "meta": { "team": "data" }, "ratelimit": { "limit": 10, "period_s": 60 }, "expires_at": expires });
    let (st, created) = c.call(POST, "/v1/keys", "/v1/keys", a, Body::Json(new.clone())).await;
    assert_eq!(st, 201);
    let (id, key) = (created["key_id"].as_str().unwrap().to_owned(), created["key"].as_str().unwrap().to_owned());
    let unknown_role = json!({ "owner": "acme", "name": "x", "roles": ["nosuchrole"] });
    assert_eq!(c.call(POST, "/v1/keys", "/v1/keys", a, Body::Json(unknown_role)).await.0, 400);
    assert_eq!(c.call(POST, "/v1/keys", "/v1/keys", none, Body::Json(new.clone())).await.0, 401);
    assert_eq!(c.call(POST, "/v1/keys", "/v1/keys", a, Body::Raw(vec![b' '; 70 * 1024])).await.0, 413);
    let (_, plain) = c
        .call(
            POST,
            "/v1/keys",
            "/v1/keys",
            a,
            Body::Json(json!({ "owner": "acme", "name": "plain", "roles": ["reader"] })),
        )
        .await;
    let plain_id = plain["key_id"].as_str().unwrap().to_owned();
    assert_eq!(c.call(GET, "/v1/keys", "/v1/keys?owner=acme", a, Body::None).await.0, 200);
    assert_eq!(c.call(GET, "/v1/keys", "/v1/keys?bogus=1", a, Body::None).await.0, 400);
    assert_eq!(c.call(GET, "/v1/keys", "/v1/keys", s, Body::None).await.0, 401);
    let key_path = format!("/v1/keys/{id}");
    let nosuch = "/v1/keys/key_0000000000000000000000";
    for m in [GET, PATCH] {
        let body = || if m == PATCH { Body::Json(json!({ "name": "renamed" })) } else { Body::None };
        assert_eq!(c.call(m.clone(), "/v1/keys/{id}", &key_path, a, body()).await.0, 200);
        assert_eq!(c.call(m.clone(), "/v1/keys/{id}", nosuch, a, body()).await.0, 404);
        assert_eq!(c.call(m.clone(), "/v1/keys/{id}", &key_path, none, body()).await.0, 401);
        // A path segment that is not UTF-8.
        assert_eq!(c.call(m.clone(), "/v1/keys/{id}", "/v1/keys/%FF", a, body()).await.0, 400);
    }
    assert_eq!(c.call(PATCH, "/v1/keys/{id}", &key_path, a, Body::Json(json!({}))).await.0, 400);
    assert_eq!(c.call(PATCH, "/v1/keys/{id}", &key_path, a, Body::Raw(vec![b' '; 70 * 1024])).await.0, 413);
    let patch = json!({ "expires_at": null, "ratelimit": null, "disabled": false, "meta": {} });
    assert_eq!(c.call(PATCH, "/v1/keys/{id}", &key_path, a, Body::Json(patch)).await.0, 200);

    // ---- verify (a refusal is a 200)
    let verify = |body| c.call(POST, "/v1/keys/verify", "/v1/keys/verify", s, body);
    let (st, answer) = verify(Body::Json(json!({ "key": key }))).await;
    assert_eq!((st, &answer["valid"]), (200, &json!(true)));
    let digest = keygate::ApiKey::new(key.clone()).digest().to_hex();
    assert_eq!(verify(Body::Json(json!({ "digest": digest }))).await.1["valid"], true);
    let (_, refused) = verify(Body::Json(json!({ "key": "kg_nosuchkey" }))).await;
    assert_eq!(refused["code"], "NOT_FOUND");
    assert_eq!(verify(Body::Json(json!({ "digest": "zz" }))).await.0, 400);
    assert_eq!(verify(big).await.0, 413);
    let vbody = || Body::Json(json!({ "key": "kg_x" }));
    assert_eq!(c.call(POST, "/v1/keys/verify", "/v1/keys/verify", a, vbody()).await.0, 401, "an admin token");
    assert_eq!(c.call(POST, "/v1/keys/verify", "/v1/keys/verify", none, vbody()).await.0, 401);
    let batch = |token, body| c.call(POST, "/v1/keys/verify-batch", "/v1/keys/verify-batch", token, body);
    let unknown = keygate::ApiKey::new("kg_nosuchkey").digest().to_hex();
    let (st, answers) = batch(s, Body::Json(json!({ "digests": [digest, unknown] }))).await;
    assert_eq!(
        (st, &answers["answers"][0]["valid"], &answers["answers"][1]["code"]),
        (200, &json!(true), &json!("NOT_FOUND"))
    );
    assert_eq!(batch(s, Body::Json(json!({ "digests": [] }))).await.0, 400);
    assert_eq!(batch(s, Body::Raw(vec![b' '; 70 * 1024])).await.0, 413);
    assert_eq!(batch(a, Body::Json(json!({ "digests": [digest] }))).await.0, 401, "an admin token");

    // ---- leak reports (GitHub's signature instead of a token)
    let sign = |body: &[u8]| server_support::github::sign(&github, body);
    let body = serde_json::to_vec(&json!([{ "token": "kg_nosuchkey", "type": "keygate_api_key", "url": "https://github.com/o/r", "source": "content" }])).unwrap();
    let (st, labels) = c.report("k1", Some(&sign(&body)), body.clone()).await;
    assert_eq!((st, &labels[0]["label"]), (200, &json!("false_positive")));
    assert_eq!(c.report("k1", None, body.clone()).await.0, 401);
    assert_eq!(c.report("k1", Some(&sign(b"[1]")), b"[1]".to_vec()).await.0, 400);
    assert_eq!(c.report("k1", Some("AAAA"), vec![b' '; keygate::server::REPORT_BODY_LIMIT + 1]).await.0, 413);

    // ---- rotate
    let rotate = format!("/v1/keys/{id}/rotate");
    let tpl = "/v1/keys/{id}/rotate";
    let (st, rotated) = c.call(POST, tpl, &rotate, a, Body::Json(json!({ "grace_s": 60 }))).await;
    assert_eq!(st, 200);
    assert!(rotated["previous_expires_at"].is_string());
    assert_eq!(c.call(POST, tpl, &rotate, a, Body::None).await.0, 200, "an empty body: the defaults");
    assert_eq!(c.call(POST, tpl, &rotate, a, Body::Json(json!({ "grace_s": 99_999_999 }))).await.0, 400);
    assert_eq!(c.call(POST, tpl, "/v1/keys/key_0000000000000000000000/rotate", a, Body::None).await.0, 404);
    assert_eq!(c.call(POST, tpl, &rotate, none, Body::None).await.0, 401);
    assert_eq!(c.call(POST, tpl, &rotate, a, Body::Raw(vec![b' '; 70 * 1024])).await.0, 413);
    let key = rotated["key"].as_str().unwrap().to_owned();

    // ---- usage: upload (service) and report (admin)
    let minute = this_minute();
    let reqs: Vec<server_support::Req> = (0..3)
        .map(|i| server_support::Req {
            minute,
            key_id: Some(id.clone()),
            route: "/reports/{id}",
            method: "GET",
            outcome: keygate::Outcome::Allowed,
            status: 200,
            latency_us: 1000 + i,
        })
        .collect();
    let batch = serde_json::to_value(aggregate_batch(aggregate(&reqs))).unwrap();
    let up = |token, body| c.call(POST, "/v1/usage", "/v1/usage", token, body);
    assert_eq!(up(s, Body::Json(batch.clone())).await, (202, json!({ "accepted": 3 })));
    let (st, dup) = up(s, Body::Json(batch.clone())).await;
    assert_eq!((st, &dup["duplicate"]), (202, &json!(true)));
    let at = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap();
    let raw = json!({ "events": [{ "at": at, "key_id": plain_id, "owner": "acme", "outcome": "not_found",
        "method": "GET", "route": "/x", "status": 401, "latency_ms": 0.5, "client_ip": null, "request_id": null }] });
    assert_eq!(up(s, Body::Json(raw)).await.0, 202);
    assert_eq!(up(s, Body::Json(json!({ "batch_id": "nothex", "rows": [] }))).await.0, 400);
    assert_eq!(up(a, Body::Json(batch.clone())).await.0, 401);
    // Read whole (aggregate batches may be larger), then refused as a raw batch.
    assert_eq!(up(s, Body::Raw(vec![b' '; 5 * 1024 * 1024])).await.0, 413);
    let cr = &c;
    let report = |q: &str, token| {
        let path = format!("/v1/usage{q}");
        async move { cr.call(GET, "/v1/usage", &path, token, Body::None).await }
    };
    let (st, rep) = report(&format!("?key_id={id}"), a).await;
    assert_eq!(st, 200);
    assert_eq!(rep["buckets"][0]["requests"], 3);
    assert_eq!(report("?owner=acme&group_by=route", a).await.0, 200);
    assert_eq!(report("?owner=acme&group_by=day", a).await.0, 200);
    assert_eq!(report("", a).await.0, 400);
    assert_eq!(report("?owner=acme", s).await.0, 401);

    // ---- alerts: the key expiring within the hour raises `key_expiring` at the next sweep
    let expiring = json!({ "owner": "soon", "name": "soon", "scopes": ["a:b"], "expires_at": expires });
    c.call(POST, "/v1/keys", "/v1/keys", a, Body::Json(expiring)).await;
    let raised = eventually(DEADLINE, || async {
        let list = c.t.admin.alerts().await.unwrap();
        !list.is_empty()
    })
    .await;
    assert!(raised, "an expiring-soon alert is raised");
    let (st, alerts) = c.call(GET, "/v1/alerts", "/v1/alerts", a, Body::None).await;
    assert_eq!(st, 200);
    let alert_id = alerts["alerts"][0]["id"].as_u64().unwrap();
    assert_eq!(c.call(GET, "/v1/alerts", "/v1/alerts?acknowledged=false", a, Body::None).await.0, 200);
    assert_eq!(c.call(GET, "/v1/alerts", "/v1/alerts?since=yesterday", a, Body::None).await.0, 400);
    assert_eq!(c.call(GET, "/v1/alerts", "/v1/alerts", none, Body::None).await.0, 401);
    let ack = "/v1/alerts/{id}/ack";
    assert_eq!(c.call(POST, ack, &format!("/v1/alerts/{alert_id}/ack"), a, Body::None).await.0, 200);
    assert_eq!(c.call(POST, ack, "/v1/alerts/999999/ack", a, Body::None).await.0, 404);
    assert_eq!(c.call(POST, ack, "/v1/alerts/%FF/ack", a, Body::None).await.0, 400);
    assert_eq!(c.call(POST, ack, "/v1/alerts/1/ack", s, Body::None).await.0, 401);
    assert_eq!(c.call(GET, "/v1/alerts", "/v1/alerts?acknowledged=true", a, Body::None).await.0, 200);

    // ---- webhooks (added before the revocation below, so that its log has an entry)
    let hook = json!({ "url": "https://hooks.example.com/keygate", "events": ["key.revoked"], "description": "ops" });
    let (st, wh) = c.call(POST, "/v1/webhooks", "/v1/webhooks", a, Body::Json(hook.clone())).await;
    assert_eq!(st, 201);
    let wh_id = wh["id"].as_str().unwrap().to_owned();
    let bad_hook = json!({ "url": "ftp://example.com/" });
    assert_eq!(c.call(POST, "/v1/webhooks", "/v1/webhooks", a, Body::Json(bad_hook)).await.0, 400);
    assert_eq!(c.call(POST, "/v1/webhooks", "/v1/webhooks", none, Body::Json(hook.clone())).await.0, 401);
    assert_eq!(c.call(POST, "/v1/webhooks", "/v1/webhooks", a, Body::Raw(vec![b' '; 17 * 1024])).await.0, 413);
    assert_eq!(c.call(GET, "/v1/webhooks", "/v1/webhooks", a, Body::None).await.0, 200);
    assert_eq!(c.call(GET, "/v1/webhooks", "/v1/webhooks", s, Body::None).await.0, 401);

    // ---- revoke (idempotent), and what a revoked key refuses
    let revoke = format!("/v1/keys/{id}/revoke");
    let tpl = "/v1/keys/{id}/revoke";
    let (st, revoked) = c.call(POST, tpl, &revoke, a, Body::None).await;
    assert_eq!((st, &revoked["already_revoked"]), (200, &json!(false)));
    assert_eq!(c.call(POST, tpl, &revoke, a, Body::None).await.1["already_revoked"], true);
    assert_eq!(c.call(POST, tpl, "/v1/keys/key_0000000000000000000000/revoke", a, Body::None).await.0, 404);
    assert_eq!(c.call(POST, tpl, "/v1/keys/%FF/revoke", a, Body::None).await.0, 400);
    assert_eq!(c.call(POST, tpl, &revoke, s, Body::None).await.0, 401);
    assert_eq!(c.call(PATCH, "/v1/keys/{id}", &key_path, a, Body::Json(json!({ "name": "n" }))).await.0, 409);
    assert_eq!(c.call(POST, "/v1/keys/{id}/rotate", &rotate, a, Body::None).await.0, 409);
    let (_, refused) = verify(Body::Json(json!({ "key": key }))).await;
    assert_eq!((&refused["code"], &refused["key_id"]), (&json!("REVOKED"), &json!(id)));

    // ---- the webhook's delivery log, then its removal
    let wh_path = format!("/v1/webhooks/{wh_id}");
    let nosuch_wh = "/v1/webhooks/wh_0000000000000000000000";
    let logged = eventually(DEADLINE, || async {
        let res = c.t.http.get(c.t.url(&format!("{wh_path}/deliveries"))).bearer_auth(ADMIN).send().await.unwrap();
        res.json::<Value>().await.unwrap()["deliveries"].as_array().is_some_and(|d| !d.is_empty())
    })
    .await;
    assert!(logged, "the revocation is in the endpoint's log");
    let dtpl = "/v1/webhooks/{id}/deliveries";
    let (st, page) = c.call(GET, dtpl, &format!("{wh_path}/deliveries?limit=10"), a, Body::None).await;
    assert_eq!((st, &page["deliveries"][0]["event_type"]), (200, &json!("key.revoked")));
    assert_eq!(c.call(GET, dtpl, &format!("{wh_path}/deliveries?limit=ten"), a, Body::None).await.0, 400);
    assert_eq!(c.call(GET, dtpl, &format!("{nosuch_wh}/deliveries"), a, Body::None).await.0, 404);
    assert_eq!(c.call(GET, dtpl, &format!("{wh_path}/deliveries"), none, Body::None).await.0, 401);
    for m in [GET, DELETE] {
        assert_eq!(c.call(m.clone(), "/v1/webhooks/{id}", "/v1/webhooks/%FF", a, Body::None).await.0, 400);
        assert_eq!(c.call(m.clone(), "/v1/webhooks/{id}", &wh_path, s, Body::None).await.0, 401);
        assert_eq!(c.call(m.clone(), "/v1/webhooks/{id}", &wh_path, a, Body::None).await.0, 200);
    }
    for m in [GET, DELETE] {
        assert_eq!(c.call(m.clone(), "/v1/webhooks/{id}", &wh_path, a, Body::None).await.0, 404, "removed");
    }

    // ---- roles: deleting one that keys hold
    let del = "/v1/roles/{name}";
    assert_eq!(c.call(DELETE, del, "/v1/roles/reader", a, Body::None).await.0, 409, "the plain key holds it");
    let (st, deleted) = c.call(DELETE, del, "/v1/roles/reader?detach=true", a, Body::None).await;
    assert_eq!((st, &deleted["detached"]), (200, &json!([plain_id])));
    assert_eq!(c.call(DELETE, del, "/v1/roles/reader", a, Body::None).await.0, 404);
    assert_eq!(c.call(DELETE, del, "/v1/roles/Not%20a%20name", a, Body::None).await.0, 400);
    assert_eq!(c.call(DELETE, del, "/v1/roles/reader", s, Body::None).await.0, 401);

    // ---- audit
    assert_eq!(c.call(GET, "/v1/audit", "/v1/audit", a, Body::None).await.0, 200);
    assert_eq!(c.call(GET, "/v1/audit", "/v1/audit?since=2020-01-01T00:00:00Z", a, Body::None).await.0, 200);
    assert_eq!(c.call(GET, "/v1/audit", "/v1/audit?since=never", a, Body::None).await.0, 400);
    assert_eq!(c.call(GET, "/v1/audit", "/v1/audit", s, Body::None).await.0, 401);

    // ---- tokens
    let tok = json!({ "kind": "service", "name": "fleet-eu" });
    let (st, created) = c.call(POST, "/v1/tokens", "/v1/tokens", a, Body::Json(tok.clone())).await;
    assert_eq!(st, 201);
    let tok_id = created["id"].as_str().unwrap().to_owned();
    let fleet = created["token"].as_str().unwrap().to_owned();
    assert_eq!(c.call(POST, "/v1/tokens", "/v1/tokens", a, Body::Json(tok.clone())).await.0, 409, "a taken name");
    let bad = json!({ "kind": "service", "name": "bad name" });
    assert_eq!(c.call(POST, "/v1/tokens", "/v1/tokens", a, Body::Json(bad)).await.0, 400);
    assert_eq!(c.call(POST, "/v1/tokens", "/v1/tokens", s, Body::Json(tok.clone())).await.0, 401);
    assert_eq!(c.call(POST, "/v1/tokens", "/v1/tokens", a, Body::Raw(vec![b' '; 70 * 1024])).await.0, 413);
    assert_eq!(c.call(GET, "/v1/tokens", "/v1/tokens", a, Body::None).await.0, 200);
    assert_eq!(c.call(GET, "/v1/tokens", "/v1/tokens", none, Body::None).await.0, 401);

    // ---- events: a stream, its events' data, the subscriber cap (1 here), and the
    // stream of a revoked token ending
    let res = c.t.http_stream().get(c.t.url("/v1/events")).bearer_auth(&fleet).send().await.unwrap();
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    c.check(&GET, "/v1/events", res.status().as_u16(), Some(&ct), "", Some(&fleet));
    assert_eq!(res.status(), 200);
    drop(res);
    assert!(stream_slot_free(&c.t).await, "the first stream's slot is free again");
    let mut stream = Events::connect(&c.t).await;
    let (name, data) = stream.next(DEADLINE).await.unwrap();
    assert_eq!(name, "heartbeat");
    c.event_data(&name, "Heartbeat", &data);
    let (st, _) = c.call(GET, "/v1/events", "/v1/events", s, Body::None).await;
    assert_eq!(st, 503, "past the subscriber cap");
    let rename = keygate::client::KeyPatch { name: Some("n2".into()), ..Default::default() };
    c.t.admin.update_key(&plain_id, &rename).await.unwrap();
    let (name, data) = loop {
        let (name, data) = stream.next(DEADLINE).await.unwrap();
        if name != "heartbeat" {
            break (name, data);
        }
    };
    assert_eq!(name, "updated");
    c.event_data(&name, "KeyChanged", &data);
    drop(stream);
    assert!(stream_slot_free(&c.t).await);
    assert_eq!(c.call(GET, "/v1/events", "/v1/events", a, Body::None).await.0, 401);

    // ---- token revocation (idempotent; refused for the bootstrap tokens)
    let rtpl = "/v1/tokens/{id}/revoke";
    let rpath = format!("/v1/tokens/{tok_id}/revoke");
    assert_eq!(c.call(POST, rtpl, &rpath, a, Body::None).await.0, 200);
    assert_eq!(c.call(POST, rtpl, &rpath, a, Body::None).await.0, 200, "again");
    assert_eq!(c.call(POST, rtpl, "/v1/tokens/bootstrap-admin/revoke", a, Body::None).await.0, 409);
    assert_eq!(c.call(POST, rtpl, "/v1/tokens/tok_nosuch/revoke", a, Body::None).await.0, 404);
    assert_eq!(c.call(POST, rtpl, "/v1/tokens/%FF/revoke", a, Body::None).await.0, 400);
    assert_eq!(c.call(POST, rtpl, &rpath, s, Body::None).await.0, 401);

    // ---- every documented route was driven, with every status that matters
    let seen = c.seen.lock().unwrap().clone();
    let mut missing = Vec::new();
    for (template, item) in c.doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Some(statuses) = seen.get(&(template.clone(), method.clone())) else {
                missing.push(format!("{method} {template}: never called"));
                continue;
            };
            for status in op["responses"].as_object().unwrap().keys() {
                let status: u16 = status.parse().unwrap();
                let driven = (200..300).contains(&status) || [400, 401, 404, 409].contains(&status);
                let excused = NOT_DRIVEN.iter().any(|(p, m, s, _)| p == template && m == method && *s == status);
                if driven && !excused && !statuses.contains(&status) {
                    missing.push(format!("{method} {template}: {status} documented, never answered here"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "not exercised:\n{}", missing.join("\n"));

    // ---- no method the document leaves out is mounted on its paths
    for (template, item) in c.doc["paths"].as_object().unwrap() {
        let path = template.replace("{id}", "x").replace("{name}", "x").replace("{owner}", "x");
        for m in [GET, POST, PUT, PATCH, DELETE] {
            if item.get(m.as_str().to_lowercase()).is_some() {
                continue;
            }
            let res = c.t.http.request(m.clone(), c.t.url(&path)).bearer_auth(ADMIN).send().await.unwrap();
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            assert_eq!((status, &body["error"]), (405, &json!("method_not_allowed")), "{m} {template} is mounted");
        }
    }
}

/// Whether a stream can be opened (the cap is 1): a dropped stream's slot frees once
/// the server notices, at its next write.
async fn stream_slot_free(t: &TestServer) -> bool {
    eventually(DEADLINE, || async {
        let res = t.http_stream().get(t.url("/v1/events")).bearer_auth(SERVICE).send().await.unwrap();
        res.status() == 200
    })
    .await
}

/// Routes on listeners of their own, outside the API's document.
const OTHER_LISTENERS: &[&str] = &["/metrics"];

/// The routes `src/server` mounts, read from its `.route("path", get(..).post(..))`
/// calls, against the document's: a route added without its documentation fails here.
#[test]
fn every_mounted_route_is_in_the_document() {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(COMMITTED).unwrap()).unwrap();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, item)| item.as_object().unwrap().keys().map(move |m| (p.clone(), m.clone())))
        .collect();
    let mut mounted = BTreeSet::new();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/server");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let routes = routes_in(&std::fs::read_to_string(&path).unwrap());
            // The console's HTML pages (`/console...`, in `src/server/console/`) are for
            // browsers, not part of the API: they are not in its document.
            mounted.extend(
                routes
                    .into_iter()
                    .filter(|(p, _)| !OTHER_LISTENERS.contains(&p.as_str()) && !p.starts_with("/console")),
            );
        }
    }
    assert!(mounted.len() >= 20, "the route reader found only {mounted:?}");
    let undocumented: Vec<_> = mounted.difference(&documented).collect();
    let unmounted: Vec<_> = documented.difference(&mounted).collect();
    assert!(undocumented.is_empty(), "mounted but not documented: {undocumented:?}");
    assert!(unmounted.is_empty(), "documented but not mounted: {unmounted:?}");
}

/// `(path, method)` of each `.route("path", method(..).method(..))` in `source`.
fn routes_in(source: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find(".route(\"") {
        rest = &rest[at + 8..];
        let end = rest.find('"').unwrap();
        let path = rest[..end].to_owned();
        // The method router: the rest of the call, up to its closing parenthesis.
        let mut depth = 1;
        let mut ident = String::new();
        for ch in rest[end + 1..].chars() {
            match ch {
                '(' => {
                    if depth == 1 && ["get", "post", "put", "patch", "delete"].contains(&ident.as_str()) {
                        out.push((path.clone(), ident.clone()));
                    }
                    depth += 1;
                    ident.clear();
                }
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                    ident.clear();
                }
                c if c.is_ascii_alphanumeric() || c == '_' => ident.push(c),
                _ => ident.clear(),
            }
        }
    }
    out
}
