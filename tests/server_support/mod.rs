//! Shared setup of the key-service tests: a real server on an ephemeral loopback port
//! over a temporary SQLite file.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use keygate::server::{AdminClient, KeyServer, NewKey, RunningKeyServer};
use serde_json::{Value, json};

pub const SERVICE: &str = "svc-test-token";
pub const ADMIN: &str = "adm-test-token";

pub struct TestServer {
    pub server: RunningKeyServer,
    pub admin: AdminClient,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, |b| b).await
    }

    pub async fn start_in(dir: tempfile::TempDir, configure: impl FnOnce(KeyServer) -> KeyServer) -> Self {
        let url = format!("sqlite://{}", dir.path().join("keys.db").display());
        let builder = KeyServer::builder()
            .database(url)
            .service_token(SERVICE)
            .admin_token(ADMIN)
            .listen("127.0.0.1:0".parse().unwrap());
        let server = configure(builder).start().await.expect("server starts");
        let admin = AdminClient::new(server.url(), ADMIN).unwrap();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        Self { server, admin, http, dir }
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("keys.db")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    /// `POST /v1/keys/verify` with the service token; the answer's JSON.
    pub async fn verify(&self, key: &str) -> Value {
        let res = self
            .http
            .post(self.url("/v1/keys/verify"))
            .bearer_auth(SERVICE)
            .json(&json!({ "key": key }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.json().await.unwrap()
    }

    pub async fn code(&self, key: &str) -> String {
        let v = self.verify(key).await;
        if v["valid"] == true { "VALID".into() } else { v["code"].as_str().unwrap().to_owned() }
    }
}

pub fn new_key(owner: &str, scopes: &[&str]) -> NewKey {
    NewKey {
        owner: owner.into(),
        name: format!("{owner} key"),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Polls `f` every 50 ms until it is true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
