-- Schema 1.2: tenant-wide sweeps and what tracking checks. Additive only.

-- One row per sweep: a paged listing of the tenant (`$filter` on creation time or on the
-- unfinished statuses) that checks every tracked action it lists for a few calls.
CREATE TABLE sweeps (
    id           INTEGER PRIMARY KEY,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    -- created_since | status_in | status_eq_or
    filter       TEXT NOT NULL,
    pages        INTEGER NOT NULL DEFAULT 0,
    -- actions on the pages, tracked or not
    listed       INTEGER NOT NULL DEFAULT 0,
    -- tracked active actions found on the pages: each one is a check
    checked      INTEGER NOT NULL DEFAULT 0,
    -- of those, how many had a new status
    changed      INTEGER NOT NULL DEFAULT 0,
    -- tracked active actions the listing did not hold (fetched by id right after)
    missing      INTEGER NOT NULL DEFAULT 0,
    -- complete | rejected (the filter was refused) | failed | stopped; NULL while running
    outcome      TEXT
);

CREATE INDEX sweeps_started ON sweeps (started_at);

-- The sweep a call belonged to (sweeps.id); NULL for calls that asked for actions by id.
ALTER TABLE api_calls ADD COLUMN sweep_id INTEGER;

-- A sweep lists from the creation time of the oldest tracked action.
CREATE INDEX actions_active_created ON actions (tracking, mde_created_at);

-- After a sweep, the active actions it did not list, without reading every row.
CREATE INDEX actions_active_enqueued ON actions (tracking, enqueued_at);

UPDATE schema_info SET value = '2' WHERE name = 'minor';
