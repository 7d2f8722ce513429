//! What handlers get: the [`Principal`] extractor and its rejection.
//!
//! A handler that takes `Principal` needs a verified key. Behind an
//! [`optional`](crate::ApiKeyLayer::optional) layer an anonymous request is answered
//! with the layer's own missing-key rejection (401, or its
//! [`on_rejection`](crate::ApiKeyLayer::on_rejection) hook), exactly as if the route
//! had required a key. `Option<Principal>` is `None` there instead. Only a route that
//! no keygate layer protects at all is a 500: that is a deployment mistake, never an
//! anonymous caller.

use std::sync::Arc;

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, Response};
use http::request::Parts;

use crate::context::{InnerReport, LayerContext};
use crate::error::{AuthError, Rejections};
use crate::outcome::Outcome;
use crate::principal::Principal;

/// Why a handler got no [`Principal`]: the request was anonymous (an optional layer let
/// it through without a key; answered like the layer's own missing-key rejection), or
/// no keygate layer ran in front of the route (answered with 500 and logged as an
/// error).
///
/// ```
/// use axum::{Router, routing::get};
/// use keygate::{ApiKeyLayer, Principal, StaticVerifier};
///
/// let app: Router = Router::new()
///     // Anonymous callers get the layer's 401 here...
///     .route("/me", get(|p: Principal| async move { p.key_id().to_owned() }))
///     // ...and `None` here.
///     .route("/", get(|p: Option<Principal>| async move { if p.is_some() { "hello, key" } else { "hello" } }))
///     .layer(ApiKeyLayer::new(StaticVerifier::new()).optional());
/// ```
#[derive(Debug, Clone)]
pub struct MissingPrincipal {
    error: AuthError,
    // The layer's way of answering; `None` when there is no layer.
    layer: Option<Layer>,
}

#[derive(Debug, Clone)]
struct Layer {
    rejections: Arc<Rejections>,
    grpc: bool,
    report: Option<InnerReport>,
}

impl MissingPrincipal {
    fn anonymous(ctx: &LayerContext, parts: &Parts) -> Self {
        let report = ctx.wants_outcome.then(|| InnerReport {
            denied: Some(Outcome::NoKey),
            route: ctx.wants_route.then(|| parts.extensions.get::<axum::extract::MatchedPath>().cloned()).flatten(),
        });
        let grpc = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        Self {
            error: AuthError::MissingCredentials,
            layer: Some(Layer { rejections: ctx.rejections.clone(), grpc, report }),
        }
    }

    fn no_layer() -> Self {
        Self {
            error: AuthError::Misconfigured(
                "no keygate principal in the request: is ApiKeyLayer applied to this route?",
            ),
            layer: None,
        }
    }

    /// Whether an optional layer let the request through without a key (rather than no
    /// layer running at all).
    pub fn is_anonymous(&self) -> bool {
        self.layer.is_some()
    }

    /// The rejection this answers with: [`AuthError::MissingCredentials`] for an
    /// anonymous request, [`AuthError::Misconfigured`] without a layer.
    pub fn auth_error(&self) -> &AuthError {
        &self.error
    }
}

impl std::fmt::Display for MissingPrincipal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error {
            AuthError::Misconfigured(what) => f.write_str(what),
            other => std::fmt::Display::fmt(other, f),
        }
    }
}

impl std::error::Error for MissingPrincipal {}

impl IntoResponse for MissingPrincipal {
    fn into_response(self) -> Response {
        match self.layer {
            Some(layer) => {
                tracing::debug!("keygate: anonymous request to a handler that needs a principal");
                let mut res: Response = layer.rejections.render(&self.error, layer.grpc, None);
                if let Some(report) = layer.report {
                    res.extensions_mut().insert(report);
                }
                res
            }
            None => {
                tracing::error!("keygate: {self}");
                self.error.into_response()
            }
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = MissingPrincipal;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(p.clone());
        }
        Err(match parts.extensions.get::<LayerContext>() {
            Some(ctx) if ctx.anonymous => MissingPrincipal::anonymous(ctx, parts),
            _ => MissingPrincipal::no_layer(),
        })
    }
}

/// `Option<Principal>`: `None` on routes an [`optional`](crate::ApiKeyLayer::optional)
/// layer let through without a key. Without any keygate layer it is still an error,
/// so that a forgotten layer never looks like an anonymous caller.
impl<S: Send + Sync> OptionalFromRequestParts<S> for Principal {
    type Rejection = MissingPrincipal;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(Some(p.clone()));
        }
        if parts.extensions.get::<LayerContext>().is_some_and(|c| c.anonymous) {
            return Ok(None);
        }
        Err(MissingPrincipal::no_layer())
    }
}
