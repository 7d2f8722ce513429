//! The tokens callers present to the key service, as data: their kinds, what the admin
//! API shows of them, how they are generated and which configured ones are accepted.

use time::OffsetDateTime;

use crate::key::KeyDigest;

/// Shortest token accepted from configuration (environment, flags, files, the
/// builder): 32 characters.
pub const MIN_TOKEN_LEN: usize = 32;
/// Longest token accepted from configuration: 1 024 characters.
pub const MAX_TOKEN_LEN: usize = 1024;
/// Longest token name, in bytes.
pub const MAX_TOKEN_NAME_LEN: usize = 64;
/// Most tokens that may be active (not revoked) at once, both kinds together.
pub const MAX_ACTIVE_TOKENS: usize = 1000;
/// The name a configured (bootstrap) admin token acts under.
pub const BOOTSTRAP_ADMIN: &str = "bootstrap-admin";
/// The name a configured (bootstrap) service token acts under.
pub const BOOTSTRAP_SERVICE: &str = "bootstrap-service";
/// The audit actor of tokens created offline (`keygate-server tokens create --database`).
pub const OFFLINE_ACTOR: &str = "offline-cli";
/// Random base62 characters in a generated token: 43, 256 bits.
const TOKEN_RANDOM_LEN: usize = 43;
/// Random characters kept in a token's display prefix.
const DISPLAY_RANDOM_LEN: usize = 4;

pub(crate) use crate::client::{CreatedToken, NewToken, TokenInfo, TokenKind};

/// A token to store: everything but the raw token.
#[derive(Debug, Clone)]
pub(crate) struct TokenRecord {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) kind: TokenKind,
    pub(crate) digest: KeyDigest,
    pub(crate) prefix: String,
    pub(crate) created_at: OffsetDateTime,
}

/// A new random token of `kind` and its record; the raw token is returned apart.
pub(crate) fn generate(kind: TokenKind, name: &str, at: OffsetDateTime) -> Result<(String, TokenRecord), String> {
    let mut token = String::from(kind.prefix());
    crate::key::push_random_base62(&mut token, TOKEN_RANDOM_LEN).map_err(|e| format!("no randomness: {e}"))?;
    let mut id = String::from("tok_");
    crate::key::push_random_base62(&mut id, 22).map_err(|e| format!("no randomness: {e}"))?;
    let record = TokenRecord {
        id,
        name: name.to_owned(),
        kind,
        digest: KeyDigest::of(token.as_bytes()),
        prefix: display_prefix(&token),
        created_at: at,
    };
    Ok((token, record))
}

/// The first characters of a token that may be shown: the generated prefix and four
/// random characters, or the first four of a configured token.
pub(crate) fn display_prefix(token: &str) -> String {
    let head = [TokenKind::Service, TokenKind::Admin]
        .iter()
        .map(|k| k.prefix())
        .find(|p| token.starts_with(p))
        .map_or(0, str::len);
    token.chars().take(head + DISPLAY_RANDOM_LEN).collect()
}

/// Why a token name is refused, if it is.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if name.is_empty() || name.len() > MAX_TOKEN_NAME_LEN {
        return Err(format!("a token name is 1 to {MAX_TOKEN_NAME_LEN} bytes"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() || !name.bytes().all(ok_char) {
        return Err("a token name is letters, digits, `.`, `_` and `-`, starting with a letter or digit".into());
    }
    if name.starts_with("bootstrap-") || name == OFFLINE_ACTOR {
        return Err(format!("`{name}` is reserved for configured tokens"));
    }
    Ok(())
}

/// Why a configured token (`what`: "the admin token") is refused, if it is.
pub(crate) fn check_configured(what: &str, token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "{what} is {} characters; at least {MIN_TOKEN_LEN} are required (generate one with \
             `keygate-server tokens create`, or e.g. `openssl rand -base64 36`)",
            token.len()
        ));
    }
    if token.len() > MAX_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{what} must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} visible ASCII characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_long_prefixed_and_pass_the_configured_check() {
        let (token, record) = generate(TokenKind::Admin, "ops", OffsetDateTime::UNIX_EPOCH).unwrap();
        assert!(token.starts_with("kga_") && token.len() == 4 + TOKEN_RANDOM_LEN);
        assert!(check_configured("t", &token).is_ok());
        assert_eq!(record.prefix, &token[..8]);
        assert_eq!(record.digest, KeyDigest::of(token.as_bytes()));
        assert!(record.id.starts_with("tok_"));
        let (other, _) = generate(TokenKind::Service, "f", OffsetDateTime::UNIX_EPOCH).unwrap();
        assert!(other.starts_with("kgs_") && other != token);
        assert_eq!(display_prefix("0123456789abcdef0123456789abcdef"), "0123");
    }

    #[test]
    fn names_and_configured_tokens_are_checked() {
        for good in ["ops", "fleet-eu", "ci.deploy_2", "A"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "a b", "adm\u{202e}ni", "bootstrap-admin", "offline-cli", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let short = check_configured("the admin token", "adm").unwrap_err();
        assert!(short.contains("at least 32"), "{short}");
        assert!(check_configured("t", &"x".repeat(31)).is_err());
        assert!(check_configured("t", &"x".repeat(32)).is_ok());
        assert!(check_configured("t", &format!("{} x", "y".repeat(40))).is_err());
    }
}
