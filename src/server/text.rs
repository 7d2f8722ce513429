//! How user input and times are written into messages and JSON: the lowest module of
//! the key service, imported by any other and importing none.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Shows user input in a message without letting it grow the message without bound.
pub(crate) fn shown(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    let mut out = cut.escape_debug().to_string();
    if cut.len() < s.len() {
        out.push('…');
    }
    out
}

/// `t` in RFC 3339; `None` for the few times it cannot write (years before 0 or after
/// 9999), which callers show as `null`.
pub(crate) fn rfc3339(t: OffsetDateTime) -> Option<String> {
    t.format(&Rfc3339).ok()
}
