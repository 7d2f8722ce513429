//! The `tokens` table: service and admin tokens as records (digest, name, kind, times),
//! with their audit records. [`token_queries!`] generates the statements once per
//! database type, as `queries` does for keys.

use time::OffsetDateTime;

use super::{Backend, Store, StoreError, from_ms, from_ms_opt};
use crate::key::KeyDigest;
use crate::server::events::ChangeNote;
use crate::server::token::{TokenInfo, TokenKind, TokenRecord};

/// Audit action names of tokens.
pub(crate) mod action {
    /// A token was created.
    pub(crate) const TOKEN_CREATE: &str = "token.create";
    /// A token was revoked.
    pub(crate) const TOKEN_REVOKE: &str = "token.revoke";
}

/// Advisory lock namespace of token changes (first key of the two-key form).
pub(crate) const LOCK_TOKENS: i32 = 0x6b67_0004;

/// An active token as the authentication table needs it.
#[derive(Clone)]
pub(crate) struct ActiveToken {
    pub(crate) info: TokenInfo,
    pub(crate) digest: KeyDigest,
}

/// What revoking found.
pub(crate) enum Revoked {
    /// Revoked now.
    Now(TokenInfo),
    /// It had been revoked before: nothing changed.
    Before(TokenInfo),
}

/// The columns the row readers expect.
pub(crate) const TOKEN_COLUMNS: &str = "token_id, name, kind, digest, prefix, created_at, last_used_at, revoked_at";

/// Reads a row of [`TOKEN_COLUMNS`] (the digest apart).
pub(crate) fn token_from(
    id: String,
    name: String,
    kind: &str,
    prefix: String,
    created_at: i64,
    last_used_at: Option<i64>,
    revoked_at: Option<i64>,
) -> Result<TokenInfo, StoreError> {
    let kind = TokenKind::parse(kind).ok_or_else(|| StoreError::Corrupt(format!("token kind `{kind}`")))?;
    Ok(TokenInfo {
        id,
        name,
        kind,
        prefix,
        bootstrap: false,
        created_at: from_ms(created_at)?,
        last_used_at: from_ms_opt(last_used_at)?,
        revoked_at: from_ms_opt(revoked_at)?,
    })
}

pub(crate) fn digest_from(bytes: Vec<u8>) -> Result<KeyDigest, StoreError> {
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| StoreError::Corrupt("token digest is not 32 bytes".into()))?;
    Ok(KeyDigest::from_bytes(bytes))
}

/// Defines the module `token_queries` for the `sqlx::Database` given; `name_lock` as in
/// `shared_queries!`.
macro_rules! token_queries {
    ($db:ty, name_lock = $name_lock:path) => {
        pub(crate) mod token_queries {
            use ::sqlx::Row;
            use ::time::OffsetDateTime;

            use $crate::server::store::StoreError;
            use $crate::server::store::to_ms;
            use $crate::server::store::tokens::{
                ActiveToken, LOCK_TOKENS, Revoked, TOKEN_COLUMNS, action, digest_from, token_from,
            };
            use $crate::server::token::{MAX_ACTIVE_TOKENS, TokenInfo, TokenKind, TokenRecord};

            type Conn = <$db as ::sqlx::Database>::Connection;
            type DbRow = <$db as ::sqlx::Database>::Row;

            fn info(row: &DbRow) -> Result<TokenInfo, StoreError> {
                token_from(
                    row.try_get("token_id")?,
                    row.try_get("name")?,
                    &row.try_get::<String, _>("kind")?,
                    row.try_get("prefix")?,
                    row.try_get("created_at")?,
                    row.try_get("last_used_at")?,
                    row.try_get("revoked_at")?,
                )
            }

            async fn audit(
                conn: &mut Conn,
                at: OffsetDateTime,
                actor: &str,
                action: &str,
                token: &TokenInfo,
            ) -> Result<(), StoreError> {
                let changes = ::serde_json::json!({
                    "token_id": token.id, "name": token.name, "kind": token.kind, "prefix": token.prefix,
                });
                super::shared::write_audit(conn, at, actor, action, None, &changes).await
            }

            async fn load(conn: &mut Conn, id: &str) -> Result<Option<TokenInfo>, StoreError> {
                let row = sqlx::query(&format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id = $1"))
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?;
                row.as_ref().map(info).transpose()
            }

            /// Inserts a token and its `token.create` record; a taken name is a conflict.
            pub(crate) async fn create(conn: &mut Conn, t: &TokenRecord, actor: &str) -> Result<TokenInfo, StoreError> {
                $name_lock(&mut *conn, LOCK_TOKENS, "tokens").await?;
                let taken: Option<String> = sqlx::query_scalar("SELECT token_id FROM tokens WHERE name = $1")
                    .bind(&t.name)
                    .fetch_optional(&mut *conn)
                    .await?;
                if taken.is_some() {
                    return Err(StoreError::Conflict(format!(
                        "a token named `{}` exists (names are never reused, revoked tokens included)",
                        t.name
                    )));
                }
                let active: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE revoked_at IS NULL")
                    .fetch_one(&mut *conn)
                    .await?;
                if active >= MAX_ACTIVE_TOKENS as i64 {
                    return Err(StoreError::Conflict(format!(
                        "{MAX_ACTIVE_TOKENS} tokens are active already: revoke some first"
                    )));
                }
                sqlx::query(
                    "INSERT INTO tokens (token_id, name, kind, digest, prefix, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&t.id)
                .bind(&t.name)
                .bind(t.kind.as_str())
                .bind(&t.digest.as_bytes()[..])
                .bind(&t.prefix)
                .bind(to_ms(t.created_at))
                .execute(&mut *conn)
                .await?;
                let stored = load(conn, &t.id).await?.ok_or_else(|| StoreError::Corrupt("token vanished".into()))?;
                audit(conn, t.created_at, actor, action::TOKEN_CREATE, &stored).await?;
                Ok(stored)
            }

            /// Revokes a token and writes `token.revoke`, unless it was revoked before.
            /// The last active admin token is refused unless `other_admins` (configured
            /// ones) remain.
            pub(crate) async fn revoke(
                conn: &mut Conn,
                id: &str,
                actor: &str,
                at: OffsetDateTime,
                other_admins: usize,
            ) -> Result<Revoked, StoreError> {
                $name_lock(&mut *conn, LOCK_TOKENS, "tokens").await?;
                let Some(mut token) = load(conn, id).await? else {
                    return Err(StoreError::NotFound(format!("no token with id `{id}`")));
                };
                if token.revoked_at.is_some() {
                    return Ok(Revoked::Before(token));
                }
                if token.kind == TokenKind::Admin && other_admins == 0 {
                    let others: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM tokens WHERE kind = 'admin' AND revoked_at IS NULL AND token_id <> $1",
                    )
                    .bind(id)
                    .fetch_one(&mut *conn)
                    .await?;
                    if others == 0 {
                        return Err(StoreError::Conflict(format!(
                            "`{}` is the last active admin token: revoking it would lock every operator out. \
                             Create another admin token first (POST /v1/tokens {{\"kind\": \"admin\", ...}} or \
                             `keygate-server tokens create --kind admin`), then revoke this one",
                            token.name
                        )));
                    }
                }
                sqlx::query("UPDATE tokens SET revoked_at = $2 WHERE token_id = $1")
                    .bind(id)
                    .bind(to_ms(at))
                    .execute(&mut *conn)
                    .await?;
                token.revoked_at = Some(at);
                audit(conn, at, actor, action::TOKEN_REVOKE, &token).await?;
                Ok(Revoked::Now(token))
            }

            /// Every stored token, oldest first, at most `limit`.
            pub(crate) async fn list(pool: &::sqlx::Pool<$db>, limit: u32) -> Result<Vec<TokenInfo>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY (revoked_at IS NOT NULL), created_at, token_id LIMIT $1"
                ))
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?;
                rows.iter().map(info).collect()
            }

            /// The active tokens with their digests.
            pub(crate) async fn active(pool: &::sqlx::Pool<$db>) -> Result<Vec<ActiveToken>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {TOKEN_COLUMNS} FROM tokens WHERE revoked_at IS NULL ORDER BY created_at, token_id"
                ))
                .fetch_all(pool)
                .await?;
                rows.iter()
                    .map(|row| Ok(ActiveToken { info: info(row)?, digest: digest_from(row.try_get("digest")?)? }))
                    .collect()
            }

            /// Moves `last_used_at` forward (never back) for these tokens.
            pub(crate) async fn touch(conn: &mut Conn, used: &[(String, i64)]) -> Result<(), StoreError> {
                for (id, at) in used {
                    sqlx::query(
                        "UPDATE tokens SET last_used_at = $2 WHERE token_id = $1 \
                         AND (last_used_at IS NULL OR last_used_at < $2)",
                    )
                    .bind(id)
                    .bind(*at)
                    .execute(&mut *conn)
                    .await?;
                }
                Ok(())
            }
        }
    };
}
pub(crate) use token_queries;

/// `$body` once per backend, with `$b` the backend and `$q` its token queries.
macro_rules! each_token_backend {
    ($store:expr, $b:ident, $q:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite($b) => {
                use super::sqlite::token_queries as $q;
                $body
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres($b) => {
                use super::postgres::token_queries as $q;
                $body
            }
        }
    };
}

/// A write in one transaction: `$body` returns the value and the notes it made, which
/// are committed with it (sent to the other replicas) and then go to the sink.
macro_rules! token_write {
    ($store:expr, |$tx:ident, $q:ident| $body:expr) => {{
        let value = each_token_backend!($store, b, $q => {
            let mut $tx = b.write().await?;
            let (value, notes): (_, Vec<ChangeNote>) = $body;
            b.commit($tx, &notes, &*$store.sink).await?;
            value
        });
        Ok(value)
    }};
}

impl Store {
    /// Whether the data lives only as long as this process (`sqlite::memory:`).
    pub fn is_ephemeral(&self) -> bool {
        match &self.backend {
            Backend::Sqlite(s) => s.is_memory(),
            #[cfg(feature = "postgres")]
            Backend::Postgres(_) => false,
        }
    }

    /// Closes the pool (checkpointing a SQLite file's WAL).
    pub(crate) async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(s) => s.close().await,
            #[cfg(feature = "postgres")]
            Backend::Postgres(p) => p.close().await,
        }
    }

    /// Stores a new token and writes `token.create`; every replica reloads its tokens.
    pub(crate) async fn create_token(&self, token: &TokenRecord, actor: &str) -> Result<TokenInfo, StoreError> {
        self.metered("create_token", async {
            token_write!(self, |tx, q| (q::create(&mut tx, token, actor).await?, vec![ChangeNote::Tokens]))
        })
        .await
    }

    /// Revokes a token and writes `token.revoke`; every replica reloads its tokens. A
    /// token revoked before changes nothing: no audit record, no change note.
    pub(crate) async fn revoke_token(
        &self,
        id: &str,
        actor: &str,
        at: OffsetDateTime,
        other_admins: usize,
    ) -> Result<Revoked, StoreError> {
        self.metered("revoke_token", async {
            token_write!(self, |tx, q| {
                let revoked = q::revoke(&mut tx, id, actor, at, other_admins).await?;
                let notes = match revoked {
                    Revoked::Now(_) => vec![ChangeNote::Tokens],
                    Revoked::Before(_) => Vec::new(),
                };
                (revoked, notes)
            })
        })
        .await
    }

    /// Every stored token, active ones first and each group oldest first, at most
    /// `limit` (revoked ones included, after every active one).
    pub async fn list_tokens(&self, limit: u32) -> Result<Vec<TokenInfo>, StoreError> {
        self.metered("list_tokens", async { each_token_backend!(self, b, q => q::list(b.pool(), limit).await) }).await
    }

    /// The tokens not revoked, with their digests.
    pub(crate) async fn active_tokens(&self) -> Result<Vec<ActiveToken>, StoreError> {
        self.metered("active_tokens", async { each_token_backend!(self, b, q => q::active(b.pool()).await) }).await
    }

    /// Writes when tokens were last used (token id, Unix ms), in one transaction.
    pub(crate) async fn touch_tokens(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        self.metered("touch_tokens", async { token_write!(self, |tx, q| (q::touch(&mut tx, used).await?, Vec::new())) })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::server::store::{ChangeSink, SqliteStore, now_ms};

    #[derive(Debug, Default)]
    struct Recorded(Mutex<Vec<ChangeNote>>);

    impl ChangeSink for Recorded {
        fn publish(&self, note: &ChangeNote, _id: Option<u64>) {
            self.0.lock().unwrap().push(note.clone());
        }
    }

    #[tokio::test]
    async fn revoking_a_revoked_token_writes_and_publishes_nothing() {
        let sink = Arc::new(Recorded::default());
        let store = Store::from(SqliteStore::open("sqlite::memory:").await.unwrap()).reporting_to(sink.clone());
        let (_, record) = crate::server::token::generate(TokenKind::Service, "fleet", now_ms()).unwrap();
        store.create_token(&record, "ops").await.unwrap();
        assert_eq!(*sink.0.lock().unwrap(), [ChangeNote::Tokens]);
        assert!(matches!(store.revoke_token(&record.id, "ops", now_ms(), 0).await.unwrap(), Revoked::Now(_)));
        assert_eq!(*sink.0.lock().unwrap(), [ChangeNote::Tokens, ChangeNote::Tokens]);
        assert!(matches!(store.revoke_token(&record.id, "ops", now_ms(), 0).await.unwrap(), Revoked::Before(_)));
        assert_eq!(sink.0.lock().unwrap().len(), 2, "the second revoke changed nothing and said nothing");
        let audit = store.audit(None, 100).await.unwrap();
        assert_eq!(audit.iter().filter(|r| r.action == action::TOKEN_REVOKE).count(), 1);
    }
}
