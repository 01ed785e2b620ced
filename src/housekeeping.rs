//! Database upkeep off the poll loop's path: WAL checkpoints, retention of finished actions,
//! and the API call log's pruning. Each step is a short transaction of its own, so polls
//! interleave with it.

use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::Store;

/// The call log is kept this long (the budget needs one hour of it; reports use the rest).
pub const API_CALL_RETENTION: Duration = Duration::from_secs(7 * 86_400);
/// Retention deletes this many actions per transaction.
pub const PRUNE_BATCH: u32 = 500;
/// Pages returned to the file system per vacuum step.
const VACUUM_PAGES: u32 = 2000;
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub struct Housekeeping {
    pub store: Store,
    pub checkpoint_interval: Duration,
    pub keep_finished: Option<Duration>,
    /// Delivered and dead notifications are deleted this long after they ended.
    pub keep_notifications: Duration,
}

impl Housekeeping {
    pub async fn run(self, stop: CancellationToken) {
        let mut last_prune: Option<tokio::time::Instant> = None;
        loop {
            if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                last_prune = Some(tokio::time::Instant::now());
                self.prune(&stop).await;
            }
            match self.store.recover_deleted_wal().await {
                Ok(true) => warn!(
                    "the database's -wal file was deleted while in use; its contents were checkpointed into the database and every connection reopened"
                ),
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot recover from a deleted -wal file"),
            }
            match self.store.checkpoint_quietly().await {
                Ok(true) => debug!("WAL checkpointed and truncated"),
                Ok(false) => {}
                Err(e) => warn!(error = %e, "WAL checkpoint failed"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.checkpoint_interval) => {}
            }
        }
    }

    async fn prune(&self, stop: &CancellationToken) {
        let now = SystemTime::now();
        match self.store.prune_api_calls(now - API_CALL_RETENTION).await {
            Ok(0) => {}
            Ok(n) => debug!(rows = n, "pruned the API call log"),
            Err(e) => warn!(error = %e, "cannot prune the API call log"),
        }
        match prune_outbox(&self.store, now - self.keep_notifications, stop).await {
            Ok(0) => {}
            Ok(n) => debug!(deliveries = n, "pruned finished notification deliveries"),
            Err(e) => warn!(error = %e, "cannot prune the notification outbox"),
        }
        let Some(keep) = self.keep_finished else {
            return;
        };
        match prune_finished(&self.store, now - keep, stop).await {
            Ok(0) => {}
            Ok(n) => info!(actions = n, "retention removed finished actions"),
            Err(e) => warn!(error = %e, "retention failed; will try again"),
        }
    }
}

/// Deletes delivered and dead deliveries (and events left without any) that ended before
/// the cutoff, in small batches.
pub async fn prune_outbox(
    store: &Store,
    before: SystemTime,
    stop: &CancellationToken,
) -> crate::store::Result<u64> {
    in_batches(stop, || store.prune_outbox(before, PRUNE_BATCH)).await
}

/// Runs `batch` until it deletes fewer than `PRUNE_BATCH` rows (or `stop` fires), letting
/// poll writes in between; returns the rows deleted.
async fn in_batches<F, Fut>(stop: &CancellationToken, mut batch: F) -> crate::store::Result<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::store::Result<u64>>,
{
    let mut total = 0;
    while !stop.is_cancelled() {
        let n = batch().await?;
        total += n;
        if n < u64::from(PRUNE_BATCH) {
            break;
        }
        tokio::task::yield_now().await;
    }
    Ok(total)
}

/// Deletes finished actions older than the cutoff in small batches, then returns the freed
/// pages to the file system. Returns how many actions went.
pub async fn prune_finished(
    store: &Store,
    finished_before: SystemTime,
    stop: &CancellationToken,
) -> crate::store::Result<u64> {
    let total = in_batches(stop, || store.prune_finished(finished_before, PRUNE_BATCH)).await?;
    if total > 0 {
        while store.free_pages().await? > 0 && !stop.is_cancelled() {
            store.incremental_vacuum(VACUUM_PAGES).await?;
            tokio::task::yield_now().await;
        }
    }
    Ok(total)
}
