//! Bad input and bad tokens: each refused with its status and a precise JSON message.

mod server_support;

use reqwest::Method;
use serde_json::{Value, json};
use server_support::{ADMIN, SERVICE, TestServer, new_key};

async fn call(t: &TestServer, method: Method, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut req = t.http.request(method, t.url(path)).header("content-type", "application/json");
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.body(body.to_owned());
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn assert_error(got: &(u16, Value), status: u16, code: &str, message_part: &str) {
    assert_eq!(got.0, status, "{got:?}");
    assert_eq!(got.1["error"], code, "{got:?}");
    let message = got.1["message"].as_str().unwrap_or_default();
    assert!(message.contains(message_part), "message {message:?} lacks {message_part:?}");
}

#[tokio::test]
async fn tokens_are_required_and_separate() {
    let t = TestServer::start().await;
    let verify = r#"{"key":"kg_x"}"#;
    assert_error(&call(&t, Method::POST, "/v1/keys/verify", None, Some(verify)).await, 401, "unauthorized", "missing");
    assert_error(
        &call(&t, Method::POST, "/v1/keys/verify", Some(ADMIN), Some(verify)).await,
        401,
        "unauthorized",
        "invalid token",
    );
    assert_error(
        &call(&t, Method::POST, "/v1/keys/verify", Some("svc-test-tokeN"), Some(verify)).await,
        401,
        "unauthorized",
        "invalid token",
    );
    assert_eq!(call(&t, Method::POST, "/v1/keys/verify", Some(SERVICE), Some(verify)).await.0, 200);

    assert_error(&call(&t, Method::GET, "/v1/keys", Some(SERVICE), None).await, 401, "unauthorized", "invalid token");
    assert_error(&call(&t, Method::GET, "/v1/audit", None, None).await, 401, "unauthorized", "missing");
    assert_error(&call(&t, Method::GET, "/v1/events", Some(ADMIN), None).await, 401, "unauthorized", "invalid token");
    assert_error(
        &call(&t, Method::POST, "/v1/usage", Some(ADMIN), Some(r#"{"events":[]}"#)).await,
        401,
        "unauthorized",
        "",
    );

    // Scheme case does not matter; a wrong scheme does.
    let res = t.http.get(t.url("/v1/keys")).header("authorization", format!("bEaReR {ADMIN}")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = t.http.get(t.url("/v1/keys")).header("authorization", format!("Basic {ADMIN}")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.headers().get("www-authenticate").is_some());
    // Two Authorization headers are refused even if one is right.
    let res = t
        .http
        .get(t.url("/v1/keys"))
        .header("authorization", format!("Bearer {ADMIN}"))
        .header("authorization", "Bearer other")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // A bad token is refused before the body is looked at.
    assert_error(&call(&t, Method::POST, "/v1/keys", Some("nope"), Some("{bad json")).await, 401, "unauthorized", "");
}

#[tokio::test]
async fn malformed_and_invalid_bodies_are_400_with_a_precise_message() {
    let t = TestServer::start().await;
    let post = |body: &'static str| call(&t, Method::POST, "/v1/keys", Some(ADMIN), Some(body));
    assert_error(&post("{\"owner\": ").await, 400, "invalid_json", "malformed JSON");
    assert_error(&post("").await, 400, "invalid_json", "empty");
    assert_error(&post("[1, 2]").await, 400, "invalid_request", "");
    assert_error(&post(r#"{"owner":"a"}"#).await, 400, "invalid_request", "missing field `name`");
    assert_error(
        &post(r#"{"owner":"a","name":"n","colour":"red"}"#).await,
        400,
        "invalid_request",
        "unknown field `colour`",
    );
    assert_error(&post(r#"{"owner":"a","name":"n","scopes":"a:b"}"#).await, 400, "invalid_request", "invalid type");
    assert_error(&post(r#"{"owner":"","name":"n"}"#).await, 400, "invalid_request", "`owner` must not be empty");
    assert_error(
        &post(r#"{"owner":"a\u0000","name":"n"}"#).await,
        400,
        "invalid_request",
        "U+0000 (control character) at char 1",
    );
    assert_error(
        &post(r#"{"owner":"a","name":"n","scopes":["a:b","Reports"]}"#).await,
        400,
        "invalid_scope",
        "scopes[1]",
    );
    assert_error(
        &post(r#"{"owner":"a","name":"n","scopes":["reports"]}"#).await,
        400,
        "invalid_scope",
        "resource:action",
    );
    assert_error(&post(r#"{"owner":"a","name":"n","roles":["Ad min"]}"#).await, 400, "invalid_role", "roles[0]");
    assert_error(
        &post(r#"{"owner":"a","name":"n","environment":"PROD"}"#).await,
        400,
        "invalid_request",
        "environment",
    );
    assert_error(
        &post(r#"{"owner":"a","name":"n","expires_at":"2001-01-01T00:00:00Z"}"#).await,
        400,
        "invalid_expiry",
        "future",
    );
    assert_error(&post(r#"{"owner":"a","name":"n","expires_at":"tomorrow"}"#).await, 400, "invalid_request", "");
    assert_error(
        &post(r#"{"owner":"a","name":"n","meta":[1]}"#).await,
        400,
        "invalid_request",
        "`meta` must be a JSON object",
    );
    assert_error(
        &post(r#"{"owner":"a","name":"n","ratelimit":{"limit":0,"period_s":1}}"#).await,
        400,
        "invalid_request",
        "ratelimit",
    );
    // A limit the store could not keep is refused rather than silently lost.
    assert_error(
        &post(r#"{"owner":"a","name":"n","ratelimit":{"limit":18446744073709551615,"period_s":1}}"#).await,
        400,
        "invalid_request",
        "ratelimit",
    );
    // Nothing was half-written.
    assert!(t.admin.list_keys(None).await.unwrap().is_empty());
    assert!(t.admin.audit(None).await.unwrap().is_empty());

    let k = t.admin.create_key(new_key("a", &["a:b"])).await.unwrap();
    let path = format!("/v1/keys/{}", k.key_id);
    assert_error(
        &call(&t, Method::PATCH, &path, Some(ADMIN), Some("{}")).await,
        400,
        "invalid_request",
        "nothing to change",
    );
    assert_error(
        &call(&t, Method::PATCH, &path, Some(ADMIN), Some(r#"{"owner":"b"}"#)).await,
        400,
        "invalid_request",
        "unknown field `owner`",
    );
    assert_error(
        &call(&t, Method::PATCH, &path, Some(ADMIN), Some(r#"{"scopes":["x"]}"#)).await,
        400,
        "invalid_scope",
        "scopes[0]",
    );
    let rotate = format!("/v1/keys/{}/rotate", k.key_id);
    assert_error(
        &call(&t, Method::POST, &rotate, Some(ADMIN), Some(r#"{"grace_s":-1}"#)).await,
        400,
        "invalid_request",
        "",
    );
    assert_error(
        &call(&t, Method::POST, &rotate, Some(ADMIN), Some(r#"{"grace_s":99999999}"#)).await,
        400,
        "invalid_grace",
        "30 days",
    );
    assert_error(
        &call(&t, Method::PUT, "/v1/roles/Bad", Some(ADMIN), Some(r#"{"scopes":[]}"#)).await,
        400,
        "invalid_role",
        "role name",
    );
    assert_error(
        &call(&t, Method::PUT, "/v1/roles/ok", Some(ADMIN), Some(r#"{"scopes":["*"]}"#)).await,
        400,
        "invalid_scope",
        "scopes[0]",
    );
    assert_error(
        &call(&t, Method::GET, "/v1/audit?since=yesterday", Some(ADMIN), None).await,
        400,
        "invalid_query",
        "RFC 3339",
    );
    assert_error(&call(&t, Method::GET, "/v1/usage", Some(ADMIN), None).await, 400, "invalid_query", "key_id");
    // Only the creation was recorded.
    assert_eq!(t.admin.audit(None).await.unwrap().len(), 1);

    // Verify: a bad body is a 400 (a VerifyError for the middleware, never a denial).
    let v = call(&t, Method::POST, "/v1/keys/verify", Some(SERVICE), Some(r#"{"key": 7}"#)).await;
    assert_error(&v, 400, "invalid_request", "{\"key\"");
}

#[tokio::test]
async fn unknown_ids_and_routes_are_404_and_final_states_409() {
    let t = TestServer::start().await;
    for path in ["/v1/keys/key_doesnotexist", "/v1/keys/..%2Fetc", "/v1/nothing"] {
        let got = call(&t, Method::GET, path, Some(ADMIN), None).await;
        assert_eq!(got.0, 404, "{path}");
        assert_eq!(got.1["error"], "not_found");
    }
    assert_error(
        &call(&t, Method::POST, "/v1/keys/key_nope/revoke", Some(ADMIN), None).await,
        404,
        "not_found",
        "key_nope",
    );
    assert_error(
        &call(&t, Method::POST, "/v1/keys/key_nope/rotate", Some(ADMIN), Some("{}")).await,
        404,
        "not_found",
        "",
    );
    assert_error(
        &call(&t, Method::PATCH, "/v1/keys/key_nope", Some(ADMIN), Some(r#"{"disabled":true}"#)).await,
        404,
        "not_found",
        "",
    );
    let k = t.admin.create_key(new_key("a", &["a:b"])).await.unwrap();
    t.admin.revoke(&k.key_id).await.unwrap();
    let path = format!("/v1/keys/{}", k.key_id);
    assert_error(
        &call(&t, Method::PATCH, &path, Some(ADMIN), Some(r#"{"disabled":false}"#)).await,
        409,
        "conflict",
        "revoked",
    );
    assert_error(
        &call(&t, Method::POST, &format!("{path}/rotate"), Some(ADMIN), None).await,
        409,
        "conflict",
        "revoked",
    );
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let t = TestServer::start().await;
    let big = format!(r#"{{"owner":"a","name":"n","meta":{{"x":"{}"}}}}"#, "a".repeat(100 * 1024));
    let got = call(&t, Method::POST, "/v1/keys", Some(ADMIN), Some(&big)).await;
    assert_error(&got, 413, "payload_too_large", "65536");
    let got = call(&t, Method::POST, "/v1/keys/verify", Some(SERVICE), Some(&big)).await;
    assert_error(&got, 413, "payload_too_large", "");
    // Without a Content-Length (chunked), the limit still holds.
    let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(big.clone()), Ok(big)];
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let res = t.http.post(t.url("/v1/keys")).bearer_auth(ADMIN).body(body).send().await.unwrap();
    assert_eq!(res.status(), 413);
    // Just under the limit but invalid: a 400, not a 413.
    let meta = format!(r#"{{"owner":"a","name":"n","meta":{{"x":"{}"}}}}"#, "a".repeat(8 * 1024));
    assert_error(&call(&t, Method::POST, "/v1/keys", Some(ADMIN), Some(&meta)).await, 400, "invalid_request", "4096");
    // A usage batch may be larger, but not without bound.
    let events = json!({ "events": [], "dropped": 0, "pad": "x".repeat(5 * 1024 * 1024) }).to_string();
    assert_eq!(call(&t, Method::POST, "/v1/usage", Some(SERVICE), Some(&events)).await.0, 413);
}

#[tokio::test]
async fn usage_latencies_too_large_for_a_duration_are_400_not_a_panic() {
    let t = TestServer::start().await;
    for ms in ["1e300", "1e23"] {
        let events = format!(
            r#"{{"events":[{{"at":"2024-01-01T00:00:00Z","key_id":"key_a","owner":null,"outcome":"allowed",
                "method":"GET","route":"/","status":200,"latency_ms":{ms},"client_ip":null,"request_id":null}}],"dropped":0}}"#
        );
        let got = call(&t, Method::POST, "/v1/usage", Some(SERVICE), Some(&events)).await;
        assert_error(&got, 400, "invalid_request", "latency");
    }
    // The server is still up.
    assert_eq!(call(&t, Method::GET, "/healthz", None, None).await.0, 200);
}
