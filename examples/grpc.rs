//! keygate in front of a tonic gRPC service.
//!
//! ```sh
//! cargo run --example grpc
//! ```
//!
//! The same `ApiKeyLayer` as for axum, plus `RequireScopes::methods()` mapping gRPC
//! method paths to requirements. Rejections are gRPC statuses: UNAUTHENTICATED,
//! PERMISSION_DENIED, INVALID_ARGUMENT, UNAVAILABLE.

#[path = "support/echo_proto.rs"]
mod echo;

use echo::echo_client::EchoClient;
use echo::echo_server::{Echo, EchoServer};
use echo::{EchoReply, EchoRequest};
use keygate::{ApiKey, ApiKeyLayer, Principal, RequireScopes, ScopeSet, StaticVerifier};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn say(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        // The verified principal rides in the request's extensions.
        let key_id = req.extensions().get::<Principal>().map(|p| p.key_id().to_owned()).unwrap_or_default();
        Ok(Response::new(EchoReply { message: req.into_inner().message, key_id }))
    }

    async fn shout(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply { message: req.into_inner().message.to_uppercase(), key_id: String::new() }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let reader = ApiKey::generate("kg")?;
    let admin = ApiKey::generate("kg")?;
    let verifier = StaticVerifier::new()
        .with_key(&reader, Principal::builder("key_reader").scopes(ScopeSet::parse(["echo:say"])?).build())
        .with_key(
            &admin,
            Principal::builder("key_admin").scopes(ScopeSet::parse(["echo:*"])?).roles(["admin"]).build(),
        );
    let policy = RequireScopes::methods()
        .method("/echo.Echo/Say", "echo:say")
        .method("/echo.Echo/Shout", "echo:shout AND role(admin)");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(ApiKeyLayer::new(verifier))
            .layer(policy)
            .add_service(EchoServer::new(EchoService))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    println!("keygate gRPC example listening on {addr}\n");

    let mut client = EchoClient::connect(format!("http://{addr}")).await?;
    let call = |key: Option<&ApiKey>, msg: &str| {
        let mut req = Request::new(EchoRequest { message: msg.into() });
        if let Some(key) = key {
            let v = MetadataValue::try_from(format!("Bearer {}", key.expose_secret())).expect("keys are ASCII");
            req.metadata_mut().insert("authorization", v);
        }
        req
    };
    let garbage = ApiKey::new("kg_garbage");
    let cases: [(&str, bool, Option<&ApiKey>); 5] = [
        ("Say, no key", false, None),
        ("Say, garbage key", false, Some(&garbage)),
        ("Say, reader key", false, Some(&reader)),
        ("Shout, reader key (needs admin)", true, Some(&reader)),
        ("Shout, admin key", true, Some(&admin)),
    ];
    for (what, shout, key) in cases {
        let req = call(key, "hello");
        let res = if shout { client.shout(req).await } else { client.say(req).await };
        match res {
            Ok(reply) => println!("{what}\n  OK: {:?}\n", reply.into_inner()),
            Err(status) => println!("{what}\n  {:?}: {}\n", status.code(), status.message()),
        }
    }
    server.abort();
    Ok(())
}
