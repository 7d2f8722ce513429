//! [`HttpVerifier`]: asks the key service (wire protocol v1, `POST /v1/keys/verify`, and
//! `POST /v1/keys/verify-batch` for a cache's background refreshes).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE};

use crate::key::{ApiKey, KeyDigest};
use crate::principal::Principal;
use crate::remote::{
    Cause, Endpoint, KeyServiceUrls, ReadError, Remote, RemoteConfigError, RemoteSettings, Ticket, read_body,
    remote_builder_methods,
};
use crate::scope::{ScopeSet, validate_role};
use crate::verify::{SharedError, Verdict, Verifier, VerifyError};
use crate::wire::{self, Refusal, ValidKey, VerifyAnswer, VerifyBatchAnswer, VerifyBatchRequest, VerifyRequest};

/// Default deadline of one verification, retries and failover included: 2 s.
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(2);
/// Default largest answer read from the key service: 64 KiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Asks the key service about each key: `POST {base}/v1/keys/verify` with
/// `Authorization: Bearer <service token>` and `{"digest": "<hex SHA-256 of the key>"}`
/// (see [`wire`](crate::wire) for the protocol). The raw key never leaves the process.
///
/// Put a [`CachedVerifier`](crate::CachedVerifier) in front of it: on its own it makes
/// one call per request.
///
/// # Answers and errors
///
/// A 200 answer `{"valid": true, ...}` becomes [`Verdict::Valid`] (scopes parsed with
/// [`ScopeSet::parse`], `expires_at` as RFC 3339); `{"valid": false, "code": ...}`
/// becomes [`Verdict::Invalid`] with the matching [`Reason`](crate::Reason), and the
/// `key_id` the key service adds for refused keys that exist. Everything else is a
/// [`VerifyError`], never a denial: another status, a redirect included
/// ([`VerifyError::Status`]; redirects are never followed, so their target receives
/// nothing), a body that does not parse, has an unknown `code`, or is larger than
/// `max_response_bytes` ([`VerifyError::BadAnswer`]), no answer within `timeout`
/// ([`VerifyError::Timeout`]), a refused or reset connection
/// ([`VerifyError::Unreachable`]).
///
/// # Retries and several key services
///
/// The only retry is one immediate retry when a connection is reset or closed before
/// the answer arrives: the usual cause is a pooled keep-alive connection the key service
/// had just closed, and verification is idempotent. Timeouts, error statuses and bad
/// answers are not retried.
///
/// Given several base URLs (replicas of one key service), calls go round robin; a call
/// whose connection cannot be established (refused, unreachable, connect timeout) moves
/// to the next URL, until each was tried once. A URL that failed to connect is then
/// tried last for `failover_cooldown` (default 2 s), so that a dead replica does not
/// cost every other request a connect timeout. `timeout` bounds the whole call, retry
/// and failover included.
///
/// # Secrets
///
/// The service token is sent as a sensitive header and never shown by `Debug`; the key
/// is never sent nor logged. Read from a file
/// ([`service_token_file`](HttpVerifierBuilder::service_token_file)), it follows the
/// file: a 401 reads the file again and, if it holds a new token, the call is sent once
/// more with it. URLs with credentials in them are refused.
///
/// ```no_run
/// use std::time::Duration;
/// use keygate::{CachedVerifier, HttpVerifier};
///
/// let remote = HttpVerifier::builder(["http://keys-a:7000", "http://keys-b:7000"])
///     .service_token(std::env::var("KEYGATE_SERVICE_TOKEN").unwrap())
///     .timeout(Duration::from_secs(1))
///     .build()
///     .unwrap();
/// let verifier = CachedVerifier::new(remote);
/// ```
#[derive(Clone)]
#[must_use]
pub struct HttpVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    remote: Remote,
    /// Per endpoint, in the same order: its batch verify URL.
    batch_urls: Box<[reqwest::Url]>,
    timeout: Duration,
    max_response_bytes: usize,
}

/// Which call: the single verify at the endpoint's URL, or the batch one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    One,
    Batch,
}

impl fmt::Debug for HttpVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpVerifier")
            .field("endpoints", &self.inner.remote.endpoints)
            .field("service_token", &"<redacted>")
            .field("timeout", &self.inner.timeout)
            .field("max_response_bytes", &self.inner.max_response_bytes)
            .finish_non_exhaustive()
    }
}

/// Builds an [`HttpVerifier`]; see [`HttpVerifier::builder`].
#[must_use]
#[derive(Debug)]
pub struct HttpVerifierBuilder {
    remote: RemoteSettings,
    timeout: Duration,
    max_response_bytes: usize,
}

impl HttpVerifier {
    /// Starts a builder for one base URL (`"http://127.0.0.1:7000"`) or several
    /// (`["http://a:7000", "http://b:7000"]`, at most 64). Defaults: connect timeout
    /// 500 ms, timeout 2 s, answers up to 64 KiB, failover cooldown 2 s. A service token
    /// is required.
    pub fn builder(urls: impl KeyServiceUrls) -> HttpVerifierBuilder {
        HttpVerifierBuilder {
            remote: RemoteSettings::new(urls),
            timeout: DEFAULT_VERIFY_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

impl HttpVerifierBuilder {
    remote_builder_methods!();

    /// Deadline of one verification, from the first byte sent to the last byte read,
    /// retry and failover included (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Largest answer body read (default 64 KiB); a larger one is a
    /// [`VerifyError::BadAnswer`].
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// Checks the URLs and the token and builds the verifier.
    pub fn build(self) -> Result<HttpVerifier, RemoteConfigError> {
        let remote = self.remote.build(wire::VERIFY_PATH, None, None)?;
        let batch_urls = (0..remote.endpoints.len())
            .map(|i| {
                let mut url = remote.endpoints.get(i).url.clone();
                let base = url.path().strip_suffix(wire::VERIFY_PATH).unwrap_or("").to_owned();
                url.set_path(&format!("{base}{}", wire::VERIFY_BATCH_PATH));
                url
            })
            .collect();
        Ok(HttpVerifier {
            inner: Arc::new(Inner {
                remote,
                batch_urls,
                timeout: self.timeout,
                max_response_bytes: self.max_response_bytes,
            }),
        })
    }
}

/// How one attempt failed, which decides what happens next.
enum Failure {
    /// No connection: try the next URL.
    Connect(VerifyError),
    /// The connection broke before the answer: retry once.
    Reset(VerifyError),
    /// 401: the token this ticket stands for was refused; retry once if the token file
    /// holds another one.
    Refused(VerifyError, Ticket),
    /// Anything else: give up.
    Final(VerifyError),
}

impl Verifier for HttpVerifier {
    async fn verify(&self, key: &ApiKey) -> Result<Verdict, VerifyError> {
        let inner = &*self.inner;
        let body = serde_json::to_vec(&VerifyRequest::Digest(key.digest()))
            .map_err(|e| VerifyError::Other(SharedError::new(e)))?;
        inner.timed(inner.call(Call::One, Bytes::from(body), inner.max_response_bytes, parse_answer)).await
    }

    /// `POST /v1/keys/verify-batch`, [`MAX_VERIFY_BATCH`](wire::MAX_VERIFY_BATCH) digests
    /// per call at most (more are sent in several calls, one after the other); each call
    /// has the verify `timeout`, and its answer may be `max_response_bytes` per digest. An answer whose count differs from the request's is a
    /// [`VerifyError::BadAnswer`].
    fn verify_digests(
        &self,
        digests: &[KeyDigest],
    ) -> Option<impl Future<Output = Result<Vec<Verdict>, VerifyError>> + Send> {
        let inner = &*self.inner;
        Some(async move {
            let mut verdicts = Vec::with_capacity(digests.len());
            for chunk in digests.chunks(wire::MAX_VERIFY_BATCH) {
                let request = VerifyBatchRequest { digests: chunk.to_vec() };
                let body = serde_json::to_vec(&request).map_err(|e| VerifyError::Other(SharedError::new(e)))?;
                // Each answer may be as large as a single one.
                let limit = inner.max_response_bytes.saturating_mul(chunk.len());
                let answers =
                    inner.timed(inner.call(Call::Batch, Bytes::from(body), limit, parse_batch_answer)).await?;
                if answers.len() != chunk.len() {
                    let message = format!("{} answers to a batch of {}", answers.len(), chunk.len());
                    return Err(VerifyError::BadAnswer(message.into()));
                }
                verdicts.extend(answers);
            }
            Ok(verdicts)
        })
    }
}

impl Inner {
    async fn timed<T>(&self, call: impl Future<Output = Result<T, VerifyError>>) -> Result<T, VerifyError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => {
                tracing::debug!(timeout = ?self.timeout, "key service: verify timed out");
                Err(VerifyError::Timeout(self.timeout))
            }
        }
    }

    async fn call<T>(
        &self,
        which: Call,
        body: Bytes,
        limit: usize,
        parse: fn(&[u8]) -> Result<T, VerifyError>,
    ) -> Result<T, VerifyError> {
        let endpoints = &self.remote.endpoints;
        let n = endpoints.len();
        let mut cursor = endpoints.start();
        let mut tried: u64 = 0;
        let mut retried = false;
        let mut auth_retried = false;
        let mut last = None;
        while let Some(index) = endpoints.pick(cursor, tried) {
            let endpoint = endpoints.get(index);
            match self.attempt(which, index, endpoint, body.clone(), limit, parse).await {
                Ok(verdict) => {
                    endpoints.mark_up(index);
                    return Ok(verdict);
                }
                Err(Failure::Final(err)) => return Err(err),
                Err(Failure::Refused(err, ticket)) => {
                    if auth_retried || !self.remote.auth.refused(ticket).await {
                        tracing::error!(endpoint = %endpoint.label, "key service refused the service token");
                        return Err(err);
                    }
                    tracing::info!(endpoint = %endpoint.label, "key service refused the service token; retrying with the new one from the token file");
                    auth_retried = true;
                    // The same URL again, with the new token.
                    cursor = index;
                    continue;
                }
                Err(Failure::Connect(err)) => {
                    tried |= 1 << index;
                    if endpoints.mark_down(index) && n > 1 {
                        tracing::warn!(endpoint = %endpoint.label, error = %err, "key service unreachable; trying the others first");
                    } else {
                        tracing::debug!(endpoint = %endpoint.label, error = %err, "key service: no connection");
                    }
                    last = Some(err);
                }
                Err(Failure::Reset(err)) => {
                    tracing::debug!(endpoint = %endpoint.label, error = %err, "key service: connection reset");
                    if retried {
                        return Err(err);
                    }
                    retried = true;
                    if n > 1 {
                        tried |= 1 << index;
                    }
                    last = Some(err);
                }
            }
            cursor = index + 1;
        }
        Err(last.unwrap_or_else(|| VerifyError::Unreachable("no key service to ask".into())))
    }

    async fn attempt<T>(
        &self,
        which: Call,
        index: usize,
        endpoint: &Endpoint,
        body: Bytes,
        limit: usize,
        parse: fn(&[u8]) -> Result<T, VerifyError>,
    ) -> Result<T, Failure> {
        let url = match which {
            Call::One => endpoint.url.clone(),
            Call::Batch => self.batch_urls[index].clone(),
        };
        let (request, ticket) = self.remote.request_to(reqwest::Method::POST, url.clone()).await;
        let response = request
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .timeout(self.timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| self.classify(e))?;
        let status = response.status();
        // From another URL: a redirect was followed somewhere (never by our client).
        let answered = response.url() == &url;
        if status == reqwest::StatusCode::UNAUTHORIZED && answered {
            return Err(Failure::Refused(VerifyError::Status(401), ticket));
        }
        if status != reqwest::StatusCode::OK || !answered {
            if matches!(status.as_u16(), 401 | 403) {
                tracing::error!(endpoint = %endpoint.label, %status, "key service refused the service token");
            } else if status.is_redirection() || !answered {
                tracing::error!(endpoint = %endpoint.label, %status, "key service answered with a redirect; not followed");
            }
            return Err(Failure::Final(VerifyError::Status(status.as_u16())));
        }
        let body = read_body(response, limit).await.map_err(|e| match e {
            ReadError::Transfer(e) => self.classify(e),
            too_large => Failure::Final(VerifyError::BadAnswer(SharedError::new(too_large))),
        })?;
        parse(&body).map_err(Failure::Final)
    }

    fn classify(&self, e: reqwest::Error) -> Failure {
        if e.is_timeout() {
            return Failure::Final(VerifyError::Timeout(self.timeout));
        }
        let connect = e.is_connect();
        // The connection was up and broke before a full answer came back: reset, closed
        // early, or a protocol error on a stale pooled connection.
        let reset = e.is_request() || e.is_body();
        let decode = e.is_decode();
        let cause = Cause(e);
        if connect {
            Failure::Connect(VerifyError::Unreachable(SharedError::new(cause)))
        } else if reset {
            Failure::Reset(VerifyError::Unreachable(SharedError::new(cause)))
        } else if decode {
            Failure::Final(VerifyError::BadAnswer(SharedError::new(cause)))
        } else {
            Failure::Final(VerifyError::Other(SharedError::new(cause)))
        }
    }
}

/// Turns a 200 answer into a verdict. Anything unexpected is a `BadAnswer`: a key
/// service we do not understand must never turn into a denial or a grant.
pub(crate) fn parse_answer(body: &[u8]) -> Result<Verdict, VerifyError> {
    let answer: VerifyAnswer = serde_json::from_slice(body).map_err(|e| VerifyError::BadAnswer(SharedError::new(e)))?;
    verdict_of(answer)
}

/// A batch's answers, each read as [`parse_answer`] reads one: a single strange answer
/// fails the whole batch.
fn parse_batch_answer(body: &[u8]) -> Result<Vec<Verdict>, VerifyError> {
    let batch: VerifyBatchAnswer =
        serde_json::from_slice(body).map_err(|e| VerifyError::BadAnswer(SharedError::new(e)))?;
    batch.answers.into_iter().map(verdict_of).collect()
}

fn verdict_of(answer: VerifyAnswer) -> Result<Verdict, VerifyError> {
    let bad = |what: SharedError| VerifyError::BadAnswer(what);
    let answer = match answer {
        VerifyAnswer::Invalid(Refusal { code, key_id }) => {
            // A key id that comes with a denial is kept for usage events; a malformed
            // one is dropped rather than failing a verdict that is otherwise clear.
            let key_id = key_id.filter(|id| !id.is_empty() && id.len() <= 128).map(Arc::<str>::from);
            return Ok(Verdict::Invalid { reason: code, key_id });
        }
        VerifyAnswer::Valid(answer) => answer,
    };
    let ValidKey {
        key_id,
        owner,
        name,
        scopes,
        roles,
        environment,
        expires_at,
        meta,
        ratelimit,
        limits,
        credits,
        owner_limits,
        owner_credits,
        credits_revision,
        owner_credits_revision,
        allowed_networks,
        owner_allowed_networks,
    } = answer;
    if key_id.is_empty() {
        return Err(bad("a valid answer with an empty key_id".into()));
    }
    // Limits the key service could not have accepted are an answer we do not understand.
    let problem = crate::quota::limits_problem(&limits)
        .or_else(|| crate::quota::limits_problem(&owner_limits))
        .or_else(|| credits.as_ref().and_then(|c| c.problem()))
        .or_else(|| owner_credits.as_ref().and_then(|c| c.problem()));
    if let Some(why) = problem {
        return Err(bad(why.into()));
    }
    // A list we cannot read must not turn into "any network".
    let networks = |list: Vec<String>| -> Result<Vec<ipnet::IpNet>, VerifyError> {
        list.iter().map(|n| n.parse().map_err(|_| bad("an allowed network is not a CIDR".into()))).collect()
    };
    let (allowed_networks, owner_allowed_networks) = (networks(allowed_networks)?, networks(owner_allowed_networks)?);
    // An older key service sends only `ratelimit`: it is the `requests` limit.
    let ratelimit = ratelimit.filter(|_| !limits.iter().any(|l| &*l.name == crate::quota::REQUESTS));
    let scopes = ScopeSet::parse(scopes).map_err(|e| bad(SharedError::new(e)))?;
    for role in &roles {
        validate_role(role).map_err(|e| bad(SharedError::new(e)))?;
    }
    let mut principal = Principal::builder(key_id)
        .owner(owner)
        .name(name)
        .scopes(scopes)
        .roles(roles)
        .environment(environment)
        .expires_at(expires_at)
        .meta(meta)
        .limits(limits)
        .credits(credits)
        .owner_limits(owner_limits)
        .owner_credits(owner_credits)
        .credits_revisions(credits_revision, owner_credits_revision)
        .allowed_networks(allowed_networks)
        .owner_allowed_networks(owner_allowed_networks);
    if ratelimit.is_some() {
        principal = principal.ratelimit(ratelimit);
    }
    Ok(Verdict::Valid(principal.build()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::RateLimit;
    use crate::verify::Reason;

    #[test]
    fn answers_parse() {
        let v = parse_answer(
            br#"{"valid":true,"key_id":"k1","owner":"acme","name":"ci","scopes":["reports:read"],"roles":["admin"],
                "environment":"live","expires_at":"2099-01-01T00:00:00Z","meta":{"a":1},"ratelimit":{"limit":10,"period_s":60}}"#,
        )
        .unwrap();
        let Verdict::Valid(p) = v else { panic!("valid expected") };
        assert_eq!((p.key_id(), p.owner(), p.environment()), ("k1", "acme", "live"));
        assert!(p.has_role("admin"));
        assert_eq!(p.ratelimit(), Some(RateLimit { limit: 10, period_s: 60 }));
        assert!(p.expires_at().is_some());
        let minimal = parse_answer(br#"{"valid":true,"key_id":"k1","expires_at":null,"ratelimit":null}"#).unwrap();
        assert!(matches!(minimal, Verdict::Valid(_)));
        for (code, reason) in [
            ("NOT_FOUND", Reason::NotFound),
            ("REVOKED", Reason::Revoked),
            ("EXPIRED", Reason::Expired),
            ("DISABLED", Reason::Disabled),
        ] {
            let body = format!(r#"{{"valid":false,"code":"{code}"}}"#);
            assert!(
                matches!(parse_answer(body.as_bytes()), Ok(Verdict::Invalid { reason: r, key_id: None }) if r == reason)
            );
        }
    }

    #[test]
    fn strange_answers_are_errors_not_denials() {
        for body in [
            &br#"{"valid":false,"code":"GONE"}"#[..],
            br#"{"valid":false}"#,
            br#"{"valid":true}"#,
            br#"{"valid":true,"key_id":""}"#,
            br#"{"valid":true,"key_id":"k","scopes":["not a scope"]}"#,
            br#"{"valid":true,"key_id":"k","expires_at":"tomorrow"}"#,
            br#"{"valid":"yes"}"#,
            b"<html>",
            b"",
            b"null",
        ] {
            assert!(matches!(parse_answer(body), Err(VerifyError::BadAnswer(_))), "{}", String::from_utf8_lossy(body));
        }
        // The cause is kept, and shared by clones (coalesced waiters get the same one).
        let err = parse_answer(b"<html>").unwrap_err();
        let cause = std::error::Error::source(&err).expect("a source");
        assert!(err.to_string().ends_with(&cause.to_string()), "{err}");
        assert_eq!(std::error::Error::source(&err.clone()).unwrap().to_string(), cause.to_string());
    }

    #[test]
    fn debug_hides_the_token() {
        let v = HttpVerifier::builder("http://127.0.0.1:9").service_token("s3cret-token").build().unwrap();
        let out = format!("{v:?}");
        assert!(!out.contains("s3cret"), "{out}");
        assert!(out.contains("<redacted>"));
        let builder = HttpVerifier::builder("http://127.0.0.1:9").service_token("s3cret-token");
        assert!(!format!("{builder:?}").contains("s3cret"));
        assert!(HttpVerifier::builder("http://127.0.0.1:9").build().is_err());
        assert!(HttpVerifier::builder("http://127.0.0.1:9").service_token("a b").build().is_err());
        assert!(HttpVerifier::builder(vec!["http://127.0.0.1:1"; 65]).service_token("t").build().is_err());
    }
}
