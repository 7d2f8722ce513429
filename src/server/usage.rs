//! `POST /v1/usage`: checking a batch and folding it into what the store adds.
//!
//! Both forms end up as [`AggregateRow`]s: an [`AggregateBatch`] carries them, and a raw
//! [`UsageBatch`]'s events are aggregated into them here. Rows are then screened (time
//! window, key ids) and summed per key and minute, and per key, hour, route, method and
//! outcome: one batch costs one merge per row it touches, whatever its traffic.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::error::ApiError;
use super::store::{Tally, UsageDelta, UsageKey};
use super::text::shown;
use crate::usage::{AggregateBatch, AggregateRow, ClientNetwork, LatencyHistogram, StatusCounts, UsageEvent};

/// Largest `POST /v1/usage` body carrying an [`AggregateBatch`]: 16 MiB (20 000 rows
/// with a dozen latency buckets each fit with room to spare).
pub const AGGREGATE_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// Most rows in one aggregate batch.
pub const MAX_AGGREGATE_ROWS: usize = 20_000;
/// Most client networks in one aggregate batch.
pub const MAX_AGGREGATE_NETWORKS: usize = 20_000;
/// Oldest usage accepted: minutes up to 24 hours before the key service's clock.
pub const MAX_USAGE_AGE: Duration = Duration::from_secs(24 * 3600);
/// Newest usage accepted: minutes up to 5 minutes after the key service's clock.
pub const MAX_USAGE_AHEAD: Duration = Duration::from_secs(5 * 60);
/// How long an applied batch id is remembered: 25 hours, longer than
/// [`MAX_USAGE_AGE`] plus [`MAX_USAGE_AHEAD`], so that a batch sent again after its id
/// was forgotten has no row young enough to be stored again.
pub const USAGE_BATCH_ID_RETENTION: Duration = Duration::from_secs(25 * 3600);
/// Longest route accepted, in bytes.
pub const MAX_USAGE_ROUTE_LEN: usize = 1024;
/// Longest method accepted, in bytes.
const MAX_METHOD_LEN: usize = 32;

/// What one batch adds to the store, and what it did not store.
#[derive(Debug, Default)]
pub(crate) struct Folded {
    pub delta: UsageDelta,
    /// `(key_id, network)` pairs seen, with the first minute in the batch.
    pub networks: Vec<(String, String, OffsetDateTime)>,
    pub refused_rows: u64,
    /// Requests in rows outside the accepted time window.
    pub refused: u64,
    /// Requests of key ids that are not this service's keys.
    pub unknown: u64,
    /// Requests without a key id (no key, malformed, the table-wide overflow row).
    pub unattributed: u64,
}

impl Folded {
    /// `(key_id, minute)` pairs the batch touched.
    pub fn touched(&self) -> BTreeSet<(String, i64)> {
        self.delta.minutes.keys().map(|k| (k.key_id.clone(), k.at)).collect()
    }
}

/// Which form a `POST /v1/usage` body has: an aggregate batch has a `batch_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchForm {
    Aggregate,
    Raw,
}

pub(crate) fn form_of(bytes: &[u8]) -> Result<BatchForm, ApiError> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default)]
        batch_id: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        events: Option<serde::de::IgnoredAny>,
    }
    // A body that does not read as an object at all is left to the full parse, which
    // says where and why.
    let Ok(probe) = serde_json::from_slice::<Probe>(bytes) else { return Ok(BatchForm::Raw) };
    match (probe.batch_id.is_some(), probe.events.is_some()) {
        (true, true) => Err(ApiError::invalid(
            "invalid_request",
            "a usage batch carries `batch_id` and `rows` (aggregated) or `events` (raw), not both",
        )),
        (true, false) => Ok(BatchForm::Aggregate),
        (false, _) => Ok(BatchForm::Raw),
    }
}

/// Refuses an aggregate batch that is malformed, too large, or whose rows do not add up.
pub(crate) fn check_aggregate(batch: &AggregateBatch) -> Result<(), ApiError> {
    let id = batch.batch_id.as_bytes();
    if id.len() != 32 || !id.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
        return Err(ApiError::invalid(
            "invalid_batch_id",
            format!("`batch_id` must be 32 lowercase hex digits, got `{}`", shown(&batch.batch_id)),
        ));
    }
    if batch.rows.len() > MAX_AGGREGATE_ROWS {
        return Err(ApiError::invalid(
            "too_many_rows",
            format!("a batch holds at most {MAX_AGGREGATE_ROWS} rows, got {}", batch.rows.len()),
        ));
    }
    if batch.networks.len() > MAX_AGGREGATE_NETWORKS {
        return Err(ApiError::invalid(
            "too_many_networks",
            format!("a batch holds at most {MAX_AGGREGATE_NETWORKS} networks, got {}", batch.networks.len()),
        ));
    }
    for (i, r) in batch.rows.iter().enumerate() {
        let bad = |m: String| ApiError::invalid("invalid_row", format!("rows[{i}]: {m}"));
        check_minute(r.minute).map_err(bad)?;
        if r.requests != r.latency.count() || r.requests != r.status.total() {
            return Err(bad(format!(
                "`requests` ({}) must equal `latency.count` ({}) and the sum of `status` ({})",
                r.requests,
                r.latency.count(),
                r.status.total()
            )));
        }
    }
    for (i, n) in batch.networks.iter().enumerate() {
        let bad = |m: String| ApiError::invalid("invalid_network", format!("networks[{i}]: {m}"));
        check_minute(n.minute).map_err(bad)?;
        if !is_network(&n.network) {
            return Err(bad(format!(
                "`network` must be an IPv4 /24 (`203.0.113.0/24`) or IPv6 /48 (`2001:db8:1::/48`), got `{}`",
                shown(&n.network)
            )));
        }
    }
    Ok(())
}

fn check_minute(minute: i64) -> Result<(), String> {
    if minute.rem_euclid(60) != 0 {
        return Err(format!("`minute` must be a multiple of 60 (the minute's start, Unix seconds), got {minute}"));
    }
    Ok(())
}

fn is_text(value: &str, max: usize) -> bool {
    !value.is_empty() && value.len() <= max && !value.chars().any(char::is_control)
}

/// A network as [`network_of`](crate::network_of) writes it, and nothing else.
fn is_network(s: &str) -> bool {
    let Some((addr, _)) = s.split_once('/') else { return false };
    addr.parse::<IpAddr>().is_ok_and(|ip| crate::network_of(ip) == s)
}

/// Aggregates raw events into rows and networks, as the edge would have.
pub(crate) fn rows_of_events(events: &[UsageEvent]) -> Result<(Vec<AggregateRow>, Vec<ClientNetwork>), ApiError> {
    type RowKey<'a> = (i64, Option<&'a str>, &'a str, &'a str, crate::Outcome);
    let mut rows: HashMap<RowKey<'_>, AggregateRow> = HashMap::new();
    let mut networks: HashMap<(&str, String), i64> = HashMap::new();
    // Routes and methods are checked where the rows are folded, one row at a time.
    for ev in events {
        let ts = ev.at.unix_timestamp();
        let minute = ts - ts.rem_euclid(60);
        let at_ms = i64::try_from(ev.at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        let key = (minute, ev.key_id.as_deref(), &*ev.route, &*ev.method, ev.outcome);
        let row = rows.entry(key).or_insert_with(|| AggregateRow {
            minute,
            key_id: ev.key_id.clone(),
            route: Arc::clone(&ev.route),
            method: Arc::from(&*ev.method),
            outcome: ev.outcome,
            requests: 0,
            status: StatusCounts::default(),
            latency: LatencyHistogram::new(),
            last_at_ms: at_ms,
        });
        row.requests = row.requests.saturating_add(1);
        row.status.add(ev.status);
        row.latency.record(ev.latency);
        row.last_at_ms = row.last_at_ms.max(at_ms);
        if let (Some(key_id), Some(ip)) = (ev.key_id.as_deref(), ev.client_ip) {
            let first = networks.entry((key_id, crate::network_of(ip))).or_insert(minute);
            *first = (*first).min(minute);
        }
    }
    let networks = networks
        .into_iter()
        .map(|((key_id, network), minute)| ClientNetwork { key_id: Arc::from(key_id), network, minute })
        .collect();
    Ok((rows.into_values().collect(), networks))
}

/// The key ids of a batch that have the shape of this service's (`key_` and 22 base62
/// characters), once each: the ones worth looking up.
pub(crate) fn key_ids<'a>(rows: &'a [AggregateRow], networks: &'a [ClientNetwork]) -> Vec<&'a str> {
    let ids: BTreeSet<&str> = rows
        .iter()
        .filter_map(|r| r.key_id.as_deref())
        .chain(networks.iter().map(|n| &*n.key_id))
        .filter(|id| is_issued_key_id(id))
        .collect();
    ids.into_iter().collect()
}

fn is_issued_key_id(id: &str) -> bool {
    id.len() == 26 && id.starts_with("key_") && id.bytes().skip(4).all(|b| b.is_ascii_alphanumeric())
}

/// Folds checked rows into what the store adds: rows outside `[now − 24 h, now + 5 min]`
/// and rows of unknown keys are counted, not stored; rows repeated in the batch merge.
pub(crate) fn fold(
    rows: &[AggregateRow],
    networks: &[ClientNetwork],
    known: &HashSet<String>,
    now: OffsetDateTime,
) -> Folded {
    let now_s = now.unix_timestamp();
    let oldest = now_s - MAX_USAGE_AGE.as_secs() as i64;
    let oldest = oldest - oldest.rem_euclid(60);
    let newest = now_s + MAX_USAGE_AHEAD.as_secs() as i64;
    let in_window = |minute: i64| (oldest..=newest).contains(&minute);
    let mut f = Folded::default();
    for row in rows.iter().filter(|r| r.requests > 0) {
        // A route or method no report could show is one row refused, not the batch: one
        // odd request must not cost every key its interval's usage.
        if !in_window(row.minute) || !is_text(&row.route, MAX_USAGE_ROUTE_LEN) || !is_text(&row.method, MAX_METHOD_LEN)
        {
            f.refused_rows += 1;
            f.refused = f.refused.saturating_add(row.requests);
            continue;
        }
        let Some(key_id) = row.key_id.as_deref() else {
            f.unattributed = f.unattributed.saturating_add(row.requests);
            continue;
        };
        if !known.contains(key_id) {
            f.unknown = f.unknown.saturating_add(row.requests);
            continue;
        }
        let tally = Tally::of_row(row);
        let hour = row.minute - row.minute.rem_euclid(3600);
        let route_key = UsageKey {
            key_id: key_id.to_owned(),
            at: hour,
            route: row.route.to_string(),
            method: row.method.to_string(),
            outcome: row.outcome.as_str().to_owned(),
        };
        f.delta.routes.entry(route_key).or_default().merge(&tally);
        f.delta.minutes.entry(UsageKey::of_key(key_id, row.minute)).or_default().merge(&tally);
        // The last request is inside its row's minute, whatever the row claims.
        let last = row.last_at_ms.clamp(row.minute * 1000, row.minute * 1000 + 59_999);
        let used = f.delta.last_used.entry(key_id.to_owned()).or_insert(last);
        *used = (*used).max(last);
    }
    let mut seen: HashMap<(&str, &str), i64> = HashMap::new();
    for n in networks.iter().filter(|n| in_window(n.minute) && known.contains(&*n.key_id)) {
        let first = seen.entry((&n.key_id, &n.network)).or_insert(n.minute);
        *first = (*first).min(n.minute);
    }
    f.networks = seen
        .into_iter()
        .filter_map(|((k, n), m)| Some((k.to_owned(), n.to_owned(), OffsetDateTime::from_unix_timestamp(m).ok()?)))
        .collect();
    f.networks.sort();
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Outcome;

    fn row(minute: i64, key: Option<&str>, route: &str, outcome: Outcome, latencies_us: &[u64]) -> AggregateRow {
        let mut latency = LatencyHistogram::new();
        let mut status = StatusCounts::default();
        for &us in latencies_us {
            latency.record(Duration::from_micros(us));
            status.add(if outcome.is_allowed() { 200 } else { 401 });
        }
        AggregateRow {
            minute,
            key_id: key.map(Arc::from),
            route: route.into(),
            method: "GET".into(),
            outcome,
            requests: latencies_us.len() as u64,
            status,
            latency,
            last_at_ms: minute * 1000 + 5_000,
        }
    }

    const KEY: &str = "key_0123456789abcdefghijkl";

    #[test]
    fn rows_fold_per_minute_and_per_route_and_repeats_merge() {
        let now = OffsetDateTime::from_unix_timestamp(1_764_590_000).unwrap();
        let m = 1_764_589_980;
        let rows = [
            row(m, Some(KEY), "/a", Outcome::Allowed, &[100, 200]),
            row(m, Some(KEY), "/a", Outcome::Allowed, &[300]),
            row(m, Some(KEY), "/b", Outcome::NotFound, &[50]),
            row(m - 60, Some(KEY), "/a", Outcome::Allowed, &[10]),
            row(m, None, "/a", Outcome::NoKey, &[1, 1]),
            row(m, Some("key_0123456789abcdefghijkX"), "/a", Outcome::Allowed, &[1]),
            row(m - 2 * 86_400, Some(KEY), "/a", Outcome::Allowed, &[1, 1, 1]),
            row(m + 3600, Some(KEY), "/a", Outcome::Allowed, &[1, 1, 1, 1]),
        ];
        let known: HashSet<String> = [KEY.to_owned()].into();
        let f = fold(&rows, &[], &known, now);
        assert_eq!(f.delta.requests(), 5);
        let this = &f.delta.minutes[&UsageKey::of_key(KEY, m)];
        assert_eq!((this.requests, this.allowed, this.denied, this.latency_us_max), (4, 3, 1, 300));
        assert_eq!(f.delta.routes.len(), 2, "/a allowed and /b not_found in one hour");
        let a = f.delta.routes.iter().find(|(k, _)| k.route == "/a").unwrap().1;
        assert_eq!((a.requests, a.latency.count(), a.latency_us_sum), (4, 4, 610));
        assert_eq!((f.unattributed, f.unknown, f.refused, f.refused_rows), (2, 1, 7, 2));
        assert_eq!(f.delta.last_used[KEY], m * 1000 + 5_000);
    }

    #[test]
    fn rows_that_do_not_add_up_are_refused() {
        let mut r = row(60, Some(KEY), "/a", Outcome::Allowed, &[1, 2]);
        let batch = |r: AggregateRow| AggregateBatch {
            batch_id: "0123456789abcdef0123456789abcdef".into(),
            rows: vec![r],
            networks: vec![],
            dropped: 0,
            overflowed: 0,
            networks_dropped: 0,
        };
        assert!(check_aggregate(&batch(r.clone())).is_ok());
        r.requests = 3;
        let e = check_aggregate(&batch(r.clone())).unwrap_err();
        assert!(e.to_string().contains("rows[0]: `requests` (3) must equal `latency.count` (2)"), "{e}");
        r.requests = 2;
        r.minute = 61;
        assert!(check_aggregate(&batch(r)).unwrap_err().to_string().contains("multiple of 60"));
    }

    #[test]
    fn networks_must_be_written_as_network_of_writes_them() {
        for ok in ["10.1.2.0/24", "2001:db8:1::/48", "0:0:0::/48"] {
            assert!(is_network(ok), "{ok}");
        }
        for bad in ["10.1.2.3/24", "10.1.2.0", "10.1.2.0/16", "::ffff:10.1.2.0/48", "x/24", ""] {
            assert!(!is_network(bad), "{bad}");
        }
    }

    #[test]
    fn issued_key_ids() {
        assert!(is_issued_key_id(KEY));
        for bad in ["key_x", "kex_0123456789abcdefghijkl", "key_0123456789abcdefghij-l", "key_0123456789abcdefghijklm"]
        {
            assert!(!is_issued_key_id(bad), "{bad}");
        }
    }
}
