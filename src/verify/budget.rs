//! The miss budget: how many calls to the wrapped verifier unknown keys may cause, per
//! client and in all.

use std::net::IpAddr;
use std::time::Duration;

use crate::principal::RateLimit;
use crate::ratelimit::RateLimiter;

/// Default per-client budget: 300 misses per minute (a burst of 300, then 5 a second).
pub const DEFAULT_MISS_BUDGET_PER_CLIENT: (u64, Duration) = (300, Duration::from_secs(60));
/// Default budget of one cache, all clients together: 1 000 misses per second.
pub const DEFAULT_MISS_BUDGET_OVERALL: (u64, Duration) = (1_000, Duration::from_secs(1));
/// Default number of client addresses tracked at once: 100 000.
pub const DEFAULT_MISS_BUDGET_CLIENTS: usize = 100_000;

/// How many calls to the wrapped verifier keys that are *not in the cache* may cause;
/// set with [`CachedVerifierBuilder::miss_budget`](super::CachedVerifierBuilder::miss_budget).
///
/// A flood of distinct well-formed keys (guessed, or leaked and revoked) would otherwise
/// be a flood of calls to the key service, one per key: the negative cache only helps
/// when a key comes back. Past its budget, a lookup of a key the cache holds nothing for
/// gets [`VerifyError::Throttled`](super::VerifyError::Throttled) (the layer answers 429
/// with `Retry-After`) and makes no call. Keys the cache holds, fresh, stale or refused,
/// are never charged nor refused, and a lookup that joins a call already in flight for
/// the same key is free, so a burst of requests on one new key costs one miss.
///
/// Two budgets, both GCRA (a burst of `misses`, then one every `per / misses`):
/// - **per client** (default 300 per minute): the client is the address the layer
///   knows for the request: [`ApiKeyLayer::client_ip_from_header`](crate::ApiKeyLayer::client_ip_from_header)
///   when configured, else the peer address (axum's `ConnectInfo`) when the server
///   provides it; IPv6 clients are counted per /64, which one host can fill at will.
///   Requests with no known address count against the overall budget only. At most
///   100 000 clients are tracked; past that, clients not yet tracked are held to the
///   overall budget only.
/// - **overall** (default 1 000 per second): every miss of this cache.
///
/// The defaults leave room for a cold start: a fresh instance in front of thousands of
/// active keys fills its cache at 1 000 keys a second, each client's first 300 at once.
///
/// ```
/// use std::time::Duration;
/// use keygate::{CachedVerifier, MissBudget, StaticVerifier};
///
/// let verifier = CachedVerifier::builder(StaticVerifier::new())
///     .miss_budget(MissBudget::new().per_client(100, Duration::from_secs(60)).overall(5_000, Duration::from_secs(1)))
///     .build();
/// let unlimited = CachedVerifier::builder(StaticVerifier::new()).miss_budget(MissBudget::unlimited()).build();
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct MissBudget {
    per_client: Option<RateLimit>,
    overall: Option<RateLimit>,
    max_clients: usize,
}

impl Default for MissBudget {
    fn default() -> Self {
        Self::new()
    }
}

fn rate(misses: u64, per: Duration) -> RateLimit {
    // Whole seconds: the limiter's unit; a shorter period is one second.
    RateLimit { limit: misses, period_s: per.as_secs().max(1) }
}

impl MissBudget {
    /// The defaults: 300 misses per minute per client, 1 000 per second overall, 100 000
    /// clients tracked.
    pub fn new() -> Self {
        Self {
            per_client: Some(rate(DEFAULT_MISS_BUDGET_PER_CLIENT.0, DEFAULT_MISS_BUDGET_PER_CLIENT.1)),
            overall: Some(rate(DEFAULT_MISS_BUDGET_OVERALL.0, DEFAULT_MISS_BUDGET_OVERALL.1)),
            max_clients: DEFAULT_MISS_BUDGET_CLIENTS,
        }
    }

    /// No budget at all: every miss calls the wrapped verifier.
    pub fn unlimited() -> Self {
        Self { per_client: None, overall: None, max_clients: DEFAULT_MISS_BUDGET_CLIENTS }
    }

    /// Misses allowed per client: a burst of `misses`, then one every `per / misses`
    /// (`per` in whole seconds, at least one).
    pub fn per_client(mut self, misses: u64, per: Duration) -> Self {
        self.per_client = Some(rate(misses, per));
        self
    }

    /// No per-client budget.
    pub fn no_per_client(mut self) -> Self {
        self.per_client = None;
        self
    }

    /// Misses allowed in all: a burst of `misses`, then one every `per / misses`.
    pub fn overall(mut self, misses: u64, per: Duration) -> Self {
        self.overall = Some(rate(misses, per));
        self
    }

    /// No overall budget.
    pub fn no_overall(mut self) -> Self {
        self.overall = None;
        self
    }

    /// Most client addresses tracked at once (default 100 000).
    pub fn max_clients(mut self, clients: usize) -> Self {
        self.max_clients = clients;
        self
    }
}

/// The budgets' running state.
pub(crate) struct Budgets {
    config: MissBudget,
    clients: RateLimiter<IpAddr>,
    overall: RateLimiter<()>,
}

impl Budgets {
    pub(crate) fn new(config: MissBudget) -> Self {
        Self { config, clients: RateLimiter::new(config.max_clients), overall: RateLimiter::new(1) }
    }

    /// Charges one miss to `client` and to the whole, or says how long to wait. A miss
    /// refused by one budget is not charged to the other.
    pub(crate) fn charge(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        let client = client.map(per_host);
        if let (Some(limit), Some(ip)) = (self.config.per_client, client) {
            self.clients.check(&ip, limit).map_err(|refused| refused.reset)?;
        }
        if let Some(limit) = self.config.overall {
            self.overall.check(&(), limit).map_err(|refused| refused.reset)?;
        }
        Ok(())
    }
}

/// The address a client is counted under: itself for IPv4, its /64 for IPv6 (one host
/// usually holds a whole /64 and can pick any address in it).
fn per_host(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_has_its_own_budget_within_the_whole() {
        let b =
            Budgets::new(MissBudget::new().per_client(3, Duration::from_secs(60)).overall(5, Duration::from_secs(60)));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let c: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(b.charge(Some(a)).is_ok());
        }
        let wait = b.charge(Some(a)).unwrap_err();
        assert!(wait > Duration::from_secs(15) && wait <= Duration::from_secs(20), "{wait:?}");
        assert!(b.charge(Some(c)).is_ok());
        assert!(b.charge(None).is_ok());
        // The whole is spent (3 + 1 + 1): every client waits now.
        assert!(b.charge(Some(c)).is_err());
        assert!(b.charge(None).is_err());
    }

    #[test]
    fn ipv6_clients_count_per_64_and_unlimited_never_refuses() {
        let b = Budgets::new(MissBudget::new().per_client(1, Duration::from_secs(60)).no_overall());
        assert!(b.charge(Some("2001:db8::1".parse().unwrap())).is_ok());
        assert!(b.charge(Some("2001:db8::ffff:1".parse().unwrap())).is_err(), "same /64");
        assert!(b.charge(Some("2001:db8:0:1::1".parse().unwrap())).is_ok(), "another /64");
        assert!(b.charge(Some("::ffff:192.0.2.9".parse().unwrap())).is_ok());
        assert!(b.charge(Some("192.0.2.9".parse().unwrap())).is_err(), "a mapped address is its IPv4 address");
        let free = Budgets::new(MissBudget::unlimited());
        for _ in 0..10_000 {
            assert!(free.charge(Some("192.0.2.1".parse().unwrap())).is_ok());
        }
    }
}
