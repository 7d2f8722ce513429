//! `/metrics`: a key service's Prometheus text exposition, served on a listen address of
//! its own ([`KeyServer::metrics_listen`](super::KeyServer::metrics_listen)), and the
//! middleware that counts every API request by route template. The series are listed
//! in the [module docs](super#metrics).

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, Method, StatusCode, header};

use super::meters::name;
use super::state::ServerState;

/// The text exposition format, version 0.0.4.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The `route` label of a request no route matched: raw paths are never labels.
const UNMATCHED: &str = "unmatched";

/// Counts a request by route template (axum's [`MatchedPath`]), method and status class,
/// and times it to its response head.
pub(crate) async fn track(State(state): State<ServerState>, req: Request, next: Next) -> Response {
    let meters = &state.inner.meters;
    if !meters.is_on() {
        return next.run(req).await;
    }
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = method_label(req.method());
    let started = Instant::now();
    let response = next.run(req).await;
    let route = route.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
    meters.http(route, method, status_class(response.status()), started.elapsed());
    response
}

/// The router of the metrics listener: `GET /metrics`, nothing else.
pub(crate) fn exposition(state: ServerState) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n") })
        .with_state(state)
}

async fn scrape(State(state): State<ServerState>) -> Response {
    match state.render_metrics() {
        Some(body) => ([(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))], body).into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are off\n").into_response(),
    }
}

impl ServerState {
    /// The Prometheus text exposition of this key service's series (see the
    /// [module docs](super#metrics)), or `None` when metrics are off (no
    /// [`metrics_listen`](super::KeyServer::metrics_listen)). For serving `/metrics`
    /// from an application that embeds [`router`](super::router).
    pub fn render_metrics(&self) -> Option<String> {
        let meters = &self.inner.meters;
        if !meters.is_on() {
            return None;
        }
        // The counters the routes keep anyway are copied in at scrape time, rather than
        // counted twice on the request path.
        let s = self.stats();
        let counter = |series, labels: &[(&'static str, &'static str)], value: u64| {
            meters.counter(series, labels).absolute(value);
        };
        counter(name::USAGE_BATCHES, &[("result", "applied")], s.usage_batches);
        counter(name::USAGE_BATCHES, &[("result", "duplicate")], s.usage_duplicates);
        counter(name::USAGE_ROWS_RECEIVED, &[], s.usage_rows);
        counter(name::USAGE_EVENTS_RECEIVED, &[], s.usage_events);
        counter(name::USAGE_ROWS_REFUSED, &[], s.usage_rows_refused);
        counter(name::USAGE_REQUESTS, &[("result", "stored")], s.usage_requests);
        counter(name::USAGE_REQUESTS, &[("result", "refused")], s.usage_requests_refused);
        counter(name::USAGE_REQUESTS, &[("result", "unknown")], s.usage_unknown);
        counter(name::USAGE_REQUESTS, &[("result", "unattributed")], s.usage_unattributed);
        counter(name::USAGE_REPORTED, &[("kind", "dropped")], s.usage_dropped_reported);
        counter(name::USAGE_REPORTED, &[("kind", "overflowed")], s.usage_overflowed_reported);
        counter(name::USAGE_REPORTED, &[("kind", "networks_dropped")], s.usage_networks_dropped_reported);
        counter(name::EVENTS_PUBLISHED, &[], s.events_published);
        counter(name::ALERTS_RAISED, &[], s.alerts_raised);
        counter(name::RETENTION_PASSES, &[("result", "ok")], s.retention_passes);
        counter(name::RETENTION_PASSES, &[("result", "failed")], s.retention_failures);
        counter(name::RETENTION_ROWS, &[("action", "minutes_rolled_up")], s.retention_minutes_rolled_up);
        counter(name::RETENTION_ROWS, &[("action", "hours_deleted")], s.retention_hours_deleted);
        counter(name::RETENTION_ROWS, &[("action", "batch_ids_deleted")], s.retention_batch_ids_deleted);
        counter(name::EVENT_SUBSCRIBERS_REFUSED, &[], s.event_subscribers_refused);
        counter(name::VERIFY_SHED, &[], s.verify_shed);
        counter(name::VERIFY_BATCHES, &[], s.verify_batches);
        counter(name::VERIFY_BATCH_DIGESTS, &[], s.verify_batch_digests);
        counter(name::WEBHOOK_DELIVERIES, &[("result", "delivered")], s.webhook_delivered);
        counter(name::WEBHOOK_DELIVERIES, &[("result", "failed")], s.webhook_failed);
        counter(name::WEBHOOK_ATTEMPTS_FAILED, &[], s.webhook_attempts_failed);
        counter(name::KEYS_EXPIRED_BY_POLICY, &[], s.keys_expired_by_policy);
        meters.gauge(name::EVENT_SUBSCRIBERS, &[]).set(s.event_subscribers as f64);
        if self.inner.feed.is_some() {
            meters.gauge(name::FEED_CONNECTED, &[]).set(if s.change_feed_connected { 1.0 } else { 0.0 });
            counter(name::FEED_RECONNECTS, &[], s.change_feed_reconnects);
            counter(name::EVENTS_FORWARDED, &[], s.events_forwarded);
        }
        if self.inner.reconciling {
            counter(name::CREDITS_RECONCILE_PASSES, &[], s.credits_reconcile_passes);
            counter(name::CREDITS_RECONCILED, &[("holder", "key")], s.credits_reconciled_keys);
            counter(name::CREDITS_RECONCILED, &[("holder", "owner")], s.credits_reconciled_owners);
            counter(name::CREDITS_RECONCILE_ERRORS, &[("kind", "redis")], s.credits_reconcile_redis_errors);
            counter(name::CREDITS_RECONCILE_ERRORS, &[("kind", "store")], s.credits_reconcile_store_errors);
        }
        meters.render()
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}
