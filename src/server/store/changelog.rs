//! The change log: every change that affects verification, numbered by the store, so
//! that an event stream can be resumed (`Last-Event-ID`). The statements every backend
//! runs alike, generated once per database type by [`change_log_queries!`] as
//! `shared`'s are.
//!
//! A change's rows are written in its transaction, just before the commit, under a lock
//! that the backend holds until the commit (SQLite's write lock, a PostgreSQL advisory
//! lock): ids are therefore handed out in commit order, and a reader that sees id `n`
//! has seen every id below it that will ever be committed.

use crate::server::events::{ChangeNote, KeyEvent};

/// Most rows one replay read returns: a resuming stream reads the log page by page.
pub(crate) const PAGE_ROWS: u32 = 500;

/// Default of how long the change log keeps a change: 24 hours.
pub const DEFAULT_CHANGE_LOG_RETENTION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Default of the most rows the change log keeps: 100 000 (about 10 MB).
pub const DEFAULT_CHANGE_LOG_MAX_ROWS: u64 = 100_000;

/// The ids the log holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LogBounds {
    /// The oldest id kept; `None` for an empty log.
    pub(crate) oldest: Option<u64>,
    /// The newest id ever handed out (0 for none yet).
    pub(crate) newest: u64,
}

/// What a note is in the log: (event, key id, reason), or `None` for the notes that are
/// not logged (alerts, token changes: they do not change a verdict).
pub(crate) fn row_of(note: &ChangeNote) -> Option<(&'static str, Option<&str>, Option<&str>)> {
    match note {
        ChangeNote::Key(kind, key_id) => Some((kind.name(), Some(key_id), None)),
        ChangeNote::Reset(reason) => Some((crate::wire::EventName::Reset.name(), None, Some(reason))),
        ChangeNote::Alert(_) | ChangeNote::Tokens => None,
    }
}

/// The note a row stands for. A row that cannot be read (written by a newer version)
/// is a `reset`: a lost invalidation is never ignored.
pub(crate) fn note_of(event: &str, key_id: Option<String>, reason: Option<String>) -> ChangeNote {
    if let (Some(kind), Some(key_id)) = (KeyEvent::parse(event), key_id) {
        return ChangeNote::Key(kind, key_id);
    }
    if event == crate::wire::EventName::Reset.name() {
        return ChangeNote::Reset(reason.unwrap_or_else(|| "bulk".into()));
    }
    ChangeNote::Reset("unreadable".into())
}

/// Defines the module `change_log_sql` for the `sqlx::Database` given.
macro_rules! change_log_queries {
    ($db:ty) => {
        pub(crate) mod change_log_sql {
            use ::sqlx::{Executor, Row};

            use $crate::server::events::ChangeNote;
            use $crate::server::store::StoreError;
            use $crate::server::store::changelog::{LogBounds, note_of, row_of};

            type Conn = <$db as ::sqlx::Database>::Connection;

            /// Logs the notes that go in the log; their ids, in order (`None` for the
            /// others). The caller holds the log's lock until it commits.
            pub(crate) async fn append(
                conn: &mut Conn,
                notes: &[ChangeNote],
                at_ms: i64,
            ) -> Result<Vec<Option<u64>>, StoreError> {
                let mut ids = Vec::with_capacity(notes.len());
                for note in notes {
                    let Some((event, key_id, reason)) = row_of(note) else {
                        ids.push(None);
                        continue;
                    };
                    let id: i64 = sqlx::query_scalar(
                        "INSERT INTO change_log (at, event, key_id, reason) VALUES ($1, $2, $3, $4) RETURNING id",
                    )
                    .bind(at_ms)
                    .bind(event)
                    .bind(key_id)
                    .bind(reason)
                    .fetch_one(&mut *conn)
                    .await?;
                    ids.push(Some(id.max(0) as u64));
                }
                Ok(ids)
            }

            /// Up to `limit` changes with ids above `after`, oldest first.
            pub(crate) async fn after<'e>(
                ex: impl Executor<'e, Database = $db>,
                after: u64,
                limit: u32,
            ) -> Result<Vec<(u64, ChangeNote)>, StoreError> {
                let rows =
                    sqlx::query("SELECT id, event, key_id, reason FROM change_log WHERE id > $1 ORDER BY id LIMIT $2")
                        .bind(i64::try_from(after).unwrap_or(i64::MAX))
                        .bind(i64::from(limit))
                        .fetch_all(ex)
                        .await?;
                rows.iter()
                    .map(|r| {
                        let id: i64 = r.try_get("id")?;
                        let event: String = r.try_get("event")?;
                        let note = note_of(&event, r.try_get("key_id")?, r.try_get("reason")?);
                        Ok((id.max(0) as u64, note))
                    })
                    .collect()
            }

            /// The oldest id kept and the newest one.
            pub(crate) async fn bounds<'e>(ex: impl Executor<'e, Database = $db>) -> Result<LogBounds, StoreError> {
                let row =
                    sqlx::query("SELECT MIN(id) AS oldest, MAX(id) AS newest FROM change_log").fetch_one(ex).await?;
                let oldest: Option<i64> = row.try_get("oldest")?;
                let newest: Option<i64> = row.try_get("newest")?;
                Ok(LogBounds { oldest: oldest.map(|i| i.max(0) as u64), newest: newest.unwrap_or(0).max(0) as u64 })
            }

            /// Deletes up to `limit` rows older than `before_ms` or beyond the newest
            /// `max_rows`, never the newest row (it is what tells a resuming stream
            /// from one from the future); how many.
            pub(crate) async fn prune(
                conn: &mut Conn,
                before_ms: i64,
                max_rows: u64,
                limit: u32,
            ) -> Result<u64, StoreError> {
                let max_rows = i64::try_from(max_rows).unwrap_or(i64::MAX);
                let done = sqlx::query(
                    "DELETE FROM change_log WHERE id IN (SELECT id FROM change_log \
                     WHERE id < (SELECT MAX(id) FROM change_log) \
                     AND (at < $1 OR id <= (SELECT MAX(id) FROM change_log) - $2) ORDER BY id LIMIT $3)",
                )
                .bind(before_ms)
                .bind(max_rows)
                .bind(i64::from(limit))
                .execute(&mut *conn)
                .await?;
                Ok(done.rows_affected())
            }
        }
    };
}
pub(crate) use change_log_queries;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_notes_round_trip_and_odd_rows_reset() {
        for note in [ChangeNote::Key(KeyEvent::Revoked, "key_a".into()), ChangeNote::Reset("bulk".into())] {
            let (event, key_id, reason) = row_of(&note).unwrap();
            assert_eq!(note_of(event, key_id.map(str::to_owned), reason.map(str::to_owned)), note);
        }
        assert!(row_of(&ChangeNote::Tokens).is_none());
        assert_eq!(note_of("deleted", Some("key_a".into()), None), ChangeNote::Reset("unreadable".into()));
        assert_eq!(note_of("revoked", None, None), ChangeNote::Reset("unreadable".into()));
    }
}
