//! `POST /v1/usage`: folding a batch of [`UsageEvent`]s into per-key, per-minute rows.
//!
//! The batch is aggregated in memory first, so a batch of 1 000 events for one key
//! costs one upsert, and the upserts add to what is stored (never read-modify-write),
//! so concurrent batches for the same key and minute add up exactly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use time::OffsetDateTime;

use super::store::MinuteRow;
use crate::usage::UsageEvent;

/// What one batch adds to the store.
#[derive(Debug, Default)]
pub(crate) struct Folded {
    pub rows: Vec<MinuteRow>,
    pub last_used: Vec<(String, OffsetDateTime)>,
    /// `(key_id, network)` pairs seen, with the first time in the batch.
    pub networks: Vec<(String, String, OffsetDateTime)>,
    /// Events without a key id (no key, malformed): counted, not stored.
    pub unattributed: u64,
}

impl Folded {
    /// `(key_id, minute)` pairs the batch touched.
    pub fn touched(&self) -> BTreeSet<(String, i64)> {
        self.rows.iter().map(|r| (r.key_id.clone(), r.minute)).collect()
    }
}

pub(crate) fn fold(events: &[UsageEvent]) -> Folded {
    let mut rows: BTreeMap<(&str, i64), MinuteRow> = BTreeMap::new();
    let mut last_used: HashMap<&str, OffsetDateTime> = HashMap::new();
    let mut networks: HashMap<(&str, String), OffsetDateTime> = HashMap::new();
    let mut unattributed = 0;
    for ev in events {
        let Some(key_id) = ev.key_id.as_deref() else {
            unattributed += 1;
            continue;
        };
        let ts = ev.at.unix_timestamp();
        let minute = ts - ts.rem_euclid(60);
        let row = rows.entry((key_id, minute)).or_insert_with(|| MinuteRow {
            key_id: key_id.to_owned(),
            minute,
            ..MinuteRow::default()
        });
        row.requests += 1;
        if ev.outcome.is_allowed() {
            row.allowed += 1;
        } else {
            row.denied += 1;
        }
        match ev.status {
            200..=299 => row.status_2xx += 1,
            400..=499 => row.status_4xx += 1,
            500..=599 => row.status_5xx += 1,
            _ => {}
        }
        let us = i64::try_from(ev.latency.as_micros()).unwrap_or(i64::MAX);
        row.latency_us_sum = row.latency_us_sum.saturating_add(us);
        row.latency_us_max = row.latency_us_max.max(us);
        let last = last_used.entry(key_id).or_insert(ev.at);
        *last = (*last).max(ev.at);
        if let Some(ip) = ev.client_ip {
            networks.entry((key_id, network_of(ip))).and_modify(|t| *t = (*t).min(ev.at)).or_insert(ev.at);
        }
    }
    Folded {
        rows: rows.into_values().collect(),
        last_used: last_used.into_iter().map(|(k, t)| (k.to_owned(), t)).collect(),
        networks: networks.into_iter().map(|((k, n), t)| (k.to_owned(), n, t)).collect(),
        unattributed,
    }
}

/// The client network an address belongs to: its /24 (IPv4) or /48 (IPv6).
pub fn network_of(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        assert_eq!(network_of("10.1.2.3".parse().unwrap()), "10.1.2.0/24");
        assert_eq!(network_of("::ffff:10.1.2.3".parse().unwrap()), "10.1.2.0/24");
        assert_eq!(network_of("2001:db8:1:2::5".parse().unwrap()), "2001:db8:1::/48");
    }
}
