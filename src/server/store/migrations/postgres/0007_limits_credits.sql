-- keygate key service, schema 7 (PostgreSQL): named rate limits and credits (issue 16).
-- `limits` is a JSON array of {"name", "limit", "period_s", "burst"?}; the limit named
-- `requests` is mirrored in `ratelimit_limit` / `ratelimit_period_s`, which older rows
-- hold alone. `credits` is JSON {"remaining", "refill"?} or NULL.
ALTER TABLE keys ADD COLUMN limits TEXT NOT NULL DEFAULT '[]';
ALTER TABLE keys ADD COLUMN credits TEXT;
-- Limits and credits of an owner, shared by all of the owner's keys.
CREATE TABLE owners (
    owner      TEXT   PRIMARY KEY,
    limits     TEXT   NOT NULL DEFAULT '[]',
    credits    TEXT,
    updated_at BIGINT NOT NULL
);
