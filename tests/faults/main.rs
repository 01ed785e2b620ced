//! Faults nobody planned for: full disks, hostile headers, clocks, aliases, operators.
//! Each test reproduces one finding of the adversarial run and checks that nothing tracked or
//! recorded is lost, and that the daemon recovers by itself.
// The tests talk to the daemon as its users do; the outbound policy of clippy.toml is the
// daemon's own.
#![allow(clippy::disallowed_methods)]

#[path = "../common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use mde_actiond::domain::ActionStatus;
use mde_actiond::sim::{Lifecycle, SimConfig};

const LIMIT: Duration = Duration::from_secs(60);

/// A small tmpfs of its own, so a test can fill "the disk" without touching the machine's.
/// Needs root (CI runs as root); elsewhere the test says why it skips.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here");
            return None;
        }
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills what is left with one file; removing it gives the space back.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc_enospc()) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // The last partial block, byte by byte.
        while f.write(&[0]).is_ok_and(|n| n == 1) {}
        path
    }
}

fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Finding 1: a full disk wedged the daemon until restart (a failed COMMIT left sqlx's
/// transaction depth above zero), told of transitions it never committed and sent calls it
/// did not record. Now: polling pauses, readiness and health say why, and it resumes by
/// itself when space returns with every transition recorded exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_polling_and_it_resumes_by_itself_losing_nothing() {
    let Some(fs) = Tmpfs::mount("3m") else {
        return;
    };
    let mut env = TestEnv::new(SimConfig::default()).await;
    env.settings.database.path = fs.path().join("actions.db");
    env.settings.http.listen = Some("127.0.0.1:0".into());
    env.settings.poll.stall_after = Some(Duration::from_secs(2));
    env.settings.poll.max_interval = Duration::from_millis(500);
    let s = Duration::from_secs;
    let ids: Vec<_> = (0..30)
        .map(|i| {
            env.sim.create_action(Lifecycle::new(vec![
                (Duration::ZERO, ActionStatus::Pending),
                (s(1), ActionStatus::InProgress),
                (s(6 + i % 3), ActionStatus::Succeeded),
            ]))
        })
        .collect();
    let daemon = RunningDaemon::start(&env.settings).await.unwrap();
    daemon.enqueue(&ids).await;
    let base = format!("http://{}", daemon.http_addr.unwrap());
    eventually(LIMIT, "first transitions", || async {
        daemon.store.counts().await.unwrap().by_status.len() > 1
    })
    .await;

    let filler = fs.fill();
    eventually(LIMIT, "readyz names the full disk", || async {
        let (code, text) = get(&format!("{base}/readyz")).await;
        code == 503 && text.contains("disk is full")
    })
    .await;
    // No call goes out that cannot be recorded: while writes fail, the simulator sees none.
    let calls_when_full = env.sim.stats().api_calls;
    eventually(LIMIT, "healthz fails after the stall limit", || async {
        get(&format!("{base}/healthz")).await.0 == 503
    })
    .await;
    assert_eq!(env.sim.stats().api_calls, calls_when_full);

    std::fs::remove_file(&filler).unwrap();
    wait_finished(&daemon.store, &ids, LIMIT).await;
    eventually(LIMIT, "ready and healthy again", || async {
        get(&format!("{base}/readyz")).await.0 == 200
            && get(&format!("{base}/healthz")).await.0 == 200
    })
    .await;
    let told = daemon.poller.metrics().transitions.get();
    daemon.shutdown().await;
    env.assert_all_true(&ids).await;

    let store = env.reader().await;
    let mut committed = 0;
    for id in &ids {
        committed += store.transitions(id).await.unwrap().len() as u64;
    }
    assert_eq!(
        told, committed,
        "the metric counts committed transitions only"
    );
    assert_eq!(
        store.api_call_count().await.unwrap() as u64,
        env.sim.stats().api_calls,
        "every call sent is in api_calls"
    );
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(
            &sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", env.db().display()))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(integrity, "ok");
}

/// Finding 1, at the store: a write transaction too big for the page cache spills to the WAL
/// mid-transaction; on a full disk SQLite rolls it back by itself, sqlx's ROLLBACK then fails
/// and, before the fix, the writer connection stayed "in a transaction" for good: every later
/// write failed with "at non-zero transaction depth", also after space returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fails_on_a_full_disk_leaves_the_writer_usable() {
    use mde_actiond::domain::{ActionId, Tracking};
    use mde_actiond::store::{NextStep, Observation, OpenMode, PollResult, PollWrite, Store};
    // Room for the file and the WAL of the retried 8 MB transaction, which spills the
    // page cache several times (about 70 MB at 8 KiB pages).
    let Some(fs) = Tmpfs::mount("112m") else {
        return;
    };
    let path = fs.path().join("t.db");
    let store = Store::open(&path, OpenMode::ReadWrite).await.unwrap();
    let mut rng = fastrand::Rng::with_seed(11);
    let ids: Vec<_> = (0..4_000).map(|_| ActionId::random(&mut rng)).collect();
    let now = std::time::SystemTime::now();
    store.enqueue(&ids, now).await.unwrap();
    // Answers of 2 KiB each: 8 MB in one transaction, far past the 2 MB page cache.
    let raw = format!("{{\"pad\":\"{}\"}}", "x".repeat(2048));
    let writes: Vec<_> = ids
        .iter()
        .map(|id| PollWrite {
            id: id.clone(),
            result: PollResult::Observed(Box::new(Observation {
                status: Some(ActionStatus::InProgress),
                raw: raw.clone(),
                ..Observation::default()
            })),
            next: NextStep::PollAt(now + Duration::from_secs(60)),
        })
        .collect();
    let filler = fs.fill();
    // Leave a little room, so the transaction starts and fails midway.
    let len = std::fs::metadata(&filler).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(len.saturating_sub(2 * 1024 * 1024))
        .unwrap();
    let err = store.record_polls(&writes, now).await.unwrap_err();
    assert!(err.is_disk_full(), "{err}");
    std::fs::remove_file(&filler).unwrap();
    // Space is back: the same writer connection writes again.
    let summary = store.record_polls(&writes, now).await.unwrap();
    assert_eq!(summary.transitions.len(), ids.len());
    let more: Vec<_> = (0..3).map(|_| ActionId::random(&mut rng)).collect();
    store.enqueue(&more, now).await.unwrap();
    assert_eq!(
        store.action(&more[0]).await.unwrap().unwrap().tracking,
        Tracking::Active.as_str()
    );
    store.close().await;
}

/// Finding 2: one 429 with a Retry-After of ten years stopped every call, across restarts,
/// while both health endpoints said 200; 10^23 seconds panicked the daemon. Now a pause is
/// at most an hour (the longest window of the API's limits), /readyz says until when, and a
/// restart restores no more than that, also from rows an older version wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_retry_after_pauses_an_hour_at_most_and_never_panics() {
    use mde_actiond::sim::Fault;
    for raw in [
        "99999999999999999999999",
        "315360000",
        "Fri, 01 Jan 2100 00:00:00 GMT",
    ] {
        let mut env = TestEnv::new(SimConfig {
            faults: vec![Fault::TooManyRequests],
            ..SimConfig::default()
        })
        .await;
        env.settings.http.listen = Some("127.0.0.1:0".into());
        env.sim.set_retry_after_header(Some(raw));
        env.sim.set_fault_rate(1.0);
        let id = env.sim.create_action(Lifecycle::simple(
            Duration::from_millis(100),
            Duration::from_millis(200),
            ActionStatus::Succeeded,
        ));
        let daemon = RunningDaemon::start(&env.settings).await.unwrap();
        daemon.enqueue(std::slice::from_ref(&id)).await;
        let base = format!("http://{}", daemon.http_addr.unwrap());
        eventually(LIMIT, "readyz tells the pause", || async {
            let (code, text) = get(&format!("{base}/readyz")).await;
            code == 503 && text.contains("paused until")
        })
        .await;
        let paused = daemon.poller.budget().remaining().paused_for.unwrap();
        assert!(paused <= Duration::from_secs(3600), "{raw}: {paused:?}");
        assert!(paused > Duration::from_secs(3500), "{raw}: {paused:?}");
        // Alive: a long wait for the budget is not a hang.
        assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
        daemon.shutdown().await;

        // An older version stored the header as it came: ten years in retry_after_ms.
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", env.db().display()))
            .await
            .unwrap();
        let stored: i64 = sqlx::query_scalar("SELECT max(retry_after_ms) FROM api_calls")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(stored <= 3_600_000, "{raw}: stored {stored} ms");
        sqlx::query(
            "UPDATE api_calls SET retry_after_ms = 315360000000 WHERE retry_after_ms IS NOT NULL",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        let daemon = RunningDaemon::start(&env.settings).await.unwrap();
        let restored = daemon.poller.budget().remaining().paused_for.unwrap();
        assert!(restored <= Duration::from_secs(3600), "{raw}: {restored:?}");
        daemon.shutdown().await;
    }
}

/// Finding 3: the one-daemon lock was keyed on the path, so a second daemon through a hard
/// link ran (each with its own -wal: the file was malformed within 40 s) and one through a
/// symlink ran too (twice the budget). Now every alias is refused, naming the running pid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_through_a_hard_link_or_symlink_is_refused_naming_the_pid() {
    let env = TestEnv::new(SimConfig::default()).await;
    let mut first = spawn_daemon(&env, &[], &[]);
    let db = env.db();
    eventually(LIMIT, "the first daemon holds its lock", || async {
        std::fs::read_to_string(env.dir.path().join("actions.db.lock"))
            .is_ok_and(|pid| pid.trim() == first.id().unwrap().to_string())
    })
    .await;
    let hard = env.dir.path().join("hard.db");
    std::fs::hard_link(&db, &hard).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let soft = other_dir.path().join("soft.db");
    std::os::unix::fs::symlink(&db, &soft).unwrap();
    let pid = first.id().unwrap().to_string();
    for alias in [&hard, &soft, &db] {
        let out = bin()
            .envs(daemon_env(&env))
            .env("MDE_ACTIOND_DATABASE__PATH", alias)
            .arg("run")
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: ran\n{err}", alias.display());
        assert!(
            err.contains("already running") && err.contains(&format!("pid {pid}")),
            "{}: {err}",
            alias.display()
        );
    }
    signal(&first, nix::sys::signal::Signal::SIGTERM);
    assert!(first.wait().await.unwrap().success());
}

/// Finding 4: `prune --keep 0s` deleted every finished action although the config refuses
/// `keep_finished = "0s"`. The flag now has the same floor, and deleting more than 1,000
/// actions from a terminal asks for `--yes` (scripts, without a terminal, are not asked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_from_a_terminal_asks_for_yes_before_deleting_more_than_a_thousand() {
    use mde_actiond::domain::{ActionId, Tracking};
    use mde_actiond::store::{NextStep, Observation, OpenMode, PollResult, PollWrite, Store};
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: `script` (util-linux) is needed to give prune a terminal");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let store = Store::open(&db, OpenMode::ReadWrite).await.unwrap();
    let mut rng = fastrand::Rng::with_seed(4);
    let ids: Vec<_> = (0..1_001).map(|_| ActionId::random(&mut rng)).collect();
    let now = std::time::SystemTime::now();
    store.enqueue(&ids, now).await.unwrap();
    let writes: Vec<_> = ids
        .iter()
        .map(|id| PollWrite {
            id: id.clone(),
            result: PollResult::Observed(Box::new(Observation {
                status: Some(ActionStatus::Succeeded),
                raw: "{}".into(),
                ..Observation::default()
            })),
            next: NextStep::Finish(Tracking::Done),
        })
        .collect();
    store.record_polls(&writes, now).await.unwrap();
    store.close().await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(
        "UPDATE actions SET finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-2 days')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM actions")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let in_terminal = |extra: &str| {
        let line = format!(
            "{} --db {} prune --keep 1d {extra}",
            env!("CARGO_BIN_EXE_mde-actiond"),
            db.display()
        );
        std::process::Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .output()
            .unwrap()
    };
    let asked = in_terminal("");
    let text = String::from_utf8_lossy(&asked.stdout);
    assert!(
        text.contains("would delete 1001 actions") && text.contains("--yes"),
        "{text}"
    );
    assert_eq!(count().await, 1_001, "nothing deleted without --yes");
    let done = in_terminal("--yes");
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stdout)
    );
    assert_eq!(count().await, 0);
    pool.close().await;
}

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Finding 5: next polls are wall-clock times, so a clock stepping back a day left every
/// action a day from due (0 calls in 20 s with 99 active). Now the loop notices the wall
/// clock falling behind the monotonic one and moves next polls back by as much. The real
/// binary runs under libfaketime, its wall clock set back a day mid-run (monotonic untouched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_stepping_back_a_day_does_not_stall_tracking() {
    if !Path::new(LIBFAKETIME).exists() {
        eprintln!("skipped: libfaketime is not installed (Debian package faketime)");
        return;
    }
    let env = TestEnv::new(SimConfig::default()).await;
    let stamp = env.dir.path().join("faketime");
    std::fs::write(&stamp, "+0\n").unwrap();
    let s = Duration::from_secs;
    let ids: Vec<_> = (0..20)
        .map(|i| {
            env.sim.create_action(Lifecycle::new(vec![
                (Duration::ZERO, ActionStatus::Pending),
                (s(1), ActionStatus::InProgress),
                (
                    s(8) + Duration::from_millis(100 * i),
                    ActionStatus::Succeeded,
                ),
            ]))
        })
        .collect();
    enqueue_with_cli(&env.db(), &ids).await;
    let mut daemon = spawn_daemon(
        &env,
        &[
            ("LD_PRELOAD", LIBFAKETIME.to_string()),
            ("FAKETIME_TIMESTAMP_FILE", stamp.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".to_string()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
            ("MDE_ACTIOND_POLL__MAX_INTERVAL", "1s".to_string()),
        ],
        &[],
    );
    let store = env.reader().await;
    eventually(LIMIT, "every action seen in progress", || async {
        let mut all = true;
        for id in &ids {
            all &= row(&store, id).await.status.as_deref() == Some("InProgress");
        }
        all
    })
    .await;
    std::fs::write(&stamp, "-1d\n").unwrap();
    wait_finished(&store, &ids, LIMIT).await;
    for id in &ids {
        let r = row(&store, id).await;
        let truth = env.sim.terminal_status(id).unwrap();
        assert_eq!(
            (r.tracking.as_str(), r.status.as_deref()),
            ("done", Some(truth.as_str()))
        );
        let log: Vec<_> = store
            .transitions(id)
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.to_status)
            .collect();
        assert_eq!(log, ["Pending", "InProgress", "Succeeded"], "{id}");
    }
    store.close().await;
    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    let stderr = read_all(daemon.stderr.take().unwrap()).await;
    assert!(daemon.wait().await.unwrap().success(), "{stderr}");
    assert!(stderr.contains("the wall clock stepped back"), "{stderr}");
}

/// Finding 6: unbounded input. `enqueue --file /dev/zero` grew to 8.9 GB (no line bound),
/// `report --since 100000y` panicked, `--config` on a FIFO waited forever, and an HTTP body
/// shorter than its Content-Length (or half a request's headers) held a connection forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_input_is_refused_with_a_clear_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut env = TestEnv::new(SimConfig::default()).await;
    env.settings.http.listen = Some("127.0.0.1:0".into());
    let daemon = RunningDaemon::start(&env.settings).await.unwrap();
    let addr = daemon.http_addr.unwrap();
    // Both slow clients at once; each must be answered or cut off by the daemon.
    let half_headers = tokio::spawn(async move {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(LIMIT, c.read_to_end(&mut buf))
            .await
            .expect("the daemon cut the connection")
            .ok();
        buf
    });
    let short_body = tokio::spawn(async move {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(
            b"POST /v1/actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"ids\": [",
        )
        .await
        .unwrap();
        let mut buf = vec![0; 4096];
        let n = tokio::time::timeout(LIMIT, c.read(&mut buf))
            .await
            .expect("the daemon answered")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    let db = env.db();
    let out = bin()
        .arg("--db")
        .arg(&db)
        .args(["enqueue", "--file", "/dev/zero"])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/dev/zero:1:") && err.contains("longer than 4096 bytes"),
        "{err}"
    );
    let out = bin()
        .arg("--db")
        .arg(&db)
        .args(["report", "--since", "100000y"])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("before 1970"), "{err}");
    let fifo = env.dir.path().join("config.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let out = tokio::time::timeout(
        LIMIT,
        bin()
            .arg("--config")
            .arg(&fifo)
            .arg("check-config")
            .output(),
    )
    .await
    .expect("check-config on a FIFO returns")
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not a regular file"), "{err}");

    let answer = short_body.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let cut = half_headers.await.unwrap();
    assert!(!cut.starts_with(b"HTTP/1.1 200"), "{cut:?}");
    // The listener still serves everyone else.
    assert_eq!(get(&format!("http://{addr}/healthz")).await.0, 200);
    daemon.shutdown().await;
}

/// Finding 7: a database that is not ours, or from the future, or page-corrupted was
/// accepted: tables were added to a stranger's file, `run` polled a corrupt file, `report`
/// answered 0. Each is now refused at open with a message, exit 1, the file untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_that_are_not_ours_or_from_the_future_or_corrupt_are_refused_untouched() {
    use mde_actiond::domain::ActionId;
    use mde_actiond::store::{OpenMode, Store};
    let env = TestEnv::new(SimConfig::default()).await;
    let dir = env.dir.path();
    let sql = |path: PathBuf, statements: &'static [&'static str]| async move {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .unwrap();
        for s in statements {
            sqlx::query(*s).execute(&pool).await.unwrap();
        }
        pool.close().await;
    };
    // Ours, with a few actions, to bend into the other cases.
    let ours = |name: &str| {
        let path = dir.join(name);
        async move {
            let store = Store::open(&path, OpenMode::ReadWrite).await.unwrap();
            let mut rng = fastrand::Rng::with_seed(7);
            let ids: Vec<_> = (0..2_000).map(|_| ActionId::random(&mut rng)).collect();
            store
                .enqueue(&ids, std::time::SystemTime::now())
                .await
                .unwrap();
            store.checkpoint().await.unwrap();
            store.close().await;
            path
        }
    };
    let foreign = dir.join("foreign.db");
    sql(
        foreign.clone(),
        &["CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)"],
    )
    .await;
    let future = ours("future.db").await;
    sql(
        future.clone(),
        &["UPDATE schema_info SET value = '2' WHERE name = 'major'"],
    )
    .await;
    let garbled = ours("garbled.db").await;
    sql(
        garbled.clone(),
        &["UPDATE schema_info SET value = 'one' WHERE name = 'major'"],
    )
    .await;
    let corrupt = ours("corrupt.db").await;
    {
        // Scribble over a data page in the middle of the file (not page 1, the header).
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&corrupt)
            .unwrap();
        let len = f.metadata().unwrap().len();
        f.seek(SeekFrom::Start((len / 2) / 4096 * 4096)).unwrap();
        f.write_all(&[0xA5; 4096]).unwrap();
    }
    let cases = [
        (&foreign, "not an mde-actiond database"),
        (&future, "newer mde-actiond"),
        (&garbled, "not a number"),
        (&corrupt, "damaged"),
    ];
    for (path, says) in cases {
        let before = std::fs::read(path).unwrap();
        let commands: [&[&str]; 4] = [
            &["report"],
            &["list"],
            &["enqueue", "2e9da30d-27f6-4208-81f2-9cd3d67893ba"],
            &["run"],
        ];
        for args in commands {
            let out = bin()
                .envs(daemon_env(&env))
                .env("MDE_ACTIOND_DATABASE__PATH", path)
                .args(args)
                .output()
                .await
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{args:?} {}: {err}",
                path.display()
            );
            assert!(err.contains(says), "{args:?} {}: {err}", path.display());
        }
        assert!(
            std::fs::read(path).unwrap() == before,
            "{} was changed",
            path.display()
        );
    }

    // A newer minor is additive: this version keeps working on it.
    let newer_minor = ours("newer-minor.db").await;
    sql(
        newer_minor.clone(),
        &[
            "UPDATE schema_info SET value = '9' WHERE name = 'minor'",
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (99, 'from a newer version', 1, x'00', 0)",
            "CREATE TABLE added_by_a_newer_version (x)",
        ],
    )
    .await;
    enqueue_with_cli(
        &newer_minor,
        &env.sim.create_random_actions(1, Duration::from_secs(1)),
    )
    .await;
}

/// Finding 8: one list answer holding an id three times with different statuses: the last
/// copy won silently (a stale one, so the log went backwards). Now the copy updated last is
/// believed, and every transition log stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_duplicate_entries_in_a_list_answer_do_not_rewind_the_log() {
    let env = TestEnv::new(SimConfig {
        stale_copies: true,
        ..SimConfig::default()
    })
    .await;
    let ms = Duration::from_millis;
    let ids: Vec<_> = (0..20)
        .map(|i| {
            env.sim.create_action(Lifecycle::new(vec![
                (Duration::ZERO, ActionStatus::Pending),
                (ms(300 + 50 * i), ActionStatus::InProgress),
                (ms(1500 + 50 * i), ActionStatus::Succeeded),
            ]))
        })
        .collect();
    let daemon = env.start_daemon().await;
    daemon.enqueue(&ids).await;
    wait_finished(&daemon.store, &ids, LIMIT).await;
    daemon.shutdown().await;
    env.assert_all_true(&ids).await;
    assert!(env.sim.stats().list_calls > 0, "the answers were lists");
}

/// Finding 9: an API that answers 401 to fresh tokens too made 229 token requests and 456
/// calls in 30 s. Now one refresh-and-retry, then token requests back off, /readyz says
/// "MDE rejects our tokens", and it all clears by itself once a token is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_the_api_rejects_back_off_and_readiness_says_so() {
    let mut env = TestEnv::new(SimConfig {
        reject_all_tokens: true,
        ..SimConfig::default()
    })
    .await;
    env.settings.http.listen = Some("127.0.0.1:0".into());
    let ids = env.sim.create_random_actions(5, Duration::from_secs(1));
    let daemon = RunningDaemon::start(&env.settings).await.unwrap();
    daemon.enqueue(&ids).await;
    let base = format!("http://{}", daemon.http_addr.unwrap());
    eventually(LIMIT, "readyz names the rejection", || async {
        let (code, text) = get(&format!("{base}/readyz")).await;
        code == 503 && text.contains("MDE rejects our tokens")
    })
    .await;
    // A measured window: what the daemon spends while every token is refused.
    let before = env.sim.stats();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = env.sim.stats();
    let tokens = after.token_requests - before.token_requests;
    let calls = after.api_calls - before.api_calls;
    eprintln!("in 5 s of rejected tokens: {tokens} token requests, {calls} API calls");
    // Backing off 1 s, 2 s, 4 s...: at most three token requests and three calls in 5 s.
    assert!(
        tokens <= 4 && calls <= 4,
        "{tokens} token requests, {calls} calls"
    );

    env.sim.set_reject_all_tokens(false);
    wait_finished(&daemon.store, &ids, LIMIT).await;
    eventually(LIMIT, "readyz back to 200", || async {
        get(&format!("{base}/readyz")).await.0 == 200
    })
    .await;
    daemon.shutdown().await;
    env.assert_all_true(&ids).await;
}

/// Finding 10b: a deleted `-wal` went unnoticed: every connection kept writing to the
/// unlinked file (lost on a crash) while other processes started a new one. Now the next
/// checkpoint sees it, moves the unlinked log into the database and reopens every
/// connection; ids enqueued by another process afterwards are tracked too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_wal_is_noticed_checkpointed_and_replaced() {
    let mut env = TestEnv::new(SimConfig::default()).await;
    env.settings.database.checkpoint_interval = Duration::from_millis(200);
    let s = Duration::from_secs;
    let life = || {
        Lifecycle::new(vec![
            (Duration::ZERO, ActionStatus::Pending),
            (s(1), ActionStatus::InProgress),
            (s(4), ActionStatus::Succeeded),
        ])
    };
    let ids: Vec<_> = (0..10).map(|_| env.sim.create_action(life())).collect();
    let daemon = RunningDaemon::start(&env.settings).await.unwrap();
    daemon.enqueue(&ids).await;
    let mut wal = env.db().into_os_string();
    wal.push("-wal");
    let wal = PathBuf::from(wal);
    eventually(LIMIT, "first transitions", || async {
        row(&daemon.store, &ids[0]).await.status.is_some()
    })
    .await;
    std::fs::remove_file(&wal).unwrap();
    eventually(LIMIT, "a new -wal", || async { wal.exists() }).await;
    let later: Vec<_> = (0..5).map(|_| env.sim.create_action(life())).collect();
    enqueue_with_cli(&env.db(), &later).await;
    let all: Vec<_> = ids.iter().chain(&later).cloned().collect();
    wait_finished(&daemon.store, &all, LIMIT).await;
    daemon.shutdown().await;
    env.assert_all_true(&all).await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", env.db().display()))
        .await
        .unwrap();
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(integrity, "ok");
}

/// Finding 10a and 10c: `check-config` said valid when `run` would exit 78 (a missing,
/// empty or world-readable http.api_token_file; per_minute above per_hour), and printed a
/// password from api.base_url's userinfo. Now both run the same checks, and userinfo is
/// redacted in check-config's output and in recorded errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_makes_every_check_run_makes_and_redacts_userinfo() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::new(SimConfig::default()).await;
    let dir = env.dir.path();
    let open = dir.join("open-token");
    std::fs::write(&open, "t0ken").unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let empty = dir.join("empty-token");
    std::fs::write(&empty, "").unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
    let token_file = |p: &Path| {
        vec![
            ("MDE_ACTIOND_HTTP__LISTEN", "127.0.0.1:0".to_string()),
            ("MDE_ACTIOND_HTTP__API_TOKEN_FILE", p.display().to_string()),
        ]
    };
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (token_file(&dir.join("missing")), "http.api_token_file"),
        (token_file(&open), "readable by other users"),
        (token_file(&empty), "empty"),
        (
            vec![
                ("MDE_ACTIOND_RATE_LIMIT__PER_MINUTE", "200".to_string()),
                ("MDE_ACTIOND_RATE_LIMIT__PER_HOUR", "100".to_string()),
            ],
            "rate_limit.per_minute",
        ),
    ];
    for (vars, says) in cases {
        for command in ["check-config", "run"] {
            let out = bin()
                .envs(daemon_env(&env))
                .envs(vars.iter().cloned())
                .arg(command)
                .output()
                .await
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{command} {vars:?}: {err}");
            assert!(err.contains(says), "{command} {vars:?}: {err}");
        }
    }

    // A password in the base URL's userinfo (a proxy's, say) is printed nowhere.
    let closed = free_port();
    let with_password = format!("http://bob:hunter2@127.0.0.1:{closed}");
    let out = bin()
        .envs(daemon_env(&env))
        .env("MDE_ACTIOND_API__BASE_URL", &with_password)
        .arg("check-config")
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("hunter2") && text.contains("[redacted]@127.0.0.1"),
        "{text}"
    );
    let mut settings = env.settings.clone();
    settings.api.base_url = Some(with_password);
    settings.api.connect_timeout = Duration::from_millis(200);
    let id = env.sim.create_random_actions(1, Duration::from_secs(1));
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    daemon.enqueue(&id).await;
    eventually(LIMIT, "a failed poll recorded", || async {
        row(&daemon.store, &id[0]).await.last_error.is_some()
    })
    .await;
    let error = row(&daemon.store, &id[0]).await.last_error.unwrap();
    daemon.shutdown().await;
    assert!(!error.contains("hunter2"), "{error}");
}
