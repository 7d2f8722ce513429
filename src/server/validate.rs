//! Validation of admin input: the limits of [`model`](super::model), as API errors.

use time::OffsetDateTime;

use crate::principal::RateLimit;
use crate::quota::{Credits, Limit, REQUESTS, limits_problem};
use crate::scope::{Scope, validate_role};

use super::error::ApiError;
use super::model::{MAX_META_BYTES, MAX_NAME_LEN, MAX_RATELIMIT_PERIOD_S, MAX_ROLES, MAX_SCOPES};
use super::text::shown;

pub(crate) fn validate_text(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid("invalid_request", format!("`{field}` must not be empty")));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(ApiError::invalid("invalid_request", format!("`{field}` is longer than {MAX_NAME_LEN} bytes")));
    }
    refuse_hidden_chars(field, value)
}

/// Refuses the characters that make a text read differently from what it is: controls,
/// line and paragraph separators, bidirectional overrides, isolates and marks, and the
/// default-ignorable code points of Unicode (drawn as nothing: zero-width characters,
/// fillers, variation selectors, tag characters). An owner shown as `admin` in a table
/// must be `admin`. The position counts characters from 0.
pub(crate) fn refuse_hidden_chars(field: &str, value: &str) -> Result<(), ApiError> {
    for (i, c) in value.chars().enumerate() {
        if let Some(what) = hidden_char(c) {
            return Err(ApiError::invalid(
                "invalid_request",
                format!("{field}: U+{:04X} ({what}) at char {} is not allowed", c as u32, i),
            ));
        }
    }
    Ok(())
}

/// What a refused character is, or `None` for one that may appear in admin text.
fn hidden_char(c: char) -> Option<&'static str> {
    Some(match c {
        '\u{202A}' => "left-to-right embedding",
        '\u{202B}' => "right-to-left embedding",
        '\u{202C}' => "pop directional formatting",
        '\u{202D}' => "left-to-right override",
        '\u{202E}' => "right-to-left override",
        '\u{2066}' => "left-to-right isolate",
        '\u{2067}' => "right-to-left isolate",
        '\u{2068}' => "first strong isolate",
        '\u{2069}' => "pop directional isolate",
        '\u{200B}' => "zero width space",
        '\u{200C}' => "zero width non-joiner",
        '\u{200D}' => "zero width joiner",
        '\u{200E}' => "left-to-right mark",
        '\u{200F}' => "right-to-left mark",
        '\u{061C}' => "arabic letter mark",
        '\u{2028}' => "line separator",
        '\u{2029}' => "paragraph separator",
        '\u{2060}' => "word joiner",
        '\u{2061}'..='\u{2064}' => "invisible operator",
        '\u{2065}' => "default ignorable (reserved)",
        '\u{206A}'..='\u{206F}' => "deprecated format character",
        '\u{FEFF}' => "zero width no-break space",
        '\u{00AD}' => "soft hyphen",
        '\u{034F}' => "combining grapheme joiner",
        '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' => "hangul filler",
        '\u{17B4}' | '\u{17B5}' => "khmer inherent vowel",
        '\u{180B}'..='\u{180D}' | '\u{180F}' => "mongolian free variation selector",
        '\u{180E}' => "mongolian vowel separator",
        '\u{FE00}'..='\u{FE0F}' | '\u{E0100}'..='\u{E01EF}' => "variation selector",
        '\u{FFF0}'..='\u{FFF8}' => "default ignorable (reserved)",
        '\u{FFF9}'..='\u{FFFB}' => "interlinear annotation",
        '\u{1BCA0}'..='\u{1BCA3}' => "shorthand format control",
        '\u{1D173}'..='\u{1D17A}' => "musical symbol format character",
        '\u{E0000}'..='\u{E007F}' => "tag character",
        '\u{E0080}'..='\u{E00FF}' | '\u{E01F0}'..='\u{E0FFF}' => "default ignorable (reserved)",
        c if c.is_control() => "control character",
        _ => return None,
    })
}

/// Validates scopes and returns them sorted and deduplicated.
pub(crate) fn validate_scopes(field: &str, scopes: &[String]) -> Result<Vec<String>, ApiError> {
    if scopes.len() > MAX_SCOPES {
        return Err(ApiError::invalid("invalid_scope", format!("`{field}` holds more than {MAX_SCOPES} scopes")));
    }
    let mut out = Vec::with_capacity(scopes.len());
    for (i, s) in scopes.iter().enumerate() {
        Scope::parse(s).map_err(|e| ApiError::invalid("invalid_scope", format!("{field}[{i}]: {e}")))?;
        out.push(s.clone());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Validates role names and returns them sorted and deduplicated.
pub(crate) fn validate_roles(roles: &[String]) -> Result<Vec<String>, ApiError> {
    if roles.len() > MAX_ROLES {
        return Err(ApiError::invalid("invalid_role", format!("`roles` holds more than {MAX_ROLES} roles")));
    }
    let mut out = Vec::with_capacity(roles.len());
    for (i, r) in roles.iter().enumerate() {
        validate_role_name(r).map_err(|e| ApiError::invalid("invalid_role", format!("roles[{i}]: {e}")))?;
        out.push(r.clone());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

pub(crate) fn validate_role_name(name: &str) -> Result<(), String> {
    validate_role(name).map_err(|_| format!("role name `{}` must match [a-z0-9_.-]{{1,64}}", shown(name)))
}

pub(crate) fn validate_environment(env: &str) -> Result<(), ApiError> {
    let b = env.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "invalid_request",
            "`environment` must match [a-z][a-z0-9_-]{0,31} (e.g. `live`, `test`)",
        ))
    }
}

pub(crate) fn validate_expiry(at: OffsetDateTime, now: OffsetDateTime) -> Result<(), ApiError> {
    if at <= now {
        return Err(ApiError::invalid("invalid_expiry", "`expires_at` must be in the future"));
    }
    Ok(())
}

pub(crate) fn validate_meta(meta: &serde_json::Value) -> Result<(), ApiError> {
    if !meta.is_object() {
        return Err(ApiError::invalid("invalid_request", "`meta` must be a JSON object"));
    }
    if meta.to_string().len() > MAX_META_BYTES {
        return Err(ApiError::invalid("invalid_request", format!("`meta` is larger than {MAX_META_BYTES} bytes")));
    }
    meta_strings("meta", meta)
}

/// Every string in `meta` (keys and values, at any depth) passes [`refuse_hidden_chars`],
/// named by its path (`meta.team`, `meta.tags[1]`).
fn meta_strings(path: &str, v: &serde_json::Value) -> Result<(), ApiError> {
    use serde_json::Value;
    match v {
        Value::String(s) => refuse_hidden_chars(path, s),
        Value::Array(items) => {
            items.iter().enumerate().try_for_each(|(i, item)| meta_strings(&format!("{path}[{i}]"), item))
        }
        Value::Object(map) => map.iter().try_for_each(|(k, item)| {
            let path = format!("{path}.{}", shown(k));
            refuse_hidden_chars(&path, k)?;
            meta_strings(&path, item)
        }),
        _ => Ok(()),
    }
}

/// Most networks in one allowlist (a key's or an owner's).
pub const MAX_ALLOWED_NETWORKS: usize = 32;

/// A network allowlist, canonical: each entry a CIDR (`203.0.113.0/24`) or an address
/// (`203.0.113.7`, kept as `/32` or `/128`), host bits cleared, repeats dropped, in the
/// order given; at most [`MAX_ALLOWED_NETWORKS`].
pub(crate) fn validate_networks(networks: &[String]) -> Result<Vec<String>, ApiError> {
    if networks.len() > MAX_ALLOWED_NETWORKS {
        let message = format!("`allowed_networks` holds at most {MAX_ALLOWED_NETWORKS} networks");
        return Err(ApiError::invalid("invalid_network", message));
    }
    let mut out: Vec<String> = Vec::with_capacity(networks.len());
    for text in networks {
        let net = text
            .trim()
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.trim().parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                let shown: String = text.chars().take(64).collect();
                ApiError::invalid("invalid_network", format!("`{shown}` is not a CIDR (203.0.113.0/24) or an address"))
            })?;
        let canonical = net.trunc().to_string();
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    Ok(out)
}

pub(crate) fn validate_ratelimit(rl: &RateLimit) -> Result<(), ApiError> {
    // The store keeps the limit in a signed 64-bit column: larger values would come
    // back as "no limit".
    let too_large = rl.limit > i64::MAX as u64;
    if rl.limit == 0 || too_large || rl.period_s == 0 || rl.period_s > MAX_RATELIMIT_PERIOD_S {
        return Err(ApiError::invalid(
            "invalid_request",
            format!(
                "`ratelimit` needs limit between 1 and {} and period_s between 1 and {MAX_RATELIMIT_PERIOD_S}",
                i64::MAX
            ),
        ));
    }
    Ok(())
}

/// Named limits: at most 16, names `[a-z0-9_-]{1,32}` and each once, positive
/// numbers, periods up to 31 days.
pub(crate) fn validate_limits(limits: &[Limit]) -> Result<(), ApiError> {
    match limits_problem(limits) {
        Some(why) => Err(ApiError::invalid("invalid_limit", why)),
        None => Ok(()),
    }
}

/// Credits: a bounded count and a refill that makes sense.
pub(crate) fn validate_credits(credits: &Credits) -> Result<(), ApiError> {
    match credits.problem() {
        Some(why) => Err(ApiError::invalid("invalid_credits", why)),
        None => Ok(()),
    }
}

/// The limits of a request that may also send the single `ratelimit` (the `requests`
/// limit, for older clients): both naming `requests` is refused.
pub(crate) fn merge_ratelimit(mut limits: Vec<Limit>, ratelimit: Option<&RateLimit>) -> Result<Vec<Limit>, ApiError> {
    if let Some(rl) = ratelimit {
        validate_ratelimit(rl)?;
        if limits.iter().any(|l| &*l.name == REQUESTS) {
            return Err(ApiError::invalid(
                "invalid_limit",
                "`ratelimit` is the limit named `requests`: send it or a `requests` limit in `limits`, not both",
            ));
        }
        limits.insert(0, Limit::new(REQUESTS, rl.limit, rl.period_s));
    }
    validate_limits(&limits)?;
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_characters_are_named_with_their_position() {
        let err = validate_text("owner", "adm\u{202e}ni\u{200b}").unwrap_err();
        assert_eq!(err.to_string(), "owner: U+202E (right-to-left override) at char 3 is not allowed");
        let err = validate_text("name", "ci\u{200b}").unwrap_err();
        assert_eq!(err.to_string(), "name: U+200B (zero width space) at char 2 is not allowed");
        for c in ['\u{00AD}', '\u{2066}', '\u{2069}', '\u{FEFF}', '\u{2063}', '\u{7}', '\u{200F}'] {
            assert!(validate_text("owner", &format!("a{c}b")).is_err(), "U+{:04X}", c as u32);
        }
        for ok in ["acme", "Ünïcödé GmbH", "東京", "a-b_c.d e"] {
            validate_text("owner", ok).unwrap();
        }
        let err = validate_meta(&serde_json::json!({ "tags": ["ok", "x\u{202d}"] })).unwrap_err();
        assert!(err.to_string().starts_with("meta.tags[1]: U+202D"), "{err}");
    }

    #[test]
    fn separators_fillers_variation_selectors_and_tags_are_refused() {
        let named = [
            ('\u{2028}', "line separator"),
            ('\u{2029}', "paragraph separator"),
            ('\u{E0001}', "tag character"),
            ('\u{E0041}', "tag character"),
            ('\u{E007F}', "tag character"),
            ('\u{FE00}', "variation selector"),
            ('\u{FE0F}', "variation selector"),
            ('\u{E0100}', "variation selector"),
            ('\u{E01EF}', "variation selector"),
            ('\u{180E}', "mongolian vowel separator"),
            ('\u{180B}', "mongolian free variation selector"),
            ('\u{2060}', "word joiner"),
            ('\u{2064}', "invisible operator"),
            ('\u{FEFF}', "zero width no-break space"),
            ('\u{00AD}', "soft hyphen"),
            ('\u{034F}', "combining grapheme joiner"),
            ('\u{115F}', "hangul filler"),
            ('\u{1160}', "hangul filler"),
            ('\u{3164}', "hangul filler"),
            ('\u{FFA0}', "hangul filler"),
            ('\u{061C}', "arabic letter mark"),
            ('\u{17B4}', "khmer inherent vowel"),
            ('\u{206F}', "deprecated format character"),
            ('\u{1D173}', "musical symbol format character"),
            ('\u{1BCA0}', "shorthand format control"),
        ];
        for (c, what) in named {
            let err = validate_text("owner", &format!("ab{c}")).unwrap_err();
            assert_eq!(err.to_string(), format!("owner: U+{:04X} ({what}) at char 2 is not allowed", c as u32));
        }
        // A flag emoji spelled with tag characters hides text inside a visible glyph.
        assert!(validate_text("name", "\u{1F3F4}\u{E0067}\u{E0062}\u{E007F}").is_err());
        // Their neighbours stay allowed: visible letters, symbols and combining marks.
        for ok in ["\u{1F3F4}", "e\u{0301}", "\u{FB01}", "\u{1D172}", "\u{FFFC}", "\u{2027}", "\u{3165}", "\u{FFA1}"] {
            validate_text("owner", ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        let err = validate_meta(&serde_json::json!({ "team\u{2028}": "x" })).unwrap_err();
        assert!(err.to_string().contains("U+2028 (line separator)"), "{err}");
    }
}
