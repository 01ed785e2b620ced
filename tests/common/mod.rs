//! Shared test helpers: a simulator per test on port 0, a temp database, the daemon in-process
//! or as the real binary, and waits on conditions (never fixed sleeps).
#![allow(dead_code)]

pub mod receiver;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mde_actiond::config::Settings;
use mde_actiond::daemon::{Daemon, DaemonError};
use mde_actiond::domain::{ActionId, Tracking};
use mde_actiond::poller::Poller;
use mde_actiond::sim::{SimConfig, Simulator, settings_for};
use mde_actiond::store::{ActionRow, OpenMode, Store};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Logs only when TEST_LOG is set (e.g. TEST_LOG=debug).
pub fn init_logs() {
    if let Ok(level) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_test_writer()
            .try_init();
    }
}

pub struct TestEnv {
    pub sim: Simulator,
    pub dir: tempfile::TempDir,
    pub settings: Settings,
}

impl TestEnv {
    pub async fn new(config: SimConfig) -> Self {
        init_logs();
        let sim = Simulator::start(config).await.expect("simulator starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = settings_for(&sim, &dir.path().join("actions.db"));
        Self { sim, dir, settings }
    }

    pub fn db(&self) -> PathBuf {
        self.settings.database.path.clone()
    }

    pub async fn start_daemon(&self) -> RunningDaemon {
        RunningDaemon::start(&self.settings)
            .await
            .expect("daemon starts")
    }

    pub async fn reader(&self) -> Store {
        Store::open(&self.db(), OpenMode::ReadOnly)
            .await
            .expect("reader opens")
    }

    /// Every action finished with the true terminal status and a log that matches the truth.
    pub async fn assert_all_true(&self, ids: &[ActionId]) {
        let store = self.reader().await;
        for id in ids {
            let row = store.action(id).await.unwrap().expect("tracked");
            let truth = self.sim.terminal_status(id).expect("simulated");
            assert_eq!(row.tracking, "done", "{id}: {row:?}");
            assert_eq!(row.status.as_deref(), Some(truth.as_str()), "{id}");
            assert!(
                row.next_poll_at.is_none() && row.finished_at.is_some(),
                "{id}"
            );
            let log = store.transitions(id).await.unwrap();
            if let Err(e) = self.sim.verify_transitions(id, &log, true) {
                panic!("{e}\n{log:#?}");
            }
        }
        store.close().await;
    }
}

pub struct RunningDaemon {
    pub stop: CancellationToken,
    pub http_addr: Option<std::net::SocketAddr>,
    pub poller: Arc<Poller>,
    pub store: Store,
    handle: JoinHandle<Result<(), DaemonError>>,
}

impl RunningDaemon {
    pub async fn start(settings: &Settings) -> Result<Self, DaemonError> {
        let daemon = Daemon::start(settings).await?;
        let poller = daemon.poller().clone();
        let store = daemon.store().clone();
        let http_addr = daemon.http_addr();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(daemon.run_until_stopped(stop.clone()));
        Ok(Self {
            stop,
            http_addr,
            poller,
            store,
            handle,
        })
    }

    pub async fn enqueue(&self, ids: &[ActionId]) {
        mde_actiond::intake::enqueue(&self.store, ids, std::time::SystemTime::now())
            .await
            .expect("enqueue");
        self.poller.wake();
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        self.handle
            .await
            .expect("daemon task")
            .expect("daemon stops cleanly");
    }
}

/// A loopback port that was free a moment ago (for the spawned binary's listener).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until `check` is true, looking every 50 ms; panics with `what` after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until none of `ids` is active any more.
pub async fn wait_finished(store: &Store, ids: &[ActionId], limit: Duration) {
    eventually(limit, "all actions finished", || async {
        let mut done = true;
        for id in ids {
            match store.action(id).await {
                Ok(Some(row)) if row.tracking != Tracking::Active.as_str() => {}
                _ => {
                    done = false;
                    break;
                }
            }
        }
        done
    })
    .await;
}

pub async fn row(store: &Store, id: &ActionId) -> ActionRow {
    store.action(id).await.unwrap().expect("tracked")
}

/// The environment that points the real binary at `env`'s simulator and database.
pub fn daemon_env(env: &TestEnv) -> Vec<(String, String)> {
    let s = &env.settings;
    let d = |d: Duration| format!("{}ms", d.as_millis());
    vec![
        (
            "MDE_ACTIOND_DATABASE__PATH",
            s.database.path.display().to_string(),
        ),
        ("MDE_ACTIOND_API__BASE_URL", s.api_base_url()),
        ("MDE_ACTIOND_API__TIMEOUT", d(s.api.timeout)),
        ("MDE_ACTIOND_AUTH__AUTHORITY", s.authority()),
        (
            "MDE_ACTIOND_AUTH__TENANT_ID",
            s.auth.tenant_id.clone().unwrap(),
        ),
        (
            "MDE_ACTIOND_AUTH__CLIENT_ID",
            s.auth.client_id.clone().unwrap(),
        ),
        (
            "MDE_ACTIOND_AUTH__CLIENT_SECRET",
            s.auth.client_secret.as_ref().unwrap().expose().to_string(),
        ),
        ("MDE_ACTIOND_AUTH__SCOPE", s.scope()),
        (
            "MDE_ACTIOND_POLL__INITIAL_INTERVAL",
            d(s.poll.initial_interval),
        ),
        (
            "MDE_ACTIOND_POLL__MULTIPLIER",
            s.poll.multiplier.to_string(),
        ),
        ("MDE_ACTIOND_POLL__MAX_INTERVAL", d(s.poll.max_interval)),
        ("MDE_ACTIOND_POLL__RIDE_ALONG", d(s.poll.ride_along)),
        (
            "MDE_ACTIOND_POLL__BATCH_SIZE",
            s.poll.batch_size.to_string(),
        ),
        ("MDE_ACTIOND_POLL__SHUTDOWN_GRACE", d(s.poll.shutdown_grace)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A test app certificate: PEM files for the daemon, the public half for the simulator.
pub struct TestCertificate {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub sim: mde_actiond::sim::SimCertificate,
}

/// Generates an RSA key and a self-signed certificate (expired on request) in `dir`; the key
/// file is private (0600), as the daemon requires.
pub fn test_certificate(dir: &std::path::Path, expired: bool) -> TestCertificate {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair;
    use std::os::unix::fs::PermissionsExt;
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let pkcs8 = key.as_der().unwrap();
    let public_key = key.public_key().as_ref().to_vec();
    let signer = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_ref()),
        &rcgen::PKCS_RSA_SHA256,
    )
    .unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["mde-actiond-test".to_string()]).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    } else {
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2040, 1, 1);
    }
    let cert = params.self_signed(&signer).unwrap();
    let cert_file = dir.join(if expired { "expired.pem" } else { "app.pem" });
    let key_file = dir.join(if expired { "expired.key" } else { "app.key" });
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, signer.serialize_pem()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    TestCertificate {
        cert_file,
        key_file,
        sim: mde_actiond::sim::SimCertificate {
            public_key,
            certificate_der: cert.der().to_vec(),
            expired: false,
        },
    }
}

/// The built binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_mde-actiond");

/// The binary with a clean environment: none of the caller's MDE_ACTIOND_*, RUST_LOG,
/// systemd or Azure variables leak in.
pub fn bin() -> tokio::process::Command {
    bin_at(std::path::Path::new(BIN))
}

/// `bin()` for a copy of the binary elsewhere (another uid may not traverse `target/`).
pub fn bin_at(exe: &std::path::Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(exe);
    for (k, _) in std::env::vars() {
        if k.starts_with("MDE_ACTIOND_")
            || k.starts_with("AZURE_")
            || k.starts_with("IDENTITY_")
            || k.starts_with("WATCHDOG_")
            || k == "RUST_LOG"
            || k == "NOTIFY_SOCKET"
            || k == "CREDENTIALS_DIRECTORY"
        {
            c.env_remove(k);
        }
    }
    c.kill_on_drop(true).stdin(std::process::Stdio::null());
    c
}

/// `run` against `env`'s simulator, with extra variables and global arguments; stdout and
/// stderr are piped.
pub fn spawn_daemon(
    env: &TestEnv,
    extra: &[(&str, String)],
    args: &[&str],
) -> tokio::process::Child {
    let mut c = bin();
    c.envs(daemon_env(env))
        .envs(extra.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .args(args)
        .arg("run")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c.spawn().expect("daemon spawns")
}

pub fn signal(child: &tokio::process::Child, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id().expect("still running") as i32);
    nix::sys::signal::kill(pid, sig).expect("signal sent");
}

pub async fn read_all(mut r: impl tokio::io::AsyncRead + Unpin) -> String {
    use tokio::io::AsyncReadExt;
    let mut s = String::new();
    let _ = r.read_to_string(&mut s).await;
    s
}

/// `mde-actiond --db DB enqueue IDS...` through the binary, as a playbook would; panics with
/// its stderr unless it succeeds.
/// Creates the database as the daemon does at its first start (CLI commands never create
/// one), for tests that enqueue before any daemon ran.
pub async fn create_db(db: &std::path::Path) {
    Store::open(db, OpenMode::ReadWrite)
        .await
        .expect("database created")
        .close()
        .await;
}

/// Enqueues through the binary; creates the database first if no daemon did yet.
pub async fn enqueue_with_cli(db: &std::path::Path, ids: &[ActionId]) {
    if !db.exists() {
        create_db(db).await;
    }
    let out = bin()
        .arg("--db")
        .arg(db)
        .arg("enqueue")
        .args(ids.iter().map(ActionId::as_str))
        .output()
        .await
        .expect("binary runs");
    assert!(
        out.status.success(),
        "enqueue failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `text` to `path`, readable by its owner only: what the daemon asks of every file
/// that holds a secret.
pub fn private_file(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
