-- mde-actiond schema, version 1. This is a public interface: reporting tools read these
-- tables, so later migrations only add (columns, tables, views, indexes). See docs/schema.md.
-- Times are UTC RFC 3339 text with milliseconds and Z (2026-11-28T14:26:50.563Z).

CREATE TABLE actions (
    action_id          TEXT PRIMARY KEY NOT NULL
                       CHECK (length(action_id) = 36 AND action_id = lower(action_id)),
    tracking           TEXT NOT NULL DEFAULT 'active'
                       CHECK (tracking IN ('active', 'done', 'not_found', 'gave_up')),
    status             TEXT,
    action_type        TEXT,
    machine_id         TEXT,
    computer_dns_name  TEXT,
    requestor          TEXT,
    requestor_comment  TEXT,
    external_id        TEXT,
    mde_created_at     TEXT,
    mde_updated_at     TEXT,
    enqueued_at        TEXT NOT NULL,
    last_polled_at     TEXT,
    next_poll_at       TEXT,
    poll_count         INTEGER NOT NULL DEFAULT 0,
    error_count        INTEGER NOT NULL DEFAULT 0,
    last_error         TEXT,
    last_error_at      TEXT,
    finished_at        TEXT,
    last_response      TEXT,
    CHECK ((tracking = 'active') = (next_poll_at IS NOT NULL)),
    CHECK ((tracking = 'active') = (finished_at IS NULL))
) WITHOUT ROWID;

-- The scheduler's only question: which active actions are due, soonest first. Finished
-- actions keep next_poll_at NULL, so they sort apart and cost nothing here.
CREATE INDEX actions_due ON actions (tracking, next_poll_at);
CREATE INDEX actions_tracking ON actions (tracking, status);

CREATE TABLE transitions (
    id              INTEGER PRIMARY KEY,
    action_id       TEXT NOT NULL REFERENCES actions (action_id) ON DELETE CASCADE,
    from_status     TEXT,
    to_status       TEXT NOT NULL,
    observed_at     TEXT NOT NULL,
    mde_updated_at  TEXT
);

CREATE INDEX transitions_action ON transitions (action_id, id);
CREATE INDEX transitions_observed ON transitions (observed_at);

-- Every API call the daemon sent, written before it is sent, so the rate budget survives
-- restarts and reports can count what tracking cost.
CREATE TABLE api_calls (
    id           INTEGER PRIMARY KEY,
    sent_at      TEXT NOT NULL,
    endpoint     TEXT NOT NULL CHECK (endpoint IN ('get', 'list')),
    action_count INTEGER NOT NULL,
    http_status  INTEGER,
    outcome      TEXT,
    retry_after_ms INTEGER,
    duration_ms  INTEGER
);

CREATE INDEX api_calls_sent ON api_calls (sent_at);
