//! `GET /console/alerts`: the open alerts (or all), each acknowledged with a button.

use std::collections::HashMap;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::{Method, StatusCode};
use maud::html;
use serde::Deserialize;
use serde_json::Value;

use super::keys::refused_page;
use super::layout::{csrf_field, csrf_refused, page, time};
use super::{Shared, Signed, csrf};
use crate::wire::Alert;

#[derive(Deserialize)]
struct AlertList {
    alerts: Vec<Alert>,
}

pub(super) async fn alerts(
    State(console): State<Shared>,
    signed: Signed,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let all = q.get("all").is_some_and(|v| v == "1");
    let path = if all { "/v1/alerts" } else { "/v1/alerts?acknowledged=false" };
    let list: AlertList = match console.call(&signed.token, Method::GET, path, None).await {
        Ok(l) => l,
        Err(r) => return refused_page(&signed, &r),
    };
    let content = html! {
        h1 { "Alerts" }
        p { @if all { a href="/console/alerts" { "Open alerts only" } } @else { a href="/console/alerts?all=1" { "Acknowledged ones too" } } }
        @if list.alerts.is_empty() { p.muted { "No alerts." } } @else {
            table {
                thead { tr { th { "At" } th { "Kind" } th { "Key" } th { "Detail" } th { "Acknowledged" } } }
                tbody {
                    @for a in list.alerts.iter().rev() {
                        tr {
                            td { (time(Some(a.at))) }
                            td { (a.kind.as_str()) }
                            td.mono { a href={ "/console/keys/" (a.key_id) } { (a.key_id) } }
                            td { (a.detail) }
                            td {
                                @if a.acknowledged_at.is_some() { (time(a.acknowledged_at)) }
                                @else if let Some(id) = a.id {
                                    form method="post" action={ "/console/alerts/" (id) "/ack" } {
                                        (csrf_field(&signed))
                                        button type="submit" aria-label={ "Acknowledge alert " (id) } { "Acknowledge" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page(StatusCode::OK, "Alerts", Some(&signed), content)
}

pub(super) async fn ack(
    State(console): State<Shared>,
    signed: Signed,
    Path(id): Path<u64>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf::matches(signed.csrf(), form.get(csrf::FIELD).map(String::as_str)) {
        return csrf_refused(&signed);
    }
    match console.call::<Value>(&signed.token, Method::POST, &format!("/v1/alerts/{id}/ack"), None).await {
        Ok(_) => Redirect::to("/console/alerts").into_response(),
        Err(r) => refused_page(&signed, &r),
    }
}
