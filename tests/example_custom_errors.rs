//! `examples/custom_errors.rs` as a user runs it: every case answered in the service's
//! own error shape, with the headers keygate keeps.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

/// The example's binary, which `cargo test` builds next to this test. `None` when the
/// test was run alone (`--test`), without it.
fn example_binary() -> Option<PathBuf> {
    let deps = std::env::current_exe().unwrap().parent()?.to_path_buf();
    let path = deps.parent()?.join("examples").join("custom_errors");
    path.exists().then_some(path)
}

/// One printed answer: its status, its body and the kept headers printed under it.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
    headers: BTreeMap<String, String>,
}

impl Answer {
    /// The body as the service's error shape, `{"error": {"code", "message", ...}}`,
    /// with nothing else at the top level.
    fn error(&self) -> serde_json::Map<String, Value> {
        let body: Value = serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body));
        let top = body.as_object().unwrap();
        assert_eq!(top.keys().collect::<Vec<_>>(), ["error"], "{}", self.body);
        let error = top["error"].as_object().unwrap().clone();
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", self.body);
        error
    }
}

/// `what  GET /path → status body`, then `   name: value` lines for the kept headers.
fn parse(stdout: &str) -> BTreeMap<String, Answer> {
    let mut answers = BTreeMap::new();
    let mut last = None;
    for line in stdout.lines() {
        if line.starts_with(' ') {
            let (name, value) = line.trim().split_once(": ").unwrap_or_else(|| panic!("header line: {line}"));
            let answer: &mut Answer = answers.get_mut(last.as_ref().unwrap()).unwrap();
            answer.headers.insert(name.to_owned(), value.to_owned());
            continue;
        }
        let (what, rest) = line.split_once(" GET ").unwrap_or_else(|| panic!("answer line: {line}"));
        let (_, answer) = rest.split_once("→ ").unwrap();
        let (status, body) = answer.split_once(' ').unwrap();
        let what = what.trim().to_owned();
        let answer = Answer { status: status.parse().unwrap(), body: body.to_owned(), headers: BTreeMap::new() };
        assert!(answers.insert(what.clone(), answer).is_none(), "{what} printed twice");
        last = Some(what);
    }
    answers
}

#[test]
fn the_custom_errors_example_answers_every_case_in_its_own_shape() {
    let Some(binary) = example_binary() else {
        eprintln!(
            "SKIPPED: examples/custom_errors is not built; run `cargo test` without --test, or `cargo build --example custom_errors` first"
        );
        return;
    };
    let out = Command::new(binary).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let answers = parse(&stdout);
    let answer = |what: &str| answers.get(what).unwrap_or_else(|| panic!("no answer for {what}:\n{stdout}"));

    // Every code `AuthError::code()` has, each in the service's shape with its status.
    let cases = [
        ("no key", 401, "missing_key"),
        ("garbage key", 401, "invalid_key"),
        ("revoked key", 401, "invalid_key"),
        ("expired key", 401, "expired_key"),
        ("two keys", 400, "conflicting_credentials"),
        ("missing scope", 403, "insufficient_scope"),
        ("missing role", 403, "insufficient_scope"),
        ("test key, live route", 403, "wrong_environment"),
        ("outside its networks", 403, "ip_not_allowed"),
        ("over its limit", 429, "rate_limited"),
        ("credits spent", 429, "usage_exceeded"),
        ("key service down", 503, "key_service_unavailable"),
        ("no layer in front", 500, "misconfigured"),
    ];
    for (what, status, code) in cases {
        let a = answer(what);
        assert_eq!(a.status, status, "{what}: {a:?}");
        assert_eq!(a.error()["code"], code, "{what}: {a:?}");
    }
    let codes: std::collections::BTreeSet<_> = cases.iter().map(|c| c.2).collect();
    assert_eq!(codes.len(), 11, "every code of AuthError::code() is shown");

    // The fields the service adds per case.
    assert_eq!(answer("missing scope").error()["required"], json!({"scopes": ["billing:read"], "roles": []}));
    assert_eq!(answer("missing role").error()["required"], json!({"scopes": [], "roles": ["admin"]}));
    assert_eq!(answer("test key, live route").error()["required"], json!({"environments": ["live"]}));
    for what in ["over its limit", "credits spent", "key service down"] {
        let a = answer(what);
        let header: u64 = a.headers["retry-after"].parse().unwrap();
        assert_eq!(a.error()["retry_after_s"], header, "{what}: the body's wait is the header's");
    }
    for what in ["no key", "garbage key", "two keys", "outside its networks", "no layer in front"] {
        assert_eq!(answer(what).error().len(), 2, "{what}: only code and message");
    }

    // The headers keygate keeps under a custom body.
    assert_eq!(
        answer("expired key").headers["www-authenticate"],
        r#"Bearer realm="api", error="invalid_token", error_description="key expired""#
    );
    for what in ["test key, live route", "outside its networks"] {
        assert_eq!(answer(what).headers["www-authenticate"], r#"Bearer realm="api", error="insufficient_scope""#);
    }
    assert_eq!(answer("key service down").headers["retry-after"], "5");
    assert_eq!(answer("over its limit").headers["ratelimit"], r#""requests";r=0;t=60"#);
    // Until the next midnight UTC.
    let wait: u64 = answer("credits spent").headers["retry-after"].parse().unwrap();
    assert!((1..=86_400).contains(&wait), "{wait}");
    assert!(answer("no layer in front").headers.is_empty(), "no challenge and no wait on a 500");

    // What passes is untouched.
    assert_eq!(
        (answer("within its limit").status, answer("within its limit").body.as_str()),
        (200, "reports for acme")
    );
    assert_eq!((answer("good key").status, answer("good key").body.as_str()), (200, "reports for acme"));
    assert_eq!(
        (answer("anonymous, public route").status, answer("anonymous, public route").body.as_str()),
        (200, "hello")
    );
}
