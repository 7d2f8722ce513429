//! The admin console in a real browser: headless Chromium driven through WebDriver
//! (`chromedriver`), against a real key service: sign-in, a key created and revoked,
//! its chart, the owner's usage, sorting the keys, sign-out. Skipped, with a notice, when
//! `chromedriver` is not on `PATH` (Debian: `apt-get install -y chromium chromium-driver`).
//!
//! `KEYGATE_UPDATE_SCREENSHOT=1` also writes the key page's screenshot to
//! `docs/console-key-page.png` (the README shows it).

mod server_support;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use fantoccini::{Client, ClientBuilder, Locator};
use http::{Request, StatusCode, header};
use keygate::{ApiKeyLayer, CachedVerifier, HttpVerifier, Principal, RevocationListener};
use server_support::{ADMIN, Req, SERVICE, TestServer, aggregate, aggregate_batch, this_minute};
use tower::ServiceExt;

const LIMIT: Duration = Duration::from_secs(20);

/// `chromedriver` on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

async fn driver() -> Option<Driver> {
    if !on_path("chromedriver") {
        eprintln!(
            "chromedriver is not on PATH: skipping the browser test (apt-get install -y chromium chromium-driver)"
        );
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver { child, url: format!("http://127.0.0.1:{port}") };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < LIMIT, "chromedriver listens");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Some(driver)
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1400"] }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector).capabilities(caps).connect(&driver.url).await.expect("a browser session")
}

fn protected(cache: &CachedVerifier<HttpVerifier>) -> Router {
    Router::new()
        .route("/reports", get(|p: Principal| async move { p.owner().to_owned() }))
        .layer(ApiKeyLayer::new(cache.clone()))
}

async fn call(app: &Router, key: &str) -> StatusCode {
    let req =
        Request::get("/reports").header(header::AUTHORIZATION, format!("Bearer {key}")).body(Body::empty()).unwrap();
    tokio::time::timeout(LIMIT, app.clone().oneshot(req)).await.expect("request hung").unwrap().status()
}

async fn fill(c: &Client, css: &str, text: &str) {
    let field = c.find(Locator::Css(css)).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(text).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).click().await.unwrap();
}

/// Waits (up to 10 s) until the page's path ends with `suffix`: a click's navigation
/// finishes after `click` returns.
async fn until_path(c: &Client, suffix: &str) -> bool {
    for _ in 0..200 {
        if c.current_url().await.is_ok_and(|u| u.path().ends_with(suffix)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits (up to 10 s) until the page's source holds `needle`.
async fn until_source(c: &Client, needle: &str) -> bool {
    for _ in 0..200 {
        if c.source().await.is_ok_and(|s| s.contains(needle)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let Some(driver) = driver().await else { return };
    let t = TestServer::start().await;
    let c = browser(&driver).await;
    let base = t.server.url();

    // A wrong token is refused with a message; a good one signs in.
    c.goto(&format!("{base}/console/keys")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/console/sign-in"));
    fill(&c, "#token", "adm-wrong-token-0123456789abcdefghijk").await;
    click(&c, "form[action='/console/sign-in'] button").await;
    assert!(until_source(&c, "not an active admin token").await);
    fill(&c, "#token", ADMIN).await;
    click(&c, "form[action='/console/sign-in'] button").await;
    assert!(until_path(&c, "/console/keys").await);
    assert!(until_source(&c, "bootstrap-admin").await);

    // Create a key: the raw key once, gone after a reload.
    c.goto(&format!("{base}/console/keys/new")).await.unwrap();
    fill(&c, "#owner", "acme").await;
    fill(&c, "#name", "browser").await;
    fill(&c, "#scopes", "reports:read").await;
    click(&c, "form[action='/console/keys/new'] button[type=submit]").await;
    let raw = c.wait().for_element(Locator::Css("#raw-key")).await.unwrap().text().await.unwrap().trim().to_owned();
    assert!(raw.starts_with("kg_"), "{raw}");
    c.refresh().await.unwrap();
    let source = c.source().await.unwrap();
    assert!(!source.contains(&raw), "after a reload the raw key is not in the page source");
    assert!(source.contains("cannot be shown again"));
    c.back().await.unwrap();
    assert!(!c.source().await.unwrap().contains(&raw), "nor after going back");

    // The key works against a protected app.
    let http = HttpVerifier::builder(t.server.url()).service_token(SERVICE).build().unwrap();
    let cache = CachedVerifier::builder(http).positive_ttl(Duration::from_secs(600)).build();
    let listener = RevocationListener::builder(t.server.url()).service_token(SERVICE).spawn(&cache).unwrap();
    let app = protected(&cache);
    let started = Instant::now();
    while !listener.is_connected() {
        assert!(started.elapsed() < LIMIT, "the listener connects");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(call(&app, &raw).await, StatusCode::OK);
    let key = t.admin.list_keys(None).await.unwrap().remove(0);

    // Traffic for the chart: 4 allowed and 2 denied this minute, 3 allowed 5 minutes ago.
    let req = |minute, outcome, status| Req {
        minute,
        key_id: Some(key.key_id.clone()),
        route: "/reports",
        method: "GET",
        outcome,
        status,
        latency_us: 1500,
    };
    let now = this_minute();
    let mut reqs = vec![req(now, keygate::Outcome::Allowed, 200); 4];
    reqs.extend(vec![req(now, keygate::Outcome::InsufficientScope, 403); 2]);
    reqs.extend(vec![req(now - 300, keygate::Outcome::Allowed, 200); 3]);
    assert_eq!(t.post_usage(&aggregate_batch(aggregate(&reqs))).await.0, 202);
    c.goto(&format!("{base}/console/keys/{}", key.key_id)).await.unwrap();
    let chart = c.find(Locator::Css("svg.chart")).await.unwrap();
    assert_eq!(chart.attr("data-points").await.unwrap().as_deref(), Some("60"));
    assert_eq!(chart.attr("data-allowed").await.unwrap().as_deref(), Some("7"));
    assert_eq!(chart.attr("data-denied").await.unwrap().as_deref(), Some("2"));
    assert_eq!(c.find_all(Locator::Css("svg.chart g.bar")).await.unwrap().len(), 60);

    // A screenshot of the key page: a non-empty PNG.
    let png = c.screenshot().await.unwrap();
    assert!(png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG of {} bytes", png.len());
    let dir = tempfile::tempdir().unwrap();
    let shot = dir.path().join("key-page.png");
    std::fs::write(&shot, &png).unwrap();
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);
    if std::env::var_os("KEYGATE_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/console-key-page.png"), &png).unwrap();
    }

    // Revoke from the key page (the script asks to confirm): refused within 1 s.
    click(&c, "#confirm").await;
    click(&c, "form[action$='/revoke'] button").await;
    c.accept_alert().await.expect("the confirm dialog");
    let at = Instant::now();
    while call(&app, &raw).await != StatusCode::UNAUTHORIZED {
        assert!(at.elapsed() < Duration::from_secs(1), "the protected app refuses the key within 1 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("revoked in the browser: refused after {:?}", at.elapsed());
    assert!(until_source(&c, "The key is revoked.").await, "{}", c.source().await.unwrap());

    // The owner's usage, followed from the key page: the traffic sent above.
    click(&c, "a[href='/console/usage?owner=acme']").await;
    assert!(until_path(&c, "/console/usage").await);
    let totals = c.wait().for_element(Locator::Css("#totals")).await.unwrap();
    assert_eq!(totals.attr("data-requests").await.unwrap().as_deref(), Some("9"));
    assert_eq!(totals.attr("data-denied").await.unwrap().as_deref(), Some("2"));
    let top = c.find_all(Locator::Css("#top-requests tbody tr")).await.unwrap();
    assert_eq!(top.len(), 1);
    assert_eq!(top[0].attr("data-key").await.unwrap(), Some(key.key_id.clone()));

    // Sorting by a column header: once ascending, again descending, paging kept.
    let mut later = server_support::new_key("zeta", &["reports:read"]);
    later.name = "zzz-last".into();
    t.admin.create_key(later).await.unwrap();
    click(&c, "nav a[href='/console/keys']").await;
    assert!(until_path(&c, "/console/keys").await);
    click(&c, "th a[data-sort='name']").await;
    assert!(until_source(&c, r#"aria-sort="ascending""#).await);
    click(&c, "th a[data-sort='name:desc']").await;
    assert!(until_source(&c, r#"aria-sort="descending""#).await);
    let first = c.find(Locator::Css("tbody tr td a")).await.unwrap().text().await.unwrap();
    assert_eq!(first, "zzz-last", "name, Z to A");
    assert!(c.current_url().await.unwrap().query().unwrap_or("").contains("sort=name%3Adesc"));

    // Sign-out ends the session.
    click(&c, "form[action='/console/sign-out'] button").await;
    assert!(until_path(&c, "/console/sign-in").await, "signed out");
    c.goto(&format!("{base}/console/keys")).await.unwrap();
    assert!(until_path(&c, "/console/sign-in").await, "the old session no longer works");
    c.close().await.unwrap();
}
