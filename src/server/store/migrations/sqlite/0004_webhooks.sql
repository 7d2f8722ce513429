-- keygate key service, schema 4 (SQLite): webhook endpoints and their delivery outbox.
-- Times are Unix milliseconds.

-- `events`: JSON array of event types (or `prefix.*`) the endpoint wants; empty: all.
-- `secret`: the HMAC-SHA256 signing key; kept as is, since signing needs it.
-- `dropped`: deliveries dropped because the endpoint's queue was full.
CREATE TABLE webhook_endpoints (
    id          TEXT    PRIMARY KEY NOT NULL,
    url         TEXT    NOT NULL,
    events      TEXT    NOT NULL,
    description TEXT    NOT NULL,
    secret      TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    dropped     INTEGER NOT NULL DEFAULT 0
);

-- One row per (event, endpoint): the outbox and, once finished, the delivery log.
-- `state`: pending, delivered, failed (gave up) or dropped (queue full).
-- A pending row is due at `next_attempt_at`; a worker owns it until `claimed_until`.
CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint_id     TEXT    NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id        TEXT    NOT NULL,
    event_type      TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    state           TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    claimed_until   INTEGER,
    last_attempt_at INTEGER,
    last_status     INTEGER,
    last_error      TEXT,
    delivered_at    INTEGER
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, state, id);
