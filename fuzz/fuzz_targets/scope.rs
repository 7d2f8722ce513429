//! Scope and requirement expressions.
//!
//! Invariants:
//! - a requirement that parses is written by `Display` as text that parses back to an
//!   equal requirement, and that text is a fixed point; an error's offset lies inside
//!   the expression, on a character boundary;
//! - `Scope::parse` accepts exactly the documented grammar, and `grants` matches one
//!   segment per `*` and nothing more, as a model written here does;
//! - every scope and role a requirement lists is one it holds.
#![no_main]

use std::sync::Arc;

use keygate::{Requirement, Scope, ScopeSet};
use libfuzzer_sys::fuzz_target;

fn name_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
}

fn model_scope(s: &str) -> bool {
    let segs: Vec<&str> = s.split(':').collect();
    !s.is_empty()
        && s.len() <= 128
        && (2..=8).contains(&segs.len())
        && segs.iter().all(|g| *g == "*" || (!g.is_empty() && g.bytes().all(name_char)))
}

fn model_grants(granted: &str, required: &str) -> bool {
    let (g, r): (Vec<&str>, Vec<&str>) = (granted.split(':').collect(), required.split(':').collect());
    g.len() == r.len() && g.iter().zip(&r).all(|(g, r)| *g == "*" || g == r)
}

fn model_satisfied(req: &Requirement, scopes: &[Scope], roles: &[Arc<str>]) -> bool {
    match req {
        Requirement::Scope(s) => scopes.iter().any(|g| model_grants(g.as_str(), s.as_str())),
        Requirement::Role(r) => roles.contains(r),
        // `is_satisfied_by` knows no environment: an `env(…)` term never holds there.
        Requirement::Environment(_) => false,
        Requirement::All(v) => v.iter().all(|r| model_satisfied(r, scopes, roles)),
        Requirement::Any(v) => v.iter().any(|r| model_satisfied(r, scopes, roles)),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // `expression` then, after a NUL, the scopes and roles held (space-separated).
    let (expr, held) = text.split_once('\0').unwrap_or((text, ""));

    match Requirement::parse(expr) {
        Ok(req) => {
            let shown = req.to_string();
            let again = Requirement::parse(&shown).unwrap_or_else(|e| panic!("{shown:?} does not parse back: {e}"));
            assert_eq!(again, req, "{expr:?} shown as {shown:?}");
            assert_eq!(again.to_string(), shown);
            for s in req.scopes() {
                assert!(model_scope(s.as_str()), "listed scope {s:?}");
            }
            for r in req.roles() {
                assert!(!r.is_empty() && r.len() <= 64 && r.bytes().all(name_char), "listed role {r:?}");
            }

            let mut scopes = Vec::new();
            let mut roles: Vec<Arc<str>> = Vec::new();
            for word in held.split(' ') {
                match Scope::parse(word) {
                    Ok(s) => scopes.push(s),
                    Err(_) => roles.push(word.into()),
                }
            }
            let set: ScopeSet = scopes.iter().cloned().collect();
            assert_eq!(req.is_satisfied_by(&set, &roles), model_satisfied(&req, &scopes, &roles));
        }
        Err(e) => {
            assert!(e.at <= expr.len() && expr.is_char_boundary(e.at), "offset {} in {expr:?}", e.at);
            let _ = e.to_string();
        }
    }

    // Single scopes, and what one grants another.
    for word in expr.split(' ') {
        assert_eq!(Scope::parse(word).is_ok(), model_scope(word), "{word:?}");
        if let Ok(s) = Scope::parse(word) {
            assert_eq!(s.as_str(), word);
            assert_eq!(s.to_string().parse::<Scope>().as_ref(), Ok(&s));
            assert_eq!(Requirement::term(word), Ok(Requirement::Scope(s.clone())));
        }
    }
    let words: Vec<&str> = held.split(' ').filter(|w| model_scope(w)).take(16).collect();
    for g in &words {
        for r in &words {
            let (gs, rs) = (Scope::parse(g).unwrap(), Scope::parse(r).unwrap());
            assert_eq!(gs.grants(&rs), model_grants(g, r), "{g:?} grants {r:?}");
        }
    }
});
