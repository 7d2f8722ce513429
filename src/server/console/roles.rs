//! `GET /console/roles`: the roles, each with a form to replace its scopes and one to
//! delete it (refused while keys hold it, unless detaching them is ticked: the CLI's
//! rules, which are the API's).

use std::collections::HashMap;

use axum::Form;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::{Method, StatusCode};
use maud::html;
use serde::Deserialize;
use serde_json::{Value, json};

use super::layout::{csrf_field, csrf_refused, message, page};
use super::{Shared, Signed, csrf};
use crate::server::model::RoleInfo;

#[derive(Deserialize)]
struct RoleList {
    roles: Vec<RoleInfo>,
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn split(list: Option<&String>) -> Vec<String> {
    list.map(|s| s.split([' ', ',', '\n', '\r', '\t']).filter(|p| !p.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default()
}

async fn render(console: &Shared, signed: &Signed, note: Option<(&str, bool)>) -> Response {
    let (roles, error) = match console.call::<RoleList>(&signed.token, Method::GET, "/v1/roles", None).await {
        Ok(l) => (l.roles, None),
        Err(r) => (Vec::new(), Some(r.message)),
    };
    let status = if note.is_some_and(|(_, error)| error) { StatusCode::BAD_REQUEST } else { StatusCode::OK };
    let content = html! {
        h1 { "Roles" }
        @if let Some((text, error)) = note { (message(text, error)) }
        @if let Some(e) = &error { (message(e, true)) }
        h2 { "Define a role" }
        form method="post" action="/console/roles" {
            (csrf_field(signed))
            label for="new-name" { "Name" }
            input #new-name type="text" name="name" required;
            label for="new-scopes" { "Scopes (separated by spaces or commas)" }
            input #new-scopes type="text" name="scopes" required;
            p { button type="submit" { "Save" } }
        }
        @for r in &roles {
            h2.mono { (r.name) }
            div.actions {
                form method="post" action="/console/roles" {
                    (csrf_field(signed))
                    input type="hidden" name="name" value=(r.name);
                    label for={ "scopes-" (r.name) } { "Scopes of " (r.name) }
                    input id={ "scopes-" (r.name) } type="text" name="scopes" value=(r.scopes.join(" "));
                    p { button type="submit" { "Save scopes" } }
                }
                form method="post" action={ "/console/roles/" (enc(&r.name)) "/delete" }
                    data-confirm={ "Delete the role " (r.name) "?" } {
                    (csrf_field(signed))
                    div.row {
                        input id={ "detach-" (r.name) } type="checkbox" name="detach" value="yes";
                        label for={ "detach-" (r.name) } { "Also remove it from the keys holding it" }
                    }
                    button.danger type="submit" { "Delete " (r.name) }
                }
            }
        }
    };
    page(status, "Roles", Some(signed), content)
}

pub(super) async fn roles(State(console): State<Shared>, signed: Signed) -> Response {
    render(&console, &signed, None).await
}

pub(super) async fn put(
    State(console): State<Shared>,
    signed: Signed,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf::matches(signed.csrf(), form.get(csrf::FIELD).map(String::as_str)) {
        return csrf_refused(&signed);
    }
    let name = form.get("name").map(|n| n.trim().to_owned()).unwrap_or_default();
    if name.is_empty() {
        return render(&console, &signed, Some(("Give the role a name.", true))).await;
    }
    let body = json!({ "scopes": split(form.get("scopes")) });
    match console.call::<Value>(&signed.token, Method::PUT, &format!("/v1/roles/{}", enc(&name)), Some(&body)).await {
        Ok(_) => Redirect::to("/console/roles").into_response(),
        Err(r) => render(&console, &signed, Some((&r.message, true))).await,
    }
}

pub(super) async fn delete(
    State(console): State<Shared>,
    signed: Signed,
    Path(name): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf::matches(signed.csrf(), form.get(csrf::FIELD).map(String::as_str)) {
        return csrf_refused(&signed);
    }
    let detach = if form.get("detach").map(String::as_str) == Some("yes") { "?detach=true" } else { "" };
    match console.call::<Value>(&signed.token, Method::DELETE, &format!("/v1/roles/{}{detach}", enc(&name)), None).await
    {
        Ok(_) => render(&console, &signed, Some((&format!("Deleted the role {name}."), false))).await,
        Err(r) => render(&console, &signed, Some((&r.message, true))).await,
    }
}
