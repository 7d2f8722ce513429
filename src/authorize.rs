//! [`RequireScopes`]: what a route (or a gRPC method) needs from the key.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::RejectionBody;
use crate::charge::{self, BoxAfterRecharge, LimitFields, Recharge};
use crate::context::{InnerReport, LayerContext};
use crate::cost::Cost;
use crate::error::{AuthError, Rejections, is_grpc};
use crate::principal::Principal;
use crate::scope::{Requirement, RequirementError};

/// A per-route (or per-gRPC-method) requirement, checked against the request's
/// [`Principal`]. Scopes are written `resource:action`, roles `role(NAME)`; a bare word
/// is an error (see [`Requirement`]). Not met: 403 `insufficient_scope`, with the
/// requirement's scopes in `scope="…"` (none when it names only roles) and its scopes
/// and roles in the body's `required_scopes` and `required_roles`. No principal because
/// an optional [`ApiKeyLayer`](crate::ApiKeyLayer) let an anonymous request through:
/// 401. No keygate layer in front at all: 500 (a misconfiguration, never silently
/// allowed).
///
/// For axum, add it with `route_layer` so that it is attached to what the router
/// matched, never re-derived from the raw path (path tricks like `/a/../b`, `%2F` or a
/// trailing slash then either match the route, requirement included, or match nothing):
///
/// ```
/// use axum::{Router, routing::get};
/// use keygate::{ApiKeyLayer, RequireScopes, StaticVerifier};
///
/// let app: Router = Router::new()
///     .route(
///         "/reports",
///         get(|| async { "reports" })
///             .route_layer(RequireScopes::expr("reports:read AND (billing:write OR role(admin))")),
///     )
///     .route("/admin", get(|| async { "admin" }).route_layer(RequireScopes::role("admin")))
///     .route("/health", get(|| async { "ok" }))
///     .layer(ApiKeyLayer::new(StaticVerifier::new()).optional());
/// ```
///
/// For tonic, one layer maps gRPC method paths to requirements; methods not in the map
/// are denied unless told otherwise:
///
/// ```
/// use keygate::RequireScopes;
///
/// let policy = RequireScopes::methods()
///     .method("/reports.Reports/Get", "reports:read")
///     .method("/reports.Reports/Delete", "reports:write AND role(admin)");
/// ```
#[derive(Clone)]
#[must_use]
pub struct RequireScopes {
    policy: Arc<Policy>,
}

#[derive(Debug)]
struct Policy {
    rule: Rule,
    /// `None`: the ApiKeyLayer's realm.
    realm: Option<Arc<str>>,
    /// The route's cost, or the methods' without one of their own (`None`: the
    /// layer's).
    cost: Option<Cost>,
    /// gRPC methods' own costs.
    method_costs: HashMap<String, Cost>,
}

#[derive(Debug)]
enum Rule {
    Route(Requirement),
    Methods { map: HashMap<String, Requirement>, unlisted: Unlisted },
}

#[derive(Debug, Clone)]
enum Unlisted {
    Deny,
    Allow,
    Require(Requirement),
}

impl std::fmt::Debug for RequireScopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RequireScopes").field(&self.policy.rule).finish()
    }
}

impl RequireScopes {
    /// Every term (scope `a:b` or role `role(name)`) must hold. Panics on an invalid
    /// term (a bare word among them), so a bad requirement stops the service at startup;
    /// [`try_all`](Self::try_all) returns the error instead.
    pub fn all<I, S>(terms: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::try_all(terms).unwrap_or_else(|e| panic!("RequireScopes::all: {e}"))
    }

    /// At least one term must hold. Panics on an invalid term; see [`try_any`](Self::try_any).
    pub fn any<I, S>(terms: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::try_any(terms).unwrap_or_else(|e| panic!("RequireScopes::any: {e}"))
    }

    /// An expression such as `reports:read AND (billing:write OR role(admin))`. Panics on
    /// a parse error, with its position; see [`try_expr`](Self::try_expr).
    pub fn expr(expr: &str) -> Self {
        Self::try_expr(expr).unwrap_or_else(|e| panic!("RequireScopes::expr({expr:?}): {e}"))
    }

    /// The key must carry the role `name` (written without `role(…)`). Panics on an
    /// invalid name; see [`try_role`](Self::try_role).
    ///
    /// ```
    /// use keygate::RequireScopes;
    ///
    /// let admin_only = RequireScopes::role("admin"); // the same as RequireScopes::expr("role(admin)")
    /// ```
    pub fn role(name: &str) -> Self {
        Self::try_role(name).unwrap_or_else(|e| panic!("RequireScopes::role({name:?}): {e}"))
    }

    /// Keys of this environment only: the same as `RequireScopes::expr("env(NAME)")`. A
    /// key of another environment gets 403 `wrong_environment`; combine with scopes in an
    /// expression (`"reports:read AND env(live)"`). Panics on a name that is not
    /// `[a-z][a-z0-9_-]{0,31}`.
    ///
    /// ```
    /// use keygate::RequireScopes;
    ///
    /// let live_only = RequireScopes::environment("live");
    /// ```
    pub fn environment(name: &str) -> Self {
        match Requirement::environment(name) {
            Ok(requirement) => Self::requirement(requirement),
            Err(e) => panic!("RequireScopes::environment({name:?}): {e}"),
        }
    }

    /// [`all`](Self::all), returning the error.
    pub fn try_all<I, S>(terms: I) -> Result<Self, RequirementError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Requirement::all(terms).map(Self::requirement)
    }

    /// [`any`](Self::any), returning the error.
    pub fn try_any<I, S>(terms: I) -> Result<Self, RequirementError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Requirement::any(terms).map(Self::requirement)
    }

    /// [`role`](Self::role), returning the error.
    pub fn try_role(name: &str) -> Result<Self, RequirementError> {
        Requirement::role(name).map(Self::requirement)
    }

    /// [`expr`](Self::expr), returning the error.
    pub fn try_expr(expr: &str) -> Result<Self, RequirementError> {
        Requirement::parse(expr).map(Self::requirement)
    }

    /// A requirement built elsewhere.
    pub fn requirement(requirement: Requirement) -> Self {
        Self::from_rule(Rule::Route(requirement))
    }

    /// A map from gRPC method path (`/package.Service/Method`) to requirement, empty to
    /// start with. Methods not in the map are denied (403 / `PERMISSION_DENIED`) unless
    /// [`allow_unlisted_methods`](Self::allow_unlisted_methods) or
    /// [`unlisted_methods`](Self::unlisted_methods) says otherwise.
    pub fn methods() -> Self {
        Self::from_rule(Rule::Methods { map: HashMap::new(), unlisted: Unlisted::Deny })
    }

    /// Adds a method and its requirement expression. Panics on a parse error, or when
    /// called on a route requirement rather than [`methods`](Self::methods).
    pub fn method(self, path: &str, expr: &str) -> Self {
        let req = Requirement::parse(expr).unwrap_or_else(|e| panic!("RequireScopes::method({path:?}): {e}"));
        self.method_requirement(path, req)
    }

    /// Adds a method with a requirement built elsewhere.
    pub fn method_requirement(self, path: &str, requirement: Requirement) -> Self {
        assert!(path.starts_with('/'), "RequireScopes::method: gRPC paths look like /package.Service/Method");
        self.edit(|rule| match rule {
            Rule::Methods { map, .. } => {
                map.insert(path.to_owned(), requirement);
            }
            Rule::Route(_) => panic!("RequireScopes::method: start from RequireScopes::methods()"),
        })
    }

    /// Methods not in the map only need a verified key.
    pub fn allow_unlisted_methods(self) -> Self {
        self.set_unlisted(Unlisted::Allow)
    }

    /// Methods not in the map need `requirement`.
    pub fn unlisted_methods(self, requirement: Requirement) -> Self {
        self.set_unlisted(Unlisted::Require(requirement))
    }

    /// The realm in `WWW-Authenticate` (default: the realm of the
    /// [`ApiKeyLayer`](crate::ApiKeyLayer) in front, `api` unless set there).
    pub fn realm(self, realm: impl Into<String>) -> Self {
        let mut policy = self.into_policy();
        policy.realm = Some(Arc::from(realm.into()));
        Self { policy: Arc::new(policy) }
    }

    /// What a request of this route costs, or of every method without a
    /// [`method_cost`](Self::method_cost) (default: the layer's, [`Cost::new`] unless
    /// set there). It replaces what the layer in front charged; see [`Cost`].
    ///
    /// ```
    /// use keygate::{Cost, RequireScopes};
    ///
    /// let export = RequireScopes::all(["reports:read"]).cost(Cost::new().credits(10));
    /// ```
    pub fn cost(self, cost: Cost) -> Self {
        let mut policy = self.into_policy();
        policy.cost = Some(cost);
        Self { policy: Arc::new(policy) }
    }

    /// What a call of the gRPC method `path` costs. Panics when called on a route
    /// requirement rather than [`methods`](Self::methods).
    ///
    /// ```
    /// use keygate::{Cost, RequireScopes};
    ///
    /// let policy = RequireScopes::methods()
    ///     .method("/reports.Reports/Get", "reports:read")
    ///     .method("/reports.Reports/Export", "reports:read")
    ///     .method_cost("/reports.Reports/Export", Cost::free().limit("exports", 1).credits(50));
    /// ```
    pub fn method_cost(self, path: &str, cost: Cost) -> Self {
        assert!(path.starts_with('/'), "RequireScopes::method_cost: gRPC paths look like /package.Service/Method");
        let mut policy = self.into_policy();
        assert!(
            matches!(policy.rule, Rule::Methods { .. }),
            "RequireScopes::method_cost: start from RequireScopes::methods()"
        );
        policy.method_costs.insert(path.to_owned(), cost);
        Self { policy: Arc::new(policy) }
    }

    /// The cost this policy states for a request of `path`, if it states one.
    pub(crate) fn cost_for(&self, path: &str) -> Option<&Cost> {
        self.policy.method_costs.get(path).or(self.policy.cost.as_ref())
    }

    fn set_unlisted(self, u: Unlisted) -> Self {
        self.edit(|rule| match rule {
            Rule::Methods { unlisted, .. } => *unlisted = u,
            Rule::Route(_) => panic!("RequireScopes: unlisted methods only apply to RequireScopes::methods()"),
        })
    }

    fn from_rule(rule: Rule) -> Self {
        Self { policy: Arc::new(Policy { rule, realm: None, cost: None, method_costs: HashMap::new() }) }
    }

    fn into_policy(self) -> Policy {
        Arc::try_unwrap(self.policy).unwrap_or_else(|arc| Policy {
            rule: match &arc.rule {
                Rule::Route(r) => Rule::Route(r.clone()),
                Rule::Methods { map, unlisted } => Rule::Methods { map: map.clone(), unlisted: unlisted.clone() },
            },
            realm: arc.realm.clone(),
            cost: arc.cost.clone(),
            method_costs: arc.method_costs.clone(),
        })
    }

    fn edit(self, f: impl FnOnce(&mut Rule)) -> Self {
        let mut policy = self.into_policy();
        f(&mut policy.rule);
        Self { policy: Arc::new(policy) }
    }

    /// The policy applied to a request for `path` made with `principal` (`None`: an
    /// optional layer let it through without a key). `Ok` lets it through.
    pub(crate) fn check(&self, path: &str, principal: Option<&Principal>) -> Result<(), AuthError> {
        let requirement = match &self.policy.rule {
            Rule::Route(r) => Some(r),
            Rule::Methods { map, unlisted } => match map.get(path) {
                Some(r) => Some(r),
                None => match unlisted {
                    Unlisted::Deny => {
                        return Err(AuthError::InsufficientScope {
                            required: "a method the policy lists".into(),
                            scopes: Vec::new(),
                            roles: Vec::new(),
                        });
                    }
                    Unlisted::Allow => None,
                    Unlisted::Require(r) => Some(r),
                },
            },
        };
        let Some(principal) = principal else {
            return Err(AuthError::MissingCredentials);
        };
        match requirement {
            Some(r) if !principal.satisfies(r) && !r.allows_environment(principal.environment()) => {
                Err(AuthError::WrongEnvironment { required: r.environments().iter().map(|&e| e.to_owned()).collect() })
            }
            Some(r) if !principal.satisfies(r) => Err(AuthError::InsufficientScope {
                required: r.to_string(),
                scopes: r.scopes().iter().map(|s| s.as_str().to_owned()).collect(),
                roles: r.roles().iter().map(|&s| s.to_owned()).collect(),
            }),
            _ => Ok(()),
        }
    }

    /// The realm this policy's rejections name instead of the layer's, if it has one.
    pub(crate) fn realm_override(&self) -> Option<&str> {
        self.policy.realm.as_deref()
    }

    /// Logs a rejection this policy made: a missing layer is an operator's mistake.
    pub(crate) fn log_rejection(err: &AuthError) {
        if let AuthError::Misconfigured(what) = err {
            tracing::error!("keygate: {what}");
        } else {
            tracing::debug!(reason = %err, "keygate: requirement not met");
        }
    }
}

impl<S> Layer<S> for RequireScopes {
    type Service = RequireScopesService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireScopesService { inner, policy: self.clone() }
    }
}

/// The service [`RequireScopes`] builds.
#[derive(Clone, Debug)]
#[must_use]
pub struct RequireScopesService<S> {
    inner: S,
    policy: RequireScopes,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RequireScopesService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqB: Send + 'static,
    ResB: RejectionBody + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = RequireScopesFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let Some(ctx) = req.extensions().get::<LayerContext>() else {
            let err = AuthError::Misconfigured("RequireScopes needs an ApiKeyLayer in front of it");
            RequireScopes::log_rejection(&err);
            // No layer, so neither its realm nor its hook: keygate's own answer.
            let res = Rejections::default().render(&err, is_grpc(&req), self.policy.realm_override());
            return RequireScopesFuture { kind: Kind::Rejected { res: Some(res) }, report: None, fields: None };
        };
        let mut report = ctx.wants_outcome.then(InnerReport::default);
        #[cfg(feature = "axum")]
        if let Some(report) = report.as_mut().filter(|_| ctx.wants_route) {
            report.route = req.extensions().get::<axum::extract::MatchedPath>().cloned();
        }
        let fields_on = ctx.rejections.ratelimit_fields;
        let principal = if ctx.anonymous { None } else { req.extensions().get::<Principal>() };
        let checked = self.policy.check(req.uri().path(), principal);
        // Met: the route's cost replaces the layer's. Not met: the request does not run,
        // and costs nothing.
        let charged = match (checked, self.policy.cost_for(req.uri().path())) {
            (Ok(()), Some(cost)) => match charge::recharge(&mut req, cost) {
                Recharge::Done(done) => done,
                Recharge::Wait(wait) => {
                    let (inner, cost) = (charge::take_ready(&mut self.inner), cost.clone());
                    let realm = self.policy.realm_override().map(str::to_owned);
                    let fut = Box::pin(charge::after_recharge(wait, inner, req, cost, realm));
                    return RequireScopesFuture { kind: Kind::Waiting { fut }, report, fields: None };
                }
            },
            (Ok(()), None) => Ok(None),
            (Err(err), _) => {
                charge::refund(&mut req);
                Err(err)
            }
        };
        match charged {
            Ok(state) => {
                let fields = state.filter(|_| fields_on).map(LimitFields);
                RequireScopesFuture { kind: Kind::Inner { fut: self.inner.call(req) }, report, fields }
            }
            Err(err) => {
                RequireScopes::log_rejection(&err);
                if let Some(report) = report.as_mut() {
                    report.denied = Some(err.outcome());
                }
                let ctx = req.extensions().get::<LayerContext>().expect("found above");
                let res = ctx.rejections.render(&err, is_grpc(&req), self.policy.realm_override());
                RequireScopesFuture { kind: Kind::Rejected { res: Some(res) }, report, fields: None }
            }
        }
    }
}

pin_project! {
    /// The future of [`RequireScopesService`].
    pub struct RequireScopesFuture<F: Future, ResB> {
        #[pin]
        kind: Kind<F, ResB>,
        report: Option<InnerReport>,
        fields: Option<LimitFields>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F: Future, ResB> {
        Inner { #[pin] fut: F },
        Waiting { fut: BoxAfterRecharge<F> },
        Rejected { res: Option<Response<ResB>> },
    }
}

impl<F, ResB, E> Future for RequireScopesFuture<F, ResB>
where
    F: Future<Output = Result<Response<ResB>, E>>,
{
    type Output = Result<Response<ResB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = match this.kind.project() {
            KindProj::Inner { fut } => ready!(fut.poll(cx))?,
            KindProj::Waiting { fut } => {
                let (res, denied) = ready!(fut.as_mut().poll(cx));
                if let (Some(report), Some(denied)) = (this.report.as_mut(), denied) {
                    report.denied = Some(denied);
                }
                res?
            }
            KindProj::Rejected { res } => res.take().expect("RequireScopesFuture polled after completion"),
        };
        if let Some(fields) = this.fields.take() {
            fields.0.write_fields(res.headers_mut());
        }
        if let Some(mut report) = this.report.take() {
            // A denial made further in (a nested policy, the principal extractor) is
            // the one that decided the request.
            if let Some(inner) = res.extensions().get::<InnerReport>() {
                report.denied = report.denied.or(inner.denied);
            }
            res.extensions_mut().insert(report);
        }
        Poll::Ready(Ok(res))
    }
}
