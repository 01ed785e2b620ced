//! Wiring for `run`: settings in, a running poll loop out, and an orderly stop.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::TokenProvider;
use crate::budget::RateBudget;
use crate::config::{ConfigError, Settings};
use crate::domain::Tracking;
use crate::housekeeping::Housekeeping;
use crate::http::HttpState;
use crate::lock::{InstanceLock, LockError};
use crate::mde::{MdeClient, http_client};
use crate::poller::Poller;
use crate::runtime::Runtime;
use crate::secret::Secret;
use crate::store::{OpenMode, Store, StoreError};
use crate::systemd::Notifier;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Http(#[from] crate::mde::BuildError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the poll loop ended unexpectedly: {0}")]
    LoopDied(String),
}

pub struct Daemon {
    runtime: Runtime,
    poller: Arc<Poller>,
    store: Store,
    housekeeping: Option<Housekeeping>,
    shutdown_grace: Duration,
    http: Option<(TcpListener, Option<Secret>)>,
    notifier: Notifier,
    notifications: Option<crate::notify::Notifications>,
    _lock: InstanceLock,
}

/// How often `systemctl status` gets a fresh STATUS line.
const STATUS_EVERY: Duration = Duration::from_secs(10);

impl Daemon {
    /// Validates the settings, takes the instance lock, opens (and migrates) the database and
    /// restores the rate budget from the call log. Nothing is sent to MDE yet.
    pub async fn start(settings: &Settings) -> Result<Self, DaemonError> {
        settings.validate_for_run()?;
        let db = &settings.database.path;
        let lock = InstanceLock::acquire(db)?;
        let store = Store::open(db, OpenMode::ReadWrite).await?;
        store
            .sync_report_settings(settings.report.stuck_after)
            .await?;
        let destinations = crate::notify::destinations(settings)
            .map_err(|p| DaemonError::Config(ConfigError::Invalid(vec![p])))?;
        store
            .sync_routes(
                &crate::notify::routes(settings),
                settings.auth.tenant_id.as_deref(),
            )
            .await?;
        if !destinations.is_empty() {
            let names: Vec<&str> = destinations.iter().map(|d| d.name.as_str()).collect();
            info!(destinations = %names.join(", "), "notifications on");
        }

        let budget = Arc::new(restored_budget(settings, &store).await?);
        let listener = bind_intake(settings).await?;
        let http = http_client(settings.api.timeout, settings.api.connect_timeout)?;
        let source = crate::auth::build_source(settings, http.clone())
            .map_err(|p| DaemonError::Config(ConfigError::Invalid(vec![p])))?;
        let tokens = Arc::new(TokenProvider::with_grace(
            source,
            settings.auth.token_grace(),
        ));
        let client = MdeClient::new(http, &settings.api_base_url());
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let poller = Arc::new(Poller::new(
            store.clone(),
            client,
            tokens.clone(),
            budget.clone(),
            settings.poll.clone(),
            settings.api.timeout,
            metrics.clone(),
        ));
        let runtime = Runtime {
            store: store.clone(),
            budget,
            tokens,
            metrics,
            poller: poller.clone(),
            callback_allow: settings.callbacks.patterns().into(),
        };
        let housekeeping = Housekeeping {
            store: store.clone(),
            checkpoint_interval: settings.database.checkpoint_interval,
            keep_finished: settings.retention.keep_finished,
            keep_notifications: settings.retention.keep_notifications,
        };
        let notifications = crate::notify::Notifications::new(
            destinations,
            store.clone(),
            runtime.metrics.clone(),
            settings.report.stuck_after,
        );
        Ok(Self {
            runtime,
            poller,
            housekeeping: Some(housekeeping),
            store,
            shutdown_grace: settings.poll.shutdown_grace,
            http: listener,
            notifier: Notifier::from_env(),
            notifications: (!notifications.is_empty()).then_some(notifications),
            _lock: lock,
        })
    }

    pub fn poller(&self) -> &Arc<Poller> {
        &self.poller
    }

    /// Starts the HTTP listener, when there is one.
    fn spawn_http(&mut self, stop: &CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
        let (listener, token) = self.http.take()?;
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "HTTP listener up (/healthz, /readyz, /metrics, /v1/actions)");
        }
        let state = Arc::new(HttpState {
            runtime: self.runtime.clone(),
            api_token: token,
            started: tokio::time::Instant::now(),
        });
        Some(tokio::spawn(crate::http::serve(
            listener,
            state,
            stop.clone(),
        )))
    }

    /// What the running daemon shares: store, budget, tokens, metrics, the loop.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Where the HTTP listener is bound (useful with port 0).
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Polls until `stop` fires, then lets calls in flight finish (up to
    /// `poll.shutdown_grace`), checkpoints the WAL and closes the database.
    pub async fn run_until_stopped(mut self, stop: CancellationToken) -> Result<(), DaemonError> {
        let counts = self.store.counts().await?;
        info!(
            db = %self.store.path().display(),
            active = counts.tracking(Tracking::Active),
            total = counts.total(),
            "mde-actiond polling"
        );
        let mut handle = tokio::spawn(self.poller.clone().run(stop.clone()));
        let upkeep = self.housekeeping.take().map(|h| {
            let (metrics, stop) = (self.runtime.metrics.clone(), stop.clone());
            tokio::spawn(async move {
                crate::panics::restart_on_panic("housekeeping", &metrics, &stop, || {
                    h.clone().run(stop.clone())
                })
                .await
            })
        });
        let senders = self
            .notifications
            .take()
            .map(|n| n.spawn(self.poller.outbox_written(), stop.clone()))
            .unwrap_or_default();
        let http_task = self.spawn_http(&stop);
        let notifier = Arc::new(std::mem::replace(&mut self.notifier, Notifier::disabled()));
        notifier.ready(&status_line(&self.runtime).await);
        let supervisor = tokio::spawn(supervise(
            notifier.clone(),
            self.runtime.clone(),
            stop.clone(),
        ));
        let loop_ended = tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            joined = &mut handle => {
                // The loop ends by itself only once `stop` fired; anything else is a bug.
                match joined {
                    Ok(()) if stop.is_cancelled() => true,
                    Ok(()) => return Err(DaemonError::LoopDied("it returned".into())),
                    Err(e) => return Err(DaemonError::LoopDied(e.to_string())),
                }
            }
        };
        notifier.stopping("stopping: letting calls in flight finish");
        supervisor.abort();
        info!(
            grace_ms = self.shutdown_grace.as_millis() as u64,
            "stopping: letting calls in flight finish"
        );
        if !loop_ended
            && tokio::time::timeout(self.shutdown_grace, &mut handle)
                .await
                .is_err()
        {
            handle.abort();
            warn!(
                "calls still in flight after the grace period were abandoned; their actions stay due"
            );
        }
        wind_down(upkeep, senders, http_task).await;
        if let Err(e) = self.store.checkpoint().await {
            warn!(error = %e, "WAL checkpoint at shutdown failed");
        }
        self.store.close().await;
        info!("stopped");
        Ok(())
    }
}

/// Pings the systemd watchdog while the poll loop shows progress (never from a free-running
/// timer alone: a hung loop must get the process restarted) and refreshes STATUS.
async fn supervise(notifier: Arc<Notifier>, rt: Runtime, stop: CancellationToken) {
    let poller = &rt.poller;
    if !notifier.is_enabled() {
        return;
    }
    let watchdog = notifier.watchdog_interval();
    let tick = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    let mut last_status = tokio::time::Instant::now();
    let mut warned = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        if watchdog.is_some() {
            if poller.is_alive() {
                notifier.watchdog();
                warned = false;
            } else if !warned {
                warned = true;
                warn!(
                    stalled_s = poller.since_progress().as_secs(),
                    "poll loop shows no progress; withholding the watchdog ping"
                );
            }
        }
        if last_status.elapsed() >= STATUS_EVERY {
            last_status = tokio::time::Instant::now();
            notifier.status(&status_line(&rt).await);
        }
    }
}

/// One line for `systemctl status`: counts, budget, pauses, the last error.
pub async fn status_line(rt: &Runtime) -> String {
    let mut parts = Vec::new();
    match rt.store.counts().await {
        Ok(c) => parts.push(format!(
            "active {}, done {}, not found {}, gave up {}",
            c.tracking(Tracking::Active),
            c.tracking(Tracking::Done),
            c.tracking(Tracking::NotFound),
            c.tracking(Tracking::GaveUp)
        )),
        Err(e) => parts.push(format!("database error: {e}")),
    }
    if let Some(progress) = rt.metrics.backfill() {
        parts.push(progress);
    }
    let left = rt.budget.remaining();
    parts.push(format!(
        "API budget left {}/min {}/h",
        left.this_minute, left.this_hour
    ));
    if let Some(p) = left.paused_for {
        parts.push(format!("paused {}s for Retry-After", p.as_secs() + 1));
    }
    if let Some(refusal) = rt.tokens.refusal() {
        parts.push(format!("no token: {refusal}"));
    } else if let Some((error, at)) = rt.metrics.last_error() {
        let ago = SystemTime::now().duration_since(at).unwrap_or_default();
        parts.push(format!("last error {}s ago: {error}", ago.as_secs()));
    }
    parts.join(" · ")
}

/// Every check `run` makes before it starts (exit 78 when any fails), without starting:
/// what `check-config` reports, so it never says valid when `run` would refuse.
pub fn run_problems(settings: &Settings) -> Vec<crate::config::Problem> {
    let mut problems = settings.problems();
    problems.extend(settings.credential_problems());
    if !problems.is_empty() {
        return problems;
    }
    if let Some(path) = &settings.http.api_token_file
        && let Err(message) = crate::auth::files::read_private(path, "http.api_token_file")
    {
        problems.push(crate::config::Problem {
            key: "http.api_token_file",
            message,
        });
    }
    if let Err(p) = crate::notify::destinations(settings) {
        problems.push(p);
    }
    match http_client(settings.api.timeout, settings.api.connect_timeout) {
        Ok(http) => {
            if let Err(p) = crate::auth::build_source(settings, http) {
                problems.push(p);
            }
        }
        Err(e) => problems.push(crate::config::Problem {
            key: "api",
            message: e.to_string(),
        }),
    }
    problems
}

fn read_secret_file(path: &Path, key: &'static str) -> Result<Secret, DaemonError> {
    crate::auth::files::read_private(path, key)
        .map(Secret::new)
        .map_err(|message| {
            DaemonError::Config(ConfigError::Invalid(vec![crate::config::Problem {
                key,
                message,
            }]))
        })
}
/// Gives the helper tasks a moment each to finish once the poll loop has stopped; none
/// may hold shutdown for long.
async fn wind_down(
    upkeep: Option<tokio::task::JoinHandle<()>>,
    senders: Vec<tokio::task::JoinHandle<()>>,
    http: Option<tokio::task::JoinHandle<()>>,
) {
    if let Some(task) = upkeep {
        // It stops between short transactions.
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    for task in senders {
        // A request in flight is abandoned after a moment; its delivery stays pending
        // and goes out again after the restart (at least once).
        if tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .is_err()
        {
            tracing::debug!("a notification sender was stopped mid-request");
        }
    }
    if let Some(task) = http {
        // Graceful shutdown of the listener began with `stop`; open requests get a moment.
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
}

/// The API budget, with the calls of the last hour (the call log) already counted: a
/// restart does not reset the tenant's quota.
async fn restored_budget(settings: &Settings, store: &Store) -> Result<RateBudget, DaemonError> {
    let budget = RateBudget::with_time_scale(
        settings.rate_limit.per_minute,
        settings.rate_limit.per_hour,
        settings.rate_limit.time_scale,
    );
    let now = SystemTime::now();
    let past = store
        .api_calls_since(now - Duration::from_secs(3600))
        .await?;
    budget.seed(&past, now);
    if !past.is_empty() {
        let left = budget.remaining();
        info!(
            calls_last_hour = past.len(),
            left_this_minute = left.this_minute,
            left_this_hour = left.this_hour,
            "restored the API budget from the call log"
        );
    }
    Ok(budget)
}

/// The HTTP listener and its bearer token, when `http.listen` is set.
async fn bind_intake(
    settings: &Settings,
) -> Result<Option<(TcpListener, Option<Secret>)>, DaemonError> {
    let Some(Ok(addr)) = settings.http.listen_addr() else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen { addr, source })?;
    if !addr.ip().is_loopback() && settings.http.api_token_file.is_none() {
        warn!(%addr, "HTTP intake listens beyond loopback without http.api_token_file; anyone who reaches it can enqueue");
    }
    let token = match &settings.http.api_token_file {
        Some(path) => Some(read_secret_file(path, "http.api_token_file")?),
        None => None,
    };
    Ok(Some((listener, token)))
}
