//! Signing as GitHub's secret scanning does: P-256 keys, the public keys document served
//! on loopback (its fetches counted), and base64 DER signatures of a report's body.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey as _, LineEnding};
use serde_json::{Value, json};

pub fn signing_key() -> SigningKey {
    loop {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).unwrap();
        if let Ok(key) = SigningKey::from_bytes(&bytes.into()) {
            return key;
        }
    }
}

/// The public keys document, served on loopback; counts its fetches.
#[derive(Clone, Default)]
pub struct KeysDocument {
    keys: Arc<Mutex<Vec<(String, SigningKey)>>>,
    fetches: Arc<Mutex<u32>>,
}

impl KeysDocument {
    pub fn add(&self, id: &str) -> SigningKey {
        let key = signing_key();
        self.keys.lock().unwrap().push((id.to_owned(), key.clone()));
        key
    }

    pub fn fetches(&self) -> u32 {
        *self.fetches.lock().unwrap()
    }

    pub async fn serve(&self) -> String {
        let doc = self.clone();
        let app = axum::Router::new().route(
            "/meta/public_keys/secret_scanning",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move {
                    *doc.fetches.lock().unwrap() += 1;
                    let keys: Vec<Value> = doc
                        .keys
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|(id, key)| {
                            let pem = key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
                            json!({ "key_identifier": id, "key": pem, "is_current": true })
                        })
                        .collect();
                    axum::Json(json!({ "public_keys": keys }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/meta/public_keys/secret_scanning", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }
}

pub fn sign(key: &SigningKey, body: &[u8]) -> String {
    let signature: Signature = key.sign(body);
    base64::engine::general_purpose::STANDARD.encode(signature.to_der().as_bytes())
}
