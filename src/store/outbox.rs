//! The notification outbox: events written in the transaction of the transition they
//! report (so none is ever lost or invented), the deliveries the senders take, and what
//! the operators' commands read and reset. Routing happens here, in SQL, against the
//! `notify_destinations` rows the daemon writes at start; the store knows nothing of HTTP.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use sqlx::FromRow;

use crate::domain::{ACTION_FIELDS, ActionStatus, DeliveryState, format_time};

use super::reads::{age_seconds_sql, type_allowed_sql};
use super::{Result, Store, json_array, read_time, sql_list};

/// One configured destination, as the daemon writes it at start for routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub kind: String,
    /// `transition`, `terminal`, `stuck`.
    pub events: Vec<String>,
    /// Empty: any.
    pub types: Vec<String>,
    /// Empty: any.
    pub statuses: Vec<String>,
}

/// What a caller may attach to the ids it enqueues (checked by `intake`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyRequest {
    /// Free text echoed in every event of these actions.
    pub correlation: Option<String>,
    /// This URL receives these actions' events (replacing an earlier one).
    pub callback_url: Option<String>,
}

impl NotifyRequest {
    pub fn is_empty(&self) -> bool {
        self.correlation.is_none() && self.callback_url.is_none()
    }
}

/// The destination name of per-action callback URLs (defined with the domain, which config
/// also reads, so that config need not import the store).
pub use crate::domain::CALLBACK;

/// A delivery a sender may attempt now: the head of its action's queue, due.
#[derive(Debug, Clone, FromRow)]
pub struct DueDelivery {
    pub event: i64,
    pub event_id: String,
    pub event_type: String,
    pub action_id: Option<String>,
    pub payload: String,
    pub attempts: i64,
    /// The action's callback URL (destination `callback` only).
    pub callback_url: Option<String>,
}

/// What became of one attempt.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryResult {
    pub event: i64,
    pub state: DeliveryState,
    pub next_attempt_at: Option<String>,
    pub status: Option<u16>,
    pub error: Option<String>,
}

impl DeliveryResult {
    pub fn new(
        event: i64,
        state: DeliveryState,
        next: Option<SystemTime>,
        status: Option<u16>,
        error: Option<String>,
    ) -> Self {
        Self {
            event,
            state,
            next_attempt_at: next.map(format_time),
            status,
            error,
        }
    }
}

/// A destination's standing, for its sender and `notify list`.
#[derive(Debug, Clone, Default, FromRow, Serialize)]
pub struct DestinationRow {
    pub name: String,
    pub kind: String,
    pub configured: bool,
    pub failing_since: Option<String>,
    pub disabled_at: Option<String>,
    pub disabled_reason: Option<String>,
}

/// Deliveries of one destination by state, with the creation time of the oldest pending event.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeliveryCounts {
    pub destination: String,
    pub pending: i64,
    pub delivered: i64,
    pub dead: i64,
    /// Pending deliveries already attempted at least once.
    pub retrying: i64,
    pub oldest_pending: Option<String>,
}

/// One delivery with its event, for `notify list`.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct DeliveryRow {
    pub destination: String,
    pub event_id: String,
    #[sqlx(rename = "type")]
    #[serde(rename = "type")]
    pub event_type: String,
    pub action_id: Option<String>,
    pub seq: Option<i64>,
    pub created_at: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: Option<String>,
    pub last_attempt_at: Option<String>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub finished_at: Option<String>,
}

/// Which events `replay` sends again.
#[derive(Debug, Clone)]
pub enum ReplaySelection {
    Events(Vec<String>),
    Since(SystemTime),
}

/// The statuses after which MDE changes nothing, as an SQL list.
static TERMINAL_SQL: LazyLock<String> =
    LazyLock::new(|| sql_list(ActionStatus::TERMINAL.iter().map(ActionStatus::as_str)));

/// Free text kept in an event is cut here, so an envelope stays well under 20 KB.
const TEXT_CAP: &str = "2000";

/// The `data` object of an event, from the action row `a` (as this transaction left it),
/// `seq`, and `observed` (SQL expressions).
fn event_data(extra: &str) -> String {
    let fields: String = ACTION_FIELDS
        .iter()
        .map(|f| {
            if f.free_text {
                format!(
                    "'{}', substr(a.{}, 1, {TEXT_CAP}),\n           ",
                    f.wire, f.column
                )
            } else {
                format!("'{}', a.{},\n           ", f.wire, f.column)
            }
        })
        .collect();
    format!(
        "json_object(
           'id', a.action_id,
           {fields}'tenantId', (SELECT value FROM report_settings WHERE name = 'tenant_id'),
           'correlation', substr(a.correlation, 1, {TEXT_CAP}),
           {extra})"
    )
}

/// Any destination or callback could want an event of this action.
const ANY_RECEIVER: &str = "(EXISTS (SELECT 1 FROM notify_destinations
        WHERE configured AND disabled_at IS NULL)
     OR EXISTS (SELECT 1 FROM action_callbacks c WHERE c.action_id = a.action_id))";

/// The statement that writes a transition's events; built once.
static TRANSITION_EVENTS: LazyLock<String> = LazyLock::new(transition_events_sql);

fn transition_events_sql() -> String {
    let terminal = TERMINAL_SQL.as_str();
    let data = event_data(&format!(
        "'status', t.to_status, 'fromStatus', t.from_status,
         'terminal', json(CASE WHEN t.to_status IN {terminal} THEN 'true' ELSE 'false' END),
         'lastUpdateDateTimeUtc', t.mde_updated_at,
         'seq', f.seq, 'observedAt', t.observed_at"
    ));
    format!(
        "WITH fresh AS (
           SELECT t.id,
                  (SELECT count(*) FROM transitions p
                    WHERE p.action_id = t.action_id AND p.id <= t.id) AS seq
           FROM transitions t JOIN actions a ON a.action_id = t.action_id
           WHERE t.id IN (SELECT value FROM json_each(?1)) AND {ANY_RECEIVER})
         INSERT INTO notify_events
           (event_id, type, action_id, seq, transition_id, created_at, payload)
         SELECT 'evt_' || lower(hex(randomblob(12))), 'machine_action.status_changed',
                t.action_id, f.seq, t.id, ?2,
                json_object('type', 'machine_action.status_changed', 'timestamp', ?2,
                            'data', {data})
         FROM fresh f JOIN transitions t ON t.id = f.id
           JOIN actions a ON a.action_id = t.action_id
         ORDER BY t.id
         RETURNING id"
    )
}

/// Deliveries for the events `?1` (ids) to every destination whose filters match, and to
/// the action's callback. `matches` is the event-kind condition on `d.events`.
fn deliveries_sql(status: &str, matches: &str) -> String {
    let type_allowed = type_allowed_sql("a", "d.types");
    format!(
        "INSERT INTO notify_deliveries (destination, event, action_id, next_attempt_at)
         SELECT d.name, e.id, e.action_id, ?2
         FROM notify_events e JOIN actions a ON a.action_id = e.action_id
           LEFT JOIN transitions t ON t.id = e.transition_id
           JOIN notify_destinations d ON d.configured AND d.disabled_at IS NULL
         WHERE e.id IN (SELECT value FROM json_each(?1))
           AND ({matches})
           AND {type_allowed}
           AND (d.statuses IS NULL OR {status} IN (SELECT value FROM json_each(d.statuses)))
         UNION ALL
         SELECT '{CALLBACK}', e.id, e.action_id, ?2
         FROM notify_events e JOIN action_callbacks c ON c.action_id = e.action_id
         WHERE e.id IN (SELECT value FROM json_each(?1))"
    )
}

fn wants(kind: &str) -> String {
    format!("EXISTS (SELECT 1 FROM json_each(d.events) WHERE value = '{kind}')")
}

const DROP_UNROUTED: &str = "DELETE FROM notify_events
    WHERE id IN (SELECT value FROM json_each(?1))
      AND NOT EXISTS (SELECT 1 FROM notify_deliveries d WHERE d.event = notify_events.id)";

/// Writes the events of the transitions `ids` (just inserted by this transaction) and their
/// deliveries. Returns how many deliveries were queued.
pub(super) async fn queue_transition_events(
    tx: &mut sqlx::SqliteConnection,
    transition_ids: &[i64],
    now: &str,
) -> Result<u64> {
    if transition_ids.is_empty() {
        return Ok(0);
    }
    let events: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(TRANSITION_EVENTS.as_str()))
        .bind(json_array(transition_ids))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
    let matches = format!(
        "{} OR (t.to_status IN {} AND {})",
        wants("transition"),
        TERMINAL_SQL.as_str(),
        wants("terminal")
    );
    route(tx, &events, now, &deliveries_sql("t.to_status", &matches)).await
}

/// Sets the correlation and callback URL given at enqueue on `ids` (tracked by now).
pub(super) async fn set_notify_request(
    tx: &mut sqlx::SqliteConnection,
    list: &str,
    request: &NotifyRequest,
    now: &str,
) -> Result<()> {
    if let Some(c) = &request.correlation {
        sqlx::query(
            "UPDATE actions SET correlation = ?2
             WHERE action_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(list)
        .bind(c)
        .execute(&mut *tx)
        .await?;
    }
    if let Some(url) = &request.callback_url {
        sqlx::query(
            "INSERT INTO action_callbacks (action_id, url, added_at)
             SELECT value, ?2, ?3 FROM json_each(?1) WHERE true
             ON CONFLICT (action_id) DO UPDATE SET url = excluded.url,
               added_at = excluded.added_at",
        )
        .bind(list)
        .bind(url)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

async fn route(
    tx: &mut sqlx::SqliteConnection,
    events: &[i64],
    now: &str,
    deliveries: &str,
) -> Result<u64> {
    if events.is_empty() {
        return Ok(0);
    }
    let list = json_array(events);
    let queued = sqlx::query(sqlx::AssertSqlSafe(deliveries.to_string()))
        .bind(&list)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query(DROP_UNROUTED)
        .bind(&list)
        .execute(&mut *tx)
        .await?;
    Ok(queued)
}

impl Store {
    /// Writes the configured destinations (routing reads them in the poll transaction);
    /// ones no longer configured keep their state with `configured = 0`.
    pub async fn sync_routes(&self, routes: &[Route], tenant_id: Option<&str>) -> Result<()> {
        let mut tx = self.writer().begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("UPDATE notify_destinations SET configured = 0")
            .execute(&mut *tx)
            .await?;
        let list = |v: &[String]| (!v.is_empty()).then(|| json_array(v));
        for r in routes {
            sqlx::query(
                "INSERT INTO notify_destinations (name, kind, events, types, statuses, configured)
                 VALUES (?1, ?2, ?3, ?4, ?5, 1)
                 ON CONFLICT (name) DO UPDATE SET kind = excluded.kind,
                   events = excluded.events, types = excluded.types,
                   statuses = excluded.statuses, configured = 1",
            )
            .bind(&r.name)
            .bind(&r.kind)
            .bind(json_array(&r.events))
            .bind(list(&r.types))
            .bind(list(&r.statuses))
            .execute(&mut *tx)
            .await?;
        }
        // Managed identity needs no tenant id in the configuration: events then say null.
        match tenant_id {
            Some(t) => sqlx::query(
                "INSERT INTO report_settings (name, value) VALUES ('tenant_id', ?1)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .bind(t),
            None => sqlx::query("DELETE FROM report_settings WHERE name = 'tenant_id'"),
        }
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Emits `machine_action.stuck` for each active action that has been active another
    /// `stuck_after` since its last one (at most `limit` per call). Returns the deliveries
    /// queued.
    pub async fn emit_stuck(
        &self,
        stuck_after: Duration,
        now: SystemTime,
        limit: u32,
    ) -> Result<u64> {
        let now_text = format_time(now);
        let (age_now, age_event) = (age_seconds_sql("?1"), age_seconds_sql("?2"));
        let mut tx = self.writer().begin_with("BEGIN IMMEDIATE").await?;
        let stuck: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "UPDATE actions SET stuck_events = CAST({age_now} / ?2 AS INTEGER)
             WHERE action_id IN (SELECT action_id FROM actions
               WHERE tracking = 'active' AND {age_now} >= (stuck_events + 1) * ?2 LIMIT ?3)
             RETURNING action_id"
        )))
        .bind(&now_text)
        .bind(stuck_after.as_secs_f64().max(1.0))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        if stuck.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        let data = event_data(&format!(
            "'status', a.status, 'stuckCount', a.stuck_events,
             'activeSeconds', round({age_event}, 0), 'seq', (SELECT count(*) FROM transitions p
               WHERE p.action_id = a.action_id), 'observedAt', a.last_polled_at"
        ));
        let events: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "INSERT INTO notify_events (event_id, type, action_id, seq, created_at, payload)
             SELECT 'evt_' || lower(hex(randomblob(12))), 'machine_action.stuck', a.action_id,
                    (SELECT count(*) FROM transitions p WHERE p.action_id = a.action_id), ?2,
                    json_object('type', 'machine_action.stuck', 'timestamp', ?2, 'data', {data})
             FROM actions a WHERE a.action_id IN (SELECT value FROM json_each(?1))
               AND {ANY_RECEIVER}
             ORDER BY a.action_id
             RETURNING id"
        )))
        .bind(json_array(&stuck))
        .bind(&now_text)
        .fetch_all(&mut *tx)
        .await?;
        let queued = route(
            &mut tx,
            &events,
            &now_text,
            &deliveries_sql("a.status", &wants("stuck")),
        )
        .await?;
        tx.commit().await?;
        Ok(queued)
    }

    /// Whether any destination wants stuck events or any action has a callback: the stuck
    /// scan costs a read of every active action, so it runs only then.
    pub async fn stuck_wanted(&self) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM notify_destinations d
                 WHERE configured AND disabled_at IS NULL AND EXISTS
                   (SELECT 1 FROM json_each(d.events) WHERE value = 'stuck'))
               OR EXISTS (SELECT 1 FROM action_callbacks)",
        )
        .fetch_one(&self.reader)
        .await?)
    }

    /// The heads of each action's queue for `destination` that are due by `now`, oldest
    /// event first: a later event of an action waits while an earlier one is pending.
    pub async fn due_deliveries(
        &self,
        destination: &str,
        now: SystemTime,
        limit: u32,
    ) -> Result<Vec<DueDelivery>> {
        Ok(sqlx::query_as(
            "SELECT d.event, e.event_id, e.type AS event_type, e.action_id, e.payload,
                    d.attempts, c.url AS callback_url
             FROM notify_deliveries d JOIN notify_events e ON e.id = d.event
               LEFT JOIN action_callbacks c ON c.action_id = d.action_id AND d.destination = ?3
             WHERE d.destination = ?1 AND d.state = 'pending' AND d.next_attempt_at <= ?2
               AND NOT EXISTS (SELECT 1 FROM notify_deliveries p
                 WHERE p.destination = d.destination AND p.action_id = d.action_id
                   AND p.state = 'pending' AND p.event < d.event)
             ORDER BY d.event LIMIT ?4",
        )
        .bind(destination)
        .bind(format_time(now))
        .bind(CALLBACK)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?)
    }

    /// When the next head of `destination`'s queues becomes due (None: nothing pending).
    pub async fn next_delivery_at(&self, destination: &str) -> Result<Option<SystemTime>> {
        let next: Option<String> = sqlx::query_scalar(
            "SELECT min(d.next_attempt_at) FROM notify_deliveries d
             WHERE d.destination = ?1 AND d.state = 'pending'
               AND NOT EXISTS (SELECT 1 FROM notify_deliveries p
                 WHERE p.destination = d.destination AND p.action_id = d.action_id
                   AND p.state = 'pending' AND p.event < d.event)",
        )
        .bind(destination)
        .fetch_one(&self.reader)
        .await?;
        next.as_deref().map(read_time).transpose()
    }

    /// Records a batch of attempts of one destination and its standing: `ok` clears the
    /// failing streak, a failure starts one; `disable` names why it is disabled now.
    pub async fn record_deliveries(
        &self,
        destination: &str,
        results: &[DeliveryResult],
        any_success: bool,
        any_failure: bool,
        disable: Option<&str>,
        now: SystemTime,
    ) -> Result<()> {
        let now = format_time(now);
        let mut tx = self.writer().begin_with("BEGIN IMMEDIATE").await?;
        if !results.is_empty() {
            sqlx::query(
                "UPDATE notify_deliveries SET state = w.state, attempts = attempts + 1,
                   next_attempt_at = w.next_attempt_at, last_attempt_at = ?2,
                   last_status = w.status, last_error = w.error,
                   finished_at = CASE WHEN w.state = 'pending' THEN NULL ELSE ?2 END
                 FROM (SELECT value ->> '$.event' AS event, value ->> '$.state' AS state,
                         value ->> '$.next_attempt_at' AS next_attempt_at,
                         value ->> '$.status' AS status, value ->> '$.error' AS error
                       FROM json_each(?1)) AS w
                 WHERE notify_deliveries.destination = ?3 AND notify_deliveries.event = w.event
                   AND notify_deliveries.state = 'pending'",
            )
            .bind(json_array(results))
            .bind(&now)
            .bind(destination)
            .execute(&mut *tx)
            .await?;
        }
        if destination != CALLBACK && (any_success || any_failure || disable.is_some()) {
            sqlx::query(
                "UPDATE notify_destinations SET
                   failing_since = CASE WHEN ?2 THEN NULL
                                        ELSE coalesce(failing_since, ?3) END,
                   disabled_at = CASE WHEN ?4 IS NULL THEN disabled_at ELSE ?3 END,
                   disabled_reason = coalesce(?4, disabled_reason)
                 WHERE name = ?1",
            )
            .bind(destination)
            .bind(any_success)
            .bind(&now)
            .bind(disable)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A callback URL answered 410 Gone: the action's remaining callback events are dead
    /// and its callback is dropped.
    pub async fn drop_callback(&self, action_id: &str, why: &str, now: SystemTime) -> Result<()> {
        let now = format_time(now);
        let mut tx = self.writer().begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "UPDATE notify_deliveries SET state = 'dead', next_attempt_at = NULL,
               finished_at = ?3, last_error = ?2
             WHERE destination = ?4 AND action_id = ?1 AND state = 'pending'",
        )
        .bind(action_id)
        .bind(why)
        .bind(&now)
        .bind(CALLBACK)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM action_callbacks WHERE action_id = ?1")
            .bind(action_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn destination(&self, name: &str) -> Result<Option<DestinationRow>> {
        Ok(sqlx::query_as(
            "SELECT name, kind, configured, failing_since, disabled_at, disabled_reason
             FROM notify_destinations WHERE name = ?1",
        )
        .bind(name)
        .fetch_optional(&self.reader)
        .await?)
    }

    pub async fn destinations(&self) -> Result<Vec<DestinationRow>> {
        Ok(sqlx::query_as(
            "SELECT name, kind, configured, failing_since, disabled_at, disabled_reason
             FROM notify_destinations ORDER BY name",
        )
        .fetch_all(&self.reader)
        .await?)
    }

    /// Clears a destination's disabled state and failing streak; true if it exists.
    pub async fn enable_destination(&self, name: &str) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE notify_destinations SET disabled_at = NULL, disabled_reason = NULL,
               failing_since = NULL WHERE name = ?1",
        )
        .bind(name)
        .execute(self.writer())
        .await?
        .rows_affected()
            > 0)
    }

    /// Deliveries by destination and state (every destination that has any).
    pub async fn delivery_counts(&self) -> Result<Vec<DeliveryCounts>> {
        let rows: Vec<(String, String, i64, i64, Option<String>)> = sqlx::query_as(
            "SELECT d.destination, d.state, count(*), sum(d.attempts > 0),
                    min(CASE WHEN d.state = 'pending' THEN e.created_at END)
             FROM notify_deliveries d JOIN notify_events e ON e.id = d.event
             GROUP BY d.destination, d.state ORDER BY d.destination",
        )
        .fetch_all(&self.reader)
        .await?;
        let mut out: Vec<DeliveryCounts> = Vec::new();
        for (destination, state, n, tried, oldest) in rows {
            if out.last().is_none_or(|c| c.destination != destination) {
                out.push(DeliveryCounts {
                    destination: destination.clone(),
                    ..Default::default()
                });
            }
            let c = out.last_mut().expect("pushed above");
            match state.as_str() {
                "pending" => {
                    c.pending = n;
                    c.retrying = tried;
                    c.oldest_pending = oldest;
                }
                "delivered" => c.delivered = n,
                _ => c.dead = n,
            }
        }
        Ok(out)
    }

    /// Deliveries newest first; `state` narrows to `pending`/`dead`, `retrying` to pending
    /// ones attempted at least once.
    pub async fn deliveries(
        &self,
        state: Option<&str>,
        retrying: bool,
        limit: u32,
    ) -> Result<Vec<DeliveryRow>> {
        Ok(sqlx::query_as(
            "SELECT d.destination, e.event_id, e.type, e.action_id, e.seq, e.created_at,
                    d.state, d.attempts, d.next_attempt_at, d.last_attempt_at, d.last_status,
                    d.last_error, d.finished_at
             FROM notify_deliveries d JOIN notify_events e ON e.id = d.event
             WHERE (?1 IS NULL OR d.state = ?1) AND (NOT ?2 OR d.attempts > 0)
             ORDER BY e.id DESC, d.destination LIMIT ?3",
        )
        .bind(state)
        .bind(retrying)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?)
    }

    /// Makes the selected events pending again (attempts from zero, due now) for the
    /// destinations that had them, or for `to` alone (adding its delivery if it had none).
    /// The event keeps its id, so a receiver can tell a replay from a new event. Returns
    /// how many deliveries were queued.
    pub async fn replay(
        &self,
        selection: &ReplaySelection,
        to: Option<&str>,
        now: SystemTime,
    ) -> Result<u64> {
        let (filter, value) = match selection {
            ReplaySelection::Events(ids) => (
                "event_id IN (SELECT value FROM json_each(?1))",
                json_array(ids),
            ),
            ReplaySelection::Since(t) => ("created_at >= ?1", format_time(*t)),
        };
        let now = format_time(now);
        let sql = match to {
            Some(_) => format!(
                "INSERT INTO notify_deliveries (destination, event, action_id, next_attempt_at)
                 SELECT ?3, id, action_id, ?2 FROM notify_events WHERE {filter} ORDER BY id
                 ON CONFLICT (destination, event) DO UPDATE SET state = 'pending',
                   attempts = 0, next_attempt_at = excluded.next_attempt_at,
                   finished_at = NULL"
            ),
            None => format!(
                "UPDATE notify_deliveries SET state = 'pending', attempts = 0,
                   next_attempt_at = ?2, finished_at = NULL
                 WHERE event IN (SELECT id FROM notify_events WHERE {filter})
                   AND (?3 IS NULL OR destination = ?3)"
            ),
        };
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(value)
            .bind(now)
            .bind(to)
            .execute(self.writer())
            .await?
            .rows_affected())
    }

    /// Deletes delivered and dead deliveries finished before `before`, then events left
    /// with none; a batch at a time. Pending deliveries are never pruned.
    pub async fn prune_outbox(&self, before: SystemTime, batch: u32) -> Result<u64> {
        let before = format_time(before);
        let mut tx = self.writer().begin_with("BEGIN IMMEDIATE").await?;
        let gone = sqlx::query(
            "DELETE FROM notify_deliveries WHERE (destination, event) IN
               (SELECT destination, event FROM notify_deliveries
                WHERE finished_at IS NOT NULL AND finished_at < ?1 LIMIT ?2)",
        )
        .bind(&before)
        .bind(batch)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "DELETE FROM notify_events WHERE id IN
               (SELECT id FROM notify_events e WHERE created_at < ?1
                  AND NOT EXISTS (SELECT 1 FROM notify_deliveries d WHERE d.event = e.id)
                LIMIT ?2)",
        )
        .bind(&before)
        .bind(batch)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(gone)
    }
}
