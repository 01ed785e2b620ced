//! The queue: what intake adds, what the loop takes when due, and the one transaction
//! that records each answer (transitions decided in SQL, returned with `RETURNING`).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tracing::instrument;

use crate::domain::{ActionId, ActionStatus, Source, Tracking, format_time};

use super::{
    ACTIVE_AMONG, CommittedTransition, DueAction, Enqueued, NotifyRequest, PollWrite,
    RECORD_OBSERVED, RECORD_SCHEDULE, RECORD_TRANSITIONS, Result, SWEEP_DUE, SWEEP_INDEX,
    SWEEP_INDEX_CHUNK, SWEEP_INDEX_UNOBSERVED, SWEEP_RECORD, Store, StoreError, Tracked,
    WriteSummary, distinct_groups, due_from_row, finished_among, id_list, json_array, outbox,
    parse_tracking, read_time, rows_to_write,
};

impl Store {
    /// Adds ids to the queue in one transaction; known ids are left as they are.
    pub async fn enqueue(&self, ids: &[ActionId], now: SystemTime) -> Result<Vec<Enqueued>> {
        self.enqueue_with(ids, now, Source::Cli, &NotifyRequest::default())
            .await
    }

    /// `enqueue`, attaching `request` (correlation, callback URL) to every id in the same
    /// transaction, known ids included.
    #[instrument(skip_all, fields(count = ids.len()))]
    pub async fn enqueue_with(
        &self,
        ids: &[ActionId],
        now: SystemTime,
        source: Source,
        request: &NotifyRequest,
    ) -> Result<Vec<Enqueued>> {
        // One statement per chunk rather than per id: 100,000 ids go in within a second
        // instead of a quarter of a minute of per-row round trips.
        const CHUNK: usize = 10_000;
        let now = format_time(now);
        let mut tx = self.writer().begin_with("BEGIN IMMEDIATE").await?;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let list = id_list(chunk);
            let before: Vec<(String, String)> = sqlx::query_as(
                "SELECT action_id, tracking FROM actions
                 WHERE action_id IN (SELECT value FROM json_each(?1))",
            )
            .bind(&list)
            .fetch_all(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO actions (action_id, tracking, enqueued_at, next_poll_at, source)
                 SELECT value, 'active', ?2, ?2, ?3 FROM json_each(?1) WHERE true ORDER BY value
                 ON CONFLICT (action_id) DO NOTHING",
            )
            .bind(&list)
            .bind(&now)
            .bind(source.as_str())
            .execute(&mut *tx)
            .await?;
            if !request.is_empty() {
                outbox::set_notify_request(&mut tx, &list, request, &now).await?;
            }
            let mut known: HashMap<&str, Tracking> = HashMap::with_capacity(before.len());
            for (id, tracking) in &before {
                known.insert(id.as_str(), parse_tracking(tracking)?);
            }
            for id in chunk {
                // A repeat within the input finds the row its first occurrence added.
                match known.entry(id.as_str()) {
                    std::collections::hash_map::Entry::Occupied(e) => {
                        out.push(Enqueued::Known(*e.get()))
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(Tracking::Active);
                        out.push(Enqueued::Added);
                    }
                }
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    /// The ids among `ids` that have no row at all (a read: most listed actions a sweep
    /// meets are known, finished ones included, and need no write).
    pub async fn unknown_among(&self, ids: &[ActionId]) -> Result<Vec<ActionId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let known: Vec<String> = sqlx::query_scalar(
            "SELECT action_id FROM actions WHERE action_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(id_list(ids))
        .fetch_all(&self.reader)
        .await?;
        let known: std::collections::HashSet<&str> = known.iter().map(String::as_str).collect();
        Ok(ids
            .iter()
            .filter(|id| !known.contains(id.as_str()))
            .cloned()
            .collect())
    }

    /// Starts tracking the actions among `ids` that are not tracked yet (a sweep found
    /// them: source `discovered`), due now; returns them as the scheduler sees them.
    pub async fn discover_among(
        &self,
        ids: &[ActionId],
        now: SystemTime,
    ) -> Result<Vec<DueAction>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "INSERT INTO actions (action_id, tracking, enqueued_at, next_poll_at, source)
             SELECT value, 'active', ?2, ?2, 'discovered' FROM json_each(?1) WHERE true
             ORDER BY value
             ON CONFLICT (action_id) DO NOTHING
             RETURNING action_id, status, poll_count, enqueued_at, next_poll_at, mde_updated_at",
        )
        .bind(id_list(ids))
        .bind(format_time(now))
        .fetch_all(self.writer())
        .await?;
        rows.iter().map(due_from_row).collect()
    }

    /// When the discovery backfill (poll.discover_since) completed, if it did.
    pub async fn discovery_backfilled(&self) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT value FROM report_settings WHERE name = 'discovery_backfilled_at'",
        )
        .fetch_optional(&self.reader)
        .await?)
    }

    pub async fn mark_discovery_backfilled(&self, now: SystemTime) -> Result<()> {
        sqlx::query(
            "INSERT INTO report_settings (name, value) VALUES ('discovery_backfilled_at', ?1)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(format_time(now))
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// When the last complete listing by creation time started (the point discovery
    /// continues from after a restart), if any is on record.
    pub async fn last_window_sweep(&self) -> Result<Option<SystemTime>> {
        let started: Option<String> = sqlx::query_scalar(
            "SELECT max(started_at) FROM sweeps
             WHERE filter = 'created_since' AND outcome = 'complete'",
        )
        .fetch_one(&self.reader)
        .await?;
        started.as_deref().map(read_time).transpose()
    }

    /// Active actions due by `horizon`, soonest first.
    #[instrument(skip_all)]
    pub async fn due_actions(&self, horizon: SystemTime, limit: u32) -> Result<Vec<DueAction>> {
        let rows = sqlx::query(
            "SELECT action_id, status, poll_count, enqueued_at, next_poll_at, mde_updated_at
             FROM actions WHERE tracking = 'active' AND next_poll_at <= ?1
             ORDER BY next_poll_at LIMIT ?2",
        )
        .bind(format_time(horizon))
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(due_from_row).collect()
    }

    /// How many active actions are due by `horizon`, counting no further than `cap`.
    pub async fn count_due(&self, horizon: SystemTime, cap: u32) -> Result<u32> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM actions
               WHERE tracking = 'active' AND next_poll_at <= ?1 LIMIT ?2)",
        )
        .bind(format_time(horizon))
        .bind(cap)
        .fetch_one(&self.reader)
        .await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    pub async fn active_count(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM actions WHERE tracking = 'active'")
            .fetch_one(&self.reader)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The active actions among `ids` (one page of a sweep), as the scheduler needs them.
    // `+tracking` keeps SQLite from walking every active row through the tracking index:
    // looking up each listed id by key is what scales to a 10,000-action page.
    pub async fn active_among(&self, ids: &[ActionId]) -> Result<Vec<DueAction>> {
        let list = id_list(ids);
        let rows = sqlx::query(ACTIVE_AMONG)
            .bind(list)
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(due_from_row).collect()
    }

    /// Moves every active action's next poll `back` earlier (the wall clock stepped back by
    /// that much), never before `now`'s view of due: returns how many moved.
    pub async fn shift_schedule_back(&self, back: Duration, now: SystemTime) -> Result<u64> {
        let modifier = format!("-{:.3} seconds", back.as_secs_f64());
        Ok(sqlx::query(
            "UPDATE actions SET next_poll_at =
               max(?2, strftime('%Y-%m-%dT%H:%M:%fZ', next_poll_at, ?1))
             WHERE tracking = 'active' AND next_poll_at > ?2",
        )
        .bind(modifier)
        .bind(format_time(now))
        .execute(self.writer())
        .await?
        .rows_affected())
    }

    /// Brings back to `active` (due now) the actions among `ids` that had ended `not_found`:
    /// a listing holds them, so MDE knows them after all (new ids become visible late).
    /// Returns the ids revived.
    pub async fn revive_among(&self, ids: &[ActionId], now: SystemTime) -> Result<Vec<ActionId>> {
        let revived: Vec<String> = sqlx::query_scalar(
            "UPDATE actions SET tracking = 'active', next_poll_at = ?2, finished_at = NULL,
               revived_at = ?2
             WHERE action_id IN (SELECT value FROM json_each(?1)) AND +tracking = 'not_found'
             RETURNING action_id",
        )
        .bind(id_list(ids))
        .bind(format_time(now))
        .fetch_all(self.writer())
        .await?;
        revived
            .iter()
            .map(|id| ActionId::parse(id).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect()
    }

    /// What a sweep compares each listed action with, in one read of the
    /// `actions_tracking` index (it holds the status and the key: no table row is read):
    /// every active action's last status, and the actions that had ended `not_found` (a
    /// listing brings them back). About 60 bytes an action.
    pub async fn sweep_index(&self, due_by: SystemTime) -> Result<HashMap<u128, Tracked>> {
        let mut out = HashMap::new();
        self.fill_sweep_index(&mut out, due_by).await?;
        Ok(out)
    }

    /// `sweep_index` into a map that is emptied first: a sweep keeps the map's memory for
    /// the next one.
    pub async fn fill_sweep_index(
        &self,
        out: &mut HashMap<u128, Tracked>,
        due_by: SystemTime,
    ) -> Result<()> {
        out.clear();
        let due_by = format_time(due_by);
        // One row of fixed-width records rather than 100,000 rows (each row is a hop from
        // the database thread): the id (36 characters, a CHECK guarantees it), 1 for
        // not_found, and a digit for the status. A status this version does not know is
        // read apart (rare).
        let mut other = Vec::new();
        let parts = [
            (Tracking::Active, SWEEP_INDEX_UNOBSERVED),
            (Tracking::Active, SWEEP_INDEX.as_str()),
            (Tracking::NotFound, SWEEP_INDEX_UNOBSERVED),
            (Tracking::NotFound, SWEEP_INDEX.as_str()),
        ];
        for (tracking, sql) in parts {
            // Keyset chunks through the (tracking, status) index, in its order.
            let (mut status, mut after) = (String::new(), String::new());
            loop {
                // The chunk's text, and its last (status, id) in index order.
                let (text, last): (String, Option<String>) = sqlx::query_as(sql)
                    .bind(tracking.as_str())
                    .bind(&status)
                    .bind(&after)
                    .bind(SWEEP_INDEX_CHUNK)
                    .fetch_one(&self.reader)
                    .await?;
                let records = read_index_records(&text, out, &mut other)?;
                match resume_after(last, records == SWEEP_INDEX_CHUNK as usize) {
                    Some(key) => (status, after) = key,
                    None => break,
                }
            }
        }
        self.mark_due_soon(out, &due_by).await?;
        if !other.is_empty() {
            self.read_other_statuses(out, &other).await?;
        }
        Ok(())
    }

    /// Marks the index's actions due before `due_by`, reading the `actions_due` index in
    /// chunks: one list of them all was, at 100,000 just observed, megabytes of text at
    /// once (and its copies).
    async fn mark_due_soon(&self, out: &mut HashMap<u128, Tracked>, due_by: &str) -> Result<()> {
        let (mut next, mut after) = (String::new(), String::new());
        loop {
            let (text, last): (String, Option<String>) = sqlx::query_as(SWEEP_DUE)
                .bind(due_by)
                .bind(&next)
                .bind(&after)
                .bind(SWEEP_INDEX_CHUNK)
                .fetch_one(&self.reader)
                .await?;
            if !text.is_ascii() || !text.len().is_multiple_of(36) {
                return Err(index_corrupt("due ids of the wrong width"));
            }
            for id in text.as_bytes().chunks(36) {
                let id = std::str::from_utf8(id).map_err(|_| index_corrupt("not text"))?;
                if let Some(t) = crate::domain::guid_key(id).and_then(|k| out.get_mut(&k)) {
                    t.due_soon = true;
                }
            }
            match resume_after(last, text.len() / 36 == SWEEP_INDEX_CHUNK as usize) {
                Some(key) => (next, after) = key,
                None => break,
            }
        }
        Ok(())
    }

    /// The statuses this version does not know, read apart for the index (rare).
    async fn read_other_statuses(
        &self,
        out: &mut HashMap<u128, Tracked>,
        other: &[String],
    ) -> Result<()> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT action_id, status FROM actions
             WHERE action_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json_array(other))
        .fetch_all(&self.reader)
        .await?;
        for (id, status) in rows {
            if let Some(t) = crate::domain::guid_key(&id).and_then(|k| out.get_mut(&k)) {
                t.status = Some(ActionStatus::parse(&status));
            }
        }
        Ok(())
    }

    /// The highest transition id (0 when there is none).
    pub async fn last_transition_id(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM transitions")
                .fetch_one(&self.reader)
                .await?,
        )
    }

    /// Active actions enqueued after `since` that no answer has described yet: how many,
    /// and their mean enqueue time in seconds after `since`.
    pub async fn unseen_arrivals(&self, since: SystemTime) -> Result<(u64, f64)> {
        let (n, mean): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), avg((julianday(enqueued_at) - julianday(?1)) * 86400.0)
             FROM actions WHERE tracking = 'active' AND enqueued_at > ?1 AND status IS NULL",
        )
        .bind(format_time(since))
        .fetch_one(&self.reader)
        .await?;
        Ok((u64::try_from(n).unwrap_or(0), mean.unwrap_or(0.0)))
    }

    /// The changes per second to expect from actions enqueued within `young` before
    /// `now`: one per (age + young/10) each, from the `actions_active_enqueued` index.
    pub async fn young_change_rate(&self, now: SystemTime, young: Duration) -> Result<f64> {
        let since = now.checked_sub(young).unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(sqlx::query_scalar(
            "SELECT coalesce(sum(1.0 / max(?3, (julianday(?1) - julianday(enqueued_at)) * 86400.0
                                              + ?3)), 0.0)
             FROM actions WHERE tracking = 'active' AND enqueued_at > ?2",
        )
        .bind(format_time(now))
        .bind(format_time(since))
        .bind((young.as_secs_f64() / 10.0).max(1e-3))
        .fetch_one(&self.reader)
        .await?)
    }

    /// Makes the active actions among `ids` due now (a sweep did not list them, so each
    /// needs a fetch by id). Returns how many.
    pub async fn make_due(&self, ids: &[ActionId], now: SystemTime) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        Ok(sqlx::query(
            "UPDATE actions SET next_poll_at = ?2
             WHERE action_id IN (SELECT value FROM json_each(?1)) AND +tracking = 'active'",
        )
        .bind(id_list(ids))
        .bind(format_time(now))
        .execute(self.writer())
        .await?
        .rows_affected())
    }

    /// Brings every active action polled later than `later_than` forward to `now`.
    pub async fn pull_in_polls(&self, later_than: SystemTime, now: SystemTime) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE actions SET next_poll_at = ?2 WHERE tracking = 'active' AND next_poll_at > ?1",
        )
        .bind(format_time(later_than))
        .bind(format_time(now))
        .execute(self.writer())
        .await?
        .rows_affected())
    }

    /// Writes what a batch of polls found: status, transition and schedule of each action
    /// commit together, so a crash can neither lose nor duplicate a transition.
    pub async fn record_polls(
        &self,
        writes: &[PollWrite],
        now: SystemTime,
    ) -> Result<WriteSummary> {
        let mut batch = self.begin_polls().await?;
        batch.record(writes, now, true).await?;
        batch.commit().await
    }

    /// A transaction for several `record_polls` batches: a sweep page's writes commit
    /// once (one fsync, each index page written to the WAL once) while each statement
    /// still binds a bounded batch. It holds the only write connection until committed
    /// or dropped (dropping rolls back): other writers wait for it.
    pub async fn begin_polls(&self) -> Result<PollBatch> {
        Ok(PollBatch {
            tx: self.writer().begin_with("BEGIN IMMEDIATE").await?,
            summary: WriteSummary::default(),
        })
    }
}

/// Where the next keyset chunk of the sweep's reads starts: the chunk's last key,
/// `first || char(31) || id` (a 36-character id), split in two; `None` when the chunk was
/// not full (it was the last).
fn resume_after(last: Option<String>, full: bool) -> Option<(String, String)> {
    let last = last.filter(|l| full && l.len() >= 37)?;
    let cut = last.len() - 37;
    Some((last[..cut].to_string(), last[cut + 1..].to_string()))
}

/// An open transaction of poll writes (`Store::begin_polls`).
pub struct PollBatch {
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    summary: WriteSummary,
}

impl PollBatch {
    /// Writes what a batch of polls found; `notify` queues notification events for its
    /// transitions (a discovery backfill's history is not news). Nothing is visible, nor
    /// durable, before `commit`.
    #[instrument(skip_all, fields(count = writes.len()))]
    pub async fn record(
        &mut self,
        writes: &[PollWrite],
        now: SystemTime,
        notify: bool,
    ) -> Result<()> {
        let now_text = format_time(now);
        let tx = &mut self.tx;
        let summary = &mut self.summary;
        let first = summary.transitions.len();
        // A handful of statements per batch, each taking the whole batch as one JSON array:
        // per-row statements cost a round trip to the database thread each, which made
        // writing the answers of a 10,000-action sweep page take most of a second.
        for group in distinct_groups(writes) {
            let (observed, scheduled) = rows_to_write(&group, &now_text);
            if let Some(list) = &observed {
                let mut recorded: Vec<CommittedTransition> = sqlx::query_as(RECORD_TRANSITIONS)
                    .bind(list)
                    .bind(&now_text)
                    .fetch_all(&mut **tx)
                    .await?;
                summary.transitions.append(&mut recorded);
                let tracking: Vec<String> =
                    sqlx::query_scalar(sqlx::AssertSqlSafe(RECORD_OBSERVED.as_str()))
                        .bind(list)
                        .bind(&now_text)
                        .fetch_all(&mut **tx)
                        .await?;
                summary.finished += finished_among(&tracking);
            }
            if let Some(list) = &scheduled {
                let tracking: Vec<String> = sqlx::query_scalar(RECORD_SCHEDULE)
                    .bind(list)
                    .bind(&now_text)
                    .fetch_all(&mut **tx)
                    .await?;
                summary.finished += finished_among(&tracking);
            }
        }
        if notify {
            let ids: Vec<i64> = summary.transitions[first..].iter().map(|t| t.id).collect();
            summary.deliveries += outbox::queue_transition_events(tx, &ids, &now_text).await?;
        }
        Ok(())
    }

    /// Commits every batch recorded; returns what they committed.
    pub async fn commit(self) -> Result<WriteSummary> {
        self.tx.commit().await?;
        Ok(self.summary)
    }
}

fn index_corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("sweep index: {what}"))
}

/// Reads one chunk of the sweep index's fixed-width records (`SWEEP_RECORD`: the id, 1 for
/// not_found, a digit for the status) into `out`; the ids of statuses this version does
/// not know go to `other`. Returns the records read.
fn read_index_records(
    text: &str,
    out: &mut HashMap<u128, Tracked>,
    other: &mut Vec<String>,
) -> Result<usize> {
    if !text.is_ascii() || !text.len().is_multiple_of(SWEEP_RECORD) {
        return Err(index_corrupt("records of the wrong width"));
    }
    let records = text.len() / SWEEP_RECORD;
    out.reserve(records);
    for record in text.as_bytes().chunks(SWEEP_RECORD) {
        let id = std::str::from_utf8(&record[..36]).map_err(|_| index_corrupt("not text"))?;
        let key = crate::domain::guid_key(id)
            .ok_or_else(|| index_corrupt(&format!("'{id}' is not an action id")))?;
        let status = match record[37] {
            b'0' => None,
            b'9' => {
                other.push(id.to_string());
                None
            }
            d => Some(
                ActionStatus::KNOWN
                    .get(usize::from(d.wrapping_sub(b'1')))
                    .cloned()
                    .ok_or_else(|| index_corrupt("unknown status code"))?,
            ),
        };
        let tracked = Tracked {
            status,
            not_found: record[36] == b'1',
            seen: false,
            due_soon: false,
        };
        out.insert(key, tracked);
    }
    Ok(records)
}
