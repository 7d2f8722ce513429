//! A key's usage over the last hour, day or week, as a chart, read through
//! `GET /v1/usage` (the aggregates the middlewares upload).

use http::Method;
use maud::{Markup, html};

use crate::server::console::chart::{Bar, usage_svg};
use crate::server::console::{Shared, Signed};
use crate::server::model::{KeyInfo, UsageReport};

/// The spans the key page offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Span {
    /// 60 one-minute buckets.
    Hour,
    /// 24 one-hour buckets.
    Day,
    /// 7 one-day buckets.
    Week,
}

impl Span {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            "week" => Some(Self::Week),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Week => "week",
        }
    }

    /// The window the chart of this span covers at `now` (Unix seconds): `[from, to)`,
    /// its buckets aligned and the current one included.
    pub(crate) fn window(self, now: i64) -> (i64, i64) {
        let (bucket_s, n, _) = self.buckets();
        let from = now - now.rem_euclid(bucket_s) - bucket_s * (n as i64 - 1);
        (from, from + bucket_s * n as i64)
    }

    /// (bucket length in seconds, buckets, `group_by`).
    fn buckets(self) -> (i64, usize, &'static str) {
        match self {
            Self::Hour => (60, 60, "minute"),
            Self::Day => (3600, 24, "hour"),
            Self::Week => (86_400, 7, "day"),
        }
    }
}

fn label(unix: i64, bucket_s: i64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(unix) else { return String::new() };
    if bucket_s >= 86_400 {
        format!("{}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
    } else {
        format!("{:02}:{:02} UTC", t.hour(), t.minute())
    }
}

pub(crate) async fn usage(console: &Shared, signed: &Signed, key: &KeyInfo, span: Span) -> Markup {
    let (bucket_s, n, group_by) = span.buckets();
    let (first, _) = span.window(time::OffsetDateTime::now_utc().unix_timestamp());
    let since = time::OffsetDateTime::from_unix_timestamp(first).ok().and_then(crate::server::text::rfc3339);
    let path = format!(
        "/v1/usage?key_id={}&group_by={group_by}&since={}",
        key.key_id,
        percent_encoding::utf8_percent_encode(&since.unwrap_or_default(), percent_encoding::NON_ALPHANUMERIC)
    );
    let report: Result<UsageReport, _> = console.call(&signed.token, Method::GET, &path, None).await;
    let body = match report {
        Ok(report) => {
            let mut bars = vec![Bar::default(); n];
            for b in &report.buckets {
                let i = (b.start.unix_timestamp() - first).div_euclid(bucket_s);
                if let Some(bar) = usize::try_from(i).ok().and_then(|i| bars.get_mut(i)) {
                    bar.allowed = bar.allowed.saturating_add(b.allowed);
                    bar.denied = bar.denied.saturating_add(b.denied);
                    bar.p99_ms = match (bar.p99_ms, b.latency_ms_p99) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        (a, b) => a.or(b),
                    };
                }
            }
            let last = first + bucket_s * (n as i64 - 1);
            usage_svg(&bars, &label(first, bucket_s), &label(last, bucket_s), &key.name)
        }
        Err(r) => html! { p.message.error role="alert" { (r.message) } },
    };
    let base = format!("/console/keys/{}", key.key_id);
    html! {
        h2 { "Usage" }
        nav.row aria-label="Usage span" {
            @for s in [Span::Hour, Span::Day, Span::Week] {
                @if s == span { strong { "last " (s.name()) } }
                @else { a href={ (base) "?usage=" (s.name()) } { "last " (s.name()) } }
            }
        }
        (body)
        p.legend.muted { span { "■ allowed (green)" } span { "■ denied (red)" } span { "— latency p99 (blue)" } }
    }
}
