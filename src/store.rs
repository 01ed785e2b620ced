//! The SQLite queue: pools, migrations and every SQL statement.
//!
//! One writer connection (SQLite allows one writer at a time anyway; a pool of one makes waits
//! happen in our process instead of as SQLITE_BUSY) and a few read-only connections.
//! Read-modify-write runs in `BEGIN IMMEDIATE` so it takes the write lock up front.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use sqlx::sqlite::{
    SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{FromRow, Row};
use tracing::instrument;

use crate::budget::PastCall;
use crate::domain::{ActionId, Tracking, format_time, parse_time};
pub use crate::domain::{Endpoint, Observation};

/// The schema major this version reads and writes; minors are additive (docs/schema.md).
pub const SCHEMA_MAJOR: u32 = 1;

fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations");
    // A newer minor's migrations are additive: this version keeps working on that file.
    m.set_ignore_missing(true);
    m
}

/// How long a statement waits for another process's lock before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds the WAL file after checkpoints, so a long reader cannot leave a huge file behind.
const JOURNAL_SIZE_LIMIT: &str = "4194304";
const READERS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "database {path} does not exist: the daemon creates it when it first starts (`systemctl start mde-actiond`, or `mde-actiond run`); to reach an existing one pass --db PATH, --config FILE or --tenant NAME"
    )]
    Missing { path: PathBuf },
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot migrate database {path}: {source}")]
    Migrate {
        path: PathBuf,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error(
        "{path} is not an mde-actiond database (it has tables of its own and no schema_info); refusing to touch it: check --db / [database] path"
    )]
    Foreign { path: PathBuf },
    #[error(
        "{path} holds schema {found}, written by a newer mde-actiond; this version reads schema {SCHEMA_MAJOR}.x only: run the newer version (the file is left untouched)"
    )]
    FromTheFuture { path: PathBuf, found: String },
    #[error(
        "{path} is damaged: {detail}; restore it from a backup or move it aside (the file is left untouched)"
    )]
    Damaged { path: PathBuf, detail: String },
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database holds a value this version cannot read: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// The filesystem holding the database is full (SQLITE_FULL, or ENOSPC from the OS).
    pub fn is_disk_full(&self) -> bool {
        let sql = match self {
            StoreError::Sql(e) => e,
            StoreError::Open { source, .. } => source,
            _ => return false,
        };
        match sql {
            sqlx::Error::Database(e) => {
                e.code().as_deref() == Some("13") || e.message().contains("disk is full")
            }
            sqlx::Error::Io(e) => e.raw_os_error() == Some(28),
            _ => false,
        }
    }

    /// Lock contention and I/O hiccups are worth retrying; schema or open errors are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Sql(e) => matches!(
                e,
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Database(_)
            ),
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the file if needed and apply migrations (the daemon).
    ReadWrite,
    /// Write to a file that exists already, never creating one: CLI commands, so a command
    /// pointed at the wrong place says so instead of starting a stray database the daemon
    /// never reads.
    WriteExisting,
    /// Existing file only; never writes (status, list, wait).
    ReadOnly,
}

#[derive(Clone, Debug)]
pub struct Store {
    writer: Option<SqlitePool>,
    reader: SqlitePool,
    path: PathBuf,
    connections: Arc<ConnectionEpoch>,
}

/// Connections opened before `renew` are closed when next taken from their pool, so every
/// connection of this process reopens the file: how a deleted `-wal` is replaced (each
/// connection holds the unlinked one open, and another process would start a second).
#[derive(Debug)]
struct ConnectionEpoch {
    origin: std::time::Instant,
    /// Milliseconds after `origin` of the last renewal; 0: none.
    renewed_ms: std::sync::atomic::AtomicU64,
}

impl ConnectionEpoch {
    fn new() -> Self {
        Self {
            origin: std::time::Instant::now(),
            renewed_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn renew(&self) {
        let ms = (self.origin.elapsed().as_millis() as u64).max(1);
        self.renewed_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a connection `age` old was opened before the last renewal.
    fn outdated(&self, age: Duration) -> bool {
        let renewed = self.renewed_ms.load(std::sync::atomic::Ordering::Relaxed);
        if renewed == 0 {
            return false;
        }
        let opened = self.origin.elapsed().saturating_sub(age);
        opened < Duration::from_millis(renewed)
    }
}

/// What `enqueue` did with one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    Added,
    Known(Tracking),
}

/// An action that is due (or nearly due) for a poll.
#[derive(Debug, Clone)]
pub struct DueAction {
    pub id: ActionId,
    /// The last status seen, for logs (the store decides what is a transition).
    pub status: Option<String>,
    pub poll_count: u32,
    pub enqueued_at: SystemTime,
    pub next_poll_at: SystemTime,
}

/// What one poll of one action found.
#[derive(Debug, Clone)]
pub enum PollResult {
    Observed(Box<Observation>),
    /// MDE answered 404 to the single GET.
    NotFound,
    /// The poll failed in a way that does not say anything about the action.
    Error(String),
}

/// What to do with the action after this poll.
#[derive(Debug, Clone, PartialEq)]
pub enum NextStep {
    PollAt(SystemTime),
    Finish(Tracking),
}

#[derive(Debug, Clone)]
pub struct PollWrite {
    pub id: ActionId,
    pub result: PollResult,
    pub next: NextStep,
}

/// What a sweep did, for its row in `sweeps`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepRecord {
    pub pages: u32,
    pub listed: u64,
    pub checked: u64,
    pub changed: u64,
    pub missing: u64,
    pub outcome: &'static str,
}

/// A row of `sweeps`, as reporting reads it.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct SweepRow {
    pub id: i64,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub filter: String,
    pub pages: i64,
    pub listed: i64,
    pub checked: i64,
    pub changed: i64,
    pub missing: i64,
    pub outcome: Option<String>,
}

/// How often tracked actions were checked over a window of the call log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckSummary {
    /// From the first call in the window (at most an hour back) to now.
    pub window_seconds: f64,
    /// Actions answered by calls by id plus tracked actions found by sweeps.
    pub checks: i64,
    pub active: i64,
}

impl CheckSummary {
    /// How long an active action waits between checks on average.
    pub fn effective_interval(&self) -> Option<Duration> {
        (self.checks > 0 && self.active > 0 && self.window_seconds > 0.0).then(|| {
            Duration::from_secs_f64(self.window_seconds * self.active as f64 / self.checks as f64)
        })
    }
}

/// What one write of a batch changed, for logs and progress.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteSummary {
    /// The transitions this write committed, in order; logs and metrics report these and
    /// nothing that was only observed.
    pub transitions: Vec<CommittedTransition>,
    pub finished: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct CommittedTransition {
    pub action_id: String,
    pub from_status: Option<String>,
    pub to_status: String,
    pub mde_updated_at: Option<String>,
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct ActionRow {
    pub action_id: String,
    pub tracking: String,
    pub status: Option<String>,
    pub action_type: Option<String>,
    pub machine_id: Option<String>,
    pub computer_dns_name: Option<String>,
    pub requestor: Option<String>,
    pub requestor_comment: Option<String>,
    pub external_id: Option<String>,
    pub mde_created_at: Option<String>,
    pub mde_updated_at: Option<String>,
    pub enqueued_at: String,
    pub last_polled_at: Option<String>,
    pub next_poll_at: Option<String>,
    pub poll_count: i64,
    pub error_count: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub finished_at: Option<String>,
    pub last_response: Option<String>,
    pub request_source: Option<String>,
    pub scope: Option<String>,
    pub title: Option<String>,
    pub error_hresult: Option<i64>,
    pub cancellation_requestor: Option<String>,
    pub cancellation_comment: Option<String>,
    pub cancelled_at: Option<String>,
    pub revived_at: Option<String>,
}

#[derive(Debug, Clone, FromRow, Serialize, PartialEq, Eq)]
pub struct TransitionRow {
    pub id: i64,
    pub action_id: String,
    pub from_status: Option<String>,
    pub to_status: String,
    pub observed_at: String,
    pub mde_updated_at: Option<String>,
}

/// Counts for `report`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReportCounts {
    pub by_tracking: Vec<(String, i64)>,
    pub by_status: Vec<(String, i64)>,
    pub by_type: Vec<(String, i64)>,
}

/// A transition with the context of its action, so an exported line stands alone.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct TransitionExport {
    pub id: i64,
    pub action_id: String,
    pub from_status: Option<String>,
    pub to_status: String,
    pub observed_at: String,
    pub mde_updated_at: Option<String>,
    pub action_type: Option<String>,
    pub machine_id: Option<String>,
    pub computer_dns_name: Option<String>,
    pub requestor: Option<String>,
    pub requestor_comment: Option<String>,
    pub external_id: Option<String>,
    pub mde_created_at: Option<String>,
    pub tracking: String,
    pub current_status: Option<String>,
}

/// Counts of actions by tracking state and by (last) status.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub by_tracking: Vec<(String, i64)>,
    pub by_status: Vec<(String, i64)>,
}

impl Counts {
    pub fn tracking(&self, t: Tracking) -> i64 {
        self.by_tracking
            .iter()
            .find(|(k, _)| k == t.as_str())
            .map_or(0, |(_, n)| *n)
    }

    pub fn total(&self) -> i64 {
        self.by_tracking.iter().map(|(_, n)| n).sum()
    }
}

fn connect_options(path: &Path, mode: OpenMode) -> SqliteConnectOptions {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true);
    match mode {
        OpenMode::ReadWrite | OpenMode::WriteExisting => options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // An acknowledged enqueue or transition must survive power loss.
            .synchronous(SqliteSynchronous::Full)
            // Takes effect when the file is created: lets retention return space without a
            // full VACUUM.
            .auto_vacuum(SqliteAutoVacuum::Incremental)
            .pragma("journal_size_limit", JOURNAL_SIZE_LIMIT),
        OpenMode::ReadOnly => options.read_only(true),
    }
}

impl Store {
    /// Opens the file, after refusing one that is not ours, from a newer major, or damaged
    /// (`PRAGMA quick_check`, so a page-corrupted file is neither polled on, written to, nor
    /// reported from as if it were empty).
    pub async fn open(path: &Path, mode: OpenMode) -> Result<Self> {
        if mode != OpenMode::ReadWrite && !path.exists() {
            return Err(StoreError::Missing {
                path: path.to_path_buf(),
            });
        }
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        // Before anything that could write (even the WAL switch changes the file's header).
        inspect(path).await?;
        if mode == OpenMode::ReadWrite {
            create_private(path).map_err(|e| StoreError::Open {
                path: path.to_path_buf(),
                source: sqlx::Error::Io(e),
            })?;
        }
        let connections = Arc::new(ConnectionEpoch::new());
        let writer = match mode {
            OpenMode::ReadWrite | OpenMode::WriteExisting => {
                let pool = open_writer(path, connections.clone())
                    .await
                    .map_err(open_err)?;
                migrate(&pool, path).await?;
                Some(pool)
            }
            OpenMode::ReadOnly => None,
        };
        let epoch = connections.clone();
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .before_acquire(move |_, meta| {
                let outdated = epoch.outdated(meta.age);
                Box::pin(async move { Ok(!outdated) })
            })
            .connect_with(connect_options(path, OpenMode::ReadOnly))
            .await
            .map_err(open_err)?;
        Ok(Self {
            connections,
            writer,
            reader,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn writer(&self) -> &SqlitePool {
        self.writer
            .as_ref()
            .expect("write on a store opened read-only: a bug in the caller")
    }

    /// Adds ids to the queue in one transaction; known ids are left as they are.
    #[instrument(skip_all, fields(count = ids.len()))]
    pub async fn enqueue(&self, ids: &[ActionId], now: SystemTime) -> Result<Vec<Enqueued>> {
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
                "INSERT INTO actions (action_id, tracking, enqueued_at, next_poll_at)
                 SELECT value, 'active', ?2, ?2 FROM json_each(?1) WHERE true ORDER BY value
                 ON CONFLICT (action_id) DO NOTHING",
            )
            .bind(&list)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
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

    /// Active actions due by `horizon`, soonest first.
    #[instrument(skip_all)]
    pub async fn due_actions(&self, horizon: SystemTime, limit: u32) -> Result<Vec<DueAction>> {
        let rows = sqlx::query(
            "SELECT action_id, status, poll_count, enqueued_at, next_poll_at FROM actions
             WHERE tracking = 'active' AND next_poll_at <= ?1
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

    /// For one sweep page: the active actions among `ids`, and the ones that had ended
    /// `not_found` (listed after all, so to be revived).
    pub async fn tracked_among(&self, ids: &[ActionId]) -> Result<(Vec<DueAction>, Vec<ActionId>)> {
        let rows = sqlx::query(TRACKED_AMONG)
            .bind(id_list(ids))
            .fetch_all(&self.reader)
            .await?;
        let mut active = Vec::with_capacity(rows.len());
        let mut lost = Vec::new();
        for row in &rows {
            let tracking: String = row.try_get("tracking")?;
            if tracking == Tracking::Active.as_str() {
                active.push(due_from_row(row)?);
            } else {
                let id: String = row.try_get("action_id")?;
                lost.push(ActionId::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?);
            }
        }
        Ok((active, lost))
    }

    /// Makes due now every active action enqueued before `before` that is not in `seen`: a
    /// sweep did not list them, so each needs a fetch by id. Returns how many.
    pub async fn make_unseen_due(
        &self,
        seen: &std::collections::HashSet<ActionId>,
        before: SystemTime,
        now: SystemTime,
    ) -> Result<u64> {
        let mut tx = self.writer().begin_with("BEGIN IMMEDIATE").await?;
        let active: Vec<String> = sqlx::query_scalar(
            "SELECT action_id FROM actions WHERE tracking = 'active' AND enqueued_at < ?1",
        )
        .bind(format_time(before))
        .fetch_all(&mut *tx)
        .await?;
        let unseen: Vec<&str> = active
            .iter()
            .map(String::as_str)
            .filter(|id| !seen.contains(*id))
            .collect();
        if !unseen.is_empty() {
            let list = json_array(&unseen);
            sqlx::query(
                "UPDATE actions SET next_poll_at = ?2
                 WHERE action_id IN (SELECT value FROM json_each(?1)) AND +tracking = 'active'",
            )
            .bind(list)
            .bind(format_time(now))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(unseen.len() as u64)
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
               changed = ?6, missing = ?7, outcome = ?8 WHERE id = ?1",
        )
        .bind(id)
        .bind(format_time(at))
        .bind(done.pages)
        .bind(done.listed as i64)
        .bind(done.checked as i64)
        .bind(done.changed as i64)
        .bind(done.missing as i64)
        .bind(done.outcome)
        .execute(self.writer())
        .await?;
        Ok(())
    }

    /// Writes what a batch of polls found: status, transition and schedule of each action
    /// commit together, so a crash can neither lose nor duplicate a transition.
    #[instrument(skip_all, fields(count = writes.len()))]
    pub async fn record_polls(
        &self,
        writes: &[PollWrite],
        now: SystemTime,
    ) -> Result<WriteSummary> {
        let now_text = format_time(now);
        let mut summary = WriteSummary::default();
        let mut tx = self.writer().begin_with("BEGIN IMMEDIATE").await?;
        // A handful of statements per batch, each taking the whole batch as one JSON array:
        // per-row statements cost a round trip to the database thread each, which made
        // writing the answers of a 10,000-action sweep page take most of a second.
        for group in distinct_groups(writes) {
            let (observed, failed) = rows_to_write(&group, &now_text);
            if let Some(list) = &observed {
                let mut recorded: Vec<CommittedTransition> = sqlx::query_as(RECORD_TRANSITIONS)
                    .bind(list)
                    .bind(&now_text)
                    .fetch_all(&mut *tx)
                    .await?;
                summary.transitions.append(&mut recorded);
                let tracking: Vec<String> = sqlx::query_scalar(RECORD_OBSERVED)
                    .bind(list)
                    .bind(&now_text)
                    .fetch_all(&mut *tx)
                    .await?;
                summary.finished += finished_among(&tracking);
            }
            if let Some(list) = &failed {
                let tracking: Vec<String> = sqlx::query_scalar(RECORD_FAILED)
                    .bind(list)
                    .bind(&now_text)
                    .fetch_all(&mut *tx)
                    .await?;
                summary.finished += finished_among(&tracking);
            }
        }
        tx.commit().await?;
        Ok(summary)
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
    pub async fn list(&self, tracking: Option<Tracking>, limit: u32) -> Result<Vec<ActionRow>> {
        Ok(sqlx::query_as(
            "SELECT * FROM actions WHERE ?1 IS NULL OR tracking = ?1
             ORDER BY enqueued_at DESC, action_id LIMIT ?2",
        )
        .bind(tracking.map(Tracking::as_str))
        .bind(limit)
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
        sqlx::query_as(
            "SELECT t.id, t.action_id, t.from_status, t.to_status, t.observed_at,
                    t.mde_updated_at, a.action_type, a.machine_id, a.computer_dns_name,
                    a.requestor, a.requestor_comment, a.external_id, a.mde_created_at,
                    a.tracking, a.status AS current_status
             FROM transitions t JOIN actions a ON a.action_id = t.action_id
             WHERE ?1 IS NULL OR t.observed_at >= ?1
             ORDER BY t.id",
        )
        .bind(since.map(format_time))
        .fetch(&self.reader)
    }

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

    pub async fn close(&self) {
        if let Some(w) = &self.writer {
            w.close().await;
        }
        self.reader.close().await;
    }
}

/// Creates the database file (when missing) readable by its owner and group only, whatever
/// the umask (a container has none): SQLite gives the `-wal` and `-shm` the same mode.
pub fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path)
    {
        Ok(f) => {
            use std::os::unix::fs::PermissionsExt;
            // `mode` is filtered by the umask; a umask of 0077 is stricter and kept.
            let mode = f.metadata()?.permissions().mode() & 0o777;
            f.set_permissions(std::fs::Permissions::from_mode(mode & 0o640))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Refuses, untouched, a file that is not ours, is from a newer major, or cannot be read
/// (another application's database, a page-corrupted file). A missing or empty file is a new
/// database.
async fn inspect(path: &Path) -> Result<()> {
    if std::fs::metadata(path)
        .map(|m| m.len() == 0)
        .unwrap_or(true)
    {
        return Ok(());
    }
    let damaged = |detail: String| StoreError::Damaged {
        path: path.to_path_buf(),
        detail,
    };
    let options = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(BUSY_TIMEOUT);
    let mut conn = sqlx::ConnectOptions::connect(&options)
        .await
        .map_err(|e| damaged(format!("cannot be opened as SQLite ({e})")))?;
    let result = async {
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT name FROM sqlite_schema WHERE type = 'table'")
                .fetch_all(&mut conn)
                .await
                .map_err(|e| damaged(format!("its schema cannot be read ({e})")))?;
        let has = |t: &str| tables.iter().any(|n| n == t);
        if !has("schema_info") {
            // Ours before schema 1.1 (migration 1 only), or one being created by another
            // process this moment, has the migrations table (whose checksums the migrator
            // then compares with ours).
            return if tables.is_empty() || has("_sqlx_migrations") {
                Ok(())
            } else {
                Err(StoreError::Foreign {
                    path: path.to_path_buf(),
                })
            };
        }
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT name, CAST(value AS TEXT) FROM schema_info WHERE name IN ('major', 'minor')",
        )
        .fetch_all(&mut conn)
        .await
        .map_err(|e| damaged(format!("schema_info cannot be read ({e})")))?;
        let get = |name: &str| rows.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        let major = get("major").ok_or_else(|| damaged("schema_info has no major".into()))?;
        let major: u32 = major
            .trim()
            .parse()
            .map_err(|_| damaged(format!("schema_info major is '{major}', not a number")))?;
        if major > SCHEMA_MAJOR {
            return Err(StoreError::FromTheFuture {
                path: path.to_path_buf(),
                found: format!("{major}.{}", get("minor").unwrap_or_else(|| "?".into())),
            });
        }
        let problems: Vec<String> = sqlx::query_scalar("PRAGMA quick_check(5)")
            .fetch_all(&mut conn)
            .await
            .map_err(|e| damaged(format!("quick_check failed ({e})")))?;
        if problems != ["ok"] {
            return Err(damaged(format!("quick_check: {}", problems.join("; "))));
        }
        Ok(())
    }
    .await;
    let _ = sqlx::Connection::close(conn).await;
    result
}

/// Opens the writer pool. Two processes creating the same new file at once (a CLI enqueue
/// and a starting daemon) can meet SQLITE_BUSY while one switches it to WAL, which SQLite
/// reports without waiting; a short retry lets the first finish.
async fn open_writer(
    path: &Path,
    connections: Arc<ConnectionEpoch>,
) -> std::result::Result<SqlitePool, sqlx::Error> {
    let mut attempt = 0u64;
    loop {
        let epoch = connections.clone();
        let result = SqlitePoolOptions::new()
            .before_acquire(move |_, meta| {
                let outdated = epoch.outdated(meta.age);
                Box::pin(async move { Ok(!outdated) })
            })
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .after_release(|conn, _| {
                Box::pin(async move {
                    // A COMMIT that fails on a full disk can leave SQLite's transaction already
                    // rolled back; sqlx's own ROLLBACK then fails and its transaction depth
                    // stays above zero, so every later BEGIN on this connection fails ("at
                    // non-zero transaction depth") even after space returns. The ping flushes
                    // the pending rollback; a connection still in a transaction after it is
                    // closed, and the pool opens a clean one.
                    use sqlx::Connection;
                    conn.ping().await?;
                    Ok(!conn.is_in_transaction())
                })
            })
            .connect_with(connect_options(path, OpenMode::ReadWrite))
            .await;
        match result {
            Err(sqlx::Error::Database(e)) if attempt < 5 && is_busy(e.message()) => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, "database busy while opening; retrying");
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            other => return other,
        }
    }
}

fn is_busy(message: &str) -> bool {
    message.contains("locked") || message.contains("busy")
}

async fn migrate(pool: &SqlitePool, path: &Path) -> Result<()> {
    // sqlx does not lock migrations on SQLite; two processes starting together can race on a
    // fresh file. The loser's attempt fails and a retry finds the work done.
    let mut attempt = 0;
    loop {
        match migrator().run(pool).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 3 => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, "migration attempt failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(source) => {
                return Err(StoreError::Migrate {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

fn due_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<DueAction> {
    let id: String = row.try_get("action_id")?;
    let enqueued: String = row.try_get("enqueued_at")?;
    let next: String = row.try_get("next_poll_at")?;
    let count: i64 = row.try_get("poll_count")?;
    Ok(DueAction {
        id: ActionId::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        status: row.try_get("status")?,
        poll_count: u32::try_from(count).unwrap_or(u32::MAX),
        enqueued_at: read_time(&enqueued)?,
        next_poll_at: read_time(&next)?,
    })
}

fn read_time(s: &str) -> Result<SystemTime> {
    parse_time(s).ok_or_else(|| StoreError::Corrupt(format!("unreadable time '{s}'")))
}

/// The statements of one sweep page (and of every poll batch), public so a test can check
/// their query plans: each looks listed ids up by key.
pub const ACTIVE_AMONG: &str =
    "SELECT action_id, status, poll_count, enqueued_at, next_poll_at FROM actions
    WHERE action_id IN (SELECT value FROM json_each(?1)) AND +tracking = 'active'";
pub const TRACKED_AMONG: &str =
    "SELECT action_id, tracking, status, poll_count, enqueued_at, next_poll_at FROM actions
    WHERE action_id IN (SELECT value FROM json_each(?1))
      AND +tracking IN ('active', 'not_found')";
pub const RECORD_TRANSITIONS: &str = "INSERT INTO transitions
      (action_id, from_status, to_status, observed_at, mde_updated_at)
    SELECT a.action_id, a.status, w.value ->> '$.status', ?2,
           w.value ->> '$.updated_at'
    FROM json_each(?1) AS w CROSS JOIN actions AS a
      ON a.action_id = w.value ->> '$.id'
    WHERE +a.tracking = 'active' AND w.value ->> '$.status' IS NOT NULL
      AND a.status IS NOT w.value ->> '$.status'
    ORDER BY w.key
    RETURNING action_id, from_status, to_status, mde_updated_at";
pub const RECORD_OBSERVED: &str = "UPDATE actions SET
      status = coalesce(w.status, actions.status),
      action_type = coalesce(w.action_type, actions.action_type),
      machine_id = coalesce(w.machine_id, actions.machine_id),
      computer_dns_name = coalesce(w.computer_dns_name, actions.computer_dns_name),
      requestor = coalesce(w.requestor, actions.requestor),
      requestor_comment = coalesce(w.requestor_comment, actions.requestor_comment),
      external_id = coalesce(w.external_id, actions.external_id),
      mde_created_at = coalesce(w.created_at, actions.mde_created_at),
      mde_updated_at = coalesce(w.updated_at, actions.mde_updated_at),
      title = coalesce(w.title, actions.title),
      scope = coalesce(w.scope, actions.scope),
      request_source = coalesce(w.request_source, actions.request_source),
      error_hresult = coalesce(w.error_hresult, actions.error_hresult),
      cancellation_requestor = coalesce(w.cancellation_requestor, actions.cancellation_requestor),
      cancellation_comment = coalesce(w.cancellation_comment, actions.cancellation_comment),
      cancelled_at = coalesce(w.cancelled_at, actions.cancelled_at),
      last_response = w.raw,
      last_polled_at = ?2,
      poll_count = actions.poll_count + 1,
      tracking = w.tracking,
      next_poll_at = w.next_poll_at,
      finished_at = w.finished_at
    FROM (SELECT value ->> '$.id' AS id, value ->> '$.status' AS status,
            value ->> '$.action_type' AS action_type,
            value ->> '$.machine_id' AS machine_id,
            value ->> '$.computer_dns_name' AS computer_dns_name,
            value ->> '$.requestor' AS requestor,
            value ->> '$.requestor_comment' AS requestor_comment,
            value ->> '$.external_id' AS external_id,
            value ->> '$.created_at' AS created_at,
            value ->> '$.updated_at' AS updated_at,
            value ->> '$.title' AS title, value ->> '$.scope' AS scope,
            value ->> '$.request_source' AS request_source,
            value ->> '$.error_hresult' AS error_hresult,
            value ->> '$.cancellation_requestor' AS cancellation_requestor,
            value ->> '$.cancellation_comment' AS cancellation_comment,
            value ->> '$.cancelled_at' AS cancelled_at,
            value ->> '$.raw' AS raw, value ->> '$.tracking' AS tracking,
            value ->> '$.next_poll_at' AS next_poll_at,
            value ->> '$.finished_at' AS finished_at
          FROM json_each(?1)) AS w
    WHERE actions.action_id = w.id AND +actions.tracking = 'active'
    RETURNING actions.tracking";
pub const RECORD_FAILED: &str = "UPDATE actions SET
      last_polled_at = ?2,
      poll_count = actions.poll_count + 1,
      error_count = actions.error_count + (w.error IS NOT NULL),
      last_error = coalesce(w.error, actions.last_error),
      last_error_at = CASE WHEN w.error IS NULL THEN actions.last_error_at
                      ELSE ?2 END,
      tracking = w.tracking,
      next_poll_at = w.next_poll_at,
      finished_at = w.finished_at
    FROM (SELECT value ->> '$.id' AS id, value ->> '$.error' AS error,
            value ->> '$.tracking' AS tracking,
            value ->> '$.next_poll_at' AS next_poll_at,
            value ->> '$.finished_at' AS finished_at
          FROM json_each(?1)) AS w
    WHERE actions.action_id = w.id AND +actions.tracking = 'active'
    RETURNING actions.tracking";
pub const PAGE_STATEMENTS: [&str; 5] = [
    ACTIVE_AMONG,
    TRACKED_AMONG,
    RECORD_TRANSITIONS,
    RECORD_OBSERVED,
    RECORD_FAILED,
];

/// Splits a batch so no id appears twice in a group: each group is one set of statements,
/// and a repeated id must see what its earlier write left.
fn distinct_groups(writes: &[PollWrite]) -> Vec<Vec<&PollWrite>> {
    let mut groups: Vec<(std::collections::HashSet<&str>, Vec<&PollWrite>)> = Vec::new();
    for w in writes {
        match groups
            .iter_mut()
            .find(|(ids, _)| !ids.contains(w.id.as_str()))
        {
            Some((ids, group)) => {
                ids.insert(w.id.as_str());
                group.push(w);
            }
            None => groups.push(([w.id.as_str()].into_iter().collect(), vec![w])),
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

#[derive(Serialize)]
struct ObservedRow<'a> {
    id: &'a str,
    status: Option<&'a str>,
    action_type: &'a Option<String>,
    machine_id: &'a Option<String>,
    computer_dns_name: &'a Option<String>,
    requestor: &'a Option<String>,
    requestor_comment: &'a Option<String>,
    external_id: &'a Option<String>,
    created_at: &'a Option<String>,
    updated_at: &'a Option<String>,
    title: &'a Option<String>,
    scope: &'a Option<String>,
    request_source: &'a Option<String>,
    error_hresult: Option<i64>,
    cancellation_requestor: &'a Option<String>,
    cancellation_comment: &'a Option<String>,
    cancelled_at: &'a Option<String>,
    raw: &'a str,
    tracking: &'static str,
    next_poll_at: Option<String>,
    finished_at: Option<&'a str>,
}

#[derive(Serialize)]
struct FailedRow<'a> {
    id: &'a str,
    error: Option<&'a str>,
    tracking: &'static str,
    next_poll_at: Option<String>,
    finished_at: Option<&'a str>,
}

/// The group's observations and failures as JSON arrays for `json_each` (`None` when empty).
fn rows_to_write(group: &[&PollWrite], now: &str) -> (Option<String>, Option<String>) {
    let mut observed = Vec::new();
    let mut failed = Vec::new();
    for w in group {
        let (tracking, next_poll_at, finished_at) = match &w.next {
            NextStep::PollAt(t) => (Tracking::Active, Some(format_time(*t)), None),
            NextStep::Finish(t) => (*t, None, Some(now)),
        };
        match &w.result {
            PollResult::Observed(o) => observed.push(ObservedRow {
                id: w.id.as_str(),
                status: o.status.as_ref().map(|s| s.as_str()),
                action_type: &o.action_type,
                machine_id: &o.machine_id,
                computer_dns_name: &o.computer_dns_name,
                requestor: &o.requestor,
                requestor_comment: &o.requestor_comment,
                external_id: &o.external_id,
                created_at: &o.created_at,
                updated_at: &o.updated_at,
                title: &o.title,
                scope: &o.scope,
                request_source: &o.request_source,
                error_hresult: o.error_hresult,
                cancellation_requestor: &o.cancellation_requestor,
                cancellation_comment: &o.cancellation_comment,
                cancelled_at: &o.cancelled_at,
                raw: &o.raw,
                tracking: tracking.as_str(),
                next_poll_at,
                finished_at,
            }),
            PollResult::NotFound | PollResult::Error(_) => failed.push(FailedRow {
                id: w.id.as_str(),
                error: match &w.result {
                    PollResult::Error(e) => Some(e.as_str()),
                    _ => None,
                },
                tracking: tracking.as_str(),
                next_poll_at,
                finished_at,
            }),
        }
    }
    (
        (!observed.is_empty()).then(|| json_array(&observed)),
        (!failed.is_empty()).then(|| json_array(&failed)),
    )
}

/// A JSON array for `json_each(?)`: how a batch goes to SQLite in one statement.
fn json_array<T: Serialize>(rows: &[T]) -> String {
    // Strings, numbers and options of them: serializing cannot fail.
    serde_json::to_string(rows).expect("plain rows serialize")
}

fn id_list(ids: &[ActionId]) -> String {
    json_array(&ids.iter().map(ActionId::as_str).collect::<Vec<_>>())
}

fn finished_among(tracking: &[String]) -> u32 {
    tracking
        .iter()
        .filter(|t| t.as_str() != Tracking::Active.as_str())
        .count() as u32
}

fn parse_tracking(s: &str) -> Result<Tracking> {
    Tracking::from_str(s).map_err(StoreError::Corrupt)
}
