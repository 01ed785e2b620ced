//! `mde-actiond demo`: the real daemon against the built-in simulated tenant, with live
//! progress read back from the database the way a reporting tool would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::daemon::Daemon;
use crate::domain::{ActionId, Tracking};
use crate::report;
use crate::sim::{SimConfig, SimRateLimit, Simulator, settings_for};
use crate::store::{OpenMode, Store};

pub const DEFAULT_DEMO_DB: &str = "mde-actiond-demo.db";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many simulated actions to track.
    #[arg(long, default_value_t = 36)]
    pub actions: usize,
    /// Ids the tenant does not know, to show how they end.
    #[arg(long, default_value_t = 2)]
    pub unknown: usize,
    /// Time scale of the simulated lifecycles (most end within about this long).
    #[arg(long, default_value = "20s", value_parser = crate::domain::parse_duration)]
    pub scale: Duration,
    /// Share of API calls that meet an injected fault (0 to 1).
    #[arg(long, default_value_t = 0.08)]
    pub fault_rate: f64,
    /// Lifetime of the simulated tenant's access tokens.
    #[arg(long, default_value = "20s", value_parser = crate::domain::parse_duration)]
    pub token_lifetime: Duration,
}

/// Why the demo could not run: a usage error (the CLI exits 2) or anything else.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<crate::daemon::DaemonError> for DemoError {
    fn from(e: crate::daemon::DaemonError) -> Self {
        DemoError::Other(e.into())
    }
}

impl From<crate::store::StoreError> for DemoError {
    fn from(e: crate::store::StoreError) -> Self {
        DemoError::Other(e.into())
    }
}

/// Runs the demo on `db` (default `mde-actiond-demo.db` here).
pub async fn run(db: Option<PathBuf>, args: &DemoArgs) -> Result<ExitCode, DemoError> {
    if !(0.0..=1.0).contains(&args.fault_rate) {
        return Err(DemoError::Usage(
            "--fault-rate must be between 0 and 1".into(),
        ));
    }
    let db = db.unwrap_or_else(|| PathBuf::from(DEFAULT_DEMO_DB));
    fresh_demo_db(&db).await?;

    let sim = Simulator::start(SimConfig {
        token_lifetime: args.token_lifetime,
        fault_rate: args.fault_rate,
        rate_limit: Some(SimRateLimit {
            calls: 100,
            window: Duration::from_secs(60),
        }),
        seed: fastrand::u64(..),
        ..SimConfig::default()
    })
    .await
    .context("cannot start the simulator")?;
    let mut settings = settings_for(&sim, &db);
    settings.poll.initial_interval = Duration::from_secs(1);
    settings.poll.max_interval = Duration::from_secs(5);
    settings.poll.ride_along = Duration::from_secs(3);
    // The service's budget, which the simulated tenant enforces per minute.
    settings.rate_limit.per_minute = 100;
    settings.rate_limit.per_hour = 1500;

    let mut ids = sim.create_random_actions(args.actions, args.scale);
    let mut rng = fastrand::Rng::new();
    ids.extend((0..args.unknown).map(|_| ActionId::random(&mut rng)));

    let daemon = Daemon::start(&settings).await?;
    daemon.store().enqueue(&ids, SystemTime::now()).await?;
    let reader = Store::open(&db, OpenMode::ReadOnly).await?;
    let rt = daemon.runtime().clone();
    let stop = CancellationToken::new();
    let interrupted = CancellationToken::new();
    let running = tokio::spawn(daemon.run_until_stopped(stop.clone()));
    {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.cancel();
            }
        });
    }

    println!(
        "mde-actiond demo: tracking {} actions ({} unknown to the tenant) in {}",
        ids.len(),
        args.unknown,
        db.display()
    );
    println!(
        "simulated tenant at {} · tokens live {} · {}% of calls meet a fault · budget {}/min\n",
        sim.base_url(),
        crate::domain::format_duration(args.token_lifetime),
        (args.fault_rate * 100.0).round(),
        settings.rate_limit.per_minute
    );
    let started = tokio::time::Instant::now();
    let mut last_transition = 0i64;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_status_line = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = interrupted.cancelled() => {
                println!("\ninterrupted; stopping the daemon");
                break;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        for t in reader.transitions_after(last_transition, 500).await? {
            last_transition = t.id;
            let id = ActionId::parse(&t.action_id).map_err(anyhow::Error::from)?;
            let row = reader.action(&id).await?;
            let (kind, device) = row
                .as_ref()
                .map(report::kind_and_device)
                .unwrap_or_default();
            println!(
                "{elapsed:>6.1}s  {}…  {kind:<28} {device:<22} {} → {}",
                &t.action_id[..8],
                t.from_status.as_deref().unwrap_or("(new)"),
                t.to_status
            );
        }
        let counts = reader.counts().await?;
        let active = counts.tracking(Tracking::Active);
        if last_status_line.elapsed() >= Duration::from_secs(5) || active == 0 {
            last_status_line = tokio::time::Instant::now();
            let stats = sim.stats();
            println!(
                "{elapsed:>6.1}s  ── active {active} · done {} · not found {} · API calls {} · faults survived {} · token refreshes {}",
                counts.tracking(Tracking::Done),
                counts.tracking(Tracking::NotFound),
                stats.api_calls,
                stats.faults_injected,
                rt.tokens.refreshes(),
            );
        }
        if active == 0 {
            break;
        }
        let _ = std::io::stdout().flush();
    }
    stop.cancel();
    running.await.context("daemon task failed")??;

    let counts = reader.counts().await?;
    let stats = sim.stats();
    let tracked = ids.len().max(1) as f64;
    println!("\nSummary after {:.1}s", started.elapsed().as_secs_f64());
    println!("  by tracking: {}", join_counts(&counts.by_tracking));
    println!("  by status:   {}", join_counts(&counts.by_status));
    println!(
        "  API calls:   {} ({} list, {} single GET) = {:.2} per action; 429s {}; faults injected {}; sent early after a 429: {}",
        stats.api_calls,
        stats.list_calls,
        stats.get_calls,
        stats.api_calls as f64 / tracked,
        stats.rate_limited,
        stats.faults_injected,
        stats.early_retries
    );
    println!(
        "  tokens:      {} issued ({} refreshes by the daemon), calls with an expired token: {}",
        stats.tokens_issued,
        rt.tokens.refreshes(),
        stats.expired_token_calls
    );
    // Check the recorded history against the simulator's script, as the tests do.
    let mut exact = 0;
    let mut checked = 0;
    for id in &ids {
        if sim.truth(id).is_none() {
            continue;
        }
        checked += 1;
        let log = reader.transitions(id).await?;
        let finished = reader
            .action(id)
            .await?
            .is_some_and(|r| r.tracking == Tracking::Done);
        match sim.verify_transitions(id, &log, finished) {
            Ok(()) => exact += 1,
            Err(e) => println!("  mismatch: {e}"),
        }
    }
    println!("  history:     {exact} of {checked} transition logs match the simulator's truth");
    reader.close().await;
    let shown = db.display();
    println!("\nThe database is yours to query, for example:");
    println!(
        "  sqlite3 -readonly -header -column {shown} \\\n    \"SELECT status, count(*) AS actions, round(avg(poll_count), 1) AS avg_polls FROM actions GROUP BY status\""
    );
    println!("  sqlite3 -readonly -header -column {shown} \"SELECT * FROM device_containment\"");
    println!("  sqlite3 -readonly -header -column {shown} \"SELECT * FROM daily_stats\"");
    println!("  cargo run --release -- --db {shown} report");
    Ok(ExitCode::SUCCESS)
}

fn join_counts(counts: &[(String, i64)]) -> String {
    counts
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Starts from an empty database, but never deletes a file that is not ours.
async fn fresh_demo_db(db: &Path) -> Result<(), DemoError> {
    if !db.exists() {
        return Ok(());
    }
    let ours = match Store::open(db, OpenMode::ReadOnly).await {
        Ok(store) => {
            let ok = store.counts().await.is_ok();
            store.close().await;
            ok
        }
        Err(_) => false,
    };
    if !ours {
        return Err(DemoError::Usage(format!(
            "{} exists and is not an mde-actiond database; pass another --db",
            db.display()
        )));
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(PathBuf::from(&p)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(
                    anyhow::anyhow!("cannot remove {}: {e}", PathBuf::from(p).display()).into(),
                );
            }
        }
    }
    Ok(())
}
