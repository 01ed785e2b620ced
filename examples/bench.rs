//! Side-by-side benchmark: mde-actiond against the polling strategies of peer integrations,
//! each against an identical simulated tenant (same seed, same lifecycles, the service's rate
//! limits), with time compressed so hours of action life run in minutes.
//!
//!     cargo run --release --example bench -- --actions 1000 --time-scale 120
//!     cargo run --release --example bench -- --actions 2000 --time-scale 120 --scenario trickle
//!
//! Prints, per strategy: API calls per action, detection lag p50/p95 (from the simulator's
//! true change to the strategy's observation, in simulated seconds), 429s, and for
//! mde-actiond peak RSS, CPU seconds and database size. The daemon runs in a process of its
//! own (this program started again with `--daemon-child`), so its RSS and CPU are its own;
//! the simulated tenant and the peers run in this one. `BENCH_KEEP_DB=1` keeps the daemon's
//! database for a look afterwards; `BENCH_DAEMON_WRAP="heaptrack -o /tmp/ht"` runs the
//! daemon child under a profiler. A peer stopped by `--peer-limit` also gets its lag with
//! the changes it had not seen counted at the stop (lower bounds). See docs/benchmarks.md.
// The benchmark talks to the daemon as its users do; the outbound policy of clippy.toml is
// the daemon's own.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mde_actiond::auth::TokenProvider;
use mde_actiond::domain::{ActionId, ActionStatus, format_time, parse_time};
use mde_actiond::mde::{MdeClient, http_client};
use mde_actiond::sim::{Lifecycle, SimConfig, SimRateLimit, Simulator, settings_for};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Playbook runs in flight at once for the per-action pollers.
const PEER_WORKERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// Every action exists from the start.
    Stampede,
    /// Actions arrive over time (Poisson), with a burst of 500 halfway: an incident.
    Trickle,
    /// Churn: the actions of a stampede, and as many again arriving over `arrive_over`
    /// (Poisson) while the first ones finish: statuses change all the time at that scale.
    Churn,
    /// Arrivals over `arrive_over` (Poisson) whose lives depend on their type, as in a
    /// real tenant: isolations in a minute, quick scans in minutes, investigation
    /// packages in a quarter of an hour, and live response sessions that mostly run at
    /// once but, for a device that is offline, wait in the queue for up to three days.
    Mix,
}

struct Args {
    actions: usize,
    time_scale: f64,
    strategies: Vec<String>,
    seed: u64,
    scenario: Scenario,
    /// Trickle: simulated seconds over which the actions arrive.
    arrive_over: f64,
    /// Overrides of poll.ride_along, poll.max_interval and poll.sweep_interval, in
    /// simulated seconds.
    ride_along: Option<f64>,
    max_interval: Option<f64>,
    sweep_interval: Option<f64>,
    lag_per_call: Option<f64>,
    /// poll.cadence for the daemon.
    cadence: Option<mde_actiond::config::Cadence>,
    no_sweep: bool,
    /// Actions of other tools in the tenant, as a share of the tracked ones.
    untracked: f64,
    /// Wall-clock cap per peer run, in seconds (per-action pollers at 100,000 actions never
    /// finish); a capped run shows how many actions it finished.
    peer_limit: f64,
    /// Instead of the comparison: run the daemon this many seconds against a tenant with no
    /// rate limit and print the checks per second it sustains.
    ceiling: Option<f64>,
    /// Override of poll.sweep_page_size.
    page_size: Option<u32>,
    /// Ceiling: after the window, kill -9 the daemon, start it again on the same database
    /// and time it to healthy and to its first completed sweep.
    restart: bool,
    /// Actions other tools and analysts start while the run goes on, as a share of the
    /// tracked ones, spread evenly over `others_over` simulated seconds.
    others: f64,
    others_over: f64,
    /// Lifecycle durations multiplied by this: 0.1 makes them minutes (pending 0.5-30 s,
    /// running 3 s to 6 min), the churning tenant the round-three issue measured on.
    life_scale: f64,
}

fn parse_args() -> Args {
    let mut args = Args {
        actions: 1000,
        time_scale: 120.0,
        strategies: [
            "mde-actiond",
            "elastic-60s",
            "sentinel-30s",
            "xsoar-10s",
            "splunk-5s",
        ]
        .map(String::from)
        .to_vec(),
        seed: 7,
        scenario: Scenario::Stampede,
        arrive_over: 3600.0,
        ride_along: None,
        max_interval: None,
        sweep_interval: None,
        lag_per_call: None,
        cadence: None,
        no_sweep: false,
        untracked: 0.1,
        ceiling: None,
        page_size: None,
        restart: false,
        peer_limit: 1800.0,
        others: 0.0,
        others_over: 1800.0,
        life_scale: 1.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--actions" => args.actions = value().parse().expect("--actions N"),
            "--time-scale" => args.time_scale = value().parse().expect("--time-scale F"),
            "--strategies" => args.strategies = value().split(',').map(String::from).collect(),
            "--seed" => args.seed = value().parse().expect("--seed N"),
            "--scenario" => {
                args.scenario = match value().as_str() {
                    "stampede" => Scenario::Stampede,
                    "trickle" => Scenario::Trickle,
                    "churn" => Scenario::Churn,
                    "mix" => Scenario::Mix,
                    other => panic!("--scenario stampede|trickle|churn|mix, not {other}"),
                }
            }
            "--arrive-over" => args.arrive_over = value().parse().expect("--arrive-over SECONDS"),
            "--ride-along" => {
                args.ride_along = Some(value().parse().expect("--ride-along SECONDS"))
            }
            "--max-interval" => {
                args.max_interval = Some(value().parse().expect("--max-interval SECONDS"))
            }
            "--sweep-interval" => {
                args.sweep_interval = Some(value().parse().expect("--sweep-interval SECONDS"))
            }
            "--lag-per-call" => {
                args.lag_per_call = Some(value().parse().expect("--lag-per-call SECONDS"))
            }
            "--cadence" => {
                args.cadence = Some(match value().as_str() {
                    "learned" => mde_actiond::config::Cadence::Learned,
                    "observed" => mde_actiond::config::Cadence::Observed,
                    other => panic!("--cadence learned|observed, not {other}"),
                })
            }
            "--no-sweep" => args.no_sweep = true,
            "--untracked" => args.untracked = value().parse().expect("--untracked SHARE"),
            "--peer-limit" => args.peer_limit = value().parse().expect("--peer-limit SECONDS"),
            "--ceiling" => args.ceiling = Some(value().parse().expect("--ceiling SECONDS")),
            "--page-size" => args.page_size = Some(value().parse().expect("--page-size N")),
            "--restart" => args.restart = true,
            "--others" => args.others = value().parse().expect("--others SHARE"),
            "--others-over" => args.others_over = value().parse().expect("--others-over SECONDS"),
            "--life-scale" => args.life_scale = value().parse().expect("--life-scale FACTOR"),
            "--help" | "-h" => {
                println!(
                    "bench [--actions N] [--time-scale F] [--strategies a,b] [--seed N] [--untracked SHARE]\n\
                     \x20     [--scenario stampede|trickle|churn|mix] [--arrive-over S]  (trickle: Poisson arrivals over S, a burst of 500 halfway; churn: N at once and N more over S; mix: arrivals over S, lives by type, some queued for days)\n\
                     \x20     [--life-scale F]  (lifecycle durations times F: 0.1 for lifecycles of minutes)\n\
                     \x20     [--ride-along S] [--max-interval S] [--sweep-interval S] [--lag-per-call S] [--cadence learned|observed] [--no-sweep] [--peer-limit WALL_SECONDS]\n\
                     \x20     [--ceiling WALL_SECONDS] [--page-size N]  (ceiling: no rate limit, checks per second, CPU per sweep)\n\
                     \x20     [--restart]  (ceiling: then kill -9, restart, time to the first completed sweep)\n\
                     \x20     [--others SHARE] [--others-over S]  (actions started elsewhere during the run)\n\
                     strategies: mde-actiond, mde-actiond-discover, elastic-60s, sentinel-30s, xsoar-10s, splunk-5s"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// Real lifecycles, in simulated time: pending seconds to minutes, running minutes to an hour;
/// a tenth are cancelled while pending, some fail or time out.
fn lifecycle(rng: &mut fastrand::Rng, scale: f64) -> Lifecycle {
    let sim = |secs: f64| Duration::from_secs_f64(secs / scale);
    let pending = sim(5.0 + rng.f64() * 300.0);
    let running = sim(30.0 + rng.f64() * rng.f64() * 3600.0);
    match rng.u32(0..100) {
        0..70 => Lifecycle::simple(pending, running, ActionStatus::Succeeded),
        70..82 => Lifecycle::simple(pending, running, ActionStatus::Failed),
        82..90 => Lifecycle::new(vec![
            (Duration::ZERO, ActionStatus::Pending),
            (pending, ActionStatus::Cancelled),
        ]),
        _ => Lifecycle::simple(pending, running * 2, ActionStatus::TimeOut),
    }
}

/// One action of the scenario: when it is created (real time from the start), its life,
/// and whether the strategy is given it to track (the rest belong to other tools).
struct Arrival {
    at: Duration,
    lifecycle: Lifecycle,
    tracked: bool,
    /// The action's type when the scenario chose it (else the tenant picks one).
    kind: Option<&'static str>,
}

/// The `mix` scenario's life of an action of `kind`, in simulated time.
fn typed_lifecycle(rng: &mut fastrand::Rng, kind: &str, scale: f64) -> Lifecycle {
    let sim = |secs: f64| Duration::from_secs_f64(secs / scale);
    let between = |rng: &mut fastrand::Rng, lo: f64, hi: f64| sim(lo + rng.f64() * (hi - lo));
    let (pending, running) = match kind {
        "Isolate" | "Unisolate" | "RestrictCodeExecution" | "UnrestrictCodeExecution" => {
            (between(rng, 5.0, 90.0), between(rng, 5.0, 60.0))
        }
        "RunAntiVirusScan" => (between(rng, 5.0, 120.0), between(rng, 120.0, 1_200.0)),
        "CollectInvestigationPackage" => (between(rng, 10.0, 300.0), between(rng, 300.0, 1_500.0)),
        "StopAndQuarantineFile" => (between(rng, 5.0, 120.0), between(rng, 10.0, 120.0)),
        // LiveResponse: a quarter wait for an offline device, up to the 3-day queue.
        _ if rng.u32(0..4) == 0 => (between(rng, 3_600.0, 259_200.0), between(rng, 30.0, 600.0)),
        _ => (between(rng, 5.0, 60.0), between(rng, 30.0, 600.0)),
    };
    match rng.u32(0..100) {
        0..85 => Lifecycle::simple(pending, running, ActionStatus::Succeeded),
        85..93 => Lifecycle::simple(pending, running, ActionStatus::Failed),
        93..97 => Lifecycle::new(vec![
            (Duration::ZERO, ActionStatus::Pending),
            (pending, ActionStatus::Cancelled),
        ]),
        _ => Lifecycle::simple(pending, running * 2, ActionStatus::TimeOut),
    }
}

/// The `mix` scenario's types, as often as a SOC starts them.
const MIX_TYPES: [(&str, u32); 8] = [
    ("Isolate", 20),
    ("Unisolate", 12),
    ("RunAntiVirusScan", 25),
    ("CollectInvestigationPackage", 10),
    ("LiveResponse", 18),
    ("StopAndQuarantineFile", 7),
    ("RestrictCodeExecution", 4),
    ("UnrestrictCodeExecution", 4),
];

fn mix_type(rng: &mut fastrand::Rng) -> &'static str {
    let total: u32 = MIX_TYPES.iter().map(|(_, w)| w).sum();
    let mut pick = rng.u32(0..total);
    for (kind, weight) in MIX_TYPES {
        if pick < weight {
            return kind;
        }
        pick -= weight;
    }
    MIX_TYPES[0].0
}

/// `n` Poisson arrival times over `over` simulated seconds, pushed to `times`.
fn poisson(
    n: usize,
    over: f64,
    rng: &mut fastrand::Rng,
    tracked: bool,
    times: &mut Vec<(f64, bool)>,
) {
    let gap = over / n.max(1) as f64;
    let mut t = 0.0;
    for _ in 0..n {
        t += -gap * (1.0 - rng.f64()).ln();
        times.push((f64::min(t, over), tracked));
    }
}

/// The same arrivals for every strategy (seeded).
fn arrivals(args: &Args) -> Vec<Arrival> {
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let mut other = fastrand::Rng::with_seed(args.seed ^ 0x5eed);
    let untracked = (args.actions as f64 * args.untracked).round() as usize;
    let real = |secs: f64| Duration::from_secs_f64(secs / args.time_scale);
    // (simulated time of creation, tracked)
    let mut times: Vec<(f64, bool)> = Vec::with_capacity(2 * args.actions + untracked);
    let at_once = |n: usize, tracked: bool, times: &mut Vec<(f64, bool)>| {
        times.extend((0..n).map(|_| (0.0, tracked)));
    };
    match args.scenario {
        Scenario::Stampede => {
            at_once(args.actions, true, &mut times);
            at_once(untracked, false, &mut times);
        }
        Scenario::Churn => {
            at_once(args.actions, true, &mut times);
            poisson(args.actions, args.arrive_over, &mut rng, true, &mut times);
            at_once(untracked, false, &mut times);
        }
        Scenario::Mix => {
            poisson(args.actions, args.arrive_over, &mut rng, true, &mut times);
            poisson(untracked, args.arrive_over, &mut other, false, &mut times);
        }
        Scenario::Trickle => {
            let burst = 500.min(args.actions / 2);
            poisson(
                args.actions - burst,
                args.arrive_over,
                &mut rng,
                true,
                &mut times,
            );
            // The incident: 500 actions within a simulated minute, halfway through.
            let middle = args.arrive_over / 2.0;
            for _ in 0..burst {
                times.push((middle + rng.f64() * 60.0, true));
            }
            poisson(untracked, args.arrive_over, &mut other, false, &mut times);
        }
    }
    // Stable: those created together keep their order, and so their seeded lifecycles.
    times.sort_by(|a, b| a.0.total_cmp(&b.0));
    times
        .into_iter()
        .map(|(t, tracked)| {
            let rng = if tracked { &mut rng } else { &mut other };
            let scale = args.time_scale / args.life_scale;
            let kind = (args.scenario == Scenario::Mix).then(|| mix_type(rng));
            Arrival {
                at: real(t),
                lifecycle: match kind {
                    Some(kind) => typed_lifecycle(rng, kind, scale),
                    None => lifecycle(rng, scale),
                },
                tracked,
                kind,
            }
        })
        .collect()
}

/// Creates the scenario's actions in the tenant at their times and sends the tracked ids
/// out as they appear; the ones due at the start exist when this returns.
fn drive(sim: Arc<Simulator>, plan: Vec<Arrival>) -> mpsc::UnboundedReceiver<Vec<ActionId>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let start = tokio::time::Instant::now();
    let mut plan = plan.into_iter().peekable();
    let create =
        move |until: Duration, plan: &mut std::iter::Peekable<std::vec::IntoIter<Arrival>>| {
            let mut batch = Vec::new();
            while let Some(a) = plan.next_if(|a| a.at <= until) {
                let id = match a.kind {
                    Some(kind) => {
                        let device = (a.at.as_nanos() % 24) as usize;
                        sim.create_action_on(a.lifecycle, kind, device)
                    }
                    None => sim.create_action(a.lifecycle),
                };
                if a.tracked {
                    batch.push(id);
                }
            }
            batch
        };
    let first = create(Duration::ZERO, &mut plan);
    if !first.is_empty() {
        let _ = tx.send(first);
    }
    tokio::spawn(async move {
        while let Some(next) = plan.peek().map(|a| a.at) {
            tokio::time::sleep_until(start + next).await;
            let batch = create(start.elapsed(), &mut plan);
            if !batch.is_empty() && tx.send(batch).is_err() {
                return;
            }
        }
    });
    rx
}

struct Outcome {
    name: String,
    calls: u64,
    rate_limited: u64,
    lags: Vec<f64>,
    finished: usize,
    tracked: usize,
    wall: Duration,
    extra: String,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank - 1]
}

async fn simulator(args: &Args, limited: bool) -> Arc<Simulator> {
    let per = |calls: u32, secs: f64| SimRateLimit {
        calls,
        window: Duration::from_secs_f64(secs / args.time_scale),
    };
    Arc::new(
        Simulator::start(SimConfig {
            // The service's limits per app and tenant, in simulated time.
            rate_limit: limited.then(|| per(100, 60.0)),
            long_rate_limit: limited.then(|| per(1500, 3600.0)),
            fractional_retry_after: true,
            early_retry_grace: Duration::from_millis(20),
            seed: args.seed,
            ..SimConfig::default()
        })
        .await
        .expect("simulator"),
    )
}

/// Lag of each observed change: observation time minus the true change time, in simulated
/// seconds.
fn lag(
    sim: &Simulator,
    id: &ActionId,
    status: &str,
    observed: SystemTime,
    scale: f64,
) -> Option<f64> {
    let truth = sim.truth(id)?;
    let (_, at) = truth.iter().find(|(s, _)| s.as_str() == status)?;
    Some(
        observed
            .duration_since(*at)
            .unwrap_or_default()
            .as_secs_f64()
            * scale,
    )
}

/// The daemon in a process of its own: this program again, with `--daemon-child`.
struct DaemonProcess {
    child: tokio::process::Child,
    pid: u32,
    url: String,
    http: reqwest::Client,
}

impl DaemonProcess {
    async fn spawn(
        s: &mut mde_actiond::config::Settings,
        time_scale: f64,
        dir: &std::path::Path,
    ) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        s.http.listen = Some(format!("127.0.0.1:{port}"));
        let file = dir.join("settings.json");
        std::fs::write(&file, serde_json::to_vec(s).expect("settings")).expect("settings file");
        let exe = std::env::current_exe().expect("exe");
        // BENCH_DAEMON_WRAP runs the daemon under a profiler (`heaptrack`, `valgrind
        // --tool=massif`); the figures read from /proc are then the profiler's.
        let wrap = std::env::var("BENCH_DAEMON_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = tokio::process::Command::new(program);
                c.args(words).arg(&exe);
                c
            }
            None => tokio::process::Command::new(&exe),
        };
        // As the packaged systemd units and the container image run it;
        // BENCH_GLIBC_DEFAULTS=1 measures glibc's default arenas instead.
        if std::env::var_os("BENCH_GLIBC_DEFAULTS").is_none() {
            command
                .env("MALLOC_ARENA_MAX", "2")
                .env("MALLOC_MMAP_THRESHOLD_", "131072");
        }
        let mut child = command
            .arg("--daemon-child")
            .arg(&file)
            .arg(time_scale.to_string())
            .stdin(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("daemon process");
        let pid = child.id().expect("pid");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{url}/healthz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                child.try_wait().expect("wait").is_none(),
                "the daemon process exited"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "the daemon did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            pid,
            url,
            http,
        }
    }

    /// Enqueues through the HTTP intake, as a SOAR would.
    async fn enqueue(&self, ids: &[ActionId]) {
        for chunk in ids.chunks(10_000) {
            let body =
                serde_json::json!({ "ids": chunk.iter().map(|i| i.as_str()).collect::<Vec<_>>() });
            let r = self
                .http
                .post(format!("{}/v1/actions", self.url))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await
                .expect("intake");
            assert!(r.status().is_success(), "intake refused: {}", r.status());
        }
    }

    /// Peak RSS (`VmHWM`, MiB) and CPU seconds (user + system) so far.
    fn usage(&self) -> (u64, f64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let hwm: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
            f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
        });
        (hwm / 1024, ticks / 100.0)
    }

    /// Closes its stdin (it stops as on SIGTERM) and waits for it.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().await.expect("wait");
        assert!(status.success(), "the daemon process ended with {status}");
    }
}

/// `--daemon-child SETTINGS_JSON TIME_SCALE`: the daemon alone, until stdin closes.
async fn daemon_child(file: &str, time_scale: &str) {
    let text = std::fs::read_to_string(file).expect("settings file");
    let mut s: mde_actiond::config::Settings = serde_json::from_str(&text).expect("settings");
    // Serialized settings hide secrets; the simulator's is public.
    s.auth.client_secret = Some(mde_actiond::secret::Secret::new(
        mde_actiond::sim::SIM_CLIENT_SECRET,
    ));
    s.rate_limit.time_scale = time_scale.parse().expect("time scale");
    let daemon = mde_actiond::daemon::Daemon::start(&s)
        .await
        .expect("daemon");
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        stopper.cancel();
    });
    daemon.run_until_stopped(stop).await.expect("daemon run");
}

/// Starts the other tools' actions over time; returns their ids once all exist.
fn others_over_time(args: &Args, sim: Arc<Simulator>) -> tokio::task::JoinHandle<Vec<ActionId>> {
    let n = (args.actions as f64 * args.others).round() as usize;
    let gap = Duration::from_secs_f64(args.others_over / args.time_scale / n.max(1) as f64);
    let scale = args.time_scale;
    let mut rng = fastrand::Rng::with_seed(args.seed ^ 0x07e5);
    tokio::spawn(async move {
        let types = ["Isolate", "RunAntiVirusScan", "CollectInvestigationPackage"];
        let mut ids = Vec::with_capacity(n);
        let mut next = tokio::time::Instant::now();
        for i in 0..n {
            // Poisson arrivals at the mean rate.
            next += gap.mul_f64(-(1.0 - rng.f64()).ln());
            tokio::time::sleep_until(next).await;
            ids.push(sim.create_action_by(
                lifecycle(&mut rng, scale),
                types[i % types.len()],
                i,
                "analyst@contoso.com",
                Duration::ZERO,
            ));
        }
        ids
    })
}

/// The daemon's settings: its defaults, in simulated time.
fn daemon_settings(
    args: &Args,
    sim: &Simulator,
    db: &std::path::Path,
) -> mde_actiond::config::Settings {
    let mut s = settings_for(sim, db);
    let scaled = |secs: f64| Duration::from_secs_f64(secs / args.time_scale);
    let d = mde_actiond::config::Settings::default();
    let p = &d.poll;
    s.poll.initial_interval = scaled(p.initial_interval.as_secs_f64());
    s.poll.max_interval = scaled(args.max_interval.unwrap_or(p.max_interval.as_secs_f64()));
    s.poll.ride_along = scaled(args.ride_along.unwrap_or(p.ride_along.as_secs_f64()));
    s.poll.sweep_interval = scaled(
        args.sweep_interval
            .unwrap_or(p.sweep_interval.as_secs_f64()),
    );
    if args.no_sweep {
        s.poll.sweep = mde_actiond::config::SweepMode::Off;
    }
    if let Some(n) = args.page_size {
        s.poll.sweep_page_size = n;
    }
    s.poll.not_found_after = scaled(d.poll.not_found_after.as_secs_f64());
    s.poll.lag_per_call = scaled(args.lag_per_call.unwrap_or(p.lag_per_call.as_secs_f64()));
    s.poll.young_for = scaled(p.young_for.as_secs_f64());
    if let Some(c) = args.cadence {
        s.poll.cadence = c;
    }
    s.api.timeout = Duration::from_secs(30);
    s.rate_limit = d.rate_limit.clone();
    s.database.checkpoint_interval = Duration::from_secs(1);
    s
}

async fn run_ours(args: &Args, discover: bool) -> Outcome {
    let sim = simulator(args, true).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("bench.db");
    let mut s = daemon_settings(args, &sim, &db);
    if discover {
        s.poll.discover = mde_actiond::config::DiscoverMode::All;
        // Nothing to backfill: the tenant's history starts with the run.
        s.poll.discover_since = Duration::from_secs_f64(3600.0 / args.time_scale);
    }
    let daemon = DaemonProcess::spawn(&mut s, 1.0 / args.time_scale, dir.path()).await;
    let store = mde_actiond::store::Store::open(&db, mde_actiond::store::OpenMode::ReadOnly)
        .await
        .expect("reader");
    let started = tokio::time::Instant::now();
    // The peers stop after `peer_limit`: the changes made by then are the ones to set
    // beside theirs.
    let peers_stop = SystemTime::now() + Duration::from_secs_f64(args.peer_limit);
    let mut arriving = drive(sim.clone(), arrivals(args));
    let mut creator = Some(others_over_time(args, sim.clone()));
    let mut ids = Vec::new();
    let mut others = None;
    loop {
        // Ids go to the daemon the moment they exist; the rest of the time, a cheap count
        // now and then: the harness must not compete with the daemon.
        match tokio::time::timeout(Duration::from_millis(500), arriving.recv()).await {
            Ok(Some(mut batch)) => {
                // What arrived while the last request was in flight goes in one request, as
                // a queue consumer would send it: one request per arrival would make the
                // harness, not the daemon, the bottleneck of a burst (500 arrivals in half
                // a second of compressed time).
                while let Ok(more) = arriving.try_recv() {
                    batch.extend(more);
                }
                daemon.enqueue(&batch).await;
                ids.extend(batch);
                continue;
            }
            Ok(None) if creator.as_ref().is_some_and(|c| c.is_finished()) => {
                let done = creator.take().expect("creator");
                others = Some(done.await.expect("creator"));
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(500)).await,
            Err(_) => continue,
        }
        let Some(others) = &others else { continue };
        let counts = store.counts().await.expect("count");
        let all_there = !discover || counts.total() >= (ids.len() + others.len()) as i64;
        if all_there && counts.tracking(mde_actiond::domain::Tracking::Active) == 0 {
            break;
        }
    }
    let others = others.unwrap_or_default();
    let wall = started.elapsed();
    let (peak_mib, cpu) = daemon.usage();
    daemon.stop().await;
    let mut lags = Vec::new();
    let mut early = Vec::new();
    let mut finished = 0;
    let mut recorded = 0u64;
    for id in &ids {
        for t in store.transitions(id).await.expect("transitions") {
            recorded += 1;
            let Some(observed) = parse_time(&t.observed_at) else {
                continue;
            };
            if let Some(l) = lag(&sim, id, &t.to_status, observed, args.time_scale) {
                lags.push(l);
                let changed = observed - Duration::from_secs_f64(l / args.time_scale);
                if changed <= peers_stop {
                    early.push(l);
                }
            }
        }
        if store
            .action(id)
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.tracking == "done")
        {
            finished += 1;
        }
    }
    // How long after its creation each action started elsewhere was tracked.
    let mut within = Vec::new();
    for id in &others {
        let (Some(row), Some(truth)) = (store.action(id).await.ok().flatten(), sim.truth(id))
        else {
            continue;
        };
        if let Some(at) = parse_time(&row.enqueued_at) {
            within.push(
                at.duration_since(truth[0].1)
                    .unwrap_or_default()
                    .as_secs_f64()
                    * args.time_scale,
            );
        }
    }
    within.sort_by(f64::total_cmp);
    let stats = sim.stats();
    let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    if std::env::var_os("BENCH_KEEP_DB").is_some() {
        // For a look at the run afterwards (sweeps, api_calls, transitions).
        eprintln!("database kept at {}", dir.keep().join("bench.db").display());
    }
    let tracked_all = ids.len() + within.len();
    let sweeps = store.sweeps(u32::MAX).await.expect("sweeps");
    let pages: i64 = sweeps.iter().map(|s| s.pages).sum();
    let sweeping = format!(
        "; {} sweeps, {:.2} pages each",
        sweeps.len(),
        pages as f64 / sweeps.len().max(1) as f64
    );
    early.sort_by(f64::total_cmp);
    let window = if wall.as_secs_f64() > args.peer_limit {
        format!(
            "; the changes of the peers' first {:.0} s wall: lag p50 {:.0} s, p95 {:.0} s",
            args.peer_limit,
            percentile(&early, 0.5),
            percentile(&early, 0.95)
        )
    } else {
        String::new()
    };
    let discovery = if others.is_empty() {
        String::new()
    } else {
        format!(
            "; {} actions started elsewhere during the run, {} tracked, discovered within p50 {:.0}s p95 {:.0}s; API calls per tracked action {:.3}",
            others.len(),
            within.len(),
            percentile(&within, 0.5),
            percentile(&within, 0.95),
            stats.api_calls as f64 / tracked_all as f64
        )
    };
    Outcome {
        name: if discover {
            "mde-actiond (poll.discover = \"all\")".into()
        } else {
            "mde-actiond (defaults)".into()
        },
        calls: stats.api_calls,
        rate_limited: stats.rate_limited,
        lags,
        finished,
        tracked: ids.len(),
        wall,
        extra: format!(
            "daemon process: peak RSS {peak_mib} MiB, CPU {cpu:.1}s ({} us per recorded transition, {recorded} recorded); database {} KiB, early retries after 429: {}{sweeping}{window}{discovery}",
            (cpu * 1e6 / recorded.max(1) as f64).round(),
            size / 1024,
            stats.early_retries
        ),
    }
}

/// A peer: polls every `interval` (simulated), one GET per pending action, or one list call
/// for all pending actions (`batched`), ignoring Retry-After as playbooks do.
async fn run_peer(args: &Args, name: &str, interval_secs: f64, batched: bool) -> Outcome {
    let sim = simulator(args, true).await;
    let s = settings_for(&sim, std::path::Path::new("/nonexistent"));
    let http = http_client(Duration::from_secs(10), Duration::from_secs(5)).expect("http");
    let tokens = Arc::new(TokenProvider::new(
        mde_actiond::auth::build_source(&s, http.clone()).expect("token source"),
    ));
    let client = MdeClient::new(http, &s.api_base_url());
    let interval = Duration::from_secs_f64(interval_secs / args.time_scale);
    let mut seen: HashMap<ActionId, String> = HashMap::new();
    let mut lags = Vec::new();
    let mut arriving = drive(sim.clone(), arrivals(args));
    let mut pending: Vec<ActionId> = Vec::new();
    let mut tracked = 0;
    let mut more = true;
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while more || !pending.is_empty() {
        tick.tick().await;
        // A playbook starts polling for an action when it created it.
        loop {
            match arriving.try_recv() {
                Ok(batch) => {
                    tracked += batch.len();
                    pending.extend(batch);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    more = false;
                    break;
                }
            }
        }
        if pending.is_empty() {
            continue;
        }
        let token = match tokens.token().await {
            Ok(t) => t,
            Err(_) => continue,
        };
        let mut observed: Vec<(ActionId, String)> = Vec::new();
        if batched {
            for chunk in pending.chunks(100) {
                if let Ok(answer) = client.list_actions(&token, chunk).await {
                    observed.extend(
                        answer
                            .actions
                            .into_values()
                            .map(|a| (a.id, a.status.as_str().to_string())),
                    );
                }
            }
        } else {
            use futures_util::StreamExt;
            let calls = pending.iter().map(|id| {
                let client = client.clone();
                let token = token.clone();
                let id = id.clone();
                async move { (id.clone(), client.get_action(&token, &id).await) }
            });
            // A SOAR engine runs its playbooks on a worker pool, not all at once.
            let results: Vec<_> = futures_util::stream::iter(calls)
                .buffer_unordered(PEER_WORKERS)
                .collect()
                .await;
            for (id, result) in results {
                // Errors and 429s alike: try again at the next tick, as playbooks do.
                if let Ok(a) = result {
                    observed.push((id, a.status.as_str().to_string()));
                }
            }
        }
        let now = SystemTime::now();
        for (id, status) in observed {
            if seen.get(&id) != Some(&status) {
                if let Some(l) = lag(&sim, &id, &status, now, args.time_scale) {
                    lags.push(l);
                }
                seen.insert(id, status);
            }
        }
        pending.retain(|id| {
            !seen
                .get(id)
                .is_some_and(|s| ActionStatus::parse(s).is_terminal())
        });
        if started.elapsed() > Duration::from_secs_f64(args.peer_limit) {
            break;
        }
    }
    let stats = sim.stats();
    let extra = if pending.is_empty() {
        String::new()
    } else {
        censored(
            &sim,
            &pending,
            &seen,
            &lags,
            started.elapsed(),
            args.time_scale,
        )
    };
    Outcome {
        name: name.into(),
        calls: stats.api_calls,
        rate_limited: stats.rate_limited,
        lags,
        finished: tracked - pending.len(),
        tracked,
        wall: started.elapsed(),
        extra,
    }
}

/// A peer stopped before the end has seen only its quickest changes, so its lag figures
/// flatter it. Changes that had happened by the stop but were not seen wait at least until
/// the stop: counting them there gives percentiles that are lower bounds of the truth.
fn censored(
    sim: &Simulator,
    pending: &[ActionId],
    seen: &HashMap<ActionId, String>,
    lags: &[f64],
    wall: Duration,
    scale: f64,
) -> String {
    let now = SystemTime::now();
    let mut all = lags.to_vec();
    let mut unseen = 0;
    for id in pending {
        let Some(truth) = sim.truth(id) else { continue };
        let after = seen
            .get(id)
            .and_then(|s| truth.iter().position(|(t, _)| t.as_str() == s.as_str()))
            .map_or(0, |i| i + 1);
        for (_, at) in &truth[after..] {
            if let Ok(waited) = now.duration_since(*at) {
                unseen += 1;
                all.push(waited.as_secs_f64() * scale);
            }
        }
    }
    all.sort_by(f64::total_cmp);
    format!(
        "stopped at {:.0} s wall; {unseen} changes had happened unseen; counted at the stop (lower bounds): lag p50 {:.0} s, p95 {:.0} s",
        wall.as_secs_f64(),
        percentile(&all, 0.5),
        percentile(&all, 0.95)
    )
}

/// The daemon's own ceiling: no rate limit anywhere, actions that stay unfinished, sweeps
/// back to back (or passes by id with `--no-sweep`); checks per second and CPU per sweep,
/// counted from the third sweep on (the first writes every row once).
async fn run_ceiling(args: &Args, secs: f64) {
    let sim = simulator(args, false).await;
    let ids: Vec<ActionId> = (0..args.actions)
        .map(|_| {
            sim.create_action(Lifecycle::simple(
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
                ActionStatus::Succeeded,
            ))
        })
        .collect();
    for _ in 0..(args.actions as f64 * args.untracked).round() as usize {
        sim.create_action(Lifecycle::simple(
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
            ActionStatus::Succeeded,
        ));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("ceiling.db");
    let mut s = settings_for(&sim, &db);
    s.rate_limit.per_minute = u32::MAX / 2;
    s.rate_limit.per_hour = u32::MAX / 2;
    s.poll.sweep_interval = Duration::from_millis(1);
    if args.no_sweep {
        s.poll.sweep = mde_actiond::config::SweepMode::Off;
        s.poll.initial_interval = Duration::from_millis(100);
        s.poll.max_interval = Duration::from_millis(500);
        s.poll.ride_along = Duration::from_millis(500);
    } else {
        // The defaults: what a sweep writes is what changed, not safety nets that a
        // compressed schedule would make due every sweep.
        let d = mde_actiond::config::Settings::default().poll;
        s.poll.initial_interval = d.initial_interval;
        s.poll.max_interval = d.max_interval;
        s.poll.ride_along = d.ride_along;
    }
    if let Some(n) = args.page_size {
        s.poll.sweep_page_size = n;
    }
    let daemon = DaemonProcess::spawn(&mut s, 1.0, dir.path()).await;
    let store = mde_actiond::store::Store::open(&db, mde_actiond::store::OpenMode::ReadOnly)
        .await
        .expect("reader");
    let complete = |store: mde_actiond::store::Store| async move {
        store
            .sweeps(u32::MAX)
            .await
            .expect("sweeps")
            .iter()
            .filter(|s| s.outcome.as_deref() == Some("complete"))
            .count()
    };
    daemon.enqueue(&ids).await;
    let checks_now = || async {
        let text = reqwest::get(format!("{}/metrics", daemon.url))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix("mde_actiond_checks_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // From the third sweep on (with sweeps) or at once (passes by id).
    let warm = if args.no_sweep || args.actions == 0 {
        0
    } else {
        2
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs * 4.0 + 60.0);
    while complete(store.clone()).await < warm && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // CPU per sweep is read between sweep completions (to within a 20 ms look), so that
    // neither a sweep in flight at the window's end nor the rest of the warm-up's writes
    // count: a 15 s window holds only a dozen sweeps.
    let next_sweep = |after: usize| {
        let store = store.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let n = complete(store.clone()).await;
                if n > after || tokio::time::Instant::now() > deadline {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let mut sweeps0 = complete(store.clone()).await;
    if sweeps0 > 0 {
        sweeps0 = next_sweep(sweeps0).await;
    }
    let (_, cpu0) = daemon.usage();
    let checks0 = checks_now().await;
    let started = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let checks = checks_now().await - checks0;
    let wall = started.elapsed().as_secs_f64();
    let (mut peak, mut cpu1) = daemon.usage();
    let mut sweeps = complete(store.clone()).await;
    if sweeps > sweeps0 {
        sweeps = next_sweep(sweeps).await;
        (peak, cpu1) = daemon.usage();
    }
    let sweeps = sweeps - sweeps0;
    let cpu = cpu1 - cpu0;
    let restart = if args.restart {
        // What a crash leaves: a sweep in flight, a WAL not checkpointed, no goodbye.
        let mut daemon = daemon;
        daemon.child.start_kill().expect("kill -9");
        daemon.child.wait().await.expect("wait");
        let done = complete(store.clone()).await;
        let started = tokio::time::Instant::now();
        let daemon = DaemonProcess::spawn(&mut s, 1.0, dir.path()).await;
        let healthy = started.elapsed().as_secs_f64();
        let swept = next_sweep(done).await;
        let first_sweep = started.elapsed().as_secs_f64();
        let (peak, _) = daemon.usage();
        daemon.stop().await;
        Some((healthy, first_sweep, swept > done, peak))
    } else {
        daemon.stop().await;
        None
    };
    let stats = sim.stats();
    println!(
        "| {} | {} | {:.0} | {} | {:.1} | {:.1} | {} | {} |",
        if args.no_sweep {
            "passes by id".to_string()
        } else {
            format!("sweeps, pages of {}", s.poll.sweep_page_size)
        },
        args.actions,
        checks / wall,
        stats.api_calls,
        wall,
        cpu,
        if sweeps > 0 {
            format!("{:.2} ({sweeps} sweeps)", cpu / sweeps as f64)
        } else {
            "-".into()
        },
        peak,
    );
    if let Some((healthy, first_sweep, swept, peak)) = restart {
        println!(
            "\nkill -9 with {} active, then restart on the same database: healthy (`/healthz`) in {healthy:.2} s, {} in {first_sweep:.2} s; peak RSS after restart {peak} MiB",
            args.actions,
            if swept {
                "first completed sweep"
            } else {
                "no sweep completed within 120 s; waited"
            },
        );
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    if argv.get(1).map(String::as_str) == Some("--daemon-child") {
        runtime.block_on(daemon_child(&argv[2], &argv[3]));
        return;
    }
    runtime.block_on(compare(parse_args()));
}

async fn compare(args: Args) {
    println!(
        "{} actions ({:?}, lifecycles x{}), time compressed {}x (1 s here = {} s simulated), tenant limits 100/min and 1500/h; seed {}\n",
        args.actions, args.scenario, args.life_scale, args.time_scale, args.time_scale, args.seed
    );
    if let Some(secs) = args.ceiling {
        println!(
            "| mode | actions | checks/s | API calls | wall (s) | daemon CPU (s) | CPU per sweep (s) | daemon peak RSS (MiB) |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        run_ceiling(&args, secs).await;
        return;
    }
    let mut results = Vec::new();
    for strategy in &args.strategies {
        let outcome = match strategy.as_str() {
            "mde-actiond" => run_ours(&args, false).await,
            "mde-actiond-discover" => run_ours(&args, true).await,
            "elastic-60s" => run_peer(&args, "Elastic (list call every 60 s)", 60.0, true).await,
            "sentinel-30s" => {
                run_peer(&args, "Sentinel playbook (GET every 30 s)", 30.0, false).await
            }
            "xsoar-10s" => run_peer(&args, "XSOAR (GET every 10 s)", 10.0, false).await,
            "splunk-5s" => run_peer(&args, "Splunk SOAR (GET every 5 s)", 5.0, false).await,
            other => panic!("unknown strategy {other}"),
        };
        eprintln!(
            "{} done in {:.1}s",
            outcome.name,
            outcome.wall.as_secs_f64()
        );
        results.push(outcome);
    }
    println!(
        "| strategy | finished | API calls per action | lag p50 (s) | lag p95 (s) | 429s | notes |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    for mut r in results {
        r.lags.sort_by(f64::total_cmp);
        println!(
            "| {} | {}/{} | {:.3} | {:.1} | {:.1} | {} | {} |",
            r.name,
            r.finished,
            r.tracked,
            r.calls as f64 / r.tracked.max(1) as f64,
            percentile(&r.lags, 0.5),
            percentile(&r.lags, 0.95),
            r.rate_limited,
            r.extra
        );
    }
    println!("\nrun at {}", format_time(SystemTime::now()));
}
