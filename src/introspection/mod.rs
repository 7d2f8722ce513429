//! [`IntrospectionVerifier`]: OAuth2 token introspection (RFC 7662) against any
//! authorization server, on keygate's HTTP client (`transport`: rustls, timeouts, no
//! redirects, bounded answers).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::HeaderValue;
use http::header::{ACCEPT, AUTHORIZATION};
use zeroize::Zeroizing;

use crate::key::ApiKey;
use crate::scope::{Scope, ScopeError};
use crate::transport::{Cause, ClientOptions, ReadError, http_client, read_body};
use crate::verify::{SharedError, Verdict, Verifier, VerifyError};

mod claims;

/// Default deadline of one introspection call, the retry included: 2 s.
#[cfg_attr(docsrs, doc(cfg(feature = "introspection")))]
pub const DEFAULT_INTROSPECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Default connect timeout to the authorization server: 500 ms.
#[cfg_attr(docsrs, doc(cfg(feature = "introspection")))]
pub const DEFAULT_INTROSPECTION_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default largest introspection answer read: 64 KiB.
#[cfg_attr(docsrs, doc(cfg(feature = "introspection")))]
pub const DEFAULT_INTROSPECTION_MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// How keygate authenticates itself to the introspection endpoint. `Debug` shows the
/// method and the client id, never a secret.
#[derive(Clone)]
enum ClientAuth {
    /// `client_secret_basic` (RFC 6749 2.3.1): `Authorization: Basic`, id and secret
    /// form-urlencoded first.
    ClientSecretBasic { client_id: String, client_secret: Zeroizing<String> },
    /// `client_secret_post`: `client_id` and `client_secret` in the form body.
    ClientSecretPost { client_id: String, client_secret: Zeroizing<String> },
    /// `Authorization: Bearer <token>`, a token the authorization server gave this
    /// resource server for introspection (RFC 7662 2.1 allows it).
    Bearer(Zeroizing<String>),
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClientSecretBasic { client_id, .. } => f
                .debug_struct("ClientSecretBasic")
                .field("client_id", client_id)
                .field("client_secret", &"<redacted>")
                .finish(),
            Self::ClientSecretPost { client_id, .. } => f
                .debug_struct("ClientSecretPost")
                .field("client_id", client_id)
                .field("client_secret", &"<redacted>")
                .finish(),
            Self::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// Why an [`IntrospectionVerifier`] could not be built.
#[derive(Debug, Clone, thiserror::Error)]
#[cfg_attr(docsrs, doc(cfg(feature = "introspection")))]
#[non_exhaustive]
pub enum IntrospectionConfigError {
    /// The endpoint URL is not usable. The URL itself is not repeated (it could
    /// carry credentials).
    #[error("the introspection endpoint URL is not usable: {0}")]
    InvalidUrl(&'static str),
    /// No client authentication was configured.
    #[error(
        "client authentication is required (`.client_secret_basic(..)`, `.client_secret_post(..)` or `.bearer_token(..)`)"
    )]
    MissingClientAuth,
    /// A client id, secret or bearer token is empty or cannot be sent. Its value is
    /// never repeated.
    #[error("the client credentials must be non-empty, and a bearer token visible ASCII")]
    InvalidCredentials,
    /// A scope mapping's target is not a keygate scope.
    #[error("the mapping of foreign scope `{foreign}` is not a keygate scope: {source}")]
    ScopeMapping {
        /// The foreign scope whose mapping is wrong.
        foreign: String,
        /// Why the target is not a scope.
        source: ScopeError,
    },
    /// The HTTP client could not be built.
    #[error("the HTTP client could not be built")]
    Client(#[source] Arc<reqwest::Error>),
}

/// Verifies opaque OAuth2 tokens by asking the authorization server (RFC 7662 token
/// introspection): `POST` of the form `token=<token>` (and `token_type_hint` when
/// [configured](IntrospectionVerifierBuilder::token_type_hint)) to the introspection
/// endpoint, with client authentication `client_secret_basic`, `client_secret_post`
/// or a bearer token.
///
/// Put a [`CachedVerifier`](crate::CachedVerifier) in front of it, as of any verifier:
/// on its own it makes one call per request. The cache keys by the token's SHA-256 and
/// never keeps a verdict past the token's `exp`.
///
/// ```no_run
/// use keygate::{ApiKeyLayer, CachedVerifier, IntrospectionVerifier, KeyFormat};
///
/// let introspection = IntrospectionVerifier::builder("https://auth.example.com/oauth2/introspect")
///     .client_secret_basic("my-api", std::env::var("INTROSPECTION_SECRET").unwrap())
///     .audience("https://api.example.com")
///     .map_scope("read", "reports:read")
///     .build()
///     .unwrap();
/// // Opaque tokens are not keygate keys: switch the local format check off, and allow
/// // longer credentials than keygate's own (a JWT-sized token is often over 1 KiB).
/// let layer = ApiKeyLayer::new(CachedVerifier::new(introspection)).format(KeyFormat::opaque()).max_key_len(4096);
/// # let _: axum::Router = axum::Router::new().layer(layer);
/// ```
///
/// # The answer, mapped onto a [`Principal`](crate::Principal)
///
/// | member | becomes |
/// | --- | --- |
/// | `active: false` | [`Verdict::Invalid`] with [`Reason::NotFound`](crate::Reason::NotFound): the server does not say why (revoked, expired, unknown) |
/// | `client_id` | the key id (usage, rate limits and logs are per OAuth client); without it, `sub` |
/// | `sub` | the owner (the user the token acts for); without it, `client_id` |
/// | `username` | the name |
/// | `scope` | scopes: space-separated, each [mapped](IntrospectionVerifierBuilder::map_scope), or kept as it is when it is a valid keygate [`Scope`] (`resource:action`), or dropped |
/// | `exp` | `expires_at`: a token past it is [`Reason::Expired`](crate::Reason::Expired), and no cache keeps the verdict beyond it |
/// | `aud` | checked against the [configured audience](IntrospectionVerifierBuilder::audience), if any: not among them, [`Reason::NotFound`](crate::Reason::NotFound) |
/// | `iss` | checked against the [configured issuer](IntrospectionVerifierBuilder::issuer), if any: another one, [`Reason::NotFound`](crate::Reason::NotFound) |
/// | everything but `active` and `scope` | `meta`, as the server sent it ([`Principal::meta_as`](crate::Principal::meta_as)) |
///
/// An active token with neither `client_id` nor `sub` cannot be told apart from
/// another: it is a [`VerifyError::BadAnswer`].
///
/// # Errors are never denials
///
/// An answer other than 200 (the server refusing keygate's client credentials, a
/// redirect: never followed), no answer within `timeout`, a body that is not a JSON
/// object with a boolean `active`, or one larger than `max_response_bytes`: a
/// [`VerifyError`], which the layer answers 503 and a cache does not keep. The only
/// retry is one, at once, when a pooled connection breaks before the answer arrives.
///
/// # Secrets
///
/// The token is sent in the form body only, never logged, never in `Debug` or in an
/// error; the client secret and bearer token are sensitive headers (or form fields
/// for `client_secret_post`) and `Debug` shows neither. URLs with credentials in them
/// are refused.
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "introspection")))]
#[must_use]
pub struct IntrospectionVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    url: reqwest::Url,
    /// The URL without its query, for logs.
    label: String,
    /// `Authorization` for basic and bearer, sensitive.
    header: Option<HeaderValue>,
    /// `client_id` and `client_secret` for `client_secret_post`.
    post: Option<(String, Zeroizing<String>)>,
    auth_method: &'static str,
    client_id: Option<String>,
    token_type_hint: Option<String>,
    rules: claims::Rules,
    timeout: Duration,
    max_response_bytes: usize,
}

impl fmt::Debug for IntrospectionVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.inner;
        f.debug_struct("IntrospectionVerifier")
            .field("endpoint", &inner.label)
            .field("client_auth", &inner.auth_method)
            .field("client_id", &inner.client_id)
            .field("credentials", &"<redacted>")
            .field("token_type_hint", &inner.token_type_hint)
            .field("audience", &inner.rules.audience)
            .field("issuer", &inner.rules.issuer)
            .field("mapped_scopes", &inner.rules.scope_map.len())
            .field("keep_unmapped_scopes", &inner.rules.keep_unmapped)
            .field("timeout", &inner.timeout)
            .field("max_response_bytes", &inner.max_response_bytes)
            .finish_non_exhaustive()
    }
}

/// Builds an [`IntrospectionVerifier`]; see [`IntrospectionVerifier::builder`].
#[cfg_attr(docsrs, doc(cfg(feature = "introspection")))]
#[must_use]
pub struct IntrospectionVerifierBuilder {
    url: String,
    auth: Option<ClientAuth>,
    token_type_hint: Option<String>,
    audience: Option<String>,
    issuer: Option<String>,
    scope_map: Vec<(String, String)>,
    keep_unmapped: bool,
    timeout: Duration,
    connect_timeout: Duration,
    max_response_bytes: usize,
}

impl fmt::Debug for IntrospectionVerifierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IntrospectionVerifierBuilder")
            .field("client_auth", &self.auth)
            .field("token_type_hint", &self.token_type_hint)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("scope_map", &self.scope_map)
            .field("keep_unmapped_scopes", &self.keep_unmapped)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

impl IntrospectionVerifier {
    /// Starts a builder for the introspection endpoint's full URL
    /// (`https://auth.example.com/oauth2/introspect`). Defaults: no `token_type_hint`,
    /// no audience or issuer check, no scope mapping and unmapped valid keygate scopes
    /// kept, timeout 2 s, connect timeout 500 ms, answers up to 64 KiB. Client
    /// authentication is required.
    pub fn builder(url: impl Into<String>) -> IntrospectionVerifierBuilder {
        IntrospectionVerifierBuilder {
            url: url.into(),
            auth: None,
            token_type_hint: None,
            audience: None,
            issuer: None,
            scope_map: Vec::new(),
            keep_unmapped: true,
            timeout: DEFAULT_INTROSPECTION_TIMEOUT,
            connect_timeout: DEFAULT_INTROSPECTION_CONNECT_TIMEOUT,
            max_response_bytes: DEFAULT_INTROSPECTION_MAX_RESPONSE_BYTES,
        }
    }
}

impl IntrospectionVerifierBuilder {
    /// Authenticates with `client_secret_basic`: HTTP Basic with the client id and
    /// secret. Replaces any other client authentication.
    pub fn client_secret_basic(mut self, client_id: impl Into<String>, client_secret: impl Into<String>) -> Self {
        let client_secret = Zeroizing::new(client_secret.into());
        self.auth = Some(ClientAuth::ClientSecretBasic { client_id: client_id.into(), client_secret });
        self
    }

    /// Authenticates with `client_secret_post`: the client id and secret in the form
    /// body. Replaces any other client authentication.
    pub fn client_secret_post(mut self, client_id: impl Into<String>, client_secret: impl Into<String>) -> Self {
        let client_secret = Zeroizing::new(client_secret.into());
        self.auth = Some(ClientAuth::ClientSecretPost { client_id: client_id.into(), client_secret });
        self
    }

    /// Authenticates with `Authorization: Bearer <token>`. Replaces any other client
    /// authentication.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.auth = Some(ClientAuth::Bearer(Zeroizing::new(token.into())));
        self
    }

    /// Sends `token_type_hint=<hint>` with each token (default: no hint), usually
    /// `access_token`.
    pub fn token_type_hint(mut self, hint: impl Into<String>) -> Self {
        self.token_type_hint = Some(hint.into());
        self
    }

    /// Accepts only tokens whose `aud` (a string or an array) names `audience`
    /// (default: `aud` is not checked). A token without `aud` is then refused.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = Some(audience.into());
        self
    }

    /// Accepts only tokens whose `iss` is exactly `issuer` (default: `iss` is not
    /// checked). A token without `iss` is then refused.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// Reads the foreign scope `foreign` as the keygate scope `scope` (`"read"` as
    /// `"reports:read"`). Called again for the same foreign scope, it adds another
    /// keygate scope. `scope` is checked by [`build`](Self::build). Default: no
    /// mapping.
    pub fn map_scope(mut self, foreign: impl Into<String>, scope: impl Into<String>) -> Self {
        self.scope_map.push((foreign.into(), scope.into()));
        self
    }

    /// Whether a foreign scope with no mapping is kept when it is a valid keygate
    /// scope (`resource:action`) as it stands (default `true`). Scopes that are
    /// neither mapped nor valid keygate scopes are always dropped. Set `false` when the
    /// authorization server's scope names could collide with yours.
    pub fn keep_unmapped_scopes(mut self, keep: bool) -> Self {
        self.keep_unmapped = keep;
        self
    }

    /// Deadline of one introspection, from the first byte sent to the last byte read,
    /// retry included (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Connect timeout (default 500 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Largest answer body read (default 64 KiB); a larger one is a
    /// [`VerifyError::BadAnswer`].
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// Checks the URL, the credentials and the scope mapping, and builds the verifier.
    pub fn build(self) -> Result<IntrospectionVerifier, IntrospectionConfigError> {
        let url = check_url(&self.url)?;
        let mut label = url.clone();
        label.set_query(None);
        let auth = self.auth.ok_or(IntrospectionConfigError::MissingClientAuth)?;
        let (header, post, auth_method, client_id) = credentials(auth)?;
        let mut scope_map: HashMap<String, Vec<Scope>> = HashMap::new();
        for (foreign, scope) in self.scope_map {
            match Scope::parse(&scope) {
                Ok(s) => scope_map.entry(foreign).or_default().push(s),
                Err(source) => return Err(IntrospectionConfigError::ScopeMapping { foreign, source }),
            }
        }
        let client = http_client(ClientOptions {
            connect_timeout: self.connect_timeout,
            timeout: Some(self.timeout),
            tcp_keepalive: None,
        })
        .map_err(|e| IntrospectionConfigError::Client(Arc::new(e)))?;
        Ok(IntrospectionVerifier {
            inner: Arc::new(Inner {
                client,
                url,
                label: label.to_string(),
                header,
                post,
                auth_method,
                client_id,
                token_type_hint: self.token_type_hint,
                rules: claims::Rules {
                    audience: self.audience,
                    issuer: self.issuer,
                    scope_map,
                    keep_unmapped: self.keep_unmapped,
                },
                timeout: self.timeout,
                max_response_bytes: self.max_response_bytes,
            }),
        })
    }
}

fn check_url(raw: &str) -> Result<reqwest::Url, IntrospectionConfigError> {
    let url = reqwest::Url::parse(raw).map_err(|_| IntrospectionConfigError::InvalidUrl("not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(IntrospectionConfigError::InvalidUrl("the scheme must be http or https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(IntrospectionConfigError::InvalidUrl("credentials belong in the client authentication"));
    }
    if url.fragment().is_some() {
        return Err(IntrospectionConfigError::InvalidUrl("a fragment is not sent"));
    }
    Ok(url)
}

type Credentials = (Option<HeaderValue>, Option<(String, Zeroizing<String>)>, &'static str, Option<String>);

fn credentials(auth: ClientAuth) -> Result<Credentials, IntrospectionConfigError> {
    let invalid = IntrospectionConfigError::InvalidCredentials;
    let sensitive = |value: &str| {
        let mut header = HeaderValue::from_str(value).map_err(|_| IntrospectionConfigError::InvalidCredentials)?;
        header.set_sensitive(true);
        Ok::<_, IntrospectionConfigError>(header)
    };
    match auth {
        ClientAuth::ClientSecretBasic { client_id, client_secret } => {
            if client_id.is_empty() || client_secret.is_empty() {
                return Err(invalid);
            }
            // RFC 6749 2.3.1: both form-urlencoded before they are joined, so that a
            // `:` in either survives.
            let pair = Zeroizing::new(format!("{}:{}", *form_encode(&client_id), *form_encode(&client_secret)));
            let value = Zeroizing::new(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(&*pair)));
            Ok((Some(sensitive(&value)?), None, "client_secret_basic", Some(client_id)))
        }
        ClientAuth::ClientSecretPost { client_id, client_secret } => {
            if client_id.is_empty() || client_secret.is_empty() {
                return Err(invalid);
            }
            Ok((None, Some((client_id.clone(), client_secret)), "client_secret_post", Some(client_id)))
        }
        ClientAuth::Bearer(token) => {
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid);
            }
            let value = Zeroizing::new(format!("Bearer {}", *token));
            Ok((Some(sensitive(&value)?), None, "bearer", None))
        }
    }
}

/// Everything but RFC 3986's unreserved characters is percent-encoded: a space as
/// `%20`, not `+`, which form decoders and plain URL decoders (some authorization
/// servers use one for Basic credentials) read alike.
const FORM_VALUE: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// One form value (or Basic credential half), encoded.
fn form_encode(value: &str) -> Zeroizing<String> {
    Zeroizing::new(percent_encoding::utf8_percent_encode(value, FORM_VALUE).to_string())
}

impl Verifier for IntrospectionVerifier {
    async fn verify(&self, key: &ApiKey) -> Result<Verdict, VerifyError> {
        let inner = &*self.inner;
        match tokio::time::timeout(inner.timeout, inner.call(key)).await {
            Ok(result) => result,
            Err(_) => {
                tracing::debug!(endpoint = %inner.label, timeout = ?inner.timeout, "introspection timed out");
                Err(VerifyError::Timeout(inner.timeout))
            }
        }
    }
}

impl Inner {
    async fn call(&self, key: &ApiKey) -> Result<Verdict, VerifyError> {
        let body = self.form(key);
        let mut retried = false;
        loop {
            match self.attempt(&body).await {
                Err(Attempt::Reset(e)) if !retried => {
                    tracing::debug!(endpoint = %self.label, error = %e, "introspection: connection broke; retrying once");
                    retried = true;
                }
                Err(Attempt::Reset(e) | Attempt::Final(e)) => return Err(e),
                Ok(verdict) => return Ok(verdict),
            }
        }
    }

    /// The form body, held in memory that is wiped when the call is over.
    fn form(&self, key: &ApiKey) -> Zeroizing<String> {
        let mut form = Zeroizing::new(String::with_capacity(key.len() + 64));
        form.push_str("token=");
        form.push_str(&form_encode(key.expose_secret()));
        if let Some(hint) = &self.token_type_hint {
            form.push_str("&token_type_hint=");
            form.push_str(&form_encode(hint));
        }
        if let Some((client_id, secret)) = &self.post {
            form.push_str("&client_id=");
            form.push_str(&form_encode(client_id));
            form.push_str("&client_secret=");
            form.push_str(&form_encode(secret));
        }
        form
    }

    async fn attempt(&self, body: &Zeroizing<String>) -> Result<Verdict, Attempt> {
        let mut request = self
            .client
            .post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            // reqwest copies the body; the copy is its own and goes with the request.
            .body(body.as_bytes().to_vec());
        if let Some(header) = &self.header {
            request = request.header(AUTHORIZATION, header.clone());
        }
        let response = request.send().await.map_err(|e| self.classify(e))?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            if matches!(status.as_u16(), 401 | 403) {
                tracing::error!(endpoint = %self.label, %status, "the authorization server refused keygate's client credentials");
            } else if status.is_redirection() {
                tracing::error!(endpoint = %self.label, %status, "the authorization server answered with a redirect; not followed");
            } else {
                tracing::warn!(endpoint = %self.label, %status, "introspection failed");
            }
            return Err(Attempt::Final(VerifyError::Status(status.as_u16())));
        }
        let body = read_body(response, self.max_response_bytes).await.map_err(|e| match e {
            ReadError::Transfer(e) => self.classify(e),
            too_large => Attempt::Final(VerifyError::BadAnswer(SharedError::new(too_large))),
        })?;
        let verdict = claims::parse_answer(&body, &self.rules, time::OffsetDateTime::now_utc());
        if let Err(e) = &verdict {
            tracing::warn!(endpoint = %self.label, error = %e, "introspection answer not understood");
        }
        verdict.map_err(Attempt::Final)
    }

    fn classify(&self, e: reqwest::Error) -> Attempt {
        if e.is_timeout() {
            return Attempt::Final(VerifyError::Timeout(self.timeout));
        }
        // Up, then broken before the whole answer: a pooled connection the server had
        // just closed, most often. Introspection is idempotent.
        let reset = !e.is_connect() && (e.is_request() || e.is_body());
        let unreachable = e.is_connect() || reset;
        let cause = SharedError::new(Cause(e));
        match (reset, unreachable) {
            (true, _) => Attempt::Reset(VerifyError::Unreachable(cause)),
            (false, true) => Attempt::Final(VerifyError::Unreachable(cause)),
            _ => Attempt::Final(VerifyError::Other(cause)),
        }
    }
}

/// How one attempt failed.
enum Attempt {
    /// The connection broke: worth one more try.
    Reset(VerifyError),
    /// Anything else.
    Final(VerifyError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_secret() {
        let b = IntrospectionVerifier::builder("http://127.0.0.1:9/introspect?tenant=1")
            .client_secret_basic("my-api", "s3cret-value")
            .map_scope("read", "reports:read");
        assert!(!format!("{b:?}").contains("s3cret-value"));
        let v = b.build().unwrap();
        let shown = format!("{v:?}");
        assert!(shown.contains("my-api") && shown.contains("client_secret_basic"), "{shown}");
        assert!(!shown.contains("s3cret-value") && !shown.contains("tenant"), "{shown}");
        let v = IntrospectionVerifier::builder("http://127.0.0.1:9/i").bearer_token("b34rer").build().unwrap();
        assert!(!format!("{v:?}").contains("b34rer"));
        assert!(!format!("{:?}", ClientAuth::Bearer(Zeroizing::new("b34rer".into()))).contains("b34rer"));
    }

    #[test]
    fn settings_are_checked() {
        let base = || IntrospectionVerifier::builder("http://127.0.0.1:9/i");
        assert!(matches!(base().build(), Err(IntrospectionConfigError::MissingClientAuth)));
        assert!(matches!(base().bearer_token("a b").build(), Err(IntrospectionConfigError::InvalidCredentials)));
        assert!(matches!(
            base().client_secret_post("", "x").build(),
            Err(IntrospectionConfigError::InvalidCredentials)
        ));
        assert!(matches!(
            base().bearer_token("t").map_scope("read", "reports").build(),
            Err(IntrospectionConfigError::ScopeMapping { .. })
        ));
        for bad in ["ftp://x/i", "http://u:p@x/i", "http://x/i#f", "not a url"] {
            let e = IntrospectionVerifier::builder(bad).bearer_token("t").build().unwrap_err();
            assert!(matches!(e, IntrospectionConfigError::InvalidUrl(_)), "{bad}");
            assert!(!e.to_string().contains("u:p"));
        }
    }

    #[test]
    fn basic_credentials_are_form_encoded_first() {
        let (header, ..) = credentials(ClientAuth::ClientSecretBasic {
            client_id: "a:b".into(),
            client_secret: Zeroizing::new("p w%".into()),
        })
        .unwrap();
        let header = header.unwrap();
        assert!(header.is_sensitive());
        let encoded = header.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).unwrap();
        assert_eq!(decoded, b"a%3Ab:p%20w%25");
    }
}
