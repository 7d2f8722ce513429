//! Property tests: key format, scope matching, requirement parsing, extraction.

use keygate::{ApiKey, KeyFormat, Requirement, RequirementErrorKind, Scope, ScopeSet};
use proptest::prelude::*;

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
