//! Credential extraction and stripping.
//!
//! Invariants, for any request:
//! - an accepted key is non-empty, within the limit, visible ASCII, and is exactly what
//!   the source it came from holds (checked against a model of each source);
//! - after stripping, no configured source finds a credential any more, the source's
//!   channel holds exactly what it held minus the credential, and every other header
//!   and the path are untouched.
#![no_main]

use std::borrow::Cow;

use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri};
use keygate::KeySource;
use keygate::fuzzing::{find_key, strip_credential};
use libfuzzer_sys::fuzz_target;

const HEADER_NAMES: [&str; 6] = ["authorization", "x-api-key", "cookie", "x-other", "accept", "x-api-key-id"];
const QUERY_NAME: &str = "api_key";
const COOKIE_NAME: &str = "session";

/// The input, as lines: two bytes (which sources are configured, one bit each, none
/// meaning all; the maximum key length), then lines of a header index (`0`..`5`, into
/// `HEADER_NAMES`) and its value, or `u` and the URI. Text, so that seeds are readable.
struct Input<'a> {
    sources: u8,
    max_len: u8,
    headers: Vec<(u8, &'a [u8])>,
    uri: &'a [u8],
}

impl<'a> Input<'a> {
    fn read(data: &'a [u8]) -> Option<Self> {
        let [sources, max_len, rest @ ..] = data else { return None };
        let mut input = Input { sources: *sources, max_len: *max_len, headers: Vec::new(), uri: b"/" };
        for line in rest.split(|&b| b == b'\n') {
            match line.split_first() {
                Some((b'u', uri)) => input.uri = uri,
                Some((&n, value)) if n.is_ascii_digit() => input.headers.push((n - b'0', value)),
                _ => {}
            }
        }
        Some(input)
    }
}

fn sources(mask: u8) -> Vec<KeySource> {
    let all = [
        KeySource::bearer(),
        KeySource::authorization("Token"),
        KeySource::header("x-api-key"),
        KeySource::query(QUERY_NAME),
        KeySource::cookie(COOKIE_NAME),
    ];
    let picked: Vec<_> = all.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, s)| s.clone()).collect();
    if picked.is_empty() { all.to_vec() } else { picked }
}

fn build(input: &Input<'_>) -> Option<Request<()>> {
    let uri = Uri::try_from(input.uri).ok()?;
    let mut req = Request::builder().uri(uri);
    for (name, value) in &input.headers {
        let name = HEADER_NAMES[*name as usize % HEADER_NAMES.len()];
        req = req.header(name, HeaderValue::from_bytes(value).ok()?);
    }
    req.body(()).ok()
}

fn decode(s: &str) -> Cow<'_, str> {
    if s.contains('+') {
        Cow::Owned(percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned())
    } else {
        percent_encoding::percent_decode_str(s).decode_utf8_lossy()
    }
}

/// Whether a query pair's name is the key parameter or an array/map form of it.
fn is_key_param(pair: &str) -> bool {
    let name = decode(pair.split_once('=').map_or(pair, |(k, _)| k));
    name == QUERY_NAME || name.strip_prefix(QUERY_NAME).is_some_and(|r| r.starts_with('['))
}

fn query_pairs(uri: &Uri) -> Vec<String> {
    uri.query().map(|q| q.split('&').map(str::to_owned).collect()).unwrap_or_default()
}

/// Every cookie pair (trimmed, non-empty) of every `Cookie` header, as bytes.
fn cookie_pairs(headers: &HeaderMap) -> Vec<Vec<u8>> {
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|h| h.as_bytes().split(|&b| b == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

fn cookie_name(pair: &[u8]) -> &[u8] {
    pair.iter().position(|&b| b == b'=').map_or(pair, |i| &pair[..i]).trim_ascii()
}

/// The headers other than `except`: each name's values in order (a `HeaderMap` keeps
/// that order, not the order between names once one is removed).
fn others(headers: &HeaderMap, except: &HeaderName) -> Vec<(String, Vec<HeaderValue>)> {
    let mut names: Vec<String> = headers.keys().filter(|n| *n != except).map(|n| n.as_str().to_owned()).collect();
    names.sort();
    names.into_iter().map(|n| (n.clone(), headers.get_all(n.as_str()).iter().cloned().collect())).collect()
}

/// What the source holds, by a model written from the documentation.
fn holds(req: &Request<()>, source: &KeySource, key: &str) -> bool {
    let scheme_value = |scheme: &str| {
        req.headers().get(AUTHORIZATION).is_some_and(|v| {
            let v = v.as_bytes();
            v.len() > scheme.len()
                && v[..scheme.len()].eq_ignore_ascii_case(scheme.as_bytes())
                && v[scheme.len()] == b' '
                && v[scheme.len()..].trim_ascii_start() == key.as_bytes()
        })
    };
    match source {
        KeySource::Bearer => scheme_value("bearer"),
        KeySource::Authorization(scheme) => scheme_value(scheme.as_str()),
        KeySource::Header(name) => req.headers().get(name).is_some_and(|v| v.as_bytes() == key.as_bytes()),
        KeySource::Query(_) => query_pairs(req.uri())
            .iter()
            .any(|p| p.split_once('=').is_some_and(|(k, v)| decode(k) == QUERY_NAME && decode(v) == key)),
        KeySource::Cookie(_) => cookie_pairs(req.headers()).iter().any(|p| {
            let v = p.iter().position(|&b| b == b'=').map_or(&b""[..], |i| &p[i + 1..]);
            let v = v.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(v);
            cookie_name(p) == COOKIE_NAME.as_bytes() && v == key.as_bytes()
        }),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::read(data) else { return };
    let Some(mut req) = build(&input) else { return };
    let sources = sources(input.sources);
    let max_len = usize::from(input.max_len).max(1);
    let Ok(Some((key, index))) = find_key(&req, &sources, max_len) else { return };
    assert!(!key.is_empty() && key.len() <= max_len, "accepted a key of {} bytes (max {max_len})", key.len());
    assert!(key.bytes().all(|b| (0x21..=0x7e).contains(&b)), "accepted a key outside visible ASCII");
    let source = &sources[index];
    assert!(holds(&req, source, &key), "the key is not what {source:?} holds");

    let (headers, uri) = (req.headers().clone(), req.uri().clone());
    strip_credential(&mut req, source);

    assert_eq!(find_key(&req, &sources, max_len).map_err(|e| e.code()), Ok(None), "a credential is left");
    assert_eq!(req.uri().path(), uri.path(), "the path changed");
    let channel = match source {
        KeySource::Bearer | KeySource::Authorization(_) => AUTHORIZATION,
        KeySource::Header(name) => name.clone(),
        KeySource::Query(_) => HeaderName::from_static("x-no-such-header"),
        KeySource::Cookie(_) => COOKIE,
    };
    assert_eq!(others(req.headers(), &channel), others(&headers, &channel), "another header changed");
    match source {
        KeySource::Bearer | KeySource::Authorization(_) | KeySource::Header(_) => {
            assert!(req.headers().get(&channel).is_none(), "the credential header is still there");
            assert_eq!(req.uri(), &uri, "the URI changed");
        }
        KeySource::Query(_) => {
            let want: Vec<String> = query_pairs(&uri).into_iter().filter(|p| !is_key_param(p)).collect();
            let got = query_pairs(req.uri());
            // No pair left at all drops the `?`: the same as a query of no pairs.
            if want.is_empty() {
                assert_eq!(req.uri().query(), None, "an empty query is left");
            } else {
                assert_eq!(got, want, "other query parameters changed");
            }
        }
        KeySource::Cookie(_) => {
            let want: Vec<Vec<u8>> =
                cookie_pairs(&headers).into_iter().filter(|p| cookie_name(p) != COOKIE_NAME.as_bytes()).collect();
            assert_eq!(cookie_pairs(req.headers()), want, "other cookies changed");
            assert!(req.headers().get_all(COOKIE).iter().count() <= 1);
            assert_eq!(req.uri(), &uri, "the URI changed");
        }
    }
});
