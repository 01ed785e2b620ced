//! The worker loop: find due actions, ask MDE about them in batches, write what it said.
//!
//! One sweep at a time: a sweep claims what is due, splits it into list calls of up to
//! `batch_size` ids (at most `concurrency` at once), and writes each call's findings in one
//! transaction before the next sweep starts, so no action is ever polled twice at once and no
//! per-action state lives in memory beyond the batch in hand. No database connection is held
//! across an HTTP request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::metrics::Metrics;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::auth::{AuthError, TokenProvider};
use crate::budget::RateBudget;
use crate::config::PollSettings;
use crate::domain::{ActionId, Tracking};
use crate::mde::{FetchedAction, MdeClient, MdeError};
use crate::schedule::{PollPolicy, next_delay};
use crate::store::{DueAction, Endpoint, NextStep, PollResult, PollWrite, Store, StoreError};

/// Longest idle sleep: ids enqueued by another process are noticed within this.
const INTAKE_CHECK: Duration = Duration::from_secs(1);
/// Wait after a 429 that named no Retry-After.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Pause after a database error before the next sweep.
const STORE_RETRY: Duration = Duration::from_secs(2);
const STALL_MARGIN: Duration = Duration::from_secs(15);

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
}

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
            // Between two signs of progress the loop waits at most for one HTTP call and one
            // database write (busy timeout); budget waits beat every second.
            stall_limit: api_timeout + crate::store::BUSY_TIMEOUT + STALL_MARGIN,
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
        while !cancel.is_cancelled() {
            self.beat();
            let pause = match self.clone().sweep(&cancel).await {
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
                    error!(error = %e, "database error; retrying");
                    self.metrics.set_last_error(&e.to_string());
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

    fn effective_batch(&self) -> u32 {
        if self.list_supported.load(Ordering::Relaxed) {
            self.settings.batch_size.max(1)
        } else {
            1
        }
    }

    /// One sweep. `Ok(Some(d))`: nothing was due, sleep up to `d`; `Ok(None)`: work was done.
    async fn sweep(self: Arc<Self>, cancel: &CancellationToken) -> Result<Option<Duration>, Halt> {
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
        self.metrics.sweeps.fetch_add(1, Ordering::Relaxed);
        let sweep_started = tokio::time::Instant::now();
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
            tasks.spawn(async move { this.poll_chunk(chunk, &cancel).await });
        }
        let mut halt = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(h)) => halt = Some(h),
                Err(e) => error!(error = %e, "a poll task failed"),
            }
        }
        self.metrics.sweep_seconds.observe(sweep_started.elapsed());
        match halt {
            Some(h) => Err(h),
            None => Ok(None),
        }
    }

    /// Polls one chunk and writes its findings in one transaction.
    async fn poll_chunk(
        &self,
        chunk: Vec<DueAction>,
        cancel: &CancellationToken,
    ) -> Result<(), Halt> {
        let mut writes = Vec::with_capacity(chunk.len());
        let mut halt = None;
        let singles: Vec<&DueAction> = if chunk.len() > 1
            && self.list_supported.load(Ordering::Relaxed)
        {
            let ids: Vec<ActionId> = chunk.iter().map(|a| a.id.clone()).collect();
            let result = self
                .call(Endpoint::List, ids.len(), cancel, |token| {
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
                            Some(found) => writes.push(self.observed(a, found)),
                            // Absent from a list answer is not proof of a 404.
                            None => missing.push(a),
                        }
                    }
                    missing
                }
                Err(CallError::Api(MdeError::FilterRejected(detail))) => {
                    if self.list_supported.swap(false, Ordering::Relaxed) {
                        warn!(
                            detail,
                            "MDE refused the list filter; polling with one GET per action from now on"
                        );
                    }
                    chunk.iter().collect()
                }
                Err(e) => match self.halt_or_error(e) {
                    Ok(message) => {
                        for a in &chunk {
                            writes.push(self.failed(a, &message));
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
                .call(Endpoint::Get, 1, cancel, |token| {
                    let id = a.id.clone();
                    async move { self.client.get_action(&token, &id).await }
                })
                .await;
            match result {
                Ok(found) => writes.push(self.observed(a, found)),
                Err(CallError::Api(MdeError::NotFound)) => {
                    info!(action_id = %a.id, "MDE does not know this action (404); tracking ends");
                    writes.push(PollWrite {
                        id: a.id.clone(),
                        result: PollResult::NotFound,
                        next: NextStep::Finish(Tracking::NotFound),
                    });
                }
                Err(e) => match self.halt_or_error(e) {
                    Ok(message) => writes.push(self.failed(a, &message)),
                    Err(h) => halt = Some(h),
                },
            }
        }

        if !writes.is_empty() {
            // Written even when stopping: these answers were paid for.
            let write_started = tokio::time::Instant::now();
            let summary = self
                .store
                .record_polls(&writes, SystemTime::now())
                .await
                .map_err(Halt::Store)?;
            self.metrics
                .db_write_seconds
                .observe(write_started.elapsed());
            self.metrics
                .transitions
                .fetch_add(summary.transitions.into(), Ordering::Relaxed);
            self.metrics
                .finished
                .fetch_add(summary.finished.into(), Ordering::Relaxed);
        }
        match halt {
            Some(h) => Err(h),
            None => Ok(()),
        }
    }

    /// Turns a failed call into the error text to record, or a reason to stop the chunk.
    fn halt_or_error(&self, e: CallError) -> Result<String, Halt> {
        match e {
            CallError::Api(MdeError::RateLimited { .. }) => Err(Halt::RateLimited),
            CallError::Api(e) => {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                self.metrics.set_last_error(&e.to_string());
                if matches!(e, MdeError::Rejected { .. } | MdeError::Unauthorized(_)) {
                    error!(error = %e, "MDE refused the call; check the app's permissions (Machine.Read.All)");
                } else {
                    warn!(error = %e, "poll failed; will retry with backoff");
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
                .start_api_call(endpoint, count, SystemTime::now())
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
                Err(MdeError::Unauthorized(detail)) if !retried => {
                    debug!(
                        detail,
                        "token refused; fetching a new one and retrying once"
                    );
                    self.tokens.invalidate(&token).await;
                    retried = true;
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

    fn observed(&self, a: &DueAction, found: FetchedAction) -> PollWrite {
        let status = found.status.clone();
        let new = a.status.as_deref() != Some(status.as_str());
        if new {
            let lag = found
                .observation
                .updated_at
                .as_deref()
                .and_then(crate::domain::parse_time)
                .and_then(|changed| SystemTime::now().duration_since(changed).ok());
            if let Some(lag) = lag {
                self.metrics.detection_lag.observe(lag);
            }
            info!(
                action_id = %a.id,
                from = a.status.as_deref().unwrap_or("-"),
                to = %status,
                "status changed"
            );
        }
        if !status.is_known() && new {
            warn!(action_id = %a.id, %status, "unknown status; recorded and polled on");
        }
        let next = if status.is_terminal() {
            NextStep::Finish(Tracking::Done)
        } else {
            self.next_step(a)
        };
        PollWrite {
            id: a.id.clone(),
            result: PollResult::Observed(Box::new(found.observation)),
            next,
        }
    }

    fn failed(&self, a: &DueAction, message: &str) -> PollWrite {
        PollWrite {
            id: a.id.clone(),
            result: PollResult::Error(message.to_string()),
            next: self.next_step(a),
        }
    }

    /// Next poll from the schedule, never past the give-up deadline; at the deadline, give up.
    fn next_step(&self, a: &DueAction) -> NextStep {
        let now = SystemTime::now();
        let deadline = a.enqueued_at + self.settings.give_up_after;
        if now >= deadline {
            warn!(action_id = %a.id, status = a.status.as_deref().unwrap_or("-"), "no terminal status within poll.give_up_after; giving up");
            return NextStep::Finish(Tracking::GaveUp);
        }
        let delay = next_delay(a.poll_count, &self.policy, fastrand::f64());
        NextStep::PollAt((now + delay).min(deadline))
    }
}
