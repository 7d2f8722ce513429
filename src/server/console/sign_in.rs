//! Sign-in with an admin token, and sign-out.

use std::collections::HashMap;

use axum::Form;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::StatusCode;
use http::header::{HeaderValue, SET_COOKIE};
use http::request::Parts;
use maud::html;
use zeroize::Zeroizing;

use super::csrf::SIGN_IN_COOKIE;
use super::layout::{message, page};
use super::session::COOKIE;
use super::{BASE, Console, Shared, Signed, client_ip, cookie, csrf, dispatch};
use crate::principal::RateLimit;

/// The sign-in page, with a fresh pre-session token: its cookie and its form field.
fn sign_in_page(console: &Console, status: StatusCode, note: Option<(&str, bool)>) -> Response {
    let issued = console.sign_in_key.issue(now_s());
    let content = html! {
        h1 { "Sign in" }
        @if let Some((text, error)) = note { (message(text, error)) }
        @if let Some((_, field)) = &issued {
            form method="post" action="/console/sign-in" {
                input type="hidden" name=(csrf::FIELD) value=(field);
                label for="token" { "Admin token" }
                input #token type="password" name="token" autocomplete="off" required autofocus;
                p { button type="submit" { "Sign in" } }
            }
        } @else {
            (message("The console cannot sign anyone in now; try again later.", true))
        }
        p.muted { "The token is checked like the admin API's; the session ends after 30 minutes idle, or 12 hours, or on sign-out." }
    };
    let mut res = page(status, "Sign in", None, content);
    if let Some((nonce, _)) = issued {
        let secure = if console.config.secure_cookies { "; Secure" } else { "" };
        // Only the sign-in POST needs it back, and only for as long as the form holds.
        let cookie = format!(
            "{SIGN_IN_COOKIE}={nonce}; HttpOnly; SameSite=Strict; Path={BASE}/sign-in; Max-Age={}{secure}",
            csrf::SIGN_IN_TTL.as_secs()
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            res.headers_mut().append(SET_COOKIE, v);
        }
    }
    res
}

fn now_s() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub(super) async fn form(State(console): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let note = match q.get("ended").map(String::as_str) {
        Some("revoked") => Some(("The session ended: its token is no longer active.", true)),
        Some("out") => Some(("Signed out.", false)),
        _ => None,
    };
    sign_in_page(&console, StatusCode::OK, note)
}

pub(super) async fn submit(
    State(console): State<Shared>,
    parts: Parts,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let limit = RateLimit { limit: console.config.sign_in_per_minute, period_s: 60 };
    if console.sign_in.check(&client_ip(&parts), limit).is_err() {
        return sign_in_page(
            &console,
            StatusCode::TOO_MANY_REQUESTS,
            Some(("Too many sign-in attempts; wait a minute.", true)),
        );
    }
    let pre = cookie(&parts, SIGN_IN_COOKIE);
    if !console.sign_in_key.check(pre.as_deref(), form.get(csrf::FIELD).map(String::as_str), now_s()) {
        tracing::info!(client = %client_ip(&parts), "console sign-in refused: no valid sign-in form token");
        return sign_in_page(
            &console,
            StatusCode::FORBIDDEN,
            Some(("This sign-in form has expired or did not come from this console: sign in again here.", true)),
        );
    }
    let token = Zeroizing::new(form.get("token").map(|t| t.trim().to_owned()).unwrap_or_default());
    let Some(actor) = dispatch::admin_token_name(&console.server, &token) else {
        tracing::info!(client = %client_ip(&parts), "console sign-in refused");
        return sign_in_page(&console, StatusCode::UNAUTHORIZED, Some(("That is not an active admin token.", true)));
    };
    let Some(id) = console.sessions.open(token, actor.clone()) else {
        tracing::error!("no randomness for a console session id");
        return sign_in_page(
            &console,
            StatusCode::SERVICE_UNAVAILABLE,
            Some(("The console cannot open a session now.", true)),
        );
    };
    tracing::info!(token = %actor, "console sign-in");
    let secure = if console.config.secure_cookies { "; Secure" } else { "" };
    let session = format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path={BASE}{secure}");
    // The browser drops the sign-in form's cookie: it has served.
    let spent = format!("{SIGN_IN_COOKIE}=; HttpOnly; SameSite=Strict; Path={BASE}/sign-in; Max-Age=0{secure}");
    let mut res = Redirect::to("/console/keys").into_response();
    for cookie in [session, spent] {
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            res.headers_mut().append(SET_COOKIE, v);
        }
    }
    res
}

pub(super) async fn sign_out(
    State(console): State<Shared>,
    signed: Signed,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf::matches(signed.csrf(), form.get(csrf::FIELD).map(String::as_str)) {
        return super::layout::csrf_refused(&signed);
    }
    console.sessions.close(&signed.id);
    tracing::info!(token = %signed.actor(), "console sign-out");
    let mut res = Redirect::to("/console/sign-in?ended=out").into_response();
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path={BASE}; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        res.headers_mut().insert(SET_COOKIE, v);
    }
    res
}
