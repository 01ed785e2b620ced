//! What an answer means for one action: the write that records it and when to look again.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tracing::{debug, info, warn};

use crate::domain::Tracking;
use crate::mde::FetchedAction;
use crate::schedule::next_delay;
use crate::store::{DueAction, NextStep, PollResult, PollWrite};

use super::{Poller, SWEEP_NET_FACTOR};

impl Poller {
    pub(super) fn observed(
        &self,
        a: &DueAction,
        found: FetchedAction,
        covered: Option<Duration>,
    ) -> PollWrite {
        let status = found.status.clone();
        if !status.is_known() && self.metrics.count_unknown("status", status.as_str()) {
            warn!(action_id = %a.id, %status, "a status this version does not know; recorded as sent and polled on (not terminal)");
        }
        if let Some(t) = found.observation.fields.unknown_type()
            && self.metrics.count_unknown("type", t)
        {
            warn!(action_id = %a.id, kind = t, "an action type this version does not know; recorded as sent");
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
    pub(super) fn unknown(&self, a: &DueAction, covered: Option<Duration>) -> PollWrite {
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

    pub(super) fn failed(
        &self,
        a: &DueAction,
        message: &str,
        covered: Option<Duration>,
    ) -> PollWrite {
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
    pub(super) fn next_step(&self, a: &DueAction, covered: Option<Duration>) -> NextStep {
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
