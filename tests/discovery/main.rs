//! Discovery (`poll.discover = "all"`): every action of the tenant is tracked, whoever
//! started it. Actions created by "others" at random times are all found, each once, with
//! exact transitions from the first observation; a first start records the backfill window
//! in pages; filters narrow it; `off` tracks nothing it was not given.

#[path = "../common/mod.rs"]
mod common;

use std::time::Duration;

use common::receiver::{Receiver, new_secret};
use common::*;
use mde_actiond::config::{DiscoverMode, NotifyEvent};
use mde_actiond::domain::{ActionId, ActionStatus, Tracking};
use mde_actiond::sim::{Lifecycle, SimConfig};

const LIMIT: Duration = Duration::from_secs(120);
const ANALYST: &str = "analyst@contoso.com";

fn discovering(env: &mut TestEnv, since: &str) {
    env.settings.poll.discover = DiscoverMode::All;
    env.settings.poll.discover_since = mde_actiond::domain::parse_duration(since).unwrap();
}

async fn source_of(env: &TestEnv, id: &ActionId) -> Option<String> {
    let s = env.reader().await;
    let r = s
        .action(id)
        .await
        .unwrap()
        .map(|r| r.source)
        .unwrap_or(None);
    s.close().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_started_elsewhere_are_discovered_once_with_exact_transitions() {
    let mut env = TestEnv::new(SimConfig {
        seed: 1515,
        ..SimConfig::default()
    })
    .await;
    discovering(&mut env, "1h");
    // A destination for isolations: it hears of the portal's too.
    let key = new_secret();
    let hook = Receiver::start(&[&key], 11).await;
    let path = env.dir.path().join("k");
    private_file(&path, &key);
    let mut n: mde_actiond::config::NotifySettings = toml::from_str(&format!(
        "name = \"isolations\"\nkind = \"webhook\"\nurl = \"{}\"\nsecret_file = \"{}\"\ntypes = [\"Isolate\"]\n",
        hook.url("/"),
        path.display()
    ))
    .unwrap();
    n.events = vec![NotifyEvent::Transition];
    env.settings.notify = vec![n];
    let daemon = env.start_daemon().await;
    let ours = env.sim.create_random_actions(10, Duration::from_secs(4));
    daemon.enqueue(&ours).await;
    // Others start actions over ten seconds, some so short they end between two sweeps.
    let mut rng = fastrand::Rng::with_seed(3);
    let types = [
        "Isolate",
        "RunAntiVirusScan",
        "CollectInvestigationPackage",
        "Unisolate",
    ];
    let mut theirs = Vec::new();
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(rng.u64(0..500))).await;
        let lifecycle = if i % 4 == 0 {
            Lifecycle::new(vec![(Duration::ZERO, ActionStatus::Succeeded)])
        } else {
            Lifecycle::random(&mut rng, Duration::from_secs(4))
        };
        theirs.push(
            env.sim
                .create_action_by(lifecycle, types[i % 4], i, ANALYST, Duration::ZERO),
        );
    }
    let store = env.reader().await;
    eventually(LIMIT, "every action of the tenant tracked", || async {
        for id in ours.iter().chain(&theirs) {
            if store.action(id).await.unwrap().is_none() {
                return false;
            }
        }
        true
    })
    .await;
    let all: Vec<ActionId> = ours.iter().chain(&theirs).cloned().collect();
    wait_finished(&store, &all, LIMIT).await;
    store.close().await;
    env.assert_all_true(&all).await;
    for id in &ours {
        assert_eq!(source_of(&env, id).await.as_deref(), Some("cli"));
    }
    for id in &theirs {
        assert_eq!(source_of(&env, id).await.as_deref(), Some("discovered"));
    }
    // Enqueued by hand after it was discovered: one row, its first source kept.
    daemon.enqueue(std::slice::from_ref(&theirs[1])).await;
    assert_eq!(
        source_of(&env, &theirs[1]).await.as_deref(),
        Some("discovered")
    );
    // Every transition of every isolation, the portal's included, reached the destination.
    let reader = env.reader().await;
    let mut isolation_transitions = 0;
    for id in &all {
        let row = reader.action(id).await.unwrap().unwrap();
        if row.fields.action_type.as_deref() == Some("Isolate") {
            isolation_transitions += reader.transitions(id).await.unwrap().len();
        }
    }
    reader.close().await;
    hook.wait_for(LIMIT, "every isolation transition", |got| {
        got.iter().filter(|g| g.accepted).count() == isolation_transitions
    })
    .await;
    assert!(
        hook.accepted()
            .iter()
            .all(|g| g.json()["data"]["type"] == "Isolate")
    );
    let list = bin()
        .args([
            "--db",
            env.db().to_str().unwrap(),
            "list",
            "--source",
            "discovered",
            "--json",
        ])
        .output()
        .await
        .unwrap();
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(listed.len(), theirs.len(), "list --source discovered");
    let report = bin()
        .args([
            "--db",
            env.db().to_str().unwrap(),
            "report",
            "--format",
            "json",
        ])
        .output()
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert!(
        report["counts"]["by_source"]
            .to_string()
            .contains("discovered"),
        "{report}"
    );
    let calls = env.sim.stats();
    eprintln!(
        "figures: {} of ours, {} started elsewhere, all tracked; {} isolation transitions delivered; sim stats {calls:?}",
        ours.len(),
        theirs.len(),
        isolation_transitions
    );
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_start_backfills_50000_actions_in_pages_without_notifying_history() {
    let mut env = TestEnv::new(SimConfig {
        seed: 5050,
        ..SimConfig::default()
    })
    .await;
    discovering(&mut env, "1h");
    // A destination that would hear of every transition: the backfill's history must not
    // reach it.
    let hook = Receiver::start(&[], 12).await;
    let mut n: mde_actiond::config::NotifySettings = toml::from_str(&format!(
        "name = \"all\"\nkind = \"teams\"\nurl = \"{}\"\nevents = [\"transition\"]\n",
        hook.url("/")
    ))
    .unwrap();
    n.events = vec![NotifyEvent::Transition];
    env.settings.notify = vec![n];
    let mut rng = fastrand::Rng::with_seed(8);
    let total = 50_000;
    let mut active = 0;
    for i in 0..total {
        // Created up to 55 minutes ago; nine in ten are over, the rest still pending.
        let ago = Duration::from_secs(rng.u64(60..3300));
        let lifecycle = if i % 10 == 0 {
            active += 1;
            Lifecycle::new(vec![(Duration::ZERO, ActionStatus::Pending)])
        } else {
            Lifecycle::simple(
                Duration::from_secs(5),
                Duration::from_secs(20),
                ActionStatus::Succeeded,
            )
        };
        env.sim
            .create_action_by(lifecycle, "RunAntiVirusScan", i, ANALYST, ago);
    }
    // Older than discover_since: not part of the backfill.
    let too_old = env.sim.create_action_by(
        Lifecycle::new(vec![(Duration::ZERO, ActionStatus::Succeeded)]),
        "Isolate",
        1,
        ANALYST,
        Duration::from_secs(7200),
    );
    let started = std::time::Instant::now();
    let daemon = env.start_daemon().await;
    let store = env.reader().await;
    eventually(
        Duration::from_secs(300),
        "the backfill sweep complete",
        || async {
            store
                .sweeps(5)
                .await
                .unwrap()
                .iter()
                .any(|s| s.discovered > 0 && s.outcome.as_deref() == Some("complete"))
        },
    )
    .await;
    let took = started.elapsed();
    let counts = store.counts().await.unwrap();
    assert_eq!(
        counts.total(),
        total as i64,
        "each action once, the old one left out"
    );
    assert_eq!(counts.tracking(Tracking::Active), active);
    assert_eq!(counts.tracking(Tracking::Done), total as i64 - active);
    assert!(store.action(&too_old).await.unwrap().is_none());
    let sweeps = store.sweeps(5).await.unwrap();
    let backfill = sweeps
        .iter()
        .find(|s| s.discovered > 0)
        .expect("the backfill sweep");
    assert_eq!(backfill.discovered, total as i64);
    assert!(backfill.pages >= 5, "10,000 per page: {backfill:?}");
    // A sample checked against the truth: one transition each, to the true status.
    for id in env.sim.all_ids().iter().take(300) {
        if *id == too_old {
            continue;
        }
        let log = store.transitions(id).await.unwrap();
        env.sim.verify_transitions(id, &log, false).unwrap();
    }
    let pending = store.delivery_counts().await.unwrap();
    store.close().await;
    assert!(
        pending
            .iter()
            .all(|c| c.pending + c.delivered + c.dead == 0),
        "history is not news: {pending:?}"
    );
    assert!(hook.requests().is_empty());
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(str::to_string)
        });
    eprintln!(
        "figures: backfill of {total} actions ({active} active) in {} pages, {:.1}s; test process (simulator and daemon) peak {}",
        backfill.pages,
        took.as_secs_f64(),
        rss.unwrap_or_default()
    );
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_narrow_discovery_and_off_tracks_only_what_it_was_given() {
    let mut env = TestEnv::new(SimConfig {
        seed: 99,
        ..SimConfig::default()
    })
    .await;
    let done = || Lifecycle::new(vec![(Duration::ZERO, ActionStatus::Succeeded)]);
    let iso = env
        .sim
        .create_action_by(done(), "Isolate", 1, ANALYST, Duration::ZERO);
    let scan = env
        .sim
        .create_action_by(done(), "RunAntiVirusScan", 2, ANALYST, Duration::ZERO);
    let other =
        env.sim
            .create_action_by(done(), "Isolate", 3, "someone@contoso.com", Duration::ZERO);
    // Off (the default): only what is enqueued.
    let daemon = env.start_daemon().await;
    let ours = env.sim.create_random_actions(3, Duration::from_secs(1));
    daemon.enqueue(&ours).await;
    wait_finished(&daemon.store, &ours, LIMIT).await;
    let s = env.reader().await;
    assert_eq!(
        s.counts().await.unwrap().total(),
        3,
        "discover = off tracks nothing it was not given"
    );
    s.close().await;
    daemon.shutdown().await;

    discovering(&mut env, "1h");
    env.settings.poll.discover_types = vec!["Isolate".into()];
    env.settings.poll.discover_requestors = vec![ANALYST.into()];
    let daemon = env.start_daemon().await;
    let store = env.reader().await;
    eventually(LIMIT, "the isolation by the analyst discovered", || async {
        store.action(&iso).await.unwrap().is_some()
    })
    .await;
    // Two more sweeps: the others would have been found by now.
    let sweeps = daemon.poller.metrics().sweeps();
    eventually(LIMIT, "two more sweeps", || async {
        daemon.poller.metrics().sweeps() >= sweeps + 2
    })
    .await;
    assert!(
        store.action(&scan).await.unwrap().is_none(),
        "discover_types"
    );
    assert!(
        store.action(&other).await.unwrap().is_none(),
        "discover_requestors"
    );
    assert_eq!(store.counts().await.unwrap().total(), 4);
    store.close().await;
    daemon.shutdown().await;
}
