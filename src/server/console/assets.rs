//! The console's stylesheet and script, compiled into the binary.

use axum::response::IntoResponse;
use http::header::{CONTENT_TYPE, HeaderValue};

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

pub(super) async fn css() -> impl IntoResponse {
    ([(CONTENT_TYPE, HeaderValue::from_static("text/css; charset=utf-8"))], CSS)
}

pub(super) async fn js() -> impl IntoResponse {
    ([(CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8"))], JS)
}
