//! The verified identity behind a request.

use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::quota::{Credits, Limit, Quota, REQUESTS};
use crate::scope::{Requirement, ScopeSet};

/// A per-key rate limit, as the key service reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct RateLimit {
    /// Requests allowed per period.
    pub limit: u64,
    /// The period in seconds.
    pub period_s: u64,
}

/// Who is calling: the key's id, owner, scopes and roles, as the verifier found them.
///
/// The layer puts a `Principal` into the request's extensions; axum handlers take it
/// as an extractor (`Principal`, or `Option<Principal>` on routes behind
/// [`ApiKeyLayer::optional`](crate::ApiKeyLayer::optional)). Cloning is one atomic
/// increment: the data sits behind an `Arc`.
///
/// ```
/// use keygate::{Principal, ScopeSet};
///
/// let p = Principal::builder("key_123")
///     .owner("acme")
///     .scopes(ScopeSet::parse(["reports:read"]).unwrap())
///     .roles(["analyst"])
///     .build();
/// assert_eq!(p.key_id(), "key_123");
/// assert!(p.has_role("analyst"));
/// ```
#[derive(Clone)]
pub struct Principal {
    inner: Arc<Inner>,
}

#[derive(Serialize)]
struct Inner {
    key_id: Arc<str>,
    owner: Arc<str>,
    name: String,
    scopes: ScopeSet,
    roles: Vec<Arc<str>>,
    environment: String,
    #[serde(with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    meta: serde_json::Value,
    ratelimit: Option<RateLimit>,
    /// The networks the key may be used from (empty: any).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    networks: Arc<[IpNet]>,
    /// The networks the owner's keys may be used from (empty: any).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    owner_networks: Arc<[IpNet]>,
    // `None` for a key with no limits and no credits: the layer's one branch.
    #[serde(skip_serializing_if = "Option::is_none")]
    quota: Option<Arc<Quota>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    fail_open: bool,
}

impl Principal {
    /// Starts a principal for `key_id`; every other field defaults to empty.
    pub fn builder(key_id: impl Into<Arc<str>>) -> PrincipalBuilder {
        PrincipalBuilder {
            inner: Inner {
                key_id: key_id.into(),
                owner: Arc::from(""),
                name: String::new(),
                scopes: ScopeSet::new(),
                roles: Vec::new(),
                environment: String::new(),
                expires_at: None,
                meta: serde_json::Value::Null,
                ratelimit: None,
                networks: Arc::from([]),
                owner_networks: Arc::from([]),
                quota: None,
                fail_open: false,
            },
            quota: Quota::default(),
        }
    }

    /// The anonymous principal a fail-open verifier lets through while the key service
    /// is down: no scopes, no roles, [`is_fail_open`](Principal::is_fail_open) true.
    pub fn fail_open() -> Self {
        let mut b = Self::builder("");
        b.inner.fail_open = true;
        b.build()
    }

    /// The key's id (not secret).
    pub fn key_id(&self) -> &str {
        &self.inner.key_id
    }

    /// The key's id as a shared string (cheap to keep in events and spans).
    pub fn key_id_arc(&self) -> &Arc<str> {
        &self.inner.key_id
    }

    /// Who owns the key.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// The owner as a shared string.
    pub fn owner_arc(&self) -> &Arc<str> {
        &self.inner.owner
    }

    /// The key's human name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Effective scopes (the key's own plus its roles').
    pub fn scopes(&self) -> &ScopeSet {
        &self.inner.scopes
    }

    /// Role names.
    pub fn roles(&self) -> &[Arc<str>] {
        &self.inner.roles
    }

    /// Whether the key carries `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.inner.roles.iter().any(|r| &**r == role)
    }

    /// `live`, `test`, or whatever the key service uses.
    pub fn environment(&self) -> &str {
        &self.inner.environment
    }

    /// When the key stops working, if ever.
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        self.inner.expires_at
    }

    /// Free-form metadata from the key service.
    pub fn meta(&self) -> &serde_json::Value {
        &self.inner.meta
    }

    /// The metadata read as `T` (a struct of yours, a map, a number…).
    ///
    /// The error names `T` and says what did not match (a missing field, a wrong
    /// type); like serde_json's own messages, it may quote the mismatched metadata
    /// value, never the API key.
    ///
    /// ```
    /// use keygate::Principal;
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Plan {
    ///     tier: String,
    ///     seats: u32,
    /// }
    ///
    /// let p = Principal::builder("key_1").meta(serde_json::json!({"tier": "pro", "seats": 5})).build();
    /// let plan: Plan = p.meta_as().unwrap();
    /// assert_eq!((plan.tier.as_str(), plan.seats), ("pro", 5));
    ///
    /// let empty = Principal::builder("key_2").build();
    /// let err = empty.meta_as::<Plan>().err().unwrap();
    /// assert!(err.to_string().contains("Plan"));
    /// ```
    pub fn meta_as<T: DeserializeOwned>(&self) -> Result<T, MetaError> {
        T::deserialize(&self.inner.meta).map_err(|source| MetaError { target: std::any::type_name::<T>(), source })
    }

    /// The key's own rate limit, if it carries one.
    pub fn ratelimit(&self) -> Option<RateLimit> {
        self.inner.ratelimit
    }

    /// The networks the key may be used from; empty: any.
    pub fn allowed_networks(&self) -> &[IpNet] {
        &self.inner.networks
    }

    /// The networks the owner's keys may be used from; empty: any.
    pub fn owner_allowed_networks(&self) -> &[IpNet] {
        &self.inner.owner_networks
    }

    /// Whether a request from `client` may use the key: inside the key's networks and
    /// the owner's, where either has a list. An unknown address (`None`) passes only
    /// when neither has one.
    pub fn allows_client(&self, client: Option<std::net::IpAddr>) -> bool {
        let inside = |networks: &[IpNet]| {
            networks.is_empty() || client.is_some_and(|ip| networks.iter().any(|n| n.contains(&ip)))
        };
        inside(&self.inner.networks) && inside(&self.inner.owner_networks)
    }

    /// Whether the key or its owner restricts the networks it may be used from.
    pub(crate) fn has_network_rules(&self) -> bool {
        !self.inner.networks.is_empty() || !self.inner.owner_networks.is_empty()
    }

    /// The key's named limits (the `requests` one included, when
    /// [`ratelimit`](Self::ratelimit) is set).
    pub fn limits(&self) -> &[Limit] {
        self.inner.quota.as_deref().map_or(&[], |q| &q.limits)
    }

    /// The key's own credits, if it has any.
    pub fn credits(&self) -> Option<&Credits> {
        self.inner.quota.as_deref().and_then(|q| q.credits.as_ref())
    }

    /// The owner's limits, shared by all of the owner's keys.
    pub fn owner_limits(&self) -> &[Limit] {
        self.inner.quota.as_deref().map_or(&[], |q| &q.owner_limits)
    }

    /// The owner's credits, shared by all of the owner's keys.
    pub fn owner_credits(&self) -> Option<&Credits> {
        self.inner.quota.as_deref().and_then(|q| q.owner_credits.as_ref())
    }

    /// Everything the key may spend, or `None` when it has no limits and no credits.
    pub fn quota(&self) -> Option<&Arc<Quota>> {
        self.inner.quota.as_ref()
    }

    /// True for the anonymous principal of a fail-open verifier.
    pub fn is_fail_open(&self) -> bool {
        self.inner.fail_open
    }

    /// Whether the principal meets `requirement`.
    pub fn satisfies(&self, requirement: &Requirement) -> bool {
        requirement.is_satisfied_in(&self.inner.scopes, &self.inner.roles, self.environment())
    }

    /// Whether the key has expired at `now`.
    pub fn is_expired_at(&self, now: OffsetDateTime) -> bool {
        self.inner.expires_at.is_some_and(|e| e <= now)
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt_as("Principal", f)
    }
}

impl fmt::Debug for PrincipalBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt_as("PrincipalBuilder", f)
    }
}

impl Inner {
    /// Metadata is left out: it is the key service's free-form JSON, and may hold
    /// anything its operators put there.
    fn fmt_as(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(name)
            .field("key_id", &self.key_id)
            .field("owner", &self.owner)
            .field("scopes", &self.scopes)
            .field("roles", &self.roles)
            .field("fail_open", &self.fail_open)
            .finish_non_exhaustive()
    }
}

impl Serialize for Principal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.inner.serialize(s)
    }
}

/// The key's metadata does not have the shape asked for; see [`Principal::meta_as`].
#[derive(Debug, thiserror::Error)]
#[error("key metadata does not match `{target}`: {source}")]
pub struct MetaError {
    target: &'static str,
    source: serde_json::Error,
}

impl MetaError {
    /// The Rust type the metadata was read as (`std::any::type_name`).
    pub fn target(&self) -> &'static str {
        self.target
    }
}

/// Builds a [`Principal`]; see [`Principal::builder`].
#[must_use]
pub struct PrincipalBuilder {
    inner: Inner,
    quota: Quota,
}

impl PrincipalBuilder {
    /// The owner.
    pub fn owner(mut self, owner: impl Into<Arc<str>>) -> Self {
        self.inner.owner = owner.into();
        self
    }
    /// The key's human name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.inner.name = name.into();
        self
    }
    /// Effective scopes.
    pub fn scopes(mut self, scopes: ScopeSet) -> Self {
        self.inner.scopes = scopes;
        self
    }
    /// Role names.
    pub fn roles<I, S>(mut self, roles: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<Arc<str>>,
    {
        self.inner.roles = roles.into_iter().map(Into::into).collect();
        self
    }
    /// Environment (`live`, `test`).
    pub fn environment(mut self, env: impl Into<String>) -> Self {
        self.inner.environment = env.into();
        self
    }
    /// Expiry.
    pub fn expires_at(mut self, at: Option<OffsetDateTime>) -> Self {
        self.inner.expires_at = at;
        self
    }
    /// Metadata.
    pub fn meta(mut self, meta: serde_json::Value) -> Self {
        self.inner.meta = meta;
        self
    }
    /// Rate limit: the limit named `requests` (replacing one set with
    /// [`limits`](Self::limits)).
    pub fn ratelimit(mut self, rl: Option<RateLimit>) -> Self {
        self.inner.ratelimit = rl;
        self.quota.limits.retain(|l| &*l.name != REQUESTS);
        if let Some(rl) = rl {
            self.quota.limits.push(Limit::new(REQUESTS, rl.limit, rl.period_s));
        }
        self
    }
    /// Named limits (replacing those set before; a `requests` limit is also what
    /// [`Principal::ratelimit`] reports).
    pub fn limits(mut self, limits: impl IntoIterator<Item = Limit>) -> Self {
        self.quota.limits = limits.into_iter().collect();
        self.inner.ratelimit = None;
        self
    }
    /// Credits.
    pub fn credits(mut self, credits: Option<Credits>) -> Self {
        self.quota.credits = credits;
        self
    }
    /// The owner's limits, shared by all of its keys.
    pub fn owner_limits(mut self, limits: impl IntoIterator<Item = Limit>) -> Self {
        self.quota.owner_limits = limits.into_iter().collect();
        self
    }
    /// The owner's credits, shared by all of its keys.
    pub fn owner_credits(mut self, credits: Option<Credits>) -> Self {
        self.quota.owner_credits = credits;
        self
    }
    /// Which setting of the key's and the owner's credits these are (see
    /// [`Quota::credits_revision`]).
    pub fn credits_revisions(mut self, key: Option<u64>, owner: Option<u64>) -> Self {
        self.quota.credits_revision = key;
        self.quota.owner_credits_revision = owner;
        self
    }
    /// The networks the key may be used from (default: any). A request from outside
    /// them gets 403 `ip_not_allowed`; see
    /// [`ApiKeyLayer::trusted_proxies`](crate::ApiKeyLayer::trusted_proxies) for which
    /// address is checked.
    pub fn allowed_networks(mut self, networks: impl IntoIterator<Item = IpNet>) -> Self {
        self.inner.networks = networks.into_iter().collect();
        self
    }

    /// The networks every key of the owner may be used from (default: any); checked
    /// besides the key's own.
    pub fn owner_allowed_networks(mut self, networks: impl IntoIterator<Item = IpNet>) -> Self {
        self.inner.owner_networks = networks.into_iter().collect();
        self
    }

    /// Finishes the principal.
    pub fn build(mut self) -> Principal {
        // `ratelimit` and the `requests` limit are one thing seen two ways.
        if let Some(l) = self.quota.limit(REQUESTS) {
            self.inner.ratelimit = Some(RateLimit { limit: l.limit, period_s: l.period_s });
        }
        self.inner.quota = (!self.quota.is_empty()).then(|| Arc::new(self.quota));
        Principal { inner: Arc::new(self.inner) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Plan {
        tier: String,
        seats: u32,
    }

    fn with_meta(meta: serde_json::Value) -> Principal {
        Principal::builder("key_1").meta(meta).build()
    }

    #[test]
    fn meta_as_reads_a_matching_struct() {
        let p = with_meta(serde_json::json!({"tier": "pro", "seats": 5, "extra": true}));
        assert_eq!(p.meta_as::<Plan>().unwrap(), Plan { tier: "pro".into(), seats: 5 });
    }

    #[test]
    fn meta_as_mismatch_names_the_type_and_the_field() {
        use std::error::Error as _;

        let err = with_meta(serde_json::json!({"tier": "pro", "seats": "five"})).meta_as::<Plan>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("Plan") && msg.contains("invalid type") && msg.contains("u32"), "{msg}");
        assert!(err.target().ends_with("Plan"));
        assert!(err.source().is_some_and(|s| s.is::<serde_json::Error>()));

        let err = with_meta(serde_json::json!({"tier": "pro"})).meta_as::<Plan>().unwrap_err();
        assert!(err.to_string().contains("missing field `seats`"), "{err}");
        // No metadata at all is `null`, which is not a struct.
        assert!(with_meta(serde_json::Value::Null).meta_as::<Plan>().is_err());
    }
}
