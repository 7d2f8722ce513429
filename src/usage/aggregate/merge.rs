//! Turning the shards' cut tables into one batch's rows and networks.

use std::sync::Arc;

use hashbrown::HashTable;

use super::table::{Clock, KeyNetworks, Row, Tables};
use crate::usage::NetworkPrefix;
use crate::usage::{AggregateRow, ClientNetwork};

/// Keeps its tables from one cut to the next, so a steady interval allocates only the
/// batch it hands out.
pub(super) struct Merger {
    rows: HashTable<(u64, AggregateRow)>,
    networks: HashTable<KeyNetworks>,
    max_networks_per_key: usize,
}

/// One interval, merged.
pub(super) struct Merged {
    pub(super) rows: Vec<AggregateRow>,
    pub(super) networks: Vec<ClientNetwork>,
    /// Networks over a key's cap once the shards' sets were put together.
    pub(super) networks_dropped: u64,
}

fn same_row(a: &AggregateRow, b: &Row) -> bool {
    a.minute == b.minute && a.outcome == b.outcome && a.key_id == b.key_id && a.route == b.route && a.method == b.method
}

fn into_aggregate(row: Row, last_at_ms: i64) -> AggregateRow {
    AggregateRow {
        minute: row.minute,
        key_id: row.key_id,
        route: row.route,
        method: row.method,
        outcome: row.outcome,
        requests: row.requests,
        status: row.status,
        latency: row.latency,
        last_at_ms,
    }
}

/// Unix milliseconds of the row's last request, kept inside the row's minute should the
/// wall clock have stepped since.
fn last_at_ms(row: &Row, clock: &Clock) -> i64 {
    clock.unix_ms(row.last_at).clamp(row.minute * 1_000, row.minute * 1_000 + 59_999)
}

impl Merger {
    pub(super) fn new(max_networks_per_key: usize) -> Self {
        Self { rows: HashTable::new(), networks: HashTable::new(), max_networks_per_key }
    }

    /// Empties every table in `cut` (keeping about as much room as each used) into one
    /// set of rows, where a row recorded in several shards appears once.
    pub(super) fn merge(&mut self, cut: &mut [Tables], clock: &Clock) -> Merged {
        let mut networks_dropped = 0;
        for tables in cut.iter_mut() {
            let used = tables.rows.len();
            for row in tables.rows.drain() {
                let hash = row.hash;
                let last = last_at_ms(&row, clock);
                match self.rows.find_entry(hash, |(h, a)| *h == hash && same_row(a, &row)) {
                    Ok(entry) => {
                        let merged = &mut entry.into_mut().1;
                        merged.requests = merged.requests.saturating_add(row.requests);
                        merged.status.merge(&row.status);
                        merged.latency.merge(&row.latency);
                        merged.last_at_ms = merged.last_at_ms.max(last);
                    }
                    Err(absent) => {
                        absent.into_table().insert_unique(hash, (hash, into_aggregate(row, last)), |(h, _)| *h);
                    }
                }
            }
            tables.rows.shrink_to(used, |row| row.hash);

            let used = tables.networks.len();
            for key in tables.networks.drain() {
                let hash = key.hash;
                match self.networks.find_entry(hash, |k| k.key_id == key.key_id) {
                    Ok(entry) => {
                        let merged = entry.into_mut();
                        for (network, minute) in key.networks {
                            if let Some((_, first)) = merged.networks.iter_mut().find(|(n, _)| *n == network) {
                                *first = (*first).min(minute);
                            } else if merged.networks.len() < self.max_networks_per_key {
                                merged.networks.push((network, minute));
                            } else {
                                networks_dropped += 1;
                            }
                        }
                    }
                    Err(absent) => {
                        absent.into_table().insert_unique(hash, key, |k| k.hash);
                    }
                }
            }
            tables.networks.shrink_to(used, |k| k.hash);
        }

        let rows: Vec<AggregateRow> = self.rows.drain().map(|(_, row)| row).collect();
        self.rows.shrink_to(rows.len(), |(h, _)| *h);
        let mut networks = Vec::new();
        let keys = self.networks.len();
        for key in self.networks.drain() {
            networks
                .extend(key.networks.into_iter().map(|(network, minute)| client_network(&key.key_id, network, minute)));
        }
        self.networks.shrink_to(keys, |k| k.hash);
        Merged { rows, networks, networks_dropped }
    }
}

fn client_network(key_id: &Arc<str>, network: NetworkPrefix, minute: i64) -> ClientNetwork {
    ClientNetwork { key_id: key_id.clone(), network: network.to_string(), minute }
}
