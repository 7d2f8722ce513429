//! [`Cost`]: what one request of a route draws from a key's limits and credits.

use std::sync::Arc;

use crate::quota::{REQUESTS, name_problem};

/// What a request draws from the key's (and its owner's) named limits and credits.
///
/// The default, [`Cost::new`], is what every route costs unless it says otherwise: 1
/// from the limit named `requests` and 1 credit, when the key has them. A key without
/// a limit or credits the cost names is not limited by it; a limit the key has and the
/// cost does not name is not drawn from. A cost above a limit's burst never fits in it:
/// such a request is always refused.
///
/// A route states its cost with [`Cost`] as a route layer (axum), or with
/// [`RequireScopes::cost`](crate::RequireScopes::cost) and
/// [`RequireScopes::method_cost`](crate::RequireScopes::method_cost) (a route's or a
/// gRPC method's), or for all of a layer's routes with
/// [`ApiKeyLayer::cost`](crate::ApiKeyLayer::cost):
///
/// ```
/// use axum::{Router, routing::{get, post}};
/// use keygate::{ApiKeyLayer, Cost, StaticVerifier};
///
/// let app: Router = Router::new()
///     // 5 from `reports`, 10 credits, and nothing from `requests`.
///     .route("/reports", post(|| async { "report" }).route_layer(Cost::free().limit("reports", 5).credits(10)))
///     // Free: a status page spends nothing.
///     .route("/status", get(|| async { "ok" }).route_layer(Cost::free()))
///     // The default: 1 from `requests`, 1 credit.
///     .route("/items", get(|| async { "items" }))
///     .layer(ApiKeyLayer::new(StaticVerifier::new()));
/// ```
///
/// A [`Cost`] route layer behind a router-wide [`ApiKeyLayer`](crate::ApiKeyLayer)
/// replaces what that layer charged before routing (the layer's cost, by default
/// [`Cost::new`]): it gives that back and charges its own. So a key whose `requests`
/// are spent is refused before routing even on a free route; give such a route an
/// `ApiKeyLayer` of its own with `.cost(Cost::free())` to keep it reachable.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub struct Cost {
    // Few entries (a route names one or two limits): a list beats a map.
    limits: Arc<[(Arc<str>, u64)]>,
    credits: u64,
}

impl Default for Cost {
    fn default() -> Self {
        Self::new()
    }
}

impl Cost {
    /// 1 from `requests` and 1 credit: what a route costs unless it says otherwise.
    pub fn new() -> Self {
        Self { limits: Arc::from([(Arc::from(REQUESTS), 1)]), credits: 1 }
    }

    /// Nothing: no limit, no credits. Add to it with [`limit`](Self::limit) and
    /// [`credits`](Self::credits).
    pub fn free() -> Self {
        Self { limits: Arc::from([]), credits: 0 }
    }

    /// Draws `units` from the limit `name` (replacing what was set for it; 0 draws
    /// nothing). Panics on a name that is not `[a-z0-9_-]{1,32}`, so that a typo stops
    /// the service at startup.
    pub fn limit(self, name: &str, units: u64) -> Self {
        if let Some(why) = name_problem(name) {
            panic!("Cost::limit: {why}");
        }
        let mut limits: Vec<(Arc<str>, u64)> = self.limits.iter().filter(|(n, _)| &**n != name).cloned().collect();
        if units > 0 {
            limits.push((Arc::from(name), units));
        }
        Self { limits: limits.into(), credits: self.credits }
    }

    /// Spends `credits` credits (0: none).
    pub fn credits(mut self, credits: u64) -> Self {
        self.credits = credits;
        self
    }

    /// The limits drawn from, with their units.
    pub fn limits(&self) -> impl Iterator<Item = (&str, u64)> {
        self.limits.iter().map(|(n, u)| (&**n, *u))
    }

    /// Units drawn from the limit `name` (0: none).
    pub fn units_of(&self, name: &str) -> u64 {
        self.limits.iter().find(|(n, _)| &**n == name).map_or(0, |(_, u)| *u)
    }

    /// Credits spent.
    pub fn credit_units(&self) -> u64 {
        self.credits
    }

    /// Whether it costs nothing at all.
    pub fn is_free(&self) -> bool {
        self.limits.is_empty() && self.credits == 0
    }
}

impl Cost {
    /// What this cost draws beyond `other`, item by item (never below zero).
    pub(crate) fn minus(&self, other: &Cost) -> Cost {
        let limits: Vec<(Arc<str>, u64)> = self
            .limits
            .iter()
            .filter_map(|(n, u)| {
                let d = u.saturating_sub(other.units_of(n));
                (d > 0).then(|| (n.clone(), d))
            })
            .collect();
        Cost { limits: limits.into(), credits: self.credits.saturating_sub(other.credits) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_read_like_the_builder() {
        let c = Cost::new();
        assert_eq!((c.units_of("requests"), c.credit_units()), (1, 1));
        let c = Cost::free().limit("reports", 5).credits(10);
        assert_eq!((c.units_of("requests"), c.units_of("reports"), c.credit_units()), (0, 5, 10));
        let c = Cost::new().limit("requests", 0).credits(0);
        assert!(c.is_free());
        assert_eq!(Cost::new().limit("requests", 3).units_of("requests"), 3);
    }

    #[test]
    fn a_difference_is_taken_item_by_item() {
        let a = Cost::new().limit("reports", 2).credits(10);
        let b = Cost::new().credits(1);
        let d = a.minus(&b);
        assert_eq!((d.units_of("requests"), d.units_of("reports"), d.credit_units()), (0, 2, 9));
        assert!(b.minus(&a).is_free());
    }

    #[test]
    #[should_panic(expected = "Cost::limit")]
    fn a_bad_name_panics() {
        let _ = Cost::new().limit("Reports", 1);
    }
}
