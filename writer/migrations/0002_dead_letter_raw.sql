-- Tardis schema, version 2: a message the writer cannot read is kept whole in dead_letters,
-- as `payload` when it is JSON and as `raw` bytes when it is not.
ALTER TABLE dead_letters ADD COLUMN raw bytea;
