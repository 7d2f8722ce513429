//! Webhooks: the delivery worker that posts the store's outbox to the endpoints, and
//! the signature it puts on every delivery.
//!
//! The signature scheme is documented on [`SIGNATURE_HEADER`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::store::{Attempt, AttemptNext, Claimed, Store, StoreError, Target, now_ms};

/// The header carrying a delivery's signature: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
///
/// Every delivery is a `POST` of a JSON event `{"id", "type", "created_at", "data"}`
/// with the headers
///
/// - `keygate-event-id: evt_…`: the event's id, the same on every attempt and for every
///   endpoint; a receiver dedupes by it (delivery is at least once).
/// - `keygate-signature: t=<unix seconds>,v1=<hex>`: `<hex>` is the lowercase hex
///   HMAC-SHA256, keyed with the endpoint's secret (the `whsec_…` string as its bytes),
///   of `"<t>.<raw body>"`.
///
/// A receiver recomputes the HMAC over the raw body it read (before any JSON parsing),
/// compares in constant time, and rejects a `t` more than a few minutes away from its
/// clock (5 minutes is a good bound) so that a recorded delivery cannot be replayed
/// later:
///
/// ```
/// use hmac::{Hmac, Mac};
/// use sha2::Sha256;
///
/// /// Whether `header` (the `keygate-signature` value) signs `body` (the raw request
/// /// body) with `secret`, made at most 5 minutes from `now` (Unix seconds).
/// fn verify(secret: &str, header: &str, body: &[u8], now: i64) -> bool {
///     let (mut t, mut v1) = (None, None);
///     for part in header.split(',') {
///         match part.split_once('=') {
///             Some(("t", v)) => t = v.parse::<i64>().ok(),
///             Some(("v1", v)) => v1 = Some(v),
///             _ => {}
///         }
///     }
///     let (Some(t), Some(v1)) = (t, v1) else { return false };
///     if (now - t).abs() > 300 {
///         return false; // more than 5 minutes away: a replay (or a clock far off)
///     }
///     let Ok(expected) = (0..v1.len())
///         .step_by(2)
///         .map(|i| v1.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or(()))
///         .collect::<Result<Vec<u8>, ()>>()
///     else {
///         return false;
///     };
///     let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
///     mac.update(format!("{t}.").as_bytes());
///     mac.update(body);
///     mac.verify_slice(&expected).is_ok() // constant-time comparison
/// }
/// # // What keygate sends for the body `{}` at t=1700000000 with the secret
/// # // `whsec_test` (the delivery worker's own test checks it signs exactly this).
/// # let sent = "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91";
/// # assert!(verify("whsec_test", sent, b"{}", 1_700_000_100));
/// # assert!(!verify("whsec_test", sent, b"{} ", 1_700_000_100), "another body");
/// # assert!(!verify("whsec_other", sent, b"{}", 1_700_000_100), "another secret");
/// # assert!(!verify("whsec_test", sent, b"{}", 1_700_000_400), "too old");
/// # assert!(!verify("whsec_test", "t=1700000000,v1=3549", b"{}", 1_700_000_100), "cut short");
/// # assert!(!verify("whsec_test", "t=1700000000", b"{}", 1_700_000_100), "no v1");
/// ```
pub const SIGNATURE_HEADER: &str = "keygate-signature";
/// The header carrying a delivery's event id.
pub const EVENT_ID_HEADER: &str = "keygate-event-id";
/// Most bytes of an endpoint's answer read (the rest is not waited for).
const MAX_ANSWER: usize = 64 * 1024;
/// How often finished deliveries beyond the log size are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How webhooks are delivered. Defaults: a pass every second, 16 deliveries claimed per
/// pass and 8 in flight, connect timeout 5 s, request timeout 10 s, claims held 60 s;
/// retries with exponential backoff from 10 s up to 1 hour between attempts, with full
/// jitter, at most 20 attempts and for at most 24 hours after the event, then the
/// delivery is `failed`; at most 10 000 pending deliveries per endpoint (past it the
/// oldest are `dropped` and counted); the newest 1 000 finished deliveries per endpoint
/// kept in the log.
///
/// A delivery is `delivered` on a 2xx answer. Anything else is a failed attempt: another
/// status, a timeout, a connection error, and a redirect (3xx), which is never followed.
/// The worker claims deliveries in the store before sending them (for
/// [`claim_for`](Self::claim_for)), so that replicas sharing a PostgreSQL store never
/// send one delivery at the same time; a replica that dies with a claim leaves it to be
/// retried when the claim runs out. Delivery is at least once: receivers dedupe by the
/// event id.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Deliver at all (default true). Events are queued either way.
    pub enabled: bool,
    /// Pause between passes when nothing is due (default 1 s).
    pub poll_interval: Duration,
    /// Deliveries claimed per pass (default 16).
    pub batch: u32,
    /// Deliveries in flight at once (default 8).
    pub concurrency: usize,
    /// Connect timeout (default 5 s).
    pub connect_timeout: Duration,
    /// Timeout of one attempt, connecting to reading the answer (default 10 s).
    pub request_timeout: Duration,
    /// How long a worker owns the deliveries it claimed (default 60 s); more than a
    /// pass can take.
    pub claim_for: Duration,
    /// Most attempts per delivery (default 20).
    pub max_attempts: u32,
    /// Longest time after the event an attempt is made (default 24 h).
    pub max_age: Duration,
    /// Backoff before the second attempt (default 10 s), doubling each time.
    pub backoff_base: Duration,
    /// Longest backoff between attempts (default 1 hour).
    pub backoff_max: Duration,
    /// Most pending deliveries per endpoint (default 10 000).
    pub max_pending: u32,
    /// Finished deliveries kept per endpoint in the log (default 1 000).
    pub log_keep: u32,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_interval: Duration::from_secs(1),
            batch: 16,
            concurrency: 8,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            claim_for: Duration::from_secs(60),
            max_attempts: 20,
            max_age: Duration::from_secs(24 * 3600),
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(3600),
            max_pending: 10_000,
            log_keep: 1000,
        }
    }
}

impl WebhookConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.poll_interval.is_zero() || self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err("webhook poll interval and timeouts must be above zero".into());
        }
        if !(1..=1000).contains(&self.batch) || !(1..=256).contains(&self.concurrency) {
            return Err("webhook batch must be 1 to 1 000, concurrency 1 to 256".into());
        }
        let rounds = self.batch.div_ceil(self.concurrency as u32);
        if self.claim_for <= self.request_timeout.saturating_mul(rounds) {
            return Err(format!(
                "the webhook claim ({:?}) must outlast a pass: {rounds} × the request timeout ({:?})",
                self.claim_for, self.request_timeout
            ));
        }
        if self.max_attempts == 0 || self.max_pending == 0 {
            return Err("webhook max attempts and max pending must be at least 1".into());
        }
        Ok(())
    }

    /// The wait before the attempt after `attempts` failed ones: uniform in
    /// `[0, min(max, base × 2^(attempts-1))]` (full jitter).
    fn backoff(&self, attempts: u32) -> Duration {
        let cap = self.backoff_base.saturating_mul(1u32 << attempts.saturating_sub(1).min(30)).min(self.backoff_max);
        let mut buf = [0u8; 8];
        let r = match getrandom::fill(&mut buf) {
            Ok(()) => u64::from_le_bytes(buf),
            Err(_) => u64::MAX / 2,
        };
        let nanos = cap.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(if nanos == 0 { 0 } else { r % (nanos + 1) })
    }
}

/// Counters of the delivery worker.
#[derive(Debug, Default)]
pub(crate) struct WebhookCounters {
    pub(crate) delivered: AtomicU64,
    pub(crate) attempts_failed: AtomicU64,
    pub(crate) failed: AtomicU64,
}

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub(crate) fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    // HMAC accepts a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let mut out = format!("t={t},v1=");
    for b in mac.finalize().into_bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The background delivery loop; stops when dropped.
#[derive(Debug)]
pub(crate) struct WebhookWorker(JoinHandle<()>);

impl WebhookWorker {
    /// `allow_internal`: deliver to internal addresses too (see [`internal_kind`]).
    pub(crate) fn spawn(
        store: Store,
        config: WebhookConfig,
        counters: Arc<WebhookCounters>,
        allow_internal: bool,
    ) -> Result<Self, reqwest::Error> {
        let mut builder = crate::transport::http_client_builder(crate::remote::ClientOptions {
            connect_timeout: config.connect_timeout,
            timeout: Some(config.request_timeout),
            tcp_keepalive: None,
        });
        if !allow_internal {
            // The check applies to the addresses connected to: a proxy would be the
            // one connected to, and its own connection to the endpoint unchecked.
            builder = builder.dns_resolver(Arc::new(PublicAddrs)).no_proxy();
        }
        let http = builder.build()?;
        let worker = Worker { store, config, counters, http, allow_internal };
        Ok(Self(tokio::spawn(worker.run())))
    }
}

/// What kind of internal address `ip` is, if it is one a webhook must not reach by
/// default: loopback, private (RFC 1918, IPv6 unique local), link-local (cloud metadata
/// services live there), unspecified (`0.0.0.0/8`, `::`: "this host"), shared
/// (carrier-grade NAT, `100.64.0.0/10`), broadcast or multicast. IPv4-mapped IPv6
/// addresses are judged as their IPv4 address.
pub(crate) fn internal_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_v4(v4);
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

fn internal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 0 {
        Some("unspecified")
    } else if a == 100 && b & 0xc0 == 64 {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

/// The kind of internal address `url`'s host literally is (an IP address, or
/// `localhost` and its subdomains, which resolve to loopback), if it is one. A name
/// that merely resolves to one is caught when connecting, by [`PublicAddrs`].
pub(crate) fn internal_host(url: &reqwest::Url) -> Option<&'static str> {
    let host = url.host_str()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return internal_kind(ip);
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    (name == "localhost" || name.ends_with(".localhost")).then_some("loopback (localhost)")
}

/// The webhook client's resolver unless internal addresses are allowed: the system's
/// resolver, minus every internal address. What it returns is what the client connects
/// to, so a name that resolves to an internal address (or is rebound to one after the
/// endpoint was added) reaches nothing internal; a name with no other address fails
/// the attempt.
#[derive(Debug)]
struct PublicAddrs;

impl reqwest::dns::Resolve for PublicAddrs {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let all = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let public: Vec<SocketAddr> = all.filter(|a| internal_kind(a.ip()).is_none()).collect();
            if public.is_empty() {
                return Err(format!("`{host}` resolves only to internal addresses, which webhooks do not reach").into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl Drop for WebhookWorker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Worker {
    store: Store,
    config: WebhookConfig,
    counters: Arc<WebhookCounters>,
    http: reqwest::Client,
    allow_internal: bool,
}

impl Worker {
    async fn run(self) {
        let mut pruned = Instant::now();
        loop {
            let busy = match self.pass().await {
                Ok(n) => n >= self.config.batch as usize,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook delivery pass failed; trying again");
                    false
                }
            };
            if pruned.elapsed() >= PRUNE_EVERY {
                pruned = Instant::now();
                if let Err(e) = self.store.prune_deliveries(self.config.log_keep).await {
                    tracing::warn!(error = %e, "pruning the webhook delivery log failed");
                }
            }
            if !busy {
                tokio::time::sleep(self.config.poll_interval).await;
            }
        }
    }

    /// Claims the due deliveries and attempts each; returns how many were claimed.
    async fn pass(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let until = super::text::later(now, self.config.claim_for);
        let claimed = self.store.claim_deliveries(now, until, self.config.batch).await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let n = claimed.len();
        let targets = self.store.webhook_targets().await?;
        let targets = &targets;
        let results = futures_util::stream::iter(claimed)
            .map(|c| async move {
                let attempt = self.attempt(&c, targets).await;
                (c.id, attempt)
            })
            .buffer_unordered(self.config.concurrency)
            .collect::<Vec<_>>()
            .await;
        for (id, attempt) in results {
            // An endpoint removed meanwhile took its deliveries with it.
            let Some(attempt) = attempt else { continue };
            self.store.finish_delivery(id, &attempt).await?;
        }
        Ok(n)
    }

    async fn attempt(&self, c: &Claimed, targets: &HashMap<String, Target>) -> Option<Attempt> {
        let target = targets.get(&c.endpoint_id)?;
        let t = OffsetDateTime::now_utc().unix_timestamp();
        // An endpoint stored while internal addresses were allowed (or written to the
        // database directly) is not sent to once they are not.
        let internal = if self.allow_internal {
            None
        } else {
            reqwest::Url::parse(&target.url).ok().and_then(|u| internal_host(&u))
        };
        let sent = match internal {
            Some(kind) => Err(format!("refused: the host is an internal address ({kind})")),
            None => self
                .http
                .post(&target.url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::USER_AGENT, concat!("keygate-webhooks/", env!("CARGO_PKG_VERSION")))
                .header(EVENT_ID_HEADER, &c.event_id)
                .header(SIGNATURE_HEADER, signature(&target.secret, t, c.payload.as_bytes()))
                .body(c.payload.clone())
                .send()
                .await
                .map_err(|e| {
                    let what = if e.is_timeout() { "timed out" } else { "request failed" };
                    format!("{what}: {}", crate::remote::describe(&e))
                }),
        };
        let (status, error) = match sent {
            Ok(mut answer) => {
                let status = answer.status();
                // Read a bounded part of the answer so that the connection can be
                // reused; what it says does not matter.
                let mut read = 0usize;
                while read < MAX_ANSWER {
                    match answer.chunk().await {
                        Ok(Some(chunk)) => read += chunk.len(),
                        _ => break,
                    }
                }
                let error = if status.is_success() {
                    None
                } else if status.is_redirection() {
                    Some(format!("answered {} (redirect, not followed)", status.as_u16()))
                } else {
                    Some(format!("answered {}", status.as_u16()))
                };
                (Some(status.as_u16()), error)
            }
            Err(e) => (None, Some(e)),
        };
        let at = now_ms();
        let next = match &error {
            None => {
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                AttemptNext::Delivered
            }
            Some(error) => {
                self.counters.attempts_failed.fetch_add(1, Ordering::Relaxed);
                let attempts = c.attempts.saturating_add(1);
                let retry_at = super::text::later(at, self.config.backoff(attempts));
                let deadline = super::text::later(c.created_at, self.config.max_age);
                if attempts >= self.config.max_attempts || retry_at > deadline {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(event_id = %c.event_id, endpoint = %c.endpoint_id, attempts, error = %error, "webhook delivery failed for good");
                    AttemptNext::Failed
                } else {
                    tracing::debug!(event_id = %c.event_id, endpoint = %c.endpoint_id, attempts, error = %error, "webhook attempt failed; retrying");
                    AttemptNext::RetryAt(retry_at)
                }
            }
        };
        Some(Attempt { at, status, error, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_told_apart_from_public_ones() {
        let internal = [
            "127.0.0.1",
            "127.255.0.9",
            "10.0.0.1",
            "172.31.255.255",
            "192.168.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.127.255.254",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "febf::1",
            "fc00::1",
            "fdff::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:192.168.1.1",
        ];
        for ip in internal {
            assert!(internal_kind(ip.parse().unwrap()).is_some(), "{ip}");
        }
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "192.169.0.1",
            "100.128.0.1",
            "11.0.0.1",
            "2001:db8::1",
            "2606:4700::1",
            "fec0::1",
            "::ffff:8.8.8.8",
        ];
        for ip in public {
            assert_eq!(internal_kind(ip.parse().unwrap()), None, "{ip}");
        }
        let host = |u: &str| internal_host(&reqwest::Url::parse(u).unwrap());
        assert_eq!(host("http://[::1]:80/"), Some("loopback"));
        assert_eq!(host("http://0x7f000001/"), Some("loopback"));
        assert_eq!(host("http://Foo.LocalHost./x"), Some("loopback (localhost)"));
        assert_eq!(host("https://hooks.example.com/"), None);
        assert_eq!(host("https://localhost.example.com/"), None);
    }

    #[tokio::test]
    async fn the_resolver_drops_internal_addresses() {
        use reqwest::dns::Resolve;
        // `localhost` resolves to loopback only (from /etc/hosts): nothing is left.
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let err = PublicAddrs.resolve(name).await.err().expect("refused");
        assert!(err.to_string().contains("only to internal addresses"), "{err}");
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: `printf '1700000000.{}' | openssl dgst -sha256 -hmac whsec_test`.
        let sig = signature("whsec_test", 1_700_000_000, b"{}");
        assert_eq!(sig, "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91");
        assert_ne!(sig, signature("whsec_other", 1_700_000_000, b"{}"));
        assert_ne!(sig, signature("whsec_test", 1_700_000_001, b"{}"));
    }

    /// The code between the fences of the Rust block holding `needle`, each line
    /// through `line` (`None`: not part of the shown code).
    fn rust_block(text: &str, needle: &str, line: impl Fn(&str) -> Option<String>) -> Option<String> {
        let lines: Vec<String> = text.lines().filter_map(line).collect();
        let mut blocks = lines.split(|l| l.starts_with("```"));
        // Fences alternate: every second piece is inside a block.
        blocks.next();
        blocks.step_by(2).map(|b| b.join("\n")).find(|b| b.contains(needle))
    }

    #[test]
    fn the_readme_verification_snippet_is_the_compiled_doctest() {
        let read = |path: &str| std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let needle = "fn verify(secret: &str, header: &str, body: &[u8]";
        let readme = rust_block(&read("README.md"), needle, |l| Some(l.to_owned())).expect("the README's snippet");
        // The doctest on `SIGNATURE_HEADER`, as rustdoc shows it: `# ` lines hidden.
        let doc = |l: &str| {
            let l = l.trim_start().strip_prefix("///")?;
            let l = l.strip_prefix(' ').unwrap_or(l);
            (!l.starts_with("# ")).then(|| l.to_owned())
        };
        let doctest = rust_block(&read("src/server/webhooks.rs"), needle, doc).expect("the doctest");
        assert_eq!(readme, doctest, "README.md's webhook snippet differs from the doctest on SIGNATURE_HEADER");
    }

    #[test]
    fn backoff_is_bounded_by_the_doubling_cap() {
        let cfg = WebhookConfig {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            ..WebhookConfig::default()
        };
        for attempts in 1..40 {
            let cap =
                Duration::from_millis(100).saturating_mul(1 << (attempts - 1).min(30)).min(Duration::from_secs(1));
            assert!(cfg.backoff(attempts) <= cap);
        }
    }
}
