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

/// A minimal SSE reader over a real `GET /v1/events` connection.
pub struct Events {
    res: reqwest::Response,
    buf: String,
}

impl Events {
    pub async fn connect(t: &TestServer) -> Self {
        let res = t.http_stream().get(t.url("/v1/events")).bearer_auth(SERVICE).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        Self { res, buf: String::new() }
    }

    /// The next event as `(name, data)` (comments skipped); `None` when the stream
    /// ends; panics after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<(String, String)> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut name, mut data) = (String::new(), Vec::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim_start().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.trim_start().to_owned());
                    }
                }
                if !name.is_empty() || !data.is_empty() {
                    return Some((name, data.join("\n")));
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.res.chunk()).await.expect("event in time");
            match chunk.unwrap() {
                Some(bytes) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                None => return None,
            }
        }
    }

    /// The next event that is not a heartbeat.
    pub async fn next_change(&mut self, limit: Duration) -> Option<(String, Value)> {
        loop {
            let (name, data) = self.next(limit).await?;
            if name != "heartbeat" {
                return Some((name, serde_json::from_str(&data).unwrap()));
            }
        }
    }
}

impl TestServer {
    /// A client without a whole-request timeout, for streams.
    pub fn http_stream(&self) -> reqwest::Client {
        reqwest::Client::new()
    }
}
