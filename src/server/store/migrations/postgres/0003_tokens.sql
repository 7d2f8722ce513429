-- keygate key service, schema 3 (PostgreSQL): the service and admin tokens callers
-- present, as records. Raw tokens are never stored: a token is its SHA-256 digest and a
-- display prefix. Tokens are never deleted (a name stays taken, so the audit actor it
-- names stays unambiguous); revocation sets revoked_at.

CREATE TABLE tokens (
    token_id     TEXT   PRIMARY KEY,
    name         TEXT   NOT NULL UNIQUE,
    kind         TEXT   NOT NULL CHECK (kind IN ('service', 'admin')),
    digest       BYTEA  NOT NULL UNIQUE CHECK (octet_length(digest) = 32),
    prefix       TEXT   NOT NULL,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at   BIGINT
);
CREATE INDEX tokens_active ON tokens (kind) WHERE revoked_at IS NULL;
