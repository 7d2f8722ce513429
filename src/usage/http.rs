//! [`HttpUsageExporter`]: `POST /v1/usage` to the key service.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Deserialize;
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::exporter::{ExportError, UsageBatch, UsageExporter};

/// Default connect timeout: 500 ms.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default timeout of one attempt, body included: 2 s.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Default attempts per batch: 8.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
/// Default first backoff: 100 ms (doubling, jittered).
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Default longest backoff: 5 s.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Default time a batch may spend being retried: 30 s.
pub const DEFAULT_RETRY_DEADLINE: Duration = Duration::from_secs(30);

/// An [`HttpUsageExporter`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpExporterBuildError {
    /// The base URL does not parse, or is not `http`/`https`.
    #[error("invalid key service URL: {0}")]
    InvalidUrl(String),
    /// The service token is empty or holds bytes a header cannot carry.
    #[error("invalid service token (empty, or not visible ASCII)")]
    InvalidToken,
    /// `max_attempts`, `request_timeout` or `retry_deadline` was zero.
    #[error("HTTP usage exporter setting `{0}` must be greater than zero")]
    Zero(&'static str),
    /// The HTTP client could not be built.
    #[error("could not build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Builds an [`HttpUsageExporter`]. Defaults:
///
/// | setting | default |
/// | --- | --- |
/// | [`connect_timeout`](Self::connect_timeout) | 500 ms |
/// | [`request_timeout`](Self::request_timeout) | 2 s per attempt |
/// | [`max_attempts`](Self::max_attempts) | 8 per batch |
/// | [`initial_backoff`](Self::initial_backoff) | 100 ms, doubling, jittered |
/// | [`max_backoff`](Self::max_backoff) | 5 s |
/// | [`retry_deadline`](Self::retry_deadline) | 30 s per batch |
#[must_use]
pub struct HttpUsageExporterBuilder {
    base_url: String,
    token: Zeroizing<String>,
    client: Option<reqwest::Client>,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    retry_deadline: Duration,
}

impl HttpUsageExporterBuilder {
    /// Connect timeout. Default 500 ms. Ignored when [`client`](Self::client) is given.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

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

    /// Wait before the first retry; doubles each time up to [`max_backoff`](Self::max_backoff).
    /// Each wait is jittered to between half and all of it. Default 100 ms.
    pub fn initial_backoff(mut self, backoff: Duration) -> Self {
        self.initial_backoff = backoff;
        self
    }

    /// Longest wait between attempts, also the cap on an honored `Retry-After`. Default 5 s.
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// How long one batch may be retried before it is given up (and its events counted as
    /// lost by the pipeline). Default 30 s.
    ///
    /// The pipeline exports one batch at a time, so at most one batch is ever being retried:
    /// while it is, new events wait in the pipeline's bounded queue, and are dropped and
    /// counted once it is full. Memory stays bounded by the queue and this one batch.
    pub fn retry_deadline(mut self, deadline: Duration) -> Self {
        self.retry_deadline = deadline;
        self
    }

    /// Uses this client (to share a connection pool) instead of building one.
    pub fn client(mut self, client: reqwest::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Checks the URL and token and builds the client.
    pub fn build(self) -> Result<HttpUsageExporter, HttpExporterBuildError> {
        let endpoint = format!("{}/v1/usage", self.base_url.trim_end_matches('/'));
        let endpoint = reqwest::Url::parse(&endpoint)
            .map_err(|e| HttpExporterBuildError::InvalidUrl(format!("{endpoint}: {e}")))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(HttpExporterBuildError::InvalidUrl(format!("{endpoint}: scheme must be http or https")));
        }
        if self.token.is_empty() || !self.token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(HttpExporterBuildError::InvalidToken);
        }
        let bearer = Zeroizing::new(format!("Bearer {}", self.token.as_str()));
        let mut authorization =
            HeaderValue::from_str(bearer.as_str()).map_err(|_| HttpExporterBuildError::InvalidToken)?;
        // Keeps it out of HPACK tables and `Debug` output.
        authorization.set_sensitive(true);
        for (name, zero) in [
            ("max_attempts", self.max_attempts == 0),
            ("request_timeout", self.request_timeout.is_zero()),
            ("retry_deadline", self.retry_deadline.is_zero()),
        ] {
            if zero {
                return Err(HttpExporterBuildError::Zero(name));
            }
        }
        let client = match self.client {
            Some(client) => client,
            None => reqwest::Client::builder()
                .connect_timeout(self.connect_timeout)
                .user_agent(concat!("keygate/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(HttpExporterBuildError::Client)?,
        };
        Ok(HttpUsageExporter {
            client,
            endpoint,
            authorization,
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff.max(self.initial_backoff),
            retry_deadline: self.retry_deadline,
        })
    }
}

impl fmt::Debug for HttpUsageExporterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpUsageExporterBuilder")
            .field("base_url", &self.base_url)
            .field("service_token", &"<redacted>")
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("retry_deadline", &self.retry_deadline)
            .finish_non_exhaustive()
    }
}

/// Exports usage batches to the key service: `POST {base}/v1/usage` with
/// `Authorization: Bearer <service token>` and body `{"events": [...], "dropped": n}`,
/// expecting `202 {"accepted": n}` (any 2xx is taken as delivered).
///
/// A failed attempt (transport error, timeout, 408, 429 or 5xx) is retried with jittered
/// exponential backoff, honoring `Retry-After`, until the batch is delivered, 8 attempts
/// are spent, or 30 s have passed (see [`HttpUsageExporterBuilder`]); then the batch is
/// given up and the pipeline counts its events as lost and reports them in the next
/// batch's `dropped`. Other statuses (400, 401, 413, ...) are not retried: sending the same
/// bytes again would not help.
///
/// The body is encoded once per batch. `Debug` never shows the service token.
///
/// The reference key service takes at most 10 000 events and 4 MiB per batch and answers
/// 400 or 413 beyond that, which is not retried: keep the pipeline's
/// [`batch_size`](crate::usage::UsagePipelineBuilder::batch_size) at or below 10 000 (the
/// default 1 000 encodes to about 300 KB).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use keygate::usage::{HttpUsageExporter, UsagePipeline};
///
/// let exporter = HttpUsageExporter::builder("https://keys.internal:8443", std::env::var("KEYGATE_SERVICE_TOKEN")?)
///     .retry_deadline(std::time::Duration::from_secs(10))
///     .build()?;
/// let (sink, handle) = UsagePipeline::builder().build(exporter)?;
/// # drop((sink, handle));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct HttpUsageExporter {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    authorization: HeaderValue,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    retry_deadline: Duration,
}

impl HttpUsageExporter {
    /// A builder for the key service at `base_url` (e.g. `http://127.0.0.1:8080`), which
    /// the exporter authenticates to with `service_token`.
    pub fn builder(base_url: impl Into<String>, service_token: impl Into<String>) -> HttpUsageExporterBuilder {
        HttpUsageExporterBuilder {
            base_url: base_url.into(),
            token: Zeroizing::new(service_token.into()),
            client: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            retry_deadline: DEFAULT_RETRY_DEADLINE,
        }
    }

    /// The URL batches go to.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    async fn attempt(&self, body: &Bytes, timeout: Duration, events: usize) -> Attempt {
        let request = self
            .client
            .post(self.endpoint.clone())
            .header(header::AUTHORIZATION, self.authorization.clone())
            .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .timeout(timeout)
            .body(body.clone());
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                // The count is informational: the batch is delivered either way.
                match response.json::<Accepted>().await {
                    Ok(Accepted { accepted }) if accepted != events as u64 => {
                        tracing::warn!(
                            target: "keygate::usage",
                            sent = events,
                            accepted,
                            "key service accepted a different number of usage events than sent"
                        );
                    }
                    _ => {}
                }
                Attempt::Delivered
            }
            Ok(response) => {
                let status = response.status();
                let error = ExportError::Status { status: status.as_u16() };
                if is_retryable(status) {
                    Attempt::Retry(error, retry_after(response.headers()))
                } else {
                    Attempt::Fatal(error)
                }
            }
            Err(e) if e.is_timeout() => Attempt::Retry(ExportError::Timeout, None),
            Err(e) => Attempt::Retry(ExportError::Transport(Box::new(e)), None),
        }
    }
}

enum Attempt {
    Delivered,
    Retry(ExportError, Option<Duration>),
    Fatal(ExportError),
}

#[derive(Deserialize)]
struct Accepted {
    accepted: u64,
}

impl UsageExporter for HttpUsageExporter {
    async fn export(&self, batch: UsageBatch) -> Result<(), ExportError> {
        let deadline = Instant::now() + self.retry_deadline;
        let events = batch.events.len();
        let body = Bytes::from(serde_json::to_vec(&batch).map_err(ExportError::Encode)?);
        drop(batch);
        let mut backoff = self.initial_backoff;
        let mut attempts = 0;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            attempts += 1;
            let (error, retry_after) = match self.attempt(&body, self.request_timeout.min(remaining), events).await {
                Attempt::Delivered => return Ok(()),
                Attempt::Fatal(error) => return Err(error),
                Attempt::Retry(error, retry_after) => (error, retry_after),
            };
            let wait = jitter(backoff).max(retry_after.unwrap_or_default().min(self.max_backoff));
            if attempts >= self.max_attempts || Instant::now() + wait >= deadline {
                return Err(ExportError::GaveUp { attempts, last: Box::new(error) });
            }
            tracing::debug!(target: "keygate::usage", attempts, %error, wait_ms = wait.as_millis() as u64, "usage export failed; retrying");
            tokio::time::sleep(wait).await;
            backoff = backoff.saturating_mul(2).min(self.max_backoff);
        }
    }
}

impl fmt::Debug for HttpUsageExporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpUsageExporter")
            .field("endpoint", &self.endpoint.as_str())
            .field("service_token", &"<redacted>")
            .field("connect_timeout", &self.connect_timeout)
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

/// Between half and all of `backoff`, so that many exporters that failed together do not
/// retry together.
fn jitter(backoff: Duration) -> Duration {
    let half = backoff / 2;
    let spread = half.as_nanos().min(u64::MAX as u128) as u64;
    let random = getrandom::u64().unwrap_or(0);
    half + Duration::from_nanos(if spread == 0 { 0 } else { random % (spread + 1) })
}
