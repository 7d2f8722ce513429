//! [`RemoteAuth`]: the production setup against the key service in one call.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::layer::ApiKeyLayer;
use crate::remote::{
    HttpExporterBuildError, HttpUsageExporter, HttpUsageExporterBuilder, HttpVerifier, HttpVerifierBuilder,
    KeyServiceUrls, ListenerStats, RemoteConfigError, RevocationListener, RevocationListenerBuilder,
};
use crate::usage::{AggregatorBuildError, AggregatorHandle, AggregatorStats, UsageAggregator, UsageAggregatorBuilder};
use crate::verify::{CachedVerifier, CachedVerifierBuilder};

/// How long [`RemoteAuth::shutdown`] waits for the revocation listener's task to end.
/// The task ends at its next poll once told to stop, so this only bounds a runtime too
/// busy to poll it.
const LISTENER_STOP_WAIT: Duration = Duration::from_secs(1);

type CacheConfig =
    Box<dyn FnOnce(CachedVerifierBuilder<HttpVerifier>) -> CachedVerifierBuilder<HttpVerifier> + Send + 'static>;

/// The layer's background parts against the key service, as one handle: the cached
/// remote verifier, the revocation listener that keeps its cache current, and the usage
/// aggregator that exports to the key service.
///
/// [`RemoteAuth::builder`] takes the key service's URLs (one, or every replica) and the
/// service token once, and [`build`](RemoteAuthBuilder::build) returns the
/// [`ApiKeyLayer`] to put in front of the service together with this handle:
///
/// ```no_run
/// # async fn run(app: axum::Router, signal: impl Future<Output = ()> + Send + 'static) -> Result<(), Box<dyn std::error::Error>> {
/// let urls = ["http://keys-a:7700", "http://keys-b:7700"];
/// let (auth, remote) = keygate::RemoteAuth::builder(urls, std::env::var("KEYGATE_SERVICE_TOKEN")?).build()?;
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
/// axum::serve(listener, app.layer(auth)).with_graceful_shutdown(signal).await?;
/// remote.shutdown().await; // delivers the last interval's usage, stops the listener
/// # Ok(()) }
/// ```
///
/// That is, with every default:
///
/// | part | what | configure with |
/// | --- | --- | --- |
/// | [`HttpVerifier`] | `POST /v1/keys/verify`, 2 s timeout, round robin over the URLs | [`verifier`](RemoteAuthBuilder::verifier) |
/// | [`CachedVerifier`] | 30 s positive TTL, 5 s negative, 5 min stale-if-error, fail closed | [`cache`](RemoteAuthBuilder::cache) |
/// | [`RevocationListener`] | `GET /v1/events`: revocations reach the cache within a second | [`listener`](RemoteAuthBuilder::listener), off with [`no_revocations`](RemoteAuthBuilder::no_revocations) |
/// | [`UsageAggregator`] | every decided request folded into per-minute rows, cut every 10 s | [`usage`](RemoteAuthBuilder::usage), off with [`no_usage`](RemoteAuthBuilder::no_usage) |
/// | [`HttpUsageExporter`] | `POST /v1/usage`, retried up to 5 s per batch | [`exporter`](RemoteAuthBuilder::exporter) |
/// | [`ApiKeyLayer`] | the layer's defaults, with the aggregator as its usage sink | the returned layer's own methods |
///
/// The returned layer is an ordinary `ApiKeyLayer<CachedVerifier<HttpVerifier>>`: keep
/// configuring it (`auth.realm("reports").client_ip_from_header("x-forwarded-for")`).
/// Its usage sink is already the aggregator: [`ApiKeyLayer::usage`] would replace it, so
/// to add a sink of your own pass both, `.usage((remote.usage_sink().unwrap(), mine))`.
///
/// The parts stay available on their own, for setups this builder does not cover (a
/// verifier of your own behind the cache, usage to another receiver):
/// `CachedVerifier::builder(HttpVerifier::builder(urls)...build()?)`,
/// `RevocationListener::builder(urls)...spawn(&verifier)`,
/// `UsageAggregator::builder().build(HttpUsageExporter::builder(urls)...build()?)` and
/// `ApiKeyLayer::new(verifier).usage(sink)` are what this builder calls.
///
/// # Shutting down
///
/// Call [`shutdown`](Self::shutdown) once the server has stopped (after
/// `axum::serve(..).with_graceful_shutdown(..)` returns): it delivers the usage of the
/// last interval and everything pending, within the aggregator's shutdown deadline
/// (default 5 s), and stops the listener. Dropping the handle instead logs a warning:
/// the listener stops at once (the cache then relies on its TTL alone), and usage not
/// yet exported is lost when the runtime stops before the aggregator's worker has
/// delivered it, which is what happens at the end of `main`.
#[must_use = "dropping `RemoteAuth` stops the revocation listener and may lose usage; call `shutdown().await` when the server has stopped"]
pub struct RemoteAuth {
    verifier: CachedVerifier<HttpVerifier>,
    listener: Option<RevocationListener>,
    aggregator: Option<AggregatorHandle>,
    #[cfg(feature = "redis")]
    limits: Option<crate::RedisLimits>,
    shut_down: bool,
}

impl RemoteAuth {
    /// Starts the setup for the key service at `urls` (one base URL such as
    /// `"https://keys.internal:7700"`, or every replica, at most 64), presenting
    /// `service_token`. The token is kept zeroized and never shown by `Debug`.
    pub fn builder(urls: impl KeyServiceUrls, service_token: impl Into<String>) -> RemoteAuthBuilder {
        let urls = urls.into_urls();
        let token = Zeroizing::new(service_token.into());
        RemoteAuthBuilder {
            verifier: HttpVerifier::builder(urls.clone()).service_token(token.as_str()),
            cache: Vec::new(),
            listener: Some(RevocationListener::builder(urls.clone()).service_token(token.as_str())),
            usage: Some((UsageAggregator::builder(), HttpUsageExporter::builder(urls).service_token(token.as_str()))),
            #[cfg(feature = "redis")]
            limits: None,
        }
    }

    /// Like [`builder`](Self::builder), with the service token read from the file at
    /// `path` (a mounted Kubernetes or Vault secret): every part reads it again every
    /// [`DEFAULT_TOKEN_FILE_POLL`](crate::DEFAULT_TOKEN_FILE_POLL) and at once after a
    /// 401, so a rotated token is picked up with no restart and no failed request.
    /// [`build`](RemoteAuthBuilder::build) fails if the file holds no usable token.
    pub fn builder_with_token_file(urls: impl KeyServiceUrls, path: impl Into<PathBuf>) -> RemoteAuthBuilder {
        let urls = urls.into_urls();
        let path = path.into();
        RemoteAuthBuilder {
            verifier: HttpVerifier::builder(urls.clone()).service_token_file(path.clone()),
            cache: Vec::new(),
            listener: Some(RevocationListener::builder(urls.clone()).service_token_file(path.clone())),
            usage: Some((UsageAggregator::builder(), HttpUsageExporter::builder(urls).service_token_file(path))),
            #[cfg(feature = "redis")]
            limits: None,
        }
    }

    /// The cached verifier the layer asks: its [`stats`](CachedVerifier::stats), and
    /// [`invalidate_key_id`](CachedVerifier::invalidate_key_id) /
    /// [`invalidate_all`](CachedVerifier::invalidate_all) for invalidations of your own.
    pub fn verifier(&self) -> &CachedVerifier<HttpVerifier> {
        &self.verifier
    }

    /// The revocation listener: whether it is connected, its counters. `None` when
    /// built with [`no_revocations`](RemoteAuthBuilder::no_revocations).
    pub fn listener(&self) -> Option<&RevocationListener> {
        self.listener.as_ref()
    }

    /// The listener's counters; `None` without a listener.
    pub fn listener_stats(&self) -> Option<ListenerStats> {
        self.listener.as_ref().map(RevocationListener::stats)
    }

    /// The usage aggregator's handle, to [`flush`](AggregatorHandle::flush) or read its
    /// counters. `None` when built with [`no_usage`](RemoteAuthBuilder::no_usage).
    pub fn aggregator(&self) -> Option<&AggregatorHandle> {
        self.aggregator.as_ref()
    }

    /// The aggregator's counters; `None` without usage.
    pub fn usage_stats(&self) -> Option<AggregatorStats> {
        self.aggregator.as_ref().map(AggregatorHandle::stats)
    }

    /// The sink the layer records into, to combine it with one of your own (see the
    /// [type docs](Self)); `None` without usage.
    pub fn usage_sink(&self) -> Option<UsageAggregator> {
        self.aggregator.as_ref().map(AggregatorHandle::aggregator)
    }

    /// Delivers the usage of the last interval and everything pending, stops the
    /// revocation listener, gives fleet-wide limit leases back (with
    /// [`fleet_limits`](RemoteAuthBuilder::fleet_limits)), and returns the aggregator's final counters (`None` without
    /// usage).
    ///
    /// Call it after the server has stopped taking requests: requests decided after
    /// this call are refused by the aggregator and counted in
    /// [`AggregatorStats::dropped`]. Returns within the aggregator's shutdown deadline
    /// (default 5 s) plus about a second, however the key service behaves; what is not
    /// delivered by then is counted in [`AggregatorStats::lost`].
    pub async fn shutdown(mut self) -> Option<AggregatorStats> {
        let listener = self.listener.take();
        let aggregator = self.aggregator.take();
        let stop_listener = async {
            if let Some(listener) = listener {
                if tokio::time::timeout(LISTENER_STOP_WAIT, listener.shutdown()).await.is_err() {
                    tracing::debug!("revocation listener did not stop in time; detached");
                }
            }
        };
        let flush_usage = async {
            match aggregator {
                Some(aggregator) => Some(aggregator.shutdown().await),
                None => None,
            }
        };
        #[cfg(feature = "redis")]
        let give_back_leases = async {
            if let Some(limits) = self.limits.take() {
                limits.shutdown().await;
            }
        };
        #[cfg(not(feature = "redis"))]
        let give_back_leases = async {};
        let ((), stats, ()) = tokio::join!(stop_listener, flush_usage, give_back_leases);
        // Set only once done: a shutdown cancelled half way warns like a drop.
        self.shut_down = true;
        stats
    }
}

impl Drop for RemoteAuth {
    fn drop(&mut self) {
        if !self.shut_down {
            tracing::warn!(
                revocations = self.listener.is_some(),
                usage = self.aggregator.is_some(),
                "keygate RemoteAuth dropped without `shutdown().await`: the revocation listener stops \
                 (the cache relies on its TTL from now on) and usage not yet exported may be lost"
            );
        }
    }
}

impl fmt::Debug for RemoteAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteAuth")
            .field("verifier", &self.verifier)
            .field("listener", &self.listener)
            .field("aggregator", &self.aggregator)
            .finish_non_exhaustive()
    }
}

/// Builds the layer and the [`RemoteAuth`] handle; see [`RemoteAuth::builder`].
///
/// Every part keeps its own builder: each method here hands it to a closure, already
/// given the URLs and the service token, and keeps what the closure returns. Calling
/// one again applies the new closure to what the previous one returned.
///
/// ```no_run
/// use std::time::Duration;
/// use keygate::RemoteAuth;
///
/// # async fn run() -> Result<(), keygate::RemoteConfigError> {
/// let (auth, remote) = RemoteAuth::builder("https://keys.internal:7700", "token")
///     .verifier(|v| v.timeout(Duration::from_secs(1)))
///     .cache(|c| c.positive_ttl(Duration::from_secs(300)).max_capacity(20_000))
///     .listener(|l| l.heartbeat_interval(Duration::from_secs(5)))
///     .usage(|u| u.flush_interval(Duration::from_secs(30)))
///     .exporter(|e| e.max_attempts(4))
///     .build()?;
/// let auth = auth.realm("reports");
/// # drop((auth, remote)); Ok(()) }
/// ```
#[must_use = "the builder does nothing until `build` is called"]
pub struct RemoteAuthBuilder {
    verifier: HttpVerifierBuilder,
    cache: Vec<CacheConfig>,
    listener: Option<RevocationListenerBuilder>,
    usage: Option<(UsageAggregatorBuilder, HttpUsageExporterBuilder)>,
    #[cfg(feature = "redis")]
    limits: Option<crate::RedisLimits>,
}

impl RemoteAuthBuilder {
    /// Configures the [`HttpVerifier`] (timeout, answer size, connect timeout, a
    /// `reqwest::Client` of your own, ...).
    pub fn verifier(mut self, configure: impl FnOnce(HttpVerifierBuilder) -> HttpVerifierBuilder) -> Self {
        self.verifier = configure(self.verifier);
        self
    }

    /// Configures the [`CachedVerifier`] in front of it (TTLs, capacities, failure
    /// policy, metrics name).
    pub fn cache(
        mut self,
        configure: impl FnOnce(CachedVerifierBuilder<HttpVerifier>) -> CachedVerifierBuilder<HttpVerifier> + Send + 'static,
    ) -> Self {
        self.cache.push(Box::new(configure));
        self
    }

    /// Configures the [`RevocationListener`] (heartbeat, backoff, event size). Does
    /// nothing after [`no_revocations`](Self::no_revocations).
    pub fn listener(mut self, configure: impl FnOnce(RevocationListenerBuilder) -> RevocationListenerBuilder) -> Self {
        self.listener = self.listener.map(configure);
        self
    }

    /// No revocation listener: a revoked key keeps working for up to the cache's
    /// positive TTL (default 30 s).
    pub fn no_revocations(mut self) -> Self {
        self.listener = None;
        self
    }

    /// Configures the [`UsageAggregator`] (flush interval, row caps, pending batches,
    /// shutdown deadline). Does nothing after [`no_usage`](Self::no_usage).
    pub fn usage(mut self, configure: impl FnOnce(UsageAggregatorBuilder) -> UsageAggregatorBuilder) -> Self {
        self.usage = self.usage.map(|(aggregator, exporter)| (configure(aggregator), exporter));
        self
    }

    /// Configures the [`HttpUsageExporter`] (attempts, backoff, timeouts). Does nothing
    /// after [`no_usage`](Self::no_usage).
    pub fn exporter(mut self, configure: impl FnOnce(HttpUsageExporterBuilder) -> HttpUsageExporterBuilder) -> Self {
        self.usage = self.usage.map(|(aggregator, exporter)| (aggregator, configure(exporter)));
        self
    }

    /// No usage: the layer records nothing and the key service gets no usage (nor
    /// `last_used_at`, nor usage alerts).
    pub fn no_usage(mut self) -> Self {
        self.usage = None;
        self
    }

    /// Limits and credits counted fleet-wide on Redis
    /// ([`ApiKeyLayer::fleet_limits`]); the handle's
    /// [`shutdown`](RemoteAuth::shutdown) gives this instance's leases back.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn fleet_limits(mut self, limits: crate::RedisLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Checks every setting, builds the parts, spawns the listener and the aggregator's
    /// worker on the current Tokio runtime, and returns the layer and its handle.
    ///
    /// Outside a Tokio runtime this is [`RemoteConfigError::NoRuntime`], and nothing is
    /// built. A URL or token the key-service clients refuse is reported as they report
    /// it; a usage setting of zero is [`RemoteConfigError::Zero`].
    pub fn build(self) -> Result<(ApiKeyLayer<CachedVerifier<HttpVerifier>>, RemoteAuth), RemoteConfigError> {
        tokio::runtime::Handle::try_current().map_err(|_| RemoteConfigError::NoRuntime)?;
        let remote = self.verifier.build()?;
        let verifier =
            self.cache.into_iter().fold(CachedVerifier::builder(remote), |b, configure| configure(b)).build();
        let (sink, aggregator) = match self.usage {
            Some((aggregator, exporter)) => {
                let exporter = exporter.build().map_err(from_exporter_error)?;
                let (sink, handle) = aggregator.build(exporter).map_err(|e| match e {
                    AggregatorBuildError::NoRuntime => RemoteConfigError::NoRuntime,
                    AggregatorBuildError::Zero(name) => RemoteConfigError::Zero(name),
                })?;
                (Some(sink), Some(handle))
            }
            None => (None, None),
        };
        // Spawned last: if it fails, the aggregator built above ends with its sink and
        // handle dropped here, having recorded nothing.
        let listener = self.listener.map(|listener| listener.spawn(&verifier)).transpose()?;
        let mut layer = ApiKeyLayer::new(verifier.clone());
        if let Some(sink) = sink {
            layer = layer.usage(sink);
        }
        #[cfg(feature = "redis")]
        if let Some(limits) = &self.limits {
            layer = layer.fleet_limits(limits.clone());
        }
        Ok((
            layer,
            RemoteAuth {
                verifier,
                listener,
                aggregator,
                #[cfg(feature = "redis")]
                limits: self.limits,
                shut_down: false,
            },
        ))
    }
}

fn from_exporter_error(e: HttpExporterBuildError) -> RemoteConfigError {
    match e {
        HttpExporterBuildError::InvalidUrl(e)
        | HttpExporterBuildError::Client(e)
        | HttpExporterBuildError::TokenFile(e) => e,
        HttpExporterBuildError::InvalidToken => RemoteConfigError::InvalidServiceToken,
        HttpExporterBuildError::Zero(name) => RemoteConfigError::Zero(name),
    }
}

impl fmt::Debug for RemoteAuthBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteAuthBuilder")
            .field("verifier", &self.verifier)
            .field("cache", &format_args!("{} closure(s)", self.cache.len()))
            .field("listener", &self.listener)
            .field("usage", &self.usage)
            .finish()
    }
}
