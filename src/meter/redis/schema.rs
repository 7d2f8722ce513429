//! Where the fleet-wide engine keeps its counts in Redis. The key service's credit
//! reconciler reads the same keys, so both sides name them here.
//!
//! - credits: a hash at `{prefix}credits:{k|o}:{id}` (`k` a key id, `o` an owner) with
//!   [`REMAINING`] (credits not yet handed out in leases), [`REVISION`] (which setting
//!   of the credits the count started from) and [`REFILLED_AT`] (the Unix second of the
//!   last refill applied);
//! - limits: a hash at `{prefix}limit:{k|o}:{id}:{name}` holding the GCRA's
//!   theoretical arrival time in microseconds of Redis's clock ([`TAT`]).
//!
//! Limit names never hold `:`, so a key name reads back unambiguously from the right.

/// The key prefix when none is configured.
pub(crate) const DEFAULT_PREFIX: &str = "keygate:";
/// Credits not yet handed out, an integer.
pub(crate) const REMAINING: &str = "rem";
/// The revision the count started from: the key service's `credits_revision` in
/// decimal, or `s:` and the stated credits for a key service that gives none.
pub(crate) const REVISION: &str = "rev";
/// The Unix second of the last refill applied.
pub(crate) const REFILLED_AT: &str = "at";
/// A limit's theoretical arrival time, in microseconds.
pub(crate) const TAT: &str = "tat";

/// Whose budget a Redis key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Holder {
    /// One key's own.
    Key,
    /// An owner's, shared by all of its keys.
    Owner,
}

impl Holder {
    fn tag(self) -> &'static str {
        match self {
            Self::Key => "k",
            Self::Owner => "o",
        }
    }
}

/// The hash holding `id`'s credits.
pub(crate) fn credits_key(prefix: &str, holder: Holder, id: &str) -> String {
    format!("{prefix}credits:{}:{id}", holder.tag())
}

/// The hash holding `id`'s limit `name`.
pub(crate) fn limit_key(prefix: &str, holder: Holder, id: &str, name: &str) -> String {
    format!("{prefix}limit:{}:{id}:{name}", holder.tag())
}

/// The [`REVISION`] a count of `credits` starts from.
pub(crate) fn revision(revision: Option<u64>, credits: &crate::quota::Credits) -> String {
    match revision {
        Some(r) => r.to_string(),
        None => match &credits.refill {
            Some(refill) => format!("s:{}:{refill}", credits.remaining),
            None => format!("s:{}", credits.remaining),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_per_holder_and_limit() {
        assert_eq!(credits_key("kg:", Holder::Key, "key_1"), "kg:credits:k:key_1");
        assert_eq!(credits_key("kg:", Holder::Owner, "acme"), "kg:credits:o:acme");
        assert_eq!(limit_key("kg:", Holder::Owner, "a:b", "requests"), "kg:limit:o:a:b:requests");
        let c = crate::quota::Credits { remaining: 5, refill: None };
        assert_eq!(revision(Some(7), &c), "7");
        assert_eq!(revision(None, &c), "s:5");
    }
}
