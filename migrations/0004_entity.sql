-- Schema 1.3: more of the MachineAction entity, kept for reports. Additive only.

-- From MDE's answer (NULL when it did not say): requestSource (PublicApi, Portal, ...),
-- scope (Full/Selective isolation, Quick/Full scan), title (often null), errorHResult
-- (0 when fine), and the cancellation's requestor, comment and time.
ALTER TABLE actions ADD COLUMN request_source TEXT;
ALTER TABLE actions ADD COLUMN scope TEXT;
ALTER TABLE actions ADD COLUMN title TEXT;
ALTER TABLE actions ADD COLUMN error_hresult INTEGER;
ALTER TABLE actions ADD COLUMN cancellation_requestor TEXT;
ALTER TABLE actions ADD COLUMN cancellation_comment TEXT;
ALTER TABLE actions ADD COLUMN cancelled_at TEXT;
-- When an action that had ended `not_found` showed up in a listing and went back to
-- `active` (MDE makes new ids visible only after a while). NULL if it never did.
ALTER TABLE actions ADD COLUMN revived_at TEXT;

-- One row per command of each LiveResponse action, from the answer last kept
-- (`last_response`). Times are MDE's text as sent; errors and params are JSON arrays.
-- A "partial cancel" shows as action_status 'Cancelled' with command_status 'Completed'.
CREATE VIEW live_response_commands AS
SELECT
    a.action_id,
    a.machine_id,
    a.computer_dns_name,
    a.status AS action_status,
    c.value ->> '$.index' AS command_index,
    c.value ->> '$.command.type' AS command_type,
    c.value ->> '$.commandStatus' AS command_status,
    c.value ->> '$.startTime' AS started_at,
    c.value ->> '$.endTime' AS ended_at,
    json(coalesce(c.value -> '$.errors', '[]')) AS errors,
    json(coalesce(c.value -> '$.command.params', '[]')) AS params
FROM actions AS a,
     json_each(CASE WHEN json_valid(a.last_response) THEN a.last_response ELSE '{}' END,
               '$.commands') AS c
WHERE a.action_type = 'LiveResponse' AND c.type = 'object';

UPDATE schema_info SET value = '3' WHERE name = 'minor';
