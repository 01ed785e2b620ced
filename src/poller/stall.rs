//! The stall watch: the loop's signs of progress, and whether it has gone too long
//! without one (what `/healthz` and the systemd watchdog read).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(super) struct StallWatch {
    started: Instant,
    /// Milliseconds since `started` at the last sign of progress.
    heartbeat: AtomicU64,
    limit: Duration,
}

impl StallWatch {
    /// `limit`: the longest legitimate wait between two signs of progress.
    pub(super) fn new(limit: Duration) -> Self {
        Self {
            started: Instant::now(),
            heartbeat: AtomicU64::new(0),
            limit,
        }
    }

    pub(super) fn beat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.heartbeat.store(ms, Ordering::Relaxed);
    }

    /// Runs `f`, beating every second while it waits (budget and Retry-After waits can last
    /// minutes and are progress, not a hang).
    pub(super) async fn beating<F: std::future::Future>(&self, f: F) -> F::Output {
        tokio::pin!(f);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                out = &mut f => return out,
                _ = tick.tick() => self.beat(),
            }
        }
    }

    /// How long since the last sign of progress.
    pub(super) fn since_progress(&self) -> Duration {
        let last = Duration::from_millis(self.heartbeat.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    pub(super) fn limit(&self) -> Duration {
        self.limit
    }

    /// True while progress shows within the limit.
    pub(super) fn is_alive(&self) -> bool {
        self.since_progress() < self.limit
    }
}
