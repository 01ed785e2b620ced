//! The call and sweep log: every API call recorded before it is sent (the budget after a
//! restart, the reports' call counts) and one row per sweep.

use std::time::{Duration, SystemTime};

use crate::budget::PastCall;
use crate::domain::{Endpoint, format_time, parse_time};

use super::{CheckSummary, Result, Store, SweepRecord, SweepRow, read_time};

impl Store {
    pub async fn start_sweep(&self, filter: &str, started: SystemTime) -> Result<i64> {
        // `execute`, not `fetch_one` of a RETURNING: a statement read only to its first row
        // commits (in autocommit) when it is reset, and a commit that fails there (a full
        // disk) is not reported: the caller would get an id for a row that was never written.
        Ok(
            sqlx::query("INSERT INTO sweeps (started_at, filter) VALUES (?1, ?2)")
                .bind(format_time(started))
                .bind(filter)
                .execute(self.writer())
                .await?
                .last_insert_rowid(),
        )
    }

    pub async fn finish_sweep(&self, id: i64, done: &SweepRecord, at: SystemTime) -> Result<()> {
        sqlx::query(
            "UPDATE sweeps SET finished_at = ?2, pages = ?3, listed = ?4, checked = ?5,
               changed = ?6, missing = ?7, outcome = ?8, discovered = ?9 WHERE id = ?1",
        )
        .bind(id)
        .bind(format_time(at))
        .bind(done.pages)
        .bind(done.listed as i64)
        .bind(done.checked as i64)
        .bind(done.changed as i64)
        .bind(done.missing as i64)
        .bind(done.outcome)
        .bind(done.discovered as i64)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Records an API call before it is sent, so the budget is right even after a crash.
    /// `sweep` names the sweep a listing page belongs to.
    pub async fn start_api_call(
        &self,
        endpoint: Endpoint,
        action_count: usize,
        sweep: Option<i64>,
        sent_at: SystemTime,
    ) -> Result<i64> {
        // `execute` for the reason given in `start_sweep`: the call goes out only once its
        // row is known to be committed.
        Ok(sqlx::query(
            "INSERT INTO api_calls (sent_at, endpoint, action_count, sweep_id)
             VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(format_time(sent_at))
        .bind(endpoint.as_str())
        .bind(action_count as i64)
        .bind(sweep)
        .execute(self.writer())
        .await?
        .last_insert_rowid())
    }

    pub async fn finish_api_call(
        &self,
        id: i64,
        http_status: Option<u16>,
        outcome: &str,
        retry_after: Option<Duration>,
        duration: Duration,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE api_calls SET http_status = ?2, outcome = ?3, retry_after_ms = ?4,
               duration_ms = ?5 WHERE id = ?1",
        )
        .bind(id)
        .bind(http_status)
        .bind(outcome)
        .bind(retry_after.map(|d| d.as_millis() as i64))
        .bind(duration.as_millis() as i64)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Calls sent since `since`, oldest first, for rebuilding the rate budget at start.
    pub async fn api_calls_since(&self, since: SystemTime) -> Result<Vec<PastCall>> {
        let rows: Vec<(String, Option<i64>)> = sqlx::query_as(
            "SELECT sent_at, retry_after_ms FROM api_calls WHERE sent_at >= ?1 ORDER BY sent_at",
        )
        .bind(format_time(since))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(|(sent, retry)| {
                let sent_at = read_time(&sent)?;
                Ok(PastCall {
                    sent_at,
                    retry_not_before: retry.map(|ms| sent_at + Duration::from_millis(ms as u64)),
                })
            })
            .collect()
    }

    /// Sweeps, newest first.
    pub async fn sweeps(&self, limit: u32) -> Result<Vec<SweepRow>> {
        Ok(
            sqlx::query_as("SELECT * FROM sweeps ORDER BY id DESC LIMIT ?1")
                .bind(limit)
                .fetch_all(&self.reader)
                .await?,
        )
    }

    pub async fn sweeps_since(&self, since: SystemTime) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM sweeps WHERE started_at >= ?1")
                .bind(format_time(since))
                .fetch_one(&self.reader)
                .await?,
        )
    }

    /// Checks made since `since` (calls by id that answered, plus sweeps' findings) and the
    /// active actions now, for the effective check interval.
    pub async fn check_summary(&self, since: SystemTime, now: SystemTime) -> Result<CheckSummary> {
        let (by_id, swept, first, active): (i64, i64, Option<String>, i64) = sqlx::query_as(
            "SELECT
               (SELECT coalesce(sum(action_count), 0) FROM api_calls
                 WHERE sent_at >= ?1 AND sweep_id IS NULL AND outcome = 'ok'),
               (SELECT coalesce(sum(checked), 0) FROM sweeps WHERE started_at >= ?1),
               (SELECT min(sent_at) FROM api_calls WHERE sent_at >= ?1),
               (SELECT count(*) FROM actions WHERE tracking = 'active')",
        )
        .bind(format_time(since))
        .fetch_one(&self.reader)
        .await?;
        let window_seconds = first
            .as_deref()
            .and_then(parse_time)
            .and_then(|f| now.duration_since(f).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        Ok(CheckSummary {
            window_seconds,
            checks: by_id + swept,
            active,
        })
    }

    pub async fn api_call_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM api_calls")
            .fetch_one(&self.reader)
            .await?)
    }

    /// Drops the call log older than `before`; the budget needs only the last hour.
    /// Sweeps that ended before `before` go with their calls.
    pub async fn prune_api_calls(&self, before: SystemTime) -> Result<u64> {
        let before = format_time(before);
        let mut tx = self.writer().begin_with("BEGIN IMMEDIATE").await?;
        let calls = sqlx::query("DELETE FROM api_calls WHERE sent_at < ?1")
            .bind(&before)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM sweeps WHERE finished_at < ?1")
            .bind(&before)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(calls)
    }
}
