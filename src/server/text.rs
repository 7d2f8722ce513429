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

/// `t + d`, saturating at the end of year 9999 instead of panicking: durations come from
/// configuration, and a background task that panicked would stop for good.
pub(crate) fn later(t: time::OffsetDateTime, d: std::time::Duration) -> time::OffsetDateTime {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d))
        .unwrap_or(time::macros::datetime!(9999-12-31 23:59:59 UTC))
}

/// `t - d`, saturating at the Unix epoch (nothing in the store is older).
pub(crate) fn earlier(t: time::OffsetDateTime, d: std::time::Duration) -> time::OffsetDateTime {
    time::Duration::try_from(d).ok().and_then(|d| t.checked_sub(d)).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A URL as logs and audit records show it: scheme, host, port and path, without the
/// query or fragment (webhook URLs often carry their receiver's secret there).
pub(crate) fn url_without_query(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    &url[..end]
}
