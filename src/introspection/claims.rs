//! An introspection answer (RFC 7662 section 2.2) read into a [`Verdict`].

use std::collections::HashMap;

use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::principal::Principal;
use crate::scope::{Scope, ScopeSet};
use crate::verify::{Reason, SharedError, Verdict, VerifyError};

/// What a valid answer is checked against, and how its scopes are read.
#[derive(Debug, Clone, Default)]
pub(crate) struct Rules {
    /// `aud` must name this one when set.
    pub(crate) audience: Option<String>,
    /// `iss` must be exactly this one when set.
    pub(crate) issuer: Option<String>,
    /// Foreign scope → the keygate scopes it stands for.
    pub(crate) scope_map: HashMap<String, Vec<Scope>>,
    /// Whether a foreign scope that is not mapped but is a valid keygate scope is kept.
    pub(crate) keep_unmapped: bool,
}

fn bad(what: impl Into<SharedError>) -> VerifyError {
    VerifyError::BadAnswer(what.into())
}

/// Reads a 200 answer. Anything that is not the RFC's shape is a `BadAnswer`: an
/// authorization server we do not understand never turns into a denial or a grant.
pub(crate) fn parse_answer(body: &[u8], rules: &Rules, now: OffsetDateTime) -> Result<Verdict, VerifyError> {
    let mut members: Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| VerifyError::BadAnswer(SharedError::new(e)))?;
    match members.remove("active") {
        Some(Value::Bool(true)) => {}
        // RFC 7662 2.2: inactive says nothing more (revoked, expired, unknown, or not
        // ours to see): one reason for all of them.
        Some(Value::Bool(false)) => return Ok(Verdict::invalid(Reason::NotFound)),
        Some(_) => return Err(bad("`active` is not a boolean")),
        None => return Err(bad("no `active` member")),
    }
    let client_id = string(&members, "client_id")?;
    let sub = string(&members, "sub")?;
    let username = string(&members, "username")?;
    let iss = string(&members, "iss")?;
    let (key_id, owner) = match (client_id, sub) {
        (Some(c), Some(s)) => (c, s),
        (Some(c), None) => (c.clone(), c),
        (None, Some(s)) => (s.clone(), s),
        (None, None) => return Err(bad("an active token with neither `client_id` nor `sub`")),
    };
    if let Some(audience) = &rules.audience {
        if !audiences(members.get("aud"))?.contains(&audience.as_str()) {
            tracing::debug!(key_id = %key_id, "introspection: token not issued for this audience");
            return Ok(Verdict::invalid_key(Reason::NotFound, key_id));
        }
    }
    if let Some(issuer) = &rules.issuer {
        if iss.as_deref() != Some(issuer.as_str()) {
            tracing::debug!(key_id = %key_id, "introspection: token from another issuer");
            return Ok(Verdict::invalid_key(Reason::NotFound, key_id));
        }
    }
    let expires_at = match members.get("exp") {
        None | Some(Value::Null) => None,
        Some(exp) => Some(numeric_date(exp)?),
    };
    if expires_at.is_some_and(|at| at <= now) {
        return Ok(Verdict::invalid_key(Reason::Expired, key_id));
    }
    let scopes = match members.remove("scope") {
        None | Some(Value::Null) => ScopeSet::new(),
        Some(Value::String(s)) => map_scopes(&s, rules),
        Some(_) => return Err(bad("`scope` is not a string")),
    };
    let principal = Principal::builder(key_id)
        .owner(owner)
        .name(username.unwrap_or_default())
        .scopes(scopes)
        .expires_at(expires_at)
        .meta(Value::Object(members))
        .build();
    Ok(Verdict::Valid(principal))
}

/// A string member, `None` when absent or null; any other type is a bad answer.
fn string(members: &Map<String, Value>, name: &'static str) -> Result<Option<String>, VerifyError> {
    match members.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(format!("`{name}` is not a string"))),
    }
}

/// `aud`: one string or an array of strings (RFC 7519 4.1.3).
fn audiences(aud: Option<&Value>) -> Result<Vec<&str>, VerifyError> {
    match aud {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.as_str()]),
        Some(Value::Array(list)) => {
            list.iter().map(|v| v.as_str().ok_or_else(|| bad("`aud` holds a non-string"))).collect()
        }
        Some(_) => Err(bad("`aud` is neither a string nor an array")),
    }
}

/// A NumericDate: seconds since the epoch, possibly fractional (truncated).
fn numeric_date(value: &Value) -> Result<OffsetDateTime, VerifyError> {
    let seconds = match value {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)),
        _ => None,
    };
    let seconds = seconds.ok_or_else(|| bad("`exp` is not a number"))?;
    OffsetDateTime::from_unix_timestamp(seconds).map_err(|e| bad(SharedError::new(e)))
}

/// The keygate scopes of a space-separated foreign `scope`: mapped ones become their
/// mapping, others are kept when they are valid keygate scopes (and `keep_unmapped`),
/// the rest are dropped.
fn map_scopes(scope: &str, rules: &Rules) -> ScopeSet {
    let mut out = ScopeSet::new();
    let mut dropped = 0usize;
    for foreign in scope.split_ascii_whitespace() {
        if let Some(mapped) = rules.scope_map.get(foreign) {
            for s in mapped {
                out.insert(s.clone());
            }
        } else if let Some(s) = rules.keep_unmapped.then(|| Scope::parse(foreign).ok()).flatten() {
            out.insert(s);
        } else {
            dropped += 1;
        }
    }
    if dropped > 0 {
        tracing::debug!(dropped, "introspection: foreign scopes with no keygate meaning dropped");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        let mut scope_map = HashMap::new();
        scope_map.insert("read".to_owned(), vec![Scope::parse("reports:read").unwrap()]);
        Rules { keep_unmapped: true, scope_map, ..Rules::default() }
    }

    fn parse(body: &str, rules: &Rules) -> Result<Verdict, VerifyError> {
        parse_answer(body.as_bytes(), rules, OffsetDateTime::now_utc())
    }

    fn valid(body: &str, rules: &Rules) -> Principal {
        match parse(body, rules).unwrap() {
            Verdict::Valid(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_active_answer_maps_every_member() {
        let p = valid(
            r#"{"active":true,"client_id":"app","sub":"u1","username":"ann","scope":"read billing:write odd!one","exp":4102444800,"iss":"https://as","x":1}"#,
            &rules(),
        );
        assert_eq!((p.key_id(), p.owner(), p.name()), ("app", "u1", "ann"));
        let scopes: Vec<_> = p.scopes().iter().map(|s| s.as_str().to_owned()).collect();
        assert_eq!(scopes, ["billing:write", "reports:read"]);
        assert_eq!(p.expires_at().unwrap().unix_timestamp(), 4102444800);
        assert_eq!(p.meta()["iss"], "https://as");
        assert_eq!(p.meta()["x"], 1);
        assert!(p.meta().get("scope").is_none() && p.meta().get("active").is_none());
    }

    #[test]
    fn unmapped_scopes_can_be_dropped() {
        let r = Rules { keep_unmapped: false, ..rules() };
        let p = valid(r#"{"active":true,"client_id":"app","scope":"read billing:write"}"#, &r);
        assert_eq!(p.scopes().len(), 1);
        assert_eq!(p.owner(), "app", "no sub: the client owns itself");
    }

    #[test]
    fn inactive_expired_and_foreign_tokens_are_invalid() {
        let r = Rules { audience: Some("api".into()), issuer: Some("https://as".into()), ..rules() };
        let reason = |body: &str| match parse(body, &r).unwrap() {
            Verdict::Invalid { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(r#"{"active":false}"#), Reason::NotFound);
        assert_eq!(reason(r#"{"active":true,"sub":"u","aud":"other","iss":"https://as"}"#), Reason::NotFound);
        assert_eq!(reason(r#"{"active":true,"sub":"u","iss":"https://as"}"#), Reason::NotFound);
        assert_eq!(reason(r#"{"active":true,"sub":"u","aud":["x","api"],"iss":"https://evil"}"#), Reason::NotFound);
        assert_eq!(
            reason(r#"{"active":true,"sub":"u","aud":["x","api"],"iss":"https://as","exp":1}"#),
            Reason::Expired
        );
        assert!(matches!(
            parse(r#"{"active":true,"sub":"u","aud":["x","api"],"iss":"https://as"}"#, &r),
            Ok(Verdict::Valid(_))
        ));
    }

    #[test]
    fn nonsense_is_a_bad_answer_never_a_verdict() {
        for body in [
            "",
            "[]",
            "not json",
            r#"{"active":"true","sub":"u"}"#,
            r#"{"sub":"u"}"#,
            r#"{"active":true}"#,
            r#"{"active":true,"sub":7}"#,
            r#"{"active":true,"sub":"u","scope":["a:b"]}"#,
            r#"{"active":true,"sub":"u","exp":"soon"}"#,
            r#"{"active":true,"sub":"u","exp":1e300}"#,
        ] {
            assert!(matches!(parse(body, &rules()), Err(VerifyError::BadAnswer(_))), "{body}");
        }
        let r = Rules { audience: Some("api".into()), ..rules() };
        assert!(matches!(parse(r#"{"active":true,"sub":"u","aud":[1]}"#, &r), Err(VerifyError::BadAnswer(_))));
    }
}
