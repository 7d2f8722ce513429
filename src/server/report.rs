//! `GET /v1/usage`: the usage of a key, or the sum over an owner's keys, in buckets of a
//! minute, an hour or a day, or per route, method and outcome.

use std::collections::BTreeMap;
use std::time::Duration;

use time::OffsetDateTime;

use super::error::ApiError;
use super::model::{UsageBucket, UsageGroupBy, UsageReport};
use super::store::{ReadKind, Store, StoreError, Tally, UsageOf, UsageRead, bucket_from};

/// Most buckets one `GET /v1/usage` answer holds: 10 080 (7 days of minutes).
pub const MAX_USAGE_BUCKETS: u64 = 7 * 24 * 60;
/// Longest span one `GET /v1/usage` covers: 400 days.
pub const MAX_USAGE_SPAN: Duration = Duration::from_secs(400 * 86_400);
/// Most stored rows one `GET /v1/usage` reads: 1 000 000 (an owner with 100 keys busy
/// every minute for a week); a span holding more is refused.
pub const MAX_USAGE_ROWS: u64 = 1_000_000;
/// Most (route, method, outcome) groups one answer grouped by route holds.
pub const MAX_USAGE_ROUTES: usize = 10_000;
/// The span `GET /v1/usage` covers without `since`: the 24 hours before `until`.
const DEFAULT_SPAN: time::Duration = time::Duration::hours(24);

/// Whose usage, as the query named it.
#[derive(Debug, Clone)]
pub(crate) enum Whose {
    Key(String),
    Owner(String),
}

/// The report for `whose` over `[since, until)` (defaults: the 24 hours before now),
/// the span widened to whole buckets.
pub(crate) async fn usage_report(
    store: &Store,
    whose: Whose,
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
    group_by: UsageGroupBy,
) -> Result<UsageReport, ApiError> {
    let until = until.unwrap_or_else(OffsetDateTime::now_utc);
    let since = since.unwrap_or(until - DEFAULT_SPAN);
    if since >= until {
        return Err(ApiError::invalid("invalid_query", "`since` must be before `until`"));
    }
    let size: i64 = match group_by {
        UsageGroupBy::Minute => 60,
        UsageGroupBy::Hour | UsageGroupBy::Route => 3600,
        UsageGroupBy::Day => 86_400,
    };
    let from = floor(since.unix_timestamp(), size);
    // Rounded up to whole buckets, a fraction of a second counting as the second it starts.
    let until_s = until.unix_timestamp() + i64::from(until.nanosecond() > 0);
    let to = floor(until_s + size - 1, size);
    let span = (to - from) as u64;
    if span > MAX_USAGE_SPAN.as_secs() {
        return Err(ApiError::invalid("invalid_query", "a usage query spans at most 400 days"));
    }
    if group_by != UsageGroupBy::Route && span / size as u64 > MAX_USAGE_BUCKETS {
        return Err(ApiError::invalid(
            "invalid_query",
            format!(
                "a usage query holds at most {MAX_USAGE_BUCKETS} buckets: shorten the span or group by a longer \
                 bucket (`group_by=hour` or `day`)"
            ),
        ));
    }
    let kind = match group_by {
        UsageGroupBy::Minute => ReadKind::Minutes,
        UsageGroupBy::Hour | UsageGroupBy::Day => ReadKind::Hours,
        UsageGroupBy::Route => ReadKind::Routes,
    };
    let of = match &whose {
        Whose::Key(k) => UsageOf::Key(k),
        Whose::Owner(o) => UsageOf::Owner(o),
    };
    let read = UsageRead { of, kind, from, to, max_rows: MAX_USAGE_ROWS };

    let mut times: BTreeMap<i64, Tally> = BTreeMap::new();
    let mut routes: BTreeMap<(String, String, String), Tally> = BTreeMap::new();
    let mut too_many_routes = false;
    let rows = store
        .read_usage(&read, |row| {
            match row.route {
                Some(route) if routes.len() < MAX_USAGE_ROUTES || routes.contains_key(&route) => {
                    routes.entry(route).or_default().merge(&row.tally);
                }
                Some(_) => too_many_routes = true,
                None => times.entry(floor(row.at, size)).or_default().merge(&row.tally),
            }
            Ok(())
        })
        .await?;
    if rows > MAX_USAGE_ROWS {
        return Err(ApiError::invalid(
            "usage_query_too_large",
            format!("the span holds more than {MAX_USAGE_ROWS} usage rows: ask for a shorter one"),
        ));
    }
    if too_many_routes {
        return Err(ApiError::invalid(
            "usage_query_too_large",
            format!("the span holds more than {MAX_USAGE_ROUTES} routes, methods and outcomes: ask for a shorter one"),
        ));
    }
    let buckets: Result<Vec<UsageBucket>, StoreError> = if group_by == UsageGroupBy::Route {
        routes.into_iter().map(|(route, tally)| bucket_from(from, Some(route), &tally)).collect()
    } else {
        times.iter().map(|(at, tally)| bucket_from(*at, None, tally)).collect()
    };
    let at = |s: i64| OffsetDateTime::from_unix_timestamp(s).ok();
    let (key_id, owner) = match whose {
        Whose::Key(k) => (Some(k), None),
        Whose::Owner(o) => (None, Some(o)),
    };
    Ok(UsageReport { key_id, owner, group_by, since: at(from), until: at(to), buckets: buckets? })
}

fn floor(t: i64, size: i64) -> i64 {
    t - t.rem_euclid(size)
}
