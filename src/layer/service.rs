//! [`ApiKeyService`] and its future: the request path, in the order a request takes it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::record::Record;
use super::{Config, Shared};
use crate::authorize::RequireScopes;
use crate::body::RejectionBody;
use crate::charge::{Charged, take_ready};
use crate::context::{InnerReport, LayerContext};
use crate::error::{AuthError, InvalidKey, http_status_of_grpc, is_grpc};
use crate::extract::{find_key, strip_credential};
use crate::key::ApiKey;
use crate::meter::{Charge, Refused};
use crate::outcome::Outcome;
use crate::principal::Principal;
use crate::ratelimit::LimitState;
use crate::verify::{Verdict, Verifier, VerifyError};

/// The service [`ApiKeyLayer`](super::ApiKeyLayer) builds.
#[must_use]
pub struct ApiKeyService<S, V> {
    inner: S,
    // One Arc: axum clones route services for every request.
    shared: Arc<Shared<V>>,
}

impl<S, V> ApiKeyService<S, V> {
    pub(super) fn new(inner: S, shared: Arc<Shared<V>>) -> Self {
        Self { inner, shared }
    }
}

impl<S: Clone, V> Clone for ApiKeyService<S, V> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), shared: self.shared.clone() }
    }
}

impl<S: std::fmt::Debug, V> std::fmt::Debug for ApiKeyService<S, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyService")
            .field("inner", &self.inner)
            .field("verifier", &std::any::type_name::<V>())
            .field("config", &self.shared.config)
            .finish()
    }
}

/// The verifier's answer, with the ready service and the request it will take.
type BoxVerify<S, B> = Pin<Box<dyn Future<Output = (Result<Verdict, VerifyError>, S, Request<B>)> + Send>>;

/// The limit engine's answer, with what the request was charged, its principal, the
/// ready service and the request.
type BoxCharge<S, B> =
    Pin<Box<dyn Future<Output = (Result<Option<LimitState>, Refused>, Charged, Principal, S, Request<B>)> + Send>>;

/// What the layer decided once the key was verified: let in (with the outcome and the
/// binding limit's standing), or wait for the limit engine.
enum Admit {
    In(Outcome, Option<LimitState>),
    Charging(Charging),
}

/// A charge the limit engine is still deciding.
struct Charging {
    fut: Pin<Box<dyn Future<Output = Result<Option<LimitState>, Refused>> + Send>>,
    charged: Charged,
    principal: Principal,
}

impl Charging {
    fn boxed<S: Send + 'static, B: Send + 'static>(self, inner: S, req: Request<B>) -> BoxCharge<S, B> {
        let Self { fut, charged, principal } = self;
        Box::pin(async move { (fut.await, charged, principal, inner, req) })
    }
}

impl<S, V, ReqB, ResB> Service<Request<ReqB>> for ApiKeyService<S, V>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    V: Verifier,
    ReqB: Send + 'static,
    ResB: RejectionBody,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let config = &self.shared.config;
        let grpc = is_grpc(&req);
        let mut record = config.usage.as_ref().map(|_| Record::start(&req, &config.client_ip));
        // A disabled span still costs a callsite check per use; skip it entirely when
        // nobody listens at debug level.
        let span = if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug_span!("keygate", key_id = tracing::field::Empty)
        } else {
            tracing::Span::none()
        };
        let state = match config.take_key(&mut req) {
            Err(err) => State::rejected(err, false),
            Ok(None) => match config.let_in(&mut req, None, record.as_ref()) {
                Ok(()) => State::Inner {
                    fut: call_inner(&mut self.inner, req, &span),
                    outcome: Outcome::Anonymous,
                    limit: None,
                },
                Err(rejection) => rejection,
            },
            // A verdict the verifier already holds (a cache hit) needs no future, and the
            // inner service that was just driven to readiness takes the request at once.
            Ok(Some(key)) => match self.shared.verifier.verify_now(&key) {
                Some(result) => match config.admit(result, &mut req, &span, &mut record) {
                    Ok(Admit::In(outcome, limit)) => {
                        State::Inner { fut: call_inner(&mut self.inner, req, &span), outcome, limit }
                    }
                    Ok(Admit::Charging(charging)) => {
                        State::Charge { fut: charging.boxed(take_ready(&mut self.inner), req) }
                    }
                    Err(rejection) => rejection,
                },
                None => {
                    // The request, the ready service and the verifier call travel in one
                    // box, so the common future stays small.
                    let shared = self.shared.clone();
                    let inner = take_ready(&mut self.inner);
                    let client = config.client_ip.trusted(&req);
                    State::Verify {
                        fut: Box::pin(async move {
                            let result = shared.verifier.verify_from(&key, client).await;
                            (result, inner, req)
                        }),
                    }
                }
            },
        };
        ResponseFuture { state, shared: self.shared.clone(), grpc, record, span }
    }
}

impl Config {
    /// Extract and check format: the key, `None` when the request has none, or the
    /// rejection. No verifier is asked about a key that fails here.
    fn take_key<B>(&self, req: &mut Request<B>) -> Result<Option<ApiKey>, AuthError> {
        let Some(found) = find_key(req, &self.sources, self.max_key_len)? else {
            return if self.optional { Ok(None) } else { Err(AuthError::MissingCredentials) };
        };
        self.format.check(&found.key).map_err(|e| AuthError::InvalidKey(InvalidKey::Format(e)))?;
        if !self.keep_credentials {
            strip_credential(req, &self.sources[found.source]);
        }
        Ok(Some(found.key))
    }

    /// Verify's answer, then the key's own limits, then the route's policy. The usage
    /// record and the span learn the key id whatever the answer. Admitted: the outcome,
    /// and where the key stands against its rate limit if it has one; or the charge
    /// the limit engine has yet to decide.
    fn admit<S, B>(
        &self,
        result: Result<Verdict, VerifyError>,
        req: &mut Request<B>,
        span: &tracing::Span,
        record: &mut Option<Record>,
    ) -> Result<Admit, State<S, B>>
    where
        S: Service<Request<B>>,
    {
        match &result {
            Ok(Verdict::Valid(p)) => {
                span.record("key_id", p.key_id());
                if let Some(r) = record.as_mut() {
                    r.verified(p);
                }
            }
            Ok(Verdict::Invalid { key_id: Some(id), .. }) => {
                span.record("key_id", &**id);
                if let Some(r) = record.as_mut() {
                    r.refused(id);
                }
            }
            _ => {}
        }
        let principal = match result {
            Ok(verdict) => verdict.admit().map_err(|reason| State::rejected(AuthError::refused(reason), false))?,
            Err(VerifyError::Throttled { retry_after }) => {
                let err = AuthError::RateLimited { retry_after, limit: None, name: None };
                return Err(State::rejected(err, false));
            }
            Err(e) => {
                // The circuit logged once when it opened; every request it turns away
                // would flood the log.
                if matches!(e, VerifyError::CircuitOpen) {
                    tracing::debug!("keygate: key service known to be down (circuit open), failing closed");
                } else {
                    tracing::warn!(error = %e, "keygate: key service unavailable, failing closed");
                }
                return Err(State::rejected(AuthError::Unavailable { retry_after: self.retry_after }, false));
            }
        };
        // Before the route's policy: the answer is the same whatever the key may do here.
        if principal.has_network_rules() && !principal.allows_client(self.client_ip.trusted(req)) {
            tracing::debug!(key_id = principal.key_id(), "keygate: request from outside the key's networks");
            return Err(State::rejected(AuthError::IpNotAllowed, false));
        }
        // The one branch a key without limits or credits pays.
        let (engine, quota) = match (&self.engine, principal.quota()) {
            (Some(engine), Some(quota)) => (engine, quota),
            _ => return self.enter(req, principal, None, None, record.as_ref()).map(|(o, l)| Admit::In(o, l)),
        };
        let policy_cost = self.policy.as_ref().and_then(|p| p.cost_for(req.uri().path()));
        let charged = Charged { engine: engine.clone(), cost: policy_cost.unwrap_or(&self.cost).clone() };
        match engine.charge(&principal, quota, &charged.cost) {
            Charge::Done(result) => {
                let state = result.map_err(|r| State::rejected(r.into(), false))?;
                let (outcome, limit) = self.enter(req, principal, state, Some(charged), record.as_ref())?;
                Ok(Admit::In(outcome, limit))
            }
            Charge::Wait(fut) => Ok(Admit::Charging(Charging { fut, charged, principal })),
        }
    }

    /// The key was charged (`charged`, with the binding limit's standing `limit`) or
    /// has nothing to charge: the route's policy, then in.
    fn enter<S, B>(
        &self,
        req: &mut Request<B>,
        principal: Principal,
        limit: Option<LimitState>,
        charged: Option<Charged>,
        record: Option<&Record>,
    ) -> Result<(Outcome, Option<LimitState>), State<S, B>>
    where
        S: Service<Request<B>>,
    {
        let outcome = if principal.is_fail_open() { Outcome::FailOpen } else { Outcome::Allowed };
        let refund = charged.map(|charged| {
            req.extensions_mut().insert(charged.clone());
            (charged, principal.clone())
        });
        if let Err(rejection) = self.let_in(req, Some(principal), record) {
            // Refused by the policy: a request that does not run costs nothing.
            if let Some((charged, principal)) = refund {
                charged.give_back(&principal);
            }
            return Err(rejection);
        }
        Ok((outcome, limit))
    }

    /// The layer's own policy, then the request carries the principal and the context
    /// inner keygate layers read.
    fn let_in<S, B>(
        &self,
        req: &mut Request<B>,
        principal: Option<Principal>,
        record: Option<&Record>,
    ) -> Result<(), State<S, B>>
    where
        S: Service<Request<B>>,
    {
        if let Some(policy) = &self.policy {
            policy.check(req.uri().path(), principal.as_ref()).map_err(|err| State::rejected(err, true))?;
        }
        // Behind another keygate layer that already verified (and stripped) the key, the
        // request is not anonymous: that layer's principal stands.
        let anonymous = principal.is_none() && req.extensions().get::<Principal>().is_none();
        if let Some(principal) = principal {
            req.extensions_mut().insert(principal);
        }
        req.extensions_mut().insert(LayerContext {
            rejections: self.rejections.clone(),
            anonymous,
            wants_outcome: record.is_some(),
            wants_route: record.is_some_and(Record::wants_route),
        });
        Ok(())
    }
}

/// Calls the inner service inside the span, when there is one.
fn call_inner<S: Service<R>, R>(inner: &mut S, req: R, span: &tracing::Span) -> S::Future {
    if span.is_none() { inner.call(req) } else { span.in_scope(|| inner.call(req)) }
}

pin_project! {
    /// The future of [`ApiKeyService`].
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
        shared: Arc<dyn SharedConfig>,
        grpc: bool,
        record: Option<Record>,
        span: tracing::Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        Verify { fut: BoxVerify<S, B> },
        Charge { fut: BoxCharge<S, B> },
        Inner { #[pin] fut: S::Future, outcome: Outcome, limit: Option<LimitState> },
        // `by_policy`: the layer's own policy refused, and its realm answers.
        Rejected { err: Option<AuthError>, by_policy: bool },
    }
}

impl<S: Service<Request<B>>, B> State<S, B> {
    fn rejected(err: AuthError, by_policy: bool) -> Self {
        Self::Rejected { err: Some(err), by_policy }
    }
}

/// The parts of the layer's configuration its futures need, without the verifier type.
trait SharedConfig: Send + Sync {
    fn config(&self) -> &Config;
}

impl<V: Verifier> SharedConfig for Shared<V> {
    fn config(&self) -> &Config {
        &self.config
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>> + Send + 'static,
    B: Send + 'static,
    ResB: RejectionBody,
{
    type Output = Result<Response<ResB>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = (!this.span.is_none()).then(|| this.span.enter());
        loop {
            let config = this.shared.config();
            match this.state.as_mut().project() {
                StateProj::Verify { fut } => {
                    let (result, mut inner, mut req) = ready!(fut.as_mut().poll(cx));
                    let next = match config.admit(result, &mut req, this.span, this.record) {
                        Ok(Admit::In(outcome, limit)) => State::Inner { fut: inner.call(req), outcome, limit },
                        Ok(Admit::Charging(charging)) => State::Charge { fut: charging.boxed(inner, req) },
                        Err(rejection) => rejection,
                    };
                    this.state.set(next);
                }
                StateProj::Charge { fut } => {
                    let (result, charged, principal, mut inner, mut req) = ready!(fut.as_mut().poll(cx));
                    let next = match result {
                        Err(refused) => State::rejected(refused.into(), false),
                        Ok(limit) => {
                            match config.enter(&mut req, principal, limit, Some(charged), this.record.as_ref()) {
                                Ok((outcome, limit)) => State::Inner { fut: inner.call(req), outcome, limit },
                                Err(rejection) => rejection,
                            }
                        }
                    };
                    this.state.set(next);
                }
                StateProj::Inner { fut, outcome, limit } => {
                    let outcome = *outcome;
                    let mut res = ready!(fut.poll(cx))?;
                    if let Some(limit) = limit.as_ref().filter(|_| config.rejections.ratelimit_fields) {
                        limit.write_fields(res.headers_mut());
                    }
                    if let (Some(record), Some(sink)) = (this.record.take(), config.usage.as_ref()) {
                        let report = res.extensions().get::<InnerReport>();
                        let outcome = report.and_then(|r| r.denied).unwrap_or(outcome);
                        let status = if *this.grpc { http_status_of_grpc(&res) } else { res.status().as_u16() };
                        record.finish(&**sink, status, outcome, reported_route(report));
                    }
                    return Poll::Ready(Ok(res));
                }
                StateProj::Rejected { err, by_policy } => {
                    let err = err.take().expect("keygate ResponseFuture polled after completion");
                    log_rejection(&err);
                    if let (Some(record), Some(sink)) = (this.record.take(), config.usage.as_ref()) {
                        record.finish(&**sink, err.status().as_u16(), err.outcome(), None);
                    }
                    let realm = config.policy.as_ref().filter(|_| *by_policy).and_then(RequireScopes::realm_override);
                    return Poll::Ready(Ok(config.rejections.render(&err, *this.grpc, realm)));
                }
            }
        }
    }
}

#[cfg(feature = "axum")]
fn reported_route(report: Option<&InnerReport>) -> Option<&str> {
    report.and_then(|r| r.route.as_ref()).map(|m| m.as_str())
}

#[cfg(not(feature = "axum"))]
fn reported_route(_: Option<&InnerReport>) -> Option<&str> {
    None
}

fn log_rejection(err: &AuthError) {
    // The precise reason goes to the log at debug level; the client sees the generic one.
    match err {
        AuthError::InvalidKey(InvalidKey::Malformed(why)) => tracing::debug!(reason = why, "keygate: malformed key"),
        AuthError::InvalidKey(InvalidKey::Format(e)) => {
            tracing::debug!(reason = %e, "keygate: key failed format check")
        }
        AuthError::InvalidKey(InvalidKey::Rejected(r)) => tracing::debug!(reason = r.code(), "keygate: key rejected"),
        other => tracing::debug!(reason = %other, outcome = other.outcome().as_str(), "keygate: request rejected"),
    }
}
