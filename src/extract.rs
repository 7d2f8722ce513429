//! Finding the key in a request.

use std::borrow::Cow;

use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderName, HeaderValue, Request, Uri};
use percent_encoding::percent_decode_str;
use zeroize::Zeroize;

use crate::error::{AuthError, InvalidKey};
use crate::key::ApiKey;

/// Default maximum key length in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 256;

/// Where a key may be found.
///
/// Sources are tried in the configured order; the default is
/// `Authorization: Bearer <key>` then the `x-api-key` header. The query parameter and
/// cookie sources are opt-in (keys in URLs leak into logs: RFC 6750 §2.3).
///
/// A credential found twice (two `Authorization` headers, a repeated parameter, or keys
/// in two sources), equal or not, is a 400 `invalid_request`, never first-wins. An empty
/// key, one longer than the maximum, or one with bytes outside visible ASCII is a 401
/// `invalid_token` before anything is hashed or looked up.
///
/// ```
/// use keygate::KeySource;
///
/// let sources = [
///     KeySource::bearer(),
///     KeySource::authorization("Token"),
///     KeySource::header("x-api-key"),
///     KeySource::query("api_key"),
/// ];
/// # let _ = sources;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `Authorization: Bearer <key>` (scheme case-insensitive, one or more spaces).
    Bearer,
    /// `Authorization: <scheme> <key>` for another scheme (`Token`, `ApiKey`…), parsed
    /// exactly like Bearer; built with [`KeySource::authorization`].
    Authorization(AuthScheme),
    /// A named header carrying the key alone (default `x-api-key`).
    Header(HeaderName),
    /// A query parameter (opt-in). It is removed from the URI before the inner service
    /// sees the request.
    Query(String),
    /// A cookie (opt-in). It is removed from the `Cookie` header before the inner
    /// service sees the request.
    Cookie(String),
}

impl KeySource {
    /// `Authorization: Bearer`.
    pub fn bearer() -> Self {
        Self::Bearer
    }

    /// `Authorization: <scheme> <key>`, the scheme matched case-insensitively and parsed
    /// like Bearer (one or more spaces, then the key alone). `"Bearer"` itself gives
    /// [`KeySource::Bearer`]. Only the configured scheme is read: a `Token` source does
    /// not take `Bearer` credentials, and both in one request are a conflict.
    ///
    /// Panics if `scheme` is not an HTTP token (RFC 9110 §5.6.2: non-empty, letters,
    /// digits and ``!#$%&'*+-.^_`|~``), a configuration error caught at startup.
    ///
    /// ```
    /// use keygate::{ApiKeyLayer, KeySource, StaticVerifier};
    ///
    /// // Accepts `Authorization: Token kg_…` (or `token`, `TOKEN`) and `x-api-key`.
    /// let layer = ApiKeyLayer::new(StaticVerifier::new())
    ///     .sources([KeySource::authorization("Token"), KeySource::header("x-api-key")]);
    /// # let _ = layer;
    /// ```
    pub fn authorization(scheme: &str) -> Self {
        assert!(!scheme.is_empty() && scheme.bytes().all(is_tchar), "KeySource::authorization: invalid scheme name");
        if scheme.eq_ignore_ascii_case("bearer") {
            return Self::Bearer;
        }
        Self::Authorization(AuthScheme(scheme.into()))
    }

    /// A named header. Panics if `name` is not a valid header name (a configuration
    /// error caught at startup).
    pub fn header(name: &str) -> Self {
        Self::Header(HeaderName::from_bytes(name.as_bytes()).expect("KeySource::header: invalid header name"))
    }

    /// A query parameter.
    pub fn query(name: impl Into<String>) -> Self {
        Self::Query(name.into())
    }

    /// A cookie.
    pub fn cookie(name: impl Into<String>) -> Self {
        Self::Cookie(name.into())
    }

    /// The default sources: Bearer, then `x-api-key`.
    pub fn defaults() -> Vec<Self> {
        vec![Self::Bearer, Self::Header(HeaderName::from_static("x-api-key"))]
    }
}

/// An `Authorization` scheme name other than Bearer, validated as an HTTP token; see
/// [`KeySource::authorization`]. Kept as written (it names the scheme in
/// `WWW-Authenticate`) and compared case-insensitively, as schemes are.
#[derive(Debug, Clone, Eq)]
pub struct AuthScheme(Box<str>);

impl AuthScheme {
    /// The scheme name, as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl PartialEq for AuthScheme {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

impl KeySource {
    /// The scheme a `WWW-Authenticate` challenge names for this source, if it is read
    /// from `Authorization`.
    pub(crate) fn challenge_scheme(&self) -> Option<&str> {
        match self {
            Self::Bearer => Some("Bearer"),
            Self::Authorization(scheme) => Some(scheme.as_str()),
            _ => None,
        }
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A key found in a request, and where.
#[derive(Debug)]
pub(crate) struct Found {
    /// The key.
    pub(crate) key: ApiKey,
    /// Index into the configured sources.
    pub(crate) source: usize,
}

/// Looks for the key in every source. `Ok(None)`: no credential at all.
///
/// Every source is examined even after a key is found, so that a second credential
/// anywhere is a conflict rather than silently ignored.
pub(crate) fn find_key<B>(req: &Request<B>, sources: &[KeySource], max_len: usize) -> Result<Option<Found>, AuthError> {
    let mut found: Option<(Cow<'_, [u8]>, usize)> = None;
    for (i, source) in sources.iter().enumerate() {
        let candidate = match source {
            KeySource::Bearer => from_scheme(req, &BEARER, max_len)?,
            KeySource::Authorization(scheme) => from_scheme(req, &Scheme::other(scheme), max_len)?,
            KeySource::Header(name) => from_header(req, name, max_len)?,
            KeySource::Query(name) => from_query(req.uri(), name, max_len)?,
            KeySource::Cookie(name) => from_cookie(req, name, max_len)?,
        };
        if let Some(raw) = candidate {
            if found.is_some() {
                return Err(AuthError::ConflictingCredentials("a key was presented in more than one place"));
            }
            found = Some((raw, i));
        }
    }
    match found {
        None => Ok(None),
        Some((raw, source)) => {
            check_bytes(&raw, max_len)?;
            let key = ApiKey::new(String::from_utf8_lossy(&raw).into_owned());
            // A decoded copy (query parameters) is wiped like the key itself.
            if let Cow::Owned(mut copy) = raw {
                copy.zeroize();
            }
            Ok(Some(Found { key, source }))
        }
    }
}

fn malformed(what: &'static str) -> AuthError {
    AuthError::InvalidKey(InvalidKey::Malformed(what))
}

/// Length and character checks on the key that was found, before any hashing.
fn check_bytes(raw: &[u8], max_len: usize) -> Result<(), AuthError> {
    check_len(raw, max_len)?;
    // Visible ASCII only: this turns away NUL, CR/LF, tabs, obs-text and every
    // non-ASCII look-alike or zero-width character; nothing is normalized. (Written
    // as one subtraction, with no early exit, so that it vectorizes.)
    if raw.iter().fold(0u8, |bad, &b| bad | u8::from(b.wrapping_sub(0x21) >= 0x5e)) != 0 {
        return Err(malformed("key has characters outside visible ASCII"));
    }
    Ok(())
}

/// The length limits alone: a source rejects a huge value before looking further.
fn check_len(raw: &[u8], max_len: usize) -> Result<(), AuthError> {
    if raw.is_empty() {
        return Err(malformed("empty key"));
    }
    if raw.len() > max_len {
        return Err(malformed("key longer than the maximum"));
    }
    Ok(())
}

fn single<'a, B>(req: &'a Request<B>, name: &HeaderName) -> Result<Option<&'a HeaderValue>, AuthError> {
    let mut values = req.headers().get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(AuthError::ConflictingCredentials("the credential header was sent more than once"));
    }
    Ok(first)
}

/// A scheme to read from `Authorization`, with its rejection texts (static, so that
/// they never carry request bytes).
struct Scheme<'a> {
    /// Any case.
    name: &'a [u8],
    no_key: &'static str,
    no_space: &'static str,
}

const BEARER: Scheme<'static> = Scheme {
    name: b"bearer",
    no_key: "`Bearer` without a key",
    no_space: "the Bearer scheme must be followed by a space",
};

impl<'a> Scheme<'a> {
    fn other(scheme: &'a AuthScheme) -> Self {
        Scheme {
            name: scheme.0.as_bytes(),
            no_key: "the Authorization scheme without a key",
            no_space: "the Authorization scheme must be followed by a space",
        }
    }
}

fn from_scheme<'r, B>(
    req: &'r Request<B>,
    scheme: &Scheme<'_>,
    max_len: usize,
) -> Result<Option<Cow<'r, [u8]>>, AuthError> {
    let Some(value) = single(req, &AUTHORIZATION)? else { return Ok(None) };
    let bytes = value.as_bytes();
    let n = scheme.name.len();
    // Scheme + separator + key (64 bytes of slack with "Bearer"): anything longer cannot
    // hold a valid key, and is rejected before it is looked at further.
    if bytes.len() > max_len + n + 58 {
        return if is_scheme(bytes, scheme.name) { Err(malformed("key longer than the maximum")) } else { Ok(None) };
    }
    if !is_scheme(bytes, scheme.name) {
        // Another scheme (Basic, Digest…) is not ours to judge.
        return Ok(None);
    }
    let rest = &bytes[n..];
    if rest.is_empty() {
        return Err(malformed(scheme.no_key));
    }
    if rest[0] != b' ' {
        return Err(malformed(scheme.no_space));
    }
    let token = &rest[rest.iter().position(|&b| b != b' ').unwrap_or(rest.len())..];
    if token.is_empty() {
        return Err(malformed(scheme.no_key));
    }
    check_len(token, max_len)?;
    Ok(Some(Cow::Borrowed(token)))
}

/// `scheme` (lower case) case-insensitively, followed by the end or a non-token byte.
fn is_scheme(bytes: &[u8], scheme: &[u8]) -> bool {
    let n = scheme.len();
    bytes.len() >= n
        && bytes[..n].eq_ignore_ascii_case(scheme)
        && bytes.get(n).is_none_or(|b| !b.is_ascii_alphanumeric())
}

fn from_header<'a, B>(
    req: &'a Request<B>,
    name: &HeaderName,
    max_len: usize,
) -> Result<Option<Cow<'a, [u8]>>, AuthError> {
    let Some(value) = single(req, name)? else { return Ok(None) };
    let bytes = value.as_bytes();
    check_len(bytes, max_len)?;
    Ok(Some(Cow::Borrowed(bytes)))
}

/// Whether a decoded query name is `name` itself or an array/map form of it
/// (`name[]`, `name[0]`), which must never be read as a key but is still a credential
/// attempt.
fn query_name_matches(decoded: &str, name: &str) -> bool {
    decoded == name || decoded.strip_prefix(name).is_some_and(|rest| rest.starts_with('['))
}

fn decode(s: &str) -> Cow<'_, str> {
    // `+` is a space in form encoding; a space is never valid in a key, so decoding it
    // as one makes such keys fail the character check rather than change meaning.
    if s.contains('+') {
        Cow::Owned(percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned())
    } else {
        percent_decode_str(s).decode_utf8_lossy()
    }
}

fn from_query<'a>(uri: &'a Uri, name: &str, max_len: usize) -> Result<Option<Cow<'a, [u8]>>, AuthError> {
    let Some(query) = uri.query() else { return Ok(None) };
    let mut found = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !query_name_matches(&decode(k), name) {
            continue;
        }
        if found.is_some() {
            return Err(AuthError::ConflictingCredentials("the key parameter was sent more than once"));
        }
        if decode(k) != name {
            return Err(AuthError::ConflictingCredentials("the key parameter must be a single plain value"));
        }
        if v.len() > max_len * 3 {
            return Err(malformed("key longer than the maximum"));
        }
        found = Some(match decode(v) {
            Cow::Borrowed(v) => Cow::Borrowed(v.as_bytes()),
            Cow::Owned(v) => Cow::Owned(v.into_bytes()),
        });
    }
    Ok(found)
}

fn from_cookie<'a, B>(req: &'a Request<B>, name: &str, max_len: usize) -> Result<Option<Cow<'a, [u8]>>, AuthError> {
    let mut found = None;
    for header in req.headers().get_all(COOKIE) {
        // Read as bytes: a header with a non-ASCII byte in some other cookie still holds
        // ours, and must not be skipped (that would turn a conflict into first-wins).
        for pair in header.as_bytes().split(|&b| b == b';') {
            let (k, v) = match pair.iter().position(|&b| b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            // Cookie parsers trim the name (the `cookie` crate does): so do we, so that
            // ` k =…` is our cookie here exactly when it is for the application.
            if k.trim_ascii() != name.as_bytes() {
                continue;
            }
            if found.is_some() {
                return Err(AuthError::ConflictingCredentials("the key cookie was sent more than once"));
            }
            let v = v.trim_ascii_end();
            // RFC 6265 allows the value in double quotes.
            let v = v.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(v);
            check_len(v, max_len)?;
            found = Some(Cow::Borrowed(v));
        }
    }
    Ok(found)
}

/// Removes the credential that `source` named from the request, so that the inner
/// service, its handlers and its logging layers never see the key.
pub(crate) fn strip_credential<B>(req: &mut Request<B>, source: &KeySource) {
    match source {
        KeySource::Bearer | KeySource::Authorization(_) => {
            req.headers_mut().remove(AUTHORIZATION);
        }
        KeySource::Header(name) => {
            req.headers_mut().remove(name);
        }
        KeySource::Query(name) => {
            if let Some(uri) = strip_query(req.uri(), name) {
                *req.uri_mut() = uri;
            }
        }
        KeySource::Cookie(name) => {
            // Bytes, as `from_cookie` reads them: a non-ASCII byte in another cookie
            // must neither hide ours nor cost the application its other cookies.
            let mut kept = Vec::new();
            for header in req.headers().get_all(COOKIE) {
                for pair in header.as_bytes().split(|&b| b == b';').map(<[u8]>::trim_ascii) {
                    let k = pair.iter().position(|&b| b == b'=').map_or(pair, |i| &pair[..i]);
                    if pair.is_empty() || k.trim_ascii() == name.as_bytes() {
                        continue;
                    }
                    if !kept.is_empty() {
                        kept.extend_from_slice(b"; ");
                    }
                    kept.extend_from_slice(pair);
                }
            }
            req.headers_mut().remove(COOKIE);
            if !kept.is_empty() {
                // Pieces of valid header values joined by "; " are a valid header value.
                if let Ok(v) = HeaderValue::from_bytes(&kept) {
                    req.headers_mut().insert(COOKIE, v);
                }
            }
        }
    }
}

fn strip_query(uri: &Uri, name: &str) -> Option<Uri> {
    let query = uri.query()?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !query_name_matches(&decode(pair.split_once('=').map_or(*pair, |(k, _)| k)), name))
        .collect();
    let path = uri.path();
    let pq = if kept.is_empty() { path.to_owned() } else { format!("{path}?{}", kept.join("&")) };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &[u8])], uri: &str) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, HeaderValue::from_bytes(v).unwrap());
        }
        b.body(()).unwrap()
    }

    fn all() -> Vec<KeySource> {
        vec![KeySource::bearer(), KeySource::header("x-api-key"), KeySource::query("key"), KeySource::cookie("k")]
    }

    fn find(r: &Request<()>) -> Result<Option<String>, AuthError> {
        find_key(r, &all(), 256).map(|f| f.map(|f| f.key.expose_secret().to_owned()))
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_key_exact() {
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let v = format!("{scheme} AbC_xyz");
            assert_eq!(find(&req(&[("authorization", v.as_bytes())], "/")).unwrap().as_deref(), Some("AbC_xyz"));
        }
        assert_eq!(find(&req(&[("authorization", b"Bearer    k1")], "/")).unwrap().as_deref(), Some("k1"));
    }

    #[test]
    fn bad_bearer_shapes_are_invalid_token() {
        for v in [&b"Bearer"[..], b"Bearer ", b"Bearer\tk1", b"Bearer \tk1", b"Bearer k1 k2"] {
            let err = find(&req(&[("authorization", v)], "/")).unwrap_err();
            assert!(matches!(err, AuthError::InvalidKey(_)), "{:?} gave {err:?}", String::from_utf8_lossy(v));
        }
        // Other schemes are not ours.
        assert_eq!(find(&req(&[("authorization", b"Basic dXNlcjpwYXNz")], "/")).unwrap(), None);
        assert_eq!(find(&req(&[("authorization", b"Bearerx k")], "/")).unwrap(), None);
    }

    #[test]
    fn other_schemes_parse_like_bearer_and_only_when_configured() {
        let token = [KeySource::authorization("Token"), KeySource::header("x-api-key")];
        let find_token =
            |r: &Request<()>| find_key(r, &token, 256).map(|f| f.map(|f| f.key.expose_secret().to_owned()));
        for v in [&b"Token k1"[..], b"token k1", b"TOKEN   k1"] {
            assert_eq!(find_token(&req(&[("authorization", v)], "/")).unwrap().as_deref(), Some("k1"));
        }
        for v in [&b"Token"[..], b"Token ", b"Token\tk1", b"Token k1 k2"] {
            assert!(matches!(find_token(&req(&[("authorization", v)], "/")), Err(AuthError::InvalidKey(_))));
        }
        // Bearer, and a longer scheme starting with ours, are not a `Token` source's.
        assert_eq!(find_token(&req(&[("authorization", b"Bearer k1")], "/")).unwrap(), None);
        assert_eq!(find_token(&req(&[("authorization", b"Tokens k1")], "/")).unwrap(), None);
        // Not configured (the defaults): not a credential.
        assert_eq!(find(&req(&[("authorization", b"Token k1")], "/")).unwrap(), None);
        let both = req(&[("authorization", b"Token k1"), ("x-api-key", b"k1")], "/");
        assert!(matches!(find_token(&both), Err(AuthError::ConflictingCredentials(_))));
        assert_eq!(KeySource::authorization("bEaReR"), KeySource::Bearer);
        assert_eq!(KeySource::authorization("ApiKey"), KeySource::authorization("APIKEY"));
    }

    #[test]
    fn bad_scheme_names_panic_at_construction() {
        for bad in ["", "To ken", "Token:", "Tök"] {
            assert!(std::panic::catch_unwind(|| KeySource::authorization(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn conflicts_are_400() {
        let two = req(&[("authorization", b"Bearer a"), ("authorization", b"Bearer a")], "/");
        assert!(matches!(find(&two), Err(AuthError::ConflictingCredentials(_))));
        let mixed = req(&[("authorization", b"Bearer a")], "/?key=a");
        assert!(matches!(find(&mixed), Err(AuthError::ConflictingCredentials(_))));
        assert!(matches!(find(&req(&[], "/?key=a&key=a")), Err(AuthError::ConflictingCredentials(_))));
        assert!(matches!(find(&req(&[], "/?key%5B%5D=a")), Err(AuthError::ConflictingCredentials(_))));
        assert!(matches!(find(&req(&[], "/?key[]=a")), Err(AuthError::ConflictingCredentials(_))));
        assert!(matches!(find(&req(&[("cookie", b"k=a; k=b")], "/")), Err(AuthError::ConflictingCredentials(_))));
    }

    #[test]
    fn bad_bytes_and_lengths_are_invalid_token() {
        assert!(matches!(find(&req(&[], "/?key=a%00b")), Err(AuthError::InvalidKey(_))));
        assert!(matches!(find(&req(&[], "/?key=a%E2%80%8Bb")), Err(AuthError::InvalidKey(_))));
        assert!(matches!(find(&req(&[], "/?key=a+b")), Err(AuthError::InvalidKey(_))));
        assert!(matches!(find(&req(&[("x-api-key", b"a\xffb")], "/")), Err(AuthError::InvalidKey(_))));
        let long = vec![b'a'; 257];
        assert!(matches!(find(&req(&[("x-api-key", &long)], "/")), Err(AuthError::InvalidKey(_))));
        assert!(matches!(find(&req(&[("x-api-key", b"")], "/")), Err(AuthError::InvalidKey(_))));
    }

    #[test]
    fn query_and_cookie_are_found_and_stripped() {
        let mut r = req(&[("cookie", b"a=1; k=sekrit; b=2")], "/p?x=1");
        let f = find_key(&r, &all(), 256).unwrap().unwrap();
        assert_eq!(f.key.expose_secret(), "sekrit");
        strip_credential(&mut r, &all()[f.source]);
        assert_eq!(r.headers()[COOKIE], "a=1; b=2");

        // A non-ASCII byte in another cookie: ours still goes, the others stay as sent.
        let mut r = req(&[("cookie", b"a=\xe9t\xe9; k=sekrit"), ("cookie", b"b=2")], "/p");
        let f = find_key(&r, &all(), 256).unwrap().unwrap();
        strip_credential(&mut r, &all()[f.source]);
        assert_eq!(r.headers()[COOKIE].as_bytes(), b"a=\xe9t\xe9; b=2");

        let mut r = req(&[], "/p?x=1&key=sekrit&y=2");
        let f = find_key(&r, &all(), 256).unwrap().unwrap();
        strip_credential(&mut r, &all()[f.source]);
        assert_eq!(r.uri().to_string(), "/p?x=1&y=2");
        let mut r = req(&[], "/p?key=sekrit");
        strip_credential(&mut r, &KeySource::query("key"));
        assert_eq!(r.uri().to_string(), "/p");
    }

    // Extraction is reached by any client: whatever bytes it sends, no panic, and
    // what is accepted is a visible-ASCII key within the limit.
    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn extraction_never_panics(
                auth in prop::collection::vec(any::<u8>(), 0..300),
                apikey in prop::collection::vec(any::<u8>(), 0..300),
                cookie in prop::collection::vec(any::<u8>(), 0..100),
                query in "[a-z0-9=&%\\[\\]+_.-]{0,80}",
            ) {
                let mut b = Request::builder().uri(format!("/p?{query}"));
                for (name, value) in [("authorization", &auth), ("x-api-key", &apikey), ("cookie", &cookie)] {
                    if let Ok(v) = HeaderValue::from_bytes(value) {
                        b = b.header(name, v);
                    }
                }
                let Ok(req) = b.body(()) else { return Ok(()) };
                let sources = [KeySource::bearer(), KeySource::authorization("Token"), KeySource::header("x-api-key"), KeySource::query("key"), KeySource::cookie("k")];
                if let Ok(Some(found)) = find_key(&req, &sources, 256) {
                    // Whatever is accepted is visible ASCII within the limit.
                    let k = found.key.expose_secret();
                    prop_assert!(!k.is_empty() && k.len() <= 256 && k.bytes().all(|b| (0x21..=0x7e).contains(&b)));
                }
            }
        }
    }
}
