//! Property tests: key format, scope matching, requirement parsing, extraction, and
//! credential stripping.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use keygate::{
    ApiKey, ApiKeyLayer, KeyFormat, KeySource, Principal, Requirement, RequirementErrorKind, Scope, ScopeSet,
    StaticVerifier,
};
use proptest::prelude::*;
use tower::{Layer, ServiceExt};

const BASE62: &str = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn prefix() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,15}"
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[a-z][a-z0-9_.-]{0,6}", 1 => Just("*".to_owned())]
}

fn scope() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 2..4).prop_map(|v| v.join(":"))
}

fn concrete_scope() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z][a-z0-9]{0,5}", 2..4).prop_map(|v| v.join(":"))
}

/// A word that is neither a scope nor `role(…)` nor an operator.
fn bare_word() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_.-]{0,10}".prop_filter("operators", |w| w != "and" && w != "or")
}

fn requirement() -> impl Strategy<Value = Requirement> {
    let leaf = prop_oneof![
        3 => concrete_scope().prop_map(|s| Requirement::term(&s).unwrap()),
        // Any valid name, keywords included: inside `role(…)` they are names.
        1 => prop_oneof![4 => "[a-z0-9_.-]{1,8}", 1 => prop::sample::select(vec!["and", "or", "role"]).prop_map(str::to_owned)]
            .prop_map(|r| Requirement::role(&r).unwrap()),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 2..4).prop_map(Requirement::All),
            prop::collection::vec(inner, 2..4).prop_map(Requirement::Any),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_keys_pass_their_format(p in prefix()) {
        let key = ApiKey::generate(&p).unwrap();
        let want = format!("{p}_");
        prop_assert!(key.expose_secret().starts_with(&want));
        prop_assert_eq!(key.len(), p.len() + 1 + 36);
        prop_assert!(KeyFormat::keygate().check(&key).is_ok());
        prop_assert!(KeyFormat::prefixed(&p).unwrap().check(&key).is_ok());
        // Debug and Display never show the random part.
        let body = &key.expose_secret()[p.len() + 1..];
        let shown = format!("{key:?}{key}");
        prop_assert!(!shown.contains(body));
    }

    #[test]
    fn any_one_character_change_fails_the_checksum(p in prefix(), pos in any::<prop::sample::Index>(), c in 0x21u8..0x7f) {
        let key = ApiKey::generate(&p).unwrap();
        let secret = key.expose_secret();
        let i = pos.index(secret.len());
        prop_assume!(secret.as_bytes()[i] != c);
        let mut bytes = secret.as_bytes().to_vec();
        bytes[i] = c;
        let mutated = String::from_utf8(bytes).unwrap();
        prop_assert!(KeyFormat::keygate().check_str(&mutated).is_err(), "{} passed", i);
    }

    #[test]
    fn any_single_base62_substitution_in_the_body_fails(p in prefix(), pos in 0usize..36, c in prop::sample::select(BASE62.chars().collect::<Vec<_>>())) {
        let key = ApiKey::generate(&p).unwrap();
        let secret = key.expose_secret();
        let i = p.len() + 1 + pos;
        prop_assume!(secret.as_bytes()[i] as char != c);
        let mut mutated = secret.to_owned();
        mutated.replace_range(i..i + 1, &c.to_string());
        prop_assert!(KeyFormat::keygate().check_str(&mutated).is_err());
    }

    #[test]
    fn format_check_never_panics(s in ".{0,80}") {
        let _ = KeyFormat::keygate().check_str(&s);
    }

    #[test]
    fn scopes_grant_themselves_and_wildcards_grant_per_segment(s in concrete_scope(), mask in any::<u8>()) {
        let required = Scope::parse(&s).unwrap();
        prop_assert!(ScopeSet::parse([&s]).unwrap().grants(&required));
        // Replace some segments with `*`: still granted.
        let wild: Vec<String> = s.split(':').enumerate()
            .map(|(i, seg)| if mask & (1 << i) != 0 { "*".to_owned() } else { seg.to_owned() }).collect();
        prop_assert!(ScopeSet::parse([wild.join(":")]).unwrap().grants(&required));
        // One more segment never matches.
        let longer = format!("{s}:x");
        prop_assert!(!ScopeSet::parse([longer]).unwrap().grants(&required));
    }

    #[test]
    fn scope_parse_round_trips(s in scope()) {
        let parsed = Scope::parse(&s).unwrap();
        prop_assert_eq!(parsed.as_str(), s.as_str());
        prop_assert_eq!(Scope::parse(&parsed.to_string()).unwrap(), parsed);
    }

    #[test]
    fn requirements_round_trip_through_their_text(r in requirement()) {
        let text = r.to_string();
        let back = Requirement::parse(&text).unwrap();
        prop_assert_eq!(&back, &r, "{}", text);
        // Lower-case operators read the same.
        let lower = text.replace(" AND ", " and ").replace(" OR ", " or ");
        prop_assert_eq!(Requirement::parse(&lower).unwrap(), r);
    }

    #[test]
    fn a_bare_word_is_an_error_at_its_offset(r in requirement(), w in bare_word()) {
        let bare = RequirementErrorKind::BareWord(w.clone());
        let e = Requirement::term(&w).unwrap_err();
        prop_assert_eq!((e.at, &e.kind), (0, &bare));
        let text = format!("{w} OR {r}");
        let e = Requirement::parse(&text).unwrap_err();
        prop_assert_eq!((e.at, &e.kind), (0, &bare), "{}", text);
        let before = format!("({r}) AND ");
        let text = format!("{before}{w}");
        let e = Requirement::parse(&text).unwrap_err();
        prop_assert_eq!((e.at, &e.kind), (before.len(), &bare), "{}", text);
        // Written as a role, the same word is one.
        let text = format!("{before}role({w})");
        let back = Requirement::parse(&text).unwrap();
        prop_assert_eq!(back, Requirement::All(vec![r, Requirement::role(&w).unwrap()]));
    }

    #[test]
    fn requirement_parser_never_panics(s in "[a-z:*() ANDOR&|!]{0,60}") {
        let _ = Requirement::parse(&s);
    }

    #[test]
    fn role_terms_never_panic(s in "(role\\(|role|[a-zA-Z:*()! ]|AND|OR){0,24}") {
        let _ = Requirement::parse(&s);
        let _ = Requirement::term(&s);
    }
}

/// Where a request carries its key.
#[derive(Debug, Clone, Copy)]
enum Place {
    Bearer,
    Token,
    Header,
    Query,
    Cookie,
}

/// A request carrying a key in one place, among unrelated headers, parameters and
/// cookies (none of them named like a credential).
#[derive(Debug, Clone)]
struct Carrying {
    place: Place,
    /// `Bearer` / `Token` as written (any case), and the spaces after it.
    scheme_case: u8,
    spaces: usize,
    headers: Vec<(String, String)>,
    params: Vec<(String, String)>,
    /// Cookies, split over one or two `Cookie` headers.
    cookies: Vec<(String, String)>,
    split_cookies_at: usize,
    /// Where among the parameters or cookies the key goes.
    at: usize,
}

fn carrying() -> impl Strategy<Value = Carrying> {
    let place = prop::sample::select(vec![Place::Bearer, Place::Token, Place::Header, Place::Query, Place::Cookie]);
    let header_name = "x-[a-z]{1,8}".prop_filter("credential headers", |n| n != "x-api-key");
    let name = "[a-z][a-z0-9_]{0,7}".prop_filter("credential names", |n| n != "api_key" && n != "session");
    (
        place,
        any::<u8>(),
        1usize..4,
        prop::collection::vec((header_name, "[!-~]([ -~]{0,18}[!-~])?"), 0..5),
        prop::collection::vec((name.clone(), "[A-Za-z0-9._~-]{0,10}"), 0..5),
        prop::collection::vec((name, "[A-Za-z0-9._~-]{0,10}"), 0..5),
        any::<usize>(),
        any::<usize>(),
    )
        .prop_map(|(place, scheme_case, spaces, headers, params, cookies, split, at)| Carrying {
            place,
            scheme_case,
            spaces,
            headers,
            split_cookies_at: split % (cookies.len() + 1),
            params,
            cookies,
            at,
        })
}

fn cased(word: &str, mask: u8) -> String {
    word.chars()
        .enumerate()
        .map(|(i, c)| if mask & (1 << (i % 8)) != 0 { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
        .collect()
}

impl Carrying {
    fn request(&self, key: &str) -> Request<Body> {
        let mut params: Vec<String> = self.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut cookies: Vec<String> = self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let spaces = " ".repeat(self.spaces);
        let mut req = Request::builder();
        for (name, value) in &self.headers {
            req = req.header(name, value);
        }
        match self.place {
            Place::Bearer => {
                req = req.header("authorization", format!("{}{spaces}{key}", cased("bearer", self.scheme_case)))
            }
            Place::Token => {
                req = req.header("authorization", format!("{}{spaces}{key}", cased("token", self.scheme_case)))
            }
            Place::Header => req = req.header("x-api-key", key),
            Place::Query => params.insert(self.at % (params.len() + 1), format!("api_key={key}")),
            Place::Cookie => cookies.insert(self.at % (cookies.len() + 1), format!("session={key}")),
        }
        let split = self.split_cookies_at.min(cookies.len());
        for part in [&cookies[..split], &cookies[split..]] {
            if !part.is_empty() {
                req = req.header("cookie", part.join("; "));
            }
        }
        let uri = if params.is_empty() { "/p".to_owned() } else { format!("/p?{}", params.join("&")) };
        req.uri(uri).body(Body::empty()).unwrap()
    }
}

/// The cookies of every `Cookie` header, in order.
fn cookies_of(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .get_all("cookie")
        .iter()
        .flat_map(|h| h.to_str().unwrap().split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            let (k, v) = c.split_once('=').unwrap_or((c, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn params_of(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| {
            q.split('&')
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    // What the inner service receives, whatever the key's place among unrelated data:
    // no header, parameter or cookie carries the key, and everything else is as sent.
    #[test]
    fn stripping_leaves_no_key_and_everything_else(c in carrying()) {
        let key = ApiKey::generate("kg").unwrap();
        let secret = key.expose_secret().to_owned();
        let seen: Arc<Mutex<Option<(HeaderMap, Uri)>>> = Arc::default();
        let inner = {
            let seen = Arc::clone(&seen);
            tower::service_fn(move |req: Request<Body>| {
                *seen.lock().unwrap() = Some((req.headers().clone(), req.uri().clone()));
                async { Ok::<_, std::convert::Infallible>(Response::new(Body::empty())) }
            })
        };
        let layer = ApiKeyLayer::new(StaticVerifier::new().with_key(&key, Principal::builder("key_1").build())).sources([
            KeySource::bearer(),
            KeySource::authorization("Token"),
            KeySource::header("x-api-key"),
            KeySource::query("api_key"),
            KeySource::cookie("session"),
        ]);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let res = runtime.block_on(layer.layer(inner).oneshot(c.request(&secret))).unwrap();
        prop_assert_eq!(res.status(), StatusCode::OK);
        let (headers, uri) = seen.lock().unwrap().take().expect("the inner service was called");

        for (name, value) in &headers {
            prop_assert!(!value.as_bytes().windows(secret.len()).any(|w| w == secret.as_bytes()), "{} carries the key", name);
        }
        prop_assert!(!uri.to_string().contains(&secret), "the URI carries the key: {}", uri);
        prop_assert!(headers.get("authorization").is_none() && headers.get("x-api-key").is_none());

        // Unrelated headers: every value, in order.
        for (name, _) in &c.headers {
            let want: Vec<&str> = c.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect();
            let got: Vec<&str> = headers.get_all(name).iter().map(|v| v.to_str().unwrap()).collect();
            prop_assert_eq!(got, want, "header {}", name);
        }
        prop_assert_eq!(params_of(&uri), c.params.clone());
        prop_assert_eq!(uri.path(), "/p");
        prop_assert_eq!(cookies_of(&headers), c.cookies.clone());
    }
}
