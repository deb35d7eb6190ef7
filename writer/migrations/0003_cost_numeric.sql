-- Tardis schema, version 3: money as numeric, not binary floating point. A record's cost was
-- stored as double precision, so sums and single values showed float noise
-- (3.5699999999999994e-05); numeric(20,12) keeps exact decimal dollars to a trillionth.
-- Additive for older writers: they send float8, which Postgres assigns to numeric (rounded to
-- 12 places), so a writer that does not know this migration still works.
-- The type change rewrites `records` under an exclusive lock: wait at most 30 s for it rather
-- than queue every reader and writer behind a long query (the migration Job then fails and is
-- retried).
SET LOCAL lock_timeout = '30s';
ALTER TABLE records ALTER COLUMN cost_usd TYPE numeric(20, 12) USING round(cost_usd::numeric, 12);
