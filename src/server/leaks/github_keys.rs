//! GitHub's secret scanning public keys: fetched from the keys document, cached by
//! identifier, and used to check a report's signature.
//!
//! The document (`GET https://api.github.com/meta/public_keys/secret_scanning` by
//! default) is `{"public_keys": [{"key_identifier", "key": "<PEM SPKI>", "is_current"}]}`.
//! A report names its key by `Github-Public-Key-Identifier` and carries
//! `Github-Public-Key-Signature`: base64 of the DER ECDSA P-256 signature over SHA-256
//! of the raw body.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use serde::Deserialize;

use crate::transport::{ClientOptions, describe, http_client, read_body};

/// GitHub's keys document.
pub const GITHUB_KEYS_URL: &str = "https://api.github.com/meta/public_keys/secret_scanning";
/// Largest keys document read.
const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Most keys kept from one document.
const MAX_KEYS: usize = 64;
/// Deadline of one fetch of the document.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a signature was not accepted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SignatureError {
    /// Missing header, not base64, not DER, or not a signature of this body.
    #[error("{0}")]
    Bad(&'static str),
    /// No key with this identifier in the document, even after a refetch.
    #[error("unknown public key identifier")]
    UnknownKey,
    /// The keys document could not be fetched or read (and the key is not cached).
    #[error("the public keys document could not be read: {0}")]
    Fetch(String),
}

/// The cached keys; one fetch at a time.
pub(crate) struct GithubKeys {
    url: String,
    refetch_every: Duration,
    client: reqwest::Client,
    keys: tokio::sync::Mutex<Cached>,
}

#[derive(Default)]
struct Cached {
    by_id: HashMap<String, VerifyingKey>,
    fetched_at: Option<Instant>,
}

#[derive(Deserialize)]
struct Document {
    public_keys: Vec<DocumentKey>,
}

#[derive(Deserialize)]
struct DocumentKey {
    key_identifier: String,
    key: String,
}

impl GithubKeys {
    pub(crate) fn new(url: String, refetch_every: Duration) -> Result<Self, reqwest::Error> {
        // keygate's client: never follows a redirect (a document moved elsewhere is an
        // operator's change), bounded in time.
        let client = http_client(ClientOptions {
            connect_timeout: Duration::from_secs(2),
            timeout: Some(FETCH_TIMEOUT),
            tcp_keepalive: None,
        })?;
        Ok(Self { url, refetch_every, client, keys: tokio::sync::Mutex::new(Cached::default()) })
    }

    /// Checks that `signature` (the header's base64) is the key `identifier`'s signature
    /// of `body`.
    pub(crate) async fn verify(&self, identifier: &str, signature: &str, body: &[u8]) -> Result<(), SignatureError> {
        let der = base64::engine::general_purpose::STANDARD
            .decode(signature.trim())
            .map_err(|_| SignatureError::Bad("the signature is not base64"))?;
        let signature = Signature::from_der(&der).map_err(|_| SignatureError::Bad("the signature is not DER ECDSA"))?;
        let key = self.key(identifier).await?;
        key.verify(body, &signature).map_err(|_| SignatureError::Bad("the signature does not match the body"))
    }

    async fn key(&self, identifier: &str) -> Result<VerifyingKey, SignatureError> {
        let mut cached = self.keys.lock().await;
        if let Some(key) = cached.by_id.get(identifier) {
            return Ok(*key);
        }
        if cached.fetched_at.is_some_and(|at| at.elapsed() < self.refetch_every) {
            return Err(SignatureError::UnknownKey);
        }
        // Counted as a fetch even when it fails: a dead URL is not hammered either.
        cached.fetched_at = Some(Instant::now());
        let by_id = self.fetch().await.map_err(SignatureError::Fetch)?;
        tracing::info!(keys = by_id.len(), "secret scanning: fetched GitHub's public keys");
        cached.by_id = by_id;
        cached.by_id.get(identifier).copied().ok_or(SignatureError::UnknownKey)
    }

    async fn fetch(&self) -> Result<HashMap<String, VerifyingKey>, String> {
        let response = self
            .client
            .get(&self.url)
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| describe(&e))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(format!("HTTP {}", response.status().as_u16()));
        }
        let body = read_body(response, MAX_DOCUMENT_BYTES).await.map_err(|e| e.to_string())?;
        let document: Document = serde_json::from_slice(&body).map_err(|e| format!("not a keys document: {e}"))?;
        let mut keys = HashMap::new();
        for entry in document.public_keys.into_iter().take(MAX_KEYS) {
            match VerifyingKey::from_public_key_pem(&entry.key) {
                Ok(key) => {
                    keys.insert(entry.key_identifier, key);
                }
                Err(_) => {
                    tracing::warn!(id = %entry.key_identifier, "secret scanning: a public key is not P-256 PEM; skipped")
                }
            }
        }
        Ok(keys)
    }
}
