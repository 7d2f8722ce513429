//! The admin console (`/console`) over HTTP against a real key service: sign-in and
//! sign-out, the session cookie, CSRF, revoked tokens' sessions, the security headers
//! of every page, the raw key shown once, a revocation from the key page reaching a
//! protected app, and paging over 2 500 keys.

mod server_support;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::{Request, StatusCode, header};
use keygate::client::{AdminClient, KeyListQuery, TokenKind};
use keygate::server::ConsoleConfig;
use keygate::{ApiKey, ApiKeyLayer, CachedVerifier, HttpVerifier, Principal, RevocationListener};
use reqwest::header::HeaderMap;
use server_support::{ADMIN, Req, SERVICE, TestDb, TestServer, aggregate, aggregate_batch, new_key, this_minute};
use tower::ServiceExt;

const LIMIT: Duration = Duration::from_secs(10);

/// A browser without a cookie jar: the session cookie is kept by hand, so a test can
/// replay an old one.
struct Browser {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
}

struct Page {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers.get("location").map_or("", |v| v.to_str().unwrap())
    }

    /// The value of the first `<input name="csrf">`.
    fn csrf(&self) -> String {
        let at = self.body.find(r#"name="csrf" value=""#).expect("the page has a CSRF field") + 19;
        self.body[at..].split('"').next().unwrap().to_owned()
    }
}

impl Browser {
    fn new(base: String) -> Self {
        let http =
            reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).timeout(LIMIT).build().unwrap();
        Self { http, base, cookie: None }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Page {
        let req = match &self.cookie {
            Some(c) => req.header("cookie", c),
            None => req,
        };
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.text().await.unwrap();
        Page { status, headers, body }
    }

    async fn get(&self, path: &str) -> Page {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Page {
        self.send(self.http.post(format!("{}{path}", self.base)).form(form)).await
    }

    /// Signs in with `token` through the sign-in form (its pre-session cookie and
    /// token); keeps the session cookie. Returns the answer.
    async fn sign_in(&mut self, token: &str) -> Page {
        let form = self.get("/console/sign-in").await;
        let pre = set_cookie(&form, "keygate_sign_in").expect("the sign-in form sets its cookie");
        let csrf = form.csrf();
        let req = self.http.post(format!("{}/console/sign-in", self.base)).header("cookie", pre);
        let page = self.send_as_is(req.form(&[("csrf", csrf.as_str()), ("token", token)])).await;
        if let Some(session) = set_cookie(&page, "keygate_console") {
            self.cookie = Some(session);
        }
        page
    }

    /// Sends `req` with no cookie of this browser's.
    async fn send_as_is(&self, req: reqwest::RequestBuilder) -> Page {
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.text().await.unwrap();
        Page { status, headers, body }
    }

    /// A POST of a form of the page at `from`, with its CSRF token and `fields`.
    async fn submit(&self, from: &str, action: &str, fields: &[(&str, &str)]) -> Page {
        let csrf = self.get(from).await.csrf();
        let mut form = vec![("csrf", csrf.as_str())];
        form.extend_from_slice(fields);
        self.post(action, &form).await
    }
}

/// `name=value` of the answer's `Set-Cookie` for `name`, unless it clears it.
fn set_cookie(page: &Page, name: &str) -> Option<String> {
    page.headers.get_all("set-cookie").iter().map(|v| v.to_str().unwrap()).find_map(|set| {
        let pair = set.split(';').next().unwrap();
        let (n, v) = pair.split_once('=')?;
        (n == name && !v.is_empty()).then(|| pair.to_owned())
    })
}

/// The whole `Set-Cookie` header for `name`.
fn set_cookie_header(page: &Page, name: &str) -> Option<String> {
    page.headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|set| set.starts_with(&format!("{name}=")))
}

fn assert_security_headers(what: &str, page: &Page) {
    let h = |name: &str| page.headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    let csp = h("content-security-policy").unwrap_or_else(|| panic!("{what}: no Content-Security-Policy"));
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(directive), "{what}: CSP `{csp}` lacks {directive}");
    }
    assert!(!csp.contains("unsafe-inline"), "{what}: {csp}");
    assert_eq!(h("x-frame-options").as_deref(), Some("DENY"), "{what}");
    assert_eq!(h("referrer-policy").as_deref(), Some("no-referrer"), "{what}");
    assert_eq!(h("x-content-type-options").as_deref(), Some("nosniff"), "{what}");
    assert_eq!(h("cache-control").as_deref(), Some("no-store"), "{what}");
}

async fn signed_in(t: &TestServer, token: &str) -> Browser {
    let mut b = Browser::new(t.server.url());
    let page = b.sign_in(token).await;
    assert_eq!(page.status, 303, "sign-in: {}", page.body);
    b
}

/// The raw key on the page shown after a create or rotate.
fn raw_key(page: &Page) -> Option<String> {
    let at = page.body.find(r#"id="raw-key">"#)? + 13;
    Some(page.body[at..].split('<').next().unwrap().trim().to_owned())
}

#[tokio::test]
async fn sign_in_with_a_good_token_and_a_wrong_one() {
    let t = TestServer::start().await;
    let mut b = Browser::new(t.server.url());
    let page = b.get("/console/keys").await;
    assert_eq!((page.status, page.location()), (303, "/console/sign-in"), "no session: to the sign-in page");

    let wrong = b.sign_in("adm-wrong-token-0123456789abcdefghijk").await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("not an active admin token"), "{}", wrong.body);
    assert!(set_cookie(&wrong, "keygate_console").is_none(), "no session");
    // A service token is a token, but not an admin one.
    assert_eq!(b.sign_in(SERVICE).await.status, 401);

    let good = b.sign_in(ADMIN).await;
    assert_eq!((good.status, good.location()), (303, "/console/keys"));
    let cookie = set_cookie_header(&good, "keygate_console").expect("a session cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    assert!(!cookie.contains("Secure"), "not configured: {cookie}");
    let id = cookie.split(';').next().unwrap().split('=').nth(1).unwrap();
    assert_eq!(id.len(), 43, "32 random bytes, base64url");
    let keys = b.get("/console/keys").await;
    assert_eq!(keys.status, 200);
    assert!(keys.body.contains("Signed in as <strong>bootstrap-admin</strong>"), "{}", keys.body);
    assert!(!keys.body.contains(ADMIN), "the token is never on a page");
}

#[tokio::test]
async fn a_sign_in_without_the_form_token_is_refused_and_opens_no_session() {
    let t = TestServer::start().await;
    let b = Browser::new(t.server.url());
    let form = b.get("/console/sign-in").await;
    assert_eq!(form.status, 200);
    assert_security_headers("the sign-in form", &form);
    let cookie = set_cookie_header(&form, "keygate_sign_in").expect("a pre-session cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console/sign-in", "Max-Age=600"] {
        assert!(cookie.contains(attribute), "{cookie} lacks {attribute}");
    }
    let pre = set_cookie(&form, "keygate_sign_in").unwrap();
    let field = form.csrf();
    assert!(!pre.contains(&field), "the field is the cookie's signature, not a copy of it");
    let url = format!("{}/console/sign-in", b.base);
    let refused = |page: &Page, what: &str| {
        assert_eq!(page.status, 403, "{what}: {}", page.body);
        assert!(page.body.contains("did not come from this console"), "{what}: a message: {}", page.body);
        assert!(set_cookie(page, "keygate_console").is_none(), "{what}: no session");
        assert_security_headers(what, page);
    };
    // A cross-site form: the token, no pre-session cookie, no field.
    let none = b.send_as_is(b.http.post(&url).form(&[("token", ADMIN)])).await;
    refused(&none, "neither");
    let no_cookie = b.send_as_is(b.http.post(&url).form(&[("csrf", field.as_str()), ("token", ADMIN)])).await;
    refused(&no_cookie, "the field without the cookie");
    let no_field = b.send_as_is(b.http.post(&url).header("cookie", &pre).form(&[("token", ADMIN)])).await;
    refused(&no_field, "the cookie without the field");
    // A planted cookie with a field of the attacker's choosing.
    let planted = b
        .send_as_is(
            b.http.post(&url).header("cookie", "keygate_sign_in=1.abc").form(&[("csrf", "abc"), ("token", ADMIN)]),
        )
        .await;
    refused(&planted, "a forged pair");
    let other = b.get("/console/sign-in").await;
    let mixed = b
        .send_as_is(b.http.post(&url).header("cookie", &pre).form(&[("csrf", other.csrf().as_str()), ("token", ADMIN)]))
        .await;
    refused(&mixed, "the field of another form");
    // The genuine pair still signs in.
    let ok = b
        .send_as_is(b.http.post(&url).header("cookie", &pre).form(&[("csrf", field.as_str()), ("token", ADMIN)]))
        .await;
    assert_eq!((ok.status, ok.location()), (303, "/console/keys"), "{}", ok.body);
    assert!(set_cookie(&ok, "keygate_console").is_some());
    let spent = set_cookie_header(&ok, "keygate_sign_in").expect("the form's cookie is cleared");
    assert!(spent.contains("Max-Age=0"), "{spent}");
}

#[tokio::test]
async fn secure_cookies_and_the_sign_in_limit() {
    let t = TestServer::start_on(TestDb::sqlite(), |b| {
        b.console(ConsoleConfig::default().secure_cookies(true).sign_in_attempts_per_minute(3))
    })
    .await;
    let mut b = Browser::new(t.server.url());
    let page = b.sign_in(ADMIN).await;
    assert!(set_cookie_header(&page, "keygate_console").unwrap().contains("; Secure"));
    let form = b.get("/console/sign-in").await;
    assert!(set_cookie_header(&form, "keygate_sign_in").unwrap().contains("; Secure"), "the sign-in form's cookie too");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(b.sign_in("adm-wrong-token-0123456789abcdefghijk").await.status);
    }
    assert_eq!(statuses, [401, 401, 429, 429], "three attempts a minute, the good one included");
    assert_eq!(b.sign_in(ADMIN).await.status, 429, "even a good token waits");
}

#[tokio::test]
async fn sign_out_ends_the_session_and_the_old_cookie_no_longer_works() {
    let t = TestServer::start().await;
    let b = signed_in(&t, ADMIN).await;
    assert_eq!(b.get("/console/keys").await.status, 200);
    let out = b.submit("/console/keys", "/console/sign-out", &[]).await;
    assert_eq!(out.status, 303);
    assert!(out.headers["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    // The browser would drop the cookie; replaying it finds no session.
    let again = b.get("/console/keys").await;
    assert_eq!((again.status, again.location()), (303, "/console/sign-in"));
}

#[tokio::test]
async fn a_post_without_the_csrf_token_changes_nothing_and_changes_are_audited_under_the_token_name() {
    let t = TestServer::start().await;
    let alice = t.admin.create_token(TokenKind::Admin, "alice").await.unwrap();
    let created = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let b = signed_in(&t, &alice.token).await;
    let key_page = format!("/console/keys/{}", created.key_id);
    let action = format!("{key_page}/revoke");

    let none = b.post(&action, &[("confirm", "yes")]).await;
    assert_eq!(none.status, 403, "no CSRF token");
    let wrong = b.post(&action, &[("confirm", "yes"), ("csrf", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")]).await;
    assert_eq!(wrong.status, 403, "another token");
    assert!(wrong.body.contains("Nothing was changed"));
    assert!(!t.admin.get_key(&created.key_id).await.unwrap().revoked, "refused POSTs change nothing");
    // A session's token is its own: another session's is refused.
    let other = signed_in(&t, ADMIN).await;
    let other_csrf = other.get("/console/keys").await.csrf();
    assert_eq!(b.post(&action, &[("confirm", "yes"), ("csrf", &other_csrf)]).await.status, 403);

    // Without the confirmation: nothing either.
    let unconfirmed = b.submit(&key_page, &action, &[]).await;
    assert!(unconfirmed.body.contains("Tick the confirmation"), "{}", unconfirmed.body);
    assert!(!t.admin.get_key(&created.key_id).await.unwrap().revoked);

    let done = b.submit(&key_page, &action, &[("confirm", "yes")]).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(done.body.contains("The key is revoked."));
    assert!(t.admin.get_key(&created.key_id).await.unwrap().revoked);
    let audit = t.admin.audit(None).await.unwrap();
    let record = audit.iter().find(|r| r.action == "key.revoke").expect("a key.revoke record");
    assert_eq!(record.actor, "alice", "the signed-in token's name");
    assert!(done.body.contains("key.revoke"), "the key page lists its audit records");
}

#[tokio::test]
async fn the_session_of_a_revoked_token_is_refused_and_changes_nothing() {
    let t = TestServer::start().await;
    // The last active stored admin token cannot be revoked: another one stays.
    t.admin.create_token(TokenKind::Admin, "keeper").await.unwrap();
    let bob = t.admin.create_token(TokenKind::Admin, "bob").await.unwrap();
    let created = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let b = signed_in(&t, &bob.token).await;
    let key_page = format!("/console/keys/{}", created.key_id);
    let csrf = b.get(&key_page).await.csrf();

    t.admin.revoke_token(&bob.info.id).await.unwrap();
    let post = b.post(&format!("{key_page}/revoke"), &[("confirm", "yes"), ("csrf", &csrf)]).await;
    assert_eq!(post.status, 303);
    assert!(post.location().starts_with("/console/sign-in"), "{}", post.location());
    assert!(!t.admin.get_key(&created.key_id).await.unwrap().revoked);
    let disable = b.post(&format!("{key_page}/disabled"), &[("disabled", "true"), ("csrf", &csrf)]).await;
    assert_eq!(disable.status, 303);
    assert!(!t.admin.get_key(&created.key_id).await.unwrap().disabled);
    assert_eq!(b.get("/console/keys").await.status, 303, "the session is gone");
    let page = b.get("/console/sign-in?ended=revoked").await;
    assert!(page.body.contains("no longer active"));
}

#[tokio::test]
async fn every_console_answer_carries_the_security_headers() {
    let t = TestServer::start().await;
    let created = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let anonymous = Browser::new(t.server.url());
    for path in
        ["/console/sign-in", "/console/assets/console.css", "/console/assets/console.js", "/console/keys", "/console"]
    {
        let page = anonymous.get(path).await;
        assert_security_headers(path, &page);
    }
    let css = anonymous.get("/console/assets/console.css").await;
    assert!(css.headers["content-type"].to_str().unwrap().starts_with("text/css"));
    assert!(css.body.contains("prefers-color-scheme: dark"));
    assert_security_headers("a refused sign-in", &anonymous.post("/console/sign-in", &[("token", "nope")]).await);

    let b = signed_in(&t, ADMIN).await;
    let key_page = format!("/console/keys/{}", created.key_id);
    for path in [
        "/console/keys",
        "/console/keys?q=acme&state=active&sort=last_used%3Adesc",
        "/console/keys/new",
        key_page.as_str(),
        "/console/usage",
        "/console/usage?owner=acme&span=week",
        "/console/audit?action=key&per_page=1",
        "/console/audit?before=1",
        "/console/audit?after=1",
        "/console/roles",
        "/console/alerts",
    ] {
        let page = b.get(path).await;
        assert_eq!(page.status, 200, "{path}");
        assert_security_headers(path, &page);
        assert!(!page.body.contains("<script>") && !page.body.contains(" style="), "{path}: nothing inline");
        assert!(page.body.contains(r#"<script src="/console/assets/console.js""#));
    }
    let rotated = b.submit(&key_page, &format!("{key_page}/rotate"), &[("grace_s", "3600")]).await;
    assert_security_headers("rotate", &rotated);
    let shown = b.get(rotated.location()).await;
    assert_security_headers("the rotated key", &shown);
    assert!(raw_key(&shown).is_some());
    assert_security_headers("a refused POST", &b.post(&format!("{key_page}/revoke"), &[]).await);
    assert_security_headers("an unknown key", &b.get("/console/keys/key_nope").await);
    let missing = anonymous.get("/console/no/such/page").await;
    assert_eq!(missing.status, 404);
    assert!(missing.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    assert_security_headers("an unknown console path", &missing);
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

#[tokio::test]
async fn a_created_key_is_shown_once_works_and_a_revocation_from_its_page_is_refused_within_a_second() {
    let t = TestServer::start().await;
    let b = signed_in(&t, ADMIN).await;
    let form = b.get("/console/keys/new").await;
    assert!(form.body.contains(r#"<label for="owner">"#), "labelled fields");
    // A refusal of the API shows next to its field, the values kept.
    let refused = b
        .submit(
            "/console/keys/new",
            "/console/keys/new",
            &[("owner", "acme"), ("name", "ci"), ("scopes", "not a scope!")],
        )
        .await;
    assert_eq!(refused.status, 400);
    assert!(refused.body.contains(r#"class="field-error""#), "{}", refused.body);
    assert!(refused.body.contains(r#"value="acme""#));
    assert!(t.admin.list_keys(None).await.unwrap().is_empty(), "nothing created");

    let created = b
        .submit(
            "/console/keys/new",
            "/console/keys/new",
            &[
                ("owner", "acme"),
                ("name", "ci <b>"),
                ("environment", "live"),
                ("scopes", "reports:read, billing:read"),
                ("roles", ""),
            ],
        )
        .await;
    assert_eq!(created.status, 303, "{}", created.body);
    let shown_at = created.location().to_owned();
    assert!(shown_at.ends_with("/created"), "{shown_at}");
    let shown = b.get(&shown_at).await;
    assert_eq!(shown.headers["cache-control"], "no-store");
    let raw = raw_key(&shown).expect("the raw key is on the page");
    assert!(raw.starts_with("kg_"), "{raw}");
    assert_eq!(shown.body.matches(&raw).count(), 1, "shown once on the page");
    assert!(shown.body.contains("cannot be shown again"));
    let reload = b.get(&shown_at).await;
    assert_eq!(reload.status, 200);
    assert!(!reload.body.contains(&raw), "a reload never shows it again");
    assert!(raw_key(&reload).is_none());

    let keys = t.admin.list_keys(None).await.unwrap();
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    assert_eq!((key.owner.as_str(), key.name.as_str()), ("acme", "ci <b>"));
    assert_eq!(key.scopes, ["billing:read", "reports:read"]);
    assert_eq!(t.admin.audit(None).await.unwrap().last().unwrap().actor, "bootstrap-admin");
    let key_page = b.get(&format!("/console/keys/{}", key.key_id)).await;
    assert!(key_page.body.contains("ci &lt;b&gt;"), "escaped");
    assert!(!key_page.body.contains(&raw));

    // The key works against a protected app, until revoked from its page.
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
    assert_eq!(call(&app, &raw).await, StatusCode::OK, "cached");
    let key_path = format!("/console/keys/{}", key.key_id);
    let revoked = b.submit(&key_path, &format!("{key_path}/revoke"), &[("confirm", "yes")]).await;
    assert_eq!(revoked.status, 200);
    let at = Instant::now();
    while call(&app, &raw).await != StatusCode::UNAUTHORIZED {
        assert!(at.elapsed() < Duration::from_secs(1), "the protected app refuses the key within 1 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("revoked from the console: refused after {:?}", at.elapsed());
    let _ = ApiKey::new(raw);
}

#[tokio::test]
async fn rotate_with_grace_and_disable_then_enable() {
    let t = TestServer::start().await;
    let created = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let b = signed_in(&t, ADMIN).await;
    let key_page = format!("/console/keys/{}", created.key_id);
    let rotated = b.submit(&key_page, &format!("{key_page}/rotate"), &[("grace_s", "3600")]).await;
    let new = raw_key(&b.get(rotated.location()).await).expect("the new key, once");
    assert_eq!(t.code(&new).await, "VALID");
    assert_eq!(t.code(created.key.expose_secret()).await, "VALID", "the old key, within its grace");

    let off = b.submit(&key_page, &format!("{key_page}/disabled"), &[("disabled", "true")]).await;
    assert_eq!(off.status, 303);
    assert!(t.admin.get_key(&created.key_id).await.unwrap().disabled);
    assert!(b.get(&key_page).await.body.contains(">Enable<"));
    b.submit(&key_page, &format!("{key_page}/disabled"), &[("disabled", "false")]).await;
    assert!(!t.admin.get_key(&created.key_id).await.unwrap().disabled);
    let actions: Vec<String> = t.admin.audit(None).await.unwrap().into_iter().map(|r| r.action).collect();
    assert!(actions.iter().filter(|a| a.as_str() == "key.update").count() >= 2, "{actions:?}");
}

/// The key ids linked from a list page.
fn listed(page: &Page) -> Vec<String> {
    page.body
        .match_indices(r#"<a href="/console/keys/key_"#)
        .map(|(at, _)| page.body[at + 23..].split('"').next().unwrap().to_owned())
        .collect()
}

fn next_link(page: &Page) -> Option<String> {
    let at = page.body.find(r#"rel="next" href=""#)? + 17;
    Some(page.body[at..].split('"').next().unwrap().replace("&amp;", "&"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_through_2500_keys_reaches_each_exactly_once() {
    let t = TestServer::start().await;
    let mut all = BTreeSet::new();
    for chunk in 0..25 {
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let admin = AdminClient::new(t.server.url(), ADMIN).unwrap();
                let owner = if i % 10 == 0 { "needle-team" } else { "acme" };
                tokio::spawn(async move { admin.create_key(new_key(owner, &["reports:read"])).await.unwrap().key_id })
            })
            .collect();
        for task in tasks {
            all.insert(task.await.unwrap());
        }
        let _ = chunk;
    }
    assert_eq!(all.len(), 2500);
    let b = signed_in(&t, ADMIN).await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut path = "/console/keys".to_owned();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 60, "bounded: 50 pages of 50");
        let page = b.get(&path).await;
        assert_eq!(page.status, 200);
        for id in listed(&page) {
            *seen.entry(id).or_default() += 1;
        }
        match next_link(&page) {
            Some(next) => path = next,
            None => break,
        }
    }
    assert_eq!(pages, 50);
    assert_eq!(seen.len(), 2500, "every key reached");
    assert!(seen.values().all(|n| *n == 1), "each exactly once");
    assert!(seen.keys().cloned().collect::<BTreeSet<_>>() == all, "the keys listed are the keys created");

    // The API pages the same way, oldest first: 1 000 a page by default.
    let first = t.admin.list_keys_page(&KeyListQuery::default()).await.unwrap();
    assert_eq!(first.keys.len(), 1000);
    assert!(first.next.is_some());
    let mut api_pages = 0;
    let mut query = KeyListQuery::default().limit(300);
    let mut through_api = Vec::new();
    loop {
        api_pages += 1;
        assert!(api_pages <= 20, "bounded");
        let page = t.admin.list_keys_page(&query).await.unwrap();
        through_api.extend(page.keys.into_iter().map(|k| (k.created_at, k.key_id)));
        match page.next {
            Some(next) => query = query.after(next),
            None => break,
        }
    }
    assert_eq!(api_pages, 9, "2 500 keys, 300 a page");
    assert_eq!(through_api.len(), 2500);
    assert!(through_api.windows(2).all(|w| w[0] < w[1]), "oldest first, each once");
    assert!(through_api.iter().map(|(_, id)| id.clone()).collect::<BTreeSet<_>>() == all);
    let all_again = t.admin.list_all_keys(&KeyListQuery::default().owner("needle-team"), 10).await.unwrap();
    assert_eq!(all_again.len(), 250);
    let bad = t.admin.list_keys_page(&KeyListQuery::default().after("nonsense")).await.unwrap_err();
    assert!(bad.to_string().contains("cursor"), "{bad}");
    let bad = t.admin.list_keys_page(&KeyListQuery::default().state("sleeping")).await.unwrap_err();
    assert!(bad.to_string().contains("state"), "{bad}");

    // Search and state filters narrow the same paging.
    let needles = b.get("/console/keys?q=NEEDLE&per_page=500").await;
    assert_eq!(listed(&needles).len(), 250, "case-insensitive owner search");
    let one = all.iter().next().unwrap().clone();
    t.admin.revoke(&one).await.unwrap();
    let revoked = b.get("/console/keys?state=revoked").await;
    assert_eq!(listed(&revoked), vec![one.clone()]);
    let active = b.get(&format!("/console/keys?state=active&q={}", &one[4..])).await;
    assert!(listed(&active).is_empty(), "a revoked key is not active");
    let api_revoked = t.admin.list_keys_page(&KeyListQuery::default().state("revoked")).await.unwrap();
    assert_eq!(api_revoked.keys.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>(), vec![one.clone()]);
    let wildcard = b.get("/console/keys?q=%25").await;
    assert!(listed(&wildcard).is_empty(), "`%` matches itself, not everything");
}

#[tokio::test]
async fn the_console_on_its_own_listener_or_off() {
    let t = TestServer::start_on(TestDb::sqlite(), |b| {
        b.console(ConsoleConfig::default().listen("127.0.0.1:0".parse().unwrap()))
    })
    .await;
    let own = t.server.console_addr().expect("its own address");
    assert_ne!(own, t.server.addr());
    let main = Browser::new(t.server.url());
    assert_eq!(main.get("/console/sign-in").await.status, 404, "not on the API listener");
    let mut console = Browser::new(format!("http://{own}"));
    assert_eq!(console.get("/console/sign-in").await.status, 200);
    assert_eq!(console.sign_in(ADMIN).await.status, 303);
    assert_eq!(console.get("/console/keys").await.status, 200);

    let off = TestServer::start_on(TestDb::sqlite(), |b| b.console(ConsoleConfig::off())).await;
    assert!(off.server.console_addr().is_none());
    assert_eq!(Browser::new(off.server.url()).get("/console/sign-in").await.status, 404);
}

/// The listing's query on PostgreSQL: cursor, search (with `%` and `_` matching
/// themselves), environment and state filters.
#[tokio::test]
async fn paging_and_filters_on_postgres() {
    let Some(db) = TestDb::postgres().await else { return };
    let t = TestServer::start_on(db, |b| b).await;
    let mut all = BTreeSet::new();
    for i in 0..120 {
        let mut k = new_key(if i % 4 == 0 { "under_score" } else { "acme" }, &["reports:read"]);
        if i % 3 == 0 {
            k.environment = Some("test".into());
        }
        all.insert(t.admin.create_key(k).await.unwrap().key_id);
    }
    let mut seen = Vec::new();
    let mut query = KeyListQuery::default().limit(50);
    for _ in 0..10 {
        let page = t.admin.list_keys_page(&query).await.unwrap();
        seen.extend(page.keys.into_iter().map(|k| k.key_id));
        match page.next {
            Some(next) => query = query.after(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), 120);
    assert!(seen.iter().cloned().collect::<BTreeSet<_>>() == all);
    let page = |q: KeyListQuery| {
        let admin = &t.admin;
        async move { admin.list_keys_page(&q).await.unwrap().keys.len() }
    };
    assert_eq!(page(KeyListQuery::default().search("UNDER_")).await, 30);
    assert_eq!(page(KeyListQuery::default().search("r_s")).await, 30, "`_` matches itself");
    assert_eq!(page(KeyListQuery::default().search("%")).await, 0);
    assert_eq!(page(KeyListQuery::default().environment("test")).await, 40);
    let one = all.iter().next().unwrap();
    t.admin.disable(one).await.unwrap();
    assert_eq!(page(KeyListQuery::default().state("disabled")).await, 1);
    assert_eq!(page(KeyListQuery::default().state("active")).await, 119);
    assert_eq!(page(KeyListQuery::default().state("revoked")).await, 0);
    let mut k = new_key("acme", &["reports:read"]);
    k.expires_at = Some(time::OffsetDateTime::now_utc() + time::Duration::days(1));
    t.admin.create_key(k).await.unwrap();
    assert_eq!(page(KeyListQuery::default().state("expiring")).await, 1);
    let b = signed_in(&t, ADMIN).await;
    let console = b.get("/console/keys?state=disabled").await;
    assert_eq!(listed(&console), vec![one.clone()]);
}

/// A `data-` attribute of the first element that has it.
fn data(body: &str, name: &str) -> u64 {
    let needle = format!(r#"{name}=""#);
    let at = body.find(&needle).unwrap_or_else(|| panic!("no {name}")) + needle.len();
    body[at..].split('"').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn the_usage_chart_holds_the_points_and_totals_of_the_traffic_sent() {
    let t = TestServer::start().await;
    let created = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let req = |minute: i64, outcome: keygate::Outcome, status: u16, latency_us: u64| Req {
        minute,
        key_id: Some(created.key_id.clone()),
        route: "/reports",
        method: "GET",
        outcome,
        status,
        latency_us,
    };
    let now = this_minute();
    let mut reqs = vec![req(now, keygate::Outcome::Allowed, 200, 900); 7];
    reqs.extend(vec![req(now - 600, keygate::Outcome::Allowed, 200, 4_000); 5]);
    reqs.extend(vec![req(now - 600, keygate::Outcome::InsufficientScope, 403, 100); 3]);
    // Older than an hour: in the day's chart, not the hour's.
    reqs.extend(vec![req(now - 7200, keygate::Outcome::Allowed, 200, 500); 11]);
    assert_eq!(t.post_usage(&aggregate_batch(aggregate(&reqs))).await.0, 202);

    let b = signed_in(&t, ADMIN).await;
    let key_page = format!("/console/keys/{}", created.key_id);
    let hour = b.get(&key_page).await.body;
    let svg = &hour[hour.find("<svg").expect("a chart")..];
    assert_eq!(data(svg, "data-points"), 60, "a bar a minute");
    assert_eq!(data(svg, "data-allowed"), 12);
    assert_eq!(data(svg, "data-denied"), 3);
    assert_eq!(svg.matches(r#"<g class="bar""#).count(), 60);
    assert_eq!(svg.matches(r#"<rect class="allowed""#).count(), 2, "two minutes with traffic allowed");
    assert_eq!(svg.matches(r#"<rect class="denied""#).count(), 1);
    assert!(svg.contains(r#"<polyline class="p99""#), "the latency line");
    let day = b.get(&format!("{key_page}?usage=day")).await.body;
    let svg = &day[day.find("<svg").unwrap()..];
    assert_eq!(data(svg, "data-points"), 24);
    assert_eq!(data(svg, "data-allowed"), 23, "the older traffic too");
    assert_eq!(data(svg, "data-denied"), 3);
    let week = b.get(&format!("{key_page}?usage=week")).await.body;
    assert_eq!(data(&week[week.find("<svg").unwrap()..], "data-points"), 7);
}

#[tokio::test]
async fn the_audit_log_filters_and_an_alert_is_acknowledged_from_the_console() {
    let t = TestServer::start().await;
    let alice = t.admin.create_token(TokenKind::Admin, "alice").await.unwrap();
    let a = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let other = t.admin.create_key(new_key("other", &["reports:read"])).await.unwrap();
    let b = signed_in(&t, &alice.token).await;
    let a_page = format!("/console/keys/{}", a.key_id);
    b.submit(&a_page, &format!("{a_page}/disabled"), &[("disabled", "true")]).await;

    let log = b.get("/console/audit").await;
    assert_eq!(log.status, 200);
    assert_security_headers("audit", &log);
    assert!(log.body.contains(&other.key_id) && log.body.contains(&a.key_id));
    let by_actor = b.get("/console/audit?actor=alice").await.body;
    assert!(by_actor.contains("key.update") && !by_actor.contains("key.create"), "alice only updated");
    let by_key = b.get(&format!("/console/audit?key_id={}", other.key_id)).await.body;
    assert!(!by_key.contains(&format!(">{}<", a.key_id)), "only the other key's records");
    let by_action = b.get("/console/audit?action=token.").await.body;
    assert!(by_action.contains("token.create") && !by_action.contains("key.create"));
    let later = b.get("/console/audit?since=2999-01-01T00:00").await.body;
    assert!(later.contains("No records match."));
    assert!(b.get("/console/audit?since=yesterday").await.body.contains("Not a time"));

    // A new network for a key with a history raises an alert; acknowledge it here.
    let now = this_minute();
    let req = Req {
        minute: now,
        key_id: Some(a.key_id.clone()),
        route: "/r",
        method: "GET",
        outcome: keygate::Outcome::Allowed,
        status: 200,
        latency_us: 100,
    };
    for (i, net) in ["203.0.113.0/24", "198.51.100.0/24"].into_iter().enumerate() {
        let mut batch = aggregate_batch(aggregate(std::slice::from_ref(&req)));
        let minute = now - 60 * (2 - i as i64);
        batch.networks = vec![keygate::ClientNetwork { key_id: a.key_id.as_str().into(), network: net.into(), minute }];
        assert_eq!(t.post_usage(&batch).await.0, 202);
    }
    let open = t.admin.list_alerts(Some(false)).await.unwrap();
    assert_eq!(open.len(), 1);
    let id = open[0].id.unwrap();
    let page = b.get("/console/alerts").await;
    assert!(page.body.contains("new_network"), "{}", page.body);
    assert!(b.get(&a_page).await.body.contains("new_network"), "the key page lists its alerts");
    assert!(!b.get(&format!("/console/keys/{}", other.key_id)).await.body.contains("new_network"));
    let action = format!("/console/alerts/{id}/ack");
    assert_eq!(b.post(&action, &[]).await.status, 403, "no CSRF token");
    assert_eq!(t.admin.list_alerts(Some(false)).await.unwrap().len(), 1);
    let acked = b.submit("/console/alerts", &action, &[]).await;
    assert_eq!((acked.status, acked.location()), (303, "/console/alerts"));
    assert!(t.admin.list_alerts(Some(false)).await.unwrap().is_empty());
    assert!(b.get("/console/alerts").await.body.contains("No alerts."));
    assert!(b.get("/console/alerts?all=1").await.body.contains("new_network"));
    let audit = t.admin.audit(None).await.unwrap();
    assert_eq!(audit.iter().find(|r| r.action == "alert.ack").map(|r| r.actor.as_str()), Some("alice"));
}

#[tokio::test]
async fn roles_are_defined_changed_and_deleted_with_the_cli_rules() {
    let t = TestServer::start().await;
    let b = signed_in(&t, ADMIN).await;
    let saved = b
        .submit("/console/roles", "/console/roles", &[("name", "analyst"), ("scopes", "reports:read, dashboards:read")])
        .await;
    assert_eq!(saved.status, 303, "{}", saved.body);
    let roles = t.admin.list_roles().await.unwrap();
    assert_eq!(roles.len(), 1);
    assert_eq!(roles[0].scopes, ["dashboards:read", "reports:read"]);
    let bad = b.submit("/console/roles", "/console/roles", &[("name", "analyst"), ("scopes", "not a scope!")]).await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains(r#"class="message error""#), "the API's refusal as a message");
    assert_eq!(t.admin.list_roles().await.unwrap()[0].scopes.len(), 2, "unchanged");

    let mut k = new_key("acme", &[]);
    k.roles = vec!["analyst".into()];
    let held = t.admin.create_key(k).await.unwrap();
    let refused = b.submit("/console/roles", "/console/roles/analyst/delete", &[]).await;
    assert_eq!(refused.status, 400, "a role keys hold is not deleted without detaching");
    assert_eq!(t.admin.list_roles().await.unwrap().len(), 1);
    let deleted = b.submit("/console/roles", "/console/roles/analyst/delete", &[("detach", "yes")]).await;
    assert!(deleted.body.contains("Deleted the role analyst."), "{}", deleted.body);
    assert!(t.admin.list_roles().await.unwrap().is_empty());
    assert!(t.admin.get_key(&held.key_id).await.unwrap().roles.is_empty());
    assert_eq!(b.post("/console/roles", &[("name", "x"), ("scopes", "a:b")]).await.status, 403, "no CSRF token");
    assert!(t.admin.list_roles().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_key_is_edited_from_its_page() {
    let t = TestServer::start().await;
    t.admin.put_role("ops", ["deploy:run"]).await.unwrap();
    let created = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let b = signed_in(&t, ADMIN).await;
    let key_page = format!("/console/keys/{}", created.key_id);
    let action = format!("{key_page}/edit");
    let fields =
        [("name", "renamed"), ("scopes", "reports:read billing:read"), ("roles", "ops"), ("expires_in_days", "30")];
    assert_eq!(b.post(&action, &fields).await.status, 403, "no CSRF token");
    assert_eq!(t.admin.get_key(&created.key_id).await.unwrap().name, "acme key");
    let saved = b.submit(&key_page, &action, &fields).await;
    assert!(saved.body.contains("Saved."), "{}", saved.body);
    let k = t.admin.get_key(&created.key_id).await.unwrap();
    assert_eq!(k.name, "renamed");
    assert_eq!(k.scopes, ["billing:read", "reports:read"]);
    assert_eq!(k.roles, ["ops"]);
    let days = (k.expires_at.unwrap() - time::OffsetDateTime::now_utc()).whole_days();
    assert!((29..=30).contains(&days), "{days}");
    let unknown = b.submit(&key_page, &action, &[("name", "renamed"), ("scopes", "a:b"), ("roles", "nope")]).await;
    assert!(unknown.body.contains(r#"class="message error""#), "{}", unknown.body);
    assert_eq!(t.admin.get_key(&created.key_id).await.unwrap().roles, ["ops"], "unchanged");
    b.submit(
        &key_page,
        &action,
        &[("name", "renamed"), ("scopes", "reports:read"), ("roles", ""), ("expires_in_days", "0")],
    )
    .await;
    let k = t.admin.get_key(&created.key_id).await.unwrap();
    assert!(k.expires_at.is_none() && k.roles.is_empty());
}

#[tokio::test]
async fn expiring_soon_is_a_filter_of_its_own() {
    let t = TestServer::start().await;
    let expiring = |days: i64| {
        let mut k = new_key("acme", &["reports:read"]);
        k.expires_at = Some(time::OffsetDateTime::now_utc() + time::Duration::days(days));
        k
    };
    let soon = t.admin.create_key(expiring(2)).await.unwrap();
    t.admin.create_key(expiring(30)).await.unwrap();
    t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap();
    let disabled = t.admin.create_key(expiring(3)).await.unwrap();
    t.admin.disable(&disabled.key_id).await.unwrap();
    let api = t.admin.list_keys_page(&KeyListQuery::default().state("expiring")).await.unwrap();
    assert_eq!(
        api.keys.iter().map(|k| k.key_id.clone()).collect::<Vec<_>>(),
        vec![soon.key_id.clone()],
        "within 7 days, active"
    );
    assert_eq!(t.admin.list_keys_page(&KeyListQuery::default().state("active")).await.unwrap().keys.len(), 3);
    let b = signed_in(&t, ADMIN).await;
    let page = b.get("/console/keys?state=expiring").await;
    assert_eq!(listed(&page), vec![soon.key_id.clone()]);
    assert!(page.body.contains("expiring soon"));
}

/// The `data-sort` link of the column header that sorts by `sort`.
fn sort_link(page: &Page, sort: &str) -> String {
    let needle = format!(r#"data-sort="{sort}""#);
    let at = page.body.find(&needle).unwrap_or_else(|| panic!("no header link to {sort}"));
    let start = page.body[..at].rfind(r#"href=""#).unwrap() + 6;
    page.body[start..].split('"').next().unwrap().replace("&amp;", "&")
}

/// Every key id the console lists from `path` on, following the next-page links.
async fn page_through(b: &Browser, mut path: String) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..100 {
        let page = b.get(&path).await;
        assert_eq!(page.status, 200, "{path}");
        ids.extend(listed(&page));
        match next_link(&page) {
            Some(next) => path = next,
            None => return ids,
        }
    }
    panic!("more than 100 pages from {path}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorting_by_each_column_either_way_and_paging_under_each_sort_reaches_every_key_once() {
    let t = TestServer::start().await;
    let mut tasks = Vec::new();
    for i in 0..250u32 {
        let admin = AdminClient::new(t.server.url(), ADMIN).unwrap();
        // Repeated names and owners: the key id breaks the ties.
        let mut k = new_key(&format!("team-{}", (b'a' + (i % 7) as u8) as char), &["reports:read"]);
        k.name = format!("n{:03}", (i * 37) % 100);
        tasks.push(tokio::spawn(async move { admin.create_key(k).await.unwrap().key_id }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.push(task.await.unwrap());
    }
    // A fifth of the keys used, in a few distinct minutes (ties again).
    let now = this_minute();
    let reqs: Vec<Req> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 5 == 0)
        .map(|(i, id)| Req {
            minute: now - 60 * (i as i64 % 4),
            key_id: Some(id.clone()),
            route: "/reports",
            method: "GET",
            outcome: keygate::Outcome::Allowed,
            status: 200,
            latency_us: 100,
        })
        .collect();
    assert_eq!(t.post_usage(&aggregate_batch(aggregate(&reqs))).await.0, 202);
    let keys = t.admin.list_all_keys(&KeyListQuery::default(), 10).await.unwrap();
    assert_eq!(keys.len(), 250);
    assert_eq!(keys.iter().filter(|k| k.last_used_at.is_some()).count(), 50, "usage recorded");
    let by_id: HashMap<String, keygate::client::KeyInfo> = keys.into_iter().map(|k| (k.key_id.clone(), k)).collect();

    let b = signed_in(&t, ADMIN).await;
    let ms = |t: Option<time::OffsetDateTime>| t.map_or(0, |t| (t.unix_timestamp_nanos() / 1_000_000) as i64);
    for column in ["created", "name", "owner", "last_used"] {
        for descending in [false, true] {
            let sort = if descending { format!("{column}:desc") } else { column.to_owned() };
            let mut expected: Vec<&keygate::client::KeyInfo> = by_id.values().collect();
            expected.sort_by(|a, b| {
                let order = match column {
                    "created" => ms(Some(a.created_at)).cmp(&ms(Some(b.created_at))),
                    "name" => a.name.cmp(&b.name),
                    "owner" => a.owner.cmp(&b.owner),
                    _ => ms(a.last_used_at).cmp(&ms(b.last_used_at)),
                };
                order.then_with(|| a.key_id.cmp(&b.key_id))
            });
            if descending {
                expected.reverse();
            }
            let expected: Vec<String> = expected.into_iter().map(|k| k.key_id.clone()).collect();

            let seen = page_through(&b, format!("/console/keys?per_page=17&sort={}", sort.replace(':', "%3A"))).await;
            let unique: BTreeSet<&String> = seen.iter().collect();
            assert_eq!(seen.len(), 250, "{sort}: every key reached");
            assert_eq!(unique.len(), 250, "{sort}: each exactly once");
            assert_eq!(seen, expected, "{sort}: in order, ties by key id");

            let mut query = KeyListQuery::default().sort(sort.clone()).limit(33);
            let mut through_api = Vec::new();
            for _ in 0..20 {
                let page = t.admin.list_keys_page(&query).await.unwrap();
                through_api.extend(page.keys.into_iter().map(|k| k.key_id));
                match page.next {
                    Some(next) => query = query.after(next),
                    None => break,
                }
            }
            assert_eq!(through_api, expected, "{sort}: the API pages the same order");
        }
    }

    // The header links sort and keep the filters; a second click reverses.
    let filtered = b.get("/console/keys?q=team-c&state=active&per_page=5").await;
    let by_name = sort_link(&filtered, "name");
    for kept in ["q=team%2Dc", "state=active", "per_page=5", "sort=name"] {
        assert!(by_name.contains(kept), "{by_name} keeps {kept}");
    }
    assert!(!by_name.contains("after="), "a new order starts at its first page");
    let sorted = b.get(&by_name).await;
    assert!(sorted.body.contains(r#"aria-sort="ascending""#));
    assert!(sort_link(&sorted, "name:desc").contains("sort=name%3Adesc"), "the second click reverses");
    let team_c: Vec<String> = {
        let mut v: Vec<&keygate::client::KeyInfo> = by_id.values().filter(|k| k.owner == "team-c").collect();
        v.sort_by(|a, b| b.name.cmp(&a.name).then_with(|| b.key_id.cmp(&a.key_id)));
        v.into_iter().map(|k| k.key_id.clone()).collect()
    };
    let seen = page_through(&b, sort_link(&sorted, "name:desc")).await;
    assert_eq!(seen, team_c, "filtered, sorted and paged: each of team-c's keys once, in order");

    // A cursor belongs to its order.
    let created = t.admin.list_keys_page(&KeyListQuery::default().limit(3)).await.unwrap().next.unwrap();
    let err = t.admin.list_keys_page(&KeyListQuery::default().sort("name").after(created)).await.unwrap_err();
    assert!(err.to_string().contains("cursor"), "{err}");
    let err = t.admin.list_keys_page(&KeyListQuery::default().sort("size")).await.unwrap_err();
    assert!(err.to_string().contains("sort"), "{err}");
    let junk = b.get("/console/keys?sort=size&after=nonsense").await;
    assert_eq!(junk.status, 200, "the console falls back to the default order");
}

fn attr_list(body: &str, table_id: &str, attr: &str) -> Vec<String> {
    let Some(start) = body.find(&format!(r#"<table id="{table_id}""#)) else { return Vec::new() };
    let table = &body[start..start + body[start..].find("</table>").unwrap()];
    let needle = format!(r#"{attr}=""#);
    table
        .match_indices(&needle)
        .map(|(at, _)| table[at + needle.len()..].split('"').next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_usage_of_an_owner_totals_the_traffic_recorded_and_ranks_its_keys() {
    let t = TestServer::start().await;
    let a = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap().key_id;
    let bk = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap().key_id;
    let idle = t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap().key_id;
    let other = t.admin.create_key(new_key("other", &["reports:read"])).await.unwrap().key_id;
    t.admin.create_key(new_key("quiet", &["reports:read"])).await.unwrap();
    let req = |key: &str, minute: i64, outcome: keygate::Outcome| Req {
        minute,
        key_id: Some(key.to_owned()),
        route: "/reports",
        method: "GET",
        outcome,
        status: if outcome.is_allowed() { 200 } else { 403 },
        latency_us: 500,
    };
    use keygate::Outcome::{Allowed, InsufficientScope};
    let now = this_minute();
    let mut reqs = vec![req(&a, now, Allowed); 7];
    reqs.extend(vec![req(&a, now - 600, InsufficientScope); 3]);
    reqs.extend(vec![req(&bk, now, Allowed); 5]);
    reqs.extend(vec![req(&bk, now - 120, InsufficientScope); 9]);
    // Older than the hour: in the day's and the week's sums only.
    reqs.extend(vec![req(&a, now - 7200, Allowed); 11]);
    // Another owner's traffic counts for that owner only.
    reqs.extend(vec![req(&other, now, Allowed); 100]);
    assert_eq!(t.post_usage(&aggregate_batch(aggregate(&reqs))).await.0, 202);

    let b = signed_in(&t, ADMIN).await;
    let keys = b.get("/console/keys").await;
    assert!(keys.body.contains(r#"<a href="/console/usage">Usage</a>"#), "in the navigation");
    assert!(keys.body.contains(r#"href="/console/usage?owner=acme""#), "the owner column links to its usage");
    let key_page = b.get(&format!("/console/keys/{a}")).await;
    assert!(key_page.body.contains(r#"href="/console/usage?owner=acme""#), "and the key page");

    let hour = b.get("/console/usage?owner=acme&span=hour").await;
    assert_eq!(hour.status, 200);
    assert_security_headers("the usage page", &hour);
    let totals = &hour.body[hour.body.find(r#"id="totals""#).expect("totals")..];
    assert_eq!(
        (
            data(totals, "data-requests"),
            data(totals, "data-allowed"),
            data(totals, "data-denied"),
            data(totals, "data-keys")
        ),
        (24, 12, 12, 2),
        "the hour's traffic of acme's keys"
    );
    assert_eq!(attr_list(&hour.body, "top-requests", "data-key"), [bk.clone(), a.clone()], "14 requests, then 10");
    assert_eq!(attr_list(&hour.body, "top-requests", "data-requests"), ["14", "10"]);
    assert_eq!(attr_list(&hour.body, "top-denied", "data-key"), [bk.clone(), a.clone()], "9 denials, then 3");
    assert_eq!(attr_list(&hour.body, "top-denied", "data-denied"), ["9", "3"]);
    assert!(!hour.body.contains(&idle), "a key without traffic is in neither list");
    assert!(!hour.body.contains(&other), "another owner's key is not");

    let day = b.get("/console/usage?owner=acme&span=day").await;
    let totals = &day.body[day.body.find(r#"id="totals""#).unwrap()..];
    assert_eq!((data(totals, "data-requests"), data(totals, "data-allowed")), (35, 23), "the older traffic too");
    assert_eq!(attr_list(&day.body, "top-requests", "data-key"), [a.clone(), bk.clone()], "21 requests, then 14");
    assert_eq!(attr_list(&day.body, "top-denied", "data-key"), [bk.clone(), a.clone()]);
    let week = b.get("/console/usage?owner=acme&span=week").await;
    assert_eq!(data(&week.body[week.body.find(r#"id="totals""#).unwrap()..], "data-requests"), 35);
    let other_page = b.get("/console/usage?owner=other&span=hour").await;
    assert_eq!(data(&other_page.body[other_page.body.find(r#"id="totals""#).unwrap()..], "data-requests"), 100);

    let quiet = b.get("/console/usage?owner=quiet").await;
    assert_eq!(quiet.status, 200);
    assert!(quiet.body.contains("No usage recorded for <strong>quiet</strong>"), "{}", quiet.body);
    assert!(!quiet.body.contains(r#"id="top-requests""#));
    let nobody = b.get("/console/usage?owner=nobody").await;
    assert!(nobody.body.contains("No keys belong to <strong>nobody</strong>"), "{}", nobody.body);
    let pick = b.get("/console/usage").await;
    assert!(pick.body.contains("Pick an owner"));
    for owner in ["acme", "other", "quiet"] {
        assert!(pick.body.contains(&format!(r#"<option value="{owner}">"#)), "{owner} offered");
    }
}

fn prev_link(page: &Page) -> Option<String> {
    let at = page.body.find(r#"rel="prev" href=""#)? + 17;
    Some(page.body[at..].split('"').next().unwrap().replace("&amp;", "&"))
}

#[tokio::test]
async fn audit_paging_older_and_newer_reaches_each_record_once_with_the_filters_kept() {
    let t = TestServer::start().await;
    let mut created = Vec::new();
    for i in 0..45 {
        created.push(t.admin.create_key(new_key("acme", &["reports:read"])).await.unwrap().key_id);
        if i % 5 == 0 {
            // Records the filter leaves out, between the ones it keeps.
            t.admin.put_role(&format!("role{i}"), ["reports:read"]).await.unwrap();
        }
    }
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    let b = signed_in(&t, ADMIN).await;
    let first = b.get("/console/audit?action=key.create&per_page=10").await;
    assert_eq!(first.status, 200);
    assert!(prev_link(&first).is_none(), "nothing newer than the newest");
    let mut pages = vec![first];
    for _ in 0..10 {
        let Some(next) = next_link(pages.last().unwrap()) else { break };
        for kept in ["action=key%2Ecreate", "per_page=10"] {
            assert!(next.contains(kept), "{next} keeps {kept}");
        }
        pages.push(b.get(&next).await);
    }
    assert_eq!(pages.len(), 5, "45 records, 10 a page");
    let older: Vec<String> = pages.iter().flat_map(listed).collect();
    assert_eq!(older, newest_first, "older and older: each record once, newest first");
    assert!(pages.iter().all(|p| !p.body.contains("role.put")), "the filter holds on every page");

    let mut up = vec![pages.pop().unwrap()];
    for _ in 0..10 {
        let Some(newer) = prev_link(up.last().unwrap()) else { break };
        assert!(newer.contains("action=key%2Ecreate") && newer.contains("per_page=10"), "{newer}");
        up.push(b.get(&newer).await);
    }
    let mut newer: Vec<String> = up.iter().rev().flat_map(listed).collect();
    assert_eq!(newer.len(), 45, "back up to the newest");
    assert_eq!(newer, newest_first, "newer and newer: each record once");
    assert!(next_link(up.last().unwrap()).is_some(), "the top page still leads down");
    newer.dedup();
    assert_eq!(newer.len(), 45);

    // Filters by actor and key narrow the same paging.
    let one = &created[3];
    let by_key = b.get(&format!("/console/audit?key_id={one}")).await;
    assert_eq!(listed(&by_key), vec![one.clone()]);
    let nobody = b.get("/console/audit?actor=nobody").await;
    assert!(nobody.body.contains("No records match."));
}

/// The sorted listing, the audit pages and an owner's usage on PostgreSQL: text and
/// number cursors, `COALESCE` of never-used keys, the `LIKE` prefix, the sums' casts.
#[tokio::test]
async fn sorting_audit_paging_and_owner_usage_on_postgres() {
    let Some(db) = TestDb::postgres().await else { return };
    let t = TestServer::start_on(db, |b| b).await;
    let mut ids = Vec::new();
    for i in 0..40u32 {
        let mut k = new_key(if i % 3 == 0 { "beta" } else { "alpha" }, &["reports:read"]);
        k.name = format!("n{:02}", (i * 7) % 13);
        ids.push(t.admin.create_key(k).await.unwrap().key_id);
    }
    let now = this_minute();
    let req = |key: &str, outcome: keygate::Outcome| Req {
        minute: now,
        key_id: Some(key.to_owned()),
        route: "/reports",
        method: "GET",
        outcome,
        status: 200,
        latency_us: 100,
    };
    let mut reqs = vec![req(&ids[0], keygate::Outcome::Allowed); 6];
    reqs.extend(vec![req(&ids[3], keygate::Outcome::InsufficientScope); 4]);
    reqs.extend(vec![req(&ids[1], keygate::Outcome::Allowed); 2]);
    assert_eq!(t.post_usage(&aggregate_batch(aggregate(&reqs))).await.0, 202);
    let keys = t.admin.list_all_keys(&KeyListQuery::default(), 10).await.unwrap();
    let ms = |t: Option<time::OffsetDateTime>| t.map_or(0, |t| (t.unix_timestamp_nanos() / 1_000_000) as i64);
    for sort in ["name", "name:desc", "owner:desc", "last_used", "last_used:desc", "created:desc"] {
        let mut expected = keys.clone();
        expected.sort_by(|a, b| {
            let o = match sort.split(':').next().unwrap() {
                "name" => a.name.cmp(&b.name),
                "owner" => a.owner.cmp(&b.owner),
                "last_used" => ms(a.last_used_at).cmp(&ms(b.last_used_at)),
                _ => ms(Some(a.created_at)).cmp(&ms(Some(b.created_at))),
            };
            o.then_with(|| a.key_id.cmp(&b.key_id))
        });
        if sort.ends_with(":desc") {
            expected.reverse();
        }
        let expected: Vec<String> = expected.into_iter().map(|k| k.key_id).collect();
        let got: Vec<String> = t
            .admin
            .list_all_keys(&KeyListQuery::default().sort(sort).limit(7), 20)
            .await
            .unwrap()
            .into_iter()
            .map(|k| k.key_id)
            .collect();
        assert_eq!(got, expected, "{sort}");
    }

    let b = signed_in(&t, ADMIN).await;
    let mut audit = Vec::new();
    let mut path = "/console/audit?action=KEY.cr&per_page=9".to_owned();
    for _ in 0..10 {
        let page = b.get(&path).await;
        audit.extend(listed(&page));
        match next_link(&page) {
            Some(next) => path = next,
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(audit, newest_first, "older pages, the prefix case-insensitive");
    let last = b.get(&path).await;
    let newer = b.get(&prev_link(&last).unwrap()).await;
    assert_eq!(listed(&newer), newest_first[27..36].to_vec(), "the next newer page");

    let alpha = b.get("/console/usage?owner=alpha&span=hour").await;
    let totals = &alpha.body[alpha.body.find(r#"id="totals""#).unwrap()..];
    assert_eq!((data(totals, "data-requests"), data(totals, "data-denied"), data(totals, "data-keys")), (2, 0, 1));
    let beta = b.get("/console/usage?owner=beta&span=week").await;
    let totals = &beta.body[beta.body.find(r#"id="totals""#).unwrap()..];
    assert_eq!((data(totals, "data-requests"), data(totals, "data-denied"), data(totals, "data-keys")), (10, 4, 2));
    assert_eq!(attr_list(&beta.body, "top-requests", "data-key"), [ids[0].clone(), ids[3].clone()]);
    assert_eq!(attr_list(&beta.body, "top-denied", "data-key"), [ids[3].clone()]);
}

/// `keygate-server keys list --sort`: the API's order, pages and all.
#[tokio::test]
async fn the_cli_lists_keys_in_the_order_asked_for() {
    let t = TestServer::start().await;
    for name in ["mid", "zed", "abe", "kit"] {
        let mut k = new_key("acme", &["reports:read"]);
        k.name = name.into();
        t.admin.create_key(k).await.unwrap();
    }
    let cli = |args: &'static [&'static str]| {
        let url = t.server.url();
        async move {
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate-server"));
            cmd.args(args).args(["--url", &url, "--json"]).env("KEYGATE_ADMIN_TOKEN", ADMIN).env_remove("KEYGATE_URL");
            tokio::time::timeout(LIMIT * 6, cmd.output()).await.expect("the CLI ends").unwrap()
        }
    };
    let names = |out: &std::process::Output| -> Vec<String> {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let keys: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        keys.iter().map(|k| k["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(
        names(&cli(&["keys", "list", "--sort", "name:desc", "--all", "--limit", "1"]).await),
        ["zed", "mid", "kit", "abe"]
    );
    let page = cli(&["keys", "list", "--sort", "name", "--limit", "2"]).await;
    assert_eq!(names(&page), ["abe", "kit"]);
    assert!(String::from_utf8_lossy(&page.stderr).contains("more keys: --after na."), "a cursor of the name order");
    let bad = cli(&["keys", "list", "--sort", "size"]).await;
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sort"), "{}", String::from_utf8_lossy(&bad.stderr));
}
