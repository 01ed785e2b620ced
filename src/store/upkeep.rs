//! Upkeep: retention, vacuum, WAL checkpoints (and a deleted `-wal`), the write probe for
//! readiness, and the report settings the views read.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::domain::format_time;

use super::{BUSY_TIMEOUT, Result, Store};

impl Store {
    /// Writes settings that the reporting views read (see `report_settings`).
    pub async fn sync_report_settings(&self, stuck_after: Duration) -> Result<()> {
        sqlx::query(
            "INSERT INTO report_settings (name, value) VALUES ('stuck_after_seconds', ?1)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(stuck_after.as_secs().to_string())
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Finished actions (and, by cascade, their transitions) that retention would delete.
    pub async fn prunable(&self, finished_before: SystemTime) -> Result<(i64, i64)> {
        let cutoff = format_time(finished_before);
        let actions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM actions WHERE finished_at IS NOT NULL AND finished_at < ?1",
        )
        .bind(&cutoff)
        .fetch_one(&self.reader)
        .await?;
        let transitions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM transitions WHERE action_id IN
               (SELECT action_id FROM actions WHERE finished_at IS NOT NULL AND finished_at < ?1)",
        )
        .bind(&cutoff)
        .fetch_one(&self.reader)
        .await?;
        Ok((actions, transitions))
    }

    /// Deletes up to `batch` finished actions older than the cutoff, with their transitions;
    /// small batches keep each write lock short.
    pub async fn prune_finished(&self, finished_before: SystemTime, batch: u32) -> Result<u64> {
        Ok(sqlx::query(
            "DELETE FROM actions WHERE action_id IN
               (SELECT action_id FROM actions
                WHERE finished_at IS NOT NULL AND finished_at < ?1 LIMIT ?2)",
        )
        .bind(format_time(finished_before))
        .bind(batch)
        .execute(self.writer())
        .await?
        .rows_affected())
    }

    /// Pages on the free list (reclaimable by `incremental_vacuum`).
    pub async fn free_pages(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("PRAGMA freelist_count")
            .fetch_one(self.writer())
            .await?)
    }

    /// Returns up to `pages` free pages to the file system (files created with
    /// auto_vacuum = INCREMENTAL; a no-op otherwise).
    pub async fn incremental_vacuum(&self, pages: u32) -> Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA incremental_vacuum({pages})"
        )))
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// A checkpoint that never waits for readers; when it caught up with the whole WAL, the
    /// file is truncated too, so a reader that held it open leaves nothing large behind.
    /// Whether the `-wal` this process writes to was deleted under it (by hand, or a
    /// cleanup job): every connection keeps writing to the unlinked file, which a crash
    /// would lose, while other processes start a new one. When so, a full checkpoint moves
    /// what the unlinked log holds into the database file and every connection is reopened
    /// (creating a new `-wal`). Returns true when that happened.
    pub async fn recover_deleted_wal(&self) -> Result<bool> {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        // The writer pool keeps a connection open, so while the file is ours it exists
        // (a TRUNCATE checkpoint leaves it empty, not gone).
        if Path::new(&wal).exists() {
            return Ok(false);
        }
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(self.writer())
            .await?;
        self.connections.renew();
        // Take the writer once now, so the new -wal exists before the next check.
        sqlx::query("SELECT 1").execute(self.writer()).await?;
        Ok(true)
    }

    pub async fn checkpoint_quietly(&self) -> Result<bool> {
        let (busy, log, done): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(self.writer())
            .await?;
        if busy != 0 || log != done || log == 0 {
            return Ok(false);
        }
        // TRUNCATE waits for readers through the busy handler; keep that wait short.
        let mut conn = self.writer().acquire().await?;
        sqlx::query("PRAGMA busy_timeout = 200")
            .execute(&mut *conn)
            .await?;
        let truncated: std::result::Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut *conn)
                .await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA busy_timeout = {}",
            BUSY_TIMEOUT.as_millis()
        )))
        .execute(&mut *conn)
        .await?;
        Ok(matches!(truncated, Ok((0, _, _))))
    }

    /// Takes and releases the write lock: proves the file is writable and not locked out.
    pub async fn check_writable(&self) -> Result<()> {
        let tx = self.writer().begin_with("BEGIN IMMEDIATE").await?;
        tx.rollback().await?;
        Ok(())
    }

    /// Folds the WAL back into the database file; called at shutdown so readers find a
    /// compact file and no stale `-wal`.
    pub async fn checkpoint(&self) -> Result<()> {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(self.writer())
            .await?;
        Ok(())
    }
}
