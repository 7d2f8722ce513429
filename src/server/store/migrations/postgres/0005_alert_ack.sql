-- keygate key service, schema 5 (PostgreSQL): alerts can be acknowledged
-- (`POST /v1/alerts/{id}/ack`); Unix milliseconds, NULL while open.
ALTER TABLE alerts ADD COLUMN acknowledged_at BIGINT;
