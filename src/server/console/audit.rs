//! `GET /console/audit`: the audit log, filtered by key, actor, action and time, paged
//! newer and older by record id.

use axum::extract::{Query, State};
use axum::response::Response;
use http::StatusCode;
use maud::html;
use serde::Deserialize;

use super::layout::{message, page, time};
use super::{Shared, Signed};
use crate::server::store::{AuditFilter, AuditPage};

#[derive(Deserialize, Default)]
pub(super) struct AuditQuery {
    key_id: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    /// `YYYY-MM-DDTHH:MM` (a `datetime-local` field, UTC) or RFC 3339.
    since: Option<String>,
    /// Records older than this id (the page after one read newest first).
    before: Option<i64>,
    /// Records newer than this id.
    after: Option<i64>,
    per_page: Option<u32>,
}

/// Records per page by default, and at most.
const PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
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
    let per_page = q.per_page.unwrap_or(PAGE).clamp(1, MAX_PAGE);
    let at = match (q.before, q.after) {
        (Some(id), _) => AuditPage::Before(id),
        (None, Some(id)) => AuditPage::After(id),
        (None, None) => AuditPage::Newest,
    };
    let filter = AuditFilter {
        key_id: some(&q.key_id).map(str::to_owned),
        actor: some(&q.actor).map(str::to_owned),
        action_prefix: some(&q.action).map(str::to_owned),
        since,
    };
    // One more than shown: whether the page has a neighbour on its far side.
    let found = console.server.inner.store.audit_page(&filter, at, per_page + 1).await;
    let (mut records, error) = match found {
        Ok(r) => (r, None),
        Err(e) => {
            tracing::warn!(error = %e, "the console cannot read the audit log");
            (Vec::new(), Some("The store did not answer; try again."))
        }
    };
    let beyond = records.len() > per_page as usize;
    if beyond {
        match at {
            // Read upwards: the extra one is the newest.
            AuditPage::After(_) => {
                records.remove(0);
            }
            _ => records.truncate(per_page as usize),
        }
    }
    // Newer records exist past a page read downwards from a record (that record at
    // least); older ones past a page read upwards from one.
    let (newer, older) = match at {
        AuditPage::Newest => (false, beyond),
        AuditPage::Before(_) => (true, beyond),
        AuditPage::After(_) => (beyond, true),
    };
    let base_query = format!(
        "key_id={}&actor={}&action={}&since={}&per_page={per_page}",
        enc(some(&q.key_id).unwrap_or("")),
        enc(some(&q.actor).unwrap_or("")),
        enc(some(&q.action).unwrap_or("")),
        enc(since_text.unwrap_or("")),
    );
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
            input type="hidden" name="per_page" value=(per_page);
            div { button type="submit" { "Filter" } }
        }
        p.muted { "Newest first, " (per_page) " a page." }
        @if records.is_empty() { p.muted { "No records match." } } @else {
            table {
                thead { tr { th { "At" } th { "Action" } th { "Actor" } th { "Key" } th { "Changes" } } }
                tbody {
                    @for (id, r) in &records {
                        tr data-id=(id) {
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
        nav.row aria-label="Audit pages" {
            @if at != AuditPage::Newest { a href={ "/console/audit?" (base_query) } { "Newest" } }
            @if newer {
                @if let Some((first, _)) = records.first() {
                    a rel="prev" href={ "/console/audit?" (base_query) "&after=" (first) } { "Newer" }
                }
            }
            @if older {
                @if let Some((last, _)) = records.last() {
                    a rel="next" href={ "/console/audit?" (base_query) "&before=" (last) } { "Older" }
                }
            }
        }
    };
    page(StatusCode::OK, "Audit log", Some(&signed), content)
}
