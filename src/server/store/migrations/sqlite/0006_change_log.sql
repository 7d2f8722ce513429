-- keygate key service, schema 6 (SQLite): the change log behind resumable event
-- streams (`Last-Event-ID`). Every change that affects verification is one row, written
-- in the transaction of the change; `id` is the SSE event id. AUTOINCREMENT: an id is
-- never reused, even after the newest rows were deleted.
CREATE TABLE change_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Unix milliseconds.
    at INTEGER NOT NULL,
    -- `revoked`, `updated`, `rotated` (with `key_id`) or `reset` (with `reason`).
    event TEXT NOT NULL,
    key_id TEXT,
    reason TEXT
);
CREATE INDEX change_log_at ON change_log (at);
