//! HttpVerifier against a real key service on loopback: answers, error kinds, the one
//! retry on reset, round robin and failover across several URLs, and no secrets in logs.

mod remote_support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keygate::{ApiKey, HttpVerifier, Reason, Verdict, Verifier, VerifyError};
use remote_support::{FaultServer, Mode, TOKEN};

const TIMEOUT: Duration = Duration::from_millis(500);
const LIMIT: Duration = Duration::from_secs(10);

fn verifier(urls: Vec<String>) -> HttpVerifier {
    HttpVerifier::builder(urls).service_token(TOKEN).timeout(TIMEOUT).build().unwrap()
}

async fn verify(v: &HttpVerifier, key: &ApiKey) -> Result<Verdict, VerifyError> {
    tokio::time::timeout(LIMIT, v.verify(key)).await.expect("verify hung")
}

#[tokio::test]
async fn valid_and_invalid_answers() {
    let server = FaultServer::start().await;
    let key = ApiKey::generate("kg").unwrap();
    server.add_key(&key, "key_1", &["reports:read", "billing:*"]);
    let v = verifier(vec![server.url()]);
    match verify(&v, &key).await {
        Ok(Verdict::Valid(p)) => {
            assert_eq!((p.key_id(), p.owner(), p.environment()), ("key_1", "acme", "test"));
            assert_eq!(p.scopes().len(), 2);
        }
        other => panic!("{other:?}"),
    }
    let unknown = ApiKey::generate("kg").unwrap();
    assert!(matches!(verify(&v, &unknown).await, Ok(Verdict::Invalid { reason: Reason::NotFound, .. })));
    server.revoke_silently(&key);
    assert!(matches!(verify(&v, &key).await, Ok(Verdict::Invalid { reason: Reason::Revoked, .. })));
}

#[tokio::test]
async fn a_wrong_service_token_is_an_error_not_a_denial() {
    let server = FaultServer::start().await;
    let v = HttpVerifier::builder(server.url()).service_token("wrong").build().unwrap();
    let key = ApiKey::generate("kg").unwrap();
    assert!(matches!(verify(&v, &key).await, Err(VerifyError::Status(401))));
}

#[tokio::test]
async fn error_kinds_and_retries() {
    let server = FaultServer::start().await;
    let key = ApiKey::generate("kg").unwrap();
    let v = verifier(vec![server.url()]);

    server.set(Mode::Status500);
    assert!(matches!(verify(&v, &key).await, Err(VerifyError::Status(500))));
    assert_eq!(server.calls(), 1, "no retry on 500");

    server.set(Mode::Malformed);
    assert!(matches!(verify(&v, &key).await, Err(VerifyError::BadAnswer(_))));
    server.set(Mode::UnknownCode);
    assert!(matches!(verify(&v, &key).await, Err(VerifyError::BadAnswer(_))));
    server.set(Mode::Oversized);
    assert!(matches!(verify(&v, &key).await, Err(VerifyError::BadAnswer(_))));
    assert_eq!(server.calls(), 4);

    server.set(Mode::Reset);
    assert!(matches!(verify(&v, &key).await, Err(VerifyError::Unreachable(_))));
    assert_eq!(server.calls(), 6, "exactly one retry on reset");

    server.set(Mode::Hang);
    let started = Instant::now();
    assert!(matches!(verify(&v, &key).await, Err(VerifyError::Timeout(_))));
    assert!(started.elapsed() < TIMEOUT + Duration::from_millis(300), "{:?}", started.elapsed());
    assert_eq!(server.calls(), 7, "no retry on timeout");

    server.stop();
    let started = Instant::now();
    assert!(matches!(verify(&v, &key).await, Err(VerifyError::Unreachable(_))));
    assert!(started.elapsed() < TIMEOUT);
}

#[tokio::test]
async fn calls_go_round_robin_and_fail_over() {
    let a = FaultServer::start().await;
    let b = FaultServer::start().await;
    let key = ApiKey::generate("kg").unwrap();
    a.add_key(&key, "key_1", &[]);
    b.add_key(&key, "key_1", &[]);
    let cooldown = Duration::from_secs(2);
    let v = HttpVerifier::builder([a.url(), b.url()])
        .service_token(TOKEN)
        .timeout(TIMEOUT)
        .failover_cooldown(cooldown)
        .build()
        .unwrap();
    for _ in 0..10 {
        assert!(matches!(verify(&v, &key).await, Ok(Verdict::Valid(_))));
    }
    assert_eq!((a.calls(), b.calls()), (5, 5));

    a.stop();
    for _ in 0..10 {
        assert!(matches!(verify(&v, &key).await, Ok(Verdict::Valid(_))), "no request fails while b is up");
    }
    assert_eq!((a.calls(), b.calls()), (5, 15));

    // Back, but cooling down: tried only after b.
    let stopped_at = Instant::now();
    a.restart().await;
    assert!(stopped_at.elapsed() < cooldown / 2, "restart took {:?}", stopped_at.elapsed());
    for _ in 0..4 {
        assert!(matches!(verify(&v, &key).await, Ok(Verdict::Valid(_))));
    }
    assert_eq!((a.calls(), b.calls()), (5, 19));

    // Once cooled down it takes its share again. A replica that answers badly is not
    // skipped: that is an answer, not an outage.
    tokio::time::sleep(cooldown.saturating_sub(stopped_at.elapsed())).await;
    a.set(Mode::Status500);
    let results: Vec<_> = futures_collect(&v, &key, 4).await;
    assert_eq!(results.iter().filter(|r| matches!(r, Err(VerifyError::Status(500)))).count(), 2);

    b.stop();
    a.stop();
    assert!(matches!(verify(&v, &key).await, Err(VerifyError::Unreachable(_))));
}

async fn futures_collect(v: &HttpVerifier, key: &ApiKey, n: usize) -> Vec<Result<Verdict, VerifyError>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(verify(v, key).await);
    }
    out
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every path, traced at TRACE level including hyper and reqwest: neither the key nor
/// the service token shows up.
#[test]
fn no_key_or_token_in_logs_or_debug() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let key = ApiKey::generate("kg").unwrap();
    rt.block_on(async {
        let server = FaultServer::start().await;
        server.add_key(&key, "key_1", &[]);
        let v = verifier(vec![server.url()]);
        let cache = keygate::CachedVerifier::builder(v.clone()).positive_ttl(Duration::ZERO).build();
        for mode in [Mode::Ok, Mode::Status500, Mode::Reset, Mode::Malformed, Mode::UnknownCode, Mode::Hang] {
            server.set(mode);
            let _ = cache.verify(&key).await;
        }
        server.stop();
        let _ = cache.verify(&key).await;
        tracing::info!(verifier = ?v, cache = ?cache, "debug output");
    });
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("debug output"), "the capture works");
    assert!(!logs.contains(&key.expose_secret()[3..]), "key in logs");
    assert!(!logs.contains(TOKEN), "token in logs");
}
