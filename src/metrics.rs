//! Counters, gauges and histograms of the running daemon, exposed in the Prometheus text
//! format (0.0.4) by the Prometheus project's `prometheus-client` crate.
//!
//! What the code counts lives here (counters, histograms, and the labelled counts whose
//! label sets we bound ourselves); what is read at scrape time from elsewhere (the
//! database, the budget, the token cache) comes in a `Snapshot`. `render` puts both in a
//! registry for that scrape and lets the crate write the text.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// Seconds-scale buckets for latencies of database writes, passes and sweeps.
const FAST_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Buckets for the lag from MDE's change to our observation (seconds to hours).
const LAG_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
];

/// A histogram of durations, in seconds.
#[derive(Debug, Clone)]
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self(prometheus_client::metrics::histogram::Histogram::new(
            bounds.iter().copied(),
        ))
    }

    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// Label pairs of one sample.
type Labels = Vec<(&'static str, String)>;

/// Everything the poll loop counts. Shared by the loop, the HTTP listener and systemd status.
#[derive(Debug)]
pub struct Metrics {
    /// Passes over due actions that polled something.
    pub passes: Counter,
    /// Actions checked (one answer about one tracked action, by id or in a sweep).
    pub checks: Counter,
    sweeps_by_filter: Mutex<BTreeMap<&'static str, u64>>,
    pub sweep_pages: Counter,
    /// Milliseconds; 0 when not measured yet.
    check_interval_ms: AtomicU64,
    /// Milliseconds; 0 while sweeps are not in use.
    sweep_interval_ms: AtomicU64,
    pub pass_seconds: Histogram,
    pub api_calls: Counter,
    pub transitions: Counter,
    pub finished: Counter,
    pub rate_limited: Counter,
    pub errors: Counter,
    calls_by_outcome: Mutex<BTreeMap<(&'static str, String), u64>>,
    pub sweep_seconds: Histogram,
    pub detection_lag: Histogram,
    pub db_write_seconds: Histogram,
    last_error: Mutex<Option<(String, SystemTime)>>,
    /// Actions that had ended `not_found` and showed up in a listing later.
    pub revived: Counter,
    /// Times the wall clock was seen stepping back (next polls were moved back with it).
    pub clock_steps_back: Counter,
    /// 404s that were not the API's (HTML or empty body, or to a list call).
    pub not_api_answers: Counter,
    /// Status and type values this version does not know, by field and value.
    unknown_values: Mutex<BTreeMap<(&'static str, String), u64>>,
    /// What keeps the daemon from doing its job right now, by kind, until it clears:
    /// `/readyz` lists these and a gauge shows each.
    blockers: Mutex<BTreeMap<Blocker, String>>,
    /// Actions sweeps started tracking because nobody had enqueued them.
    pub discovered: Counter,
    /// While the discovery backfill runs: how far it got, for `systemctl status`.
    backfill: Mutex<Option<String>>,
    /// Notification attempts by destination and outcome (delivered, retry, dead, gone).
    deliveries: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// 3xx answers of the API, never followed.
    pub redirects_refused: Counter,
    /// Panics caught, by the task that panicked (one of `PANIC_TASKS`).
    panics: Mutex<BTreeMap<&'static str, u64>>,
}

/// What `count_delivery` counts.
pub const DELIVERY_OUTCOMES: [&str; 4] = ["delivered", "retry", "dead", "gone"];

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
            passes: Counter::default(),
            checks: Counter::default(),
            sweeps_by_filter: Mutex::new(BTreeMap::new()),
            sweep_pages: Counter::default(),
            check_interval_ms: AtomicU64::new(0),
            sweep_interval_ms: AtomicU64::new(0),
            pass_seconds: Histogram::new(FAST_BUCKETS),
            api_calls: Counter::default(),
            transitions: Counter::default(),
            finished: Counter::default(),
            rate_limited: Counter::default(),
            errors: Counter::default(),
            calls_by_outcome: Mutex::new(BTreeMap::new()),
            sweep_seconds: Histogram::new(FAST_BUCKETS),
            detection_lag: Histogram::new(LAG_BUCKETS),
            db_write_seconds: Histogram::new(FAST_BUCKETS),
            last_error: Mutex::new(None),
            revived: Counter::default(),
            clock_steps_back: Counter::default(),
            not_api_answers: Counter::default(),
            unknown_values: Mutex::new(BTreeMap::new()),
            blockers: Mutex::new(BTreeMap::new()),
            deliveries: Mutex::new(BTreeMap::new()),
            discovered: Counter::default(),
            backfill: Mutex::new(None),
            redirects_refused: Counter::default(),
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
        self.sweep_pages.inc_by(u64::from(pages));
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

    /// The exposition for one scrape. (The registry ends each help text with its period.)
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut r = Registry::default();
        self.register_counters(&mut r);
        self.register_polling(&mut r);
        register_snapshot(&mut r, snap);
        self.register_labelled(&mut r, snap);
        register_notify(&mut r, snap);
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &r);
        out
    }

    /// The plain counters and the histograms: live, shared with the registry.
    fn register_counters(&self, r: &mut Registry) {
        let counters = [
            (
                "mde_actiond_rate_limited",
                "429 answers from MDE",
                &self.rate_limited,
            ),
            (
                "mde_actiond_redirects_refused",
                "API answers that were redirects (3xx), never followed",
                &self.redirects_refused,
            ),
            (
                "mde_actiond_transitions",
                "Status transitions recorded",
                &self.transitions,
            ),
            (
                "mde_actiond_finished",
                "Actions whose tracking ended",
                &self.finished,
            ),
            (
                "mde_actiond_poll_errors",
                "Failed polls (each counts for its actions)",
                &self.errors,
            ),
            (
                "mde_actiond_passes",
                "Passes over due actions that polled something",
                &self.passes,
            ),
            (
                "mde_actiond_sweep_pages",
                "Pages (API calls) of sweeps",
                &self.sweep_pages,
            ),
            (
                "mde_actiond_checks",
                "Answers about one tracked action (by id or in a sweep)",
                &self.checks,
            ),
            (
                "mde_actiond_revived",
                "Actions that had ended not_found and showed up in a listing later",
                &self.revived,
            ),
            (
                "mde_actiond_clock_steps_back",
                "Times the wall clock stepped back by more than 2s; next polls moved back with it",
                &self.clock_steps_back,
            ),
            (
                "mde_actiond_not_api_answers",
                "404 answers that did not come from the MDE API (HTML or empty body): check api.base_url",
                &self.not_api_answers,
            ),
            (
                "mde_actiond_discovered",
                "Actions sweeps started tracking because nobody had enqueued them (poll.discover)",
                &self.discovered,
            ),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        self.register_histograms(r);
    }

    fn register_histograms(&self, r: &mut Registry) {
        let histograms = [
            (
                "mde_actiond_pass_duration_seconds",
                "Time to poll and record one pass over due actions",
                &self.pass_seconds,
            ),
            (
                "mde_actiond_sweep_duration_seconds",
                "Time to list and record one sweep",
                &self.sweep_seconds,
            ),
            (
                "mde_actiond_detection_lag_seconds",
                "From MDE's lastUpdateDateTimeUtc to our observation of the change",
                &self.detection_lag,
            ),
            (
                "mde_actiond_db_write_seconds",
                "Time to commit one batch of poll results",
                &self.db_write_seconds,
            ),
        ];
        for (name, help, h) in histograms {
            r.register(name, help, h.0.clone());
        }
    }

    /// What the loop plans and what stands in its way.
    fn register_polling(&self, r: &mut Registry) {
        let secs = |ms: &AtomicU64| ConstGauge::new(ms.load(Ordering::Relaxed) as f64 / 1000.0);
        r.register(
            "mde_actiond_check_interval_seconds",
            "Effective time between two checks of one tracked action over the last minute (0: not measured yet)",
            secs(&self.check_interval_ms),
        );
        r.register(
            "mde_actiond_sweep_interval_seconds",
            "Planned time between sweeps: poll.sweep_interval or longer when the budget is short (0: no sweeps)",
            secs(&self.sweep_interval_ms),
        );
        r.register(
            "mde_actiond_api_forbidden",
            "1 while MDE refuses the app (403: a missing application role)",
            ConstGauge::new(i64::from(self.blocker(Blocker::ApiForbidden).is_some())),
        );
        let blocked = Family::<Labels, Gauge>::default();
        for kind in Blocker::ALL {
            blocked
                .get_or_create(&vec![("reason", kind.as_str().to_string())])
                .set(i64::from(self.blocker(kind).is_some()));
        }
        r.register(
            "mde_actiond_blocked",
            "1 while this keeps the daemon from working (see /readyz for why)",
            blocked,
        );
    }

    /// The counts kept by label in our own maps (their label sets are bounded here).
    fn register_labelled(&self, r: &mut Registry, snap: &Snapshot) {
        let calls = counters(
            self.calls_by_outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|((endpoint, code), n)| {
                    (
                        vec![("endpoint", endpoint.to_string()), ("code", code.clone())],
                        *n,
                    )
                }),
        );
        r.register(
            "mde_actiond_api_calls",
            "MDE API calls by endpoint and HTTP status (none: no answer)",
            calls,
        );
        // Token source panics are caught by the token cache, which counts them itself.
        let panics = counters(PANIC_TASKS.iter().map(|task| {
            let token = if *task == "token" {
                snap.token_panics
            } else {
                0
            };
            (vec![("task", task.to_string())], self.panics(task) + token)
        }));
        r.register(
            "mde_actiond_panics",
            "Panics caught and contained, by task (the task backs off and goes on)",
            panics,
        );
        let sweeps = counters(
            self.sweeps_by_filter
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(filter, n)| (vec![("filter", filter.to_string())], *n)),
        );
        r.register(
            "mde_actiond_sweeps",
            "Tenant-wide listings, by filter form",
            sweeps,
        );
        let unknown = counters(
            self.unknown_values
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|((field, value), n)| {
                    (
                        vec![("field", field.to_string()), ("value", value.clone())],
                        *n,
                    )
                }),
        );
        r.register(
            "mde_actiond_unknown_values",
            "Answers carrying a status or type this version does not know (kept verbatim)",
            unknown,
        );
        // Each destination's outcomes from the start, at 0: a series that appears only
        // with its first failure leaves a rate() alert blind to it.
        let deliveries = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        let zeros = snap
            .notify
            .iter()
            .flat_map(|n| DELIVERY_OUTCOMES.map(|o| ((n.destination.clone(), o), 0)));
        let counted = deliveries.iter().map(|((d, o), n)| ((d.clone(), *o), *n));
        let deliveries = counters(
            zeros
                .chain(counted)
                .map(|((d, o), n)| (vec![("destination", d), ("outcome", o.to_string())], n)),
        );
        r.register(
            "mde_actiond_notify_deliveries",
            "Notification attempts by destination and outcome (delivered, retry, dead, gone)",
            deliveries,
        );
    }
}

/// A family of counters from (labels, count) pairs; a pair seen twice adds up.
fn counters(rows: impl IntoIterator<Item = (Labels, u64)>) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    for (labels, n) in rows {
        family.get_or_create(&labels).inc_by(n);
    }
    family
}

/// A family of gauges from (label value, value) pairs.
fn gauges(
    label: &'static str,
    rows: impl IntoIterator<Item = (String, i64)>,
) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    for (v, n) in rows {
        family.get_or_create(&vec![(label, v)]).set(n);
    }
    family
}

/// Whole seconds, as the gauges of ages and limits have always been shown.
fn whole_seconds(s: f64) -> ConstGauge {
    ConstGauge::new(s.round() as i64)
}

/// What the scrape read from the database, the budget and the token cache.
fn register_snapshot(r: &mut Registry, snap: &Snapshot) {
    // Every known label value is exported, 0 included: a series that vanishes at zero
    // leaves alerts and dashboards with gaps instead of a 0.
    let tracking = with_known(
        &snap.by_tracking,
        crate::domain::Tracking::ALL.iter().map(|t| t.as_str()),
    );
    r.register(
        "mde_actiond_actions",
        "Tracked actions by tracking state",
        gauges("tracking", tracking),
    );
    let status = with_known(
        &snap.by_status,
        crate::domain::ActionStatus::KNOWN
            .iter()
            .map(|s| s.as_str()),
    );
    r.register(
        "mde_actiond_actions_by_status",
        "Tracked actions by last MDE status",
        gauges("status", status),
    );
    r.register(
        "mde_actiond_rate_limit_paused_seconds",
        "Time all calls were held back by Retry-After",
        ConstCounter::new(snap.paused_seconds_total),
    );
    r.register(
        "mde_actiond_rate_limit_paused",
        "1 while a Retry-After is in force",
        ConstGauge::new(i64::from(snap.paused_now)),
    );
    let budget = [
        ("minute".to_string(), i64::from(snap.budget_minute)),
        ("hour".to_string(), i64::from(snap.budget_hour)),
    ];
    r.register(
        "mde_actiond_api_budget_remaining",
        "API calls left in the current window",
        gauges("window", budget),
    );
    register_tokens(r, snap);
    r.register(
        "mde_actiond_up_seconds",
        "Seconds since the daemon started",
        whole_seconds(snap.up_seconds),
    );
    r.register(
        "mde_actiond_ready",
        "1 when /readyz would answer 200 (its database lock probe aside)",
        ConstGauge::new(i64::from(snap.ready)),
    );
    r.register(
        "mde_actiond_seconds_since_progress",
        "Seconds since the poll loop last showed progress",
        whole_seconds(snap.since_progress_seconds),
    );
    r.register(
        "mde_actiond_stall_limit_seconds",
        "poll.stall_after: beyond it /healthz fails and the watchdog is not fed",
        whole_seconds(snap.stall_limit_seconds),
    );
    r.register(
        "mde_actiond_oldest_active_seconds",
        "Age of the oldest active action since MDE created it (0 when none)",
        whole_seconds(snap.oldest_active_seconds),
    );
    r.register(
        "mde_actiond_stuck_actions",
        "Active actions older than report.stuck_after",
        ConstGauge::new(snap.stuck),
    );
}

/// The token cache's counts.
fn register_tokens(r: &mut Registry, snap: &Snapshot) {
    r.register(
        "mde_actiond_token_refreshes",
        "Access tokens obtained",
        ConstCounter::new(snap.token_refreshes),
    );
    r.register(
        "mde_actiond_token_failures",
        "Failed token requests",
        ConstCounter::new(snap.token_failures),
    );
    let causes = counters(
        snap.token_failures_by_cause
            .iter()
            .map(|(cause, n)| (vec![("cause", cause.to_string())], *n)),
    );
    r.register(
        "mde_actiond_token_failures_by_cause",
        "Failed token requests by cause (refused, transient, local, redirected, invalid_answer, panic)",
        causes,
    );
}

/// The destinations' standing, as the scrape read it.
fn register_notify(r: &mut Registry, snap: &Snapshot) {
    let per = |f: fn(&NotifySnapshot) -> i64| {
        gauges(
            "destination",
            snap.notify.iter().map(|n| (n.destination.clone(), f(n))),
        )
    };
    r.register(
        "mde_actiond_notify_pending",
        "Notification deliveries not yet delivered or dead, by destination",
        per(|n| n.pending),
    );
    r.register(
        "mde_actiond_notify_oldest_pending_seconds",
        "Age of the oldest pending notification event, by destination (0 when none)",
        per(|n| n.oldest_pending_seconds.round() as i64),
    );
    r.register(
        "mde_actiond_notify_disabled",
        "1 while a destination is disabled (410 Gone, or failing for notify.disable_after)",
        per(|n| i64::from(n.disabled)),
    );
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
