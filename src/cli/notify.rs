//! `mde-actiond notify ...`: the outbox for operators. `list` and `replay` work on the
//! database (the running daemon sends what `replay` queues within seconds); `test` sends
//! from this process, with the configuration's secrets, and prints the answer.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Subcommand;

use super::CliError;
use crate::config::Settings;
use crate::store::{CALLBACK, OpenMode, ReplaySelection, Store};

#[derive(Debug, Subcommand)]
pub enum NotifyCommand {
    /// Each destination's standing and backlog, then deliveries, newest first.
    #[command(
        after_help = "Examples:\n  mde-actiond notify list\n  mde-actiond notify list --failed     # pending, attempted at least once\n  mde-actiond notify list --dead --json"
    )]
    List {
        /// Only deliveries that failed and wait for another attempt.
        #[arg(long, conflicts_with = "dead")]
        failed: bool,
        /// Only deliveries that will not be attempted again.
        #[arg(long)]
        dead: bool,
        /// At most this many deliveries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Queue events again, with their ids unchanged (receivers can tell a replay).
    #[command(
        after_help = "Examples:\n  mde-actiond notify replay evt_3f2a...\n  mde-actiond notify replay --since 1h --to soar\n\nWithout --to, each event goes again to the destinations it went to before."
    )]
    Replay {
        /// Event ids (the webhook-id header; `notify list` shows them).
        event_ids: Vec<String>,
        /// Every event created since then: a time or a duration back (1h).
        #[arg(long, value_parser = crate::report::parse_since, conflicts_with = "event_ids")]
        since: Option<SystemTime>,
        /// Only to this destination (which gets them even if it had not before).
        #[arg(long, value_name = "NAME")]
        to: Option<String>,
    },
    /// Send a signed test event to a destination now and print its answer.
    #[command(
        after_help = "Example:\n  mde-actiond notify test soar\n\nExit status 0 when the destination answered 2xx."
    )]
    Test { name: String },
    /// Resume a destination that was disabled (410 Gone, or failing for disable_after).
    Enable { name: String },
}

pub async fn run(
    db: &Path,
    settings: &Settings,
    command: NotifyCommand,
) -> Result<ExitCode, CliError> {
    match command {
        NotifyCommand::List {
            failed,
            dead,
            limit,
            json,
        } => list(db, failed, dead, limit, json).await,
        NotifyCommand::Replay {
            event_ids,
            since,
            to,
        } => replay(db, settings, event_ids, since, to).await,
        NotifyCommand::Test { name } => test(settings, &name).await,
        NotifyCommand::Enable { name } => {
            let store = Store::open(db, OpenMode::WriteExisting).await?;
            let found = store.enable_destination(&name).await?;
            store.close().await;
            if !found {
                return Err(CliError::Usage(format!(
                    "no destination '{name}' in {}",
                    db.display()
                )));
            }
            eprintln!("{name} enabled; the running daemon resumes it within seconds");
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn list(
    db: &Path,
    failed: bool,
    dead: bool,
    limit: u32,
    json: bool,
) -> Result<ExitCode, CliError> {
    let store = Store::open(db, OpenMode::ReadOnly).await?;
    let destinations = store.destinations().await?;
    let counts = store.delivery_counts().await?;
    let state = dead.then_some("dead").or(failed.then_some("pending"));
    let deliveries = store.deliveries(state, failed, limit).await?;
    store.close().await;
    let mut out = std::io::stdout().lock();
    if json {
        let value = serde_json::json!({
            "destinations": destinations,
            "counts": counts,
            "deliveries": deliveries,
        });
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    write_destinations(&mut out, &destinations, &counts);
    let _ = writeln!(out);
    write_deliveries(&mut out, &deliveries);
    Ok(ExitCode::SUCCESS)
}

/// The destinations' table: counts by state and each one's standing.
fn write_destinations(
    out: &mut impl Write,
    destinations: &[crate::store::DestinationRow],
    counts: &[crate::store::DeliveryCounts],
) {
    let _ = writeln!(
        out,
        "{:<20} {:<10} {:>8} {:>8} {:>10} {:>6}  {:<24}  STANDING",
        "DESTINATION", "KIND", "PENDING", "RETRYING", "DELIVERED", "DEAD", "OLDEST PENDING"
    );
    let mut names: Vec<(String, String, String)> = destinations
        .iter()
        .map(|d| {
            let standing = match (&d.disabled_at, &d.failing_since, d.configured) {
                (Some(at), _, _) => format!(
                    "disabled since {at}: {}",
                    d.disabled_reason.as_deref().unwrap_or("")
                ),
                (None, _, false) => "no longer configured".to_string(),
                (None, Some(since), true) => format!("failing since {since}"),
                (None, None, true) => "ok".to_string(),
            };
            (d.name.clone(), d.kind.clone(), standing)
        })
        .collect();
    if counts.iter().any(|c| c.destination == CALLBACK) {
        names.push((CALLBACK.into(), "webhook".into(), "per-action URLs".into()));
    }
    for (name, kind, standing) in &names {
        let c = counts
            .iter()
            .find(|c| &c.destination == name)
            .cloned()
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>8} {:>8} {:>10} {:>6}  {:<24}  {standing}",
            name,
            kind,
            c.pending,
            c.retrying,
            c.delivered,
            c.dead,
            c.oldest_pending.as_deref().unwrap_or("-"),
        );
    }
    if names.is_empty() {
        let _ = writeln!(
            out,
            "(no destinations: add [[notify]] to the configuration)"
        );
    }
}

/// The deliveries' table, newest first.
fn write_deliveries(out: &mut impl Write, deliveries: &[crate::store::DeliveryRow]) {
    let _ = writeln!(
        out,
        "{:<30} {:<12} {:<30} {:<36} {:>4} {:<9} {:>3}  LAST",
        "EVENT", "DESTINATION", "TYPE", "ACTION", "SEQ", "STATE", "TRY"
    );
    for d in deliveries {
        let last = match (&d.last_error, &d.next_attempt_at, d.state.as_str()) {
            (Some(e), Some(next), "pending") => format!("{e}; next at {next}"),
            (Some(e), _, _) => e.clone(),
            (None, _, "delivered") => {
                format!("delivered {}", d.finished_at.as_deref().unwrap_or(""))
            }
            (None, Some(next), _) => format!("due {next}"),
            (None, None, _) => String::new(),
        };
        let _ = writeln!(
            out,
            "{:<30} {:<12} {:<30} {:<36} {:>4} {:<9} {:>3}  {last}",
            d.event_id,
            d.destination,
            d.event_type,
            d.action_id.as_deref().unwrap_or("-"),
            d.seq.map_or("-".to_string(), |s| s.to_string()),
            d.state,
            d.attempts,
        );
    }
}

async fn replay(
    db: &Path,
    settings: &Settings,
    event_ids: Vec<String>,
    since: Option<SystemTime>,
    to: Option<String>,
) -> Result<ExitCode, CliError> {
    let selection = match (since, event_ids.is_empty()) {
        (Some(t), _) => ReplaySelection::Since(t),
        (None, false) => ReplaySelection::Events(event_ids),
        (None, true) => {
            return Err(CliError::Usage(
                "name event ids (from `notify list`) or --since 1h".into(),
            ));
        }
    };
    if let Some(name) = &to
        && name != CALLBACK
        && !settings.notify.iter().any(|n| &n.name == name)
    {
        return Err(CliError::Usage(format!(
            "no destination '{name}' in the configuration (names: {})",
            settings
                .notify
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let store = Store::open(db, OpenMode::WriteExisting).await?;
    let queued = store
        .replay(&selection, to.as_deref(), SystemTime::now())
        .await?;
    store.close().await;
    eprintln!("{queued} deliveries queued again; the running daemon sends them within seconds");
    Ok(if queued == 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn test(settings: &Settings, name: &str) -> Result<ExitCode, CliError> {
    let destinations = crate::notify::destinations(settings)
        .map_err(|p| CliError::Other(anyhow::anyhow!("{p}")))?;
    let Some(d) = destinations
        .iter()
        .find(|d| d.name == name && name != CALLBACK)
    else {
        return Err(CliError::Usage(format!(
            "no destination '{name}' in the configuration"
        )));
    };
    let now = crate::domain::format_time(SystemTime::now());
    let id = format!("evt_test_{:016x}", fastrand::u64(..));
    let envelope = serde_json::json!({
        "type": "machine_action.test",
        "timestamp": now,
        "data": {
            "id": "00000000-0000-0000-0000-000000000000",
            "type": "Isolate",
            "status": "Succeeded",
            "fromStatus": "InProgress",
            "computerDnsName": "test-device.example",
            "requestor": "mde-actiond notify test",
            "tenantId": settings.auth.tenant_id,
            "observedAt": now,
            "seq": 0,
            "terminal": true,
        }
    })
    .to_string();
    let started = std::time::Instant::now();
    let answer = d.send_test(&id, &envelope).await;
    println!(
        "{name} ({}): {} in {} ms (webhook-id {id})",
        d.kind.as_str(),
        answer.describe(),
        started.elapsed().as_millis()
    );
    Ok(match answer {
        crate::notify::Answer::Delivered(_) => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}
