//! What a request was charged, and the [`Cost`] route layer that changes it.
//!
//! The [`ApiKeyLayer`](crate::ApiKeyLayer) charges its cost when it admits a key with
//! limits or credits, and puts a [`Charged`] into the request. A route's own cost
//! ([`Cost`] as a route layer, or a [`RequireScopes`](crate::RequireScopes) cost)
//! replaces it there: what was charged is given back and the route's cost charged
//! instead. A policy that then refuses the request gives the charge back too.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::RejectionBody;
use crate::context::{InnerReport, LayerContext};
use crate::cost::Cost;
use crate::error::{AuthError, is_grpc};
use crate::meter::{LimitEngine, Refused};
use crate::principal::Principal;
use crate::ratelimit::LimitState;

/// The binding limit's standing once a route's cost was charged, for the response's
/// `RateLimit` fields (opaque outside the crate).
#[derive(Debug)]
pub(crate) struct LimitFields(pub(crate) LimitState);

/// In a request's extensions once the layer charged a key that has limits or credits.
#[derive(Clone)]
pub(crate) struct Charged {
    pub(crate) engine: Arc<dyn LimitEngine>,
    /// What this request is charged now.
    pub(crate) cost: Cost,
}

impl Charged {
    /// Gives the charge back.
    pub(crate) fn give_back(&self, principal: &Principal) {
        if let Some(quota) = principal.quota() {
            self.engine.refund(principal, quota, &self.cost);
        }
    }
}

impl From<Refused> for AuthError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Limit(state) => {
                AuthError::RateLimited { retry_after: state.reset, limit: Some(state.limit), name: state.name }
            }
            Refused::Credits(retry_after) => AuthError::UsageExceeded { retry_after },
        }
    }
}

/// Charges `cost` instead of what the request was charged: `Ok` with the binding
/// limit's standing, or the refusal (the request is then charged nothing). A request
/// the layer did not charge (no limits or credits, or limits off) costs nothing here.
pub(crate) fn recharge<B>(req: &mut Request<B>, cost: &Cost) -> Result<Option<LimitState>, AuthError> {
    if req.extensions().get::<Charged>().is_none() {
        return Ok(None);
    }
    let Some(principal) = req.extensions().get::<Principal>().cloned() else { return Ok(None) };
    let Some(charged) = req.extensions_mut().get_mut::<Charged>() else { return Ok(None) };
    let Some(quota) = principal.quota() else { return Ok(None) };
    if charged.cost == *cost {
        return Ok(None);
    }
    charged.engine.refund(&principal, quota, &charged.cost);
    match charged.engine.charge(&principal, quota, cost) {
        Ok(state) => {
            charged.cost = cost.clone();
            Ok(state)
        }
        Err(refused) => {
            charged.cost = Cost::free();
            Err(refused.into())
        }
    }
}

/// Gives back what the request was charged (a policy refused it after the charge).
pub(crate) fn refund<B>(req: &mut Request<B>) {
    let _ = recharge(req, &Cost::free());
}

impl<S> Layer<S> for Cost {
    type Service = CostService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CostService { inner, cost: self.clone() }
    }
}

/// The service [`Cost`] builds as a route layer.
#[derive(Clone, Debug)]
#[must_use]
pub struct CostService<S> {
    inner: S,
    cost: Cost,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for CostService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: RejectionBody,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = CostFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        // No keygate layer in front, or a key it charged nothing: the route's cost has
        // nothing to draw from.
        let Some(ctx) = req.extensions().get::<LayerContext>() else {
            return CostFuture { kind: CostKind::Inner { fut: self.inner.call(req) }, state: None, report: None };
        };
        let mut report = ctx.wants_outcome.then(|| InnerReport::for_request(&req, ctx));
        let fields_on = ctx.rejections.ratelimit_fields;
        match recharge(&mut req, &self.cost) {
            Ok(state) => {
                let state = state.filter(|_| fields_on);
                CostFuture { kind: CostKind::Inner { fut: self.inner.call(req) }, state, report }
            }
            Err(err) => {
                tracing::debug!(reason = %err, "keygate: route cost refused");
                if let Some(report) = report.as_mut() {
                    report.denied = Some(err.outcome());
                }
                let ctx = req.extensions().get::<LayerContext>().expect("found above");
                let res = ctx.rejections.render(&err, is_grpc(&req), None);
                CostFuture { kind: CostKind::Rejected { res: Some(res) }, state: None, report }
            }
        }
    }
}

pin_project! {
    /// The future of [`CostService`].
    pub struct CostFuture<F, ResB> {
        #[pin]
        kind: CostKind<F, ResB>,
        state: Option<LimitState>,
        report: Option<InnerReport>,
    }
}

pin_project! {
    #[project = CostKindProj]
    enum CostKind<F, ResB> {
        Inner { #[pin] fut: F },
        Rejected { res: Option<Response<ResB>> },
    }
}

impl<F, ResB, E> Future for CostFuture<F, ResB>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<ResB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = match this.kind.project() {
            CostKindProj::Inner { fut } => ready!(fut.poll(cx))?,
            CostKindProj::Rejected { res } => res.take().expect("CostFuture polled after completion"),
        };
        // The route's standing, set before the layer in front writes its own (which
        // leaves fields already set alone).
        if let Some(state) = this.state.take() {
            state.write_fields(res.headers_mut());
        }
        if let Some(mut report) = this.report.take() {
            // A denial or route found further in (a policy behind this layer) stands.
            if let Some(inner) = res.extensions().get::<InnerReport>() {
                report.denied = report.denied.or(inner.denied);
                #[cfg(feature = "axum")]
                if inner.route.is_some() {
                    report.route.clone_from(&inner.route);
                }
            }
            res.extensions_mut().insert(report);
        }
        Poll::Ready(Ok(res))
    }
}
