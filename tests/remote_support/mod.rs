//! A real HTTP/1.1 key service on 127.0.0.1 that misbehaves on command, written on
//! raw tokio sockets so that every failure (hang, reset, close, garbage) is exact.
//! It serves `POST /v1/keys/verify` and `GET /v1/events` (Server-Sent Events).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keygate::ApiKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinSet;

pub const TOKEN: &str = "test-service-token";

/// What the server does with the next verify request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Answers per protocol: valid for added keys, NOT_FOUND otherwise.
    Ok = 0,
    /// Reads the request and never answers.
    Hang,
    /// 500 with a JSON error body.
    Status500,
    /// Reads the request, then resets the connection (RST).
    Reset,
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 `{"valid": false, "code": "WHATEVER"}`.
    UnknownCode,
    /// 200 with a body of 1 MiB.
    Oversized,
}

impl Mode {
    fn from_u8(v: u8) -> Self {
        [Self::Ok, Self::Hang, Self::Status500, Self::Reset, Self::Malformed, Self::UnknownCode, Self::Oversized]
            [v as usize]
    }
}

struct State {
    mode: AtomicU8,
    verify_calls: AtomicUsize,
    event_connections: AtomicUsize,
    keys: Mutex<HashMap<String, String>>,
    events: broadcast::Sender<String>,
    heartbeat: Duration,
}

pub struct FaultServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    tasks: Mutex<Option<Arc<Mutex<JoinSet<()>>>>>,
}

impl FaultServer {
    pub async fn start() -> Self {
        Self::start_with_heartbeat(Duration::from_secs(15)).await
    }

    pub async fn start_with_heartbeat(heartbeat: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            mode: AtomicU8::new(Mode::Ok as u8),
            verify_calls: AtomicUsize::new(0),
            event_connections: AtomicUsize::new(0),
            keys: Mutex::new(HashMap::new()),
            events: broadcast::channel(1024).0,
            heartbeat,
        });
        let server = Self { addr, state, tasks: Mutex::new(None) };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: TcpListener) {
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let state = Arc::clone(&self.state);
        let conns = Arc::clone(&tasks);
        tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let state = Arc::clone(&state);
                conns.lock().unwrap().spawn(connection(stream, state));
            }
        });
        *self.tasks.lock().unwrap() = Some(tasks);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        self.state.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn calls(&self) -> usize {
        self.state.verify_calls.load(Ordering::SeqCst)
    }

    pub fn event_connections(&self) -> usize {
        self.state.event_connections.load(Ordering::SeqCst)
    }

    /// Registers a key as valid with this answer's fields.
    pub fn add_key(&self, key: &ApiKey, key_id: &str, scopes: &[&str]) {
        let answer = serde_json::json!({
            "valid": true, "key_id": key_id, "owner": "acme", "name": "test", "scopes": scopes,
            "roles": [], "environment": "test", "expires_at": null, "meta": {}, "ratelimit": null,
        });
        self.keys().lock().unwrap().insert(key.digest().to_hex(), answer.to_string());
    }

    /// Answers `REVOKED` for this key from now on and announces it on the stream.
    pub fn revoke(&self, key: &ApiKey, key_id: &str) {
        self.keys().lock().unwrap().insert(key.digest().to_hex(), r#"{"valid":false,"code":"REVOKED"}"#.to_owned());
        self.send_event("revoked", &format!(r#"{{"key_id":"{key_id}"}}"#));
    }

    /// Like `revoke`, without telling anyone.
    pub fn revoke_silently(&self, key: &ApiKey) {
        self.keys().lock().unwrap().insert(key.digest().to_hex(), r#"{"valid":false,"code":"REVOKED"}"#.to_owned());
    }

    pub fn send_event(&self, event: &str, data: &str) {
        let _ = self.state.events.send(format!("event: {event}\ndata: {data}\n\n"));
    }

    pub fn send_raw(&self, raw: &str) {
        let _ = self.state.events.send(raw.to_owned());
    }

    /// Stops listening and drops every open connection: new connections are refused.
    pub fn stop(&self) {
        if let Some(tasks) = self.tasks.lock().unwrap().take() {
            tasks.lock().unwrap().abort_all();
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&self) {
        self.stop();
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    /// Ends every open event stream (the listener stays up).
    pub fn drop_streams(&self) {
        let _ = self.state.events.send(String::from("\u{0}close"));
    }

    fn keys(&self) -> &Mutex<HashMap<String, String>> {
        &self.state.keys
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let mut length = 0;
    let mut authorization = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().ok()?,
                "authorization" => authorization = Some(value.to_owned()),
                _ => {}
            }
        }
    }
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Some(Request { method, path, authorization, body })
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await
}

async fn connection(mut stream: TcpStream, state: Arc<State>) {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf).await {
        if req.authorization.as_deref() != Some(&format!("Bearer {TOKEN}")) {
            let _ = respond(&mut stream, "401 Unauthorized", r#"{"error":"unauthorized"}"#).await;
            continue;
        }
        match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/v1/events") => return events(stream, state).await,
            ("POST", "/v1/keys/verify") => {}
            _ => {
                let _ = respond(&mut stream, "404 Not Found", r#"{"error":"not_found"}"#).await;
                continue;
            }
        }
        state.verify_calls.fetch_add(1, Ordering::SeqCst);
        let result = match Mode::from_u8(state.mode.load(Ordering::SeqCst)) {
            Mode::Ok => {
                // Keys are registered by digest, as the middleware sends them.
                let key = serde_json::from_slice::<keygate::wire::VerifyRequest>(&req.body)
                    .map(|r| r.digest().to_hex())
                    .unwrap_or_default();
                let answer = state
                    .keys
                    .lock()
                    .unwrap()
                    .get(&key)
                    .cloned()
                    .unwrap_or_else(|| r#"{"valid":false,"code":"NOT_FOUND"}"#.to_owned());
                respond(&mut stream, "200 OK", &answer).await
            }
            Mode::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return;
            }
            Mode::Status500 => respond(&mut stream, "500 Internal Server Error", r#"{"error":"boom"}"#).await,
            Mode::Reset => {
                let _ = stream.set_zero_linger();
                return;
            }
            Mode::Malformed => respond(&mut stream, "200 OK", r#"{"valid": tru"#).await,
            Mode::UnknownCode => respond(&mut stream, "200 OK", r#"{"valid":false,"code":"WHATEVER"}"#).await,
            Mode::Oversized => {
                let big = format!(r#"{{"valid":false,"code":"NOT_FOUND","pad":"{}"}}"#, "x".repeat(1 << 20));
                respond(&mut stream, "200 OK", &big).await
            }
        };
        if result.is_err() {
            return;
        }
    }
}

async fn events(mut stream: TcpStream, state: Arc<State>) {
    let mut rx = state.events.subscribe();
    state.event_connections.fetch_add(1, Ordering::SeqCst);
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() || stream.write_all(b": connected\n\n").await.is_err() {
        return;
    }
    let mut heartbeat = tokio::time::interval(state.heartbeat);
    heartbeat.tick().await;
    loop {
        let out = tokio::select! {
            _ = heartbeat.tick() => ": heartbeat\n\n".to_owned(),
            msg = rx.recv() => match msg {
                Ok(m) if m == "\u{0}close" => return,
                Ok(m) => m,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            },
        };
        if stream.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}
