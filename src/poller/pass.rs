//! Passes: the due actions in list calls of up to `batch_size` ids (`concurrency` at once),
//! each call's findings written in one transaction.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::domain::ActionId;
use crate::mde::MdeError;
use crate::store::{DueAction, Endpoint, PollResult, PollWrite};

use super::{CallError, Covered, Halt, INTAKE_CHECK, Poller};

impl Poller {
    /// One pass over the due actions. `sweeps`: what sweeps cover while they run.
    pub(super) async fn pass(
        self: Arc<Self>,
        cancel: &CancellationToken,
        sweeps: Option<Covered>,
    ) -> Result<Option<Duration>, Halt> {
        let covered = sweeps.map(|s| s.interval);
        let now = SystemTime::now();
        let batch = self.effective_batch() as usize;
        let limit = batch * self.settings.concurrency.max(1) as usize;
        if let Some(s) = sweeps.filter(|s| !s.owed) {
            // While sweeps cover them, most steps find the due actions not worth a call:
            // an index-only count says so without reading their rows (every arrival
            // wakes the loop, and a churning tenant wakes it many times a second).
            let due = self
                .store
                .count_due(now, batch as u32)
                .await
                .map_err(Halt::Store)?;
            if !self.worth_a_call(due as usize, s.until_sweep) {
                return Ok(Some(INTAKE_CHECK));
            }
        }
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
        match sweeps {
            Some(s) if !s.owed && !self.worth_a_call(due, s.until_sweep) => {
                // The next sweep checks them; they are looked at again as more come due.
                return Ok(Some(INTAKE_CHECK));
            }
            None => {
                if let Some(wait) =
                    self.ride_to_next_call(&candidates[..due], &candidates[due..], now)
                {
                    return Ok(Some(wait));
                }
            }
            Some(_) => {}
        }
        self.metrics.passes.inc();
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
                // The loop counts it and backs off; the other chunks' answers stand.
                Err(e) if e.is_panic() => {
                    halt = Some(Halt::Panicked(crate::panics::message(&*e.into_panic())))
                }
                Err(e) => error!(error = %e, "a poll task failed"),
            }
        }
        self.metrics.pass_seconds.observe(pass_started.elapsed());
        match halt {
            Some(h) => Err(h),
            None => Ok(None),
        }
    }

    pub(super) fn worth_a_call(&self, due: usize, until_sweep: Duration) -> bool {
        worth_a_call(
            due,
            self.effective_batch() as usize,
            until_sweep,
            self.settings.lag_per_call,
        )
    }

    fn ride_to_next_call(
        &self,
        due: &[DueAction],
        later: &[DueAction],
        now: SystemTime,
    ) -> Option<Duration> {
        ride_to_next_call(
            due,
            later,
            now,
            self.settings.initial_interval,
            self.effective_batch() as usize,
            self.settings.lag_per_call,
        )
    }

    /// Polls one chunk and writes its findings in one transaction.
    pub(super) async fn poll_chunk(
        &self,
        chunk: Vec<DueAction>,
        covered: Option<Duration>,
        cancel: &CancellationToken,
    ) -> Result<(), Halt> {
        let mut writes = Vec::with_capacity(chunk.len());
        let mut halt = None;
        let singles: Vec<&DueAction> =
            if chunk.len() > 1 && self.list_supported.load(Ordering::Relaxed) {
                match self.list_chunk(&chunk, covered, cancel, &mut writes).await {
                    Ok(singles) => singles,
                    Err(h) => {
                        halt = Some(h);
                        Vec::new()
                    }
                }
            } else {
                chunk.iter().collect()
            };
        for a in singles {
            if halt.is_some() {
                break;
            }
            let result = self
                .gate
                .call(Endpoint::Get, 1, None, cancel, |token| {
                    let id = a.id.clone();
                    async move { self.client.get_action(&token, &id).await }
                })
                .await;
            match result {
                Ok(found) => writes.push(self.observed(a, found, covered)),
                Err(CallError::Api(MdeError::NotFound)) => writes.push(self.unknown(a, covered)),
                Err(e) => match self.gate.halt_or_error(e) {
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
        self.metrics.checks.inc_by(checked as u64);
        halt.map_or(Ok(()), Err)
    }

    /// One list call for the whole chunk, its findings pushed to `writes`. Returns the
    /// actions left for a GET each: those the answer did not list (absent from a list
    /// answer is not proof of a 404), or all of them when MDE ignores the id filter.
    async fn list_chunk<'c>(
        &self,
        chunk: &'c [DueAction],
        covered: Option<Duration>,
        cancel: &CancellationToken,
        writes: &mut Vec<PollWrite>,
    ) -> Result<Vec<&'c DueAction>, Halt> {
        let ids: Vec<ActionId> = chunk.iter().map(|a| a.id.clone()).collect();
        let result = self
            .gate
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
                for a in chunk {
                    match answer.actions.remove(&a.id) {
                        Some(found) => writes.push(self.observed(a, found, covered)),
                        None => missing.push(a),
                    }
                }
                Ok(missing)
            }
            Err(CallError::Api(e @ (MdeError::FilterRejected(_) | MdeError::FilterIgnored(_)))) => {
                if self.list_supported.swap(false, Ordering::Relaxed) {
                    warn!(
                        error = %e,
                        "MDE does not support the id list filter; polling with one GET per action from now on"
                    );
                }
                Ok(chunk.iter().collect())
            }
            Err(e) => {
                let message = self.gate.halt_or_error(e)?;
                writes.extend(chunk.iter().map(|a| self.failed(a, &message, covered)));
                Ok(Vec::new())
            }
        }
    }
}

/// While sweeps run, whether `due` actions are worth a call by id now rather than the wait
/// for the next sweep (`until_sweep`), which lists them anyway. The call would spare each of
/// them (up to a `batch`) at most that wait; it is made when that is more than `price`
/// (`lag_per_call`, what the sweep cadence puts on a call). Otherwise every young action's
/// backoff and every arrival of a trickle costs calls on top of the sweeps that check the
/// same actions; the cadence already counts young actions' likely changes. (Actions a sweep
/// did not list are fetched regardless: the caller does not ask.)
fn worth_a_call(due: usize, batch: usize, until_sweep: Duration, price: Duration) -> bool {
    until_sweep.mul_f64(due.min(batch.max(1)) as f64) >= price
}

/// Without sweeps: when every due action is new (never polled) and the next call goes out
/// anyway within `initial` (the first of the `later` candidates comes due), how long the new
/// ones wait to ride along with it. They wait when that is worth less than a call: a
/// trickle of arrivals then costs the calls the young ones' backoff makes anyway, not one
/// more each. A new action is still checked within `initial`, and at once when nothing else
/// is due soon.
fn ride_to_next_call(
    due: &[DueAction],
    later: &[DueAction],
    now: SystemTime,
    initial: Duration,
    batch: usize,
    price: Duration,
) -> Option<Duration> {
    if !due.iter().all(|a| a.poll_count == 0) {
        return None;
    }
    let next = later.first()?.next_poll_at.duration_since(now).ok()?;
    (next <= initial && !worth_a_call(due.len(), batch, next, price)).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn action(n: u32, polls: u32, due_in: Duration, now: SystemTime) -> DueAction {
        DueAction {
            id: ActionId::parse(&format!("{n:08x}-0000-4000-8000-000000000000")).unwrap(),
            status: None,
            poll_count: polls,
            enqueued_at: now,
            next_poll_at: now + due_in,
            updated_at: None,
        }
    }

    #[test]
    fn a_call_between_sweeps_must_save_more_than_its_price() {
        // One action, the sweep 10 s away: 10 s saved is less than a 75 s call.
        assert!(!worth_a_call(1, 100, S(10), S(75)));
        // Eight actions each spared 10 s: 80 s, worth it.
        assert!(worth_a_call(8, 100, S(10), S(75)));
        // A call holds a batch: more due than that saves no more per call.
        assert!(!worth_a_call(1_000, 5, S(10), S(75)));
        assert!(worth_a_call(1_000, 8, S(10), S(75)));
        // The sweep is due now: nothing to save.
        assert!(!worth_a_call(100, 100, Duration::ZERO, S(75)));
    }

    #[test]
    fn new_actions_ride_along_with_a_poll_that_is_soon() {
        let now = SystemTime::now();
        let new = [action(1, 0, Duration::ZERO, now)];
        let later = [action(2, 3, S(4), now)];
        let ride = |due: &[DueAction], later: &[DueAction]| {
            ride_to_next_call(due, later, now, S(10), 100, S(75))
        };
        assert_eq!(ride(&new, &later), Some(S(4)));
        // Alone: checked at once.
        assert_eq!(ride(&new, &[]), None);
        // The next poll is past initial_interval: at once.
        assert_eq!(ride(&new, &[action(2, 3, S(11), now)]), None);
        // An action that was polled before is due by its backoff: the pass goes now.
        assert_eq!(
            ride(&[new[0].clone(), action(3, 1, Duration::ZERO, now)], &later),
            None
        );
        // Twenty new ones waiting 4 s each cost more than a call.
        let many: Vec<DueAction> = (0..20)
            .map(|n| action(10 + n, 0, Duration::ZERO, now))
            .collect();
        assert_eq!(ride(&many, &later), None);
    }
}
