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
use crate::meter::{Charge, LimitEngine, Refused};
use crate::outcome::Outcome;
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
            Refused::Unavailable(retry_after) => AuthError::LimitsUnavailable { retry_after },
        }
    }
}

/// A recharge's answer: at once, or once the engine has asked its store.
pub(crate) enum Recharge {
    /// The binding limit's standing, or the refusal.
    Done(Result<Option<LimitState>, AuthError>),
    /// The request's charge is given back already; [`settle`] what this resolves to.
    Wait(Pin<Box<dyn Future<Output = Result<Option<LimitState>, Refused>> + Send>>),
}

/// Charges `cost` instead of what the request was charged. A request the layer did
/// not charge (no limits or credits, or limits off) costs nothing here.
pub(crate) fn recharge<B>(req: &mut Request<B>, cost: &Cost) -> Recharge {
    if req.extensions().get::<Charged>().is_none() {
        return Recharge::Done(Ok(None));
    }
    let Some(principal) = req.extensions().get::<Principal>().cloned() else { return Recharge::Done(Ok(None)) };
    let Some(charged) = req.extensions_mut().get_mut::<Charged>() else { return Recharge::Done(Ok(None)) };
    let Some(quota) = principal.quota() else { return Recharge::Done(Ok(None)) };
    if charged.cost == *cost {
        return Recharge::Done(Ok(None));
    }
    // Only the difference moves: what the route costs less is given back, what it costs
    // more is charged, so a fleet-wide engine never holds both costs at once.
    let (up, down) = (cost.minus(&charged.cost), charged.cost.minus(cost));
    if !down.is_free() {
        charged.engine.refund(&principal, quota, &down);
    }
    // Until the rest is settled the request holds what both costs share.
    charged.cost = charged.cost.minus(&down);
    if up.is_free() {
        charged.cost = cost.clone();
        return Recharge::Done(Ok(None));
    }
    match charged.engine.charge(&principal, quota, &up) {
        Charge::Done(result) => Recharge::Done(settle(req, cost, result)),
        Charge::Wait(fut) => Recharge::Wait(fut),
    }
}

/// Records the outcome of charging the rest of `cost` in the request: it holds all of
/// `cost`, or (refused) nothing, what it held given back.
pub(crate) fn settle<B>(
    req: &mut Request<B>,
    cost: &Cost,
    result: Result<Option<LimitState>, Refused>,
) -> Result<Option<LimitState>, AuthError> {
    let principal = req.extensions().get::<Principal>().cloned();
    let Some(charged) = req.extensions_mut().get_mut::<Charged>() else { return result.map_err(AuthError::from) };
    match result {
        Ok(state) => {
            charged.cost = cost.clone();
            Ok(state)
        }
        Err(refused) => {
            if let Some(quota) = principal.as_ref().and_then(Principal::quota) {
                charged.engine.refund(principal.as_ref().expect("has a quota"), quota, &charged.cost);
            }
            charged.cost = Cost::free();
            Err(refused.into())
        }
    }
}

/// Gives back what the request was charged (a policy refused it after the charge).
pub(crate) fn refund<B>(req: &mut Request<B>) {
    // Charging nothing never waits.
    let _ = recharge(req, &Cost::free());
}

/// The service that was driven to readiness goes with the request; a clone stays.
pub(crate) fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

/// What a route layer's request waits on when its recharge asks the engine's store.
pub(crate) type BoxAfterRecharge<F> = Pin<Box<dyn Future<Output = (<F as Future>::Output, Option<Outcome>)> + Send>>;

/// A route layer's request once a waiting recharge settled: the inner service's
/// response with the route's standing written, or the rejection; and the denial to
/// report, if it was refused.
pub(crate) async fn after_recharge<S, ReqB, ResB>(
    wait: Pin<Box<dyn Future<Output = Result<Option<LimitState>, Refused>> + Send>>,
    mut inner: S,
    mut req: Request<ReqB>,
    cost: Cost,
    realm: Option<String>,
) -> (Result<Response<ResB>, S::Error>, Option<Outcome>)
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: RejectionBody,
{
    let result = wait.await;
    let fields_on = req.extensions().get::<LayerContext>().is_some_and(|c| c.rejections.ratelimit_fields);
    match settle(&mut req, &cost, result) {
        Ok(state) => {
            let mut res = match inner.call(req).await {
                Ok(res) => res,
                Err(e) => return (Err(e), None),
            };
            if let Some(state) = state.filter(|_| fields_on) {
                state.write_fields(res.headers_mut());
            }
            (Ok(res), None)
        }
        Err(err) => {
            tracing::debug!(reason = %err, "keygate: route cost refused");
            let res = match req.extensions().get::<LayerContext>() {
                Some(ctx) => ctx.rejections.render(&err, is_grpc(&req), realm.as_deref()),
                None => err.to_http_response(realm.as_deref().unwrap_or("api")),
            };
            (Ok(res), Some(err.outcome()))
        }
    }
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
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqB: Send + 'static,
    ResB: RejectionBody + 'static,
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
        let done = match recharge(&mut req, &self.cost) {
            Recharge::Done(done) => done,
            Recharge::Wait(wait) => {
                let inner = take_ready(&mut self.inner);
                let fut = Box::pin(after_recharge(wait, inner, req, self.cost.clone(), None));
                return CostFuture { kind: CostKind::Waiting { fut }, state: None, report };
            }
        };
        match done {
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
    pub struct CostFuture<F: Future, ResB> {
        #[pin]
        kind: CostKind<F, ResB>,
        state: Option<LimitState>,
        report: Option<InnerReport>,
    }
}

pin_project! {
    #[project = CostKindProj]
    enum CostKind<F: Future, ResB> {
        Inner { #[pin] fut: F },
        Waiting { fut: BoxAfterRecharge<F> },
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
            CostKindProj::Waiting { fut } => {
                let (res, denied) = ready!(fut.as_mut().poll(cx));
                if let (Some(report), Some(denied)) = (this.report.as_mut(), denied) {
                    report.denied = Some(denied);
                }
                res?
            }
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
