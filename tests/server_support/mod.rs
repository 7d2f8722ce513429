//! Shared setup of the key-service tests: a real server on an ephemeral loopback port
//! over a temporary SQLite file, or over a PostgreSQL schema of its own
//! (`KEYGATE_TEST_POSTGRES_URL`).
#![allow(dead_code)]

pub mod github;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keygate::client::{AdminClient, NewKey};
use keygate::server::{KeyServer, RunningKeyServer};
use serde_json::{Value, json};

pub const SERVICE: &str = "svc-test-token-0123456789abcdefghij";
pub const ADMIN: &str = "adm-test-token-0123456789abcdefghij";

/// Where a test server keeps its data. Clones share it (replicas of one deployment).
#[derive(Clone)]
pub enum TestDb {
    /// A SQLite file in a temporary directory.
    Sqlite(Arc<tempfile::TempDir>),
    /// A PostgreSQL schema created for the test, dropped when the last clone goes.
    Postgres(Arc<PgSchema>),
}

impl TestDb {
    pub fn sqlite() -> Self {
        Self::Sqlite(Arc::new(tempfile::tempdir().unwrap()))
    }

    /// A fresh schema on `KEYGATE_TEST_POSTGRES_URL`; `None` (with a notice) when unset.
    pub async fn postgres() -> Option<Self> {
        PgSchema::create().await.map(|s| Self::Postgres(Arc::new(s)))
    }

    pub fn url(&self) -> String {
        match self {
            Self::Sqlite(dir) => format!("sqlite://{}", dir.path().join("keys.db").display()),
            Self::Postgres(schema) => schema.url(),
        }
    }

    /// Every byte the database keeps at rest: the SQLite file and its WAL; for
    /// PostgreSQL, the schema's table, index and TOAST files after a checkpoint (when
    /// the test role may read them) and every row as text, with BYTEA columns raw.
    pub async fn stored_bytes(&self) -> Vec<u8> {
        match self {
            Self::Sqlite(dir) => {
                let mut bytes = Vec::new();
                for suffix in ["", "-wal", "-shm"] {
                    if let Ok(b) = std::fs::read(dir.path().join(format!("keys.db{suffix}"))) {
                        bytes.extend(b);
                    }
                }
                bytes
            }
            Self::Postgres(schema) => schema.stored_bytes().await,
        }
    }
}

/// A schema of its own on the test PostgreSQL, so that parallel tests see neither each
/// other's rows nor each other's notifications (the channel follows the schema).
pub struct PgSchema {
    pub base: String,
    pub name: String,
}

pub const POSTGRES_ENV: &str = "KEYGATE_TEST_POSTGRES_URL";

impl PgSchema {
    pub async fn create() -> Option<Self> {
        let Ok(base) = std::env::var(POSTGRES_ENV) else {
            eprintln!("{POSTGRES_ENV} is not set: skipping the PostgreSQL part of this test");
            return None;
        };
        let name = format!("kg_test_{:016x}", getrandom::u64().unwrap());
        let mut conn = Self::connect(&base).await;
        sqlx::query(&format!("CREATE SCHEMA {name}")).execute(&mut conn).await.expect("create the test schema");
        Some(Self { base, name })
    }

    async fn connect(base: &str) -> sqlx::PgConnection {
        use sqlx::Connection;
        let connect = sqlx::PgConnection::connect(base);
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!("{POSTGRES_ENV} is set but PostgreSQL cannot be reached: {e}"),
            Err(_) => panic!("{POSTGRES_ENV} is set but PostgreSQL does not answer"),
        }
    }

    /// The base URL with `search_path` set to this schema.
    pub fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-c%20search_path%3D{}", self.base, self.name)
    }

    /// A connection to the base database (search path not set).
    pub async fn admin_connection(&self) -> sqlx::PgConnection {
        Self::connect(&self.base).await
    }

    async fn stored_bytes(&self) -> Vec<u8> {
        let mut conn = self.admin_connection().await;
        let mut bytes = Vec::new();
        // Physical files, readable by a superuser (as on the CI and developer machines).
        let files: Vec<String> = sqlx::query_scalar(
            "SELECT pg_relation_filepath(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'i') \
             UNION ALL SELECT pg_relation_filepath(c.reltoastrelid) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.reltoastrelid <> 0",
        )
        .bind(&self.name)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        if sqlx::query("CHECKPOINT").execute(&mut conn).await.is_ok() {
            for file in files {
                let b: Option<Vec<u8>> = sqlx::query_scalar("SELECT pg_read_binary_file($1, 0, 1073741824, true)")
                    .bind(&file)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap_or(None);
                bytes.extend(b.unwrap_or_default());
            }
        } else {
            eprintln!("not a superuser: checking the rows only, not the files");
        }
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1")
                .bind(&self.name)
                .fetch_all(&mut conn)
                .await
                .unwrap();
        for table in tables {
            let rows: Option<String> = sqlx::query_scalar(&format!(
                "SELECT string_agg(row_to_json(t)::text, E'\\n') FROM {}.{table} t",
                self.name
            ))
            .fetch_one(&mut conn)
            .await
            .unwrap();
            bytes.extend(rows.unwrap_or_default().into_bytes());
        }
        let digests: Vec<Vec<u8>> = sqlx::query_scalar(&format!("SELECT digest FROM {}.key_secrets", self.name))
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
        bytes.extend(digests.concat());
        bytes
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (base, name) = (self.base.clone(), self.name.clone());
        // A runtime of its own: the test's may be gone or busy.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&base).await?;
                sqlx::query("SET lock_timeout = '10s'").execute(&mut conn).await?;
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")).execute(&mut conn).await?;
                conn.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}", self.name);
        }
    }
}

pub struct TestServer {
    pub server: RunningKeyServer,
    pub admin: AdminClient,
    pub http: reqwest::Client,
    pub db: TestDb,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_on(TestDb::sqlite(), |b| b).await
    }

    pub async fn start_in(dir: tempfile::TempDir, configure: impl FnOnce(KeyServer) -> KeyServer) -> Self {
        Self::start_on(TestDb::Sqlite(Arc::new(dir)), configure).await
    }

    pub async fn start_on(db: TestDb, configure: impl FnOnce(KeyServer) -> KeyServer) -> Self {
        let builder = KeyServer::builder()
            .database(db.url())
            .service_token(SERVICE)
            .admin_token(ADMIN)
            .listen("127.0.0.1:0".parse().unwrap());
        let server = configure(builder).start().await.expect("server starts");
        let admin = AdminClient::new(server.url(), ADMIN).unwrap();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        Self { server, admin, http, db }
    }

    /// The SQLite file (SQLite servers only).
    pub fn db_path(&self) -> PathBuf {
        match &self.db {
            TestDb::Sqlite(dir) => dir.path().join("keys.db"),
            TestDb::Postgres(_) => panic!("not a SQLite server"),
        }
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
    /// The response headers of the stream.
    pub headers: reqwest::header::HeaderMap,
    /// The `id:` of the last event read that had one.
    pub last_id: Option<String>,
}

impl Events {
    pub async fn connect(t: &TestServer) -> Self {
        Self::connect_as(t, SERVICE).await
    }

    /// A stream opened with this service token.
    pub async fn connect_as(t: &TestServer, token: &str) -> Self {
        Self::open(t, token, None).await
    }

    /// A stream resumed with `Last-Event-ID: last_event_id`.
    pub async fn resume(t: &TestServer, last_event_id: &str) -> Self {
        Self::open(t, SERVICE, Some(last_event_id)).await
    }

    async fn open(t: &TestServer, token: &str, last_event_id: Option<&str>) -> Self {
        let mut req = t.http_stream().get(t.url("/v1/events")).bearer_auth(token);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let headers = res.headers().clone();
        Self { res, buf: String::new(), headers, last_id: None }
    }

    /// A response header of the stream, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_owned())
    }

    /// The next event as `(name, data)` (comments skipped); `None` when the stream
    /// ends; panics after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<(String, String)> {
        self.within(limit).await.expect("event in time")
    }

    /// Like [`next`](Self::next), but `Err` after `limit` instead of a panic.
    pub async fn within(&mut self, limit: Duration) -> Result<Option<(String, String)>, tokio::time::error::Elapsed> {
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
                    } else if let Some(v) = line.strip_prefix("id:") {
                        self.last_id = Some(v.trim_start().to_owned());
                    }
                }
                if !name.is_empty() || !data.is_empty() {
                    return Ok(Some((name, data.join("\n"))));
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.res.chunk()).await?;
            match chunk.unwrap() {
                Some(bytes) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                None => return Ok(None),
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

/// One request as a middleware saw it, to aggregate the way the edge does.
#[derive(Debug, Clone)]
pub struct Req {
    pub minute: i64,
    pub key_id: Option<String>,
    pub route: &'static str,
    pub method: &'static str,
    pub outcome: keygate::Outcome,
    pub status: u16,
    pub latency_us: u64,
}

/// Rows as the edge sends them: one per (minute, key, route, method, outcome).
pub fn aggregate(reqs: &[Req]) -> Vec<keygate::AggregateRow> {
    use std::collections::BTreeMap;
    let mut rows: BTreeMap<(i64, Option<String>, &str, &str, &str), keygate::AggregateRow> = BTreeMap::new();
    for r in reqs {
        let key = (r.minute, r.key_id.clone(), r.route, r.method, r.outcome.as_str());
        let row = rows.entry(key).or_insert_with(|| keygate::AggregateRow {
            minute: r.minute,
            key_id: r.key_id.as_deref().map(Arc::from),
            route: r.route.into(),
            method: r.method.into(),
            outcome: r.outcome,
            requests: 0,
            status: keygate::StatusCounts::default(),
            latency: keygate::LatencyHistogram::new(),
            last_at_ms: r.minute * 1000,
        });
        row.requests += 1;
        row.status.add(r.status);
        row.latency.record(Duration::from_micros(r.latency_us));
        row.last_at_ms = r.minute * 1000 + 30_000;
    }
    rows.into_values().collect()
}

/// A fresh batch id: 32 lowercase hex digits.
pub fn batch_id() -> String {
    format!("{:016x}{:016x}", getrandom::u64().unwrap(), getrandom::u64().unwrap())
}

/// An aggregate batch of `rows` with a fresh id.
pub fn aggregate_batch(rows: Vec<keygate::AggregateRow>) -> keygate::AggregateBatch {
    keygate::AggregateBatch {
        batch_id: batch_id(),
        rows,
        networks: Vec::new(),
        dropped: 0,
        overflowed: 0,
        networks_dropped: 0,
    }
}

/// The start of the current minute, Unix seconds.
pub fn this_minute() -> i64 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    now - now.rem_euclid(60)
}

impl TestServer {
    /// `POST /v1/usage` with the service token: the status and the answer's JSON.
    pub async fn post_usage(&self, body: &impl serde::Serialize) -> (u16, Value) {
        let res = self.http.post(self.url("/v1/usage")).bearer_auth(SERVICE).json(body).send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }
}
