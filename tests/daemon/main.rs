//! The daemon in-process against the simulated tenant: lifecycles, tokens, rate limits,
//! faults, fallbacks, restarts.

#[path = "../common/mod.rs"]
mod common;

use std::time::{Duration, SystemTime};

use common::*;
use mde_actiond::config::SweepMode;
use mde_actiond::domain::{ActionId, ActionStatus, parse_time};
use mde_actiond::sim::{Fault, FilterForm, Lifecycle, SimConfig, SimRateLimit};

const LIMIT: Duration = Duration::from_secs(60);

fn unknown_ids(n: usize, seed: u64) -> Vec<ActionId> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| ActionId::random(&mut rng)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_action_reaches_its_true_terminal_status() {
    let env = TestEnv::new(SimConfig::default()).await;
    let ids = env.sim.create_random_actions(40, Duration::from_secs(2));
    let unknown = unknown_ids(3, 1);
    let daemon = env.start_daemon().await;
    daemon.enqueue(&ids).await;
    daemon.enqueue(&unknown).await;
    let all: Vec<ActionId> = ids.iter().chain(&unknown).cloned().collect();
    wait_finished(&daemon.store, &all, LIMIT).await;
    daemon.shutdown().await;

    env.assert_all_true(&ids).await;
    let store = env.reader().await;
    let not_found_after = env.settings.poll.not_found_after;
    for id in &unknown {
        let r = row(&store, id).await;
        assert_eq!(r.tracking, "not_found");
        assert_eq!(r.status, None);
        assert!(store.transitions(id).await.unwrap().is_empty());
        // Only once unknown for poll.not_found_after since enqueue.
        let (enqueued, finished) = (
            parse_time(&r.enqueued_at).unwrap(),
            parse_time(r.finished_at.as_deref().unwrap()).unwrap(),
        );
        assert!(
            finished.duration_since(enqueued).unwrap() >= not_found_after,
            "{r:?}"
        );
    }
    let stats = env.sim.stats();
    // The list call answers many actions at once: far less than one call per action.
    let per_action = stats.api_calls as f64 / all.len() as f64;
    assert!(
        per_action < 1.0,
        "{per_action} calls per action ({stats:?})"
    );
    // An id missing from a list answer is confirmed by GETs on the usual backoff until
    // not_found_after has passed: a handful of calls, not one per pass.
    assert!(stats.not_found_answers >= unknown.len() as u64, "{stats:?}");
    for id in &unknown {
        assert!(stats.calls_by_action[id] <= 8, "{id}: {stats:?}");
    }
    assert_eq!(stats.expired_token_calls + stats.unknown_token_calls, 0);
    // Every call was logged before it was sent.
    assert_eq!(
        store.api_call_count().await.unwrap() as u64,
        stats.api_calls
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_and_revoked_tokens_lose_no_polls() {
    let env = TestEnv::new(SimConfig {
        token_lifetime: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await;
    let ids = env.sim.create_random_actions(20, Duration::from_secs(4));
    let daemon = env.start_daemon().await;
    daemon.enqueue(&ids).await;
    // Revoke once the daemon holds a token: the next call gets a 401 and must recover.
    eventually(LIMIT, "first token", || async {
        env.sim.stats().tokens_issued >= 1
    })
    .await;
    env.sim.revoke_tokens();
    wait_finished(&daemon.store, &ids, LIMIT).await;
    let refreshes = daemon.poller.tokens().refreshes();
    daemon.shutdown().await;

    env.assert_all_true(&ids).await;
    let stats = env.sim.stats();
    assert!(refreshes >= 3, "only {refreshes} token refreshes");
    assert_eq!(stats.expired_token_calls, 0, "{stats:?}");
    assert!(
        stats.unknown_token_calls >= 1,
        "revocation was not exercised"
    );
    let store = env.reader().await;
    for id in &ids {
        assert_eq!(row(&store, id).await.error_count, 0, "{id} lost a poll");
    }
}

async fn rate_limited_run(concurrency: u32, batch_size: u32) {
    let env = TestEnv::new(SimConfig {
        rate_limit: Some(SimRateLimit {
            calls: 4,
            window: Duration::from_secs(1),
        }),
        ..SimConfig::default()
    })
    .await;
    let mut settings = env.settings.clone();
    settings.poll.batch_size = batch_size;
    settings.poll.concurrency = concurrency;
    // Calls by id, one at a time or in parallel (sweeps meet 429s in their own test).
    settings.poll.sweep = SweepMode::Off;
    let ids = env.sim.create_random_actions(12, Duration::from_secs(2));
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    daemon.enqueue(&ids).await;
    wait_finished(&daemon.store, &ids, LIMIT).await;
    let paused = daemon.poller.budget().paused_total();
    daemon.shutdown().await;
    env.assert_all_true(&ids).await;
    let stats = env.sim.stats();
    assert!(stats.rate_limited > 0, "the limit was never hit: {stats:?}");
    assert_eq!(stats.early_retries, 0, "sent early after a 429: {stats:?}");
    assert!(paused > Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_by_single_gets() {
    rate_limited_run(1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_with_calls_in_parallel() {
    rate_limited_run(4, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_kind_is_survived() {
    let env = TestEnv::new(SimConfig {
        fault_rate: 0.35,
        slow_delay: Duration::from_millis(1500),
        seed: 7,
        ..SimConfig::default()
    })
    .await;
    let mut settings = env.settings.clone();
    // Slow answers outlast this, so they become time-outs.
    settings.api.timeout = Duration::from_secs(1);
    // Small batches of calls by id make enough calls to meet every kind of fault.
    settings.poll.batch_size = 3;
    settings.poll.sweep = SweepMode::Off;
    let ids = env.sim.create_random_actions(30, Duration::from_secs(3));
    track_to_the_end(&env, &settings, &ids, Duration::from_secs(120)).await;

    let stats = env.sim.stats();
    for kind in Fault::ALL {
        let seen = stats
            .faults_by_kind
            .get(&format!("{kind:?}"))
            .copied()
            .unwrap_or(0);
        assert!(seen > 0, "fault {kind:?} never injected: {stats:?}");
    }
    assert_eq!(stats.early_retries, 0);
    let store = env.reader().await;
    let mut errors = 0;
    let mut texts = Vec::new();
    for id in &ids {
        let r = row(&store, id).await;
        errors += r.error_count;
        texts.extend(r.last_error);
    }
    assert!(errors > 0, "faults left no trace in error_count");
    assert!(texts.iter().all(|t| !t.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_list_filter_falls_back_to_single_gets() {
    let env = TestEnv::new(SimConfig {
        rejected_filters: vec![FilterForm::IdIn, FilterForm::IdEqOr],
        ..SimConfig::default()
    })
    .await;
    let ids = env.sim.create_random_actions(8, Duration::from_secs(2));
    let mut settings = env.settings.clone();
    settings.poll.sweep = SweepMode::Off;
    track_to_the_end(&env, &settings, &ids, LIMIT).await;
    let stats = env.sim.stats();
    assert_eq!(
        stats.list_calls, 1,
        "the refused filter was retried: {stats:?}"
    );
    assert!(stats.get_calls >= ids.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_only_after_the_deadline() {
    let env = TestEnv::new(SimConfig::default()).await;
    let mut settings = env.settings.clone();
    settings.poll.give_up_after = Duration::from_secs(2);
    let slow = env.sim.create_action(Lifecycle::simple(
        Duration::from_millis(200),
        Duration::from_secs(600),
        ActionStatus::Succeeded,
    ));
    let quick = env.sim.create_action(Lifecycle::simple(
        Duration::from_millis(100),
        Duration::from_millis(300),
        ActionStatus::Succeeded,
    ));
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    let enqueued = SystemTime::now();
    daemon.enqueue(&[slow.clone(), quick.clone()]).await;
    wait_finished(&daemon.store, &[slow.clone(), quick.clone()], LIMIT).await;
    daemon.shutdown().await;

    let store = env.reader().await;
    let r = row(&store, &slow).await;
    assert_eq!(r.tracking, "gave_up");
    assert_eq!(r.status.as_deref(), Some("InProgress"));
    let finished = mde_actiond::domain::parse_time(r.finished_at.as_deref().unwrap()).unwrap();
    assert!(finished.duration_since(enqueued).unwrap() >= Duration::from_secs(2));
    assert_eq!(row(&store, &quick).await.tracking, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_statuses_are_recorded_and_polled_on() {
    let env = TestEnv::new(SimConfig::default()).await;
    let id = env.sim.create_action(Lifecycle::new(vec![
        (Duration::ZERO, ActionStatus::Pending),
        (
            Duration::from_millis(500),
            ActionStatus::Other("Queued".into()),
        ),
        (Duration::from_millis(1500), ActionStatus::Succeeded),
    ]));
    let daemon = env.start_daemon().await;
    daemon.enqueue(std::slice::from_ref(&id)).await;
    wait_finished(&daemon.store, std::slice::from_ref(&id), LIMIT).await;
    daemon.shutdown().await;
    env.assert_all_true(std::slice::from_ref(&id)).await;
    let store = env.reader().await;
    let log: Vec<String> = store
        .transitions(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.to_status)
        .collect();
    assert_eq!(log, vec!["Pending", "Queued", "Succeeded"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_resumes_from_the_database() {
    let env = TestEnv::new(SimConfig::default()).await;
    let ids = env.sim.create_random_actions(25, Duration::from_secs(3));
    let first = env.start_daemon().await;
    first.enqueue(&ids).await;
    eventually(LIMIT, "some transitions", || async {
        first.poller.stats().transitions.get() >= 10
    })
    .await;
    first.shutdown().await;
    // A second daemon on the same file refuses to start while one runs; none runs now.
    let second = env.start_daemon().await;
    let third = RunningDaemon::start(&env.settings).await;
    assert!(matches!(
        third,
        Err(mde_actiond::daemon::DaemonError::Lock(
            mde_actiond::lock::LockError::AlreadyRunning { .. }
        ))
    ));
    wait_finished(&second.store, &ids, LIMIT).await;
    second.shutdown().await;
    env.assert_all_true(&ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_enqueued_by_another_process_are_picked_up_without_a_wake() {
    let env = TestEnv::new(SimConfig::default()).await;
    let daemon = env.start_daemon().await;
    // Written through a separate connection pool, as the CLI would; no wake() is sent.
    let other = mde_actiond::store::Store::open(&env.db(), mde_actiond::store::OpenMode::ReadWrite)
        .await
        .unwrap();
    let id = env.sim.create_action(Lifecycle::simple(
        Duration::from_millis(100),
        Duration::from_millis(100),
        ActionStatus::Failed,
    ));
    other
        .enqueue(std::slice::from_ref(&id), SystemTime::now())
        .await
        .unwrap();
    other.close().await;
    wait_finished(
        &daemon.store,
        std::slice::from_ref(&id),
        Duration::from_secs(20),
    )
    .await;
    daemon.shutdown().await;
    env.assert_all_true(&[id]).await;
}

/// The acceptance run: 200 actions, 5-second tokens, a 750/min budget, 15% injected faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_200_actions_with_faults_and_short_tokens() {
    let env = TestEnv::new(SimConfig {
        token_lifetime: Duration::from_secs(5),
        fault_rate: 0.15,
        token_fault_rate: 0.05,
        slow_delay: Duration::from_millis(800),
        seed: 2026,
        ..SimConfig::default()
    })
    .await;
    let mut settings = env.settings.clone();
    settings.rate_limit.per_minute = 750;
    settings.rate_limit.per_hour = 1500;
    let ids = env.sim.create_random_actions(200, Duration::from_secs(6));
    let started = std::time::Instant::now();
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    daemon.enqueue(&ids).await;
    wait_finished(&daemon.store, &ids, Duration::from_secs(180)).await;
    let refreshes = daemon.poller.tokens().refreshes();
    daemon.shutdown().await;
    let elapsed = started.elapsed();
    env.assert_all_true(&ids).await;
    let stats = env.sim.stats();
    let store = env.reader().await;
    let transitions: usize = {
        let mut n = 0;
        for id in &ids {
            n += store.transitions(id).await.unwrap().len();
        }
        n
    };
    let per_action = stats.api_calls as f64 / ids.len() as f64;
    eprintln!(
        "acceptance: {} actions in {:.1}s; {} API calls ({} list, {} get) = {per_action:.3} per action; \
         {} faults injected {:?}; {} 429s; {} early retries; {} token refreshes, {} calls with expired tokens; \
         {transitions} transitions",
        ids.len(),
        elapsed.as_secs_f64(),
        stats.api_calls,
        stats.list_calls,
        stats.get_calls,
        stats.faults_injected,
        stats.faults_by_kind,
        stats.rate_limited,
        stats.early_retries,
        refreshes,
        stats.expired_token_calls,
    );
    assert_eq!(stats.early_retries, 0);
    assert_eq!(stats.expired_token_calls, 0);
    assert!(per_action < 1.0, "{per_action} calls per action");
    assert!(stats.faults_injected > 0);
}

/// Runs the daemon until every action in `ids` has finished, then checks each against the
/// simulator's truth.
async fn track_to_the_end(
    env: &TestEnv,
    settings: &mde_actiond::config::Settings,
    ids: &[ActionId],
    limit: Duration,
) {
    let daemon = RunningDaemon::start(settings).await.unwrap();
    daemon.enqueue(ids).await;
    wait_finished(&daemon.store, ids, limit).await;
    daemon.shutdown().await;
    env.assert_all_true(ids).await;
}

/// Small batches and pages, so a few dozen actions make sweeps the cheaper way and need
/// several pages each.
fn sweeping(env: &TestEnv) -> mde_actiond::config::Settings {
    let mut s = env.settings.clone();
    s.poll.batch_size = 4;
    s.poll.sweep_page_size = 10;
    s
}

async fn sweeps(store: &mde_actiond::store::Store) -> Vec<mde_actiond::store::SweepRow> {
    store.sweeps(10_000).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_page_through_a_shifting_tenant_and_miss_nothing() {
    let env = TestEnv::new(SimConfig::default()).await;
    let ids = env.sim.create_random_actions(40, Duration::from_secs(3));
    // Other tools' actions share the listing; they are never tracked.
    let mut others = env.sim.create_random_actions(25, Duration::from_secs(3));
    let daemon = RunningDaemon::start(&sweeping(&env)).await.unwrap();
    daemon.enqueue(&ids).await;
    // New actions arriving mid-run shift every page of the next sweeps.
    eventually(LIMIT, "a first sweep", || async {
        !sweeps(&daemon.store).await.is_empty()
    })
    .await;
    others.extend(env.sim.create_random_actions(15, Duration::from_secs(2)));
    wait_finished(&daemon.store, &ids, LIMIT).await;
    let metric_checks = daemon.poller.metrics().checks.get();
    daemon.shutdown().await;
    env.assert_all_true(&ids).await;

    let store = env.reader().await;
    for id in &others {
        assert!(
            store.action(id).await.unwrap().is_none(),
            "{id} was tracked"
        );
    }
    let done = sweeps(&store).await;
    let complete: Vec<_> = done
        .iter()
        .filter(|s| s.outcome.as_deref() == Some("complete"))
        .collect();
    assert!(
        complete.iter().any(|s| s.pages >= 2),
        "no sweep needed a second page: {done:#?}"
    );
    assert!(complete.iter().all(|s| s.finished_at.is_some()));
    let checked: i64 = complete.iter().map(|s| s.checked).sum();
    // Sweeps do most of the checking; the actions a sweep did not list (created after its
    // window was read, or shifted past its last page) are fetched by id before the next one,
    // so on a fast run one sweep plus those fetches can be the whole story.
    assert!(
        checked * 2 >= ids.len() as i64,
        "{checked} checks by sweeps for {} actions",
        ids.len()
    );
    // The checks metric counts each sweep finding once, plus answers to calls by id.
    let swept: i64 = done.iter().map(|s| s.checked).sum();
    let logged = store
        .check_summary(SystemTime::UNIX_EPOCH, SystemTime::now())
        .await
        .unwrap();
    assert!(
        (swept..=logged.checks).contains(&(metric_checks as i64)),
        "metric {metric_checks}, sweeps {swept}, logged {logged:?}"
    );
    // Sweep calls are tagged with their sweep in the call log.
    let stats = env.sim.stats();
    let swept_calls = stats
        .list_calls_by_form
        .get(&FilterForm::CreatedSince)
        .copied()
        .unwrap_or(0)
        + stats
            .list_calls_by_form
            .get(&FilterForm::StatusIn)
            .copied()
            .unwrap_or(0);
    let pages: i64 = done.iter().map(|s| s.pages).sum();
    assert!(
        swept_calls >= pages as u64,
        "{swept_calls} sweep calls, {pages} pages"
    );
    assert_eq!(
        store.api_call_count().await.unwrap() as u64,
        stats.api_calls
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sweep_filters_fall_back_form_by_form() {
    let env = TestEnv::new(SimConfig {
        rejected_filters: vec![FilterForm::CreatedSince, FilterForm::StatusIn],
        ..SimConfig::default()
    })
    .await;
    let ids = env.sim.create_random_actions(40, Duration::from_secs(3));
    track_to_the_end(&env, &sweeping(&env), &ids, LIMIT).await;

    let stats = env.sim.stats();
    let by_form = |f: FilterForm| stats.list_calls_by_form.get(&f).copied().unwrap_or(0);
    // Each refused form was asked once, never again.
    assert_eq!(by_form(FilterForm::CreatedSince), 1, "{stats:?}");
    assert_eq!(by_form(FilterForm::StatusIn), 1, "{stats:?}");
    assert!(by_form(FilterForm::StatusEqOr) >= 2, "{stats:?}");
    let store = env.reader().await;
    let done = sweeps(&store).await;
    let rejected: Vec<&str> = done
        .iter()
        .filter(|s| s.outcome.as_deref() == Some("rejected"))
        .map(|s| s.filter.as_str())
        .collect();
    assert_eq!(rejected.len(), 2, "{done:#?}");
    assert!(rejected.contains(&"created_since") && rejected.contains(&"status_in"));
    // A status listing holds only unfinished actions: the ones it stopped listing were
    // fetched by id, which is how every terminal status got recorded.
    let missing: i64 = done
        .iter()
        .filter(|s| s.filter == "status_eq_or")
        .map(|s| s.missing)
        .sum();
    assert!(missing > 0, "{done:#?}");
    assert!(by_form(FilterForm::IdIn) > 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_sweep_filter_refused_calls_by_id_do_the_work() {
    let env = TestEnv::new(SimConfig {
        rejected_filters: vec![
            FilterForm::CreatedSince,
            FilterForm::StatusIn,
            FilterForm::StatusEqOr,
        ],
        ..SimConfig::default()
    })
    .await;
    let ids = env.sim.create_random_actions(30, Duration::from_secs(2));
    track_to_the_end(&env, &sweeping(&env), &ids, LIMIT).await;
    let stats = env.sim.stats();
    for form in [
        FilterForm::CreatedSince,
        FilterForm::StatusIn,
        FilterForm::StatusEqOr,
    ] {
        assert_eq!(
            stats.list_calls_by_form.get(&form).copied(),
            Some(1),
            "{form:?}: {stats:?}"
        );
    }
    assert!(stats.list_calls_by_form[&FilterForm::IdIn] >= (ids.len() / 4) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_survive_rate_limits_and_faults() {
    let env = TestEnv::new(SimConfig {
        rate_limit: Some(SimRateLimit {
            calls: 6,
            window: Duration::from_secs(1),
        }),
        fault_rate: 0.25,
        slow_delay: Duration::from_millis(1500),
        seed: 11,
        ..SimConfig::default()
    })
    .await;
    let mut settings = sweeping(&env);
    settings.api.timeout = Duration::from_secs(1);
    let ids = env.sim.create_random_actions(40, Duration::from_secs(3));
    env.sim.create_random_actions(20, Duration::from_secs(3));
    track_to_the_end(&env, &settings, &ids, Duration::from_secs(120)).await;
    let stats = env.sim.stats();
    assert_eq!(stats.early_retries, 0, "sent early after a 429: {stats:?}");
    let store = env.reader().await;
    let done = sweeps(&store).await;
    assert!(
        done.iter()
            .any(|s| s.outcome.as_deref() == Some("complete")),
        "{done:#?}"
    );
    assert!(
        done.iter().any(|s| s.outcome.as_deref() == Some("failed")),
        "no sweep met a fault: {done:#?} {stats:?}"
    );
    assert!(done.iter().all(|s| s.outcome.is_some()), "{done:#?}");
}
