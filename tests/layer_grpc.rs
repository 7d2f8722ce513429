//! The same layer in front of a tonic service, answering in gRPC terms.

#[path = "../examples/support/echo_proto.rs"]
mod echo;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use echo::echo_client::EchoClient;
use echo::echo_server::{Echo, EchoServer};
use echo::{EchoReply, EchoRequest};
use keygate::{
    ApiKey, ApiKeyLayer, Principal, RequireScopes, ScopeSet, StaticVerifier, Verdict, Verifier, VerifyError,
};
use time::OffsetDateTime;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

struct Svc;

#[tonic::async_trait]
impl Echo for Svc {
    async fn say(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let p = req.extensions().get::<Principal>().cloned().ok_or_else(|| Status::internal("no principal"))?;
        // The handler never sees the credential.
        if req.metadata().get("authorization").is_some() || req.metadata().get("x-api-key").is_some() {
            return Err(Status::internal("credential leaked to the service"));
        }
        Ok(Response::new(EchoReply { message: req.into_inner().message, key_id: p.key_id().to_owned() }))
    }

    async fn shout(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply { message: req.into_inner().message.to_uppercase(), key_id: String::new() }))
    }
}

struct Counting(StaticVerifier, AtomicUsize);

impl Verifier for Counting {
    async fn verify(&self, key: &ApiKey) -> Result<Verdict, VerifyError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.verify(key).await
    }
}

struct Down;

impl Verifier for Down {
    async fn verify(&self, _: &ApiKey) -> Result<Verdict, VerifyError> {
        Err(VerifyError::Timeout(Duration::from_secs(2)))
    }
}

async fn serve<V: Verifier>(verifier: Arc<V>) -> Channel {
    serve_with(verifier, RequireScopes::methods().method("/echo.Echo/Say", "echo:say")).await
}

async fn serve_with<V: Verifier>(verifier: Arc<V>, policy: RequireScopes) -> Channel {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(ApiKeyLayer::from_arc(verifier))
            .layer(policy)
            .add_service(EchoServer::new(Svc))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap()
    });
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

struct Keys {
    good: ApiKey,
    no_scope: ApiKey,
    expired: ApiKey,
    revoked: ApiKey,
}

async fn setup() -> (EchoClient<Channel>, Keys, Arc<Counting>) {
    let keys = Keys {
        good: ApiKey::generate("kg").unwrap(),
        no_scope: ApiKey::generate("kg").unwrap(),
        expired: ApiKey::generate("kg").unwrap(),
        revoked: ApiKey::generate("kg").unwrap(),
    };
    let scoped = |id: &str| Principal::builder(id).scopes(ScopeSet::parse(["echo:say"]).unwrap());
    let stat = StaticVerifier::new()
        .with_key(&keys.good, scoped("key_good").build())
        .with_key(&keys.no_scope, Principal::builder("key_none").build())
        .with_key(&keys.revoked, scoped("key_revoked").build())
        .with_key(
            &keys.expired,
            scoped("key_expired").expires_at(Some(OffsetDateTime::now_utc() - Duration::from_secs(1))).build(),
        );
    stat.revoke("key_revoked");
    let verifier = Arc::new(Counting(stat, AtomicUsize::new(0)));
    (EchoClient::new(serve(verifier.clone()).await), keys, verifier)
}

fn with(header: &'static str, value: String, msg: &str) -> Request<EchoRequest> {
    let mut req = Request::new(EchoRequest { message: msg.into() });
    req.metadata_mut().insert(header, MetadataValue::try_from(value).unwrap());
    req
}

fn bearer(key: &ApiKey) -> String {
    format!("Bearer {}", key.expose_secret())
}

#[tokio::test]
async fn good_key_reaches_the_service_with_its_principal() {
    let (mut client, keys, _) = setup().await;
    let reply = client.say(with("authorization", bearer(&keys.good), "hi")).await.unwrap().into_inner();
    assert_eq!((reply.message.as_str(), reply.key_id.as_str()), ("hi", "key_good"));
    let reply = client.say(with("x-api-key", keys.good.expose_secret().into(), "yo")).await.unwrap();
    assert_eq!(reply.into_inner().message, "yo");
}

#[tokio::test]
async fn rejections_carry_grpc_status_codes() {
    let (mut client, keys, verifier) = setup().await;

    let status = client.say(Request::new(EchoRequest { message: "x".into() })).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), "no API key was presented");

    for bad in ["Bearer garbage".to_owned(), bearer(&keys.revoked), format!("Bearer {}x", keys.good.expose_secret())] {
        let status = client.say(with("authorization", bad, "x")).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(status.message(), "the API key is not valid");
    }

    let status = client.say(with("authorization", bearer(&keys.expired), "x")).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::Unauthenticated, "the API key has expired"));

    let status = client.say(with("authorization", bearer(&keys.no_scope), "x")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("echo:say"), "{}", status.message());

    // Shout is not in the method map: denied by default, even for a good key.
    let status = client.shout(with("authorization", bearer(&keys.good), "x")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut req = with("authorization", bearer(&keys.good), "x");
    req.metadata_mut().insert("x-api-key", MetadataValue::try_from(keys.good.expose_secret()).unwrap());
    let status = client.say(req).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Revoked, expired, no-scope and the unlisted method were verified; no key, garbage,
    // the bad checksum and the conflict never reached the verifier.
    assert_eq!(verifier.1.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn key_service_down_is_unavailable() {
    let mut client = EchoClient::new(serve(Arc::new(Down)).await);
    let key = ApiKey::generate("kg").unwrap();
    let status = client.say(with("authorization", bearer(&key), "x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
}

#[tokio::test]
async fn role_requirements_grant_the_role_and_denials_name_it() {
    let admin = ApiKey::generate("kg").unwrap();
    let reader = ApiKey::generate("kg").unwrap();
    let stat = StaticVerifier::new()
        .with_key(&admin, Principal::builder("key_admin").roles(["admin"]).build())
        .with_key(&reader, Principal::builder("key_reader").scopes(ScopeSet::parse(["echo:say"]).unwrap()).build());
    let policy = RequireScopes::methods()
        .method("/echo.Echo/Say", "role(admin)")
        .method("/echo.Echo/Shout", "echo:say AND role(admin)");
    let mut client = EchoClient::new(serve_with(Arc::new(stat), policy).await);

    let reply = client.say(with("authorization", bearer(&admin), "hi")).await.unwrap().into_inner();
    assert_eq!(reply.key_id, "key_admin");
    let status = client.say(with("authorization", bearer(&reader), "hi")).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::PermissionDenied, "the API key lacks the required role: admin")
    );
    // Both parts are needed: either key alone is denied, and told the whole requirement.
    for key in [&admin, &reader] {
        let status = client.shout(with("authorization", bearer(key), "hi")).await.unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::PermissionDenied, "the API key does not meet the requirement: echo:say AND role(admin)")
        );
    }
}
