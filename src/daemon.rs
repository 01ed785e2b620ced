//! Wiring for `run`: settings in, a running poll loop out, and an orderly stop.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::{ClientSecretSource, SecretSource, TokenProvider};
use crate::budget::RateBudget;
use crate::config::{ConfigError, Settings};
use crate::mde::{MdeClient, http_client};
use crate::poller::Poller;
use crate::store::{OpenMode, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Http(#[from] crate::mde::BuildError),
    #[error("another mde-actiond is already running on {db} (it holds {lock}); stop it first")]
    AlreadyRunning { db: PathBuf, lock: PathBuf },
    #[error("cannot create lock file {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the poll loop ended unexpectedly: {0}")]
    LoopDied(String),
}

/// Held while a daemon runs: one poller per database, or two would spend the budget twice.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    pub fn acquire(db: &Path) -> Result<Self, DaemonError> {
        let mut name = db.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| DaemonError::Lock {
                path: path.clone(),
                source,
            })?;
        // A lock on a separate file: SQLite's own POSIX locks on the database file would be
        // dropped if this process opened and closed another descriptor of it.
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(DaemonError::AlreadyRunning {
                db: db.to_path_buf(),
                lock: path,
            }),
            Err(std::fs::TryLockError::Error(source)) => Err(DaemonError::Lock { path, source }),
        }
    }
}

pub struct Daemon {
    poller: Arc<Poller>,
    store: Store,
    shutdown_grace: Duration,
    _lock: InstanceLock,
}

impl Daemon {
    /// Validates the settings, takes the instance lock, opens (and migrates) the database and
    /// restores the rate budget from the call log. Nothing is sent to MDE yet.
    pub async fn start(settings: &Settings) -> Result<Self, DaemonError> {
        settings.validate_for_run()?;
        let db = &settings.database.path;
        let lock = InstanceLock::acquire(db)?;
        let store = Store::open(db, OpenMode::ReadWrite).await?;

        let budget = Arc::new(RateBudget::new(
            settings.rate_limit.per_minute,
            settings.rate_limit.per_hour,
        ));
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

        let http = http_client(settings.api.timeout, settings.api.connect_timeout)?;
        let auth = &settings.auth;
        let secret = match (&auth.client_secret, &auth.client_secret_file) {
            (Some(s), _) if !s.is_empty() => SecretSource::Inline(s.clone()),
            (_, Some(path)) => SecretSource::File(path.clone()),
            _ => unreachable!("validate_for_run checked the secret"),
        };
        let source = ClientSecretSource::new(
            http.clone(),
            &auth.authority,
            auth.tenant_id.as_deref().unwrap_or_default().trim(),
            auth.client_id.as_deref().unwrap_or_default().trim(),
            secret,
            &auth.scope,
        );
        let tokens = Arc::new(TokenProvider::new(Box::new(source)));
        let client = MdeClient::new(http, &settings.api.base_url);
        let poller = Arc::new(Poller::new(
            store.clone(),
            client,
            tokens,
            budget,
            settings.poll.clone(),
        ));
        Ok(Self {
            poller,
            store,
            shutdown_grace: settings.poll.shutdown_grace,
            _lock: lock,
        })
    }

    pub fn poller(&self) -> &Arc<Poller> {
        &self.poller
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Polls until `stop` fires, then lets calls in flight finish (up to
    /// `poll.shutdown_grace`), checkpoints the WAL and closes the database.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> Result<(), DaemonError> {
        let counts = self.store.counts().await?;
        info!(
            db = %self.store.path().display(),
            active = counts.tracking(crate::domain::Tracking::Active),
            total = counts.total(),
            "mde-actiond polling"
        );
        let mut handle = tokio::spawn(self.poller.clone().run(stop.clone()));
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
        if let Err(e) = self.store.checkpoint().await {
            warn!(error = %e, "WAL checkpoint at shutdown failed");
        }
        self.store.close().await;
        info!("stopped");
        Ok(())
    }
}
