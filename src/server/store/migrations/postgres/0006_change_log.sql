-- keygate key service, schema 6 (PostgreSQL): the change log behind resumable event
-- streams (`Last-Event-ID`). Every change that affects verification is one row, written
-- in the transaction of the change; `id` (one sequence, shared by every replica) is the
-- SSE event id.
CREATE TABLE change_log (
    id BIGSERIAL PRIMARY KEY,
    -- Unix milliseconds.
    at BIGINT NOT NULL,
    -- `revoked`, `updated`, `rotated` (with `key_id`) or `reset` (with `reason`).
    event TEXT NOT NULL,
    key_id TEXT,
    reason TEXT
);
CREATE INDEX change_log_at ON change_log (at);
