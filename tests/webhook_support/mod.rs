//! A webhook receiver for the tests: a small axum server on 127.0.0.1:0 that checks
//! the signature of every delivery itself (HMAC-SHA256 with the `hmac` crate, as the
//! README tells receivers to), and can answer 500 to each event's first attempts.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// What one receiver saw.
#[derive(Default)]
pub struct Seen {
    /// Every request, in order: (event id header, accepted).
    pub attempts: Vec<(String, bool)>,
    /// The deliveries answered 2xx, in order: the parsed body.
    pub delivered: Vec<Value>,
    /// Requests whose signature did not verify (or had none).
    pub bad_signatures: usize,
    /// The raw bodies of the accepted deliveries.
    pub raw: Vec<String>,
}

struct Inner {
    secret: Mutex<Option<String>>,
    fail_first: u32,
    seen: Mutex<Seen>,
}

/// A running receiver.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Receiver {
    /// A receiver answering 500 to the first `fail_first` attempts of each event.
    pub async fn start(fail_first: u32) -> Self {
        let inner = Arc::new(Inner { secret: Mutex::new(None), fail_first, seen: Mutex::new(Seen::default()) });
        let app = Router::new().route("/hook", post(receive)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The endpoint's secret, once the key service told it.
    pub fn set_secret(&self, secret: &str) {
        *self.inner.secret.lock().unwrap() = Some(secret.to_owned());
    }

    pub fn with<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.inner.seen.lock().unwrap())
    }

    /// The delivered events' `(id, type)`, in order.
    pub fn delivered(&self) -> Vec<(String, String)> {
        self.with(|s| {
            s.delivered
                .iter()
                .map(|e| (e["id"].as_str().unwrap().to_owned(), e["type"].as_str().unwrap().to_owned()))
                .collect()
        })
    }
}

/// Verifies `t=<t>,v1=<hex>` over `"<t>.<body>"`, within 5 minutes of now.
pub fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let (mut t, mut v1) = (None, None);
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = Some(v.to_owned()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if (now - t).abs() > 300 || v1.len() != 64 {
        return false;
    }
    let Ok(expected) =
        (0..64).step_by(2).map(|i| u8::from_str_radix(&v1[i..i + 2], 16)).collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

async fn receive(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let event_id = headers.get("keygate-event-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let signature = headers.get("keygate-signature").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let secret = inner.secret.lock().unwrap().clone();
    let mut seen = inner.seen.lock().unwrap();
    let signed = secret.is_some_and(|s| verify(&s, signature, &body));
    if !signed {
        seen.bad_signatures += 1;
        seen.attempts.push((event_id, false));
        return StatusCode::BAD_REQUEST;
    }
    let earlier = seen.attempts.iter().filter(|(id, _)| *id == event_id).count() as u32;
    if earlier < inner.fail_first {
        seen.attempts.push((event_id, false));
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    seen.attempts.push((event_id, true));
    let event: Value = serde_json::from_slice(&body).unwrap();
    seen.delivered.push(event);
    seen.raw.push(String::from_utf8_lossy(&body).into_owned());
    StatusCode::NO_CONTENT
}

/// How many times each id occurs.
pub fn counts(ids: impl IntoIterator<Item = String>) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for id in ids {
        *out.entry(id).or_default() += 1;
    }
    out
}
