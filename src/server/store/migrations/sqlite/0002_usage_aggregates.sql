-- keygate key service, schema 2 (SQLite): usage aggregated at the edge.
--
-- Every usage table has the same counters: requests, allowed, denied, responses by
-- status class, the latency sum and maximum (microseconds), and `latency`, the sparse
-- JSON of a mergeable latency histogram (`{"count","sum_us","max_us","buckets"}`;
-- NULL on minute rows stored before schema 2, which then have no percentiles).

ALTER TABLE usage_minutes ADD COLUMN status_1xx INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_minutes ADD COLUMN status_3xx INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_minutes ADD COLUMN latency TEXT;
-- Retention finds the minutes to roll up by age.
CREATE INDEX usage_minutes_minute ON usage_minutes (minute);

-- Minute rows past their retention, rolled up per key and hour (`hour`: Unix seconds
-- of the hour's start).
CREATE TABLE usage_hours (
    key_id         TEXT    NOT NULL,
    hour           INTEGER NOT NULL,
    requests       INTEGER NOT NULL,
    allowed        INTEGER NOT NULL,
    denied         INTEGER NOT NULL,
    status_1xx     INTEGER NOT NULL,
    status_2xx     INTEGER NOT NULL,
    status_3xx     INTEGER NOT NULL,
    status_4xx     INTEGER NOT NULL,
    status_5xx     INTEGER NOT NULL,
    latency_us_sum INTEGER NOT NULL,
    latency_us_max INTEGER NOT NULL,
    latency        TEXT,
    PRIMARY KEY (key_id, hour)
);
CREATE INDEX usage_hours_hour ON usage_hours (hour);

-- Usage per key, hour, route template, method and outcome, written as it arrives.
CREATE TABLE usage_routes (
    key_id         TEXT    NOT NULL,
    hour           INTEGER NOT NULL,
    route          TEXT    NOT NULL,
    method         TEXT    NOT NULL,
    outcome        TEXT    NOT NULL,
    requests       INTEGER NOT NULL,
    allowed        INTEGER NOT NULL,
    denied         INTEGER NOT NULL,
    status_1xx     INTEGER NOT NULL,
    status_2xx     INTEGER NOT NULL,
    status_3xx     INTEGER NOT NULL,
    status_4xx     INTEGER NOT NULL,
    status_5xx     INTEGER NOT NULL,
    latency_us_sum INTEGER NOT NULL,
    latency_us_max INTEGER NOT NULL,
    latency        TEXT,
    PRIMARY KEY (key_id, hour, route, method, outcome)
);
CREATE INDEX usage_routes_hour ON usage_routes (hour);

-- Aggregate batches applied, written in the transaction that adds their rows: a batch
-- id is applied at most once while it is kept here (`applied_at`: Unix milliseconds).
CREATE TABLE usage_batches (
    batch_id   TEXT    PRIMARY KEY NOT NULL,
    applied_at INTEGER NOT NULL,
    accepted   INTEGER NOT NULL
);
CREATE INDEX usage_batches_applied ON usage_batches (applied_at);
