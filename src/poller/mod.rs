//! The worker loop: find due actions, ask MDE about them, write what it said.
//!
//! Two ways to check actions, one step at a time so no action is ever checked twice at once:
//!
//! - A *pass* claims the due actions, splits them into list calls of up to `batch_size` ids
//!   (at most `concurrency` at once) and writes each call's findings in one transaction.
//! - A *sweep* lists the whole tenant in pages (`$filter` on creation time or on the
//!   unfinished statuses) and checks every tracked action on each page, one transaction per
//!   page. It costs the same for ten actions or a hundred thousand, so once more actions are
//!   tracked than its pages' worth of list calls by id, sweeps check everything at the
//!   cadence `sweep::cadence` sets (between the budget's floor and `sweep_interval`) and
//!   passes are left with what a sweep did not list, and with due actions only when the
//!   wait for the next sweep would cost them more than a call (`pass::worth_a_call`).
//!
//! No per-action state lives in memory beyond the page or batch in hand (a sweep keeps the ids
//! it saw, to find the ones it did not). No database connection is held across an HTTP
//! request.
//!
//! This file is the loop (`run`, `step`, progress, clock steps, the write of each answer);
//! `sweep` plans and runs sweeps, `pass` the passes by id, `call` is the gate every API call
//! goes through, `outcome` turns an answer into the write for one action.

mod active;
mod call;
mod hazard;
mod outcome;
mod pass;
mod stall;
mod sweep;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::metrics::{Blocker, Metrics};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::auth::{AuthError, TokenProvider};
use crate::budget::RateBudget;
use crate::config::{DiscoverMode, PollSettings};
use crate::mde::{MdeClient, MdeError};
use crate::schedule::PollPolicy;
use crate::store::{PollWrite, Store, StoreError};
use call::CallGate;
use stall::StallWatch;
use sweep::SweepState;

/// Longest idle sleep: ids enqueued by another process are noticed within this.
const INTAKE_CHECK: Duration = Duration::from_secs(1);
/// Wait after a 429 that named no Retry-After.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Pause after a database error before the next sweep.
const STORE_RETRY: Duration = Duration::from_secs(2);
const STALL_MARGIN: Duration = Duration::from_secs(15);
/// Share of the sustainable API rate sweeps may use; the rest is for fetches by id.
const SWEEP_SHARE: f64 = 0.8;
/// While sweeps check an action, its own next poll is only a safety net, pushed out to this
/// many `max_interval`s: each push is a row write, and at 100,000 actions rewriting every row
/// each `max_interval` would be most of the daemon's disk traffic.
const SWEEP_NET_FACTOR: u32 = 4;
/// Sweeps with one filter before the other is measured again.
const REMEASURE_AFTER: u32 = 10;
/// Window over which the effective check interval is measured.
const CHECK_WINDOW: Duration = Duration::from_secs(60);

/// Checks counted for the effective check interval.
#[derive(Debug)]
struct CheckWindow {
    started: tokio::time::Instant,
    checks: u64,
}

pub struct Poller {
    store: Store,
    client: MdeClient,
    gate: CallGate,
    settings: PollSettings,
    policy: PollPolicy,
    list_supported: AtomicBool,
    wake: Notify,
    metrics: Arc<Metrics>,
    stall: Arc<StallWatch>,
    sweep: std::sync::Mutex<SweepState>,
    active: active::ActiveCount,
    /// The shortest delay a pass may schedule (ms): what the budget can pay for checking
    /// every action by id; 0 while sweeps do the checking.
    floor_ms: AtomicU64,
    check_window: std::sync::Mutex<CheckWindow>,
    /// Both clocks as of the last step, to notice the wall clock stepping back.
    clocks: std::sync::Mutex<(tokio::time::Instant, SystemTime)>,
    /// Bumped after a write that queued notification deliveries: wakes the senders.
    outbox: tokio::sync::watch::Sender<u64>,
}

/// A wall clock that fell behind the monotonic one by more than this stepped back (NTP
/// slews by far less; a VM restored from a snapshot or a hand-set clock steps).
const CLOCK_STEP: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error(transparent)]
    Api(MdeError),
    #[error(transparent)]
    Auth(AuthError),
    #[error("stopping")]
    Cancelled,
    #[error(transparent)]
    Store(StoreError),
}

/// What sweeps cover while they run, as a pass needs it.
#[derive(Debug, Clone, Copy)]
struct Covered {
    /// Time between sweeps.
    interval: Duration,
    /// Until the next sweep is due.
    until_sweep: Duration,
    /// The last sweep did not list some tracked actions: only a fetch by id checks them.
    owed: bool,
}

/// Why a chunk stopped early; the sweep loop decides how long to wait.
enum Halt {
    Cancelled,
    RateLimited,
    Auth(AuthError),
    Store(StoreError),
    /// A step or one of its tasks panicked (the text it carried).
    Panicked(String),
}

impl Poller {
    pub fn new(
        store: Store,
        client: MdeClient,
        tokens: Arc<TokenProvider>,
        budget: Arc<RateBudget>,
        settings: PollSettings,
        api_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let policy = settings.policy();
        // Between two signs of progress the loop waits at most for one HTTP call and one
        // database write (busy timeout); budget waits beat every second.
        let stall_limit = settings
            .stall_after
            .unwrap_or(api_timeout + crate::store::BUSY_TIMEOUT + STALL_MARGIN);
        let stall = Arc::new(StallWatch::new(stall_limit));
        let gate = CallGate::new(
            store.clone(),
            tokens,
            budget,
            metrics.clone(),
            stall.clone(),
        );
        Self {
            store,
            client,
            gate,
            list_supported: AtomicBool::new(settings.batch_size > 1),
            settings,
            policy,
            wake: Notify::new(),
            metrics,
            stall,
            sweep: std::sync::Mutex::new(SweepState::default()),
            active: active::ActiveCount::default(),
            floor_ms: AtomicU64::new(0),
            check_window: std::sync::Mutex::new(CheckWindow {
                started: tokio::time::Instant::now(),
                checks: 0,
            }),
            clocks: std::sync::Mutex::new((tokio::time::Instant::now(), SystemTime::now())),
            outbox: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes each time a write queued notification deliveries.
    pub fn outbox_written(&self) -> tokio::sync::watch::Receiver<u64> {
        self.outbox.subscribe()
    }

    pub fn stats(&self) -> &Metrics {
        &self.metrics
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// How long since the loop last showed progress.
    pub fn since_progress(&self) -> Duration {
        self.stall.since_progress()
    }

    pub fn stall_limit(&self) -> Duration {
        self.stall.limit()
    }

    /// True while the loop shows progress within the longest legitimate wait.
    pub fn is_alive(&self) -> bool {
        self.stall.is_alive()
    }

    pub fn budget(&self) -> &RateBudget {
        &self.gate.budget
    }

    pub fn tokens(&self) -> &TokenProvider {
        &self.gate.tokens
    }

    /// Wakes an idle loop at once (for ids enqueued in this process).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs sweeps until `cancel` fires. Calls in flight then finish and are written; no new
    /// call starts.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        self.stall.beat();
        let mut panics_in_a_row = 0u32;
        while !cancel.is_cancelled() {
            let result = {
                use futures_util::FutureExt;
                std::panic::AssertUnwindSafe(self.clone().step(&cancel))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| Err(Halt::Panicked(crate::panics::message(&*panic))))
            };
            if !matches!(result, Err(Halt::Panicked(_))) {
                panics_in_a_row = 0;
            }
            // A step that could not write shows no progress: while the database refuses
            // writes, /healthz fails after the stall limit and a supervisor may restart us.
            if !matches!(result, Err(Halt::Store(_))) {
                self.stall.beat();
                if self.metrics.set_blocker(Blocker::DatabaseWrites, None) {
                    info!("database writes work again; polling resumes");
                }
            }
            let pause = match result {
                Ok(Some(idle)) => idle,
                Ok(None) => continue,
                Err(Halt::Cancelled) => break,
                Err(Halt::RateLimited) => Duration::ZERO, // the budget holds the next call
                Err(Halt::Auth(e)) => {
                    let wait = e.wait().unwrap_or(Duration::from_secs(1));
                    error!(error = %e, "cannot get an access token; polls wait for it");
                    self.metrics.set_last_error(&e.to_string());
                    wait
                }
                Err(Halt::Store(e)) => {
                    self.store_failed(&e);
                    STORE_RETRY
                }
                Err(Halt::Panicked(what)) => {
                    let n = self.metrics.count_panic("poller");
                    let wait = crate::panics::backoff(panics_in_a_row);
                    panics_in_a_row = panics_in_a_row.saturating_add(1);
                    // Logged once per backoff window: the next try comes after `wait`.
                    error!(panic = %what, panics = n, wait_s = wait.as_secs(), "the poll loop panicked; backing off before the next step");
                    self.metrics
                        .set_last_error(&format!("the poll loop panicked: {what}"));
                    wait
                }
            };
            if pause.is_zero() {
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        debug!("poll loop stopped");
    }

    /// A step failed on the database. Every call is recorded before it is sent, so no call
    /// goes out while writes fail: polling is paused until a write succeeds again. Told
    /// once per fault, not every retry.
    fn store_failed(&self, e: &StoreError) {
        self.metrics.set_last_error(&e.to_string());
        let why = if e.is_disk_full() {
            format!(
                "database disk is full ({}): polling paused until space returns",
                self.store.path().display()
            )
        } else {
            format!("database writes fail: {e}; polling paused")
        };
        if self
            .metrics
            .set_blocker(Blocker::DatabaseWrites, Some(why.clone()))
        {
            error!(error = %e, "{why}");
        } else {
            debug!(error = %e, "database still refuses writes");
        }
    }

    /// Next polls are wall-clock times in the database: a wall clock that steps back by a
    /// day would leave every action a day from due. When it fell behind the monotonic clock
    /// since the last step, every active action's next poll moves back by as much (a step
    /// forward needs nothing: what is due is polled).
    async fn follow_clock_steps(&self) -> Result<(), Halt> {
        let (mono_now, wall_now) = (tokio::time::Instant::now(), SystemTime::now());
        let (mono_then, wall_then) = *self.clocks.lock().unwrap_or_else(|e| e.into_inner());
        let mono = mono_now - mono_then;
        let back = match wall_now.duration_since(wall_then) {
            Ok(wall) => mono.saturating_sub(wall),
            Err(behind) => mono + behind.duration(),
        };
        if back > CLOCK_STEP {
            let moved = self
                .store
                .shift_schedule_back(back, wall_now)
                .await
                .map_err(Halt::Store)?;
            self.metrics.clock_steps_back.inc();
            warn!(
                step_back_s = back.as_secs(),
                rescheduled = moved,
                "the wall clock stepped back; next polls moved back by as much"
            );
        }
        *self.clocks.lock().unwrap_or_else(|e| e.into_inner()) = (mono_now, wall_now);
        Ok(())
    }

    fn effective_batch(&self) -> u32 {
        if self.list_supported.load(Ordering::Relaxed) {
            self.settings.batch_size.max(1)
        } else {
            1
        }
    }

    /// One step: a sweep when one is due (or cheaper than the pass it would replace), else a
    /// pass. `Ok(Some(d))`: nothing was due, sleep up to `d`; `Ok(None)`: work was done.
    async fn step(self: Arc<Self>, cancel: &CancellationToken) -> Result<Option<Duration>, Halt> {
        self.follow_clock_steps().await?;
        let active = match self.active.fresh() {
            Some(n) => n,
            None => {
                let n = self.store.active_count().await.map_err(Halt::Store)?;
                self.active.read(n);
                n
            }
        };
        self.measure_checks(active);
        if active == 0 && self.settings.discover == DiscoverMode::Off {
            self.floor_ms.store(0, Ordering::Relaxed);
            // Readiness must not be blind while idle: keep a token at hand (one request per
            // token lifetime), so an unreadable secret or a revoked app shows in /readyz
            // before the first id arrives, not after.
            if let Err(e) = self.gate.tokens.token().await
                && e.wait().is_none()
            {
                warn!(error = %e, "cannot get an access token while idle; polls will wait for one");
            }
            return Ok(Some(INTAKE_CHECK));
        }
        let batch = u64::from(self.effective_batch());
        let Some(plan) = self.sweep_plan(active, batch).await? else {
            // Checking every action by id costs active/batch calls a round; when the budget
            // cannot pay for a round every max_interval, every action waits longer alike.
            let round = u32::try_from(active.div_ceil(batch)).unwrap_or(u32::MAX);
            let floor = self.gate.budget.sustainable_interval(round, 1.0);
            self.floor_ms
                .store(floor.as_millis() as u64, Ordering::Relaxed);
            self.metrics.set_sweep_interval(None);
            if std::mem::take(&mut self.sweep_state().sweeping) {
                // Sweeps no longer check anything: bring their long safety nets back in.
                let now = SystemTime::now();
                let moved = self
                    .store
                    .pull_in_polls(now + self.settings.max_interval, now)
                    .await
                    .map_err(Halt::Store)?;
                debug!(moved, "sweeps stopped; actions go back to polls by id");
            }
            return self.pass(cancel, None).await;
        };
        self.floor_ms.store(0, Ordering::Relaxed);
        self.metrics.set_sweep_interval(Some(plan.interval));
        self.sweep_state().sweeping = true;
        let since_last = self.sweep_state().last_started.map(|t| t.elapsed());
        let time_up = since_last.is_none_or(|e| e >= plan.interval);
        // Due actions worth more list calls by id than the sweep costs: sweep now instead.
        let crowd = u64::from(plan.cost) * batch;
        let pass_owed = std::mem::take(&mut self.sweep_state().pass_owed);
        let crowded = !time_up
            && !pass_owed
            && u64::from(
                self.store
                    .count_due(SystemTime::now(), u32::try_from(crowd).unwrap_or(u32::MAX))
                    .await
                    .map_err(Halt::Store)?,
            ) >= crowd;
        if time_up || crowded {
            self.sweep_tenant(&plan, cancel).await?;
            return Ok(None);
        }
        let until_sweep = plan.interval.saturating_sub(since_last.unwrap_or_default());
        let sweeps = Covered {
            interval: plan.interval,
            until_sweep,
            owed: pass_owed,
        };
        let idle = self.pass(cancel, Some(sweeps)).await?;
        Ok(idle.map(|d| d.min(until_sweep).max(Duration::from_millis(1))))
    }

    /// Adds this step's checks to the window and, once a window is full, publishes the
    /// effective check interval: active actions times the window over the checks made.
    fn measure_checks(&self, active: u64) {
        let checks = self.metrics.checks.get();
        let mut w = self.check_window.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = w.started.elapsed();
        if elapsed < CHECK_WINDOW {
            return;
        }
        let made = checks.saturating_sub(w.checks);
        if active > 0 && made > 0 {
            self.metrics
                .set_check_interval(elapsed.mul_f64(active as f64 / made as f64));
        }
        w.started = tokio::time::Instant::now();
        w.checks = checks;
    }

    /// Writes one call's findings in one transaction.
    async fn write(&self, writes: &[PollWrite]) -> Result<(), Halt> {
        if writes.is_empty() {
            return Ok(());
        }
        let write_started = tokio::time::Instant::now();
        let summary = self
            .store
            .record_polls(writes, SystemTime::now())
            .await
            .map_err(Halt::Store)?;
        self.committed(summary, write_started.elapsed());
        Ok(())
    }

    /// Tells what a committed write found: metrics, the notifier, the log. `writing` is
    /// the time spent in the database for it.
    fn committed(&self, summary: crate::store::WriteSummary, writing: std::time::Duration) {
        self.metrics.db_write_seconds.observe(writing);
        if summary.deliveries > 0 {
            self.outbox.send_modify(|n| *n = n.wrapping_add(1));
        }
        // Only now, committed, are the transitions told: a write that fails (a full disk)
        // is retried and must not have been announced.
        let now = SystemTime::now();
        for t in &summary.transitions {
            if let Some(lag) = t
                .mde_updated_at
                .as_deref()
                .and_then(crate::domain::parse_time)
                .and_then(|changed| now.duration_since(changed).ok())
            {
                self.metrics.detection_lag.observe(lag);
            }
            info!(
                action_id = %t.action_id,
                from = t.from_status.as_deref().unwrap_or("-"),
                to = %t.to_status,
                "status changed"
            );
        }
        self.metrics
            .transitions
            .inc_by(summary.transitions.len() as u64);
        self.metrics.finished.inc_by(summary.finished.into());
        if summary.finished > 0 {
            self.active.changed();
        }
    }
}
