//! Operations: the HTTP listener (health, readiness, metrics, intake), the systemd
//! notification protocol, signals, log formats, and running unprivileged.
// The tests talk to the daemon as its users do; the outbound policy of clippy.toml is the
// daemon's own.
#![allow(clippy::disallowed_methods)]

#[path = "../common/mod.rs"]
mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use mde_actiond::domain::{ActionId, ActionStatus};
use mde_actiond::secret::Secret;
use mde_actiond::sim::{Fault, Lifecycle, SimConfig};
use nix::sys::signal::Signal;
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(60);

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_serves_health_metrics_and_intake() {
    let env = TestEnv::new(SimConfig::default()).await;
    let token_file = env.dir.path().join("api-token");
    private_file(&token_file, "let-me-in\n");
    let mut settings = env.settings.clone();
    settings.http.listen = Some("127.0.0.1:0".into());
    settings.http.api_token_file = Some(token_file);
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    let base = format!("http://{}", daemon.http_addr.unwrap());
    let http = client();
    let auth = |r: reqwest::RequestBuilder| r.bearer_auth("let-me-in");

    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let ok = env.sim.create_action(Lifecycle::simple(
        Duration::from_millis(200),
        Duration::from_millis(300),
        ActionStatus::Succeeded,
    ));
    let body = serde_json::json!({"ids": [ok.as_str(), "bogus", 42, ok.as_str().to_uppercase()]});
    // No token: refused, nothing enqueued.
    let r = http
        .post(format!("{base}/v1/actions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(daemon.store.action(&ok).await.unwrap().is_none());

    let r = auth(
        http.post(format!("{base}/v1/actions"))
            .header("content-type", "application/json")
            .body(body.to_string()),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(
        r.status(),
        400,
        "bad ids make it a 400, but the valid one is taken"
    );
    let doc: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(
        (
            doc["added"].as_u64(),
            doc["known"].as_u64(),
            doc["refused"].as_u64()
        ),
        (Some(1), Some(1), Some(2))
    );
    assert_eq!(doc["results"][0]["result"], "added");
    assert_eq!(doc["results"][1]["result"], "refused");
    assert!(
        doc["results"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("'bogus'")
    );
    assert!(
        doc["results"][2]["reason"]
            .as_str()
            .unwrap()
            .contains("not a string")
    );
    assert_eq!(doc["results"][3]["result"], "known");

    wait_finished(&daemon.store, std::slice::from_ref(&ok), LIMIT).await;
    let r = auth(http.get(format!("{base}/v1/actions/{}", ok.as_str().to_uppercase())))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(doc["action"]["tracking"], "done");
    assert_eq!(
        doc["transitions"].as_array().unwrap().last().unwrap()["to_status"],
        "Succeeded"
    );

    let r = auth(http.get(format!(
        "{base}/v1/actions/11111111-2222-3333-4444-555555555555"
    )))
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    let r = auth(http.get(format!("{base}/v1/actions/nope")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    for (body, needle) in [
        ("{\"ids\": [", "body must be JSON"),
        ("{\"id\": []}", "unknown field"),
        ("{\"ids\": []}", "empty"),
    ] {
        let r = auth(http.post(format!("{base}/v1/actions")).body(body))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let text = r.text().await.unwrap();
        assert!(text.contains(needle), "{body}: {text}");
    }
    let huge = format!("{{\"ids\": [\"{}\"]}}", "x".repeat(2 * 1024 * 1024));
    let r = auth(http.post(format!("{base}/v1/actions")).body(huge))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "mde_actiond_actions{tracking=\"done\"} 1",
        "mde_actiond_actions_by_status{status=\"Succeeded\"} 1",
        "mde_actiond_api_calls_total{endpoint=",
        "mde_actiond_rate_limited_total 0",
        "mde_actiond_rate_limit_paused_seconds_total",
        "mde_actiond_api_budget_remaining{window=\"minute\"}",
        "mde_actiond_api_budget_remaining{window=\"hour\"}",
        "mde_actiond_token_refreshes_total 1",
        "mde_actiond_token_failures_total 0",
        "mde_actiond_sweep_duration_seconds_count",
        "mde_actiond_detection_lag_seconds_bucket",
        "mde_actiond_db_write_seconds_count",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    let lag_count: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mde_actiond_detection_lag_seconds_count "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(lag_count >= 2, "every transition's lag is observed");
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_a_refused_secret() {
    let env = TestEnv::new(SimConfig::default()).await;
    let mut settings = env.settings.clone();
    settings.http.listen = Some("127.0.0.1:0".into());
    settings.auth.client_secret = Some(Secret::new("wrong-secret"));
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    let id = env.sim.create_action(Lifecycle::simple(
        Duration::from_millis(100),
        Duration::from_millis(100),
        ActionStatus::Succeeded,
    ));
    daemon.enqueue(&[id]).await;
    let base = format!("http://{}", daemon.http_addr.unwrap());
    let http = client();
    eventually(LIMIT, "readyz turns 503", || async {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 503
    })
    .await;
    let text = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("AADSTS7000215"), "{text}");
    assert!(!text.contains("wrong-secret"));
    // Alive all the same: the loop is waiting for a token, not hung.
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    daemon.shutdown().await;
}

/// Binds a notification socket as systemd does and collects what the daemon says.
struct FakeSystemd {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl FakeSystemd {
    fn new(dir: &std::path::Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Self { socket, path }
    }

    /// Messages received until `until` returns true for one of them, or `limit` passes.
    async fn collect_until(
        &self,
        limit: Duration,
        until: impl Fn(&str) -> bool + Send + 'static,
    ) -> Vec<(std::time::Instant, String)> {
        let socket = self.socket.try_clone().unwrap();
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + limit;
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while std::time::Instant::now() < deadline {
                if let Ok(n) = socket.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let stop = until(&msg);
                    got.push((std::time::Instant::now(), msg));
                    if stop {
                        break;
                    }
                }
            }
            got
        })
        .await
        .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_the_systemd_notify_protocol() {
    let env = TestEnv::new(SimConfig::default()).await;
    let systemd = FakeSystemd::new(env.dir.path());
    let ids = env.sim.create_random_actions(5, Duration::from_secs(30));
    enqueue_with_cli(&env.db(), &ids).await;
    let mut daemon = spawn_daemon(
        &env,
        &[
            ("NOTIFY_SOCKET", systemd.path.display().to_string()),
            ("WATCHDOG_USEC", "1000000".into()),
        ],
        &[],
    );
    let stderr = tokio::spawn(read_all(daemon.stderr.take().unwrap()));
    let watchdogs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = watchdogs.clone();
    let first = systemd
        .collect_until(Duration::from_secs(20), move |m| {
            m == "WATCHDOG=1" && w.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= 4
        })
        .await;
    let ready = first
        .iter()
        .find(|(_, m)| m.starts_with("READY=1"))
        .expect("READY=1 sent");
    assert!(ready.1.contains("STATUS=active 5, done 0"), "{}", ready.1);
    let pings: Vec<_> = first
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    assert!(pings.len() >= 4, "{first:?}");
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("watchdog gaps with WATCHDOG_USEC=1s: {gaps:?}");
    assert!(
        first.iter().position(|(_, m)| m.starts_with("READY=1"))
            < first.iter().position(|(_, m)| m == "WATCHDOG=1")
    );

    signal(&daemon, Signal::SIGTERM);
    let rest = systemd
        .collect_until(Duration::from_secs(10), |m| m.starts_with("STOPPING=1"))
        .await;
    assert!(
        rest.iter()
            .any(|(_, m)| m.starts_with("STOPPING=1\nSTATUS=stopping")),
        "{rest:?}"
    );
    let status = tokio::time::timeout(Duration::from_secs(10), daemon.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let log = stderr.await.unwrap();
    assert!(log.contains("stopped"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_calls_in_flight_exits_cleanly_and_a_second_signal_exits_at_once() {
    let env = TestEnv::new(SimConfig {
        fault_rate: 1.0,
        faults: vec![Fault::Slow],
        slow_delay: Duration::from_millis(1500),
        ..SimConfig::default()
    })
    .await;
    let ids = env.sim.create_random_actions(40, Duration::from_secs(30));
    enqueue_with_cli(&env.db(), &ids).await;
    let extra = [
        ("MDE_ACTIOND_POLL__BATCH_SIZE", "1".to_string()),
        ("MDE_ACTIOND_POLL__CONCURRENCY", "8".to_string()),
        ("MDE_ACTIOND_RATE_LIMIT__PER_MINUTE", "1000".to_string()),
    ];
    for (sig, second) in [
        (Signal::SIGTERM, false),
        (Signal::SIGINT, false),
        (Signal::SIGTERM, true),
    ] {
        let mut daemon = spawn_daemon(&env, &extra, &[]);
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let stderr = {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(daemon.stderr.take().unwrap()).lines();
            tokio::spawn(async move {
                let mut all = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = seen_tx.send(line.clone());
                    all.push_str(&line);
                    all.push('\n');
                }
                all
            })
        };
        // Wait until calls are in flight: the simulator has received some.
        let before = env.sim.stats().api_calls;
        eventually(LIMIT, "calls in flight", || async {
            env.sim.stats().api_calls >= before + 4
        })
        .await;
        let started = std::time::Instant::now();
        signal(&daemon, sig);
        if second {
            // The second signal, once the first has been taken.
            while let Some(line) = seen_rx.recv().await {
                if line.contains("stop requested") {
                    break;
                }
            }
            signal(&daemon, Signal::SIGTERM);
        }
        let status = tokio::time::timeout(Duration::from_secs(10), daemon.wait())
            .await
            .expect("exits within 10 s")
            .unwrap();
        let took = started.elapsed();
        let log = stderr.await.unwrap();
        eprintln!("{sig:?} (second signal: {second}) to exit: {took:?}");
        if second {
            assert_eq!(status.code(), Some(130), "{log}");
        } else {
            assert_eq!(status.code(), Some(0), "{log}");
            let wal = env.db().with_extension("db-wal");
            assert!(
                !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
                "WAL not checkpointed"
            );
        }
        // Never half-written, whatever the signal.
        let store = env.reader().await;
        for id in &ids {
            let r = row(&store, id).await;
            assert_eq!(r.tracking == "active", r.next_poll_at.is_some());
        }
        store.close().await;
    }
    let check = std::process::Command::new("sqlite3")
        .arg(env.db())
        .arg("PRAGMA integrity_check")
        .output();
    if let Ok(out) = check {
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_lines_or_plain_text_without_colour() {
    let env = TestEnv::new(SimConfig::default()).await;
    for format in ["json", "text"] {
        let ids = env.sim.create_random_actions(3, Duration::from_secs(1));
        let mut daemon = spawn_daemon(&env, &[], &["--log-format", format]);
        let stderr = tokio::spawn(read_all(daemon.stderr.take().unwrap()));
        enqueue_with_cli(&env.db(), &ids).await;
        let reader = env.reader().await;
        wait_finished(&reader, &ids, LIMIT).await;
        reader.close().await;
        signal(&daemon, Signal::SIGTERM);
        assert_eq!(daemon.wait().await.unwrap().code(), Some(0));
        let log = stderr.await.unwrap();
        assert!(
            !log.contains('\u{1b}'),
            "colour codes in a non-terminal log"
        );
        assert!(log.lines().count() >= 3, "{log}");
        if format == "json" {
            let mut changed = 0;
            for line in log.lines() {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
                assert!(
                    v["level"].is_string() && v["timestamp"].is_string(),
                    "{line}"
                );
                if v["message"] == "status changed" {
                    changed += 1;
                    assert!(
                        ActionId::parse(v["action_id"].as_str().unwrap()).is_ok(),
                        "{line}"
                    );
                }
            }
            assert!(changed >= 3, "{log}");
        } else {
            assert!(
                log.contains("status changed") && log.contains("action_id="),
                "{log}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_subcommand_probes_readiness() {
    let env = TestEnv::new(SimConfig::default()).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut daemon = spawn_daemon(&env, &[("MDE_ACTIOND_HTTP__LISTEN", listen.clone())], &[]);
    let stderr = tokio::spawn(read_all(daemon.stderr.take().unwrap()));
    eventually(LIMIT, "healthcheck passes", || async {
        bin()
            .env("MDE_ACTIOND_HTTP__LISTEN", &listen)
            .arg("healthcheck")
            .output()
            .await
            .unwrap()
            .status
            .success()
    })
    .await;
    let by_url = bin()
        .args(["healthcheck", "--url", &format!("http://127.0.0.1:{port}")])
        .output()
        .await
        .unwrap();
    assert!(by_url.status.success());
    let live = bin()
        .env("MDE_ACTIOND_HTTP__LISTEN", &listen)
        .args(["healthcheck", "--live"])
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&live.stdout).contains("/healthz"));
    signal(&daemon, Signal::SIGTERM);
    assert_eq!(daemon.wait().await.unwrap().code(), Some(0));
    let _ = stderr.await;
    let down = bin()
        .env("MDE_ACTIOND_HTTP__LISTEN", &listen)
        .arg("healthcheck")
        .output()
        .await
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("not ok"));
    let unset = bin().arg("healthcheck").output().await.unwrap();
    assert_eq!(unset.status.code(), Some(2));
}

/// As in the container image: an unprivileged uid whose only writable place is the database
/// directory (cwd and HOME unwritable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_unprivileged_with_only_the_database_directory_writable() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to switch to uid 65532");
        return;
    }
    let env = TestEnv::new(SimConfig::default()).await;
    let data = env.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(65532), Some(65532)).unwrap();
    // The temp dir itself must be traversable by that uid.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = data.join("mde-actiond.db");
    // A checkout under a private directory (/root, a mktemp -d folder) is not traversable by
    // that uid: it runs a copy of the binary from the test's own directory.
    let exe = env.dir.path().join("mde-actiond");
    std::fs::copy(BIN, &exe).unwrap();
    let ids = env.sim.create_random_actions(4, Duration::from_secs(1));
    let unprivileged = |cmd: &mut Command| {
        cmd.uid(65532)
            .gid(65532)
            .current_dir("/")
            .env("HOME", "/nonexistent")
            .env("MDE_ACTIOND_DATABASE__PATH", &db);
    };
    // No umask in a container (0000): the daemon makes its files private to its group itself.
    let mut run = bin_at(std::path::Path::new("/bin/sh"));
    run.envs(daemon_env(&env));
    unprivileged(&mut run);
    let mut daemon = run
        .args(["-c", "umask 0000; exec \"$0\" run"])
        .arg(&exe)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = tokio::spawn(read_all(daemon.stderr.take().unwrap()));
    eventually(LIMIT, "the daemon created its database", || async {
        db.exists()
    })
    .await;
    let mut enqueue = bin_at(&exe);
    unprivileged(&mut enqueue);
    let out = enqueue
        .envs(daemon_env(&env))
        .env("MDE_ACTIOND_DATABASE__PATH", &db)
        .arg("enqueue")
        .args(ids.iter().map(ActionId::as_str))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reader = mde_actiond::store::Store::open(&db, mde_actiond::store::OpenMode::ReadOnly)
        .await
        .unwrap();
    wait_finished(&reader, &ids, LIMIT).await;
    signal(&daemon, Signal::SIGTERM);
    assert_eq!(
        daemon.wait().await.unwrap().code(),
        Some(0),
        "{}",
        stderr.await.unwrap()
    );
    // Everything it wrote is in the database directory, owned by that uid, and readable by
    // no one outside its group.
    for entry in std::fs::read_dir(&data).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.uid(), 65532);
        assert_eq!(
            meta.mode() & 0o007,
            0,
            "{:?} is mode {:o}",
            entry.path(),
            meta.mode()
        );
    }
}

/// Readiness proves the credential while idle: an unreadable secret with nothing to track
/// used to read "ready" until the first id arrived. Metrics read 0 for every known state
/// instead of dropping the series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_daemon_proves_its_credential_and_exports_zeros() {
    let env = TestEnv::new(SimConfig::default()).await;
    let mut settings = env.settings.clone();
    settings.http.listen = Some("127.0.0.1:0".into());
    settings.auth.client_secret = None;
    let secret = env.dir.path().join("client-secret");
    settings.auth.client_secret_file = Some(secret.clone());
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    let base = format!("http://{}", daemon.http_addr.unwrap());
    let get = |path: &'static str| {
        let url = format!("{base}{path}");
        async move {
            let r = reqwest::get(url).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    eventually(LIMIT, "readyz refuses with nothing enqueued", || async {
        let (code, text) = get("/readyz").await;
        code == 503 && text.contains("no access token")
    })
    .await;
    let (_, metrics) = get("/metrics").await;
    for line in [
        "mde_actiond_actions{tracking=\"active\"} 0",
        "mde_actiond_actions{tracking=\"done\"} 0",
        "mde_actiond_actions_by_status{status=\"Succeeded\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    // The secret arrives: ready without anything to track.
    private_file(&secret, mde_actiond::sim::SIM_CLIENT_SECRET);
    eventually(
        LIMIT,
        "readyz ready once the secret is readable",
        || async { get("/readyz").await.0 == 200 },
    )
    .await;
    daemon.shutdown().await;
}
