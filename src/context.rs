//! What keygate's layers tell each other about one request.
//!
//! The layer, the per-route policy and the principal extractor read these types; of the
//! rest of the crate this module reads only how the layer answers ([`Rejections`]).
//!
//! Two messages cross between an outer [`ApiKeyLayer`](crate::ApiKeyLayer) and the
//! [`RequireScopes`](crate::RequireScopes) or handlers behind it:
//! - inward, in the request: [`LayerContext`], inserted by the layer into every request
//!   it lets through. Its presence is how an inner policy knows a layer ran at all;
//! - outward, in the response: [`InnerReport`], inserted by an inner policy when the
//!   outer layer asked for it, carrying what only the inner side knows: the route
//!   template axum matched (the outer layer runs before routing) and the policy's
//!   denial, so that the usage event records both.

use std::sync::Arc;

use crate::error::Rejections;
use crate::outcome::Outcome;

/// In a request's extensions once an `ApiKeyLayer` has let it through.
#[derive(Debug, Clone)]
pub(crate) struct LayerContext {
    /// How the layer answers (realm, challenge, the service's own hook), for
    /// rejections made further in.
    pub(crate) rejections: Arc<Rejections>,
    /// Let through without a key by an optional layer.
    pub(crate) anonymous: bool,
    /// The layer records usage: an inner policy reports its denials in an
    /// [`InnerReport`].
    pub(crate) wants_outcome: bool,
    /// ...and it has no route template: the report carries the one the router matched.
    /// (Only axum's router has templates.)
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) wants_route: bool,
}

/// In a response's extensions when an inner policy has something to report outward.
#[derive(Debug, Clone, Default)]
pub(crate) struct InnerReport {
    /// The inner policy turned the request away with this outcome.
    pub(crate) denied: Option<Outcome>,
    /// The route template the router matched.
    #[cfg(feature = "axum")]
    pub(crate) route: Option<axum::extract::MatchedPath>,
}

impl InnerReport {
    /// The report of an inner layer for `req`: the route the router matched, when the
    /// outer layer asked for it.
    pub(crate) fn for_request<B>(req: &http::Request<B>, ctx: &LayerContext) -> Self {
        #[cfg_attr(not(feature = "axum"), allow(unused_mut))]
        let mut report = Self::default();
        #[cfg(feature = "axum")]
        if ctx.wants_route {
            report.route = req.extensions().get::<axum::extract::MatchedPath>().cloned();
        }
        #[cfg(not(feature = "axum"))]
        let _ = (req, ctx);
        report
    }
}
