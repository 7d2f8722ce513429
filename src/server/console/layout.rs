//! The frame of every console page, and the small pieces pages share.

use axum::response::{Html, IntoResponse, Response};
use http::StatusCode;
use maud::{DOCTYPE, Markup, html};

use super::Signed;
use super::csrf;

/// A whole page: `title`, the navigation when signed in, then `content`.
pub(crate) fn page(status: StatusCode, title: &str, signed: Option<&Signed>, content: Markup) -> Response {
    let doc = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · keygate" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body {
                header {
                    span.brand { "keygate" }
                    @if let Some(s) = signed {
                        nav aria-label="Main" {
                            a href="/console/keys" { "Keys" }
                            a href="/console/keys/new" { "Create a key" }
                            a href="/console/roles" { "Roles" }
                            a href="/console/audit" { "Audit log" }
                            a href="/console/alerts" { "Alerts" }
                            a href="/console/usage" { "Usage" }
                        }
                        span.muted { "Signed in as " strong { (s.actor()) } }
                        form method="post" action="/console/sign-out" {
                            (csrf_field(s))
                            button.plain type="submit" { "Sign out" }
                        }
                    }
                }
                main { (content) }
            }
        }
    };
    (status, Html(doc.into_string())).into_response()
}

/// The hidden CSRF field every form of a session carries.
pub(crate) fn csrf_field(s: &Signed) -> Markup {
    html! { input type="hidden" name=(csrf::FIELD) value=(s.csrf()); }
}

/// A message box: `error` in the error style.
pub(crate) fn message(text: &str, error: bool) -> Markup {
    html! {
        @if error { p.message.error role="alert" { (text) } } @else { p.message.ok role="status" { (text) } }
    }
}

/// The refusal of a POST whose CSRF token is missing or wrong: nothing was changed.
pub(crate) fn csrf_refused(signed: &Signed) -> Response {
    page(
        StatusCode::FORBIDDEN,
        "Form expired",
        Some(signed),
        html! {
            h1 { "This form has expired" }
            (message("Nothing was changed: the form did not carry this session's token. Reload the page and try again.", true))
        },
    )
}

/// `RFC 3339` time, or a dash.
pub(crate) fn time(t: Option<time::OffsetDateTime>) -> String {
    t.and_then(crate::server::text::rfc3339).unwrap_or_else(|| "—".to_owned())
}
