//! The HTTP client under every keygate client of the key service (the middleware's
//! remote parts and the admin client): rustls, timeouts, no redirects, bounded answers.

use std::error::Error as _;
use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

/// How a client's connections behave.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientOptions {
    pub(crate) connect_timeout: Duration,
    /// Deadline of a whole request; `None` for streams.
    pub(crate) timeout: Option<Duration>,
    pub(crate) tcp_keepalive: Option<Duration>,
}

/// How long a pooled connection may sit idle before the client drops it: well below
/// the key service's 10 s header-read timeout, which also closes idle keep-alive
/// connections. A connection the server is closing can otherwise be picked for the
/// next request: hyper resends a request only when the connection failed before any
/// of it was written, so a close racing the write fails the request (a verify call
/// answered 503, a usage batch retried). Webhook receivers' servers commonly close
/// idle connections after 5 s or more as well.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// A reqwest client on rustls that never follows a redirect: a key-service address
/// answering 3xx must not be able to send the request (and the service token) to
/// another host, nor have that host's answer trusted.
pub(crate) fn http_client(options: ClientOptions) -> Result<reqwest::Client, reqwest::Error> {
    http_client_builder(options).build()
}

/// The builder of [`http_client`], for a client that needs more (its own resolver).
pub(crate) fn http_client_builder(options: ClientOptions) -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(options.connect_timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .tcp_keepalive(options.tcp_keepalive)
        .user_agent(concat!("keygate/", env!("CARGO_PKG_VERSION")));
    if let Some(timeout) = options.timeout {
        builder = builder.timeout(timeout);
    }
    builder
}

/// Why an answer could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Longer than allowed.
    TooLarge(usize),
    /// The transfer failed.
    Transfer(reqwest::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge(max) => write!(f, "answer larger than {max} bytes"),
            Self::Transfer(e) => f.write_str(&describe(e)),
        }
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::TooLarge(_) => None,
            Self::Transfer(e) => Some(e),
        }
    }
}

/// Reads an answer's body, refusing one longer than `max` bytes without reading it all.
pub(crate) async fn read_body(mut response: reqwest::Response, max: usize) -> Result<Bytes, ReadError> {
    if response.content_length().is_some_and(|len| len > max as u64) {
        return Err(ReadError::TooLarge(max));
    }
    let mut buf = BytesMut::with_capacity(response.content_length().map_or(512, |l| l as usize));
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transfer)? {
        if buf.len() + chunk.len() > max {
            return Err(ReadError::TooLarge(max));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// A reqwest error's causes (without reqwest's own line, which repeats the URL that logs
/// already name by label).
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut out = String::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(s) = source {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s.to_string());
        source = s.source();
    }
    if out.is_empty() { e.to_string() } else { out }
}

/// A reqwest error shown by its causes (reqwest's own line repeats the URL), with
/// reqwest's error as its source (for the verifiers' errors; the admin client reports its
/// own way).
#[cfg(any(feature = "remote", feature = "introspection"))]
pub(crate) struct Cause(pub(crate) reqwest::Error);

#[cfg(any(feature = "remote", feature = "introspection"))]
impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(any(feature = "remote", feature = "introspection"))]
impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe(&self.0))
    }
}

#[cfg(any(feature = "remote", feature = "introspection"))]
impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}
