//! Black-box tests: the built binary, driven as a shell, a script or systemd would.

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;
use mde_actiond::domain::ActionStatus;
use mde_actiond::sim::{Lifecycle, SimConfig};
use nix::sys::signal::Signal;
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(60);

async fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .await
        .expect("binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn enqueue_takes_valid_ids_refuses_the_rest_and_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("q.db");
    let file = dir.path().join("ids.txt");
    std::fs::write(
        &file,
        "# ids from the playbook\n11111111-2222-3333-4444-555555555555\n\nnot-a-guid\n{AAAAAAAA-2222-3333-4444-555555555555}, extra column\n",
    )
    .unwrap();
    // No command but `run` creates a database: pointed at the wrong place, enqueue says so
    // instead of starting a stray file the daemon never reads.
    let stray = output(
        bin()
            .arg("--db")
            .arg(&db)
            .args(["enqueue", "2E9DA30D-27F6-4208-81F2-9CD3D67893BA"]),
    )
    .await;
    let err = text(&stray.stderr);
    assert_eq!(stray.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&db.display().to_string()) && err.contains("--tenant NAME"),
        "{err}"
    );
    assert!(!db.exists(), "enqueue created a database");
    create_db(&db).await;
    let out = output(
        bin()
            .arg("--db")
            .arg(&db)
            .args([
                "enqueue",
                "2E9DA30D-27F6-4208-81F2-9CD3D67893BA",
                "'; DROP TABLE actions;--",
                "--file",
            ])
            .arg(&file),
    )
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("added 2e9da30d-27f6-4208-81f2-9cd3d67893ba"),
        "{stdout}"
    );
    assert!(
        stdout.contains("added aaaaaaaa-2222-3333-4444-555555555555"),
        "{stdout}"
    );
    assert!(stderr.contains("'; DROP TABLE actions;--"), "{stderr}");
    assert!(
        stderr.contains("ids.txt:4: refused: 'not-a-guid'"),
        "{stderr}"
    );
    assert!(
        stderr.contains("3 added, 0 already known, 2 refused"),
        "{stderr}"
    );

    // Again, from stdin: all known now, so success.
    let mut child = bin()
        .arg("--db")
        .arg(&db)
        .args(["enqueue", "--file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"11111111-2222-3333-4444-555555555555\n")
            .await
            .unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).contains("known 11111111-2222-3333-4444-555555555555 (tracking active)")
    );

    let list = output(bin().arg("--db").arg(&db).args(["list", "--json"])).await;
    assert_eq!(list.status.code(), Some(0));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter()
            .all(|r| r["tracking"] == "active" && r["poll_count"] == 0)
    );

    let table = output(
        bin()
            .arg("--db")
            .arg(&db)
            .args(["list", "--tracking", "done"]),
    )
    .await;
    assert_eq!(text(&table.stdout).lines().count(), 1, "header only");
    let bad = output(
        bin()
            .arg("--db")
            .arg(&db)
            .args(["list", "--tracking", "finished"]),
    )
    .await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("unknown tracking state 'finished'"));

    let nothing = output(bin().arg("--db").arg(&db).arg("enqueue")).await;
    assert_eq!(nothing.status.code(), Some(2));
}

#[tokio::test]
async fn status_explains_unknown_and_invalid_ids() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("q.db");
    let missing = output(
        bin()
            .arg("--db")
            .arg(&db)
            .args(["status", "11111111-2222-3333-4444-555555555555"]),
    )
    .await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("does not exist"),
        "{}",
        text(&missing.stderr)
    );
    assert!(!db.exists(), "a read-only command created the database");

    create_db(&db).await;
    output(
        bin()
            .arg("--db")
            .arg(&db)
            .args(["enqueue", "11111111-2222-3333-4444-555555555555"]),
    )
    .await;
    let untracked = output(
        bin()
            .arg("--db")
            .arg(&db)
            .args(["status", "99999999-2222-3333-4444-555555555555"]),
    )
    .await;
    assert_eq!(untracked.status.code(), Some(2));
    assert!(text(&untracked.stderr).contains("not tracked"));
    let invalid = output(bin().arg("--db").arg(&db).args(["status", "12345"])).await;
    assert_eq!(invalid.status.code(), Some(2));
    assert!(text(&invalid.stderr).contains("'12345' is not an action id"));
    let ok = output(
        bin()
            .arg("--db")
            .arg(&db)
            .args(["status", "11111111-2222-3333-4444-555555555555"]),
    )
    .await;
    assert_eq!(ok.status.code(), Some(0));
    assert!(text(&ok.stdout).contains("tracking      active"));
    assert!(text(&ok.stdout).contains("(none yet)"));
}

#[tokio::test]
async fn configuration_errors_name_the_key_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("q.db");
    let out = output(bin().arg("--db").arg(&db).arg("run")).await;
    assert_eq!(out.status.code(), Some(78));
    let err = text(&out.stderr);
    for key in ["auth.tenant_id", "auth.client_id", "auth.client_secret"] {
        assert!(err.contains(key), "{err}");
    }
    assert!(
        !db.exists(),
        "run with a bad configuration touched the database"
    );

    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[poll]\nbatch_size = 0\nmultiplier = \"fast\"\n").unwrap();
    let out = output(bin().arg("--config").arg(&file).arg("check-config")).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("multiplier"),
        "{}",
        text(&out.stderr)
    );

    std::fs::write(
        &file,
        "[poll]\nbatch_size = 0\n[auth]\nclient_secret = \"canary-s3cret\"\n",
    )
    .unwrap();
    let out = output(bin().arg("--config").arg(&file).arg("check-config")).await;
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("poll.batch_size: must be between 1 and 150"));
    assert!(text(&out.stdout).contains("client_secret = \"[redacted]\""));
    assert!(!text(&out.stdout).contains("canary-s3cret"));

    let out = output(
        bin()
            .arg("--config")
            .arg(dir.path().join("absent.toml"))
            .arg("check-config"),
    )
    .await;
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("absent.toml"));

    let out = output(
        bin()
            .env("MDE_ACTIOND_RATE_LIMIT__PER_MINUTE", "lots")
            .arg("check-config"),
    )
    .await;
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("per_minute"),
        "{}",
        text(&out.stderr)
    );
}

async fn wait_cmd(db: &Path, args: &[&str]) -> Output {
    output(bin().arg("--db").arg(db).arg("wait").args(args)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_wait_and_stops_cleanly_on_sigterm() {
    let env = TestEnv::new(SimConfig::default()).await;
    let ok = env.sim.create_action(Lifecycle::simple(
        Duration::from_millis(300),
        Duration::from_millis(500),
        ActionStatus::Succeeded,
    ));
    let failed = env.sim.create_action(Lifecycle::simple(
        Duration::from_millis(300),
        Duration::from_millis(500),
        ActionStatus::Failed,
    ));
    let long = env.sim.create_action(Lifecycle::simple(
        Duration::from_millis(300),
        Duration::from_secs(600),
        ActionStatus::Succeeded,
    ));
    let mut daemon = spawn_daemon(&env, &[], &[]);
    let db = env.db();
    // The daemon creates the database as it starts (systemd's start returns after that).
    eventually(LIMIT, "the daemon's database", || async { db.exists() }).await;

    let out = wait_cmd(&db, &["--enqueue", "--timeout", "30s", ok.as_str()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("{ok} done Succeeded"));

    let out = wait_cmd(
        &db,
        &[
            "--enqueue",
            "--timeout",
            "30s",
            ok.as_str(),
            failed.as_str(),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains(&format!("{failed} done Failed")));

    let out = wait_cmd(&db, &["--enqueue", "--timeout", "1s", long.as_str()]).await;
    assert_eq!(out.status.code(), Some(124));

    let out = wait_cmd(
        &db,
        &["--timeout", "1s", "99999999-2222-3333-4444-555555555555"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--enqueue"));

    // Status shows the transition log.
    let out = output(
        bin()
            .arg("--db")
            .arg(&db)
            .args(["status", "--json", ok.as_str()]),
    )
    .await;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["action"]["status"], "Succeeded");
    assert_eq!(doc["action"]["last_response"]["id"], ok.as_str());
    let to: Vec<&str> = doc["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["to_status"].as_str().unwrap())
        .collect();
    assert_eq!(to.last(), Some(&"Succeeded"));

    let started = std::time::Instant::now();
    signal(&daemon, Signal::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(10), daemon.wait())
        .await
        .expect("exits within 10 s")
        .unwrap();
    eprintln!("SIGTERM to exit: {:?}", started.elapsed());
    assert_eq!(status.code(), Some(0));
    // Checkpointed at exit: the WAL holds nothing a reader would need.
    let wal = env.dir.path().join("actions.db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
    let store = env.reader().await;
    assert_eq!(row(&store, &long).await.tracking, "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_run_loses_nothing_and_a_restart_finishes_the_job() {
    let env = TestEnv::new(SimConfig {
        fault_rate: 0.1,
        ..SimConfig::default()
    })
    .await;
    let ids = env.sim.create_random_actions(60, Duration::from_secs(4));
    enqueue_with_cli(&env.db(), &ids).await;

    let reader = env.reader().await;
    for round in 0..3 {
        let mut daemon = spawn_daemon(&env, &[], &[]);
        let target = 20 * (round + 1);
        eventually(LIMIT, "transitions recorded", || async {
            let n: i64 = count_transitions(&reader).await;
            n >= target
        })
        .await;
        daemon.start_kill().unwrap();
        let status = daemon.wait().await.unwrap();
        assert_eq!(status.code(), None, "killed by a signal");
    }
    let mut daemon = spawn_daemon(&env, &[], &[]);
    wait_finished(&reader, &ids, LIMIT).await;
    signal(&daemon, Signal::SIGTERM);
    assert_eq!(daemon.wait().await.unwrap().code(), Some(0));
    env.assert_all_true(&ids).await;
}

async fn count_transitions(store: &mde_actiond::store::Store) -> i64 {
    let mut n = 0;
    let mut after = 0;
    loop {
        let page = store.transitions_after(after, 1000).await.unwrap();
        if page.is_empty() {
            return n;
        }
        n += page.len() as i64;
        after = page.last().unwrap().id;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_tokens_never_reach_the_output() {
    let env = TestEnv::new(SimConfig {
        token_lifetime: Duration::from_secs(2),
        fault_rate: 0.2,
        ..SimConfig::default()
    })
    .await;
    let ids = env.sim.create_random_actions(10, Duration::from_secs(2));
    let mut daemon = spawn_daemon(&env, &[("RUST_LOG", "trace".to_string())], &[]);
    // Drain the pipes while it runs: trace output fills a pipe buffer in moments.
    let stdout = tokio::spawn(read_all(daemon.stdout.take().unwrap()));
    let stderr = tokio::spawn(read_all(daemon.stderr.take().unwrap()));
    let db = env.db();
    enqueue_with_cli(&db, &ids).await;
    let reader = env.reader().await;
    wait_finished(&reader, &ids, LIMIT).await;
    signal(&daemon, Signal::SIGTERM);
    assert_eq!(daemon.wait().await.unwrap().code(), Some(0));
    let (o, e) = (stdout.await.unwrap(), stderr.await.unwrap());
    let all = format!("{o}{e}");
    assert!(all.contains("status changed"), "trace output missing");
    let tokens = env.sim.issued_tokens();
    assert!(tokens.len() >= 2);
    assert!(
        !all.contains(mde_actiond::sim::SIM_CLIENT_SECRET),
        "client secret leaked"
    );
    for t in &tokens {
        assert!(!all.contains(t.as_str()), "token leaked");
    }
    // Nor the database.
    let dump = std::fs::read(&db).unwrap();
    let dump = String::from_utf8_lossy(&dump);
    assert!(!dump.contains(mde_actiond::sim::SIM_CLIENT_SECRET));
    assert!(!tokens.iter().any(|t| dump.contains(t.as_str())));
}

#[tokio::test]
async fn help_lists_every_command_with_examples() {
    let out = output(bin().arg("--help")).await;
    let help = text(&out.stdout);
    for cmd in [
        "run",
        "enqueue",
        "status",
        "list",
        "wait",
        "check-config",
        "demo",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from --help");
    }
    assert!(help.contains("Examples:"));
    for cmd in ["run", "enqueue", "status", "list", "wait", "demo"] {
        let out = output(bin().args([cmd, "--help"])).await;
        assert_eq!(out.status.code(), Some(0));
        assert!(
            text(&out.stdout).contains("Example"),
            "{cmd} --help has no example"
        );
    }
}

#[tokio::test]
async fn completions_and_the_manual_page_cover_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = output(bin().args(["completions", shell])).await;
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = text(&out.stdout);
        for cmd in ["enqueue", "status", "report", "prune", "doctor", "tenant"] {
            assert!(script.contains(cmd), "{shell} completion lacks {cmd}");
        }
    }
    let bad = output(bin().args(["completions", "tcsh"])).await;
    assert_eq!(bad.status.code(), Some(2));
    let out = output(bin().arg("man")).await;
    assert_eq!(out.status.code(), Some(0));
    let page = text(&out.stdout);
    assert!(page.contains(".TH mde-actiond 1"), "{page}");
    for cmd in [
        "enqueue",
        "wait",
        "report",
        "export",
        "prune",
        "completions",
    ] {
        assert!(page.contains(cmd), "man page lacks {cmd}");
    }
    // man(1) renders it without complaint, where it is installed.
    if std::process::Command::new("man")
        .arg("--version")
        .output()
        .is_ok()
    {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mde-actiond.1");
        std::fs::write(&file, &page).unwrap();
        let rendered = std::process::Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&file)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        let warnings = String::from_utf8_lossy(&rendered.stderr);
        assert!(rendered.status.success(), "{warnings}");
        assert!(String::from_utf8_lossy(&rendered.stdout).contains("mde-actiond"));
    }
}
