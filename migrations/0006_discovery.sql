-- Schema 1.5: discovery (poll.discover). Additive only.

-- How the action first came to be tracked: 'cli' (enqueue, wait --enqueue), 'http'
-- (POST /v1/actions), 'discovered' (a sweep listed it and nobody had enqueued it). An id
-- enqueued later keeps its first source. NULL for rows written before 1.5.
ALTER TABLE actions ADD COLUMN source TEXT;

-- Actions a sweep started tracking because nobody had enqueued them.
ALTER TABLE sweeps ADD COLUMN discovered INTEGER NOT NULL DEFAULT 0;

UPDATE schema_info SET value = '5' WHERE name = 'minor';
