-- keygate key service, schema 9 (SQLite): credit revisions and reconciliation (issue 16).
-- `credits_revision` changes whenever an operator sets the credits (never when the
-- reconciler writes the fleet-wide count back): a fleet-wide engine starts counting
-- afresh from `credits` when it differs from the revision it counted from. Unix
-- microseconds of the set, or the previous revision + 1 when that is larger, so it only
-- grows. `credits_reconciled_at` (Unix ms) is when the reconciler last wrote
-- `remaining` from Redis; NULL after an operator's set.
ALTER TABLE keys ADD COLUMN credits_revision INTEGER;
ALTER TABLE keys ADD COLUMN credits_reconciled_at INTEGER;
ALTER TABLE owners ADD COLUMN credits_revision INTEGER;
ALTER TABLE owners ADD COLUMN credits_reconciled_at INTEGER;
-- Credits set before revisions existed: the first revision (any later set is larger).
UPDATE keys SET credits_revision = 1 WHERE credits IS NOT NULL;
UPDATE owners SET credits_revision = 1 WHERE credits IS NOT NULL;
-- The reconciler pages through the keys that have credits, by id.
CREATE INDEX keys_with_credits ON keys (key_id) WHERE credits IS NOT NULL;
