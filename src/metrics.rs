//! Counters and histograms of the running daemon, rendered in the Prometheus text format.
//!
//! Hand-rolled: a dozen series do not justify a metrics framework, and atomics keep the hot
//! path free of locks.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Seconds-scale buckets for latencies of database writes, passes and sweeps.
const FAST_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Buckets for the lag from MDE's change to our observation (seconds to hours).
const LAG_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Everything the poll loop counts. Shared by the loop, the HTTP listener and systemd status.
#[derive(Debug)]
pub struct Metrics {
    /// Passes over due actions that polled something.
    pub passes: AtomicU64,
    /// Actions checked (one answer about one tracked action, by id or in a sweep).
    pub checks: AtomicU64,
    sweeps_by_filter: Mutex<BTreeMap<&'static str, u64>>,
    pub sweep_pages: AtomicU64,
    /// Milliseconds; 0 when not measured yet.
    check_interval_ms: AtomicU64,
    /// Milliseconds; 0 while sweeps are not in use.
    sweep_interval_ms: AtomicU64,
    pub pass_seconds: Histogram,
    pub api_calls: AtomicU64,
    pub transitions: AtomicU64,
    pub finished: AtomicU64,
    pub rate_limited: AtomicU64,
    pub errors: AtomicU64,
    calls_by_outcome: Mutex<BTreeMap<(&'static str, String), u64>>,
    pub sweep_seconds: Histogram,
    pub detection_lag: Histogram,
    pub db_write_seconds: Histogram,
    last_error: Mutex<Option<(String, SystemTime)>>,
    /// Actions that had ended `not_found` and showed up in a listing later.
    pub revived: AtomicU64,
    /// Times the wall clock was seen stepping back (next polls were moved back with it).
    pub clock_steps_back: AtomicU64,
    /// 404s that were not the API's (HTML or empty body, or to a list call).
    pub not_api_answers: AtomicU64,
    /// Status and type values this version does not know, by field and value.
    unknown_values: Mutex<BTreeMap<(&'static str, String), u64>>,
    /// What keeps the daemon from doing its job right now, by kind, until it clears:
    /// `/readyz` lists these and a gauge shows each.
    blockers: Mutex<BTreeMap<Blocker, String>>,
    /// Actions sweeps started tracking because nobody had enqueued them.
    pub discovered: AtomicU64,
    /// While the discovery backfill runs: how far it got, for `systemctl status`.
    backfill: Mutex<Option<String>>,
    /// Notification attempts by destination and outcome (delivered, retry, dead, gone).
    deliveries: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// 3xx answers of the API, never followed.
    pub redirects_refused: AtomicU64,
    /// Panics caught, by the task that panicked (one of `PANIC_TASKS`).
    panics: Mutex<BTreeMap<&'static str, u64>>,
}

/// The tasks whose panics are caught and counted (`mde_actiond_panics_total{task}`).
pub const PANIC_TASKS: [&str; 4] = ["poller", "token", "notify", "housekeeping"];

/// A condition that makes the daemon not ready while it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Blocker {
    /// MDE answers 403: the app lacks an application role.
    ApiForbidden,
    /// MDE answers 401 to fresh tokens too.
    TokensRejected,
    /// Database writes fail (a full disk, an I/O error): polling is paused.
    DatabaseWrites,
}

impl Blocker {
    pub const ALL: [Blocker; 3] = [
        Blocker::ApiForbidden,
        Blocker::TokensRejected,
        Blocker::DatabaseWrites,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Blocker::ApiForbidden => "api_forbidden",
            Blocker::TokensRejected => "tokens_rejected",
            Blocker::DatabaseWrites => "database_writes",
        }
    }
}

/// `counts` with every `known` label present (0 when absent), known ones first in their
/// order, then the others as counted.
fn with_known<'a>(
    counts: &[(String, i64)],
    known: impl Iterator<Item = &'a str>,
) -> Vec<(String, i64)> {
    let mut out: Vec<(String, i64)> = known
        .map(|k| {
            let n = counts.iter().find(|(c, _)| c == k).map_or(0, |(_, n)| *n);
            (k.to_string(), n)
        })
        .collect();
    for (c, n) in counts {
        if !out.iter().any(|(k, _)| k == c) {
            out.push((c.clone(), *n));
        }
    }
    out
}

/// Distinct unknown values counted by name; beyond this they add up under `(other)`, so
/// a service that sends garbage cannot grow the metrics without bound.
const UNKNOWN_VALUES_KEPT: usize = 32;

impl Default for Metrics {
    fn default() -> Self {
        Self {
            passes: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            sweeps_by_filter: Mutex::new(BTreeMap::new()),
            sweep_pages: AtomicU64::new(0),
            check_interval_ms: AtomicU64::new(0),
            sweep_interval_ms: AtomicU64::new(0),
            pass_seconds: Histogram::new(FAST_BUCKETS),
            api_calls: AtomicU64::new(0),
            transitions: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            calls_by_outcome: Mutex::new(BTreeMap::new()),
            sweep_seconds: Histogram::new(FAST_BUCKETS),
            detection_lag: Histogram::new(LAG_BUCKETS),
            db_write_seconds: Histogram::new(FAST_BUCKETS),
            last_error: Mutex::new(None),
            revived: AtomicU64::new(0),
            clock_steps_back: AtomicU64::new(0),
            not_api_answers: AtomicU64::new(0),
            unknown_values: Mutex::new(BTreeMap::new()),
            blockers: Mutex::new(BTreeMap::new()),
            deliveries: Mutex::new(BTreeMap::new()),
            discovered: AtomicU64::new(0),
            backfill: Mutex::new(None),
            redirects_refused: AtomicU64::new(0),
            panics: Mutex::new(BTreeMap::new()),
        }
    }
}

/// Values read at scrape time from elsewhere (database, budget, token cache).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub by_tracking: Vec<(String, i64)>,
    pub by_status: Vec<(String, i64)>,
    pub budget_minute: u32,
    pub budget_hour: u32,
    pub paused_seconds_total: f64,
    pub paused_now: bool,
    pub token_refreshes: u64,
    pub token_failures: u64,
    /// Failed token requests by cause (`auth::FAILURE_CAUSES`).
    pub token_failures_by_cause: Vec<(&'static str, u64)>,
    /// Panics of the token source, caught by the token cache (counted as task `token`).
    pub token_panics: u64,
    pub up_seconds: f64,
    /// What `/readyz` would say, less its database-lock probe (a scrape must not wait on it).
    pub ready: bool,
    pub since_progress_seconds: f64,
    pub stall_limit_seconds: f64,
    /// Age of the oldest active action (from MDE's creation time); 0 when none.
    pub oldest_active_seconds: f64,
    /// Active actions older than `report.stuck_after` (the `stuck_actions` view).
    pub stuck: i64,
    /// Per destination: pending deliveries, age of the oldest pending event (s), disabled.
    pub notify: Vec<NotifySnapshot>,
}

#[derive(Debug, Default, Clone)]
pub struct NotifySnapshot {
    pub destination: String,
    pub pending: i64,
    pub oldest_pending_seconds: f64,
    pub disabled: bool,
}

impl Metrics {
    /// A panic of `task` was caught; returns how many that task has had.
    pub fn count_panic(&self, task: &'static str) -> u64 {
        let mut map = self.panics.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(task).or_default();
        *n += 1;
        *n
    }

    pub fn panics(&self, task: &str) -> u64 {
        self.panics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(task)
            .copied()
            .unwrap_or(0)
    }

    pub fn count_call(&self, endpoint: &'static str, http_status: Option<u16>) {
        let code = http_status.map_or_else(|| "none".to_string(), |c| c.to_string());
        let mut map = self
            .calls_by_outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *map.entry((endpoint, code)).or_default() += 1;
    }

    pub fn observe_sweep(&self, filter: &'static str, pages: u32, took: Duration) {
        *self
            .sweeps_by_filter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(filter)
            .or_default() += 1;
        self.sweep_pages
            .fetch_add(u64::from(pages), Ordering::Relaxed);
        self.sweep_seconds.observe(took);
    }

    pub fn sweeps(&self) -> u64 {
        self.sweeps_by_filter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }

    /// How long, on average, between two checks of one tracked action (last minute).
    pub fn set_check_interval(&self, d: Duration) {
        self.check_interval_ms
            .store(d.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    pub fn check_interval(&self) -> Option<Duration> {
        match self.check_interval_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    pub fn set_sweep_interval(&self, d: Option<Duration>) {
        self.sweep_interval_ms.store(
            d.map_or(0, |d| d.as_millis().max(1) as u64),
            Ordering::Relaxed,
        );
    }

    pub fn set_last_error(&self, message: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((message.to_string(), SystemTime::now()));
    }

    pub fn last_error(&self) -> Option<(String, SystemTime)> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts one sighting of a value of `field` (status, type) that this version does not
    /// know. True the first time the value is seen, so the caller warns once per value.
    pub fn count_unknown(&self, field: &'static str, value: &str) -> bool {
        let mut map = self
            .unknown_values
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = (field, value.to_string());
        if let Some(n) = map.get_mut(&key) {
            *n += 1;
            return false;
        }
        if map.keys().filter(|(f, _)| *f == field).count() < UNKNOWN_VALUES_KEPT {
            map.insert(key, 1);
            return true;
        }
        // Past the bound, values are no longer told apart: only the first one warns.
        let n = map.entry((field, "(other)".to_string())).or_default();
        *n += 1;
        *n == 1
    }

    /// Sets (`Some`) or clears (`None`) a blocker; true when that changed whether it is set.
    pub fn set_blocker(&self, kind: Blocker, why: Option<String>) -> bool {
        let mut map = self.blockers.lock().unwrap_or_else(|p| p.into_inner());
        match why {
            Some(why) => map.insert(kind, why).is_none(),
            None => map.remove(&kind).is_some(),
        }
    }

    pub fn blocker(&self, kind: Blocker) -> Option<String> {
        self.blockers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&kind)
            .cloned()
    }

    /// Every blocker that is set, as sentences for `/readyz`.
    pub fn blockers(&self) -> Vec<String> {
        self.blockers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn set_backfill(&self, progress: Option<String>) {
        *self.backfill.lock().unwrap_or_else(|p| p.into_inner()) = progress;
    }

    pub fn backfill(&self) -> Option<String> {
        self.backfill
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn count_delivery(&self, destination: &str, outcome: &'static str) {
        let mut map = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((destination.to_string(), outcome)).or_default() += 1;
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn render(&self, snap: &Snapshot) -> String {
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP mde_actiond_actions Tracked actions by tracking state.\n# TYPE mde_actiond_actions gauge"
        );
        // Every known label value is exported, 0 included: a series that vanishes at zero
        // leaves alerts and dashboards with gaps instead of a 0.
        for (t, n) in with_known(
            &snap.by_tracking,
            crate::domain::Tracking::ALL.iter().map(|t| t.as_str()),
        ) {
            let _ = writeln!(
                out,
                "mde_actiond_actions{{tracking=\"{}\"}} {n}",
                escape(&t)
            );
        }
        let _ = writeln!(
            out,
            "# HELP mde_actiond_actions_by_status Tracked actions by last MDE status.\n# TYPE mde_actiond_actions_by_status gauge"
        );
        for (s, n) in with_known(
            &snap.by_status,
            crate::domain::ActionStatus::KNOWN
                .iter()
                .map(|s| s.as_str()),
        ) {
            let _ = writeln!(
                out,
                "mde_actiond_actions_by_status{{status=\"{}\"}} {n}",
                escape(&s)
            );
        }
        let _ = writeln!(
            out,
            "# HELP mde_actiond_api_calls_total MDE API calls by endpoint and HTTP status (none: no answer).\n# TYPE mde_actiond_api_calls_total counter"
        );
        for ((endpoint, code), n) in self
            .calls_by_outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "mde_actiond_api_calls_total{{endpoint=\"{endpoint}\",code=\"{code}\"}} {n}"
            );
        }
        counter(
            &mut out,
            "mde_actiond_rate_limited_total",
            "429 answers from MDE.",
            Self::get(&self.rate_limited),
        );
        let _ = writeln!(
            out,
            "# HELP mde_actiond_rate_limit_paused_seconds_total Time all calls were held back by Retry-After.\n# TYPE mde_actiond_rate_limit_paused_seconds_total counter\nmde_actiond_rate_limit_paused_seconds_total {}",
            snap.paused_seconds_total
        );
        gauge(
            &mut out,
            "mde_actiond_rate_limit_paused",
            "1 while a Retry-After is in force.",
            u8::from(snap.paused_now).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP mde_actiond_api_budget_remaining API calls left in the current window.\n# TYPE mde_actiond_api_budget_remaining gauge\nmde_actiond_api_budget_remaining{{window=\"minute\"}} {}\nmde_actiond_api_budget_remaining{{window=\"hour\"}} {}",
            snap.budget_minute, snap.budget_hour
        );
        counter(
            &mut out,
            "mde_actiond_token_refreshes_total",
            "Access tokens obtained.",
            snap.token_refreshes,
        );
        counter(
            &mut out,
            "mde_actiond_token_failures_total",
            "Failed token requests.",
            snap.token_failures,
        );
        let _ = writeln!(
            out,
            "# HELP mde_actiond_token_failures_by_cause_total Failed token requests by cause (refused, transient, local, redirected, invalid_answer, panic).\n# TYPE mde_actiond_token_failures_by_cause_total counter"
        );
        for (cause, n) in &snap.token_failures_by_cause {
            let _ = writeln!(
                out,
                "mde_actiond_token_failures_by_cause_total{{cause=\"{cause}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP mde_actiond_panics_total Panics caught and contained, by task (the task backs off and goes on).\n# TYPE mde_actiond_panics_total counter"
        );
        for task in PANIC_TASKS {
            let _ = writeln!(
                out,
                "mde_actiond_panics_total{{task=\"{task}\"}} {}",
                self.panics(task)
                    + if task == "token" {
                        snap.token_panics
                    } else {
                        0
                    }
            );
        }
        counter(
            &mut out,
            "mde_actiond_redirects_refused_total",
            "API answers that were redirects (3xx), never followed.",
            Self::get(&self.redirects_refused),
        );
        counter(
            &mut out,
            "mde_actiond_transitions_total",
            "Status transitions recorded.",
            Self::get(&self.transitions),
        );
        counter(
            &mut out,
            "mde_actiond_finished_total",
            "Actions whose tracking ended.",
            Self::get(&self.finished),
        );
        counter(
            &mut out,
            "mde_actiond_poll_errors_total",
            "Failed polls (each counts for its actions).",
            Self::get(&self.errors),
        );
        counter(
            &mut out,
            "mde_actiond_passes_total",
            "Passes over due actions that polled something.",
            Self::get(&self.passes),
        );
        self.pass_seconds.render(
            &mut out,
            "mde_actiond_pass_duration_seconds",
            "Time to poll and record one pass over due actions.",
        );
        let _ = writeln!(
            out,
            "# HELP mde_actiond_sweeps_total Tenant-wide listings, by filter form.\n# TYPE mde_actiond_sweeps_total counter"
        );
        for (filter, n) in self
            .sweeps_by_filter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "mde_actiond_sweeps_total{{filter=\"{filter}\"}} {n}");
        }
        counter(
            &mut out,
            "mde_actiond_sweep_pages_total",
            "Pages (API calls) of sweeps.",
            Self::get(&self.sweep_pages),
        );
        self.sweep_seconds.render(
            &mut out,
            "mde_actiond_sweep_duration_seconds",
            "Time to list and record one sweep.",
        );
        counter(
            &mut out,
            "mde_actiond_checks_total",
            "Answers about one tracked action (by id or in a sweep).",
            Self::get(&self.checks),
        );
        let secs = |ms: &AtomicU64| format!("{:.3}", ms.load(Ordering::Relaxed) as f64 / 1000.0);
        gauge(
            &mut out,
            "mde_actiond_check_interval_seconds",
            "Effective time between two checks of one tracked action over the last minute (0: not measured yet).",
            secs(&self.check_interval_ms),
        );
        gauge(
            &mut out,
            "mde_actiond_sweep_interval_seconds",
            "Planned time between sweeps: poll.sweep_interval or longer when the budget is short (0: no sweeps).",
            secs(&self.sweep_interval_ms),
        );
        self.detection_lag.render(
            &mut out,
            "mde_actiond_detection_lag_seconds",
            "From MDE's lastUpdateDateTimeUtc to our observation of the change.",
        );
        self.db_write_seconds.render(
            &mut out,
            "mde_actiond_db_write_seconds",
            "Time to commit one batch of poll results.",
        );
        counter(
            &mut out,
            "mde_actiond_revived_total",
            "Actions that had ended not_found and showed up in a listing later.",
            Self::get(&self.revived),
        );
        counter(
            &mut out,
            "mde_actiond_clock_steps_back_total",
            "Times the wall clock stepped back by more than 2s; next polls moved back with it.",
            Self::get(&self.clock_steps_back),
        );
        counter(
            &mut out,
            "mde_actiond_not_api_answers_total",
            "404 answers that did not come from the MDE API (HTML or empty body): check api.base_url.",
            Self::get(&self.not_api_answers),
        );
        gauge(
            &mut out,
            "mde_actiond_api_forbidden",
            "1 while MDE refuses the app (403: a missing application role).",
            u8::from(self.blocker(Blocker::ApiForbidden).is_some()).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP mde_actiond_blocked 1 while this keeps the daemon from working (see /readyz for why).\n# TYPE mde_actiond_blocked gauge"
        );
        for kind in Blocker::ALL {
            let _ = writeln!(
                out,
                "mde_actiond_blocked{{reason=\"{}\"}} {}",
                kind.as_str(),
                u8::from(self.blocker(kind).is_some())
            );
        }
        let _ = writeln!(
            out,
            "# HELP mde_actiond_unknown_values_total Answers carrying a status or type this version does not know (kept verbatim).\n# TYPE mde_actiond_unknown_values_total counter"
        );
        for ((field, value), n) in self
            .unknown_values
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "mde_actiond_unknown_values_total{{field=\"{field}\",value=\"{}\"}} {n}",
                escape(value)
            );
        }
        gauge(
            &mut out,
            "mde_actiond_up_seconds",
            "Seconds since the daemon started.",
            format!("{:.0}", snap.up_seconds),
        );
        gauge(
            &mut out,
            "mde_actiond_ready",
            "1 when /readyz would answer 200 (its database lock probe aside).",
            u8::from(snap.ready).to_string(),
        );
        gauge(
            &mut out,
            "mde_actiond_seconds_since_progress",
            "Seconds since the poll loop last showed progress.",
            format!("{:.0}", snap.since_progress_seconds),
        );
        gauge(
            &mut out,
            "mde_actiond_stall_limit_seconds",
            "poll.stall_after: beyond it /healthz fails and the watchdog is not fed.",
            format!("{:.0}", snap.stall_limit_seconds),
        );
        gauge(
            &mut out,
            "mde_actiond_oldest_active_seconds",
            "Age of the oldest active action since MDE created it (0 when none).",
            format!("{:.0}", snap.oldest_active_seconds),
        );
        gauge(
            &mut out,
            "mde_actiond_stuck_actions",
            "Active actions older than report.stuck_after.",
            snap.stuck.to_string(),
        );
        counter(
            &mut out,
            "mde_actiond_discovered_total",
            "Actions sweeps started tracking because nobody had enqueued them (poll.discover).",
            Self::get(&self.discovered),
        );
        self.render_notify(&mut out, snap);
        out
    }

    fn render_notify(&self, out: &mut String, snap: &Snapshot) {
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
        let label = |d: &str| format!("destination=\"{}\"", escape(d));
        family(
            "mde_actiond_notify_pending",
            "gauge",
            "Notification deliveries not yet delivered or dead, by destination.",
            snap.notify
                .iter()
                .map(|n| (label(&n.destination), n.pending.to_string()))
                .collect(),
        );
        family(
            "mde_actiond_notify_oldest_pending_seconds",
            "gauge",
            "Age of the oldest pending notification event, by destination (0 when none).",
            snap.notify
                .iter()
                .map(|n| {
                    (
                        label(&n.destination),
                        format!("{:.0}", n.oldest_pending_seconds),
                    )
                })
                .collect(),
        );
        family(
            "mde_actiond_notify_disabled",
            "gauge",
            "1 while a destination is disabled (410 Gone, or failing for notify.disable_after).",
            snap.notify
                .iter()
                .map(|n| (label(&n.destination), u8::from(n.disabled).to_string()))
                .collect(),
        );
        let counts = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        family(
            "mde_actiond_notify_deliveries_total",
            "counter",
            "Notification attempts by destination and outcome (delivered, retry, dead, gone).",
            counts
                .iter()
                .map(|((d, o), n)| (format!("{},outcome=\"{o}\"", label(d)), n.to_string()))
                .collect(),
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.count_call("list", Some(200));
        m.count_call("list", Some(200));
        m.count_call("get", None);
        m.detection_lag.observe(Duration::from_secs(3));
        m.detection_lag.observe(Duration::from_secs(7200));
        let text = m.render(&Snapshot {
            by_tracking: vec![("active".into(), 3)],
            by_status: vec![("Pen\"ding".into(), 3)],
            budget_minute: 97,
            budget_hour: 1497,
            ..Snapshot::default()
        });
        assert!(text.contains("mde_actiond_api_calls_total{endpoint=\"list\",code=\"200\"} 2"));
        assert!(text.contains("mde_actiond_api_calls_total{endpoint=\"get\",code=\"none\"} 1"));
        assert!(text.contains("mde_actiond_actions{tracking=\"active\"} 3"));
        // Known values that nothing has are there at 0, not missing.
        assert!(text.contains("mde_actiond_actions{tracking=\"gave_up\"} 0"));
        assert!(text.contains("mde_actiond_actions_by_status{status=\"TimeOut\"} 0"));
        assert!(text.contains("status=\"Pen\\\"ding\""));
        assert!(text.contains("mde_actiond_detection_lag_seconds_bucket{le=\"5\"} 1"));
        assert!(text.contains("mde_actiond_detection_lag_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("mde_actiond_detection_lag_seconds_count 2"));
        assert!(text.contains("mde_actiond_api_budget_remaining{window=\"minute\"} 97"));
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {family} "))
                    || text.contains(&format!("# TYPE {name} ")),
                "{line}"
            );
        }
    }
}
