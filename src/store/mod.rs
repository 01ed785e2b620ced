//! The SQLite queue: pools, migrations and every SQL statement.
//!
//! One writer connection (SQLite allows one writer at a time anyway; a pool of one makes waits
//! happen in our process instead of as SQLITE_BUSY) and a few read-only connections.
//! Read-modify-write runs in `BEGIN IMMEDIATE` so it takes the write lock up front.
//!
//! This file opens the file (refusing what is not ours), holds the types and the batched SQL
//! of the poll write; the methods live by caller: `queue` (intake and the loop), `log` (the
//! call and sweep log), `reads` (people and tools), `upkeep` (retention, checkpoints).

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

use crate::domain::ACTION_FIELDS;
pub use crate::domain::{ActionFields, Endpoint, Observation};
use crate::domain::{ActionId, ActionStatus, Tracking, format_time, parse_time};
pub use outbox::{
    CALLBACK, DeliveryCounts, DeliveryResult, DeliveryRow, DestinationRow, DueDelivery,
    NotifyRequest, ReplaySelection, Route,
};
use std::sync::LazyLock;

mod log;
mod outbox;
mod queue;
pub use queue::PollBatch;
mod reads;
mod upkeep;

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
/// The page size of new database files (see `connect_options`).
pub const PAGE_SIZE: u32 = 8192;
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

/// One finished stay of an action in a status (`Store::dwells_after`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Dwell {
    /// The transition out of the status.
    pub id: i64,
    /// The action's MDE type.
    pub kind: Option<String>,
    pub status: Option<String>,
    /// How long it lasted by MDE's clock; None when the record cannot say.
    pub seconds: Option<f64>,
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
    /// MDE's `lastUpdateDateTimeUtc` as last written (normalized), when known: with the
    /// status, what tells a sweep whether a listed answer is news.
    pub updated_at: Option<String>,
}

/// One entry of a sweep's index (`Store::sweep_index`).
#[derive(Debug, Clone)]
pub struct Tracked {
    pub status: Option<crate::domain::ActionStatus>,
    /// Ended `not_found`: a listing brings it back.
    pub not_found: bool,
    /// Listed by the sweep in hand (each action is checked once a sweep).
    pub seen: bool,
    /// Active and due for a poll before the time the index was read for: a sweep that
    /// lists it writes its later schedule, so that no pass fetches it by id.
    pub due_soon: bool,
}

/// What one poll of one action found.
#[derive(Debug, Clone)]
pub enum PollResult {
    Observed(Box<Observation>),
    /// A sweep listed the action with the status and update time stored: the answer is
    /// the one already written, so only the schedule moves (no row rewrite, no answer
    /// copied through SQLite: most of a sweep's cost when nothing changes).
    Unchanged,
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
    /// Actions it started tracking (discovery).
    pub discovered: u64,
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
    pub discovered: i64,
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
    /// Notification deliveries queued with these transitions (the outbox).
    pub deliveries: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct CommittedTransition {
    pub id: i64,
    pub action_id: String,
    pub from_status: Option<String>,
    pub to_status: String,
    pub mde_updated_at: Option<String>,
}

/// One row of `actions`: what `SELECT * FROM actions` reads, and what the exports write.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct ActionRow {
    pub action_id: String,
    pub tracking: Tracking,
    pub status: Option<String>,
    /// What MDE said of the action, as the last answer kept left it.
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub fields: ActionFields,
    pub mde_updated_at: Option<String>,
    pub enqueued_at: String,
    pub last_polled_at: Option<String>,
    pub next_poll_at: Option<String>,
    pub poll_count: i64,
    pub error_count: i64,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub finished_at: Option<String>,
    pub revived_at: Option<String>,
    /// How it first came: `cli`, `http`, `discovered` (NULL before schema 1.5).
    pub source: Option<String>,
    pub correlation: Option<String>,
    pub last_response: Option<String>,
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
    pub by_source: Vec<(String, i64)>,
}

/// A transition with the context of its action, so an exported line stands alone.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct TransitionExport {
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub transition: TransitionRow,
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub action: ActionFields,
    pub tracking: Tracking,
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
            // Takes effect when the file is created (a file made with 4 KiB pages keeps
            // them). An `actions` row with its answer is 1-1.5 KiB; in a 4 KiB page of this
            // WITHOUT ROWID table at most about 1 KiB of a row stays in the page and the
            // rest takes an overflow page of its own, so every row cost two pages: the
            // file was 3.3 KiB per action and a random-id write touched twice the pages.
            .page_size(PAGE_SIZE)
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
            Ok(()) => return register_call_kinds(pool).await,
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

/// Lists this version's kinds of API call in `api_call_kinds`, which the trigger on
/// `api_calls` checks: a new kind of call is a variant of `Endpoint`, not a rebuild of the
/// call log. Kinds an older or newer version wrote stay (their rows name them).
async fn register_call_kinds(pool: &SqlitePool) -> Result<()> {
    let names: Vec<&str> = Endpoint::ALL.iter().map(|e| e.as_str()).collect();
    sqlx::query("INSERT OR IGNORE INTO api_call_kinds (name) SELECT value FROM json_each(?1)")
        .bind(json_array(&names))
        .execute(pool)
        .await?;
    Ok(())
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
        updated_at: row.try_get("mde_updated_at")?,
    })
}

fn read_time(s: &str) -> Result<SystemTime> {
    parse_time(s).ok_or_else(|| StoreError::Corrupt(format!("unreadable time '{s}'")))
}

/// An SQL list of the text values of one of our enums (never of input): `('a', 'b')`.
pub(crate) fn sql_list<'a>(values: impl IntoIterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = values.into_iter().map(|v| format!("'{v}'")).collect();
    format!("({})", quoted.join(", "))
}

/// The statements of one sweep page (and of every poll batch), public so a test can check
/// their query plans: each looks listed ids up by key.
pub const ACTIVE_AMONG: &str =
    "SELECT action_id, status, poll_count, enqueued_at, next_poll_at, mde_updated_at
    FROM actions
    WHERE action_id IN (SELECT value FROM json_each(?1)) AND +tracking = 'active'";
/// One chunk of a sweep's index, in the order of the `actions_tracking` index: the
/// records, and the last (status, id) read as `status || char(31) || id`. ?1 tracking,
/// ?2 and ?3 the (status, id) the chunk starts after, ?4 the chunk's size. Actions never
/// observed (status NULL, first in the index) are read by `SWEEP_INDEX_UNOBSERVED`.
pub static SWEEP_INDEX: LazyLock<String> = LazyLock::new(|| {
    // A status's code is its place in `ActionStatus::KNOWN`, from 1 (`read_index_records`
    // reads it back the same way); 9 is a status this version does not know.
    let codes: String = ActionStatus::KNOWN
        .iter()
        .enumerate()
        .map(|(i, s)| format!("WHEN status = '{s}' THEN {} ", i + 1))
        .collect();
    format!(
        "SELECT coalesce(group_concat(record, ''), ''),
      max(status || char(31) || action_id)
    FROM (SELECT action_id, status, action_id || (tracking = 'not_found') || CASE
            {codes}ELSE 9 END AS record
          FROM actions WHERE tracking = ?1 AND (status, action_id) > (?2, ?3)
          ORDER BY tracking, status, action_id LIMIT ?4)"
    )
});
pub const SWEEP_INDEX_UNOBSERVED: &str = "SELECT coalesce(group_concat(record, ''), ''),
      max(char(31) || action_id)
    FROM (SELECT action_id, action_id || (tracking = 'not_found') || 0 AS record
          FROM actions WHERE tracking = ?1 AND status IS NULL AND action_id > ?3
            AND ?2 IS NOT NULL
          ORDER BY tracking, status, action_id LIMIT ?4)";
/// One chunk of the active actions due by ?1, through the `actions_due` index: their ids
/// end to end, and the last (next_poll_at, id) as `next_poll_at || char(31) || id`; ?2 and
/// ?3 the (next_poll_at, id) the chunk starts after, ?4 the chunk's size.
pub const SWEEP_DUE: &str = "SELECT coalesce(group_concat(action_id, ''), ''),
      max(next_poll_at || char(31) || action_id)
    FROM (SELECT action_id, next_poll_at FROM actions
          WHERE tracking = 'active' AND next_poll_at <= ?1
            AND (next_poll_at, action_id) > (?2, ?3)
          ORDER BY tracking, next_poll_at, action_id LIMIT ?4)";
/// Records per `SWEEP_INDEX` chunk: SQLite builds each chunk's text with the C allocator
/// on a database thread, and a few megabytes at once there stay resident long after
/// (each reader thread keeps its own arena).
const SWEEP_INDEX_CHUNK: u32 = 4_000;
/// The width of one `SWEEP_INDEX` record.
const SWEEP_RECORD: usize = 38;
pub const RECORD_TRANSITIONS: &str = "INSERT INTO transitions
      (action_id, from_status, to_status, observed_at, mde_updated_at)
    SELECT a.action_id, a.status, w.value ->> '$.status', ?2,
           w.value ->> '$.updated_at'
    FROM jsonb_each(?1) AS w CROSS JOIN actions AS a
      ON a.action_id = w.value ->> '$.id'
    WHERE +a.tracking = 'active' AND w.value ->> '$.status' IS NOT NULL
      AND a.status IS NOT w.value ->> '$.status'
    ORDER BY w.key
    RETURNING id, action_id, from_status, to_status, mde_updated_at";
/// An answer to store: the fields MDE sent (a field it left out keeps its value), the whole
/// answer, and the next poll. Built from `ACTION_FIELDS`, once.
pub static RECORD_OBSERVED: LazyLock<String> = LazyLock::new(|| {
    let set: String = ACTION_FIELDS
        .iter()
        .map(|f| format!("{c} = coalesce(w.{c}, actions.{c}),\n      ", c = f.column))
        .collect();
    let read: String = ACTION_FIELDS
        .iter()
        .map(|f| format!("value ->> '$.{c}' AS {c},\n            ", c = f.column))
        .collect();
    format!(
        "UPDATE actions SET
      status = coalesce(w.status, actions.status),
      mde_updated_at = coalesce(w.updated_at, actions.mde_updated_at),
      {set}last_response = w.raw,
      last_polled_at = ?2,
      poll_count = actions.poll_count + 1,
      tracking = w.tracking,
      next_poll_at = w.next_poll_at,
      finished_at = w.finished_at
    FROM (SELECT value ->> '$.id' AS id, value ->> '$.status' AS status,
            value ->> '$.updated_at' AS updated_at,
            {read}value ->> '$.raw' AS raw, value ->> '$.tracking' AS tracking,
            value ->> '$.next_poll_at' AS next_poll_at,
            value ->> '$.finished_at' AS finished_at
          FROM jsonb_each(?1)) AS w
    WHERE actions.action_id = w.id AND +actions.tracking = 'active'
    RETURNING actions.tracking"
    )
});
/// A poll that brought no answer to store (a failure, a final 404, a listing that showed
/// the action unchanged): its count, its next poll and the failure, if there was one.
pub const RECORD_SCHEDULE: &str = "UPDATE actions SET
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
          FROM jsonb_each(?1)) AS w
    WHERE actions.action_id = w.id AND +actions.tracking = 'active'
    RETURNING actions.tracking";
/// The statements a sweep page runs, for the plan tests.
pub fn page_statements() -> [&'static str; 4] {
    [
        ACTIVE_AMONG,
        RECORD_TRANSITIONS,
        RECORD_OBSERVED.as_str(),
        RECORD_SCHEDULE,
    ]
}

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
    groups
        .into_iter()
        .map(|(_, mut g)| {
            // In key order a statement walks the table's pages once, front to back: ids
            // are random, so in arrival order each row is a page read from the OS again
            // (the page cache holds a few hundred of a table's tens of thousands).
            g.sort_unstable_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
            g
        })
        .collect()
}

#[derive(Serialize)]
struct ObservedRow<'a> {
    id: &'a str,
    status: Option<&'a str>,
    updated_at: &'a Option<String>,
    #[serde(flatten)]
    fields: &'a ActionFields,
    raw: &'a str,
    tracking: &'static str,
    next_poll_at: Option<String>,
    finished_at: Option<&'a str>,
}

#[derive(Serialize)]
struct ScheduleRow<'a> {
    id: &'a str,
    error: Option<&'a str>,
    tracking: &'static str,
    next_poll_at: Option<String>,
    finished_at: Option<&'a str>,
}

/// The group's observations and failures as JSON arrays for `json_each` (`None` when empty).
fn rows_to_write(group: &[&PollWrite], now: &str) -> (Option<String>, Option<String>) {
    let mut observed = Vec::new();
    let mut scheduled = Vec::new();
    for w in group {
        let (tracking, next_poll_at, finished_at) = match &w.next {
            NextStep::PollAt(t) => (Tracking::Active, Some(format_time(*t)), None),
            NextStep::Finish(t) => (*t, None, Some(now)),
        };
        match &w.result {
            PollResult::Observed(o) => observed.push(ObservedRow {
                id: w.id.as_str(),
                status: o.status.as_ref().map(|s| s.as_str()),
                updated_at: &o.updated_at,
                fields: &o.fields,
                raw: &o.raw,
                tracking: tracking.as_str(),
                next_poll_at,
                finished_at,
            }),
            PollResult::Unchanged | PollResult::NotFound | PollResult::Error(_) => {
                scheduled.push(ScheduleRow {
                    id: w.id.as_str(),
                    error: match &w.result {
                        PollResult::Error(e) => Some(e.as_str()),
                        _ => None,
                    },
                    tracking: tracking.as_str(),
                    next_poll_at,
                    finished_at,
                })
            }
        }
    }
    (
        (!observed.is_empty()).then(|| json_array(&observed)),
        (!scheduled.is_empty()).then(|| json_array(&scheduled)),
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
