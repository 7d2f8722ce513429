//! Writes whose SQL is the same on every backend (`$n` placeholders, the same tables
//! and encodings), generated once per connection type by [`shared_writes!`].

/// Defines `write_audit`, `write_key`, `write_roles`, `insert_key` and
/// `replace_secret` for the connection type given, in the module that invokes it.
macro_rules! shared_writes {
    ($conn:ty) => {
        async fn write_audit(
            conn: &mut $conn,
            at: ::time::OffsetDateTime,
            actor: &str,
            action: &str,
            key_id: Option<&str>,
            changes: &::serde_json::Value,
        ) -> Result<(), $crate::server::store::StoreError> {
            sqlx::query("INSERT INTO audit (at, actor, action, key_id, changes) VALUES ($1, $2, $3, $4, $5)")
                .bind($crate::server::store::to_ms(at))
                .bind(actor)
                .bind(action)
                .bind(key_id)
                .bind(changes.to_string())
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        async fn write_key(
            conn: &mut $conn,
            key: &$crate::server::model::KeyInfo,
        ) -> Result<(), $crate::server::store::StoreError> {
            use $crate::server::store::to_ms;
            sqlx::query(
                "UPDATE keys SET name = $2, scopes = $3, roles = $4, expires_at = $5, disabled = $6, \
                 revoked_at = $7, meta = $8, ratelimit_limit = $9, ratelimit_period_s = $10, key_prefix = $11, \
                 updated_at = $12 WHERE key_id = $1",
            )
            .bind(&key.key_id)
            .bind(&key.name)
            .bind(::serde_json::Value::from(key.scopes.clone()).to_string())
            .bind(::serde_json::Value::from(key.roles.clone()).to_string())
            .bind(key.expires_at.map(to_ms))
            .bind(key.disabled)
            .bind(key.revoked_at.map(to_ms))
            .bind(key.meta.to_string())
            .bind(key.ratelimit.map(|r| r.limit as i64))
            .bind(key.ratelimit.map(|r| r.period_s as i64))
            .bind(&key.key_prefix)
            .bind(key.updated_at.map(to_ms))
            .execute(&mut *conn)
            .await?;
            Ok(())
        }

        async fn write_roles(
            conn: &mut $conn,
            key_id: &str,
            roles: &[String],
        ) -> Result<(), $crate::server::store::StoreError> {
            sqlx::query("DELETE FROM key_roles WHERE key_id = $1").bind(key_id).execute(&mut *conn).await?;
            for role in roles {
                sqlx::query("INSERT INTO key_roles (key_id, role) VALUES ($1, $2)")
                    .bind(key_id)
                    .bind(role)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(())
        }

        async fn insert_secret(
            conn: &mut $conn,
            key_id: &str,
            secret: &$crate::server::store::NewSecret,
            at_ms: i64,
        ) -> Result<(), $crate::server::store::StoreError> {
            sqlx::query("INSERT INTO key_secrets (digest, key_id, key_prefix, created_at) VALUES ($1, $2, $3, $4)")
                .bind(&secret.digest.as_bytes()[..])
                .bind(key_id)
                .bind(&secret.key_prefix)
                .bind(at_ms)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        /// A new key: its row, its secret, its roles and the `key.create` audit record.
        async fn insert_key(
            conn: &mut $conn,
            key: &$crate::server::store::NewKeyRecord,
            actor: &str,
        ) -> Result<(), $crate::server::store::StoreError> {
            use $crate::server::store::to_ms;
            let created = to_ms(key.created_at);
            sqlx::query(
                "INSERT INTO keys (key_id, owner, name, scopes, roles, environment, expires_at, disabled, meta, \
                 ratelimit_limit, ratelimit_period_s, key_prefix, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            )
            .bind(&key.key_id)
            .bind(&key.owner)
            .bind(&key.name)
            .bind(::serde_json::Value::from(key.scopes.clone()).to_string())
            .bind(::serde_json::Value::from(key.roles.clone()).to_string())
            .bind(&key.environment)
            .bind(key.expires_at.map(to_ms))
            .bind(false)
            .bind(key.meta.to_string())
            .bind(key.ratelimit.map(|r| r.limit as i64))
            .bind(key.ratelimit.map(|r| r.period_s as i64))
            .bind(&key.secret.key_prefix)
            .bind(created)
            .execute(&mut *conn)
            .await?;
            insert_secret(conn, &key.key_id, &key.secret, created).await?;
            write_roles(conn, &key.key_id, &key.roles).await?;
            let changes = $crate::server::store::create_changes(key);
            write_audit(
                conn,
                key.created_at,
                actor,
                $crate::server::store::action::KEY_CREATE,
                Some(&key.key_id),
                &changes,
            )
            .await
        }

        /// Rotation: the previous secrets end at `grace_until` at the latest (older ones
        /// still in an earlier grace keep their earlier end), and `secret` is added.
        async fn replace_secret(
            conn: &mut $conn,
            key_id: &str,
            secret: &$crate::server::store::NewSecret,
            grace_until: ::time::OffsetDateTime,
            at: ::time::OffsetDateTime,
        ) -> Result<(), $crate::server::store::StoreError> {
            use $crate::server::store::to_ms;
            sqlx::query(
                "UPDATE key_secrets SET expires_at = CASE WHEN expires_at IS NULL OR expires_at > $2 THEN $2 \
                 ELSE expires_at END WHERE key_id = $1",
            )
            .bind(key_id)
            .bind(to_ms(grace_until))
            .execute(&mut *conn)
            .await?;
            insert_secret(conn, key_id, secret, to_ms(at)).await
        }
    };
}

pub(crate) use shared_writes;
