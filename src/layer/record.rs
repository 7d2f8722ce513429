//! The usage record a request accumulates on its way through the layer.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderName, HeaderValue, Method, Request};

use super::client_ip::ClientIp;
use crate::outcome::Outcome;
use crate::principal::Principal;
use crate::usage::{DecidedRequest, UsageSink};

/// Longest raw path kept as a usage event's route when no route template is known.
const MAX_RAW_ROUTE_LEN: usize = 128;
/// Longest `x-request-id` kept.
const MAX_REQUEST_ID_LEN: usize = 128;
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What a usage event needs from the request, captured only when a sink is set.
pub(super) struct Record {
    start: Instant,
    method: Method,
    route: RouteSource,
    client_ip: Option<IpAddr>,
    request_id: Option<HeaderValue>,
    /// The verified key, also when it was then refused (expired, rate limited).
    principal: Option<Principal>,
    /// The id of an existing key that was refused (revoked, disabled, expired).
    denied_key_id: Option<Arc<str>>,
}

impl Record {
    pub(super) fn start<B>(req: &Request<B>, client_ip: &ClientIp) -> Self {
        Self {
            start: Instant::now(),
            method: req.method().clone(),
            route: RouteSource::of(req),
            client_ip: client_ip.of(req),
            // A clone of a header value shares its bytes: no copy until a sink wants one.
            request_id: req.headers().get(X_REQUEST_ID).cloned(),
            principal: None,
            denied_key_id: None,
        }
    }

    /// Whether the route is still to be learnt from an inner policy.
    pub(super) fn wants_route(&self) -> bool {
        !self.route.is_template()
    }

    pub(super) fn verified(&mut self, principal: &Principal) {
        self.principal = Some(principal.clone());
    }

    pub(super) fn refused(&mut self, key_id: &Arc<str>) {
        self.denied_key_id = Some(key_id.clone());
    }

    /// Hands the decided request to `sink`. `route`: the template an inner policy reported.
    pub(super) fn finish(self, sink: &dyn UsageSink, status: u16, outcome: Outcome, route: Option<&str>) {
        let route = route.unwrap_or_else(|| self.route.as_str());
        let mut request = DecidedRequest::new(self.start, &self.method, route, status, outcome)
            .with_client_ip(self.client_ip)
            .with_request_id(
                self.request_id.as_ref().and_then(|v| v.to_str().ok()).map(|v| cut(v, MAX_REQUEST_ID_LEN)),
            );
        if let Some(p) = &self.principal {
            request = request.with_key(p.key_id_arc(), Some(p.owner_arc()));
        } else if let Some(id) = &self.denied_key_id {
            request = request.with_key(id, None);
        }
        sink.record(&request);
    }
}

/// Where a usage event's route comes from, kept cheaply until the event is built.
enum RouteSource {
    /// The template axum matched (when keygate runs inside routing).
    #[cfg(feature = "axum")]
    Matched(axum::extract::MatchedPath),
    /// The request's path: the gRPC method, or the raw path.
    Path(Option<http::uri::PathAndQuery>),
}

impl RouteSource {
    fn of<B>(req: &Request<B>) -> Self {
        #[cfg(feature = "axum")]
        if let Some(m) = req.extensions().get::<axum::extract::MatchedPath>() {
            return Self::Matched(m.clone());
        }
        // A clone of a parsed path shares its bytes: no copy here.
        Self::Path(req.uri().path_and_query().cloned())
    }

    fn is_template(&self) -> bool {
        match self {
            #[cfg(feature = "axum")]
            Self::Matched(_) => true,
            Self::Path(_) => false,
        }
    }

    /// The template, the gRPC method, or the raw path cut short (it may carry ids; it
    /// is never the query).
    fn as_str(&self) -> &str {
        match self {
            #[cfg(feature = "axum")]
            Self::Matched(m) => m.as_str(),
            Self::Path(pq) => {
                let path = cut(pq.as_ref().map_or("/", |pq| pq.path()), MAX_RAW_ROUTE_LEN);
                // A path may carry UTF-8 control characters (U+0080–U+009F): no report
                // shows them, and the key service refuses rows that hold them.
                match path.find(char::is_control) {
                    Some(0) => "/",
                    Some(end) => &path[..end],
                    None => path,
                }
            }
        }
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
