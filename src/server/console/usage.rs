//! `GET /console/usage`: one owner's usage over the last hour, day or week: its keys
//! with the most requests and with the most denials, and the sums over all its keys,
//! from the usage aggregates the middlewares upload.

use axum::extract::{Query, State};
use axum::response::Response;
use http::StatusCode;
use maud::{Markup, html};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use super::keys::usage::Span;
use super::layout::{message, page};
use super::{Shared, Signed};
use crate::server::store::{KeyFilter, KeyUsage, OwnerUsage};

/// Keys in each top list.
const TOP: u32 = 20;
/// Owners offered in the picker.
const OWNERS: u32 = 500;
/// Longest owner name read from the query.
const MAX_OWNER: usize = 256;

#[derive(Deserialize, Default)]
pub(super) struct UsageQuery {
    owner: Option<String>,
    /// `hour`, `day` or `week`.
    span: Option<String>,
}

pub(super) async fn usage(State(console): State<Shared>, signed: Signed, Query(q): Query<UsageQuery>) -> Response {
    let owner = q.owner.as_deref().map(str::trim).filter(|o| !o.is_empty() && o.len() <= MAX_OWNER);
    let span = q.span.as_deref().and_then(Span::parse).unwrap_or(Span::Day);
    let store = &console.server.inner.store;
    let owners = store.key_owners(OWNERS).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the console cannot list owners");
        Vec::new()
    });
    let body = match owner {
        None => html! { p.muted { "Pick an owner to see its keys' usage." } },
        Some(owner) => {
            let (from, to) = span.window(time::OffsetDateTime::now_utc().unix_timestamp());
            let has_keys = store
                .page_keys(&KeyFilter { owner: Some(owner.to_owned()), ..KeyFilter::default() }, 1)
                .await
                .map(|k| !k.is_empty());
            match (has_keys, store.owner_usage(owner, from, to, TOP).await) {
                (Ok(false), _) => html! { p.empty.muted { "No keys belong to " strong { (owner) } "." } },
                (Ok(true), Ok(usage)) => report(owner, span, &usage),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "the console cannot read an owner's usage");
                    message("The store did not answer; try again.", true)
                }
            }
        }
    };
    let content = html! {
        h1 { "Usage per owner" }
        form.filters method="get" action="/console/usage" role="search" {
            div {
                label for="owner" { "Owner" }
                input #owner type="text" name="owner" list="owners" value=(owner.unwrap_or("")) maxlength="256" required;
                datalist #owners { @for o in &owners { option value=(o) {} } }
            }
            div {
                label for="span" { "Window" }
                select #span name="span" {
                    @for s in [Span::Hour, Span::Day, Span::Week] {
                        option value=(s.name()) selected[s == span] { "last " (s.name()) }
                    }
                }
            }
            div { button type="submit" { "Show" } }
        }
        (body)
    };
    page(StatusCode::OK, "Usage per owner", Some(&signed), content)
}

fn report(owner: &str, span: Span, usage: &OwnerUsage) -> Markup {
    let t = &usage.total;
    html! {
        h2 { (owner) ", last " (span.name()) }
        dl.totals #totals data-requests=(t.requests) data-allowed=(t.allowed) data-denied=(t.denied) data-keys=(usage.keys_used) {
            dt { "Requests" } dd { (t.requests) }
            dt { "Allowed" } dd { (t.allowed) }
            dt { "Denied" } dd { (t.denied) }
            dt { "Keys with traffic" } dd { (usage.keys_used) }
        }
        @if t.requests == 0 {
            p.empty.muted { "No usage recorded for " strong { (owner) } " in the last " (span.name()) "." }
        } @else {
            h3 { "Top keys by requests" }
            (top_table("top-requests", &usage.top_requests))
            h3 { "Top keys by denials" }
            @if usage.top_denied.is_empty() { p.muted { "No request was denied." } }
            @else { (top_table("top-denied", &usage.top_denied)) }
        }
        p.muted { "At most " (TOP) " keys in each list. " a href={ "/console/keys?q=" (utf8_percent_encode(owner, NON_ALPHANUMERIC)) } { "All keys matching this owner" } }
    }
}

fn top_table(id: &str, keys: &[KeyUsage]) -> Markup {
    html! {
        table id=(id) {
            thead { tr { th { "Key" } th { "Key id" } th.num { "Requests" } th.num { "Allowed" } th.num { "Denied" } } }
            tbody {
                @for k in keys {
                    tr data-key=(k.key_id) data-requests=(k.requests) data-denied=(k.denied) {
                        td { a href={ "/console/keys/" (k.key_id) } { (k.name) } }
                        td.mono { (k.key_id) }
                        td.num { (k.requests) }
                        td.num { (k.allowed) }
                        td.num { (k.denied) }
                    }
                }
            }
        }
    }
}
