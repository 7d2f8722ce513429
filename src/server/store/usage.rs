//! Usage as every backend keeps it: [`Tally`], the counters each usage table holds; the
//! keys of the three tables; and the SQL that reads them, the same on SQLite and
//! PostgreSQL. How rows are merged is each backend's (one writer on SQLite; row locks
//! taken in key order on PostgreSQL).

use std::collections::BTreeMap;

use super::StoreError;
use super::rows::Get;
use crate::usage::{AggregateRow, LatencyHistogram, StatusCounts};

/// The counter columns of every usage table, in the order [`Tally::values`] gives them.
pub(crate) const TALLY_COLUMNS: [&str; 11] = [
    "requests",
    "allowed",
    "denied",
    "status_1xx",
    "status_2xx",
    "status_3xx",
    "status_4xx",
    "status_5xx",
    "latency_us_sum",
    "latency_us_max",
    "latency",
];

/// What one usage row counts. Merging adds (saturating) and keeps the larger maximum,
/// so rows from any number of middlewares, batches and minutes combine exactly.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Tally {
    pub(crate) requests: u64,
    pub(crate) allowed: u64,
    pub(crate) denied: u64,
    pub(crate) status: StatusCounts,
    pub(crate) latency_us_sum: u64,
    pub(crate) latency_us_max: u64,
    /// The latencies of the requests that came with one: all of them, but for minute
    /// rows stored before schema 2 (their sum and maximum are in the columns).
    pub(crate) latency: LatencyHistogram,
}

impl Tally {
    /// What one checked aggregate row counts.
    pub(crate) fn of_row(row: &AggregateRow) -> Self {
        let allowed = row.outcome.is_allowed();
        Self {
            requests: row.requests,
            allowed: if allowed { row.requests } else { 0 },
            denied: if allowed { 0 } else { row.requests },
            status: row.status,
            latency_us_sum: u64::try_from(row.latency.sum().as_micros()).unwrap_or(u64::MAX),
            latency_us_max: u64::try_from(row.latency.max().as_micros()).unwrap_or(u64::MAX),
            latency: row.latency.clone(),
        }
    }

    /// Adds `other` into this one.
    pub(crate) fn merge(&mut self, other: &Self) {
        self.requests = self.requests.saturating_add(other.requests);
        self.allowed = self.allowed.saturating_add(other.allowed);
        self.denied = self.denied.saturating_add(other.denied);
        self.status.merge(&other.status);
        self.latency_us_sum = self.latency_us_sum.saturating_add(other.latency_us_sum);
        self.latency_us_max = self.latency_us_max.max(other.latency_us_max);
        self.latency.merge(&other.latency);
    }

    /// The integer columns, as the database keeps them (signed 64-bit: larger counts
    /// stay at `i64::MAX`), and the histogram's sparse JSON (`None` when empty).
    pub(crate) fn values(&self) -> ([i64; 10], Option<String>) {
        let s = &self.status;
        let ints = [
            self.requests,
            self.allowed,
            self.denied,
            s.informational,
            s.success,
            s.redirection,
            s.client_error,
            s.server_error,
            self.latency_us_sum,
            self.latency_us_max,
        ]
        .map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        let latency = if self.latency.is_empty() { None } else { serde_json::to_string(&self.latency).ok() };
        (ints, latency)
    }

    /// Reads the counter columns of a row.
    pub(crate) fn from_row(row: &impl Get) -> Result<Self, StoreError> {
        let n = |c: &str| row.int(c).map(|v| v.max(0) as u64);
        let latency = match row.opt_text("latency")? {
            None => LatencyHistogram::new(),
            // A histogram whose bucket saturated (4 294 967 295 requests in one bucket
            // of one row) no longer reads; its counts and sums still do.
            Some(json) => serde_json::from_str(&json).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "a stored latency histogram does not read; its percentiles are left out");
                LatencyHistogram::new()
            }),
        };
        Ok(Self {
            requests: n("requests")?,
            allowed: n("allowed")?,
            denied: n("denied")?,
            status: StatusCounts {
                informational: n("status_1xx")?,
                success: n("status_2xx")?,
                redirection: n("status_3xx")?,
                client_error: n("status_4xx")?,
                server_error: n("status_5xx")?,
            },
            latency_us_sum: n("latency_us_sum")?,
            latency_us_max: n("latency_us_max")?,
            latency,
        })
    }
}

/// Which usage table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UsageTable {
    /// `usage_minutes`: per key and minute, until retention rolls them up.
    Minutes,
    /// `usage_hours`: minute rows rolled up, per key and hour.
    Hours,
    /// `usage_routes`: per key, hour, route, method and outcome.
    Routes,
}

impl UsageTable {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Minutes => "usage_minutes",
            Self::Hours => "usage_hours",
            Self::Routes => "usage_routes",
        }
    }

    /// The primary key's columns, in the order of [`UsageKey`]'s fields.
    pub(crate) fn key_columns(self) -> &'static [&'static str] {
        match self {
            Self::Minutes => &["key_id", "minute"],
            Self::Hours => &["key_id", "hour"],
            Self::Routes => &["key_id", "hour", "route", "method", "outcome"],
        }
    }

    pub(crate) fn routed(self) -> bool {
        self == Self::Routes
    }
}

/// A usage row's primary key. `route`, `method` and `outcome` are empty but in
/// [`UsageTable::Routes`]. Ordered as the primary key is: the order in which writers
/// lock rows, so that two of them never wait for each other in a cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct UsageKey {
    pub(crate) key_id: String,
    /// Unix seconds of the minute's or the hour's start.
    pub(crate) at: i64,
    pub(crate) route: String,
    pub(crate) method: String,
    pub(crate) outcome: String,
}

impl UsageKey {
    pub(crate) fn of_key(key_id: &str, at: i64) -> Self {
        Self { key_id: key_id.to_owned(), at, ..Self::default() }
    }

    pub(crate) fn from_row(row: &impl Get, table: UsageTable) -> Result<Self, StoreError> {
        let cols = table.key_columns();
        let mut key = Self { key_id: row.text(cols[0])?, at: row.int(cols[1])?, ..Self::default() };
        if table.routed() {
            key.route = row.text("route")?;
            key.method = row.text("method")?;
            key.outcome = row.text("outcome")?;
        }
        Ok(key)
    }
}

/// What one usage batch adds.
#[derive(Debug, Default)]
pub(crate) struct UsageDelta {
    /// Into `usage_minutes`.
    pub(crate) minutes: BTreeMap<UsageKey, Tally>,
    /// Into `usage_routes`.
    pub(crate) routes: BTreeMap<UsageKey, Tally>,
    /// The newest request per key, Unix milliseconds: `last_used_at` moves up to it.
    pub(crate) last_used: BTreeMap<String, i64>,
}

impl UsageDelta {
    /// Requests the delta stores (per key and minute; the route rows count the same).
    pub(crate) fn requests(&self) -> u64 {
        self.minutes.values().fold(0u64, |n, t| n.saturating_add(t.requests))
    }
}

/// An aggregate batch to mark as applied with its rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchMark<'a> {
    pub(crate) batch_id: &'a str,
    /// Unix milliseconds.
    pub(crate) applied_at: i64,
    /// What the answer says was stored; a duplicate is answered the same.
    pub(crate) accepted: u64,
}

/// Whether a batch was applied now, or had been before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Stored now.
    Now,
    /// The batch id had been applied; nothing was added. `accepted` is what the first
    /// copy stored.
    Before { accepted: u64 },
}

/// Whose usage to read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum UsageOf<'a> {
    Key(&'a str),
    /// Every key of one owner.
    Owner(&'a str),
}

/// Which rows to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadKind {
    /// Minute rows.
    Minutes,
    /// Rolled-up hour rows and the minute rows not rolled up yet: every request once,
    /// whatever retention does meanwhile (one statement, one snapshot).
    Hours,
    /// Route rows.
    Routes,
}

/// A read of usage rows: `at` in `[from, to)`, Unix seconds, at most `max_rows` rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UsageRead<'a> {
    pub(crate) of: UsageOf<'a>,
    pub(crate) kind: ReadKind,
    pub(crate) from: i64,
    pub(crate) to: i64,
    pub(crate) max_rows: u64,
}

impl UsageRead<'_> {
    /// The statement; binds `$1` whose (key id or owner), `$2` from, `$3` to, `$4` limit.
    pub(crate) fn sql(&self) -> String {
        let whose = match self.of {
            UsageOf::Key(_) => "key_id = $1",
            UsageOf::Owner(_) => "key_id IN (SELECT key_id FROM keys WHERE owner = $1)",
        };
        let cols = TALLY_COLUMNS.join(", ");
        let select = |table: &str, time: &str, extra: &str| {
            format!("SELECT {time} AS at{extra}, {cols} FROM {table} WHERE {whose} AND {time} >= $2 AND {time} < $3")
        };
        match self.kind {
            ReadKind::Minutes => format!("{} LIMIT $4", select("usage_minutes", "minute", "")),
            ReadKind::Hours => format!(
                "{} UNION ALL {} LIMIT $4",
                select("usage_hours", "hour", ""),
                select("usage_minutes", "minute", "")
            ),
            ReadKind::Routes => format!("{} LIMIT $4", select("usage_routes", "hour", ", route, method, outcome")),
        }
    }

    pub(crate) fn whose(&self) -> &str {
        match self.of {
            UsageOf::Key(k) | UsageOf::Owner(k) => k,
        }
    }
}

/// One key's requests over a window ([`OwnerUsage`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyUsage {
    pub(crate) key_id: String,
    pub(crate) name: String,
    pub(crate) requests: u64,
    pub(crate) allowed: u64,
    pub(crate) denied: u64,
}

/// An owner's usage over a window: its busiest keys, its most denied ones, and the sums
/// over all its keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OwnerUsage {
    /// By requests, most first (then by key id); at most the limit asked for.
    pub(crate) top_requests: Vec<KeyUsage>,
    /// By denied requests, most first, only keys with a denial; at most the limit.
    pub(crate) top_denied: Vec<KeyUsage>,
    /// Over every key of the owner (`key_id` and `name` empty).
    pub(crate) total: KeyUsage,
    /// Keys of the owner with a request in the window.
    pub(crate) keys_used: u64,
}

/// The rows of `owner`'s keys with `at` in `[$2, $3)`, owner `$1`: the rolled-up hour
/// rows and the minute rows (a row is in one or the other, never both).
pub(crate) const OWNER_ROWS: &str = "SELECT key_id, requests, allowed, denied FROM usage_hours \
     WHERE hour >= $2 AND hour < $3 AND key_id IN (SELECT key_id FROM keys WHERE owner = $1) \
     UNION ALL SELECT key_id, requests, allowed, denied FROM usage_minutes \
     WHERE minute >= $2 AND minute < $3 AND key_id IN (SELECT key_id FROM keys WHERE owner = $1)";

/// One row a [`UsageRead`] found.
#[derive(Debug, Clone)]
pub(crate) struct ReadRow {
    /// Unix seconds of the row's minute or hour.
    pub(crate) at: i64,
    /// `(route, method, outcome)` of a route row.
    pub(crate) route: Option<(String, String, String)>,
    pub(crate) tally: Tally,
}

impl ReadRow {
    pub(crate) fn from_row(row: &impl Get, kind: ReadKind) -> Result<Self, StoreError> {
        let route = if kind == ReadKind::Routes {
            Some((row.text("route")?, row.text("method")?, row.text("outcome")?))
        } else {
            None
        };
        Ok(Self { at: row.int("at")?, route, tally: Tally::from_row(row)? })
    }
}

/// What one retention pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionReport {
    /// Minute rows rolled up into hour rows (and deleted).
    pub minutes_rolled_up: u64,
    /// Hour rows (per key, and per key and route) deleted.
    pub hours_deleted: u64,
    /// Applied batch ids forgotten.
    pub batch_ids_deleted: u64,
    /// Change log rows deleted (older than the change log's retention, or beyond its
    /// row bound).
    pub changes_deleted: u64,
}

/// What a retention pass removes: rows before these times (Unix seconds; batch ids in
/// milliseconds), at most `rows_per_transaction` per transaction, at most
/// `max_transactions` transactions per kind of row (the next pass goes on).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetentionCutoffs {
    pub(crate) minutes_before: i64,
    pub(crate) hours_before: i64,
    pub(crate) batches_before_ms: i64,
    pub(crate) rows_per_transaction: u32,
    pub(crate) max_transactions: u32,
    /// What to prune of the change log, if anything.
    pub(crate) change_log: Option<ChangeLogCutoff>,
}

/// The change log rows a retention pass deletes: older than `before_ms` (Unix ms) or
/// beyond the newest `max_rows`; never the newest row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChangeLogCutoff {
    pub(crate) before_ms: i64,
    pub(crate) max_rows: u64,
}

/// Minute rows deleted by a roll-up, summed per key and hour.
pub(crate) fn hours_of(minutes: impl IntoIterator<Item = (UsageKey, Tally)>) -> BTreeMap<UsageKey, Tally> {
    let mut hours: BTreeMap<UsageKey, Tally> = BTreeMap::new();
    for (key, tally) in minutes {
        let hour = key.at - key.at.rem_euclid(3600);
        hours.entry(UsageKey::of_key(&key.key_id, hour)).or_default().merge(&tally);
    }
    hours
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_merge_saturating_and_keep_the_maximum() {
        let mut a = Tally { requests: u64::MAX - 1, latency_us_max: 10, ..Tally::default() };
        let b = Tally { requests: 5, latency_us_max: 7, latency_us_sum: 3, ..Tally::default() };
        a.merge(&b);
        assert_eq!((a.requests, a.latency_us_max, a.latency_us_sum), (u64::MAX, 10, 3));
        assert_eq!(a.values().0[0], i64::MAX);
        assert_eq!(a.values().1, None);
    }

    #[test]
    fn minutes_roll_up_into_their_hours() {
        let t = |n| Tally { requests: n, ..Tally::default() };
        let hours = hours_of([
            (UsageKey::of_key("key_a", 7200), t(1)),
            (UsageKey::of_key("key_a", 7260), t(2)),
            (UsageKey::of_key("key_a", 10800), t(4)),
            (UsageKey::of_key("key_b", 7200), t(8)),
        ]);
        let got: Vec<(&str, i64, u64)> = hours.iter().map(|(k, t)| (k.key_id.as_str(), k.at, t.requests)).collect();
        assert_eq!(got, [("key_a", 7200, 3), ("key_a", 10800, 4), ("key_b", 7200, 8)]);
    }
}
