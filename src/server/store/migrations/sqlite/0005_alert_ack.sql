-- keygate key service, schema 5 (SQLite): alerts can be acknowledged
-- (`POST /v1/alerts/{id}/ack`); Unix milliseconds, NULL while open.
ALTER TABLE alerts ADD COLUMN acknowledged_at INTEGER;
