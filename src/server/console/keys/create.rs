//! Creating a key, and showing a new raw key once.
//!
//! The raw key of a create or rotate is kept in the session and shown by the next
//! `GET /console/keys/{id}/created`, which takes it out: a reload, or coming back with
//! the browser's history, finds it gone (and `Cache-Control: no-store` keeps the browser
//! from replaying the page from its cache).

use std::collections::HashMap;

use axum::Form;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::{Method, StatusCode};
use maud::{Markup, html};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use super::key::{FormMap, csrf_ok};
use crate::server::console::layout::{csrf_field, csrf_refused, message, page};
use crate::server::console::{Shared, Signed};

/// The form's fields, in order: (name, label, hint).
const FIELDS: &[(&str, &str, &str)] = &[
    ("owner", "Owner", "Who holds the key: a team, a customer, a service."),
    ("name", "Name", "What the key is for."),
    ("environment", "Environment", "Default: live. Keys of `test` get their own prefix."),
    ("scopes", "Scopes", "Separated by spaces or commas, e.g. reports:read billing:write."),
    ("roles", "Roles", "Role names, separated by spaces or commas."),
    ("expires_in_days", "Expires in (days)", "Empty: never."),
];

fn split(list: Option<&String>) -> Vec<String> {
    list.map(|s| s.split([' ', ',', '\n', '\r', '\t']).filter(|p| !p.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default()
}

fn form_page(status: StatusCode, signed: &Signed, values: &FormMap, error: Option<(&str, Option<&str>)>) -> Response {
    let (general, field) = match error {
        Some((text, Some(f))) if FIELDS.iter().any(|(n, ..)| *n == f) => (None, Some((f, text))),
        Some((text, _)) => (Some(text), None),
        None => (None, None),
    };
    let content = html! {
        h1 { "Create a key" }
        @if let Some(text) = general { (message(text, true)) }
        form method="post" action="/console/keys/new" {
            (csrf_field(signed))
            @for (name, label, hint) in FIELDS {
                (field_row(name, label, hint, values, field))
            }
            p { button type="submit" { "Create" } }
        }
    };
    page(status, "Create a key", Some(signed), content)
}

fn field_row(name: &str, label: &str, hint: &str, values: &FormMap, error: Option<(&str, &str)>) -> Markup {
    let value = values.get(name).map_or("", String::as_str);
    let hint_id = format!("{name}-hint");
    html! {
        label for=(name) { (label) }
        input id=(name) type="text" name=(name) value=(value) aria-describedby=(hint_id)
            required[name == "owner" || name == "name"];
        small.muted id=(hint_id) { (hint) }
        @if let Some((f, text)) = error { @if f == name { p.field-error role="alert" { (text) } } }
    }
}

pub(in crate::server::console) async fn new_form(signed: Signed) -> Response {
    let defaults: FormMap = HashMap::from([("environment".to_owned(), "live".to_owned())]);
    form_page(StatusCode::OK, &signed, &defaults, None)
}

pub(in crate::server::console) async fn create(
    State(console): State<Shared>,
    signed: Signed,
    Form(form): Form<FormMap>,
) -> Response {
    if !csrf_ok(&signed, &form) {
        return csrf_refused(&signed);
    }
    let text = |f: &str| form.get(f).map(|s| s.trim().to_owned()).unwrap_or_default();
    let mut body = json!({
        "owner": text("owner"),
        "name": text("name"),
        "scopes": split(form.get("scopes")),
        "roles": split(form.get("roles")),
    });
    let environment = text("environment");
    if !environment.is_empty() {
        body["environment"] = json!(environment);
    }
    let days = text("expires_in_days");
    if !days.is_empty() {
        let Some(days) = days.parse::<u32>().ok().filter(|d| (1..=36_500).contains(d)) else {
            let err = ("a whole number of days, 1 to 36 500", Some("expires_in_days"));
            return form_page(StatusCode::BAD_REQUEST, &signed, &form, Some(err));
        };
        let at = time::OffsetDateTime::now_utc() + time::Duration::days(i64::from(days));
        body["expires_at"] = json!(crate::server::text::rfc3339(at));
    }
    match console.call::<Value>(&signed.token, Method::POST, "/v1/keys", Some(&body)).await {
        Ok(created) => show_once(&console, &signed, &created).await,
        Err(r) => {
            let status = if r.status.is_client_error() { StatusCode::BAD_REQUEST } else { r.status };
            form_page(status, &signed, &form, Some((&r.message, r.field())))
        }
    }
}

/// Keeps the raw key of a create or rotate answer in the session and sends the browser
/// to the page that shows it once.
pub(in crate::server::console) async fn show_once(console: &Shared, signed: &Signed, created: &Value) -> Response {
    let (Some(id), Some(raw)) = (created["key_id"].as_str(), created["key"].as_str()) else {
        return page(StatusCode::BAD_GATEWAY, "Error", Some(signed), message("The key service answered oddly.", true));
    };
    let id = id.to_owned();
    let raw = Zeroizing::new(raw.to_owned());
    console.sessions.with(&signed.id, |s| s.reveal = Some((id.clone(), raw)));
    let path = format!(
        "/console/keys/{}/created",
        percent_encoding::utf8_percent_encode(&id, percent_encoding::NON_ALPHANUMERIC)
    );
    Redirect::to(&path).into_response()
}

pub(in crate::server::console) async fn reveal(
    State(console): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
) -> Response {
    let raw = console
        .sessions
        .with(&signed.id, |s| match &s.reveal {
            Some((for_id, _)) if *for_id == id => s.reveal.take().map(|(_, raw)| raw),
            _ => None,
        })
        .flatten();
    let key_page =
        format!("/console/keys/{}", percent_encoding::utf8_percent_encode(&id, percent_encoding::NON_ALPHANUMERIC));
    let content = html! {
        h1 { "New key" }
        @if let Some(raw) = &raw {
            (message("Copy the key now: it is shown this once and cannot be shown again.", false))
            label for="raw-key" { "The key" }
            code.secret #raw-key { (raw.as_str()) }
            p { button type="button" data-copy="raw-key" { "Copy to clipboard" } }
        } @else {
            (message("This key was shown once and cannot be shown again. Rotate the key for a new one.", true))
        }
        p { a href=(key_page) { "Go to the key" } }
    };
    page(StatusCode::OK, "New key", Some(&signed), content)
}
