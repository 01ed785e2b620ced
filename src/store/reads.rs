//! Reads for people and tools: one action, its transitions, lists, counts, report figures
//! and the streaming exports. Read-only connections only.

use std::time::SystemTime;

use crate::domain::{ActionId, Tracking, format_time};

use super::{
    ActionRow, Counts, Dwell, ReportCounts, Result, Store, TransitionExport, TransitionRow,
};
use crate::domain::ACTION_FIELDS;

/// SQL for an action's age in seconds at `now` (an SQL expression): since MDE created it,
/// or since it was queued while MDE has not said. Stuck events and the report agree on it.
pub(super) fn age_seconds_sql(now: &str) -> String {
    format!("(julianday({now}) - julianday(coalesce(mde_created_at, enqueued_at))) * 86400.0")
}

/// SQL: whether the type of the action `row` (an alias of `actions`) is in the JSON array
/// `types`, NULL meaning any type (a destination's `types` filter).
pub(super) fn type_allowed_sql(row: &str, types: &str) -> String {
    format!("({types} IS NULL OR {row}.action_type IN (SELECT value FROM json_each({types})))")
}

impl Store {
    /// Stays in a status that ended, from the transitions with an id above `after` (at most
    /// `limit`, in order): the status left, the action's type and how long it lasted by
    /// MDE's update times (NULL when an answer lacked one, or the previous transition
    /// recorded is not the entry into that status). The sweep cadence learns from them
    /// when actions change (`poller::hazard`).
    pub async fn dwells_after(&self, after: i64, limit: u32) -> Result<Vec<Dwell>> {
        Ok(sqlx::query_as(
            "SELECT t.id, a.action_type AS kind, t.from_status AS status,
                    CASE WHEN p.to_status = t.from_status
                         THEN (julianday(t.mde_updated_at) - julianday(p.mde_updated_at)) * 86400.0
                    END AS seconds
             FROM transitions t
             JOIN actions a ON a.action_id = t.action_id
             LEFT JOIN transitions p ON p.id = (SELECT max(q.id) FROM transitions q
                                                WHERE q.action_id = t.action_id AND q.id < t.id)
             WHERE t.id > ?1
             ORDER BY t.id LIMIT ?2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?)
    }

    /// MDE's creation time of the oldest active action that has been seen at least once.
    pub async fn oldest_active_created(&self) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT min(mde_created_at) FROM actions
             WHERE tracking = 'active' AND mde_created_at IS NOT NULL",
        )
        .fetch_one(&self.reader)
        .await?)
    }

    /// Rows of the `stuck_actions` view: active past `report.stuck_after`.
    pub async fn stuck_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM stuck_actions")
            .fetch_one(&self.reader)
            .await?)
    }

    pub async fn action(&self, id: &ActionId) -> Result<Option<ActionRow>> {
        Ok(sqlx::query_as("SELECT * FROM actions WHERE action_id = ?1")
            .bind(id.as_str())
            .fetch_optional(&self.reader)
            .await?)
    }

    pub async fn transitions(&self, id: &ActionId) -> Result<Vec<TransitionRow>> {
        Ok(sqlx::query_as(
            "SELECT id, action_id, from_status, to_status, observed_at, mde_updated_at
             FROM transitions WHERE action_id = ?1 ORDER BY id",
        )
        .bind(id.as_str())
        .fetch_all(&self.reader)
        .await?)
    }

    /// Transitions with an id above `after`, in order; for progress displays.
    pub async fn transitions_after(&self, after: i64, limit: u32) -> Result<Vec<TransitionRow>> {
        Ok(sqlx::query_as(
            "SELECT id, action_id, from_status, to_status, observed_at, mde_updated_at
             FROM transitions WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?)
    }

    /// Actions, newest enqueue first, optionally only those in one tracking state.
    pub async fn list(
        &self,
        tracking: Option<Tracking>,
        source: Option<crate::domain::Source>,
        limit: u32,
    ) -> Result<Vec<ActionRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM actions WHERE (?1 IS NULL OR tracking = ?1)
               AND (?3 IS NULL OR source = ?3)
             ORDER BY enqueued_at DESC, action_id LIMIT ?2",
        )
        .bind(tracking.map(Tracking::as_str))
        .bind(limit)
        .bind(source.map(crate::domain::Source::as_str))
        .fetch_all(&self.reader)
        .await?)
    }

    pub async fn counts(&self) -> Result<Counts> {
        let by_tracking = sqlx::query_as(
            "SELECT tracking, count(*) FROM actions GROUP BY tracking ORDER BY tracking",
        )
        .fetch_all(&self.reader)
        .await?;
        let by_status = sqlx::query_as(
            "SELECT coalesce(status, '(none yet)'), count(*) FROM actions
             GROUP BY status ORDER BY status",
        )
        .fetch_all(&self.reader)
        .await?;
        Ok(Counts {
            by_tracking,
            by_status,
        })
    }

    /// Counts by tracking state, status and type of the actions enqueued since `since`.
    pub async fn report_counts(&self, since: Option<SystemTime>) -> Result<ReportCounts> {
        let since = since.map(format_time);
        let group = |column: &'static str| {
            sqlx::query_as::<_, (String, i64)>(sqlx::AssertSqlSafe(format!(
                "SELECT coalesce({column}, '(none)'), count(*) FROM actions
                 WHERE ?1 IS NULL OR enqueued_at >= ?1 GROUP BY 1 ORDER BY 2 DESC, 1"
            )))
            .bind(since.clone())
            .fetch_all(&self.reader)
        };
        Ok(ReportCounts {
            by_tracking: group("tracking").await?,
            by_status: group("status").await?,
            by_type: group("action_type").await?,
            by_source: group("source").await?,
        })
    }

    /// The oldest active actions, oldest first.
    pub async fn oldest_active(&self, limit: u32) -> Result<Vec<ActionRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM actions WHERE tracking = 'active'
             ORDER BY coalesce(mde_created_at, enqueued_at), action_id LIMIT ?1",
        )
        .bind(limit)
        .fetch_all(&self.reader)
        .await?)
    }

    /// The most recently finished actions that did not succeed (Failed, TimeOut, Cancelled),
    /// enqueued since `since`, newest first: what `report` lists with their error and
    /// cancellation fields.
    pub async fn recent_unsuccessful(
        &self,
        since: Option<SystemTime>,
        limit: u32,
    ) -> Result<Vec<ActionRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM actions
             WHERE tracking = 'done' AND status IN ('Failed', 'TimeOut', 'Cancelled')
               AND (?1 IS NULL OR enqueued_at >= ?1)
             ORDER BY finished_at DESC, action_id LIMIT ?2",
        )
        .bind(since.map(format_time))
        .bind(limit)
        .fetch_all(&self.reader)
        .await?)
    }

    /// Seconds from creation to terminal status of finished actions enqueued since `since`,
    /// ascending.
    pub async fn times_to_terminal(&self, since: Option<SystemTime>) -> Result<Vec<f64>> {
        Ok(sqlx::query_scalar(
            "SELECT seconds_to_terminal FROM action_summary
             WHERE seconds_to_terminal IS NOT NULL AND (?1 IS NULL OR enqueued_at >= ?1)
             ORDER BY 1",
        )
        .bind(since.map(format_time))
        .fetch_all(&self.reader)
        .await?)
    }

    /// API calls sent since `since`, by endpoint and outcome.
    pub async fn api_call_summary(
        &self,
        since: Option<SystemTime>,
    ) -> Result<Vec<(String, String, i64)>> {
        Ok(sqlx::query_as(
            "SELECT endpoint, coalesce(outcome, 'no answer'), count(*) FROM api_calls
             WHERE ?1 IS NULL OR sent_at >= ?1 GROUP BY 1, 2 ORDER BY 1, 3 DESC",
        )
        .bind(since.map(format_time))
        .fetch_all(&self.reader)
        .await?)
    }

    /// Actions enqueued since `since`, oldest first, as a stream: constant memory for any
    /// number of rows.
    pub fn export_actions(
        &self,
        since: Option<SystemTime>,
    ) -> futures_util::stream::BoxStream<'_, std::result::Result<ActionRow, sqlx::Error>> {
        sqlx::query_as(
            "SELECT * FROM actions WHERE ?1 IS NULL OR enqueued_at >= ?1
             ORDER BY enqueued_at, action_id",
        )
        .bind(since.map(format_time))
        .fetch(&self.reader)
    }

    /// Transitions observed since `since`, in order, each with its action's context.
    pub fn export_transitions(
        &self,
        since: Option<SystemTime>,
    ) -> futures_util::stream::BoxStream<'_, std::result::Result<TransitionExport, sqlx::Error>>
    {
        let fields: String = ACTION_FIELDS
            .iter()
            .map(|f| format!("a.{}, ", f.column))
            .collect();
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT t.id, t.action_id, t.from_status, t.to_status, t.observed_at,
                    t.mde_updated_at, {fields}a.tracking, a.status AS current_status
             FROM transitions t JOIN actions a ON a.action_id = t.action_id
             WHERE ?1 IS NULL OR t.observed_at >= ?1
             ORDER BY t.id"
        )))
        .bind(since.map(format_time))
        .fetch(&self.reader)
    }
}
