-- Schema 1.1: what reporting tools need beyond the raw tables. Additive only.

-- The schema's version, for tools that check before they read. `major` changes only with a
-- breaking change (never within 1.x); `minor` grows with each additive migration.
CREATE TABLE schema_info (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
INSERT INTO schema_info (name, value) VALUES ('major', '1'), ('minor', '1');

-- Settings the views read; the daemon writes them from its configuration at start.
CREATE TABLE report_settings (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
INSERT INTO report_settings (name, value) VALUES ('stuck_after_seconds', '86400');

-- One row per action with its timings. Durations are seconds on MDE's clock: from
-- creation (mde_created_at) to the first InProgress and to the terminal status, as MDE
-- dated those changes (falling back to when we observed them).
CREATE VIEW action_summary AS
SELECT
    a.action_id,
    a.action_type,
    a.machine_id,
    a.computer_dns_name,
    a.requestor,
    a.tracking,
    a.status,
    a.mde_created_at,
    a.enqueued_at,
    a.finished_at,
    (SELECT coalesce(t.mde_updated_at, t.observed_at) FROM transitions t
      WHERE t.action_id = a.action_id AND t.to_status = 'InProgress'
      ORDER BY t.id LIMIT 1) AS in_progress_at,
    CASE WHEN a.tracking = 'done' THEN
      (SELECT coalesce(t.mde_updated_at, t.observed_at) FROM transitions t
        WHERE t.action_id = a.action_id ORDER BY t.id DESC LIMIT 1)
    END AS terminal_at,
    round((julianday((SELECT coalesce(t.mde_updated_at, t.observed_at) FROM transitions t
      WHERE t.action_id = a.action_id AND t.to_status = 'InProgress' ORDER BY t.id LIMIT 1))
      - julianday(a.mde_created_at)) * 86400.0, 3) AS seconds_to_in_progress,
    CASE WHEN a.tracking = 'done' THEN
      round((julianday((SELECT coalesce(t.mde_updated_at, t.observed_at) FROM transitions t
        WHERE t.action_id = a.action_id ORDER BY t.id DESC LIMIT 1))
        - julianday(a.mde_created_at)) * 86400.0, 3)
    END AS seconds_to_terminal,
    a.poll_count,
    a.error_count
FROM actions a;

-- Per device, its isolation and code-execution restriction as far as tracked actions tell:
-- the latest Succeeded Isolate/Unisolate (RestrictCodeExecution/UnrestrictCodeExecution)
-- decides. NULL where no such action was tracked. MDE has no API that lists isolated devices.
CREATE VIEW device_containment AS
WITH decided AS (
    SELECT machine_id, computer_dns_name, action_id, action_type, mde_updated_at,
           CASE WHEN action_type IN ('Isolate', 'Unisolate') THEN 'isolation'
                ELSE 'code_execution' END AS aspect
    FROM actions
    WHERE status = 'Succeeded' AND machine_id IS NOT NULL
      AND action_type IN ('Isolate', 'Unisolate', 'RestrictCodeExecution', 'UnrestrictCodeExecution')
),
latest AS (
    SELECT *, row_number() OVER (
        PARTITION BY machine_id, aspect ORDER BY mde_updated_at DESC, action_id DESC) AS rn
    FROM decided
),
devices AS (
    SELECT machine_id, max(computer_dns_name) AS computer_dns_name FROM decided GROUP BY machine_id
)
SELECT
    d.machine_id,
    d.computer_dns_name,
    CASE i.action_type WHEN 'Isolate' THEN 1 WHEN 'Unisolate' THEN 0 END AS isolated,
    i.action_id AS isolation_action_id,
    i.mde_updated_at AS isolation_changed_at,
    CASE r.action_type WHEN 'RestrictCodeExecution' THEN 1 WHEN 'UnrestrictCodeExecution' THEN 0 END
        AS code_execution_restricted,
    r.action_id AS restriction_action_id,
    r.mde_updated_at AS restriction_changed_at
FROM devices d
LEFT JOIN latest i ON i.machine_id = d.machine_id AND i.aspect = 'isolation' AND i.rn = 1
LEFT JOIN latest r ON r.machine_id = d.machine_id AND r.aspect = 'code_execution' AND r.rn = 1;

-- Per day of creation (MDE's clock; enqueue time if unknown) and action type: how many,
-- how many finished and succeeded, and time to terminal (nearest-rank percentiles).
CREATE VIEW daily_stats AS
WITH d AS (
    SELECT substr(coalesce(mde_created_at, enqueued_at), 1, 10) AS day,
           coalesce(action_type, '(unknown)') AS action_type,
           tracking, status, seconds_to_terminal
    FROM action_summary
),
ranked AS (
    SELECT d.*,
           row_number() OVER (PARTITION BY day, action_type
                              ORDER BY seconds_to_terminal IS NULL, seconds_to_terminal) AS rn,
           count(seconds_to_terminal) OVER (PARTITION BY day, action_type) AS n
    FROM d
)
SELECT
    day,
    action_type,
    count(*) AS actions,
    sum(tracking = 'done') AS finished,
    sum(status = 'Succeeded' AND tracking = 'done') AS succeeded,
    round(1.0 * sum(status = 'Succeeded' AND tracking = 'done') / nullif(sum(tracking = 'done'), 0), 4)
        AS success_rate,
    min(CASE WHEN rn >= 0.50 * n THEN seconds_to_terminal END) AS p50_seconds_to_terminal,
    min(CASE WHEN rn >= 0.95 * n THEN seconds_to_terminal END) AS p95_seconds_to_terminal
FROM ranked
GROUP BY day, action_type;

-- Active actions older than report_settings.stuck_after_seconds (report.stuck_after),
-- oldest first.
CREATE VIEW stuck_actions AS
SELECT
    a.action_id, a.action_type, a.computer_dns_name, a.status, a.mde_created_at, a.enqueued_at,
    a.last_polled_at, a.poll_count, a.error_count, a.last_error,
    round((julianday('now') - julianday(coalesce(a.mde_created_at, a.enqueued_at))) * 86400.0, 0)
        AS age_seconds
FROM actions a
WHERE a.tracking = 'active'
  AND (julianday('now') - julianday(coalesce(a.mde_created_at, a.enqueued_at))) * 86400.0
      >= (SELECT CAST(value AS REAL) FROM report_settings WHERE name = 'stuck_after_seconds')
ORDER BY coalesce(a.mde_created_at, a.enqueued_at);

-- Retention deletes finished actions by age.
CREATE INDEX actions_finished ON actions (finished_at) WHERE finished_at IS NOT NULL;
