//! The CSRF checks.
//!
//! Signed in: every console form carries the session's token in a hidden field,
//! compared in constant time on every POST. (`SameSite=Strict` already keeps the cookie
//! off cross-site requests; this is the second lock.)
//!
//! Before sign-in (login CSRF: another site signing the browser in with a token of its
//! own): the sign-in page sets a short-lived cookie holding a random nonce and the time,
//! and its form carries the nonce's HMAC under a key this process drew at start. The
//! POST must bring both, matching and fresh. A site that can plant cookies still cannot
//! forge the field without the key.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The hidden field's name.
pub(crate) const FIELD: &str = "csrf";
/// The pre-session cookie's name.
pub(crate) const SIGN_IN_COOKIE: &str = "keygate_sign_in";
/// How long a sign-in form stays good.
pub(crate) const SIGN_IN_TTL: Duration = Duration::from_secs(10 * 60);

/// Whether the form's token is the session's.
pub(crate) fn matches(expected: &str, got: Option<&str>) -> bool {
    match got {
        Some(got) => bool::from(expected.as_bytes().ct_eq(got.as_bytes())),
        None => false,
    }
}

/// The key that signs sign-in forms; drawn at start, never leaves the process.
pub(crate) struct SignInKey(Option<Zeroizing<[u8; 32]>>);

impl SignInKey {
    /// A fresh key; without randomness, none: every sign-in is then refused.
    pub(crate) fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        Self(getrandom::fill(key.as_mut()).ok().map(|()| key))
    }

    fn mac(&self, nonce: &str) -> Option<String> {
        let key = self.0.as_ref()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key.as_ref()).ok()?;
        mac.update(b"keygate console sign-in\n");
        mac.update(nonce.as_bytes());
        Some(URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    /// A new (cookie value, form field) pair, made at `now` (Unix seconds).
    pub(crate) fn issue(&self, now: i64) -> Option<(String, String)> {
        let nonce = format!("{now}.{}", super::session::random_id()?);
        let field = self.mac(&nonce)?;
        Some((nonce, field))
    }

    /// Whether `cookie` and `field` are a pair this key issued within [`SIGN_IN_TTL`]
    /// before `now`.
    pub(crate) fn check(&self, cookie: Option<&str>, field: Option<&str>, now: i64) -> bool {
        let (Some(cookie), Some(field)) = (cookie, field) else { return false };
        let Some(made) = cookie.split_once('.').and_then(|(t, _)| t.parse::<i64>().ok()) else { return false };
        let fresh = now >= made && now - made < SIGN_IN_TTL.as_secs() as i64;
        let Some(expected) = self.mac(cookie) else { return false };
        fresh && matches(&expected, Some(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_token_matches() {
        assert!(matches("abc", Some("abc")));
        assert!(!matches("abc", Some("abd")));
        assert!(!matches("abc", Some("ab")));
        assert!(!matches("abc", Some("")));
        assert!(!matches("abc", None));
    }

    #[test]
    fn a_sign_in_pair_holds_only_together_fresh_and_under_its_key() {
        let key = SignInKey::generate();
        let (cookie, field) = key.issue(1_000).unwrap();
        assert!(key.check(Some(&cookie), Some(&field), 1_000));
        assert!(key.check(Some(&cookie), Some(&field), 1_599));
        assert!(!key.check(Some(&cookie), Some(&field), 1_600), "stale");
        assert!(!key.check(Some(&cookie), Some(&field), 999), "from the future");
        assert!(!key.check(Some(&cookie), None, 1_000));
        assert!(!key.check(None, Some(&field), 1_000));
        let (other_cookie, other_field) = key.issue(1_000).unwrap();
        assert!(!key.check(Some(&other_cookie), Some(&field), 1_000), "pairs do not mix");
        assert!(!key.check(Some(&cookie), Some(&other_field), 1_000));
        // A planted cookie with a field of the attacker's own making: no key, no match.
        assert!(!key.check(Some(&cookie), Some(&cookie), 1_000));
        assert!(!SignInKey::generate().check(Some(&cookie), Some(&field), 1_000), "another process's key");
        assert!(!SignInKey(None).check(Some(&cookie), Some(&field), 1_000));
    }
}
