//! Side-by-side benchmark: mde-actiond against the polling strategies of peer integrations,
//! each against an identical simulated tenant (same seed, same lifecycles, the service's rate
//! limits), with time compressed so hours of action life run in minutes.
//!
//!     cargo run --release --example bench -- --actions 1000 --time-scale 120
//!
//! Prints, per strategy: API calls per action, detection lag p50/p95 (from the simulator's
//! true change to the strategy's observation, in simulated seconds), 429s, and for
//! mde-actiond peak RSS, CPU seconds and database size. See docs/benchmarks.md.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mde_actiond::auth::TokenProvider;
use mde_actiond::domain::{ActionId, ActionStatus, format_time, parse_time};
use mde_actiond::mde::{MdeClient, http_client};
use mde_actiond::sim::{Lifecycle, SimConfig, SimRateLimit, Simulator, settings_for};
use tokio_util::sync::CancellationToken;

/// Playbook runs in flight at once for the per-action pollers.
const PEER_WORKERS: usize = 64;

struct Args {
    actions: usize,
    time_scale: f64,
    strategies: Vec<String>,
    seed: u64,
    /// Overrides of poll.ride_along, poll.max_interval and poll.sweep_interval, in
    /// simulated seconds.
    ride_along: Option<f64>,
    max_interval: Option<f64>,
    sweep_interval: Option<f64>,
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
    /// Actions other tools and analysts start while the run goes on, as a share of the
    /// tracked ones, spread evenly over `others_over` simulated seconds.
    others: f64,
    others_over: f64,
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
        ride_along: None,
        max_interval: None,
        sweep_interval: None,
        no_sweep: false,
        untracked: 0.1,
        ceiling: None,
        page_size: None,
        peer_limit: 1800.0,
        others: 0.0,
        others_over: 1800.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--actions" => args.actions = value().parse().expect("--actions N"),
            "--time-scale" => args.time_scale = value().parse().expect("--time-scale F"),
            "--strategies" => args.strategies = value().split(',').map(String::from).collect(),
            "--seed" => args.seed = value().parse().expect("--seed N"),
            "--ride-along" => {
                args.ride_along = Some(value().parse().expect("--ride-along SECONDS"))
            }
            "--max-interval" => {
                args.max_interval = Some(value().parse().expect("--max-interval SECONDS"))
            }
            "--sweep-interval" => {
                args.sweep_interval = Some(value().parse().expect("--sweep-interval SECONDS"))
            }
            "--no-sweep" => args.no_sweep = true,
            "--untracked" => args.untracked = value().parse().expect("--untracked SHARE"),
            "--peer-limit" => args.peer_limit = value().parse().expect("--peer-limit SECONDS"),
            "--ceiling" => args.ceiling = Some(value().parse().expect("--ceiling SECONDS")),
            "--page-size" => args.page_size = Some(value().parse().expect("--page-size N")),
            "--others" => args.others = value().parse().expect("--others SHARE"),
            "--others-over" => args.others_over = value().parse().expect("--others-over SECONDS"),
            "--help" | "-h" => {
                println!(
                    "bench [--actions N] [--time-scale F] [--strategies a,b] [--seed N] [--untracked SHARE]\n\
                     \x20     [--ride-along S] [--max-interval S] [--sweep-interval S] [--no-sweep] [--peer-limit WALL_SECONDS]\n\
                     \x20     [--ceiling WALL_SECONDS] [--page-size N]  (ceiling: no rate limit, checks per second)\n\
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

struct Outcome {
    name: String,
    calls: u64,
    rate_limited: u64,
    lags: Vec<f64>,
    finished: usize,
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

async fn tenant(args: &Args) -> (Simulator, Vec<ActionId>) {
    let per = |calls: u32, secs: f64| SimRateLimit {
        calls,
        window: Duration::from_secs_f64(secs / args.time_scale),
    };
    let sim = Simulator::start(SimConfig {
        // The service's limits per app and tenant, in simulated time.
        rate_limit: Some(per(100, 60.0)),
        long_rate_limit: Some(per(1500, 3600.0)),
        fractional_retry_after: true,
        early_retry_grace: Duration::from_millis(20),
        seed: args.seed,
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let ids = (0..args.actions)
        .map(|_| sim.create_action(lifecycle(&mut rng, args.time_scale)))
        .collect();
    // Other tools' actions: listed by a sweep, never tracked.
    let mut other = fastrand::Rng::with_seed(args.seed ^ 0x5eed);
    for _ in 0..(args.actions as f64 * args.untracked).round() as usize {
        sim.create_action(lifecycle(&mut other, args.time_scale));
    }
    (sim, ids)
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

/// Resident memory now (`VmRSS`), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    ticks / 100.0
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

async fn run_ours(args: &Args, discover: bool) -> Outcome {
    let (sim, ids) = tenant(args).await;
    let sim = Arc::new(sim);
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("bench.db");
    let mut s = settings_for(&sim, &db);
    let scaled = |secs: f64| Duration::from_secs_f64(secs / args.time_scale);
    // The defaults, in simulated time.
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
    if discover {
        s.poll.discover = mde_actiond::config::DiscoverMode::All;
        // Nothing to backfill: the tenant's history starts with the run.
        s.poll.discover_since = scaled(3600.0);
    }
    s.poll.not_found_after = scaled(d.poll.not_found_after.as_secs_f64());
    s.api.timeout = Duration::from_secs(30);
    s.rate_limit = d.rate_limit.clone();
    s.rate_limit.time_scale = 1.0 / args.time_scale;
    s.database.checkpoint_interval = Duration::from_secs(1);
    // The simulator shares the process: what it holds before the daemon starts is the
    // baseline to read the peak against.
    let baseline = rss_kib();
    let cpu0 = cpu_seconds();
    let started = tokio::time::Instant::now();
    let daemon = Running::start(&s, &ids).await;
    let store = daemon.store.clone();
    let creator = others_over_time(args, sim.clone());
    let mut others = None;
    loop {
        // A cheap count, not often: the harness must not compete with the daemon.
        if others.is_none() && creator.is_finished() {
            others = Some(creator.await.expect("creator"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let others = others.unwrap_or_default();
    loop {
        let counts = store.counts().await.expect("count");
        let all_there = !discover || counts.total() >= (ids.len() + others.len()) as i64;
        if all_there && counts.tracking(mde_actiond::domain::Tracking::Active) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let wall = started.elapsed();
    daemon.stop().await;
    let store = mde_actiond::store::Store::open(&db, mde_actiond::store::OpenMode::ReadOnly)
        .await
        .expect("reader");
    let mut lags = Vec::new();
    let mut finished = 0;
    for id in &ids {
        for t in store.transitions(id).await.expect("transitions") {
            if let Some(l) = parse_time(&t.observed_at)
                .and_then(|o| lag(&sim, id, &t.to_status, o, args.time_scale))
            {
                lags.push(l);
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
    let tracked_all = ids.len() + within.len();
    let sweeps = store.sweeps(u32::MAX).await.expect("sweeps");
    let pages: i64 = sweeps.iter().map(|s| s.pages).sum();
    let sweeping = format!(
        "; {} sweeps, {:.2} pages each",
        sweeps.len(),
        pages as f64 / sweeps.len().max(1) as f64
    );
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
        wall,
        extra: format!(
            "peak RSS {} MiB (simulated tenant alone: {} MiB), CPU {:.1}s, database {} KiB, early retries after 429: {}{sweeping}{discovery}",
            mde_actiond::report::peak_rss_kib().unwrap_or(0) / 1024,
            baseline / 1024,
            cpu_seconds() - cpu0,
            size / 1024,
            stats.early_retries
        ),
    }
}

/// The daemon running in this process with `ids` enqueued.
struct Running {
    store: mde_actiond::store::Store,
    poller: Arc<mde_actiond::poller::Poller>,
    stop: CancellationToken,
    run: tokio::task::JoinHandle<Result<(), mde_actiond::daemon::DaemonError>>,
}

impl Running {
    async fn start(s: &mde_actiond::config::Settings, ids: &[ActionId]) -> Self {
        let daemon = mde_actiond::daemon::Daemon::start(s).await.expect("daemon");
        let store = daemon.store().clone();
        let poller = daemon.poller().clone();
        store
            .enqueue(ids, SystemTime::now())
            .await
            .expect("enqueue");
        let stop = CancellationToken::new();
        let run = tokio::spawn(daemon.run_until_stopped(stop.clone()));
        Self {
            store,
            poller,
            stop,
            run,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.run.await.expect("join").expect("daemon");
    }
}

/// A peer: polls every `interval` (simulated), one GET per pending action, or one list call
/// for all pending actions (`batched`), ignoring Retry-After as playbooks do.
async fn run_peer(args: &Args, name: &str, interval_secs: f64, batched: bool) -> Outcome {
    let (sim, ids) = tenant(args).await;
    let s = settings_for(&sim, std::path::Path::new("/nonexistent"));
    let http = http_client(Duration::from_secs(10), Duration::from_secs(5)).expect("http");
    let tokens = Arc::new(TokenProvider::new(
        mde_actiond::auth::build_source(&s, http.clone()).expect("token source"),
    ));
    let client = MdeClient::new(http, &s.api_base_url());
    let interval = Duration::from_secs_f64(interval_secs / args.time_scale);
    let mut seen: HashMap<ActionId, String> = HashMap::new();
    let mut lags = Vec::new();
    let mut pending: Vec<ActionId> = ids.clone();
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !pending.is_empty() {
        tick.tick().await;
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
    Outcome {
        name: name.into(),
        calls: stats.api_calls,
        rate_limited: stats.rate_limited,
        lags,
        finished: ids.len() - pending.len(),
        wall: started.elapsed(),
        extra: String::new(),
    }
}

/// The daemon's own ceiling: no rate limit anywhere, actions that stay unfinished, sweeps
/// back to back (or passes by id with `--no-sweep`); checks per second over the run.
async fn run_ceiling(args: &Args, secs: f64) {
    let sim = Simulator::start(SimConfig {
        seed: args.seed,
        ..SimConfig::default()
    })
    .await
    .expect("simulator");
    let ids: Vec<ActionId> = (0..args.actions)
        .map(|_| {
            sim.create_action(Lifecycle::simple(
                Duration::from_secs(1),
                Duration::from_secs(24 * 3600),
                ActionStatus::Succeeded,
            ))
        })
        .collect();
    let baseline = rss_kib();
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("ceiling.db");
    let mut s = settings_for(&sim, &db);
    s.rate_limit.per_minute = u32::MAX / 2;
    s.rate_limit.per_hour = u32::MAX / 2;
    s.poll.sweep_interval = Duration::from_millis(1);
    s.poll.initial_interval = Duration::from_millis(100);
    s.poll.max_interval = Duration::from_millis(500);
    s.poll.ride_along = Duration::from_millis(500);
    if args.no_sweep {
        s.poll.sweep = mde_actiond::config::SweepMode::Off;
    }
    if let Some(n) = args.page_size {
        s.poll.sweep_page_size = n;
    }
    s.database.checkpoint_interval = Duration::from_secs(1);
    let daemon = Running::start(&s, &ids).await;
    // Counted from the enqueue on: the first write of every row is in the figure.
    let cpu0 = cpu_seconds();
    let started = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let checks = daemon
        .poller
        .metrics()
        .checks
        .load(std::sync::atomic::Ordering::Relaxed);
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    daemon.stop().await;
    let stats = sim.stats();
    println!(
        "| {} | {} | {:.0} | {} | {:.1} | {:.1} | {} ({} before the daemon) |",
        if args.no_sweep {
            "passes by id".to_string()
        } else {
            format!("sweeps, pages of {}", s.poll.sweep_page_size)
        },
        args.actions,
        checks as f64 / wall,
        stats.api_calls,
        wall,
        cpu,
        mde_actiond::report::peak_rss_kib().unwrap_or(0) / 1024,
        baseline / 1024,
    );
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    println!(
        "{} actions, time compressed {}x (1 s here = {} s simulated), tenant limits 100/min and 1500/h; seed {}\n",
        args.actions, args.time_scale, args.time_scale, args.seed
    );
    if let Some(secs) = args.ceiling {
        println!(
            "| mode | actions | checks/s | API calls | wall (s) | CPU (s, simulator included) | peak RSS (MiB) |\n| --- | --- | --- | --- | --- | --- | --- |"
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
            "| {} | {}/{} | {:.2} | {:.0} | {:.0} | {} | {} |",
            r.name,
            r.finished,
            args.actions,
            r.calls as f64 / args.actions as f64,
            percentile(&r.lags, 0.5),
            percentile(&r.lags, 0.95),
            r.rate_limited,
            r.extra
        );
    }
    println!("\nrun at {}", format_time(SystemTime::now()));
}
