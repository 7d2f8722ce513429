//! The fault matrix: ApiKeyLayer + CachedVerifier<HttpVerifier> in front of a real key
//! service on loopback that stops, hangs, answers 500, resets connections, answers
//! garbage or an unknown code, or answers too much. Each cell is its own test:
//!
//! - cold cache → 503 with `Retry-After`, within the verifier's timeout plus a margin;
//! - warm cache inside the stale window → 200, and the stale counter moves;
//! - warm cache past the window → 503.

mod remote_support;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, StatusCode, header};
use keygate::{ApiKey, ApiKeyLayer, CachedVerifier, HttpVerifier, Principal};
use remote_support::{FaultServer, Mode, TOKEN};
use tower::ServiceExt;

const TIMEOUT: Duration = Duration::from_millis(500);
const TTL: Duration = Duration::from_millis(200);
const STALE: Duration = Duration::from_secs(1);
const MARGIN: Duration = Duration::from_secs(1);
const CELL_LIMIT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug)]
enum Fault {
    Stop,
    Mode(Mode),
}

struct Rig {
    server: FaultServer,
    cache: CachedVerifier<HttpVerifier>,
    app: Router,
    key: ApiKey,
}

async fn rig() -> Rig {
    let server = FaultServer::start().await;
    let key = ApiKey::generate("kg").unwrap();
    server.add_key(&key, "key_1", &["reports:read"]);
    let http = HttpVerifier::builder(server.url()).service_token(TOKEN).timeout(TIMEOUT).build().unwrap();
    let cache = CachedVerifier::builder(http)
        .positive_ttl(TTL)
        .negative_ttl(TTL)
        .stale_if_error(STALE)
        .stale_retry_interval(Duration::ZERO)
        .build();
    let app = Router::new()
        .route("/reports", get(|p: Principal| async move { p.key_id().to_owned() }))
        .layer(ApiKeyLayer::new(cache.clone()));
    Rig { server, cache, app, key }
}

impl Rig {
    async fn call(&self) -> (StatusCode, Option<String>, Duration) {
        let req = Request::get("/reports")
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key.expose_secret()))
            .body(Body::empty())
            .unwrap();
        let started = Instant::now();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let retry_after = res.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_owned());
        (res.status(), retry_after, started.elapsed())
    }

    fn apply(&self, fault: Fault) {
        match fault {
            Fault::Stop => self.server.stop(),
            Fault::Mode(mode) => self.server.set(mode),
        }
    }
}

async fn cold(fault: Fault) {
    let rig = rig().await;
    rig.apply(fault);
    let (status, retry_after, took) = rig.call().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{fault:?}");
    assert!(retry_after.is_some(), "503 carries Retry-After");
    assert!(took <= TIMEOUT + MARGIN, "{fault:?} took {took:?}");
    assert_eq!(rig.cache.stats().stale_served, 0);
}

async fn warm_inside_window(fault: Fault) {
    let rig = rig().await;
    assert_eq!(rig.call().await.0, StatusCode::OK);
    rig.apply(fault);
    tokio::time::sleep(TTL + Duration::from_millis(100)).await;
    let (status, _, took) = rig.call().await;
    assert_eq!(status, StatusCode::OK, "{fault:?}: stale verdict served");
    assert!(took <= TIMEOUT + MARGIN, "{fault:?} took {took:?}");
    assert_eq!(rig.cache.stats().stale_served, 1);
}

async fn warm_past_window(fault: Fault) {
    let rig = rig().await;
    assert_eq!(rig.call().await.0, StatusCode::OK);
    rig.apply(fault);
    tokio::time::sleep(TTL + STALE + Duration::from_millis(100)).await;
    let (status, retry_after, took) = rig.call().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{fault:?}");
    assert!(retry_after.is_some());
    assert!(took <= TIMEOUT + MARGIN, "{fault:?} took {took:?}");
    assert_eq!(rig.cache.stats().stale_served, 0);
}

macro_rules! cells {
    ($($name:ident => $fault:expr),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test]
            async fn cold_cache_is_503() {
                tokio::time::timeout(CELL_LIMIT, cold($fault)).await.expect("cell hung");
            }

            #[tokio::test]
            async fn warm_cache_inside_stale_window_is_200() {
                tokio::time::timeout(CELL_LIMIT, warm_inside_window($fault)).await.expect("cell hung");
            }

            #[tokio::test]
            async fn warm_cache_past_stale_window_is_503() {
                tokio::time::timeout(CELL_LIMIT, warm_past_window($fault)).await.expect("cell hung");
            }
        }
    )*};
}

cells! {
    stops => Fault::Stop,
    hangs => Fault::Mode(Mode::Hang),
    answers_500 => Fault::Mode(Mode::Status500),
    resets => Fault::Mode(Mode::Reset),
    malformed_json => Fault::Mode(Mode::Malformed),
    unknown_code => Fault::Mode(Mode::UnknownCode),
    oversized_answer => Fault::Mode(Mode::Oversized),
}

/// A key service that is down is never a 401 or 403 for a key that is unknown to the
/// cache: the layer cannot know, so it says 503.
#[tokio::test]
async fn an_unknown_key_during_an_outage_is_503_not_401() {
    let rig = rig().await;
    rig.apply(Fault::Stop);
    let req = Request::get("/reports")
        .header(header::AUTHORIZATION, format!("Bearer {}", ApiKey::generate("kg").unwrap().expose_secret()))
        .body(Body::empty())
        .unwrap();
    let res = tokio::time::timeout(CELL_LIMIT, rig.app.clone().oneshot(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
}
