//! Key environments (issue 17): a route, a layer and a gRPC method that take keys of one
//! environment only answer the others 403 `wrong_environment` (gRPC
//! `PERMISSION_DENIED`), told apart from a missing scope, and usage records it.

#[path = "../examples/support/echo_proto.rs"]
mod echo;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use echo::echo_client::EchoClient;
use echo::echo_server::{Echo, EchoServer};
use echo::{EchoReply, EchoRequest};
use http::{Request, StatusCode};
use keygate::{
    ApiKey, ApiKeyLayer, DecidedRequest, Outcome, Principal, RequireScopes, ScopeSet, StaticVerifier, UsageSink,
};
use serde_json::Value;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tower::ServiceExt;

struct Keys {
    live: ApiKey,
    test: ApiKey,
    live_unscoped: ApiKey,
}

fn verifier() -> (StaticVerifier, Keys) {
    let keys = Keys {
        live: ApiKey::generate("kg").unwrap(),
        test: ApiKey::generate("kgtest").unwrap(),
        live_unscoped: ApiKey::generate("kg").unwrap(),
    };
    let key = |id: &str, env: &str, scopes: &[&str]| {
        Principal::builder(id).environment(env).scopes(ScopeSet::parse(scopes).unwrap()).build()
    };
    let v = StaticVerifier::new()
        .with_key(&keys.live, key("key_live", "live", &["reports:read", "echo:say"]))
        .with_key(&keys.test, key("key_test", "test", &["reports:read", "echo:say"]))
        .with_key(&keys.live_unscoped, key("key_bare", "live", &[]));
    (v, keys)
}

#[derive(Clone, Default)]
struct Recorded(Arc<Mutex<Vec<Outcome>>>);

impl UsageSink for Recorded {
    fn record(&self, request: &DecidedRequest<'_>) {
        self.0.lock().unwrap().push(request.outcome());
    }
}

async fn get_with(app: &Router, path: &str, key: &ApiKey) -> (StatusCode, Value) {
    let req = Request::get(path).header("x-api-key", key.expose_secret()).body(Body::empty()).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let body = axum::body::to_bytes(res.into_body(), 1 << 16).await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_live_only_route_refuses_test_keys_with_wrong_environment() {
    let (verifier, keys) = verifier();
    let usage = Recorded::default();
    let app = Router::new()
        .route("/reports", get(|| async { "reports" }).route_layer(RequireScopes::expr("reports:read AND env(live)")))
        .route("/sandbox", get(|| async { "sandbox" }).route_layer(RequireScopes::environment("test")))
        .route("/any", get(|| async { "any" }))
        .layer(ApiKeyLayer::new(verifier).usage(usage.clone()));

    assert_eq!(get_with(&app, "/reports", &keys.live).await.0, StatusCode::OK);
    let (status, body) = get_with(&app, "/reports", &keys.test).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["code"], "wrong_environment");
    assert_eq!(body["required_environments"], serde_json::json!(["live"]));
    // A live key that lacks the scope is told so, not that its environment is wrong.
    let (status, body) = get_with(&app, "/reports", &keys.live_unscoped).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("insufficient_scope")));

    assert_eq!(get_with(&app, "/sandbox", &keys.test).await.0, StatusCode::OK);
    assert_eq!(get_with(&app, "/sandbox", &keys.live).await.1["code"], "wrong_environment");
    assert_eq!(get_with(&app, "/any", &keys.test).await.0, StatusCode::OK, "no rule, no refusal");

    let outcomes = usage.0.lock().unwrap().clone();
    assert_eq!(outcomes.iter().filter(|o| **o == Outcome::WrongEnvironment).count(), 2, "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::InsufficientScope));
}

#[tokio::test]
async fn a_layer_wide_rule_and_an_or_of_environments() {
    let (verifier, keys) = verifier();
    let app = Router::new()
        .route("/x", get(|| async { "x" }))
        .layer(ApiKeyLayer::new(verifier).require(RequireScopes::expr("env(live) OR env(staging)")));
    assert_eq!(get_with(&app, "/x", &keys.live).await.0, StatusCode::OK);
    let (status, body) = get_with(&app, "/x", &keys.test).await;
    assert_eq!(
        (status, &body["required_environments"]),
        (StatusCode::FORBIDDEN, &serde_json::json!(["live", "staging"]))
    );
}

struct Svc;

#[tonic::async_trait]
impl Echo for Svc {
    async fn say(&self, req: tonic::Request<EchoRequest>) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(EchoReply { message: req.into_inner().message, key_id: String::new() }))
    }

    async fn shout(&self, req: tonic::Request<EchoRequest>) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Ok(tonic::Response::new(EchoReply { message: req.into_inner().message, key_id: String::new() }))
    }
}

#[tokio::test]
async fn a_grpc_method_for_live_keys_answers_permission_denied() {
    let (verifier, keys) = verifier();
    let policy = RequireScopes::methods()
        .method("/echo.Echo/Say", "echo:say AND env(live)")
        .method("/echo.Echo/Shout", "echo:say");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(ApiKeyLayer::new(verifier))
            .layer(policy)
            .add_service(EchoServer::new(Svc))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap()
    });
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = EchoClient::new(channel);
    let call = |key: &ApiKey| {
        let mut req = tonic::Request::new(EchoRequest { message: "hi".into() });
        req.metadata_mut().insert("x-api-key", MetadataValue::try_from(key.expose_secret()).unwrap());
        req
    };
    assert!(client.say(call(&keys.live)).await.is_ok());
    let status = client.say(call(&keys.test)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("environment"), "{}", status.message());
    assert!(client.shout(call(&keys.test)).await.is_ok(), "the other method takes test keys");
}
