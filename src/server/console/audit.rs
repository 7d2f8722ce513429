//! `GET /console/audit`: the audit log, filtered by key, actor, action and time.

use axum::extract::{Query, State};
use axum::response::Response;
use http::StatusCode;
use maud::html;
use serde::Deserialize;

use super::layout::{message, page, time};
use super::{Shared, Signed};
use crate::server::api::MAX_RECORDS;

#[derive(Deserialize, Default)]
pub(super) struct AuditQuery {
    key_id: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    /// `YYYY-MM-DDTHH:MM` (a `datetime-local` field, UTC) or RFC 3339.
    since: Option<String>,
}

fn some(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn parse_since(s: &str) -> Option<time::OffsetDateTime> {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(s, &Rfc3339).ok().or_else(|| {
        let with_seconds = if s.len() == 16 { format!("{s}:00Z") } else { format!("{s}Z") };
        time::OffsetDateTime::parse(&with_seconds, &Rfc3339).ok()
    })
}

pub(super) async fn audit(State(console): State<Shared>, signed: Signed, Query(q): Query<AuditQuery>) -> Response {
    let since_text = some(&q.since);
    let since = since_text.and_then(parse_since);
    let bad_since = since_text.is_some() && since.is_none();
    // The store reads the newest records (or those since a time); the filters narrow them.
    let records = console.server.inner.store.audit(since, MAX_RECORDS).await;
    let (records, error) = match records {
        Ok(r) => (r, None),
        Err(e) => {
            tracing::warn!(error = %e, "the console cannot read the audit log");
            (Vec::new(), Some("The store did not answer; try again."))
        }
    };
    let shown: Vec<_> = records
        .iter()
        .rev()
        .filter(|r| some(&q.key_id).is_none_or(|k| r.key_id.as_deref() == Some(k)))
        .filter(|r| some(&q.actor).is_none_or(|a| r.actor == a))
        .filter(|r| some(&q.action).is_none_or(|a| r.action.starts_with(a)))
        .collect();
    let content = html! {
        h1 { "Audit log" }
        @if let Some(e) = error { (message(e, true)) }
        form.filters method="get" action="/console/audit" role="search" {
            div { label for="key_id" { "Key id" } input #key_id type="text" name="key_id" value=(some(&q.key_id).unwrap_or("")); }
            div { label for="actor" { "Actor" } input #actor type="text" name="actor" value=(some(&q.actor).unwrap_or("")); }
            div { label for="action" { "Action (or its start, e.g. key.)" } input #action type="text" name="action" value=(some(&q.action).unwrap_or("")); }
            div {
                label for="since" { "Since (UTC)" }
                input #since type="datetime-local" name="since" value=(since_text.unwrap_or(""));
                @if bad_since { p.field-error role="alert" { "Not a time: use YYYY-MM-DDTHH:MM." } }
            }
            div { button type="submit" { "Filter" } }
        }
        p.muted { "Newest first, among the newest " (MAX_RECORDS) " records (or the first " (MAX_RECORDS) " since the time given)." }
        @if shown.is_empty() { p.muted { "No records match." } } @else {
            table {
                thead { tr { th { "At" } th { "Action" } th { "Actor" } th { "Key" } th { "Changes" } } }
                tbody {
                    @for r in &shown {
                        tr {
                            td { (time(Some(r.at))) }
                            td { (r.action) }
                            td { (r.actor) }
                            td.mono { @if let Some(k) = &r.key_id { a href={ "/console/keys/" (k) } { (k) } } @else { "—" } }
                            td.mono { (r.changes) }
                        }
                    }
                }
            }
        }
    };
    page(StatusCode::OK, "Audit log", Some(&signed), content)
}
