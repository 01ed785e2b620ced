//! Sweeps: planning which listing to use and how often, and paging through the tenant
//! with it, checking every tracked action found (one transaction per page).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Cadence, DiscoverMode, SweepMode};
use crate::domain::ActionId;
use crate::mde::{FetchedAction, ListPage, Listed, MdeError, SweepFilter};
use crate::store::{DueAction, Endpoint, PollResult, PollWrite, SweepRecord};

use super::hazard::{self, Census, Curve, Debt, Group, Hazards};
use super::{CallError, Halt, Poller, REMEASURE_AFTER, SWEEP_SHARE};

/// What the loop knows about sweeping this tenant.
#[derive(Debug, Default)]
pub(super) struct SweepState {
    /// Filter forms the service refused with a 400 (until restart).
    pub(super) rejected: Vec<SweepFilter>,
    /// Calls the last `CreatedSince` sweep cost, and the creation time it listed from.
    pub(super) window_cost: Option<(String, u32)>,
    /// Calls the last status sweep cost, fetches of what it did not list included.
    pub(super) unfinished_cost: Option<u32>,
    /// Window sweeps since the status listing was last measured: its cost drifts as actions
    /// finish, so it is measured again every `REMEASURE_AFTER`.
    pub(super) window_sweeps_since_status: u32,
    pub(super) last_started: Option<tokio::time::Instant>,
    /// Whether the last step planned sweeps (actions then carry long safety nets).
    pub(super) sweeping: bool,
    /// The last sweep made the actions it did not list due: a pass must fetch them before
    /// another sweep may be called for by a crowd of due actions (which would not list them
    /// either, and would spin).
    pub(super) pass_owed: bool,
    /// Discovery: the creation time the next listing must reach back to (None until the
    /// first sweep works it out), and whether that listing is the first-start backfill.
    pub(super) discover_from: Option<SystemTime>,
    pub(super) backfill: bool,
    /// Changes per second among the tracked actions, as the last sweeps saw them
    /// (exponentially weighted); None until a sweep has measured it.
    pub(super) change_rate: Option<f64>,
    /// The changes expected of young actions (`Store::young_change_rate`) and when that
    /// was read: the loop plans at every step, the read is worth one a `YOUNG_RATE_READS`th
    /// of `young_for`.
    pub(super) young_rate: Option<(tokio::time::Instant, f64)>,
    /// The last sweep's index map and page buffer, emptied: allocated once, not once a
    /// sweep and once a page (memory freed on one thread stays resident in its arena).
    pub(super) spare_index: HashMap<u128, crate::store::Tracked>,
    pub(super) spare_buffer: Vec<u8>,
    /// What the recorded transitions teach about when actions change.
    pub(super) learned: Learned,
}

/// The history the cadence plans with (`hazard`).
#[derive(Debug, Default)]
pub(super) struct Learned {
    /// Finished stays by (type, status), read from the transitions.
    history: HashMap<Group, Curve>,
    /// The last transition read into `history`; None before the first read.
    read_to: Option<i64>,
    /// The last complete sweep's census and when that sweep started.
    census: Option<(tokio::time::Instant, Census)>,
    hazards: Hazards,
    /// The interval planned from them, and when it was planned (planned again once
    /// `YOUNG_RATE_READS` allows, as arrivals change it).
    planned: Option<(tokio::time::Instant, Duration)>,
}

/// How a sweep's listing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Listing {
    Complete,
    /// The service refused the filter (HTTP 400): that form is not tried again.
    Refused,
    /// A call failed; the next sweep comes at its time.
    Failed,
}

/// The sweep the loop would run now.
#[derive(Debug, Clone)]
pub(super) struct SweepPlan {
    pub(super) filter: SweepFilter,
    pub(super) since: Option<String>,
    /// Calls it is expected to cost.
    pub(super) cost: u32,
    /// Time between sweeps: `sweep_interval`, or longer when the budget cannot pay for it.
    pub(super) interval: Duration,
}

impl SweepState {
    /// Whether the creation-time form may be used, and the status form to use (the first
    /// the service has not refused).
    pub(super) fn forms(&self) -> (bool, Option<SweepFilter>) {
        let allowed = |f: &SweepFilter| !self.rejected.contains(f);
        (
            allowed(&SweepFilter::CreatedSince),
            [SweepFilter::StatusIn, SweepFilter::StatusEqOr]
                .into_iter()
                .find(allowed),
        )
    }

    /// The cheaper listing as measured (`choose_filter`), the window's cost counting only
    /// while it was measured from the same creation time `since`.
    pub(super) fn choose(
        &self,
        since: Option<&str>,
        status_form: Option<SweepFilter>,
    ) -> Option<(SweepFilter, u32)> {
        let window_cost = match (&self.window_cost, since) {
            (Some((from, cost)), Some(since)) if from == since => Some(*cost),
            _ => None,
        };
        choose_filter(
            since.is_some(),
            window_cost,
            status_form,
            self.unfinished_cost,
        )
    }

    /// What the last listing by creation time cost (1 before one was measured).
    pub(super) fn window_cost_or_one(&self) -> u32 {
        self.window_cost.as_ref().map_or(1, |(_, c)| *c)
    }

    /// The young actions' expected changes, when read within `max_age`.
    pub(super) fn young_rate_within(&self, max_age: Duration) -> Option<f64> {
        self.young_rate
            .filter(|(at, _)| at.elapsed() < max_age)
            .map(|(_, rate)| rate)
    }

    /// A filter form the service refused: not tried again, and the next form at once.
    pub(super) fn refused(&mut self, filter: SweepFilter) {
        self.rejected.push(filter);
        self.last_started = None;
    }

    /// What a complete sweep teaches: the rate of change since the sweep before it started
    /// (`gap` ago), and what its listing costs (`cost` calls, the fetches of what it did
    /// not list included).
    pub(super) fn learn(
        &mut self,
        plan: &SweepPlan,
        cost: u32,
        changed: u64,
        gap: Option<Duration>,
    ) {
        if let Some(gap) = gap {
            let sample = changed as f64 / gap.as_secs_f64().max(1e-3);
            self.change_rate = Some(match self.change_rate {
                Some(rate) => (rate + sample) / 2.0,
                None => sample,
            });
        }
        match &plan.since {
            Some(since) => {
                self.window_cost = Some((since.clone(), cost));
                self.window_sweeps_since_status += 1;
                if self.window_sweeps_since_status >= REMEASURE_AFTER {
                    self.unfinished_cost = None;
                }
            }
            None => {
                self.unfinished_cost = Some(cost);
                self.window_sweeps_since_status = 0;
            }
        }
    }
}

impl Poller {
    /// What every listed action is compared with, read once (an index, not the rows): a
    /// page then costs what parsing it costs, and only what changed is written. Actions
    /// that would come due before `due_by` get a later safety net when listed, so that no
    /// pass fetches them by id.
    async fn load_index(
        &self,
        due_by: SystemTime,
        started: SystemTime,
    ) -> Result<SweepIndex, Halt> {
        let loading = tokio::time::Instant::now();
        let mut tracked = std::mem::take(&mut self.sweep_state().spare_index);
        self.store
            .fill_sweep_index(&mut tracked, due_by)
            .await
            .map_err(Halt::Store)?;
        debug!(
            tracked = tracked.len(),
            due_soon = tracked.values().filter(|t| t.due_soon).count(),
            ms = loading.elapsed().as_millis() as u64,
            "sweep index loaded"
        );
        Ok(SweepIndex {
            tracked,
            census: Census::default(),
            started,
        })
    }

    /// Makes the tracked actions a complete sweep did not list due, for a pass to fetch.
    async fn mark_unlisted(&self, sweep: &SweepIndex, record: &mut SweepRecord) {
        let marking = tokio::time::Instant::now();
        let unseen: Vec<ActionId> = sweep
            .tracked
            .iter()
            .filter(|(_, t)| !t.seen && !t.not_found)
            .map(|(key, _)| ActionId::from_key(*key))
            .collect();
        match self.store.make_due(&unseen, SystemTime::now()).await {
            Ok(_) => {
                let missing = unseen.len() as u64;
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
    }

    pub(super) fn sweep_state(&self) -> std::sync::MutexGuard<'_, SweepState> {
        self.sweep.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sweep to run, or `None` when passes by id are as cheap (few actions tracked) or
    /// the service accepts no sweep filter.
    pub(super) async fn sweep_plan(
        &self,
        active: u64,
        batch: u64,
    ) -> Result<Option<SweepPlan>, Halt> {
        if self.settings.sweep == SweepMode::Off {
            return Ok(None);
        }
        let (window_allowed, status_form) = self.sweep_state().forms();
        let since = if window_allowed {
            self.store
                .oldest_active_created()
                .await
                .map_err(Halt::Store)?
        } else {
            None
        };
        let chosen = self.sweep_state().choose(since.as_deref(), status_form);
        let discovering = self.discovering();
        if discovering && window_allowed {
            // Discovery lists by creation time, from the oldest active action or from where
            // the last listing left off, whichever is older: every action created since
            // appears, finished or not. (The status listing would miss the ones that
            // finished between two sweeps.)
            let from = crate::domain::format_time(self.discovery_start().await?);
            let since = match since {
                Some(s) if s < from => s,
                _ => from,
            };
            let cost = self.sweep_state().window_cost_or_one();
            let interval = self.sweep_cadence(cost).await?;
            return Ok(Some(SweepPlan {
                filter: SweepFilter::CreatedSince,
                since: Some(since),
                cost,
                interval,
            }));
        }
        let Some((filter, cost)) = chosen else {
            return Ok(None);
        };
        // A sweep must be cheaper than asking for every action by id (discovery sweeps
        // anyway: listing is how it finds actions).
        if !discovering && active.div_ceil(batch) <= u64::from(cost) {
            return Ok(None);
        }
        let interval = self.sweep_cadence(cost).await?;
        Ok(Some(SweepPlan {
            filter,
            since: since.filter(|_| filter == SweepFilter::CreatedSince),
            cost,
            interval,
        }))
    }

    /// Time between sweeps of `cost` calls: where change is likely, often; where it is not,
    /// up to `sweep_interval`; never faster than the budget's share for sweeps pays. From
    /// the learned rates of change when the history can speak for most tracked actions,
    /// else from the rate the last sweeps saw and the young actions' likely changes.
    async fn sweep_cadence(&self, cost: u32) -> Result<Duration, Halt> {
        let floor = self.gate.budget.sustainable_interval(cost, SWEEP_SHARE);
        if let Some(interval) = self.learned_cadence(cost).await? {
            return Ok(interval.min(self.settings.sweep_interval).max(floor));
        }
        let cached = self
            .sweep_state()
            .young_rate_within(self.settings.young_for / YOUNG_RATE_READS);
        let young = match cached {
            Some(rate) => rate,
            None => {
                let rate = self
                    .store
                    .young_change_rate(SystemTime::now(), self.settings.young_for)
                    .await
                    .map_err(Halt::Store)?;
                self.sweep_state().young_rate = Some((tokio::time::Instant::now(), rate));
                rate
            }
        };
        let seen = self.sweep_state().change_rate.unwrap_or(0.0);
        Ok(cadence(
            self.settings.lag_per_call,
            cost,
            seen.max(young),
            self.settings.sweep_interval,
            floor,
        ))
    }

    /// The interval after the last complete sweep at which the lag owed to the changes
    /// its census's actions are expected to make (and to the ids enqueued since, unseen)
    /// is worth the sweep's calls (`hazard::time_to_owe`). None while the history cannot
    /// speak for `LEARNED_COVERAGE` of the census.
    async fn learned_cadence(&self, cost: u32) -> Result<Option<Duration>, Halt> {
        if self.settings.cadence == Cadence::Observed {
            return Ok(None);
        }
        let census_started = {
            let st = self.sweep_state();
            let learned = &st.learned;
            let Some((started, _)) = &learned.census else {
                return Ok(None);
            };
            if learned.hazards.is_empty() {
                return Ok(None);
            }
            if let Some((at, interval)) = learned.planned
                && at.elapsed() < self.settings.young_for / YOUNG_RATE_READS
            {
                return Ok(Some(interval));
            }
            *started
        };
        let since = SystemTime::now()
            .checked_sub(census_started.elapsed())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let (arrivals, arrivals_at) = self
            .store
            .unseen_arrivals(since)
            .await
            .map_err(Halt::Store)?;
        let mut st = self.sweep_state();
        let change_rate = st.change_rate.unwrap_or(0.0);
        let learned = &mut st.learned;
        let Some((_, census)) = &learned.census else {
            return Ok(None);
        };
        let coverage = learned.hazards.coverage(census);
        if coverage < LEARNED_COVERAGE {
            learned.planned = None;
            debug!(
                coverage,
                "the history does not yet speak for the tracked actions"
            );
            return Ok(None);
        }
        let debt = Debt {
            arrivals: arrivals as f64,
            arrivals_at,
            fallback_rate: change_rate / census.total().max(1) as f64,
        };
        let price = f64::from(cost.max(1)) * self.settings.lag_per_call.as_secs_f64();
        let longest = self.settings.sweep_interval.as_secs_f64();
        let secs = hazard::time_to_owe(&learned.hazards, census, debt, price, longest);
        let interval = Duration::try_from_secs_f64(secs).unwrap_or(self.settings.sweep_interval);
        learned.planned = Some((tokio::time::Instant::now(), interval));
        debug!(
            coverage,
            arrivals,
            interval_ms = interval.as_millis() as u64,
            "sweep interval from the learned rates"
        );
        Ok(Some(interval))
    }

    /// After a complete sweep: the transitions recorded since the last read join the
    /// history, and the rates are learned anew with this sweep's census. A failed read
    /// keeps the rates as they were (the cadence does without them).
    async fn learn_rates(&self, census: Census, started: tokio::time::Instant) {
        const UNREADABLE: &str =
            "cannot read the transitions' history; the cadence does without it";
        let first = self.sweep_state().learned.read_to;
        let mut after = match first {
            Some(id) => id,
            None => match self.store.last_transition_id().await {
                Ok(last) => last.saturating_sub(HISTORY_START),
                Err(e) => {
                    warn!(error = %e, "{UNREADABLE}");
                    return;
                }
            },
        };
        let mut fresh: Vec<(Group, f64)> = Vec::new();
        for _ in 0..HISTORY_READS_PER_SWEEP {
            let rows = match self.store.dwells_after(after, HISTORY_READ).await {
                Ok(rows) => rows,
                Err(e) => {
                    warn!(error = %e, "{UNREADABLE}");
                    break;
                }
            };
            let complete = rows.len() < HISTORY_READ as usize;
            for d in rows {
                after = d.id;
                if let (Some(status), Some(secs)) = (d.status, d.seconds)
                    && secs >= 0.0
                {
                    let kind = d
                        .kind
                        .filter(|t| crate::domain::is_known_action_type(t))
                        .unwrap_or_else(|| "other".to_string());
                    fresh.push(((kind.into(), status.into()), secs));
                }
            }
            if complete {
                break;
            }
        }
        let mut st = self.sweep_state();
        let learned = &mut st.learned;
        for (group, secs) in fresh {
            learned
                .history
                .entry(group)
                .or_default()
                .add(secs, true, 1.0);
        }
        learned.read_to = Some(after);
        learned.hazards = Hazards::learn(&learned.history, &census);
        learned.census = Some((started, census));
        learned.planned = None;
    }

    pub(super) fn discovering(&self) -> bool {
        self.settings.discover == DiscoverMode::All
    }

    /// Where discovery's listing must start: after a restart, a little before the last
    /// complete listing by creation time (new ids become visible late: `not_found_after`
    /// covers that); on the first start, `discover_since` ago (the backfill).
    async fn discovery_start(&self) -> Result<SystemTime, Halt> {
        if let Some(from) = self.sweep_state().discover_from {
            return Ok(from);
        }
        let now = SystemTime::now();
        let floor = crate::domain::time_ago(self.settings.discover_since).unwrap_or(now);
        let backfilled = self
            .store
            .discovery_backfilled()
            .await
            .map_err(Halt::Store)?
            .is_some();
        let last = self.store.last_window_sweep().await.map_err(Halt::Store)?;
        let from = match last.filter(|_| backfilled) {
            Some(t) => t
                .checked_sub(self.settings.not_found_after)
                .unwrap_or(t)
                .max(floor),
            None => floor,
        };
        if !backfilled {
            info!(
                since = %crate::domain::format_time(floor),
                "discovery: recording every action of the tenant created since then (the backfill)"
            );
        }
        let mut st = self.sweep_state();
        st.discover_from = Some(from);
        st.backfill = !backfilled;
        Ok(from)
    }

    /// After a complete listing by creation time that started at `started`.
    async fn discovery_listed(
        &self,
        started: SystemTime,
        record: &SweepRecord,
    ) -> Result<(), Halt> {
        let floor = crate::domain::time_ago(self.settings.discover_since).unwrap_or(started);
        let backfill = {
            let mut st = self.sweep_state();
            st.discover_from = Some(
                started
                    .checked_sub(self.settings.not_found_after)
                    .unwrap_or(started)
                    .max(floor),
            );
            std::mem::take(&mut st.backfill)
        };
        if backfill {
            self.store
                .mark_discovery_backfilled(SystemTime::now())
                .await
                .map_err(Halt::Store)?;
            self.metrics.set_backfill(None);
            info!(
                pages = record.pages,
                listed = record.listed,
                discovered = record.discovered,
                "discovery backfill done; each sweep now adds the actions it has not seen"
            );
        }
        Ok(())
    }

    /// Whether discovery takes this action (`poll.discover_types`, `discover_requestors`).
    fn wanted(&self, a: &FetchedAction) -> bool {
        let p = &self.settings;
        a.observation
            .fields
            .matches(&p.discover_types, &p.discover_requestors)
    }

    /// Lists the tenant page by page and checks every tracked action listed; makes the
    /// tracked actions it did not list due for a fetch by id.
    pub(super) async fn sweep_tenant(
        &self,
        plan: &SweepPlan,
        cancel: &CancellationToken,
    ) -> Result<(), Halt> {
        let started_at = SystemTime::now();
        let started = tokio::time::Instant::now();
        let previous = self.sweep_state().last_started.replace(started);
        let sweep_id = self
            .store
            .start_sweep(plan.filter.as_str(), started_at)
            .await
            .map_err(Halt::Store)?;
        let mut record = SweepRecord {
            outcome: "failed",
            ..SweepRecord::default()
        };
        let mut sweep = self
            .load_index(started_at + plan.interval * 2, started_at)
            .await?;
        let result = self
            .list_tenant(plan, sweep_id, &mut record, &mut sweep, cancel)
            .await;
        if matches!(result, Ok(Listing::Complete)) {
            self.mark_unlisted(&sweep, &mut record).await;
            if self.discovering() && plan.filter == SweepFilter::CreatedSince {
                self.discovery_listed(started_at, &record).await?;
            }
            let fetches = if plan.filter.lists_finished() {
                0
            } else {
                u32::try_from(record.missing.div_ceil(u64::from(self.effective_batch())))
                    .unwrap_or(u32::MAX)
            };
            let gap = previous.map(|p| started.duration_since(p));
            self.sweep_state()
                .learn(plan, record.pages.max(1) + fetches, record.changed, gap);
            // The observed cadence has no use for the history: no reads for it.
            if self.settings.cadence == Cadence::Learned {
                self.learn_rates(std::mem::take(&mut sweep.census), started)
                    .await;
            }
        }
        if let Ok(Listing::Refused) = result {
            record.outcome = "rejected";
            self.sweep_state().refused(plan.filter);
        }
        if let Err(Halt::Cancelled) = result {
            record.outcome = "stopped";
        }
        {
            // The map's memory serves the next sweep.
            let mut tracked = sweep.tracked;
            tracked.clear();
            self.sweep_state().spare_index = tracked;
        }
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
    pub(super) async fn list_tenant(
        &self,
        plan: &SweepPlan,
        sweep_id: i64,
        record: &mut SweepRecord,
        sweep: &mut SweepIndex,
        cancel: &CancellationToken,
    ) -> Result<Listing, Halt> {
        let since = plan.since.clone().unwrap_or_default();
        let top = self.settings.sweep_page_size.max(1);
        let mut skip = 0u64;
        loop {
            let asked = tokio::time::Instant::now();
            let page = self
                .gate
                .call(Endpoint::List, 0, Some(sweep_id), cancel, |token| {
                    let since = since.clone();
                    let buffer = std::mem::take(&mut self.sweep_state().spare_buffer);
                    async move {
                        self.client
                            .list_page(&token, plan.filter, &since, top, skip, buffer)
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
                    return Ok(Listing::Refused);
                }
                Err(e) => {
                    let problem = self.gate.halt_or_error(e)?;
                    debug!(
                        filter = plan.filter.as_str(),
                        problem, "a sweep stopped early"
                    );
                    return Ok(Listing::Failed);
                }
            };
            self.stall.beat();
            record.pages += 1;
            record.listed += page.entries as u64;
            for problem in &page.unreadable {
                warn!(problem, "skipped an unreadable action in a sweep page");
            }
            let answered = asked.elapsed();
            let writing = tokio::time::Instant::now();
            let checked_before = record.checked;
            let written = self.check_page(plan, &page, record, sweep).await?;
            self.metrics.checks.inc_by(record.checked - checked_before);
            debug!(
                page = record.pages,
                entries = page.entries,
                writes = written,
                answer_ms = answered.as_millis() as u64,
                check_ms = writing.elapsed().as_millis() as u64,
                "sweep page"
            );
            let last = page.entries < top as usize;
            self.sweep_state().spare_buffer = page.into_buffer();
            if last {
                return Ok(Listing::Complete);
            }
            skip += u64::from(top);
        }
    }

    /// Compares one page with the sweep's index and writes what changed (and the schedule
    /// of what would soon come due) in one transaction, `WRITE_CHUNK` actions a statement
    /// batch; returns how many actions were written.
    async fn check_page(
        &self,
        plan: &SweepPlan,
        page: &ListPage,
        record: &mut SweepRecord,
        sweep: &mut SweepIndex,
    ) -> Result<usize, Halt> {
        let PageSort {
            mut write,
            lost,
            strangers,
        } = sort_page(page, sweep, record);
        if !lost.is_empty() {
            let ids: Vec<ActionId> = lost.iter().map(|l| l.id()).collect();
            let revived = self.revive(&ids).await?;
            record.checked += revived.len() as u64;
            write.extend(lost.iter().filter(|l| revived.contains(&l.key)));
        }
        let fresh = if self.discovering() && !strangers.is_empty() {
            self.adopt(page, &strangers, sweep, record, &mut write)
                .await?
        } else {
            HashSet::new()
        };
        let backfill = self.sweep_state().backfill && plan.filter == SweepFilter::CreatedSince;
        let history = |l: &Listed| backfill && fresh.contains(&l.key);
        let written = self.write_page(plan, page, &write, history).await?;
        if backfill {
            self.report_backfill(record);
        }
        Ok(written)
    }

    /// Starts tracking the `strangers` of a page that discovery wants and the store did
    /// not know; they join `write` and the index. Returns their keys.
    async fn adopt<'p>(
        &self,
        page: &'p ListPage,
        strangers: &[&'p Listed],
        sweep: &mut SweepIndex,
        record: &mut SweepRecord,
        write: &mut Vec<&'p Listed>,
    ) -> Result<HashSet<u128>, Halt> {
        let ids: Vec<ActionId> = strangers.iter().map(|l| l.id()).collect();
        let unknown: HashSet<u128> = self
            .store
            .unknown_among(&ids)
            .await
            .map_err(Halt::Store)?
            .iter()
            .map(ActionId::key)
            .collect();
        let wanted: Vec<&Listed> = strangers
            .iter()
            .copied()
            .filter(|l| unknown.contains(&l.key))
            .filter(|l| page.action(l).is_ok_and(|a| self.wanted(&a)))
            .collect();
        let ids: Vec<ActionId> = wanted.iter().map(|l| l.id()).collect();
        let new = self
            .store
            .discover_among(&ids, SystemTime::now())
            .await
            .map_err(Halt::Store)?;
        record.discovered += new.len() as u64;
        if !new.is_empty() {
            self.active.changed();
        }
        self.metrics.discovered.inc_by(new.len() as u64);
        let fresh: HashSet<u128> = new.iter().map(|a| a.id.key()).collect();
        for l in wanted.iter().filter(|l| fresh.contains(&l.key)) {
            let seen = crate::store::Tracked {
                status: None,
                not_found: false,
                seen: true,
                due_soon: false,
            };
            sweep.tracked.insert(l.key, seen);
            record.checked += 1;
            write.push(l);
        }
        Ok(fresh)
    }

    /// Writes what a page says of the actions in `write`, `history` telling those whose
    /// transitions are history (no notifications). Returns the actions written.
    async fn write_page(
        &self,
        plan: &SweepPlan,
        page: &ListPage,
        write: &[&Listed],
        history: impl Fn(&Listed) -> bool,
    ) -> Result<usize, Halt> {
        let mut written = 0;
        // One transaction for the page, one statement batch per chunk: chunks bound what
        // is held at once (the first sweep of 100,000 new actions writes every one, each
        // with its whole answer), the single commit saves a page's fsyncs and rewrites.
        let mut batch: Option<crate::store::PollBatch> = None;
        let mut writing = Duration::ZERO;
        for chunk in write.chunks(WRITE_CHUNK) {
            let (news, old) = self.page_writes(plan, page, chunk, &history).await?;
            if news.is_empty() && old.is_empty() {
                continue;
            }
            written += news.len() + old.len();
            let started = tokio::time::Instant::now();
            let now = SystemTime::now();
            let b = match &mut batch {
                Some(b) => b,
                None => batch.insert(self.store.begin_polls().await.map_err(Halt::Store)?),
            };
            b.record(&old, now, false).await.map_err(Halt::Store)?;
            b.record(&news, now, true).await.map_err(Halt::Store)?;
            writing += started.elapsed();
        }
        if let Some(b) = batch {
            let started = tokio::time::Instant::now();
            let summary = b.commit().await.map_err(Halt::Store)?;
            self.committed(summary, writing + started.elapsed());
        }
        Ok(written)
    }

    /// The writes for one chunk of a page: (news, history).
    async fn page_writes(
        &self,
        plan: &SweepPlan,
        page: &ListPage,
        chunk: &[&Listed],
        history: impl Fn(&Listed) -> bool,
    ) -> Result<(Vec<PollWrite>, Vec<PollWrite>), Halt> {
        let ids: Vec<ActionId> = chunk.iter().map(|l| l.id()).collect();
        let rows: HashMap<u128, DueAction> = self
            .store
            .active_among(&ids)
            .await
            .map_err(Halt::Store)?
            .into_iter()
            .map(|a| (a.id.key(), a))
            .collect();
        let mut news = Vec::with_capacity(chunk.len());
        let mut old = Vec::new();
        for l in chunk {
            let Some(row) = rows.get(&l.key) else {
                continue;
            };
            // Listed as it was last written: only the schedule moves, and neither the
            // answer's parse nor its copy through SQLite is paid for.
            if row.status.as_deref() == Some(l.status.as_str())
                && !l.status.is_terminal()
                && page.unchanged_since(l, row.updated_at.as_deref())
            {
                news.push(PollWrite {
                    id: row.id.clone(),
                    result: PollResult::Unchanged,
                    next: self.next_step(row, Some(plan.interval)),
                });
                continue;
            }
            let found = match page.action(l) {
                Ok(found) => found,
                Err(problem) => {
                    warn!(problem, "skipped an unreadable action in a sweep page");
                    continue;
                }
            };
            let w = self.observed(row, found, Some(plan.interval));
            // Only what the backfill found is history; a change of an action someone
            // enqueued is news even now.
            if history(l) {
                old.push(w);
            } else {
                news.push(w);
            }
        }
        Ok((news, old))
    }

    fn report_backfill(&self, record: &SweepRecord) {
        let progress = format!(
            "discovery backfill: {} actions listed, {} recorded so far",
            record.listed, record.discovered
        );
        info!(
            page = record.pages,
            listed = record.listed,
            discovered = record.discovered,
            "discovery backfill page"
        );
        self.metrics.set_backfill(Some(progress));
    }

    /// Brings back actions that had ended `not_found` and are listed after all; returns
    /// the keys of those revived.
    pub(super) async fn revive(&self, ids: &[ActionId]) -> Result<HashSet<u128>, Halt> {
        let revived = self
            .store
            .revive_among(ids, SystemTime::now())
            .await
            .map_err(Halt::Store)?;
        for id in &revived {
            info!(action_id = %id, "revived: MDE lists an action that had ended not_found; tracking it again");
        }
        self.metrics.revived.inc_by(revived.len() as u64);
        if !revived.is_empty() {
            self.active.changed();
        }
        Ok(revived.iter().map(ActionId::key).collect())
    }
}

/// A sweep's view of the tracked actions (`Store::sweep_index`), marked as pages list them.
pub(super) struct SweepIndex {
    tracked: HashMap<u128, crate::store::Tracked>,
    /// The tracked active actions listed, by type, status and time in it at `started`.
    census: Census,
    started: SystemTime,
}

/// A page's entries by what checking them takes.
#[derive(Debug, Default)]
pub(super) struct PageSort<'p> {
    /// Tracked and changed, or due soon: written.
    pub(super) write: Vec<&'p Listed>,
    /// Ended `not_found` and listed after all: revived, then written.
    pub(super) lost: Vec<&'p Listed>,
    /// Not tracked: discovery may adopt them.
    pub(super) strangers: Vec<&'p Listed>,
}

/// Sorts a page's entries against the sweep's index, marking them seen and counting the
/// checked and the changed in `record`. An entry listed twice (a page shifted by new
/// actions) counts once.
pub(super) fn sort_page<'p>(
    page: &'p ListPage,
    sweep: &mut SweepIndex,
    record: &mut SweepRecord,
) -> PageSort<'p> {
    let mut sort = PageSort::default();
    for l in &page.listed {
        match sweep.tracked.get_mut(&l.key) {
            Some(t) if t.seen => {}
            Some(t) if t.not_found => {
                t.seen = true;
                sort.lost.push(l);
            }
            Some(t) => {
                t.seen = true;
                record.checked += 1;
                if let Some(since) = l.since {
                    let dwell = sweep
                        .started
                        .duration_since(since)
                        .unwrap_or_default()
                        .as_secs_f64();
                    sweep.census.count(l.kind(), l.status.as_str(), dwell);
                }
                let changed = t.status.as_ref() != Some(&l.status);
                record.changed += u64::from(changed);
                if changed || t.due_soon {
                    sort.write.push(l);
                }
            }
            None => sort.strangers.push(l),
        }
    }
    sort
}

/// Share of a census the learned rates must speak for before they set the cadence.
const LEARNED_COVERAGE: f64 = 0.8;

/// Transitions read into the history on the first sweep after a start (the most recent),
/// and per read after it; reads per sweep at most (a churning tenant at 100,000 records
/// thousands a sweep).
const HISTORY_START: i64 = 50_000;
const HISTORY_READ: u32 = 5_000;
const HISTORY_READS_PER_SWEEP: u32 = 20;

/// Reads of the young actions' expected changes per `young_for` at most (once a second
/// with the default 10 minutes): a read stands that long.
const YOUNG_RATE_READS: u32 = 600;

/// Actions per statement batch of a sweep page's transaction: each batch binds its rows'
/// answers as one JSON text, which SQLite copies and parses again per statement, so the
/// batch sets the write's transient memory (500: 25 MiB peak in `examples/store_write`
/// against 34 MiB at 1,000, for 18% more time).
const WRITE_CHUNK: usize = 500;

/// The time between sweeps that minimises detection lag plus calls. Changes arriving at
/// `rate` a second wait half an interval on average, and a sweep of `cost` calls is worth
/// `lag_per_call` of lag per call: lag `rate x T / 2` plus `cost x lag_per_call / T` is
/// least at `T = sqrt(2 x cost x lag_per_call / rate)`. Calls then go where change is (the
/// interval shrinks as the square root of the rate), within the budget's `floor` and the
/// configured `longest`.
pub(super) fn cadence(
    lag_per_call: Duration,
    cost: u32,
    rate: f64,
    longest: Duration,
    floor: Duration,
) -> Duration {
    let ideal = if rate.is_finite() && rate > 0.0 {
        let secs = (2.0 * f64::from(cost.max(1)) * lag_per_call.as_secs_f64() / rate).sqrt();
        Duration::try_from_secs_f64(secs).unwrap_or(longest)
    } else {
        longest
    };
    ideal.min(longest).max(floor)
}

/// Which sweep filter to use and what it is expected to cost: the listing from the oldest
/// tracked action's creation (nothing to fetch afterwards) unless the unfinished-status
/// listing was measured cheaper; an unmeasured form is tried when the other costs more than a
/// page.
pub(super) fn choose_filter(
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
    use crate::domain::ActionStatus;
    use crate::store::Tracked;

    const A: &str = "a0000000-0000-0000-0000-000000000001";
    const B: &str = "b0000000-0000-0000-0000-000000000002";
    const C: &str = "c0000000-0000-0000-0000-000000000003";
    const D: &str = "d0000000-0000-0000-0000-000000000004";
    const E: &str = "e0000000-0000-0000-0000-000000000005";

    fn key(id: &str) -> u128 {
        ActionId::parse(id).unwrap().key()
    }

    fn tracked(status: &str, not_found: bool, due_soon: bool) -> Tracked {
        Tracked {
            status: Some(ActionStatus::parse(status)),
            not_found,
            seen: false,
            due_soon,
        }
    }

    #[test]
    fn a_page_sorts_into_changed_lost_and_strangers_counting_each_once() {
        let entries: Vec<String> = [
            (A, "InProgress"),
            (B, "Succeeded"),
            (C, "Pending"),
            (D, "Pending"),
            (E, "Pending"),
            (B, "Succeeded"),
        ]
        .iter()
        .map(|(id, st)| {
            format!(
                r#"{{"id": "{id}", "status": "{st}", "type": "Isolate",
                     "creationDateTimeUtc": "2026-12-01T09:50:00Z",
                     "lastUpdateDateTimeUtc": "2026-12-01T09:55:00.5Z"}}"#
            )
        })
        .collect();
        let body = format!(r#"{{"value": [{}]}}"#, entries.join(","));
        let page = ListPage::parse(body, None).unwrap();
        let mut sweep = SweepIndex {
            tracked: HashMap::from([
                (key(A), tracked("InProgress", false, false)),
                (key(B), tracked("InProgress", false, false)),
                (key(C), tracked("Pending", false, true)),
                (key(D), tracked("Pending", true, false)),
            ]),
            census: Census::default(),
            started: crate::domain::parse_time("2026-12-01T10:05:00.5Z").unwrap(),
        };
        let mut record = SweepRecord::default();
        let sort = sort_page(&page, &mut sweep, &mut record);
        let keys = |v: &[&Listed]| v.iter().map(|l| l.key).collect::<Vec<_>>();
        // B changed, C is due soon; A is unchanged and not written.
        assert_eq!(keys(&sort.write), vec![key(B), key(C)]);
        assert_eq!(keys(&sort.lost), vec![key(D)]);
        assert_eq!(keys(&sort.strangers), vec![key(E)]);
        // B listed twice is checked once; D is checked once revived, E once adopted.
        assert_eq!((record.checked, record.changed), (3, 1));
        assert!(sweep.tracked.values().all(|t| t.seen));
        // The census holds the tracked actions still going (A, C), by type, status and
        // the 600 s since their last update; not B (finished), D (lost) nor E (a stranger).
        assert_eq!(sweep.census.total(), 2);
        let cells = |status: &str| {
            sweep.census.cells[&(Box::from("Isolate"), Box::from(status))]
                .iter()
                .position(|n| *n == 1)
        };
        assert_eq!(cells("InProgress"), Some(hazard::bucket(600.0)));
        assert_eq!(cells("Pending"), Some(hazard::bucket(600.0)));
    }

    #[test]
    fn refused_forms_are_not_tried_again_and_the_next_comes_at_once() {
        let mut st = SweepState {
            last_started: Some(tokio::time::Instant::now()),
            ..SweepState::default()
        };
        assert_eq!(st.forms(), (true, Some(SweepFilter::StatusIn)));
        st.refused(SweepFilter::StatusIn);
        assert_eq!(st.last_started, None);
        assert_eq!(st.forms(), (true, Some(SweepFilter::StatusEqOr)));
        st.refused(SweepFilter::CreatedSince);
        st.refused(SweepFilter::StatusEqOr);
        assert_eq!(st.forms(), (false, None));
        // The window's measured cost counts only from the creation time it was measured at.
        st.window_cost = Some(("2026-12-01T00:00:00.000Z".into(), 2));
        st.unfinished_cost = Some(9);
        let ok = Some(SweepFilter::StatusIn);
        assert_eq!(
            st.choose(Some("2026-12-01T00:00:00.000Z"), ok),
            Some((SweepFilter::CreatedSince, 2))
        );
        assert_eq!(st.window_cost_or_one(), 2);
        assert_ne!(
            st.choose(Some("2026-12-02T00:00:00.000Z"), ok),
            Some((SweepFilter::CreatedSince, 2))
        );
    }

    #[test]
    fn a_complete_sweep_teaches_its_cost_and_the_rate_of_change() {
        let window = SweepPlan {
            filter: SweepFilter::CreatedSince,
            since: Some("2026-12-01T00:00:00.000Z".into()),
            cost: 3,
            interval: Duration::from_secs(60),
        };
        let status = SweepPlan {
            filter: SweepFilter::StatusIn,
            since: None,
            ..window.clone()
        };
        let mut st = SweepState::default();
        // The first sweep has no sweep before it: no rate yet.
        st.learn(&status, 7, 10, None);
        assert_eq!((st.unfinished_cost, st.change_rate), (Some(7), None));
        // 20 changes in 10 s: 2/s; then 0 in 10 s halves the average.
        st.learn(&window, 4, 20, Some(Duration::from_secs(10)));
        assert_eq!(st.change_rate, Some(2.0));
        assert_eq!(st.window_cost, Some((window.since.clone().unwrap(), 4)));
        st.learn(&window, 4, 0, Some(Duration::from_secs(10)));
        assert_eq!(st.change_rate, Some(1.0));
        // The status listing is measured again after REMEASURE_AFTER window sweeps.
        for _ in 2..REMEASURE_AFTER {
            st.learn(&window, 4, 0, None);
        }
        assert_eq!(st.unfinished_cost, None);
        st.learn(&status, 9, 0, None);
        assert_eq!(
            (st.unfinished_cost, st.window_sweeps_since_status),
            (Some(9), 0)
        );
    }

    #[test]
    fn cadence_follows_the_square_root_of_the_rate_within_its_bounds() {
        let s = Duration::from_secs;
        let t = |cost, rate| cadence(s(20), cost, rate, s(120), s(3));
        // sqrt(2 x 20 / 2.5) = 4 s; a quarter of the rate, twice the interval.
        assert_eq!(t(1, 2.5), s(4));
        assert_eq!(t(1, 0.625), s(8));
        // Twice the calls a sweep: sqrt(2) times longer.
        assert!((t(2, 0.625).as_secs_f64() - 8.0 * 2f64.sqrt()).abs() < 1e-9);
        // The budget's floor and the configured longest interval bound it.
        assert_eq!(t(1, 1000.0), s(3));
        assert_eq!(t(1, 0.001), s(120));
        assert_eq!(t(1, 0.0), s(120));
        assert_eq!(t(1, f64::NAN), s(120));
        // A budget too short for the longest interval wins over it.
        assert_eq!(cadence(s(20), 11, 0.0, s(30), s(41)), s(41));
    }

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
