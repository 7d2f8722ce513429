//! The admin console in the browser, under `/console` (see [`ConsoleConfig`]).
//!
//! Server-rendered HTML ([`maud`]: checked at compile time, every value escaped), plain
//! forms that work without JavaScript, one stylesheet and one small script of our own
//! (copy to clipboard, confirm dialogs), both served from the binary: nothing is loaded
//! from elsewhere. Every answer carries a strict `Content-Security-Policy` (no inline
//! script or style), `X-Frame-Options: DENY`, `Referrer-Policy: no-referrer`,
//! `X-Content-Type-Options: nosniff` and `Cache-Control: no-store`.
//!
//! Sign-in takes an admin token and opens a server-side session ([`session`]); the
//! changes made here go through the admin API's own handlers, in process, with the
//! session's token ([`dispatch`]): the same checks, the same audit records, with the
//! token's name as the actor.

mod alerts;
mod assets;
mod audit;
mod chart;
mod config;
mod csrf;
mod dispatch;
mod keys;
mod layout;
mod roles;
mod session;
mod sign_in;
mod usage;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use http::header::{self, HeaderValue};
use http::request::Parts;
use zeroize::Zeroizing;

pub use config::{
    ConsoleConfig, DEFAULT_CONSOLE_ABSOLUTE_TIMEOUT, DEFAULT_CONSOLE_IDLE_TIMEOUT, DEFAULT_CONSOLE_MAX_SESSIONS,
    DEFAULT_SIGN_IN_ATTEMPTS_PER_MINUTE,
};

use super::state::ServerState;
use crate::ratelimit::RateLimiter;
use session::Sessions;

/// The path every console page is under.
pub(crate) const BASE: &str = "/console";
/// Largest console form body: 16 KiB.
const FORM_LIMIT: usize = 16 * 1024;
/// Most client addresses the sign-in limiter tracks.
const SIGN_IN_TRACKED: usize = 10_000;

const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What every console handler shares.
pub(crate) struct Console {
    server: ServerState,
    /// The admin API, called in process with the session's token.
    api: Router,
    sessions: Sessions,
    sign_in: RateLimiter<IpAddr>,
    /// Signs the sign-in form's pre-session token.
    sign_in_key: csrf::SignInKey,
    config: ConsoleConfig,
}

type Shared = Arc<Console>;

/// The console's routes (all under `/console`), for the key service's listener or one
/// of its own.
pub(crate) fn router(server: ServerState, config: &ConsoleConfig) -> Router {
    let console = Arc::new(Console {
        api: super::api::router(server.clone()),
        server,
        sessions: Sessions::new(config.idle_timeout, config.absolute_timeout, config.max_sessions),
        sign_in: RateLimiter::new(SIGN_IN_TRACKED),
        sign_in_key: csrf::SignInKey::generate(),
        config: config.clone(),
    });
    Router::new()
        .route("/console", get(|| async { Redirect::to("/console/keys") }))
        .route("/console/", get(|| async { Redirect::to("/console/keys") }))
        .route("/console/assets/console.css", get(assets::css))
        .route("/console/assets/console.js", get(assets::js))
        .route("/console/sign-in", get(sign_in::form).post(sign_in::submit))
        .route("/console/sign-out", post(sign_in::sign_out))
        .route("/console/keys", get(keys::list))
        .route("/console/keys/new", get(keys::new_form).post(keys::create))
        .route("/console/keys/{id}", get(keys::show))
        .route("/console/keys/{id}/created", get(keys::reveal))
        .route("/console/keys/{id}/rotate", post(keys::rotate))
        .route("/console/keys/{id}/revoke", post(keys::revoke))
        .route("/console/keys/{id}/disabled", post(keys::set_disabled))
        .route("/console/keys/{id}/edit", post(keys::edit))
        .route("/console/roles", get(roles::roles).post(roles::put))
        .route("/console/roles/{name}/delete", post(roles::delete))
        .route("/console/audit", get(audit::audit))
        .route("/console/alerts", get(alerts::alerts))
        .route("/console/usage", get(usage::usage))
        .route("/console/alerts/{id}/ack", post(alerts::ack))
        // Any other console path: an HTML 404 with the same headers (the API's fallback
        // would answer JSON).
        .route("/console/{*rest}", get(not_found))
        .layer(DefaultBodyLimit::max(FORM_LIMIT))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(console)
}

async fn not_found() -> Response {
    layout::page(
        http::StatusCode::NOT_FOUND,
        "Not found",
        None,
        maud::html! { h1 { "Not found" } p { a href="/console/keys" { "Go to the keys" } } },
    )
}

/// The headers every console answer carries, pages, redirects and assets alike.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Pages show keys, tokens' names and audit records: nothing is kept by the browser
    // or a proxy (and the once-shown raw key never comes back from a cache).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The client's address (the accept loop records it); unknown when the console is
/// embedded without it, then every client shares one sign-in budget.
fn client_ip(parts: &Parts) -> IpAddr {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |ConnectInfo(addr)| addr.ip())
}

/// The session id the request's cookie names.
fn session_cookie(parts: &Parts) -> Option<String> {
    cookie(parts, session::COOKIE)
}

/// The value of the request's cookie `wanted` (of at most 64 bytes: ours are shorter).
fn cookie(parts: &Parts, wanted: &str) -> Option<String> {
    parts.headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(
        |pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == wanted && !value.is_empty() && value.len() <= 64).then(|| value.to_owned())
        },
    )
}

/// A request of a signed-in browser whose token is still active.
pub(crate) struct Signed {
    id: String,
    token: Zeroizing<String>,
    actor: String,
    csrf: String,
}

impl Signed {
    /// The token's name: the actor of this session's changes.
    pub(crate) fn actor(&self) -> &str {
        &self.actor
    }

    /// The CSRF token for this session's forms.
    pub(crate) fn csrf(&self) -> &str {
        &self.csrf
    }
}

impl FromRequestParts<Shared> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, console: &Shared) -> Result<Self, Response> {
        let to_sign_in = || Redirect::to("/console/sign-in").into_response();
        let id = session_cookie(parts).ok_or_else(to_sign_in)?;
        let (token, actor, csrf) = console
            .sessions
            .with(&id, |s| (s.token.clone(), s.actor.clone(), s.csrf.clone()))
            .ok_or_else(to_sign_in)?;
        // Checked again on every request: a revoked token's session ends at once.
        if dispatch::admin_token_name(&console.server, &token).is_none() {
            console.sessions.close(&id);
            return Err(Redirect::to("/console/sign-in?ended=revoked").into_response());
        }
        Ok(Signed { id, token, actor, csrf })
    }
}
