//! Cutting one interval into batches a key service takes.
//!
//! The reference key service takes at most 16 MiB, 20 000 rows and 20 000 networks per
//! batch. An interval usually encodes to a few MB, but rows whose latencies spread over
//! many buckets can make a full table several times that; sent whole, the batch would be
//! refused (413) and the interval lost. Such an interval goes out as several batches,
//! each with an id of its own, each applied once.

use std::io;

use crate::usage::{AggregateRow, ClientNetwork};

/// Largest encoded batch sent: half the reference key service's limit, leaving room for
/// the networks and the envelope.
pub(super) const MAX_BATCH_BYTES: usize = 8 << 20;
/// Most rows in one batch (the reference key service's limit).
pub(super) const MAX_BATCH_ROWS: usize = 20_000;
/// Most networks in one batch (the reference key service's limit).
pub(super) const MAX_BATCH_NETWORKS: usize = 20_000;

/// One batch's share of an interval.
pub(super) struct Part {
    pub(super) rows: Vec<AggregateRow>,
    pub(super) networks: Vec<ClientNetwork>,
}

/// Splits an interval's rows and networks into parts within the limits above; one part
/// when it fits, which is the usual case (and then nothing is encoded here).
pub(super) fn split(rows: Vec<AggregateRow>, mut networks: Vec<ClientNetwork>) -> Vec<Part> {
    let bound: usize = rows.iter().map(upper_bound).sum();
    if bound <= MAX_BATCH_BYTES && rows.len() <= MAX_BATCH_ROWS && networks.len() <= MAX_BATCH_NETWORKS {
        return vec![Part { rows, networks }];
    }
    let mut parts = Vec::new();
    let mut current = Part { rows: Vec::new(), networks: Vec::new() };
    let mut bytes = 0;
    for row in rows {
        let size = encoded_len(&row);
        if !current.rows.is_empty() && (bytes + size > MAX_BATCH_BYTES || current.rows.len() == MAX_BATCH_ROWS) {
            parts.push(std::mem::replace(&mut current, Part { rows: Vec::new(), networks: Vec::new() }));
            bytes = 0;
        }
        bytes += size;
        current.rows.push(row);
    }
    parts.push(current);
    // Networks are small (under 100 bytes each): spread them by count alone.
    let mut i = 0;
    while !networks.is_empty() {
        if i == parts.len() {
            parts.push(Part { rows: Vec::new(), networks: Vec::new() });
        }
        let take = networks.len().min(MAX_BATCH_NETWORKS);
        parts[i].networks = networks.drain(..take).collect();
        i += 1;
    }
    parts
}

/// Never less than the row's JSON: every number at its widest, every string byte
/// escaped at its widest (`\u00XX`), every bucket `[index,count],` at its widest.
fn upper_bound(row: &AggregateRow) -> usize {
    let strings = row.key_id.as_deref().map_or(0, str::len) + row.route.len() + row.method.len();
    400 + 6 * strings + 18 * row.latency.buckets().count()
}

fn encoded_len(row: &AggregateRow) -> usize {
    let mut count = Count(0);
    // Encoding into a counter cannot fail.
    let _ = serde_json::to_writer(&mut count, row);
    count.0 + 1 // the comma between rows
}

struct Count(usize);

impl io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Outcome;
    use crate::usage::{LatencyHistogram, StatusCounts};

    fn row(i: usize, buckets: u64) -> AggregateRow {
        let mut latency = LatencyHistogram::new();
        let mut status = StatusCounts::default();
        // One latency in each of the first `buckets` buckets, as a jittery route spreads.
        for b in 0..buckets {
            let us = if b < 8 { b } else { (1 << (b / 8 + 2)) + (b % 8) * (1 << (b / 8 - 1)) };
            latency.record(std::time::Duration::from_micros(us));
            status.add(200);
        }
        AggregateRow {
            minute: 1_764_585_600,
            key_id: Some(format!("key_{i:022}").into()),
            route: format!("/route/{i}").into(),
            method: "GET".into(),
            outcome: Outcome::Allowed,
            requests: latency.count(),
            status,
            latency,
            last_at_ms: 1_764_585_600_000,
        }
    }

    fn network(i: usize) -> ClientNetwork {
        ClientNetwork { key_id: "key_a".into(), network: format!("10.{}.{}.0/24", i / 256 % 256, i % 256), minute: 0 }
    }

    #[test]
    fn an_interval_that_fits_is_one_part_untouched() {
        let rows: Vec<_> = (0..100).map(|i| row(i, 20)).collect();
        let parts = split(rows.clone(), vec![network(1)]);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].rows, rows);
        assert_eq!(parts[0].networks.len(), 1);
    }

    #[test]
    fn a_wide_interval_splits_within_every_limit_and_keeps_every_row() {
        let rows: Vec<_> = (0..11_000).map(|i| row(i, 208)).collect();
        assert_eq!(rows[0].latency.buckets().count(), 208);
        let one_row = serde_json::to_vec(&rows[0]).unwrap().len();
        assert!(one_row * rows.len() > 16 << 20, "the test interval must be too big for one batch");
        let requests: u64 = rows.iter().map(|r| r.requests).sum();
        let networks: Vec<_> = (0..25_000).map(network).collect();
        let parts = split(rows, networks);
        assert!(parts.len() > 2);
        for part in &parts {
            assert!(serde_json::to_vec(&part.rows).unwrap().len() <= MAX_BATCH_BYTES);
            assert!(part.rows.len() <= MAX_BATCH_ROWS && part.networks.len() <= MAX_BATCH_NETWORKS);
        }
        assert_eq!(parts.iter().flat_map(|p| &p.rows).map(|r| r.requests).sum::<u64>(), requests);
        assert_eq!(parts.iter().map(|p| p.networks.len()).sum::<usize>(), 25_000);
    }

    #[test]
    fn the_bound_is_never_below_the_encoding() {
        for buckets in [0, 1, 30, 208] {
            let r = row(7, buckets);
            assert!(upper_bound(&r) >= encoded_len(&r), "{buckets} buckets");
        }
    }
}
