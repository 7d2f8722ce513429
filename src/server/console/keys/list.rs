//! `GET /console/keys`: search, filters, sorting by column and cursor paging over any
//! number of keys (oldest first by default).

use axum::extract::{Query, State};
use axum::response::Response;
use http::StatusCode;
use maud::html;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;

use super::badge;
use crate::server::console::layout::{message, page, time};
use crate::server::console::{Shared, Signed};
use crate::server::store::{KeyCursor, KeyFilter, KeySort, KeySortBy, KeyState};

/// Keys per page by default, and at most.
const PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;
/// Longest search text.
const MAX_SEARCH: usize = 128;

#[derive(Deserialize, Default)]
pub(in crate::server::console) struct ListQuery {
    q: Option<String>,
    environment: Option<String>,
    state: Option<String>,
    after: Option<String>,
    per_page: Option<u32>,
    /// `created`, `name`, `owner` or `last_used`, `:desc` for largest first.
    sort: Option<String>,
}

fn some(s: &Option<String>) -> Option<String> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned)
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

pub(in crate::server::console) async fn list(
    State(console): State<Shared>,
    signed: Signed,
    Query(q): Query<ListQuery>,
) -> Response {
    let per_page = q.per_page.unwrap_or(PAGE).clamp(1, MAX_PAGE);
    let search = some(&q.q).map(|s| s.chars().take(MAX_SEARCH).collect::<String>());
    let state_name = some(&q.state);
    // An unknown order is the default one; a cursor of another order starts over.
    let sort = some(&q.sort).and_then(|s| KeySort::parse(&s)).unwrap_or_default();
    let filter = KeyFilter {
        after: some(&q.after).and_then(|c| KeyCursor::parse(&c)).filter(|c| c.sort() == sort),
        owner: None,
        search: search.clone(),
        environment: some(&q.environment),
        state: state_name.as_deref().and_then(KeyState::parse),
        expiring_within: console.server.inner.alerts.expiring_within,
        sort,
    };
    // One more than shown: whether a next page exists.
    let found = console.server.inner.store.page_keys(&filter, per_page + 1).await;
    let (keys, error) = match found {
        Ok(keys) => (keys, None),
        Err(e) => {
            tracing::warn!(error = %e, "the console cannot list keys");
            (Vec::new(), Some("The store did not answer; try again."))
        }
    };
    let more = keys.len() > per_page as usize;
    let shown = &keys[..keys.len().min(per_page as usize)];
    // The filters, kept by the sort links; the sort too, kept by the paging links.
    let filter_query = format!(
        "q={}&environment={}&state={}&per_page={per_page}",
        enc(search.as_deref().unwrap_or("")),
        enc(filter.environment.as_deref().unwrap_or("")),
        enc(state_name.as_deref().unwrap_or("")),
    );
    let base_query = format!("{filter_query}&sort={}", enc(&sort.to_string()));
    // A column's header links to its ascending order, or to the descending one when the
    // list is in its ascending order already.
    let header = |by: KeySortBy, label: &str| {
        let next = KeySort { by, descending: sort.by == by && !sort.descending };
        let href = format!("/console/keys?{filter_query}&sort={}", enc(&next.to_string()));
        let (aria, mark) = match (sort.by == by, sort.descending) {
            (true, false) => ("ascending", " ▲"),
            (true, true) => ("descending", " ▼"),
            (false, _) => ("none", ""),
        };
        let title =
            format!("Sort by {} {}", label.to_lowercase(), if next.descending { "descending" } else { "ascending" });
        html! { th aria-sort=(aria) { a.sort href=(href) title=(title) data-sort=(next.to_string()) { (label) (mark) } } }
    };
    let content = html! {
        h1 { "Keys" }
        @if let Some(e) = error { (message(e, true)) }
        form.filters method="get" action="/console/keys" role="search" {
            div {
                label for="q" { "Search owner, name, key id or prefix" }
                input #q type="search" name="q" value=(search.as_deref().unwrap_or("")) maxlength="128";
            }
            div {
                label for="environment" { "Environment" }
                input #environment type="text" name="environment" value=(filter.environment.as_deref().unwrap_or("")) maxlength="16";
            }
            div {
                label for="state" { "State" }
                select #state name="state" {
                    option value="" { "any" }
                    @for s in KeyState::ALL {
                        option value=(s.as_str()) selected[filter.state == Some(s)] {
                            @if s == KeyState::Expiring { "expiring soon" } @else { (s.as_str()) }
                        }
                    }
                }
            }
            div {
                label for="sort" { "Sort" }
                select #sort name="sort" {
                    @for by in KeySortBy::ALL {
                        @for descending in [false, true] {
                            @let option = KeySort { by, descending };
                            option value=(option.to_string()) selected[option == sort] {
                                (sort_label(option))
                            }
                        }
                    }
                }
            }
            div { button type="submit" { "Filter" } }
        }
        @if shown.is_empty() {
            p.muted { "No keys match." }
        } @else {
            table {
                thead {
                    tr {
                        (header(KeySortBy::Name, "Name"))
                        (header(KeySortBy::Owner, "Owner"))
                        th { "State" } th { "Environment" } th { "Prefix" } th { "Key id" }
                        (header(KeySortBy::Created, "Created"))
                        (header(KeySortBy::LastUsed, "Last used"))
                    }
                }
                tbody {
                    @for k in shown {
                        tr {
                            td { a href={ "/console/keys/" (k.key_id) } { (k.name) } }
                            td { a href={ "/console/usage?owner=" (enc(&k.owner)) } title="Usage of this owner" { (k.owner) } }
                            td { (badge(k)) }
                            td { (k.environment) }
                            td.mono { (k.key_prefix) }
                            td.mono { (k.key_id) }
                            td { (time(Some(k.created_at))) }
                            td { (time(k.last_used_at)) }
                        }
                    }
                }
            }
        }
        p.row {
            @if filter.after.is_some() { a href={ "/console/keys?" (base_query) } { "First page" } }
            @if more {
                @if let Some(last) = shown.last() {
                    a rel="next" href={ "/console/keys?" (base_query) "&after=" (enc(&KeyCursor::after_in(last, sort).to_string())) } { "Next page" }
                }
            }
        }
    };
    page(StatusCode::OK, "Keys", Some(&signed), content)
}

/// `Name, A to Z`, `Created, newest first`, ...
fn sort_label(sort: KeySort) -> String {
    let (name, up, down) = match sort.by {
        KeySortBy::Created => ("Created", "oldest first", "newest first"),
        KeySortBy::Name => ("Name", "A to Z", "Z to A"),
        KeySortBy::Owner => ("Owner", "A to Z", "Z to A"),
        KeySortBy::LastUsed => ("Last used", "least recently first", "most recently first"),
    };
    format!("{name}, {}", if sort.descending { down } else { up })
}
