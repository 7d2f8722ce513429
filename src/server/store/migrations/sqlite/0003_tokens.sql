-- keygate key service, schema 3 (SQLite): the service and admin tokens callers present,
-- as records. Raw tokens are never stored: a token is its SHA-256 digest and a display
-- prefix. Tokens are never deleted (a name stays taken, so the audit actor it names
-- stays unambiguous); revocation sets revoked_at.

CREATE TABLE tokens (
    token_id     TEXT    PRIMARY KEY NOT NULL,
    name         TEXT    NOT NULL UNIQUE,
    kind         TEXT    NOT NULL CHECK (kind IN ('service', 'admin')),
    digest       BLOB    NOT NULL UNIQUE,
    prefix       TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
);
CREATE INDEX tokens_active ON tokens (kind) WHERE revoked_at IS NULL;
