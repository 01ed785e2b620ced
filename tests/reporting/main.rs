//! The database as a reporting interface: views checked against the simulator's truth,
//! `report`, `prune` and `export` through the binary, and external readers beside the writer.

#[path = "../common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use common::*;
use mde_actiond::domain::{ActionStatus, format_time};
use mde_actiond::sim::{Lifecycle, SimConfig};
use sqlx::Row;
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(90);

async fn ro_pool(db: &std::path::Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap()
}

fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    b.duration_since(a).unwrap_or_default().as_secs_f64()
}

/// The latest succeeded containment action of one aspect: when, and whether it switched on.
type Decided = Option<(SystemTime, bool)>;

/// Nearest-rank percentile, the definition docs/schema.md gives.
fn nearest_rank(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank - 1])
}

fn close(a: f64, b: f64) -> bool {
    // Times are stored with millisecond precision on both ends.
    (a - b).abs() < 0.003
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_answer_what_the_simulator_knows() {
    let env = TestEnv::new(SimConfig::default()).await;
    let mut settings = env.settings.clone();
    settings.report.stuck_after = Duration::from_secs(1);
    let mut ids = env.sim.create_random_actions(60, Duration::from_secs(2));
    // Containment stories on device 3: isolated, released, isolated again; device 4:
    // restricted; a failed isolation on device 5 decides nothing.
    let ms = Duration::from_millis;
    for (kind, device, end, delay) in [
        ("Isolate", 3, ActionStatus::Succeeded, 100),
        ("Unisolate", 3, ActionStatus::Succeeded, 400),
        ("Isolate", 3, ActionStatus::Succeeded, 900),
        ("RestrictCodeExecution", 4, ActionStatus::Succeeded, 300),
        ("Isolate", 5, ActionStatus::Failed, 300),
    ] {
        ids.push(
            env.sim
                .create_action_on(Lifecycle::simple(ms(50), ms(delay), end), kind, device),
        );
    }
    let stuck = env.sim.create_action_on(
        Lifecycle::simple(ms(100), Duration::from_secs(3600), ActionStatus::Succeeded),
        "CollectInvestigationPackage",
        7,
    );
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    daemon.enqueue(&ids).await;
    daemon.enqueue(std::slice::from_ref(&stuck)).await;
    wait_finished(&daemon.store, &ids, LIMIT).await;
    daemon.shutdown().await;
    env.assert_all_true(&ids).await;
    let pool = ro_pool(&env.db()).await;

    // action_summary: timings against the scripted truth.
    let mut by_day_type: HashMap<(String, String), Vec<(ActionStatus, f64)>> = HashMap::new();
    for id in &ids {
        let truth = env.sim.truth(id).unwrap();
        let created = truth[0].1;
        let (kind, _, _) = env.sim.describe(id).unwrap();
        let row = sqlx::query("SELECT * FROM action_summary WHERE action_id = ?1")
            .bind(id.as_str())
            .fetch_one(&pool)
            .await
            .unwrap();
        let terminal = truth.last().unwrap();
        let expected = secs_between(created, terminal.1);
        let got: f64 = row.get("seconds_to_terminal");
        assert!(
            close(got, expected),
            "{id}: seconds_to_terminal {got} vs {expected}"
        );
        let in_progress: Option<f64> = row.get("seconds_to_in_progress");
        if let Some(got) = in_progress {
            let step = truth
                .iter()
                .find(|(s, _)| *s == ActionStatus::InProgress)
                .unwrap();
            assert!(
                close(got, secs_between(created, step.1)),
                "{id}: in progress {got}"
            );
        }
        assert_eq!(row.get::<String, _>("status"), terminal.0.as_str());
        let day = format_time(created)[..10].to_string();
        by_day_type
            .entry((day, kind))
            .or_default()
            .push((terminal.0.clone(), expected));
    }

    // daily_stats: counts, success rate and nearest-rank percentiles per day and type.
    let rows = sqlx::query("SELECT * FROM daily_stats")
        .fetch_all(&pool)
        .await
        .unwrap();
    for ((day, kind), outcomes) in &by_day_type {
        let row = rows
            .iter()
            .find(|r| {
                r.get::<String, _>("day") == *day && r.get::<String, _>("action_type") == *kind
            })
            .unwrap_or_else(|| panic!("no daily_stats row for {day} {kind}"));
        let stuck_extra = i64::from(kind == "CollectInvestigationPackage");
        assert_eq!(
            row.get::<i64, _>("actions"),
            outcomes.len() as i64 + stuck_extra,
            "{kind}"
        );
        assert_eq!(
            row.get::<i64, _>("finished"),
            outcomes.len() as i64,
            "{kind}"
        );
        let succeeded = outcomes
            .iter()
            .filter(|(s, _)| *s == ActionStatus::Succeeded)
            .count();
        assert_eq!(row.get::<i64, _>("succeeded"), succeeded as i64, "{kind}");
        let rate: f64 = row.get("success_rate");
        assert!(
            (rate - succeeded as f64 / outcomes.len() as f64).abs() < 0.0001,
            "{kind}"
        );
        let mut times: Vec<f64> = outcomes.iter().map(|(_, t)| *t).collect();
        times.sort_by(f64::total_cmp);
        for (col, p) in [
            ("p50_seconds_to_terminal", 0.5),
            ("p95_seconds_to_terminal", 0.95),
        ] {
            let got: f64 = row.get(col);
            assert!(
                close(got, nearest_rank(&times, p).unwrap()),
                "{kind} {col}: {got} vs {times:?}"
            );
        }
    }

    // device_containment: the latest succeeded action per aspect decides.
    let mut expected: HashMap<String, (Decided, Decided)> = HashMap::new();
    for id in &ids {
        let (kind, machine, _) = env.sim.describe(id).unwrap();
        let truth = env.sim.truth(id).unwrap();
        let (end, at) = truth.last().unwrap().clone();
        if end != ActionStatus::Succeeded {
            continue;
        }
        let isolation = match kind.as_str() {
            "Isolate" | "Unisolate" => true,
            "RestrictCodeExecution" | "UnrestrictCodeExecution" => false,
            _ => continue,
        };
        let entry = expected.entry(machine).or_default();
        let slot = if isolation {
            &mut entry.0
        } else {
            &mut entry.1
        };
        let on = kind == "Isolate" || kind == "RestrictCodeExecution";
        if slot.is_none_or(|(t, _)| at > t) {
            *slot = Some((at, on));
        }
    }
    let rows = sqlx::query("SELECT * FROM device_containment")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), expected.len());
    for row in &rows {
        let machine: String = row.get("machine_id");
        let (iso, rce) = expected[&machine];
        assert_eq!(
            row.get::<Option<i64>, _>("isolated"),
            iso.map(|(_, on)| i64::from(on)),
            "{machine}"
        );
        assert_eq!(
            row.get::<Option<i64>, _>("code_execution_restricted"),
            rce.map(|(_, on)| i64::from(on)),
            "{machine}"
        );
        if let Some((at, _)) = iso {
            assert_eq!(
                row.get::<Option<String>, _>("isolation_changed_at"),
                Some(format_time(at))
            );
        }
    }
    let (_, device3, _) = env.sim.describe(&ids[60]).unwrap();
    let d3 = rows
        .iter()
        .find(|r| r.get::<String, _>("machine_id") == device3)
        .unwrap();
    assert_eq!(
        d3.get::<Option<i64>, _>("isolated"),
        Some(1),
        "isolated, released, isolated again"
    );

    // stuck_actions: only the long-running one, with its age.
    let rows = sqlx::query("SELECT action_id, age_seconds FROM stuck_actions")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<String, _>("action_id"), stuck.as_str());
    assert!(rows[0].get::<f64, _>("age_seconds") >= 1.0);
    let version: String = sqlx::query_scalar("SELECT value FROM schema_info WHERE name = 'major'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(version, "1");

    // The report, in each format, agrees with the database.
    let out = bin()
        .arg("--db")
        .arg(env.db())
        .args(["report", "--format", "json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tracked = (ids.len() + 1) as i64;
    let by_tracking: HashMap<String, i64> =
        serde_json::from_value::<Vec<(String, i64)>>(doc["counts"]["by_tracking"].clone())
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(by_tracking["done"], ids.len() as i64);
    assert_eq!(by_tracking["active"], 1);
    assert_eq!(doc["time_to_terminal"]["finished"], ids.len());
    assert_eq!(doc["oldest_active"][0]["action_id"], stuck.as_str());
    let calls = env.sim.stats().api_calls as i64;
    assert_eq!(doc["api_calls"]["total"], calls);
    let per = doc["api_calls"]["per_tracked_action"].as_f64().unwrap();
    assert!((per - calls as f64 / tracked as f64).abs() < 1e-9);
    // The effective check interval: calls by id that answered plus sweeps' findings, over
    // the window of the call log, for the one action still active.
    let by_id: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(action_count), 0) FROM api_calls
         WHERE sweep_id IS NULL AND outcome = 'ok'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let swept: i64 = sqlx::query_scalar("SELECT coalesce(sum(checked), 0) FROM sweeps")
        .fetch_one(&pool)
        .await
        .unwrap();
    let checks = by_id + swept;
    assert!(checks >= tracked, "{checks} checks for {tracked} actions");
    assert_eq!(doc["checking"]["checks"], checks);
    assert_eq!(doc["checking"]["active"], 1);
    let window = doc["checking"]["window_seconds"].as_f64().unwrap();
    let every = doc["checking"]["effective_interval_seconds"]
        .as_f64()
        .unwrap();
    assert!(window > 0.0);
    assert!((every - window / checks as f64).abs() < 1e-6, "{doc}");

    let out = bin()
        .arg("--db")
        .arg(env.db())
        .args(["report", "--format", "csv"])
        .output()
        .await
        .unwrap();
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.starts_with("section,key,value\n"));
    assert!(csv.contains(&format!("tracking,done,{}\n", ids.len())));
    assert!(csv.contains(&format!("api_calls,total,{calls}\n")));
    assert!(
        csv.contains(&format!("checking,checks,{checks}\n")),
        "{csv}"
    );

    let out = bin()
        .env("COLUMNS", "60")
        .arg("--db")
        .arg(env.db())
        .arg("report")
        .output()
        .await
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("TRACKING")
            && table.contains("Oldest active actions")
            && table.contains("Each active action checked every"),
        "{table}"
    );
    assert!(table.lines().all(|l| l.chars().count() <= 60), "{table}");
    let since = bin()
        .arg("--db")
        .arg(env.db())
        .args([
            "report",
            "--format",
            "json",
            "--since",
            "2099-01-01T00:00:00Z",
        ])
        .output()
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&since.stdout).unwrap();
    assert_eq!(doc["counts"]["by_tracking"].as_array().unwrap().len(), 0);
    let out = bin()
        .env("COLUMNS", "70")
        .arg("--db")
        .arg(env.db())
        .args(["list", "--format", "csv"])
        .output()
        .await
        .unwrap();
    let list = String::from_utf8(out.stdout).unwrap();
    assert_eq!(list.lines().count(), ids.len() + 2);
    let out = bin()
        .env("COLUMNS", "70")
        .arg("--db")
        .arg(env.db())
        .arg("list")
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .all(|l| l.chars().count() <= 70)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_old_finished_actions_and_reclaims_space() {
    let env = TestEnv::new(SimConfig::default()).await;
    let ids = env
        .sim
        .create_random_actions(300, Duration::from_millis(500));
    let active = env.sim.create_action(Lifecycle::simple(
        Duration::from_millis(10),
        Duration::from_secs(3600),
        ActionStatus::Succeeded,
    ));
    let daemon = env.start_daemon().await;
    daemon.enqueue(&ids).await;
    daemon.enqueue(std::slice::from_ref(&active)).await;
    wait_finished(&daemon.store, &ids, LIMIT).await;
    daemon.shutdown().await;
    let db = env.db();
    // A day passes for the finished ones (retention is at least a minute).
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(
        "UPDATE actions SET finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')
         WHERE finished_at IS NOT NULL",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    // The floor the config has holds for the flag too: 0s would delete every finished one.
    for keep in ["0s", "59s", "100000y"] {
        let refused = bin()
            .arg("--db")
            .arg(&db)
            .args(["prune", "--keep", keep])
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "--keep {keep}: {err}");
        assert!(
            err.contains("at least 1m") || err.contains("before 1970"),
            "{err}"
        );
    }

    let nothing = bin()
        .arg("--db")
        .arg(&db)
        .arg("prune")
        .output()
        .await
        .unwrap();
    assert_eq!(nothing.status.code(), Some(2), "no retention configured");
    let dry = bin()
        .arg("--db")
        .arg(&db)
        .args(["prune", "--dry-run", "--keep", "1h"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert!(
        text.starts_with(&format!("would delete {} actions", ids.len())),
        "{text}"
    );
    let pool = ro_pool(&db).await;
    let transitions: i64 = sqlx::query_scalar("SELECT count(*) FROM transitions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        text.contains(&format!("their {} transitions", transitions - 1)),
        "{text}"
    );
    let pages_before: i64 = sqlx::query_scalar("PRAGMA page_count")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;

    let out = bin()
        .arg("--db")
        .arg(&db)
        .env("MDE_ACTIOND_RETENTION__KEEP_FINISHED", "1m")
        .args(["prune", "--keep", "1h"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = ro_pool(&db).await;
    let left: Vec<String> = sqlx::query_scalar("SELECT action_id FROM actions")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        left,
        vec![active.to_string()],
        "only the active action stays"
    );
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM transitions WHERE action_id NOT IN (SELECT action_id FROM actions)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "transitions go with their action");
    let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
        .fetch_one(&pool)
        .await
        .unwrap();
    let pages_after: i64 = sqlx::query_scalar("PRAGMA page_count")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(free, 0);
    assert!(
        pages_after < pages_before,
        "{pages_after} >= {pages_before}"
    );
}

/// Fills a database with `n` finished actions, each with three transitions, straight in SQL.
async fn filled_db(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let db = dir.join(format!("big-{n}.db"));
    let store = mde_actiond::store::Store::open(&db, mde_actiond::store::OpenMode::ReadWrite)
        .await
        .unwrap();
    store.close().await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO actions (action_id, tracking, status, action_type, machine_id, computer_dns_name,
                              requestor, enqueued_at, finished_at, poll_count, last_response)
         SELECT printf('%08x-0000-4000-8000-%012x', i, i), 'done', 'Succeeded', 'Isolate',
                printf('%040x', i % 977), printf('ws-%04d.contoso.local', i % 977), 'soc@contoso.com',
                '2026-11-01T00:00:00.000Z', '2026-11-01T00:05:00.000Z', 4,
                '{\"id\":\"x\",\"status\":\"Succeeded\",\"padding\":\"' || hex(randomblob(100)) || '\"}'
         FROM n",
    )
    .bind(n as i64)
    .execute(&pool)
    .await
    .unwrap();
    for (from, to, minute) in [
        ("NULL", "'Pending'", 1),
        ("'Pending'", "'InProgress'", 2),
        ("'InProgress'", "'Succeeded'", 5),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO transitions (action_id, from_status, to_status, observed_at, mde_updated_at)
             SELECT action_id, {from}, {to}, '2026-11-01T00:0{minute}:00.000Z', '2026-11-01T00:0{minute}:00.000Z' FROM actions"
        )))
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;
    db
}

/// Runs `export` with its output discarded; returns (rows, peak RSS in KiB) from --stats.
async fn export_stats(db: &std::path::Path, args: &[&str]) -> (u64, u64) {
    let out = bin()
        .arg("--db")
        .arg(db)
        .arg("export")
        .args(args)
        .arg("--stats")
        .stdout(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("exported "))
        .unwrap_or_else(|| panic!("{text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let rows = words[1].parse().unwrap_or_else(|_| panic!("{text}"));
    let rss = words[words.iter().position(|w| *w == "RSS").unwrap() + 1]
        .parse()
        .unwrap_or_else(|_| panic!("{text}"));
    (rows, rss)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_streams_100k_rows_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let small = filled_db(dir.path(), 10_000).await;
    let big = filled_db(dir.path(), 100_000).await;
    let mut figures = Vec::new();
    for args in [
        &["--what", "actions", "--format", "jsonl"][..],
        &["--what", "transitions", "--format", "csv"][..],
        &["--what", "transitions", "--format", "jsonl"][..],
    ] {
        let (small_rows, small_rss) = export_stats(&small, args).await;
        let (big_rows, big_rss) = export_stats(&big, args).await;
        let factor = if args[1] == "transitions" { 3 } else { 1 };
        assert_eq!(small_rows, 10_000 * factor);
        assert_eq!(big_rows, 100_000 * factor);
        figures.push(format!(
            "{args:?}: {big_rows} rows, peak RSS {big_rss} KiB (10x fewer rows: {small_rss} KiB)"
        ));
        // Ten times the rows may not cost more than a few MiB more: nothing accumulates.
        assert!(
            big_rss < small_rss + 8 * 1024,
            "{args:?}: {small_rss} KiB -> {big_rss} KiB"
        );
    }
    eprintln!("{}", figures.join("\n"));

    // A transition's line stands alone: it carries its action's context.
    let out = bin()
        .arg("--db")
        .arg(&big)
        .args([
            "export",
            "--what",
            "transitions",
            "--since",
            "2026-11-01T00:05:00Z",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 100_000);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["to_status"], "Succeeded");
    assert_eq!(first["action_type"], "Isolate");
    assert!(
        first["computer_dns_name"]
            .as_str()
            .unwrap()
            .starts_with("ws-")
    );
    assert!(first["requestor"].is_string());
}

/// A real external client holds a read transaction while the daemon writes thousands of
/// transitions: neither side errs, the reader's snapshot stays consistent, and the WAL
/// shrinks once the reader lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reader_neither_blocks_nor_is_blocked() {
    if std::process::Command::new("sqlite3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: the sqlite3 shell is not installed (.ci/run installs it)");
        return;
    }
    let env = TestEnv::new(SimConfig::default()).await;
    let mut settings = env.settings.clone();
    settings.database.checkpoint_interval = Duration::from_millis(200);
    let first = env
        .sim
        .create_random_actions(10, Duration::from_millis(300));
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    daemon.enqueue(&first).await;
    wait_finished(&daemon.store, &first, LIMIT).await;

    // The reader: BEGIN, read, and keep the transaction open.
    let mut reader = Command::new("sqlite3")
        .arg("-readonly")
        .arg(env.db())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stdin = reader.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(reader.stdout.take().unwrap()).lines();
    // Sends SQL to the shell and reads the one number it prints back.
    async fn ask(
        stdin: &mut tokio::process::ChildStdin,
        lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
        sql: &[u8],
    ) -> i64 {
        stdin.write_all(sql).await.unwrap();
        lines
            .next_line()
            .await
            .unwrap()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
    let before = ask(
        &mut stdin,
        &mut lines,
        b"BEGIN;
SELECT count(*) FROM transitions;
",
    )
    .await;

    let many = env
        .sim
        .create_random_actions(2000, Duration::from_millis(800));
    daemon.enqueue(&many).await;
    let wal = env.db().with_extension("db-wal");
    wait_finished(&daemon.store, &many, LIMIT).await;
    let peak = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let written = daemon.poller.stats().transitions.get();
    assert!(written >= 2000, "only {written} transitions");

    // Same snapshot inside the transaction: no error, no torn read.
    let during = ask(
        &mut stdin,
        &mut lines,
        b"SELECT count(*) FROM transitions;
",
    )
    .await;
    assert_eq!(during, before);
    let after = ask(
        &mut stdin,
        &mut lines,
        b"COMMIT;
SELECT count(*) FROM transitions;
",
    )
    .await;
    assert!(after >= before + 2000, "{before} -> {after}");
    stdin.write_all(b".quit\n").await.unwrap();
    drop(stdin);
    let out = reader.wait_with_output().await.unwrap();
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "reader saw: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The daemon saw no database error either, and the WAL comes back down.
    assert!(
        daemon.poller.stats().last_error().is_none(),
        "{:?}",
        daemon.poller.stats().last_error()
    );
    eventually(LIMIT, "the WAL shrinks", || async {
        std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) == 0
    })
    .await;
    eprintln!(
        "WAL peaked at {} KiB while the reader held its snapshot; 0 after",
        peak / 1024
    );
    assert!(peak > 0);
    daemon.shutdown().await;
    env.assert_all_true(&many).await;
}

/// With retention.keep_finished set, the running daemon prunes by itself (at start, then
/// hourly), leaving recent and active actions alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_applies_retention_by_itself() {
    let env = TestEnv::new(SimConfig::default()).await;
    let old = env
        .sim
        .create_random_actions(20, Duration::from_millis(300));
    let daemon = env.start_daemon().await;
    daemon.enqueue(&old).await;
    wait_finished(&daemon.store, &old, LIMIT).await;
    daemon.shutdown().await;
    // Age them: finished a year ago.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", env.db().display()))
        .await
        .unwrap();
    sqlx::query("UPDATE actions SET finished_at = '2025-11-01T00:00:00.000Z'")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let recent = env.sim.create_random_actions(5, Duration::from_millis(300));
    let mut settings = env.settings.clone();
    settings.retention.keep_finished = Some(Duration::from_secs(30 * 86_400));
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    daemon.enqueue(&recent).await;
    wait_finished(&daemon.store, &recent, LIMIT).await;
    let store = daemon.store.clone();
    eventually(LIMIT, "old actions pruned", || async {
        store.action(&old[0]).await.unwrap().is_none()
    })
    .await;
    daemon.shutdown().await;
    let reader = env.reader().await;
    for id in &old {
        assert!(reader.action(id).await.unwrap().is_none(), "{id} kept");
        assert!(reader.transitions(id).await.unwrap().is_empty());
    }
    for id in &recent {
        assert_eq!(row(&reader, id).await.tracking, "done");
    }
}
