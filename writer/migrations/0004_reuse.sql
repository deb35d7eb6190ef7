-- Tardis schema, version 4: enrichments reused instead of paid for again.
-- `content_key` is the record's content as its source defines it (payload without its
-- updated_at field and ignore_fields, keys sorted, hashed by the fetcher); the fetcher looks a
-- chunk's records up by (source, record_id) and reuses the enrichment when the key is the same.
-- `reused` says the row's enrichment was not paid for again (its `enriched_at` is when it was
-- made) and `saved_usd` what it would have cost; `cost_usd` stays what was spent.
-- Additive: new columns with constant defaults (no table rewrite); a writer that does not know
-- them leaves them at their defaults.
ALTER TABLE records
    ADD COLUMN content_key text,
    ADD COLUMN reused boolean NOT NULL DEFAULT false,
    ADD COLUMN saved_usd numeric(20, 12) NOT NULL DEFAULT 0;
