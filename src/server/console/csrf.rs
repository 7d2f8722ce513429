//! The CSRF check: every console form carries the session's token in a hidden field,
//! compared in constant time on every POST. (`SameSite=Strict` already keeps the cookie
//! off cross-site requests; this is the second lock.)

use subtle::ConstantTimeEq;

/// The hidden field's name.
pub(crate) const FIELD: &str = "csrf";

/// Whether the form's token is the session's.
pub(crate) fn matches(expected: &str, got: Option<&str>) -> bool {
    match got {
        Some(got) => bool::from(expected.as_bytes().ct_eq(got.as_bytes())),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_same_token_matches() {
        assert!(super::matches("abc", Some("abc")));
        assert!(!super::matches("abc", Some("abd")));
        assert!(!super::matches("abc", Some("ab")));
        assert!(!super::matches("abc", Some("")));
        assert!(!super::matches("abc", None));
    }
}
