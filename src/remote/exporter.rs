//! [`HttpUsageExporter`]: `POST /v1/usage` to the key service.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use tokio::time::Instant;

use crate::remote::{
    DEFAULT_INITIAL_BACKOFF, DEFAULT_MAX_BACKOFF, KeyServiceUrls, Remote, RemoteConfigError, RemoteSettings, Ticket,
    answered_by, backoff, read_body, remote_builder_methods,
};
use crate::usage::{AggregateBatch, AggregateExporter, ExportError};
use crate::wire::{self, UsageAccepted};

/// Default timeout of one export attempt, body included: 2 s.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Default attempts per batch: 8.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
/// Default time one export (all its attempts) may take: 5 s, half the aggregator's
/// default flush interval; the aggregator tries a batch that failed again later.
pub const DEFAULT_RETRY_DEADLINE: Duration = Duration::from_secs(5);

/// Largest `{"accepted": n}` answer read.
const MAX_ACCEPTED_BYTES: usize = 4 * 1024;

/// An [`HttpUsageExporter`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpExporterBuildError {
    /// No URL, or one that does not parse, is not `http`/`https` or carries credentials.
    #[error("invalid key service URL")]
    InvalidUrl(#[source] RemoteConfigError),
    /// No service token, or one that is empty or holds bytes a header cannot carry.
    #[error("invalid service token (missing, empty, or not visible ASCII)")]
    InvalidToken,
    /// The service token file cannot be read or holds no token.
    #[error("service token file")]
    TokenFile(#[source] RemoteConfigError),
    /// `max_attempts`, `request_timeout` or `retry_deadline` was zero.
    #[error("HTTP usage exporter setting `{0}` must be greater than zero")]
    Zero(&'static str),
    /// The HTTP client could not be built.
    #[error("could not build the HTTP client")]
    Client(#[source] RemoteConfigError),
}

impl From<RemoteConfigError> for HttpExporterBuildError {
    fn from(e: RemoteConfigError) -> Self {
        match e {
            RemoteConfigError::MissingServiceToken | RemoteConfigError::InvalidServiceToken => Self::InvalidToken,
            e @ (RemoteConfigError::NoUrl | RemoteConfigError::InvalidUrl { .. }) => Self::InvalidUrl(e),
            e @ RemoteConfigError::TokenFile { .. } => Self::TokenFile(e),
            e => Self::Client(e),
        }
    }
}

/// Builds an [`HttpUsageExporter`]. Defaults:
///
/// | setting | default |
/// | --- | --- |
/// | [`connect_timeout`](Self::connect_timeout) | 500 ms |
/// | [`failover_cooldown`](Self::failover_cooldown) | 2 s |
/// | [`request_timeout`](Self::request_timeout) | 2 s per attempt |
/// | [`max_attempts`](Self::max_attempts) | 8 per batch |
/// | [`initial_backoff`](Self::initial_backoff) | 100 ms, doubling, jittered |
/// | [`max_backoff`](Self::max_backoff) | 5 s |
/// | [`retry_deadline`](Self::retry_deadline) | 5 s per export |
#[must_use]
#[derive(Debug)]
pub struct HttpUsageExporterBuilder {
    remote: RemoteSettings,
    request_timeout: Duration,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    retry_deadline: Duration,
}

impl HttpUsageExporterBuilder {
    remote_builder_methods!();

    /// Timeout of one attempt, from connecting to the end of the answer. Default 2 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Attempts per batch, the first included. Default 8.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Bound of the wait before the first retry; doubles each time up to
    /// [`max_backoff`](Self::max_backoff). Each wait is drawn uniformly between half the
    /// bound and the bound. Default 100 ms.
    pub fn initial_backoff(mut self, backoff: Duration) -> Self {
        self.initial_backoff = backoff;
        self
    }

    /// Longest wait between attempts, also the cap on an honored `Retry-After`. Default 5 s.
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// How long one export may retry before it returns its last error. Default 5 s.
    ///
    /// The [`UsageAggregator`](crate::UsageAggregator) keeps a batch that failed and sends
    /// it again later (same `batch_id`), so this only decides how much of a short outage
    /// one call rides out. Keep it below the aggregator's flush interval (default 10 s),
    /// which also bounds each call.
    pub fn retry_deadline(mut self, deadline: Duration) -> Self {
        self.retry_deadline = deadline;
        self
    }

    /// Checks the URLs and token and builds the client.
    pub fn build(self) -> Result<HttpUsageExporter, HttpExporterBuildError> {
        for (name, zero) in [
            ("max_attempts", self.max_attempts == 0),
            ("request_timeout", self.request_timeout.is_zero()),
            ("retry_deadline", self.retry_deadline.is_zero()),
        ] {
            if zero {
                return Err(HttpExporterBuildError::Zero(name));
            }
        }
        let remote = self.remote.build(wire::USAGE_PATH, None, None)?;
        Ok(HttpUsageExporter {
            remote: std::sync::Arc::new(remote),
            request_timeout: self.request_timeout,
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff.max(self.initial_backoff),
            retry_deadline: self.retry_deadline,
        })
    }
}

/// Exports aggregated usage to the key service: `POST {base}/v1/usage` with
/// `Authorization: Bearer <service token>` and the [`AggregateBatch`] as JSON
/// (`{"batch_id", "rows", "networks", "dropped", ...}`), expecting `202 {"accepted": n}`.
/// Any 2xx is taken as delivered, also `{"accepted": n, "duplicate": true}`: the key
/// service had applied that `batch_id` before (an earlier answer was lost), which is
/// success.
///
/// A failed attempt (transport error, timeout, 408, 429 or 5xx) is retried with
/// exponential backoff and jitter, honoring `Retry-After`, until the batch is
/// delivered, 8 attempts are spent, or 5 s have passed (see
/// [`HttpUsageExporterBuilder`]); then `export` returns the error and the
/// [`UsageAggregator`](crate::UsageAggregator) keeps the batch to send again later. Other
/// statuses (400, 401, 413, a redirect: none is followed) are not retried within the
/// call; 400, 413 and 422 mean the batch itself is refused
/// ([`ExportError::is_permanent`]).
///
/// Given several base URLs (replicas), a batch whose connection cannot be established
/// moves to the next URL at once, without waiting; a URL that refused is tried last for
/// the failover cooldown (default 2 s).
///
/// The body is encoded once per call. `Debug` never shows the service token.
///
/// Raw [`UsageEvent`](crate::UsageEvent)s are not sent by this exporter: they are for
/// your own [`UsageExporter`](crate::UsageExporter) behind a
/// [`UsagePipeline`](crate::UsagePipeline) (the key service still accepts the older
/// `{"events": [...]}` body from middlewares that send it).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use keygate::{HttpUsageExporter, UsageAggregator};
///
/// let exporter = HttpUsageExporter::builder(["https://keys-a.internal:8443", "https://keys-b.internal:8443"])
///     .service_token(std::env::var("KEYGATE_SERVICE_TOKEN")?)
///     .build()?;
/// let (sink, handle) = UsageAggregator::builder().build(exporter)?;
/// // layer = ApiKeyLayer::new(verifier).usage(sink);
/// // ... and on the way out:
/// let stats = handle.shutdown().await;
/// # drop(sink);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[must_use]
pub struct HttpUsageExporter {
    remote: std::sync::Arc<Remote>,
    request_timeout: Duration,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    retry_deadline: Duration,
}

impl HttpUsageExporter {
    /// A builder for the key service at `urls` (one base URL such as
    /// `http://127.0.0.1:8080`, or several replicas, at most 64). Set the service token
    /// with [`service_token`](HttpUsageExporterBuilder::service_token).
    pub fn builder(urls: impl KeyServiceUrls) -> HttpUsageExporterBuilder {
        HttpUsageExporterBuilder {
            remote: RemoteSettings::new(urls),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            retry_deadline: DEFAULT_RETRY_DEADLINE,
        }
    }

    /// The URL batches go to first.
    pub fn endpoint(&self) -> &str {
        self.remote.endpoints.get(0).url.as_str()
    }

    async fn attempt(&self, index: usize, body: &Bytes, timeout: Duration, batch: &AggregateBatch) -> Attempt {
        let endpoint = self.remote.endpoints.get(index);
        let (request, ticket) = self.remote.request(reqwest::Method::POST, endpoint).await;
        let request = request
            .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .timeout(timeout)
            .body(body.clone());
        match request.send().await {
            Ok(response) if response.status().is_success() && answered_by(&response, endpoint) => {
                // The answer is informational: the batch is delivered either way.
                let answer = read_body(response, MAX_ACCEPTED_BYTES)
                    .await
                    .ok()
                    .and_then(|body| serde_json::from_slice::<UsageAccepted>(&body).ok());
                if let Some(UsageAccepted { accepted, duplicate, .. }) = answer {
                    tracing::debug!(
                        target: "keygate::usage",
                        batch_id = %batch.batch_id,
                        sent = batch.requests(),
                        accepted,
                        duplicate,
                        "usage batch delivered"
                    );
                }
                Attempt::Delivered
            }
            Ok(response) if response.status() == StatusCode::UNAUTHORIZED && answered_by(&response, endpoint) => {
                Attempt::Refused(ExportError::Status { status: 401 }, ticket)
            }
            Ok(response) => {
                let status = response.status();
                let error = ExportError::Status { status: status.as_u16() };
                if status.is_redirection() || !answered_by(&response, endpoint) {
                    tracing::error!(target: "keygate::usage", endpoint = %endpoint.label, %status, "key service answered with a redirect; not followed");
                }
                if is_retryable(status) {
                    Attempt::Retry(error, retry_after(response.headers()))
                } else {
                    Attempt::Fatal(error)
                }
            }
            Err(e) if e.is_timeout() => Attempt::Retry(ExportError::Timeout, None),
            Err(e) if e.is_connect() => Attempt::Connect(ExportError::Transport(Box::new(e))),
            Err(e) => Attempt::Retry(ExportError::Transport(Box::new(e)), None),
        }
    }
}

enum Attempt {
    Delivered,
    /// No connection: the next URL may take it at once.
    Connect(ExportError),
    Retry(ExportError, Option<Duration>),
    Fatal(ExportError),
    /// 401: retried at once, once, if the token file holds another token.
    Refused(ExportError, Ticket),
}

impl AggregateExporter for HttpUsageExporter {
    async fn export(&self, batch: &AggregateBatch) -> Result<(), ExportError> {
        let deadline = Instant::now() + self.retry_deadline;
        let body = Bytes::from(serde_json::to_vec(batch).map_err(ExportError::Encode)?);
        let endpoints = &self.remote.endpoints;
        let mut cursor = endpoints.start();
        // URLs that refused a connection since the last wait: the others are tried first.
        let mut tried: u64 = 0;
        let mut failures = 0;
        let mut attempts = 0;
        let mut auth_retried = false;
        loop {
            let index = endpoints.pick(cursor, tried).unwrap_or(cursor % endpoints.len());
            let remaining = deadline.saturating_duration_since(Instant::now());
            attempts += 1;
            let (error, retry_after) = match self
                .attempt(index, &body, self.request_timeout.min(remaining), batch)
                .await
            {
                Attempt::Delivered => {
                    endpoints.mark_up(index);
                    return Ok(());
                }
                Attempt::Fatal(error) => return Err(error),
                Attempt::Refused(error, ticket) => {
                    if auth_retried || !self.remote.auth.refused(ticket).await {
                        tracing::error!(target: "keygate::usage", "key service refused the service token");
                        return Err(error);
                    }
                    tracing::info!(target: "keygate::usage", "key service refused the service token; retrying with the new one from the token file");
                    auth_retried = true;
                    cursor = index;
                    continue;
                }
                Attempt::Connect(error) => {
                    endpoints.mark_down(index);
                    tried |= 1 << index;
                    cursor = index + 1;
                    if attempts < self.max_attempts && endpoints.pick(cursor, tried).is_some() {
                        tracing::debug!(target: "keygate::usage", %error, "usage export: no connection; trying the next URL");
                        continue;
                    }
                    (error, None)
                }
                Attempt::Retry(error, retry_after) => (error, retry_after),
            };
            tried = 0;
            let wait = backoff(self.initial_backoff, self.max_backoff, failures)
                .max(retry_after.unwrap_or_default().min(self.max_backoff));
            failures += 1;
            if attempts >= self.max_attempts || Instant::now() + wait >= deadline {
                return Err(ExportError::GaveUp { attempts, last: Box::new(error) });
            }
            tracing::debug!(target: "keygate::usage", attempts, %error, wait_ms = wait.as_millis() as u64, "usage export failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }
}

impl fmt::Debug for HttpUsageExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpUsageExporter")
            .field("endpoints", &self.remote.endpoints)
            .field("service_token", &"<redacted>")
            .field("request_timeout", &self.request_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("retry_deadline", &self.retry_deadline)
            .finish()
    }
}

fn is_retryable(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS
}

/// `Retry-After` in seconds; the HTTP-date form is not worth a date parser here.
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let seconds = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(seconds))
}
