//! What a key may spend: named rate limits and credits, as the key service states them.
//!
//! A key (and an owner, for all of its keys together) may carry up to
//! [`MAX_LIMITS`] named [`Limit`]s (`requests: 100 per 1 s, burst 20`,
//! `reports: 1 000 per 1 h`) and [`Credits`]: a count that requests spend, with an
//! optional [`Refill`]. Which of them a route draws from, and how much, is its
//! [`Cost`](crate::Cost). These types are only the model; the layer enforces it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::{Date, Month, OffsetDateTime, Time};

/// Most named limits on one key or one owner.
pub const MAX_LIMITS: usize = 16;
/// Longest limit name, in bytes (names are `[a-z0-9_-]{1,32}`).
pub const MAX_LIMIT_NAME_LEN: usize = 32;
/// Longest limit period: 31 days.
pub const MAX_LIMIT_PERIOD_S: u64 = 31 * 24 * 3600;
/// Largest limit, burst, credit count or refill amount: 10^15.
pub const MAX_QUOTA_AMOUNT: u64 = 1_000_000_000_000_000;
/// Longest `every` refill interval: 366 days.
pub const MAX_REFILL_INTERVAL_S: u64 = 366 * 24 * 3600;
/// The limit the single `ratelimit` field of older answers and requests stands for.
pub const REQUESTS: &str = "requests";

/// A named rate limit: `limit` requests' worth of cost per `period_s`, of which up to
/// `burst` (default `limit`) may be spent at once. Enforced with GCRA: the budget
/// comes back continuously, one unit every `period_s / limit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// `[a-z0-9_-]{1,32}`; routes name the limits they draw from. `requests` is the one
    /// every route draws from by default.
    #[cfg_attr(feature = "server", schema(value_type = String))]
    pub name: Arc<str>,
    /// Units allowed per period (1 to 10^15).
    pub limit: u64,
    /// The period in seconds (1 to 31 days).
    pub period_s: u64,
    /// Most units spent at once; default (`null`) `limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

impl Limit {
    /// `limit` per `period_s`, burst `limit`.
    pub fn new(name: impl Into<Arc<str>>, limit: u64, period_s: u64) -> Self {
        Self { name: name.into(), limit, period_s, burst: None }
    }

    /// With `burst` units at most at once.
    #[must_use]
    pub fn burst(mut self, burst: u64) -> Self {
        self.burst = Some(burst);
        self
    }

    /// The burst in effect: `burst`, or `limit` when unset.
    pub fn effective_burst(&self) -> u64 {
        self.burst.unwrap_or(self.limit)
    }

    /// Why this limit is not acceptable, if it is not.
    pub fn problem(&self) -> Option<String> {
        if let Some(why) = name_problem(&self.name) {
            return Some(why);
        }
        let name = &self.name;
        if !(1..=MAX_QUOTA_AMOUNT).contains(&self.limit) {
            return Some(format!("limit `{name}`: `limit` must be between 1 and {MAX_QUOTA_AMOUNT}"));
        }
        if !(1..=MAX_LIMIT_PERIOD_S).contains(&self.period_s) {
            return Some(format!("limit `{name}`: `period_s` must be between 1 and {MAX_LIMIT_PERIOD_S} (31 days)"));
        }
        if self.burst.is_some_and(|b| !(1..=MAX_QUOTA_AMOUNT).contains(&b)) {
            return Some(format!("limit `{name}`: `burst` must be between 1 and {MAX_QUOTA_AMOUNT}"));
        }
        None
    }
}

/// Why `name` is not a limit name (`[a-z0-9_-]{1,32}`), if it is not.
pub fn name_problem(name: &str) -> Option<String> {
    let ok = (1..=MAX_LIMIT_NAME_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    (!ok).then(|| {
        let shown: String = name.chars().take(MAX_LIMIT_NAME_LEN).filter(|c| !c.is_control()).collect();
        format!("limit name `{shown}` must match [a-z0-9_-]{{1,{MAX_LIMIT_NAME_LEN}}}")
    })
}

/// Why this list of limits is not acceptable (too many, a bad one, a name twice).
pub fn limits_problem(limits: &[Limit]) -> Option<String> {
    if limits.len() > MAX_LIMITS {
        return Some(format!("at most {MAX_LIMITS} limits, not {}", limits.len()));
    }
    for (i, l) in limits.iter().enumerate() {
        if let Some(why) = l.problem() {
            return Some(why);
        }
        if limits[..i].iter().any(|o| o.name == l.name) {
            return Some(format!("limit `{}` is named twice", l.name));
        }
    }
    None
}

/// Credits: a count requests spend (a route's [`Cost`](crate::Cost) says how much),
/// refused with 429 `usage_exceeded` once spent, with an optional [`Refill`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Credits {
    /// Credits left (0 to 10^15).
    pub remaining: u64,
    /// How they come back; default (`null`) never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill: Option<Refill>,
}

impl Credits {
    /// Why these credits are not acceptable, if they are not.
    pub fn problem(&self) -> Option<String> {
        if self.remaining > MAX_QUOTA_AMOUNT {
            return Some(format!("`credits.remaining` must be at most {MAX_QUOTA_AMOUNT}"));
        }
        self.refill.as_ref().and_then(Refill::problem)
    }
}

/// When credits come back: at each refill time, `remaining` is set to `amount` (unspent
/// credits do not add up). Times are UTC and the same for every instance: multiples of
/// `interval_s` since the Unix epoch, midnight, or midnight of day `day` of the month
/// (the month's last day when it is shorter: day 31 is April 30th).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Refill {
    /// Every `interval_s` seconds (1 s to 366 days).
    Every {
        /// Seconds between refills.
        interval_s: u64,
        /// What `remaining` is set to.
        amount: u64,
    },
    /// Every day at 00:00 UTC.
    Daily {
        /// What `remaining` is set to.
        amount: u64,
    },
    /// On day `day` (1 to 31) of every month at 00:00 UTC.
    Monthly {
        /// Day of the month; clamped to the month's last day.
        day: u8,
        /// What `remaining` is set to.
        amount: u64,
    },
}

impl Refill {
    /// What `remaining` is set to at each refill.
    pub fn amount(&self) -> u64 {
        match *self {
            Self::Every { amount, .. } | Self::Daily { amount } | Self::Monthly { amount, .. } => amount,
        }
    }

    /// Why this refill is not acceptable, if it is not.
    pub fn problem(&self) -> Option<String> {
        if self.amount() > MAX_QUOTA_AMOUNT {
            return Some(format!("refill `amount` must be at most {MAX_QUOTA_AMOUNT}"));
        }
        match *self {
            Self::Every { interval_s, .. } if !(1..=MAX_REFILL_INTERVAL_S).contains(&interval_s) => {
                Some(format!("refill `interval_s` must be between 1 and {MAX_REFILL_INTERVAL_S} (366 days)"))
            }
            Self::Monthly { day, .. } if !(1..=31).contains(&day) => {
                Some("refill `day` must be between 1 and 31".to_owned())
            }
            _ => None,
        }
    }

    /// The first refill time strictly after `t`.
    pub fn next_after(&self, t: OffsetDateTime) -> OffsetDateTime {
        match *self {
            Self::Every { interval_s, .. } => {
                let step = interval_s.clamp(1, MAX_REFILL_INTERVAL_S) as i64;
                let s = t.unix_timestamp();
                let next = (s.div_euclid(step) + 1).saturating_mul(step);
                OffsetDateTime::from_unix_timestamp(next).unwrap_or(t)
            }
            Self::Daily { .. } => {
                let next = t.date().next_day().unwrap_or(t.date());
                next.with_time(Time::MIDNIGHT).assume_utc()
            }
            Self::Monthly { day, .. } => {
                let this = month_day(t.year(), t.month(), day);
                if this > t {
                    return this;
                }
                let (y, m) = if t.month() == Month::December {
                    (t.year() + 1, Month::January)
                } else {
                    (t.year(), t.month().next())
                };
                month_day(y, m, day)
            }
        }
    }
}

/// `N`, `Ns`, `Nm`, `Nh` or `Nd`, in seconds.
fn parse_seconds(s: &str) -> Option<u64> {
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.parse::<u64>().ok()?.checked_mul(mult)
}

/// `N` with optional `_` or `,`-free digit groups (`10000`, `10_000`).
fn parse_amount(s: &str) -> Option<u64> {
    s.replace('_', "").parse().ok()
}

/// A limit written `NAME=LIMIT/PERIOD[,burst=N]`: `requests=100/1s,burst=20`,
/// `reports=1000/1h` (periods in `s`, `m`, `h` or `d`; a bare number is seconds). The
/// values are checked as the key service checks them.
///
/// ```
/// use keygate::quota::Limit;
///
/// let l: Limit = "requests=100/1s,burst=20".parse().unwrap();
/// assert_eq!(l, Limit::new("requests", 100, 1).burst(20));
/// assert!("requests=0/1s".parse::<Limit>().is_err());
/// ```
impl std::str::FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a limit: NAME=LIMIT/PERIOD[,burst=N], such as requests=100/1s,burst=20");
        let (name, rest) = s.split_once('=').ok_or_else(bad)?;
        let (rate, burst) = match rest.split_once(',') {
            Some((rate, opt)) => {
                let n = opt.strip_prefix("burst=").ok_or_else(bad)?;
                (rate, Some(parse_amount(n).ok_or_else(bad)?))
            }
            None => (rest, None),
        };
        let (limit, period) = rate.split_once('/').ok_or_else(bad)?;
        let limit = Limit {
            name: Arc::from(name.trim()),
            limit: parse_amount(limit.trim()).ok_or_else(bad)?,
            period_s: parse_seconds(period.trim()).ok_or_else(bad)?,
            burst,
        };
        match limit.problem() {
            Some(why) => Err(why),
            None => Ok(limit),
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}/{}s", self.name, self.limit, self.period_s)?;
        match self.burst {
            Some(b) => write!(f, ",burst={b}"),
            None => Ok(()),
        }
    }
}

/// A refill written `every:PERIOD:AMOUNT` (`every:3600s:500`), `daily:AMOUNT`
/// (`daily:1000`) or `monthly:AMOUNT@DAY` (`monthly:10000@1`).
///
/// ```
/// use keygate::quota::Refill;
///
/// assert_eq!("monthly:10000@1".parse(), Ok(Refill::Monthly { day: 1, amount: 10_000 }));
/// assert_eq!("every:1h:500".parse(), Ok(Refill::Every { interval_s: 3600, amount: 500 }));
/// assert_eq!("daily:1000".parse(), Ok(Refill::Daily { amount: 1000 }));
/// ```
impl std::str::FromStr for Refill {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a refill: every:PERIOD:AMOUNT, daily:AMOUNT or monthly:AMOUNT@DAY");
        let refill = match s.split_once(':').ok_or_else(bad)? {
            ("every", rest) => {
                let (period, amount) = rest.split_once(':').ok_or_else(bad)?;
                Refill::Every {
                    interval_s: parse_seconds(period).ok_or_else(bad)?,
                    amount: parse_amount(amount).ok_or_else(bad)?,
                }
            }
            ("daily", amount) => Refill::Daily { amount: parse_amount(amount).ok_or_else(bad)? },
            ("monthly", rest) => {
                let (amount, day) = rest.split_once('@').ok_or_else(bad)?;
                Refill::Monthly { day: day.parse().map_err(|_| bad())?, amount: parse_amount(amount).ok_or_else(bad)? }
            }
            _ => return Err(bad()),
        };
        match refill.problem() {
            Some(why) => Err(why),
            None => Ok(refill),
        }
    }
}

impl std::fmt::Display for Refill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Every { interval_s, amount } => write!(f, "every:{interval_s}s:{amount}"),
            Self::Daily { amount } => write!(f, "daily:{amount}"),
            Self::Monthly { day, amount } => write!(f, "monthly:{amount}@{day}"),
        }
    }
}

impl std::fmt::Display for Credits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} remaining", self.remaining)?;
        match &self.refill {
            Some(r) => write!(f, ", refill {r}"),
            None => Ok(()),
        }
    }
}

/// Midnight UTC of `day` in that month, clamped to its last day.
fn month_day(year: i32, month: Month, day: u8) -> OffsetDateTime {
    let day = day.clamp(1, time::util::days_in_month(month, year));
    Date::from_calendar_date(year, month, day)
        .map(|d| d.with_time(Time::MIDNIGHT).assume_utc())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// What a principal may spend: its key's limits and credits, and its owner's, shared by
/// all of the owner's keys. Empty parts are empty; a principal with none of them holds
/// no `Quota` at all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Quota {
    /// The key's own limits.
    pub limits: Vec<Limit>,
    /// The key's own credits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<Credits>,
    /// The owner's limits, counted for all of the owner's keys together.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub owner_limits: Vec<Limit>,
    /// The owner's credits, spent by all of the owner's keys together.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_credits: Option<Credits>,
    /// Which setting of the key's credits `credits` is (the key service changes it when
    /// an operator sets them, not when it reconciles what was spent); `None` from key
    /// services that do not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits_revision: Option<u64>,
    /// The same for `owner_credits`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_credits_revision: Option<u64>,
}

impl Quota {
    /// Whether it limits nothing.
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty() && self.credits.is_none() && self.owner_limits.is_empty() && self.owner_credits.is_none()
    }

    /// The key's limit named `name`.
    pub fn limit(&self, name: &str) -> Option<&Limit> {
        self.limits.iter().find(|l| &*l.name == name)
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn monthly_refill_clamps_short_months() {
        let r = Refill::Monthly { day: 31, amount: 1 };
        assert_eq!(r.next_after(datetime!(2026-04-02 10:00 UTC)), datetime!(2026-04-30 0:00 UTC));
        assert_eq!(r.next_after(datetime!(2026-04-30 0:00 UTC)), datetime!(2026-05-31 0:00 UTC));
        assert_eq!(r.next_after(datetime!(2026-02-28 1:00 UTC)), datetime!(2026-03-31 0:00 UTC));
        assert_eq!(r.next_after(datetime!(2026-12-31 1:00 UTC)), datetime!(2027-01-31 0:00 UTC));
        let first = Refill::Monthly { day: 1, amount: 1 };
        assert_eq!(first.next_after(datetime!(2026-01-01 0:00 UTC)), datetime!(2026-02-01 0:00 UTC));
    }

    #[test]
    fn daily_and_every_refills_fall_on_fixed_times() {
        let d = Refill::Daily { amount: 1 };
        assert_eq!(d.next_after(datetime!(2026-03-05 23:59:59 UTC)), datetime!(2026-03-06 0:00 UTC));
        let e = Refill::Every { interval_s: 3600, amount: 1 };
        assert_eq!(e.next_after(datetime!(2026-03-05 10:00 UTC)), datetime!(2026-03-05 11:00 UTC));
        assert_eq!(e.next_after(datetime!(2026-03-05 10:59:59 UTC)), datetime!(2026-03-05 11:00 UTC));
    }

    #[test]
    fn written_forms_parse_and_print_back() {
        for text in ["requests=100/1s,burst=20", "reports=1000/3600s"] {
            let l: Limit = text.parse().unwrap();
            assert_eq!(l.to_string(), text);
        }
        assert_eq!("reports=1_000/1h".parse::<Limit>().unwrap(), Limit::new("reports", 1000, 3600));
        for bad in ["requests", "requests=100", "Requests=1/1s", "r=1/1x", "r=1/1s,bursts=2", "r=1/1s,burst=0"] {
            assert!(bad.parse::<Limit>().is_err(), "{bad}");
        }
        for text in ["every:3600s:500", "daily:1000", "monthly:10000@1"] {
            assert_eq!(text.parse::<Refill>().unwrap().to_string(), text);
        }
        for bad in ["weekly:1", "every:0s:1", "monthly:1@32", "monthly:1", "daily:x"] {
            assert!(bad.parse::<Refill>().is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_refuses_bad_names_and_numbers() {
        assert!(name_problem("reports_v2-x").is_none());
        for bad in ["", "Reports", "a b", "ü", &"x".repeat(33)] {
            assert!(name_problem(bad).is_some(), "{bad:?}");
        }
        assert!(Limit::new("r", 0, 1).problem().is_some());
        assert!(Limit::new("r", 1, 0).problem().is_some());
        assert!(Limit::new("r", 1, MAX_LIMIT_PERIOD_S + 1).problem().is_some());
        assert!(Limit::new("r", 1, 1).burst(0).problem().is_some());
        let many: Vec<Limit> = (0..=MAX_LIMITS).map(|i| Limit::new(format!("l{i}"), 1, 1)).collect();
        assert!(limits_problem(&many).is_some());
        assert!(limits_problem(&[Limit::new("a", 1, 1), Limit::new("a", 2, 1)]).is_some());
        assert!(Refill::Monthly { day: 0, amount: 1 }.problem().is_some());
        assert!(Refill::Every { interval_s: 0, amount: 1 }.problem().is_some());
    }
}
