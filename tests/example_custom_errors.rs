//! `examples/custom_errors.rs` as a user runs it: every case answered in the service's
//! own error shape, with the headers keygate keeps.

use std::path::PathBuf;
use std::process::Command;

/// The example's binary, which `cargo test` builds next to this test. `None` when the
/// test was run alone (`--test`), without it.
fn example_binary() -> Option<PathBuf> {
    let deps = std::env::current_exe().unwrap().parent()?.to_path_buf();
    let path = deps.parent()?.join("examples").join("custom_errors");
    path.exists().then_some(path)
}

#[test]
fn the_custom_errors_example_answers_every_case_in_its_own_shape() {
    let Some(binary) = example_binary() else {
        eprintln!("SKIPPED: examples/custom_errors is not built; run `cargo test` without --test first");
        return;
    };
    let out = Command::new(binary).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    // Each case: its line, the status, and the code in the service's own body.
    let line = |what: &str| {
        stdout.lines().find(|l| l.starts_with(what)).unwrap_or_else(|| panic!("no line for {what}:\n{stdout}"))
    };
    for (what, status, code) in [
        ("no key ", 401, "missing_key"),
        ("garbage key", 401, "invalid_key"),
        ("revoked key", 401, "invalid_key"),
        ("expired key", 401, "expired_key"),
        ("two keys", 400, "conflicting_credentials"),
        ("missing scope", 403, "insufficient_scope"),
        ("missing role", 403, "insufficient_scope"),
        ("over its limit", 429, "rate_limited"),
        ("key service down", 503, "key_service_unavailable"),
    ] {
        let l = line(what);
        assert!(l.contains(&format!("→ {status} {{\"error\":{{\"code\":\"{code}\"")), "{what}: {l}");
    }
    assert!(line("missing role").contains(r#""required":{"roles":["admin"],"scopes":[]}"#));
    assert!(line("good key").contains("→ 200 reports for acme"));
    assert!(line("anonymous, public route").contains("→ 200 hello"));
    // The headers keygate keeps under a custom body.
    assert!(
        stdout.contains(
            r#"www-authenticate: Bearer realm="api", error="invalid_token", error_description="key expired""#
        )
    );
    assert!(stdout.contains("retry-after: 5"));
    assert!(stdout.contains(r#"ratelimit: "requests";r=0;t=60"#));
}
