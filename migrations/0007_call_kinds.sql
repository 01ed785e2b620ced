-- Schema 1.6: the kinds of API call move out of api_calls' definition.
-- Its CHECK (endpoint IN ('get', 'list')) meant a table rebuild for every new kind of call.
-- The kinds are now rows of api_call_kinds, which the daemon fills from its own list
-- (domain::Endpoint) each time it opens the file for writing, and a trigger refuses a call
-- of a kind not in it. api_calls keeps its name, columns, types and rows.

CREATE TABLE api_call_kinds (
    name TEXT PRIMARY KEY NOT NULL
) WITHOUT ROWID;
INSERT INTO api_call_kinds (name) VALUES ('get'), ('list');

-- SQLite cannot drop a CHECK: the table is rebuilt once, rows and ids kept.
CREATE TABLE api_calls_rebuilt (
    id             INTEGER PRIMARY KEY,
    sent_at        TEXT NOT NULL,
    endpoint       TEXT NOT NULL,
    action_count   INTEGER NOT NULL,
    http_status    INTEGER,
    outcome        TEXT,
    retry_after_ms INTEGER,
    duration_ms    INTEGER,
    sweep_id       INTEGER
);
INSERT INTO api_calls_rebuilt
    (id, sent_at, endpoint, action_count, http_status, outcome, retry_after_ms, duration_ms,
     sweep_id)
SELECT id, sent_at, endpoint, action_count, http_status, outcome, retry_after_ms, duration_ms,
       sweep_id
FROM api_calls;
DROP TABLE api_calls;
ALTER TABLE api_calls_rebuilt RENAME TO api_calls;
CREATE INDEX api_calls_sent ON api_calls (sent_at);

CREATE TRIGGER api_calls_known_kind BEFORE INSERT ON api_calls
WHEN NEW.endpoint NOT IN (SELECT name FROM api_call_kinds)
BEGIN
    SELECT RAISE(ABORT, 'api_calls.endpoint is not a kind of call listed in api_call_kinds');
END;

UPDATE schema_info SET value = '6' WHERE name = 'minor';
