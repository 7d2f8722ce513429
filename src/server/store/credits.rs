//! Reconciling credits (issue 16): the reads and conditional writes of the credit
//! reconciler, which copies the fleet-wide counts a Redis engine keeps back into the
//! store. [`credit_queries!`] generates the statements once per database type.
//!
//! A reconciled write sets `remaining` (and `credits_reconciled_at`) only while the
//! row's `credits_revision` is still the one the count in Redis started from: an
//! operator's set in between changed the revision, and wins. Writing the same count
//! twice changes nothing, so replicas reconciling at once are harmless.

use time::OffsetDateTime;

use super::{Backend, Store, StoreError, to_ms};
use crate::meter::redis::schema::Holder;
use crate::quota::Credits;

/// A holder of credits as the reconciler reads it.
#[derive(Debug, Clone)]
pub(crate) struct CreditRow {
    /// The key id or owner.
    pub(crate) id: String,
    /// The credits as stored.
    pub(crate) credits: Credits,
    /// Their revision.
    pub(crate) revision: u64,
}

/// A count to write back: `credits` (stored ones with the count from Redis as
/// `remaining`) for `id`, if its revision is still `revision`.
#[derive(Debug, Clone)]
pub(crate) struct Reconciled {
    /// The key id or owner.
    pub(crate) id: String,
    /// The revision the count started from.
    pub(crate) revision: u64,
    /// What to store.
    pub(crate) credits: Credits,
}

/// The statements of each holder: its page and its conditional write. Revoked keys
/// spend nothing more, so they are not read.
pub(crate) fn statements(holder: Holder) -> (&'static str, &'static str) {
    match holder {
        Holder::Key => (
            "SELECT key_id AS id, credits, credits_revision FROM keys \
             WHERE credits IS NOT NULL AND credits_revision IS NOT NULL AND revoked_at IS NULL AND key_id > $1 \
             ORDER BY key_id LIMIT $2",
            "UPDATE keys SET credits = $1, credits_reconciled_at = $2 \
             WHERE key_id = $3 AND credits_revision = $4 AND credits IS NOT NULL",
        ),
        Holder::Owner => (
            "SELECT owner AS id, credits, credits_revision FROM owners \
             WHERE credits IS NOT NULL AND credits_revision IS NOT NULL AND owner > $1 \
             ORDER BY owner LIMIT $2",
            "UPDATE owners SET credits = $1, credits_reconciled_at = $2 \
             WHERE owner = $3 AND credits_revision = $4 AND credits IS NOT NULL",
        ),
    }
}

/// Defines the module `credit_queries` for the `sqlx::Database` given.
macro_rules! credit_queries {
    ($db:ty) => {
        pub(crate) mod credit_queries {
            use ::sqlx::Row;

            use $crate::meter::redis::schema::Holder;
            use $crate::server::store::StoreError;
            use $crate::server::store::credits::{CreditRow, Reconciled, statements};
            use $crate::server::store::owners::{credits_from, credits_json, revision_from};

            type Conn = <$db as ::sqlx::Database>::Connection;

            /// Up to `limit` holders with credits after `after`, by id.
            pub(crate) async fn page<'e>(
                ex: impl ::sqlx::Executor<'e, Database = $db>,
                holder: Holder,
                after: &str,
                limit: u32,
            ) -> Result<Vec<CreditRow>, StoreError> {
                let rows = sqlx::query(statements(holder).0).bind(after).bind(i64::from(limit)).fetch_all(ex).await?;
                let mut page = Vec::with_capacity(rows.len());
                for row in &rows {
                    let credits = credits_from(row.try_get::<Option<String>, _>("credits")?.as_deref())?;
                    let revision = revision_from(row.try_get("credits_revision")?);
                    if let (Some(credits), Some(revision)) = (credits, revision) {
                        page.push(CreditRow { id: row.try_get("id")?, credits, revision });
                    }
                }
                Ok(page)
            }

            /// Writes each count whose revision still holds; returns how many did.
            pub(crate) async fn write(
                conn: &mut Conn,
                holder: Holder,
                counts: &[Reconciled],
                at_ms: i64,
            ) -> Result<u64, StoreError> {
                let mut written = 0;
                for c in counts {
                    let done = sqlx::query(statements(holder).1)
                        .bind(credits_json(Some(&c.credits)))
                        .bind(at_ms)
                        .bind(&c.id)
                        .bind(c.revision as i64)
                        .execute(&mut *conn)
                        .await?;
                    written += done.rows_affected();
                }
                Ok(written)
            }
        }
    };
}
pub(crate) use credit_queries;

/// `$body` once per backend, with `$b` the backend and `$q` its credit queries.
macro_rules! each_credit_backend {
    ($store:expr, $b:ident, $q:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite($b) => {
                use super::sqlite::credit_queries as $q;
                $body
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres($b) => {
                use super::postgres::credit_queries as $q;
                $body
            }
        }
    };
}

impl Store {
    /// Up to `limit` keys (unrevoked) or owners with credits and a revision, ordered by
    /// id, after `after` (`""`: from the first).
    pub(crate) async fn credits_page(
        &self,
        holder: Holder,
        after: &str,
        limit: u32,
    ) -> Result<Vec<CreditRow>, StoreError> {
        self.metered("credits_page", async {
            each_credit_backend!(self, b, q => q::page(b.pool(), holder, after, limit).await)
        })
        .await
    }

    /// Writes fleet-wide counts back, in one transaction, each only while its revision
    /// holds; not audited and not published (the revision, which middlewares count
    /// from, stays). Returns how many were written.
    pub(crate) async fn reconcile_credits(
        &self,
        holder: Holder,
        counts: &[Reconciled],
        at: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        self.metered("reconcile_credits", async {
            let written = each_credit_backend!(self, b, q => {
                let mut tx = b.write().await?;
                let written = q::write(&mut tx, holder, counts, to_ms(at)).await?;
                b.commit(tx, &[], &*self.sink).await?;
                written
            });
            Ok(written)
        })
        .await
    }
}
