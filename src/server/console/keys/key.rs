//! `GET /console/keys/{id}`: every field of a key, its recent audit records, and its
//! actions (rotate with a grace, revoke with confirmation, disable / enable).

use std::collections::HashMap;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::{Method, StatusCode};
use maud::{Markup, html};
use serde_json::{Value, json};

use super::badge;
use super::usage::{Span, usage};
use crate::server::console::dispatch::Refused;
use crate::server::console::layout::{csrf_field, csrf_refused, message, page, time};
use crate::server::console::{Shared, Signed, csrf};
use crate::server::model::{Alert, AuditRecord, KeyInfo};

/// Audit records the key page shows, newest first.
const RECENT_AUDIT: usize = 20;
/// The grace choices of the rotate form, in seconds.
const GRACES: &[(u64, &str)] =
    &[(0, "none: the old key stops now"), (300, "5 minutes"), (3600, "1 hour"), (86_400, "1 day"), (604_800, "7 days")];

#[derive(serde::Deserialize)]
struct AlertList {
    alerts: Vec<Alert>,
}

pub(in crate::server::console) type FormMap = HashMap<String, String>;

/// Whether the POST carries the session's CSRF token.
pub(in crate::server::console) fn csrf_ok(signed: &Signed, form: &FormMap) -> bool {
    csrf::matches(signed.csrf(), form.get(csrf::FIELD).map(String::as_str))
}

/// The page for a refusal of the API that is not about a form field.
pub(in crate::server::console) fn refused_page(signed: &Signed, r: &Refused) -> Response {
    let status =
        if r.status.is_client_error() || r.status.is_server_error() { r.status } else { StatusCode::BAD_GATEWAY };
    page(status, "Refused", Some(signed), html! { h1 { "Not done" } (message(&r.message, true)) })
}

fn encode(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

async fn render(console: &Shared, signed: &Signed, id: &str, note: Option<(&str, bool)>) -> Response {
    render_span(console, signed, id, note, Span::Hour).await
}

async fn render_span(console: &Shared, signed: &Signed, id: &str, note: Option<(&str, bool)>, span: Span) -> Response {
    let key: KeyInfo = match console.call(&signed.token, Method::GET, &format!("/v1/keys/{}", encode(id)), None).await {
        Ok(k) => k,
        Err(r) => return refused_page(signed, &r),
    };
    // The audit log has no per-key query: the key's records among the latest ones.
    let audit: Vec<AuditRecord> = match console.server.inner.store.audit(None, crate::server::api::MAX_RECORDS).await {
        Ok(all) => all.into_iter().filter(|r| r.key_id.as_deref() == Some(id)).rev().take(RECENT_AUDIT).collect(),
        Err(_) => Vec::new(),
    };
    // The newest alerts (the API answers at most 1 000), this key's.
    let alerts: Vec<Alert> = match console.call::<AlertList>(&signed.token, Method::GET, "/v1/alerts", None).await {
        Ok(l) => l.alerts.into_iter().filter(|a| a.key_id == id).rev().take(RECENT_AUDIT).collect(),
        Err(_) => Vec::new(),
    };
    let content = html! {
        h1 { (key.name) " " (badge(&key)) }
        @if let Some((text, error)) = note { (message(text, error)) }
        (fields(&key))
        (usage(console, signed, &key, span).await)
        @if !key.revoked { (actions(signed, &key)) }
        h2 { "Alerts" }
        @if alerts.is_empty() { p.muted { "None." } } @else {
            table {
                thead { tr { th { "At" } th { "Kind" } th { "Detail" } th { "Acknowledged" } } }
                tbody {
                    @for a in &alerts {
                        tr { td { (time(Some(a.at))) } td { (a.kind.as_str()) } td { (a.detail) } td { (time(a.acknowledged_at)) } }
                    }
                }
            }
            p { a href="/console/alerts" { "Acknowledge on the alerts page" } }
        }
        h2 { "Recent audit records" }
        @if audit.is_empty() { p.muted { "None." } } @else {
            table {
                thead { tr { th { "At" } th { "Action" } th { "Actor" } th { "Changes" } } }
                tbody {
                    @for r in &audit {
                        tr { td { (time(Some(r.at))) } td { (r.action) } td { (r.actor) } td.mono { (r.changes) } }
                    }
                }
            }
        }
    };
    page(StatusCode::OK, &key.name, Some(signed), content)
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() { "—".into() } else { items.join(", ") }
}

fn fields(k: &KeyInfo) -> Markup {
    html! {
        dl {
            dt { "Key id" } dd.mono { (k.key_id) }
            dt { "Display prefix" } dd.mono { (k.key_prefix) }
            dt { "Owner" } dd { (k.owner) " " a href={ "/console/usage?owner=" (percent_encoding::utf8_percent_encode(&k.owner, percent_encoding::NON_ALPHANUMERIC)) } { "(usage of this owner)" } }
            dt { "Environment" } dd { (k.environment) }
            dt { "Scopes" } dd.mono { (list_or_dash(&k.scopes)) }
            dt { "Roles" } dd.mono { (list_or_dash(&k.roles)) }
            dt { "Rate limit" } dd {
                @match &k.ratelimit { Some(rl) => { (rl.limit) " per " (rl.period_s) " s" } None => { "—" } }
            }
            dt { "Limits" } dd.mono {
                @if k.limits.is_empty() { "—" }
                @for (i, l) in k.limits.iter().enumerate() { @if i > 0 { ", " } (l) }
            }
            dt { "Credits" } dd.mono { @match &k.credits { Some(c) => { (c) } None => { "—" } } }
            dt { "Allowed networks" } dd.mono {
                @if k.allowed_networks.is_empty() { "any" } @else { (k.allowed_networks.join(", ")) }
            }
            dt { "Expires" } dd { (time(k.expires_at)) }
            dt { "Disabled" } dd { @if k.disabled { "yes" } @else { "no" } }
            dt { "Revoked" } dd { (time(k.revoked_at)) }
            dt { "Created" } dd { (time(Some(k.created_at))) }
            dt { "Updated" } dd { (time(k.updated_at)) }
            dt { "Last used" } dd { (time(k.last_used_at)) }
            dt { "Meta" } dd.mono { (k.meta) }
        }
    }
}

fn actions(signed: &Signed, k: &KeyInfo) -> Markup {
    let base = format!("/console/keys/{}", k.key_id);
    html! {
        h2 { "Actions" }
        div.actions {
            form method="post" action={ (base) "/edit" } {
                (csrf_field(signed))
                label for="edit-name" { "Name" }
                input #edit-name type="text" name="name" value=(k.name) required;
                label for="edit-scopes" { "Scopes (separated by spaces or commas)" }
                input #edit-scopes type="text" name="scopes" value=(k.scopes.join(" "));
                label for="edit-roles" { "Roles" }
                input #edit-roles type="text" name="roles" value=(k.roles.join(" "));
                label for="edit-expiry" { "Expires in (days; empty: keep, 0: never)" }
                input #edit-expiry type="text" name="expires_in_days" inputmode="numeric";
                p { button type="submit" { "Save changes" } }
            }
            form method="post" action={ (base) "/rotate" } {
                (csrf_field(signed))
                label for="grace_s" { "Rotate: the old key keeps working for" }
                div.row {
                    select #grace_s name="grace_s" {
                        @for (s, label) in GRACES { option value=(s) selected[*s == 3600] { (label) } }
                    }
                    button type="submit" { "Rotate" }
                }
            }
            form method="post" action={ (base) "/disabled" } {
                (csrf_field(signed))
                @if k.disabled {
                    input type="hidden" name="disabled" value="false";
                    button type="submit" { "Enable" }
                } @else {
                    input type="hidden" name="disabled" value="true";
                    button type="submit" { "Disable" }
                    span.muted { " Refused until enabled again; can be undone." }
                }
            }
            form method="post" action={ (base) "/revoke" } data-confirm="Revoke this key? This cannot be undone." {
                (csrf_field(signed))
                div.row {
                    input #confirm type="checkbox" name="confirm" value="yes" required;
                    label for="confirm" { "I understand that revoking cannot be undone" }
                }
                button.danger type="submit" { "Revoke" }
            }
        }
    }
}

pub(in crate::server::console) async fn show(
    State(console): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let span = q.get("usage").and_then(|s| Span::parse(s)).unwrap_or(Span::Hour);
    render_span(&console, &signed, &id, None, span).await
}

pub(in crate::server::console) async fn rotate(
    State(console): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<FormMap>,
) -> Response {
    if !csrf_ok(&signed, &form) {
        return csrf_refused(&signed);
    }
    let Some(grace_s) = form.get("grace_s").and_then(|g| g.parse::<u64>().ok()) else {
        return render(&console, &signed, &id, Some(("Choose how long the old key keeps working.", true))).await;
    };
    let path = format!("/v1/keys/{}/rotate", encode(&id));
    match console.call::<Value>(&signed.token, Method::POST, &path, Some(&json!({ "grace_s": grace_s }))).await {
        Ok(created) => super::create::show_once(&console, &signed, &created).await,
        Err(r) => render(&console, &signed, &id, Some((&r.message, true))).await,
    }
}

pub(in crate::server::console) async fn revoke(
    State(console): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<FormMap>,
) -> Response {
    if !csrf_ok(&signed, &form) {
        return csrf_refused(&signed);
    }
    if form.get("confirm").map(String::as_str) != Some("yes") {
        return render(&console, &signed, &id, Some(("Tick the confirmation to revoke the key.", true))).await;
    }
    let path = format!("/v1/keys/{}/revoke", encode(&id));
    match console.call::<Value>(&signed.token, Method::POST, &path, None).await {
        Ok(_) => render(&console, &signed, &id, Some(("The key is revoked.", false))).await,
        Err(r) => render(&console, &signed, &id, Some((&r.message, true))).await,
    }
}

pub(in crate::server::console) async fn set_disabled(
    State(console): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<FormMap>,
) -> Response {
    if !csrf_ok(&signed, &form) {
        return csrf_refused(&signed);
    }
    let disabled = match form.get("disabled").map(String::as_str) {
        Some("true") => true,
        Some("false") => false,
        _ => return render(&console, &signed, &id, Some(("Choose disable or enable.", true))).await,
    };
    let path = format!("/v1/keys/{}", encode(&id));
    match console.call::<Value>(&signed.token, Method::PATCH, &path, Some(&json!({ "disabled": disabled }))).await {
        Ok(_) => Redirect::to(&format!("/console/keys/{}", encode(&id))).into_response(),
        Err(r) => render(&console, &signed, &id, Some((&r.message, true))).await,
    }
}

fn split(list: Option<&String>) -> Vec<String> {
    list.map(|s| s.split([' ', ',', '\n', '\r', '\t']).filter(|p| !p.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default()
}

pub(in crate::server::console) async fn edit(
    State(console): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<FormMap>,
) -> Response {
    if !csrf_ok(&signed, &form) {
        return csrf_refused(&signed);
    }
    let mut patch = json!({
        "name": form.get("name").map(|n| n.trim()).unwrap_or_default(),
        "scopes": split(form.get("scopes")),
        "roles": split(form.get("roles")),
    });
    match form.get("expires_in_days").map(|d| d.trim()).filter(|d| !d.is_empty()) {
        None => {}
        Some("0") => patch["expires_at"] = Value::Null,
        Some(days) => {
            let Some(days) = days.parse::<u32>().ok().filter(|d| *d <= 36_500) else {
                return render(
                    &console,
                    &signed,
                    &id,
                    Some(("Expires in: a whole number of days, 0 to 36 500.", true)),
                )
                .await;
            };
            let at = time::OffsetDateTime::now_utc() + time::Duration::days(i64::from(days));
            patch["expires_at"] = json!(crate::server::text::rfc3339(at));
        }
    }
    let path = format!("/v1/keys/{}", encode(&id));
    match console.call::<Value>(&signed.token, Method::PATCH, &path, Some(&patch)).await {
        Ok(_) => render(&console, &signed, &id, Some(("Saved.", false))).await,
        Err(r) => render(&console, &signed, &id, Some((&r.message, true))).await,
    }
}
