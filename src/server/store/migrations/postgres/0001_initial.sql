-- keygate key service, schema 1 (PostgreSQL). The same tables as on SQLite: times are
-- Unix milliseconds unless named `minute` (Unix seconds of the minute's start); lists
-- and objects are JSON text. Raw keys are never stored: a secret is its SHA-256 digest
-- and a display prefix. Tables go to the first schema of the search_path.

CREATE TABLE keys (
    key_id             TEXT    PRIMARY KEY,
    owner              TEXT    NOT NULL,
    name               TEXT    NOT NULL,
    scopes             TEXT    NOT NULL,            -- JSON array of strings
    roles              TEXT    NOT NULL,            -- JSON array of strings
    environment        TEXT    NOT NULL,
    expires_at         BIGINT,
    disabled           BOOLEAN NOT NULL DEFAULT FALSE,
    revoked_at         BIGINT,
    meta               TEXT    NOT NULL,            -- JSON object
    ratelimit_limit    BIGINT,
    ratelimit_period_s BIGINT,
    key_prefix         TEXT    NOT NULL,
    created_at         BIGINT  NOT NULL,
    updated_at         BIGINT,
    last_used_at       BIGINT
);
CREATE INDEX keys_owner ON keys (owner, created_at);

-- One row per secret a key has had. The current one has expires_at NULL; rotation
-- sets the previous ones' expires_at to the end of their grace.
CREATE TABLE key_secrets (
    digest     BYTEA  PRIMARY KEY CHECK (octet_length(digest) = 32),
    key_id     TEXT   NOT NULL REFERENCES keys (key_id),
    key_prefix TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT
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
    name       TEXT   PRIMARY KEY,
    scopes     TEXT   NOT NULL,                     -- JSON array of strings
    updated_at BIGINT NOT NULL
);

CREATE TABLE audit (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      BIGINT NOT NULL,
    actor   TEXT   NOT NULL,
    action  TEXT   NOT NULL,
    key_id  TEXT,
    changes TEXT   NOT NULL                         -- JSON object
);
CREATE INDEX audit_at ON audit (at);
CREATE FUNCTION keygate_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION keygate_audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION keygate_audit_append_only();

CREATE TABLE usage_minutes (
    key_id         TEXT   NOT NULL,
    minute         BIGINT NOT NULL,
    requests       BIGINT NOT NULL,
    allowed        BIGINT NOT NULL,
    denied         BIGINT NOT NULL,
    status_2xx     BIGINT NOT NULL,
    status_4xx     BIGINT NOT NULL,
    status_5xx     BIGINT NOT NULL,
    latency_us_sum BIGINT NOT NULL,
    latency_us_max BIGINT NOT NULL,
    PRIMARY KEY (key_id, minute)
);

CREATE TABLE key_networks (
    key_id     TEXT   NOT NULL,
    network    TEXT   NOT NULL,
    first_seen BIGINT NOT NULL,
    PRIMARY KEY (key_id, network)
);

CREATE TABLE alerts (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        BIGINT           NOT NULL,
    key_id    TEXT             NOT NULL,
    kind      TEXT             NOT NULL,
    minute    BIGINT           NOT NULL,
    observed  BIGINT           NOT NULL,
    baseline  DOUBLE PRECISION NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    detail    TEXT             NOT NULL,
    UNIQUE (key_id, kind, minute)
);
CREATE INDEX alerts_at ON alerts (at);
