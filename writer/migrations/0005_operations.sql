-- Tardis schema, version 5: what day-2 operations need.
-- dead_letters: the record's `updated_at` (so a replay keeps it), and the replay lineage:
-- when it was last replayed and how often (`writer dlq replay`), and when and how it was
-- resolved (a replayed record that was then written). A letter is open while `resolved_at`
-- is NULL; it can be replayed again once it failed again after its last replay.
-- fetch_runs: cursor moves by an operator (`fetcher cursor set|reset`) are recorded beside
-- the runs, with where the cursor was and who moved it.
-- Additive: new nullable or defaulted columns and an index; older writers leave them empty.
ALTER TABLE dead_letters
    ADD COLUMN source_updated_at timestamptz,
    ADD COLUMN replayed_at timestamptz,
    ADD COLUMN replays integer NOT NULL DEFAULT 0,
    ADD COLUMN resolved_at timestamptz,
    ADD COLUMN resolution text;
CREATE INDEX dead_letters_open_idx ON dead_letters (stage, source, last_seen DESC)
    WHERE resolved_at IS NULL;
ALTER TABLE fetch_runs
    ADD COLUMN cursor_before jsonb,
    ADD COLUMN note text;
