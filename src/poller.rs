//! The worker loop: find due actions, ask MDE about them, write what it said.
//!
//! Two ways to check actions, one step at a time so no action is ever checked twice at once:
//!
//! - A *pass* claims the due actions, splits them into list calls of up to `batch_size` ids
//!   (at most `concurrency` at once) and writes each call's findings in one transaction.
//! - A *sweep* lists the whole tenant in pages (`$filter` on creation time or on the
//!   unfinished statuses) and checks every tracked action on each page, one transaction per
//!   page. It costs the same for ten actions or a hundred thousand, so once more actions are
//!   tracked than its pages' worth of list calls by id, sweeps check everything every
//!   `sweep_interval` (or as often as the budget allows) and passes are left with young
//!   actions, which change soon, and with what a sweep did not list.
//!
//! No per-action state lives in memory beyond the page or batch in hand (a sweep keeps the ids
//! it saw, to find the ones it did not). No database connection is held across an HTTP
//! request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::metrics::{Blocker, Metrics};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::auth::{AuthError, TokenProvider};
use crate::budget::RateBudget;
use crate::config::{PollSettings, SweepMode};
use crate::domain::{ActionId, Tracking};
use crate::mde::{FetchedAction, MdeClient, MdeError, SweepFilter};
use crate::schedule::{PollPolicy, next_delay};
use crate::store::{
    DueAction, Endpoint, NextStep, PollResult, PollWrite, Store, StoreError, SweepRecord,
};

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

/// What the loop knows about sweeping this tenant.
#[derive(Debug, Default)]
struct SweepState {
    /// Filter forms the service refused with a 400 (until restart).
    rejected: Vec<SweepFilter>,
    /// Calls the last `CreatedSince` sweep cost, and the creation time it listed from.
    window_cost: Option<(String, u32)>,
    /// Calls the last status sweep cost, fetches of what it did not list included.
    unfinished_cost: Option<u32>,
    /// Window sweeps since the status listing was last measured: its cost drifts as actions
    /// finish, so it is measured again every `REMEASURE_AFTER`.
    window_sweeps_since_status: u32,
    last_started: Option<tokio::time::Instant>,
    /// Whether the last step planned sweeps (actions then carry long safety nets).
    sweeping: bool,
    /// The last sweep made the actions it did not list due: a pass must fetch them before
    /// another sweep may be called for by a crowd of due actions (which would not list them
    /// either, and would spin).
    pass_owed: bool,
}

/// How a sweep's listing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listing {
    Complete,
    /// The service refused the filter (HTTP 400): that form is not tried again.
    Refused,
    /// A call failed; the next sweep comes at its time.
    Failed,
}

/// The sweep the loop would run now.
#[derive(Debug, Clone)]
struct SweepPlan {
    filter: SweepFilter,
    since: Option<String>,
    /// Calls it is expected to cost.
    cost: u32,
    /// Time between sweeps: `sweep_interval`, or longer when the budget cannot pay for it.
    interval: Duration,
}

/// Checks counted for the effective check interval.
#[derive(Debug)]
struct CheckWindow {
    started: tokio::time::Instant,
    checks: u64,
}

pub struct Poller {
    store: Store,
    client: MdeClient,
    tokens: Arc<TokenProvider>,
    budget: Arc<RateBudget>,
    settings: PollSettings,
    policy: PollPolicy,
    list_supported: AtomicBool,
    wake: Notify,
    metrics: Arc<Metrics>,
    /// Milliseconds since `started` at the loop's last sign of progress.
    heartbeat: AtomicU64,
    started: tokio::time::Instant,
    stall_limit: Duration,
    sweep: std::sync::Mutex<SweepState>,
    /// The shortest delay a pass may schedule (ms): what the budget can pay for checking
    /// every action by id; 0 while sweeps do the checking.
    floor_ms: AtomicU64,
    check_window: std::sync::Mutex<CheckWindow>,
    /// Whether a 404 that was not the API's has been logged at error level.
    not_api_logged: AtomicBool,
    /// Both clocks as of the last step, to notice the wall clock stepping back.
    clocks: std::sync::Mutex<(tokio::time::Instant, SystemTime)>,
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

/// Why a chunk stopped early; the sweep loop decides how long to wait.
enum Halt {
    Cancelled,
    RateLimited,
    Auth(AuthError),
    Store(StoreError),
}

impl Poller {
    pub fn new(
        store: Store,
        client: MdeClient,
        tokens: Arc<TokenProvider>,
        budget: Arc<RateBudget>,
        settings: PollSettings,
        api_timeout: Duration,
    ) -> Self {
        let policy = settings.policy();
        // Between two signs of progress the loop waits at most for one HTTP call and one
        // database write (busy timeout); budget waits beat every second.
        let stall_limit = settings
            .stall_after
            .unwrap_or(api_timeout + crate::store::BUSY_TIMEOUT + STALL_MARGIN);
        Self {
            store,
            client,
            tokens,
            budget,
            list_supported: AtomicBool::new(settings.batch_size > 1),
            settings,
            policy,
            wake: Notify::new(),
            metrics: Arc::new(Metrics::default()),
            heartbeat: AtomicU64::new(0),
            started: tokio::time::Instant::now(),
            stall_limit,
            sweep: std::sync::Mutex::new(SweepState::default()),
            floor_ms: AtomicU64::new(0),
            check_window: std::sync::Mutex::new(CheckWindow {
                started: tokio::time::Instant::now(),
                checks: 0,
            }),
            not_api_logged: AtomicBool::new(false),
            clocks: std::sync::Mutex::new((tokio::time::Instant::now(), SystemTime::now())),
        }
    }

    pub fn stats(&self) -> &Metrics {
        &self.metrics
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.heartbeat.store(ms, Ordering::Relaxed);
    }

    /// How long since the loop last showed progress.
    pub fn since_progress(&self) -> Duration {
        let last = Duration::from_millis(self.heartbeat.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    pub fn stall_limit(&self) -> Duration {
        self.stall_limit
    }

    /// True while the loop shows progress within the longest legitimate wait.
    pub fn is_alive(&self) -> bool {
        self.since_progress() < self.stall_limit
    }

    /// Runs `f`, beating every second while it waits (budget and Retry-After waits can last
    /// minutes and are progress, not a hang).
    async fn beating<F: std::future::Future>(&self, f: F) -> F::Output {
        tokio::pin!(f);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                out = &mut f => return out,
                _ = tick.tick() => self.beat(),
            }
        }
    }

    pub fn budget(&self) -> &RateBudget {
        &self.budget
    }

    pub fn tokens(&self) -> &TokenProvider {
        &self.tokens
    }

    /// Wakes an idle loop at once (for ids enqueued in this process).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs sweeps until `cancel` fires. Calls in flight then finish and are written; no new
    /// call starts.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        self.beat();
        while !cancel.is_cancelled() {
            let result = self.clone().step(&cancel).await;
            // A step that could not write shows no progress: while the database refuses
            // writes, /healthz fails after the stall limit and a supervisor may restart us.
            if !matches!(result, Err(Halt::Store(_))) {
                self.beat();
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
            self.metrics
                .clock_steps_back
                .fetch_add(1, Ordering::Relaxed);
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

    fn sweep_state(&self) -> std::sync::MutexGuard<'_, SweepState> {
        self.sweep.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One step: a sweep when one is due (or cheaper than the pass it would replace), else a
    /// pass. `Ok(Some(d))`: nothing was due, sleep up to `d`; `Ok(None)`: work was done.
    async fn step(self: Arc<Self>, cancel: &CancellationToken) -> Result<Option<Duration>, Halt> {
        self.follow_clock_steps().await?;
        let active = self.store.active_count().await.map_err(Halt::Store)?;
        self.measure_checks(active);
        if active == 0 {
            self.floor_ms.store(0, Ordering::Relaxed);
            // Readiness must not be blind while idle: keep a token at hand (one request per
            // token lifetime), so an unreadable secret or a revoked app shows in /readyz
            // before the first id arrives, not after.
            if let Err(e) = self.tokens.token().await
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
            let floor = self.budget.sustainable_interval(round, 1.0);
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
        let idle = self.pass(cancel, Some(plan.interval)).await?;
        Ok(idle.map(|d| d.min(until_sweep).max(Duration::from_millis(1))))
    }

    /// The sweep to run, or `None` when passes by id are as cheap (few actions tracked) or
    /// the service accepts no sweep filter.
    async fn sweep_plan(&self, active: u64, batch: u64) -> Result<Option<SweepPlan>, Halt> {
        if self.settings.sweep == SweepMode::Off {
            return Ok(None);
        }
        let (window_allowed, status_form) = {
            let st = self.sweep_state();
            (
                !st.rejected.contains(&SweepFilter::CreatedSince),
                [SweepFilter::StatusIn, SweepFilter::StatusEqOr]
                    .into_iter()
                    .find(|f| !st.rejected.contains(f)),
            )
        };
        let since = if window_allowed {
            self.store
                .oldest_active_created()
                .await
                .map_err(Halt::Store)?
        } else {
            None
        };
        let chosen = {
            let st = self.sweep_state();
            let window_cost = match (&st.window_cost, &since) {
                (Some((from, cost)), Some(since)) if from == since => Some(*cost),
                _ => None,
            };
            choose_filter(
                since.is_some(),
                window_cost,
                status_form,
                st.unfinished_cost,
            )
        };
        let Some((filter, cost)) = chosen else {
            return Ok(None);
        };
        // A sweep must be cheaper than asking for every action by id.
        if active.div_ceil(batch) <= u64::from(cost) {
            return Ok(None);
        }
        let interval = self
            .settings
            .sweep_interval
            .max(self.budget.sustainable_interval(cost, SWEEP_SHARE));
        Ok(Some(SweepPlan {
            filter,
            since: since.filter(|_| filter == SweepFilter::CreatedSince),
            cost,
            interval,
        }))
    }

    /// Lists the tenant page by page and checks every tracked action listed; makes the
    /// tracked actions it did not list due for a fetch by id.
    async fn sweep_tenant(&self, plan: &SweepPlan, cancel: &CancellationToken) -> Result<(), Halt> {
        let started_at = SystemTime::now();
        let started = tokio::time::Instant::now();
        self.sweep_state().last_started = Some(started);
        let sweep_id = self
            .store
            .start_sweep(plan.filter.as_str(), started_at)
            .await
            .map_err(Halt::Store)?;
        let mut record = SweepRecord {
            outcome: "failed",
            ..SweepRecord::default()
        };
        let mut seen = std::collections::HashSet::new();
        let result = self
            .list_tenant(plan, sweep_id, &mut record, &mut seen, cancel)
            .await;
        if matches!(result, Ok(Listing::Complete)) {
            let marking = tokio::time::Instant::now();
            match self
                .store
                .make_unseen_due(&seen, started_at, SystemTime::now())
                .await
            {
                Ok(missing) => {
                    debug!(
                        missing,
                        ms = marking.elapsed().as_millis() as u64,
                        "marked the unlisted actions due"
                    );
                    record.missing = missing;
                    record.outcome = "complete";
                    self.sweep_state().pass_owed = missing > 0;
                }
                Err(e) => warn!(error = %e, "cannot mark the actions the sweep did not list"),
            }
            let fetches = if plan.filter.lists_finished() {
                0
            } else {
                u32::try_from(record.missing.div_ceil(u64::from(self.effective_batch())))
                    .unwrap_or(u32::MAX)
            };
            let cost = record.pages.max(1) + fetches;
            let mut st = self.sweep_state();
            match &plan.since {
                Some(since) => {
                    st.window_cost = Some((since.clone(), cost));
                    st.window_sweeps_since_status += 1;
                    if st.window_sweeps_since_status >= REMEASURE_AFTER {
                        st.unfinished_cost = None;
                    }
                }
                None => {
                    st.unfinished_cost = Some(cost);
                    st.window_sweeps_since_status = 0;
                }
            }
        }
        if let Ok(Listing::Refused) = result {
            record.outcome = "rejected";
            // Try the next form at once.
            self.sweep_state().last_started = None;
        }
        if let Err(Halt::Cancelled) = result {
            record.outcome = "stopped";
        }
        seen.clear();
        if let Err(e) = self
            .store
            .finish_sweep(sweep_id, &record, SystemTime::now())
            .await
        {
            warn!(error = %e, "cannot record the end of a sweep");
        }
        self.metrics
            .observe_sweep(plan.filter.as_str(), record.pages, started.elapsed());
        debug!(
            filter = plan.filter.as_str(),
            pages = record.pages,
            listed = record.listed,
            checked = record.checked,
            changed = record.changed,
            missing = record.missing,
            outcome = record.outcome,
            "sweep"
        );
        result.map(|_| ())
    }

    /// The pages of one sweep, to the end or to the first call that fails.
    async fn list_tenant(
        &self,
        plan: &SweepPlan,
        sweep_id: i64,
        record: &mut SweepRecord,
        seen: &mut std::collections::HashSet<ActionId>,
        cancel: &CancellationToken,
    ) -> Result<Listing, Halt> {
        let since = plan.since.clone().unwrap_or_default();
        let top = self.settings.sweep_page_size.max(1);
        let mut skip = 0u64;
        loop {
            let asked = tokio::time::Instant::now();
            let page = self
                .call(Endpoint::List, 0, Some(sweep_id), cancel, |token| {
                    let since = since.clone();
                    async move {
                        self.client
                            .list_page(&token, plan.filter, &since, top, skip)
                            .await
                    }
                })
                .await;
            let page = match page {
                Ok(page) => page,
                Err(CallError::Api(
                    e @ (MdeError::FilterRejected(_) | MdeError::FilterIgnored(_)),
                )) => {
                    warn!(
                        filter = plan.filter.as_str(),
                        error = %e, "MDE does not support this sweep filter; trying the next form"
                    );
                    self.sweep_state().rejected.push(plan.filter);
                    return Ok(Listing::Refused);
                }
                Err(e) => {
                    let problem = self.halt_or_error(e)?;
                    debug!(
                        filter = plan.filter.as_str(),
                        problem, "a sweep stopped early"
                    );
                    return Ok(Listing::Failed);
                }
            };
            self.beat();
            record.pages += 1;
            record.listed += page.entries as u64;
            for problem in &page.unreadable {
                warn!(problem, "skipped an unreadable action in a sweep page");
            }
            let answered = asked.elapsed();
            let ids: Vec<ActionId> = page.actions.iter().map(|a| a.id.clone()).collect();
            let matching = tokio::time::Instant::now();
            let (mut tracked, lost) = self.store.tracked_among(&ids).await.map_err(Halt::Store)?;
            if !lost.is_empty() {
                tracked.extend(self.revive(&lost).await?);
            }
            let matched = matching.elapsed();
            let mut found: std::collections::HashMap<ActionId, FetchedAction> = page
                .actions
                .into_iter()
                .map(|a| (a.id.clone(), a))
                .collect();
            // Rows are written only when something changed or the action would come due
            // before the next sweep; the rest stay as they are.
            let horizon = SystemTime::now() + plan.interval;
            let mut writes = Vec::new();
            let checked_before = record.checked;
            for a in tracked {
                // A page shifted by new actions can list one twice.
                if !seen.insert(a.id.clone()) {
                    continue;
                }
                let Some(f) = found.remove(&a.id) else {
                    continue;
                };
                record.checked += 1;
                let changed = a.status.as_deref() != Some(f.status.as_str());
                record.changed += u64::from(changed);
                if changed || a.next_poll_at <= horizon {
                    writes.push(self.observed(&a, f, Some(plan.interval)));
                }
            }
            let writing = tokio::time::Instant::now();
            self.write(&writes).await?;
            self.metrics
                .checks
                .fetch_add(record.checked - checked_before, Ordering::Relaxed);
            debug!(
                page = record.pages,
                entries = page.entries,
                writes = writes.len(),
                answer_ms = answered.as_millis() as u64,
                match_ms = matched.as_millis() as u64,
                write_ms = writing.elapsed().as_millis() as u64,
                "sweep page"
            );
            if page.entries < top as usize {
                return Ok(Listing::Complete);
            }
            skip += u64::from(top);
        }
    }

    /// Adds this step's checks to the window and, once a window is full, publishes the
    /// effective check interval: active actions times the window over the checks made.
    fn measure_checks(&self, active: u64) {
        let checks = self.metrics.checks.load(Ordering::Relaxed);
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

    /// One pass over the due actions. `covered`: the sweep interval while sweeps run.
    async fn pass(
        self: Arc<Self>,
        cancel: &CancellationToken,
        covered: Option<Duration>,
    ) -> Result<Option<Duration>, Halt> {
        let now = SystemTime::now();
        let batch = self.effective_batch() as usize;
        let limit = batch * self.settings.concurrency.max(1) as usize;
        let candidates = self
            .store
            .due_actions(now + self.settings.ride_along, limit as u32)
            .await
            .map_err(Halt::Store)?;
        let due = candidates.iter().filter(|a| a.next_poll_at <= now).count();
        if due == 0 {
            let until_first = candidates
                .first()
                .and_then(|a| a.next_poll_at.duration_since(now).ok())
                .unwrap_or(INTAKE_CHECK);
            return Ok(Some(until_first.min(INTAKE_CHECK)));
        }
        self.metrics.passes.fetch_add(1, Ordering::Relaxed);
        let pass_started = tokio::time::Instant::now();
        // Only as many calls as the due actions need; nearly-due ones fill the last call.
        let calls = due.div_ceil(batch);
        let mut chunks: Vec<Vec<DueAction>> = Vec::with_capacity(calls);
        let mut rest = candidates.into_iter().take(calls * batch);
        loop {
            let chunk: Vec<DueAction> = rest.by_ref().take(batch).collect();
            if chunk.is_empty() {
                break;
            }
            chunks.push(chunk);
        }
        let mut tasks = JoinSet::new();
        for chunk in chunks {
            let this = self.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move { this.poll_chunk(chunk, covered, &cancel).await });
        }
        let mut halt = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(h)) => halt = Some(h),
                Err(e) => error!(error = %e, "a poll task failed"),
            }
        }
        self.metrics.pass_seconds.observe(pass_started.elapsed());
        match halt {
            Some(h) => Err(h),
            None => Ok(None),
        }
    }

    /// Polls one chunk and writes its findings in one transaction.
    async fn poll_chunk(
        &self,
        chunk: Vec<DueAction>,
        covered: Option<Duration>,
        cancel: &CancellationToken,
    ) -> Result<(), Halt> {
        let mut writes = Vec::with_capacity(chunk.len());
        let mut halt = None;
        let singles: Vec<&DueAction> = if chunk.len() > 1
            && self.list_supported.load(Ordering::Relaxed)
        {
            let ids: Vec<ActionId> = chunk.iter().map(|a| a.id.clone()).collect();
            let result = self
                .call(Endpoint::List, ids.len(), None, cancel, |token| {
                    let ids = ids.clone();
                    async move { self.client.list_actions(&token, &ids).await }
                })
                .await;
            match result {
                Ok(mut answer) => {
                    for problem in &answer.unreadable {
                        warn!(problem, "skipped an unreadable action in a list answer");
                    }
                    let mut missing = Vec::new();
                    for a in &chunk {
                        match answer.actions.remove(&a.id) {
                            Some(found) => writes.push(self.observed(a, found, covered)),
                            // Absent from a list answer is not proof of a 404.
                            None => missing.push(a),
                        }
                    }
                    missing
                }
                Err(CallError::Api(
                    e @ (MdeError::FilterRejected(_) | MdeError::FilterIgnored(_)),
                )) => {
                    if self.list_supported.swap(false, Ordering::Relaxed) {
                        warn!(
                            error = %e,
                            "MDE does not support the id list filter; polling with one GET per action from now on"
                        );
                    }
                    chunk.iter().collect()
                }
                Err(e) => match self.halt_or_error(e) {
                    Ok(message) => {
                        for a in &chunk {
                            writes.push(self.failed(a, &message, covered));
                        }
                        Vec::new()
                    }
                    Err(h) => {
                        halt = Some(h);
                        Vec::new()
                    }
                },
            }
        } else {
            chunk.iter().collect()
        };

        for a in singles {
            if halt.is_some() {
                break;
            }
            let result = self
                .call(Endpoint::Get, 1, None, cancel, |token| {
                    let id = a.id.clone();
                    async move { self.client.get_action(&token, &id).await }
                })
                .await;
            match result {
                Ok(found) => writes.push(self.observed(a, found, covered)),
                Err(CallError::Api(MdeError::NotFound)) => writes.push(self.unknown(a, covered)),
                Err(e) => match self.halt_or_error(e) {
                    Ok(message) => writes.push(self.failed(a, &message, covered)),
                    Err(h) => halt = Some(h),
                },
            }
        }

        let checked = writes
            .iter()
            .filter(|w| matches!(w.result, PollResult::Observed(_)))
            .count();
        // Written even when stopping: these answers were paid for.
        self.write(&writes).await?;
        self.metrics
            .checks
            .fetch_add(checked as u64, Ordering::Relaxed);
        match halt {
            Some(h) => Err(h),
            None => Ok(()),
        }
    }

    /// Writes one call's (or one page's) findings in one transaction.
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
        self.metrics
            .db_write_seconds
            .observe(write_started.elapsed());
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
            .fetch_add(summary.transitions.len() as u64, Ordering::Relaxed);
        self.metrics
            .finished
            .fetch_add(summary.finished.into(), Ordering::Relaxed);
        Ok(())
    }

    /// Turns a failed call into the error text to record, or a reason to stop the chunk.
    fn halt_or_error(&self, e: CallError) -> Result<String, Halt> {
        match e {
            CallError::Api(MdeError::RateLimited { .. }) => Err(Halt::RateLimited),
            CallError::Api(e) => {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                self.metrics.set_last_error(&e.to_string());
                match &e {
                    MdeError::Forbidden(detail) => {
                        error!(error = %e, "MDE refuses the app; grant it the application permission Machine.Read.All (WindowsDefenderATP) with admin consent");
                        self.metrics
                            .set_blocker(Blocker::ApiForbidden, Some(describe_refusal(detail)));
                    }
                    MdeError::NotApi { .. } => {
                        self.metrics.not_api_answers.fetch_add(1, Ordering::Relaxed);
                        // Every call would say the same: once is enough.
                        if !self.not_api_logged.swap(true, Ordering::Relaxed) {
                            error!(error = %e, "an answer did not come from the MDE API; nothing ends tracking while this lasts");
                        } else {
                            debug!(error = %e, "not an MDE API answer");
                        }
                    }
                    MdeError::Rejected { .. } | MdeError::Unauthorized(_) => {
                        error!(error = %e, "MDE refused the call");
                    }
                    _ => warn!(error = %e, "poll failed; will retry with backoff"),
                }
                Ok(e.to_string())
            }
            CallError::Auth(e) => Err(Halt::Auth(e)),
            CallError::Cancelled => Err(Halt::Cancelled),
            CallError::Store(e) => Err(Halt::Store(e)),
        }
    }

    /// Sends one API call within the budget, with a token; on a 401 gets a new token and
    /// tries once more; on a 429 pauses every call for the Retry-After.
    async fn call<T, F, Fut>(
        &self,
        endpoint: Endpoint,
        count: usize,
        sweep: Option<i64>,
        cancel: &CancellationToken,
        send: F,
    ) -> Result<T, CallError>
    where
        F: Fn(crate::secret::Secret) -> Fut,
        Fut: std::future::Future<Output = Result<T, MdeError>>,
    {
        let mut retried = false;
        loop {
            self.beating(self.budget.acquire(cancel))
                .await
                .map_err(|_| CallError::Cancelled)?;
            let token = self.tokens.token().await.map_err(CallError::Auth)?;
            let call_id = self
                .store
                .start_api_call(endpoint, count, sweep, SystemTime::now())
                .await
                .map_err(CallError::Store)?;
            // Recording the call took a moment; a 429 seen meanwhile by another call holds
            // this one too.
            self.beating(self.budget.wait_while_paused(cancel))
                .await
                .map_err(|_| CallError::Cancelled)?;
            self.metrics.api_calls.fetch_add(1, Ordering::Relaxed);
            let started = tokio::time::Instant::now();
            let result = send(token.clone()).await;
            if let Err(MdeError::RateLimited { retry_after }) = &result {
                // Pause before anything else (even the write below) so other calls stop now.
                self.budget
                    .pause(retry_after.unwrap_or(DEFAULT_RETRY_AFTER));
            }
            if result.is_ok() && self.metrics.set_blocker(Blocker::ApiForbidden, None) {
                info!("MDE accepts the app's calls again");
            }
            // Answers only an authenticated caller gets: the token was good.
            let authenticated = matches!(
                result,
                Ok(_)
                    | Err(MdeError::NotFound
                        | MdeError::Forbidden(_)
                        | MdeError::FilterRejected(_))
            );
            if authenticated && self.tokens.accepted() {
                self.metrics.set_blocker(Blocker::TokensRejected, None);
                info!("MDE accepts our tokens again");
            }
            let (status, outcome, retry_after) = match &result {
                Ok(_) => (Some(200), "ok", None),
                Err(e) => (
                    e.http_status(),
                    e.outcome(),
                    match e {
                        MdeError::RateLimited { retry_after } => {
                            Some(retry_after.unwrap_or(DEFAULT_RETRY_AFTER))
                        }
                        _ => None,
                    },
                ),
            };
            self.metrics.count_call(endpoint.as_str(), status);
            if let Err(e) = self
                .store
                .finish_api_call(call_id, status, outcome, retry_after, started.elapsed())
                .await
            {
                warn!(error = %e, "cannot record an API call's outcome");
            }
            match result {
                // While fresh tokens are being refused, the token this call used was fresh.
                Err(MdeError::Unauthorized(detail)) if !retried && !self.tokens.rejecting() => {
                    debug!(
                        detail,
                        "token refused; fetching a new one and retrying once"
                    );
                    self.tokens.invalidate(&token).await;
                    retried = true;
                }
                Err(MdeError::Unauthorized(detail)) => {
                    let wait = self.tokens.rejected(&token, &detail).await;
                    let why = format!(
                        "MDE rejects our tokens (401 to a freshly issued one: {detail}); token requests back off, next in {}",
                        crate::domain::format_duration(wait)
                    );
                    if self
                        .metrics
                        .set_blocker(Blocker::TokensRejected, Some(why.clone()))
                    {
                        error!("{why}; check auth.tenant_id, auth.scope and the app's consent");
                    }
                    return Err(CallError::Auth(AuthError::BackingOff { wait, last: why }));
                }
                Err(MdeError::RateLimited { .. }) => {
                    let wait = retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
                    self.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        retry_after_ms = wait.as_millis() as u64,
                        "MDE rate limit (429); pausing every call"
                    );
                    return Err(CallError::Api(MdeError::RateLimited {
                        retry_after: Some(wait),
                    }));
                }
                other => return other.map_err(CallError::Api),
            }
        }
    }

    fn observed(
        &self,
        a: &DueAction,
        found: FetchedAction,
        covered: Option<Duration>,
    ) -> PollWrite {
        let status = found.status.clone();
        if !status.is_known() && self.metrics.count_unknown("status", status.as_str()) {
            warn!(action_id = %a.id, %status, "a status this version does not know; recorded as sent and polled on (not terminal)");
        }
        if let Some(t) = found.observation.action_type.as_deref()
            && !crate::domain::is_known_action_type(t)
            && self.metrics.count_unknown("type", t)
        {
            warn!(action_id = %a.id, action_type = t, "an action type this version does not know; recorded as sent");
        }
        let next = if status.is_terminal() {
            NextStep::Finish(Tracking::Done)
        } else {
            self.next_step(a, covered)
        };
        PollWrite {
            id: a.id.clone(),
            result: PollResult::Observed(Box::new(found.observation)),
            next,
        }
    }

    /// A 404 from the API itself. MDE makes a new action visible only after a few seconds,
    /// so the id ends `not_found` only once it has been unknown for `not_found_after` since
    /// it was enqueued (a persisted time, so restarts do not reset it); until then it is
    /// tried again on the usual backoff.
    fn unknown(&self, a: &DueAction, covered: Option<Duration>) -> PollWrite {
        let now = SystemTime::now();
        let deadline = a.enqueued_at + self.settings.not_found_after;
        if now >= deadline {
            info!(action_id = %a.id, "MDE does not know this action (404) since it was enqueued; tracking ends");
            return PollWrite {
                id: a.id.clone(),
                result: PollResult::NotFound,
                next: NextStep::Finish(Tracking::NotFound),
            };
        }
        debug!(action_id = %a.id, "MDE does not know this action yet (404); trying again");
        let message = format!(
            "MDE does not know this action yet (404); new actions become visible after a few seconds; it ends not_found if still unknown at {}",
            crate::domain::format_time(deadline)
        );
        PollWrite {
            id: a.id.clone(),
            result: PollResult::Error(message),
            next: self.next_step(a, covered),
        }
    }

    /// Brings back actions that had ended `not_found` and are listed after all; returns
    /// them ready to be checked from the page in hand.
    async fn revive(&self, ids: &[ActionId]) -> Result<Vec<DueAction>, Halt> {
        let revived = self
            .store
            .revive_among(ids, SystemTime::now())
            .await
            .map_err(Halt::Store)?;
        for id in &revived {
            info!(action_id = %id, "revived: MDE lists an action that had ended not_found; tracking it again");
        }
        self.metrics
            .revived
            .fetch_add(revived.len() as u64, Ordering::Relaxed);
        self.store.active_among(&revived).await.map_err(Halt::Store)
    }

    fn failed(&self, a: &DueAction, message: &str, covered: Option<Duration>) -> PollWrite {
        PollWrite {
            id: a.id.clone(),
            result: PollResult::Error(message.to_string()),
            next: self.next_step(a, covered),
        }
    }

    /// Next poll from the schedule, never past the give-up deadline; at the deadline, give up.
    ///
    /// `covered`: sweeps run this often. An action whose backoff has grown past it is checked
    /// by the sweeps, so its own schedule only matters if they stop: it is set well beyond
    /// the next sweep. Without sweeps, no delay is shorter than the budget can pay for.
    fn next_step(&self, a: &DueAction, covered: Option<Duration>) -> NextStep {
        let now = SystemTime::now();
        let deadline = a.enqueued_at + self.settings.give_up_after;
        if now >= deadline {
            warn!(action_id = %a.id, status = a.status.as_deref().unwrap_or("-"), "no terminal status within poll.give_up_after; giving up");
            return NextStep::Finish(Tracking::GaveUp);
        }
        let backoff = next_delay(a.poll_count, &self.policy, fastrand::f64());
        let delay = match covered {
            Some(sweeps) if backoff >= sweeps => (self.settings.max_interval * SWEEP_NET_FACTOR)
                .max(sweeps * 2)
                .mul_f64(1.0 + 0.25 * fastrand::f64()),
            Some(_) => backoff,
            None => backoff.max(Duration::from_millis(self.floor_ms.load(Ordering::Relaxed))),
        };
        NextStep::PollAt((now + delay).min(deadline))
    }
}

/// A 403's message in a line for `/readyz`: the roles it names, when it names them.
fn describe_refusal(detail: &str) -> String {
    match crate::mde::roles_in_refusal(detail) {
        Some((required, has)) => format!(
            "MDE refuses the app (403): it needs one of the application roles {}{}",
            required.join(", "),
            if has.is_empty() {
                String::new()
            } else {
                format!("; it has {}", has.join(", "))
            }
        ),
        None => format!("MDE refuses the app (403): {detail}"),
    }
}

/// Which sweep filter to use and what it is expected to cost: the listing from the oldest
/// tracked action's creation (nothing to fetch afterwards) unless the unfinished-status
/// listing was measured cheaper; an unmeasured form is tried when the other costs more than a
/// page.
fn choose_filter(
    window_possible: bool,
    window_cost: Option<u32>,
    status_form: Option<SweepFilter>,
    unfinished_cost: Option<u32>,
) -> Option<(SweepFilter, u32)> {
    let window = window_possible.then_some(SweepFilter::CreatedSince);
    match (window, status_form) {
        (None, None) => None,
        (Some(w), None) => Some((w, window_cost.unwrap_or(1))),
        (None, Some(s)) => Some((s, unfinished_cost.unwrap_or(1))),
        (Some(w), Some(s)) => match (window_cost, unfinished_cost) {
            (None, u) => Some((w, u.unwrap_or(1))),
            (Some(wc), None) if wc > 1 => Some((s, wc)),
            (Some(wc), None) => Some((w, wc)),
            (Some(wc), Some(uc)) if uc < wc => Some((s, uc)),
            (Some(wc), Some(_)) => Some((w, wc)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_choice_prefers_the_cheaper_measured_listing() {
        use SweepFilter::*;
        // Nothing seen yet: no creation time to list from.
        assert_eq!(
            choose_filter(false, None, Some(StatusIn), None),
            Some((StatusIn, 1))
        );
        // The window is tried first: it needs no fetches afterwards.
        assert_eq!(
            choose_filter(true, None, Some(StatusIn), Some(3)),
            Some((CreatedSince, 3))
        );
        assert_eq!(
            choose_filter(true, Some(1), Some(StatusIn), None),
            Some((CreatedSince, 1))
        );
        // A window of several pages: measure the status listing once.
        assert_eq!(
            choose_filter(true, Some(7), Some(StatusIn), None),
            Some((StatusIn, 7))
        );
        assert_eq!(
            choose_filter(true, Some(7), Some(StatusIn), Some(2)),
            Some((StatusIn, 2))
        );
        assert_eq!(
            choose_filter(true, Some(2), Some(StatusEqOr), Some(2)),
            Some((CreatedSince, 2))
        );
        assert_eq!(
            choose_filter(true, Some(4), None, None),
            Some((CreatedSince, 4))
        );
        assert_eq!(choose_filter(false, None, None, None), None);
    }
}
