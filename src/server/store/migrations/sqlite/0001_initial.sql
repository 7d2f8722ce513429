-- keygate key service, schema 1 (SQLite). Times are Unix milliseconds unless named
-- `minute` (Unix seconds of the minute's start). Raw keys are never stored: a secret
-- is its SHA-256 digest and a display prefix.

CREATE TABLE keys (
    key_id             TEXT    PRIMARY KEY NOT NULL,
    owner              TEXT    NOT NULL,
    name               TEXT    NOT NULL,
    scopes             TEXT    NOT NULL,            -- JSON array of strings
    roles              TEXT    NOT NULL,            -- JSON array of strings
    environment        TEXT    NOT NULL,
    expires_at         INTEGER,
    disabled           INTEGER NOT NULL DEFAULT 0,
    revoked_at         INTEGER,
    meta               TEXT    NOT NULL,            -- JSON object
    ratelimit_limit    INTEGER,
    ratelimit_period_s INTEGER,
    key_prefix         TEXT    NOT NULL,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER,
    last_used_at       INTEGER
);
CREATE INDEX keys_owner ON keys (owner, created_at);

-- One row per secret a key has had. The current one has expires_at NULL; rotation
-- sets the previous ones' expires_at to the end of their grace.
CREATE TABLE key_secrets (
    digest     BLOB    PRIMARY KEY NOT NULL,
    key_id     TEXT    NOT NULL REFERENCES keys (key_id),
    key_prefix TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);
CREATE INDEX key_secrets_key ON key_secrets (key_id);

-- Reverse index: which keys hold a role (keys.roles is what is read).
CREATE TABLE key_roles (
    key_id TEXT NOT NULL REFERENCES keys (key_id),
    role   TEXT NOT NULL,
    PRIMARY KEY (key_id, role)
);
CREATE INDEX key_roles_role ON key_roles (role);

CREATE TABLE roles (
    name       TEXT    PRIMARY KEY NOT NULL,
    scopes     TEXT    NOT NULL,                    -- JSON array of strings
    updated_at INTEGER NOT NULL
);

CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    key_id  TEXT,
    changes TEXT    NOT NULL                        -- JSON object
);
CREATE INDEX audit_at ON audit (at);
CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;

CREATE TABLE usage_minutes (
    key_id         TEXT    NOT NULL,
    minute         INTEGER NOT NULL,
    requests       INTEGER NOT NULL,
    allowed        INTEGER NOT NULL,
    denied         INTEGER NOT NULL,
    status_2xx     INTEGER NOT NULL,
    status_4xx     INTEGER NOT NULL,
    status_5xx     INTEGER NOT NULL,
    latency_us_sum INTEGER NOT NULL,
    latency_us_max INTEGER NOT NULL,
    PRIMARY KEY (key_id, minute)
);

CREATE TABLE key_networks (
    key_id     TEXT    NOT NULL,
    network    TEXT    NOT NULL,
    first_seen INTEGER NOT NULL,
    PRIMARY KEY (key_id, network)
);

CREATE TABLE alerts (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        INTEGER NOT NULL,
    key_id    TEXT    NOT NULL,
    kind      TEXT    NOT NULL,
    minute    INTEGER NOT NULL,
    observed  INTEGER NOT NULL,
    baseline  REAL    NOT NULL,
    threshold REAL    NOT NULL,
    detail    TEXT    NOT NULL,
    UNIQUE (key_id, kind, minute)
);
CREATE INDEX alerts_at ON alerts (at);
