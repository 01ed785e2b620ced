-- Schema 1.4: notifications through a transactional outbox. Additive only.
-- An event row and its deliveries are written in the same transaction as the transition
-- they report, so a transition is never recorded without its events (docs/schema.md).

-- Free text the caller gave at enqueue (`correlation`), echoed in every event of the action.
ALTER TABLE actions ADD COLUMN correlation TEXT;
-- How many machine_action.stuck events the action has produced: one each report.stuck_after
-- it stays active.
ALTER TABLE actions ADD COLUMN stuck_events INTEGER NOT NULL DEFAULT 0;

-- The per-request callback URL of an action (POST /v1/actions or enqueue --callback-url).
-- Apart from `actions` because such URLs often carry a signature (a Logic App's sig=):
-- the reports never read this table, and logs name only the host.
CREATE TABLE action_callbacks (
    action_id  TEXT PRIMARY KEY NOT NULL REFERENCES actions (action_id) ON DELETE CASCADE,
    url        TEXT NOT NULL,
    added_at   TEXT NOT NULL
) WITHOUT ROWID;

-- The [[notify]] destinations of the running configuration (rewritten at each start; a
-- destination no longer configured keeps its row with configured = 0) and what the daemon
-- knows of each. `events`, `types` and `statuses` are JSON arrays; NULL means any.
CREATE TABLE notify_destinations (
    name             TEXT PRIMARY KEY NOT NULL,
    kind             TEXT NOT NULL,
    events           TEXT NOT NULL,
    types            TEXT,
    statuses         TEXT,
    configured       INTEGER NOT NULL DEFAULT 1,
    -- First failure since the last success; NULL while deliveries succeed.
    failing_since    TEXT,
    -- Set on a 410 answer or after notify.disable_after of continuous failure; cleared by
    -- `mde-actiond notify enable NAME`. A disabled destination gets no new events.
    disabled_at      TEXT,
    disabled_reason  TEXT
) WITHOUT ROWID;

-- One row per event: `event_id` is the Standard Webhooks `webhook-id`, unchanged across
-- retries and replays; `payload` is the envelope exactly as webhooks receive it.
CREATE TABLE notify_events (
    id             INTEGER PRIMARY KEY,
    event_id       TEXT NOT NULL UNIQUE,
    type           TEXT NOT NULL,
    action_id      TEXT,
    -- The action's transition count at this event (1 = its first status).
    seq            INTEGER,
    transition_id  INTEGER,
    created_at     TEXT NOT NULL,
    payload        TEXT NOT NULL
);

CREATE INDEX notify_events_created ON notify_events (created_at);

-- One row per event and destination ('callback' for the action's own callback URL).
CREATE TABLE notify_deliveries (
    destination      TEXT NOT NULL,
    event            INTEGER NOT NULL REFERENCES notify_events (id) ON DELETE CASCADE,
    action_id        TEXT,
    state            TEXT NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT,
    last_attempt_at  TEXT,
    -- The last answer's HTTP status (NULL: none, e.g. a timeout) and error text.
    last_status      INTEGER,
    last_error       TEXT,
    finished_at      TEXT,
    PRIMARY KEY (destination, event),
    CHECK ((state = 'pending') = (next_attempt_at IS NOT NULL)),
    CHECK ((state = 'pending') = (finished_at IS NULL))
) WITHOUT ROWID;

-- A sender's question: what is due for my destination, oldest event first.
CREATE INDEX notify_deliveries_due ON notify_deliveries (destination, state, next_attempt_at);
-- Order per action: an event waits while an earlier one of the same action is pending.
CREATE INDEX notify_deliveries_order ON notify_deliveries (destination, action_id, state, event);
-- Deleting an event (retention) finds its deliveries.
CREATE INDEX notify_deliveries_event ON notify_deliveries (event);
CREATE INDEX notify_deliveries_finished ON notify_deliveries (finished_at)
    WHERE finished_at IS NOT NULL;

UPDATE schema_info SET value = '4' WHERE name = 'minor';
