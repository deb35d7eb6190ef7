-- Tardis schema, version 1.

-- One row per record: the newest version wins (source updated_at, then content hash).
CREATE TABLE records (
    source            text             NOT NULL,
    record_id         text             NOT NULL,
    payload           jsonb            NOT NULL,
    enrichment        jsonb            NOT NULL,
    model             text             NOT NULL,
    prompt_version    text             NOT NULL,
    content_hash      text             NOT NULL,
    source_updated_at timestamptz,
    prompt_tokens     bigint           NOT NULL DEFAULT 0,
    completion_tokens bigint           NOT NULL DEFAULT 0,
    cost_usd          double precision NOT NULL DEFAULT 0,
    fetched_at        timestamptz      NOT NULL,
    enriched_at       timestamptz      NOT NULL,
    written_at        timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (source, record_id)
);
-- Latest records per source, by category, by sentiment.
CREATE INDEX records_source_updated_idx ON records (source, source_updated_at DESC);
CREATE INDEX records_written_idx ON records (written_at DESC);
CREATE INDEX records_category_idx ON records ((enrichment ->> 'category'), source);
CREATE INDEX records_sentiment_idx ON records ((enrichment ->> 'sentiment'), source);

-- How far each source is durably written ("written through"), advanced with the records.
CREATE TABLE source_checkpoints (
    source            text        PRIMARY KEY,
    cursor            jsonb,
    -- Sort key of the cursor: (updated_at, id with numeric ids zero-padded).
    cursor_updated_at timestamptz,
    cursor_id_key     text,
    records_written   bigint      NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- Records given up on, with why.
CREATE TABLE dead_letters (
    stage       text        NOT NULL,
    source      text        NOT NULL,
    record_id   text        NOT NULL,
    payload     jsonb,
    reason      text        NOT NULL,
    last_error  text,
    attempts    integer     NOT NULL DEFAULT 0,
    chunk_id    text,
    run_id      text,
    occurrences integer     NOT NULL DEFAULT 1,
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL,
    PRIMARY KEY (stage, source, record_id)
);
CREATE INDEX dead_letters_source_idx ON dead_letters (source, last_seen DESC);

-- What the fetcher ran, when, and how it ended.
CREATE TABLE fetch_runs (
    source       text        NOT NULL,
    run_id       text        NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    records      bigint      NOT NULL,
    pages        bigint      NOT NULL,
    chunks       bigint      NOT NULL,
    bytes        bigint      NOT NULL,
    outcome      text        NOT NULL,
    error        text,
    cursor_after jsonb,
    PRIMARY KEY (source, run_id)
);
CREATE INDEX fetch_runs_started_idx ON fetch_runs (source, started_at DESC);
