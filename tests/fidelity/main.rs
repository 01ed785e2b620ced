//! The daemon against a tenant that behaves the way public clients report the real service
//! does: new ids invisible for seconds, error bodies of several shapes, 403s that name roles,
//! the full entity with live-response commands and partial cancels, 2 to 7 fractional
//! digits, and filters that are refused or silently not applied.
// The tests talk to the daemon as its users do; the outbound policy of clippy.toml is the
// daemon's own.
#![allow(clippy::disallowed_methods)]

#[path = "../common/mod.rs"]
mod common;

use std::time::{Duration, SystemTime};

use common::*;
use mde_actiond::config::SweepMode;
use mde_actiond::domain::{ActionId, ActionStatus, parse_time};
use mde_actiond::metrics::Snapshot;
use mde_actiond::sim::{FilterForm, Lifecycle, SimConfig};

const LIMIT: Duration = Duration::from_secs(90);

fn unknown_ids(n: usize, seed: u64) -> Vec<ActionId> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| ActionId::random(&mut rng)).collect()
}

/// Enqueues `ids` the moment they are created, waits for the end and checks that none was
/// lost to the visibility delay and that every transition log matches the truth.
async fn hidden_run(batch_size: u32, actions: usize, seed: u64) {
    let env = TestEnv::new(SimConfig {
        visibility_delay: Duration::from_secs(10),
        seed,
        ..SimConfig::default()
    })
    .await;
    let mut settings = env.settings.clone();
    settings.poll.not_found_after = mde_actiond::config::Settings::default()
        .poll
        .not_found_after;
    settings.poll.batch_size = batch_size;
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    let ids = env
        .sim
        .create_random_actions(actions, Duration::from_secs(3));
    daemon.enqueue(&ids).await;
    wait_finished(&daemon.store, &ids, LIMIT).await;
    daemon.shutdown().await;

    let store = env.reader().await;
    let counts = store.counts().await.unwrap();
    let stats = env.sim.stats();
    let transitions: usize = {
        let mut n = 0;
        for id in &ids {
            n += store.transitions(id).await.unwrap().len();
        }
        n
    };
    eprintln!(
        "hidden 0-10 s, batch {batch_size}: {actions} actions, {} not_found, {transitions} transitions checked, {} 404 answers, {} API calls",
        counts.tracking(mde_actiond::domain::Tracking::NotFound),
        stats.not_found_answers,
        stats.api_calls
    );
    assert_eq!(
        counts.tracking(mde_actiond::domain::Tracking::NotFound),
        0,
        "{counts:?}"
    );
    assert!(
        stats.not_found_answers > 0,
        "the visibility delay was never met: {stats:?}"
    );
    env.assert_all_true(&ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_actions_hidden_for_seconds_are_not_lost_to_calls_by_id() {
    hidden_run(100, 100, 21).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_actions_hidden_for_seconds_are_not_lost_to_sweeps() {
    // Small batches make sweeps cheaper than calls by id, so the listings (which do not show
    // hidden ids either) do the checking.
    hidden_run(5, 60, 22).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_end_not_found_only_after_not_found_after_across_a_restart() {
    let env = TestEnv::new(SimConfig::default()).await;
    let mut settings = env.settings.clone();
    settings.poll.not_found_after = Duration::from_secs(4);
    let unknown = unknown_ids(3, 5);
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    daemon.enqueue(&unknown).await;
    // Tried and told "not yet" at least once before the restart.
    eventually(LIMIT, "first 404s recorded", || async {
        let mut all = true;
        for id in &unknown {
            all &= daemon.store.action(id).await.unwrap().unwrap().error_count > 0;
        }
        all
    })
    .await;
    daemon.shutdown().await;
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    wait_finished(&daemon.store, &unknown, LIMIT).await;
    daemon.shutdown().await;

    let store = env.reader().await;
    for id in &unknown {
        let r = row(&store, id).await;
        assert_eq!(r.tracking, "not_found", "{r:?}");
        let waited = parse_time(r.finished_at.as_deref().unwrap())
            .unwrap()
            .duration_since(parse_time(&r.enqueued_at).unwrap())
            .unwrap();
        // Counted from enqueue, not from the restart.
        assert!(waited >= settings.poll.not_found_after, "{waited:?} {r:?}");
        assert!(
            waited < settings.poll.not_found_after * 3,
            "{waited:?} {r:?}"
        );
        assert!(r.poll_count >= 2, "{r:?}");
        assert!(
            r.last_error.as_deref().unwrap_or("").contains("not know"),
            "{r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_base_url_path_ends_nothing() {
    let env = TestEnv::new(SimConfig::default()).await;
    let mut settings = env.settings.clone();
    // The front end answers its own HTML 404 page for a path that is not the API's.
    settings.api.base_url = Some(format!("{}/wrong/prefix", env.sim.base_url()));
    settings.poll.sweep = SweepMode::Off;
    let real = env.sim.create_random_actions(3, Duration::from_secs(1));
    let unknown = unknown_ids(2, 9);
    let all: Vec<ActionId> = real.iter().chain(&unknown).cloned().collect();
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    daemon.enqueue(&all).await;
    // Well past not_found_after, with several tries each.
    let since = SystemTime::now();
    eventually(LIMIT, "several failed polls of each", || async {
        let mut all_tried = true;
        for id in &all {
            all_tried &= daemon.store.action(id).await.unwrap().unwrap().error_count >= 3;
        }
        all_tried && since.elapsed().unwrap() > settings.poll.not_found_after * 2
    })
    .await;
    let metrics = daemon.poller.metrics().render(&Snapshot::default());
    daemon.shutdown().await;
    let store = env.reader().await;
    for id in &all {
        let r = row(&store, id).await;
        assert_eq!(r.tracking, "active", "{r:?}");
        let e = r.last_error.unwrap();
        assert!(
            e.contains("/wrong/prefix/api/machineactions") && e.contains("api.base_url"),
            "{e}"
        );
    }
    let not_api: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mde_actiond_not_api_answers_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(not_api >= 3, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_that_ended_not_found_comes_back_when_a_sweep_lists_it() {
    let env = TestEnv::new(SimConfig::default()).await;
    let mut settings = env.settings.clone();
    settings.poll.not_found_after = Duration::from_millis(500);
    // One id per call: with a few actions tracked a sweep is the cheaper check.
    settings.poll.batch_size = 1;
    let long = |_| {
        env.sim.create_action(Lifecycle::simple(
            Duration::from_millis(200),
            Duration::from_secs(600),
            ActionStatus::Succeeded,
        ))
    };
    let others: Vec<ActionId> = (0..4).map(long).collect();
    let late = env.sim.create_hidden_action(
        Lifecycle::simple(
            Duration::from_secs(1),
            Duration::from_secs(5),
            ActionStatus::Succeeded,
        ),
        "Isolate",
        3,
        Duration::from_secs(3),
    );
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    daemon.enqueue(&others).await;
    daemon.enqueue(std::slice::from_ref(&late)).await;
    eventually(LIMIT, "the hidden id ends not_found", || async {
        daemon.store.action(&late).await.unwrap().unwrap().tracking == "not_found"
    })
    .await;
    eventually(LIMIT, "revived and done", || async {
        daemon.store.action(&late).await.unwrap().unwrap().tracking == "done"
    })
    .await;
    let metrics = daemon.poller.metrics().render(&Snapshot::default());
    daemon.shutdown().await;
    let store = env.reader().await;
    let r = row(&store, &late).await;
    assert!(r.revived_at.is_some(), "{r:?}");
    let log = store.transitions(&late).await.unwrap();
    env.sim
        .verify_transitions(&late, &log, true)
        .unwrap_or_else(|e| panic!("{e}\n{log:#?}"));
    assert!(metrics.contains("mde_actiond_revived_total 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_filter_the_service_ignores_is_dropped_like_a_refused_one() {
    let env = TestEnv::new(SimConfig {
        ignored_filters: vec![FilterForm::IdIn, FilterForm::IdEqOr],
        ..SimConfig::default()
    })
    .await;
    let ids = env.sim.create_random_actions(8, Duration::from_secs(2));
    // Newer actions nobody tracks: an answer that ignores the filter lists them first.
    env.sim.create_random_actions(20, Duration::from_secs(1));
    let mut settings = env.settings.clone();
    settings.poll.sweep = SweepMode::Off;
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    daemon.enqueue(&ids).await;
    wait_finished(&daemon.store, &ids, LIMIT).await;
    daemon.shutdown().await;
    let stats = env.sim.stats();
    assert_eq!(
        stats.list_calls, 1,
        "the ignored filter was used again: {stats:?}"
    );
    env.assert_all_true(&ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_filters_the_service_ignores_are_dropped_form_by_form() {
    let env = TestEnv::new(SimConfig {
        ignored_filters: vec![FilterForm::CreatedSince, FilterForm::StatusIn],
        ..SimConfig::default()
    })
    .await;
    // Older, finished actions: a listing that ignores its filter shows them.
    let old = env.sim.create_action(Lifecycle::simple(
        Duration::ZERO,
        Duration::ZERO,
        ActionStatus::Succeeded,
    ));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let ids = env.sim.create_random_actions(30, Duration::from_secs(3));
    let mut settings = env.settings.clone();
    settings.poll.batch_size = 5;
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    daemon.enqueue(&ids).await;
    wait_finished(&daemon.store, &ids, LIMIT).await;
    daemon.shutdown().await;
    let store = env.reader().await;
    let sweeps = store.sweeps(1000).await.unwrap();
    let outcome = |filter: &str, outcome: &str| {
        sweeps
            .iter()
            .filter(|s| s.filter == filter && s.outcome.as_deref() == Some(outcome))
            .count()
    };
    // Each ignored form caught once and never tried again; the form that works carries on.
    assert_eq!(outcome("created_since", "rejected"), 1, "{sweeps:#?}");
    assert_eq!(outcome("status_in", "rejected"), 1, "{sweeps:#?}");
    assert_eq!(
        sweeps.iter().filter(|s| s.filter != "status_eq_or").count(),
        2
    );
    assert!(outcome("status_eq_or", "complete") > 0, "{sweeps:#?}");
    store.close().await;
    assert_eq!(env.sim.status_now(&old), Some(ActionStatus::Succeeded));
    env.assert_all_true(&ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_app_is_not_ready_and_readiness_names_the_roles() {
    let env = TestEnv::new(SimConfig {
        token_roles: vec!["Machine.Isolate".into()],
        ..SimConfig::default()
    })
    .await;
    let mut settings = env.settings.clone();
    settings.http.listen = Some("127.0.0.1:0".into());
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    let id = env.sim.create_action(Lifecycle::simple(
        Duration::from_millis(100),
        Duration::from_millis(200),
        ActionStatus::Succeeded,
    ));
    daemon.enqueue(std::slice::from_ref(&id)).await;
    let base = format!("http://{}", daemon.http_addr.unwrap());
    let http = reqwest::Client::new();
    let readyz = || async {
        let r = http.get(format!("{base}/readyz")).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    eventually(LIMIT, "readyz turns 503", || async {
        readyz().await.0 == 503
    })
    .await;
    let (_, text) = readyz().await;
    assert!(
        text.contains("Machine.Read.All") && text.contains("it has Machine.Isolate"),
        "{text}"
    );
    // Consent granted: the next token carries the role, the next call succeeds.
    env.sim.set_token_roles(vec!["Machine.Read.All".into()]);
    env.sim.revoke_tokens();
    wait_finished(&daemon.store, std::slice::from_ref(&id), LIMIT).await;
    eventually(LIMIT, "readyz back to 200", || async {
        readyz().await.0 == 200
    })
    .await;
    daemon.shutdown().await;
    env.assert_all_true(&[id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_entity_live_response_commands_and_partial_cancels_are_kept() {
    let env = TestEnv::new(SimConfig::default()).await;
    let ms = Duration::from_millis;
    let lr = |l| env.sim.create_action_on(l, "LiveResponse", 1);
    let succeeded = lr(Lifecycle::simple(ms(100), ms(300), ActionStatus::Succeeded));
    let partial = lr(Lifecycle::simple(ms(100), ms(300), ActionStatus::Cancelled));
    let cancelled_pending = lr(Lifecycle::new(vec![
        (Duration::ZERO, ActionStatus::Pending),
        (ms(200), ActionStatus::Cancelled),
    ]));
    let failed = env.sim.create_action_on(
        Lifecycle::simple(ms(100), ms(200), ActionStatus::Failed),
        "Isolate",
        2,
    );
    let ids = [
        succeeded.clone(),
        partial.clone(),
        cancelled_pending.clone(),
        failed.clone(),
    ];
    track(&env, &ids).await;

    let store = env.reader().await;
    let p = row(&store, &partial).await;
    assert_eq!(p.status.as_deref(), Some("Cancelled"));
    assert_eq!(
        p.fields.cancellation_requestor.as_deref(),
        Some("lead@contoso.com")
    );
    assert!(
        p.fields.cancellation_comment.is_some() && p.fields.cancelled_at.is_some(),
        "{p:?}"
    );
    assert_eq!(p.fields.request_source.as_deref(), Some("PublicApi"));
    assert_eq!(p.fields.error_hresult, Some(0));
    let f = row(&store, &failed).await;
    assert_eq!(f.fields.error_hresult, Some(-2_147_024_891));
    assert!(
        f.fields.scope.is_some() && f.fields.cancelled_at.is_none(),
        "{f:?}"
    );
    store.close().await;

    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", env.db().display()))
        .await
        .unwrap();
    let rows: Vec<CommandRow> = sqlx::query_as(
        "SELECT action_id, action_status, command_index, command_type, command_status, errors
             FROM live_response_commands ORDER BY action_id, command_index",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let find = |id: &ActionId| rows.iter().find(|r| r.0 == id.as_str()).cloned();
    // One row per command: every third session also ran a GetFile (index 1).
    let getfile: Vec<_> = rows.iter().filter(|r| r.2 == Some(1)).collect();
    assert!(
        getfile.iter().all(|r| r.3.as_deref() == Some("GetFile")) && getfile.len() <= 1,
        "{rows:?}"
    );
    assert_eq!(rows.len(), 3 + getfile.len(), "{rows:?}");
    let (_, st, index, ty, cs, _) = find(&succeeded).unwrap();
    assert_eq!(
        (st.as_str(), index, ty.as_deref(), cs.as_deref()),
        ("Succeeded", Some(0), Some("RunScript"), Some("Completed"))
    );
    // The partial cancel: the action says Cancelled, its command completed.
    let (_, st, _, _, cs, _) = find(&partial).unwrap();
    assert_eq!(
        (st.as_str(), cs.as_deref()),
        ("Cancelled", Some("Completed"))
    );
    let (_, _, _, _, cs, errors) = find(&cancelled_pending).unwrap();
    assert_eq!((cs.as_deref(), errors.as_str()), (Some("Created"), "[]"));
    pool.close().await;

    let out = bin()
        .arg("--db")
        .arg(env.db())
        .args(["status", partial.as_str()])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("cancelled")
            && text.contains("lead@contoso.com")
            && text.contains("wrong device"),
        "{text}"
    );
    let out = bin()
        .arg("--db")
        .arg(env.db())
        .args(["status", failed.as_str()])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("HRESULT 0x80070005"), "{text}");

    // `report` lists the unsuccessful ones with the same fields; the succeeded one is absent.
    let out = bin()
        .env("COLUMNS", "200")
        .arg("--db")
        .arg(env.db())
        .arg("report")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let section = text
        .split("Recently failed, timed out or cancelled")
        .nth(1)
        .unwrap_or_else(|| panic!("no unsuccessful section: {text}"));
    let line = |id: &ActionId| section.lines().find(|l| l.starts_with(id.as_str()));
    assert!(
        line(&failed).is_some_and(|l| l.contains("Failed") && l.contains("HRESULT 0x80070005")),
        "{section}"
    );
    assert!(
        line(&partial).is_some_and(|l| l.contains("cancelled by lead@contoso.com")),
        "{section}"
    );
    assert!(line(&succeeded).is_none(), "{section}");
    let out = bin()
        .arg("--db")
        .arg(env.db())
        .args(["report", "--format", "json"])
        .output()
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let unsuccessful = json["unsuccessful"].as_array().unwrap();
    assert_eq!(unsuccessful.len(), 3, "{unsuccessful:?}");
    let failed_json = unsuccessful
        .iter()
        .find(|u| u["action_id"] == failed.as_str())
        .unwrap();
    assert_eq!(failed_json["error_hresult"], -2_147_024_891_i64);
}

/// action_id, action_status, command_index, command_type, command_status, errors.
type CommandRow = (
    String,
    String,
    Option<i64>,
    Option<String>,
    Option<String>,
    String,
);

async fn track(env: &TestEnv, ids: &[ActionId]) {
    let daemon = env.start_daemon().await;
    daemon.enqueue(ids).await;
    wait_finished(&daemon.store, ids, LIMIT).await;
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_statuses_and_types_are_kept_counted_and_polled_on() {
    let env = TestEnv::new(SimConfig::default()).await;
    let ms = Duration::from_millis;
    let odd = env.sim.create_action_on(
        Lifecycle::new(vec![
            (Duration::ZERO, ActionStatus::Pending),
            (ms(200), ActionStatus::Other("Queued".into())),
            (ms(900), ActionStatus::Succeeded),
        ]),
        "IsolateHarder",
        4,
    );
    let daemon = env.start_daemon().await;
    daemon.enqueue(std::slice::from_ref(&odd)).await;
    wait_finished(&daemon.store, std::slice::from_ref(&odd), LIMIT).await;
    let metrics = daemon.poller.metrics().render(&Snapshot::default());
    daemon.shutdown().await;
    let store = env.reader().await;
    let r = row(&store, &odd).await;
    assert_eq!(r.fields.action_type.as_deref(), Some("IsolateHarder"));
    let log: Vec<String> = store
        .transitions(&odd)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.to_status)
        .collect();
    // Not terminal: polled on through it to the real end.
    assert!(
        log.contains(&"Queued".to_string()) && log.last().map(String::as_str) == Some("Succeeded"),
        "{log:?}"
    );
    assert!(
        metrics.contains(r#"mde_actiond_unknown_values_total{field="status",value="Queued"}"#)
            && metrics.contains(
                r#"mde_actiond_unknown_values_total{field="type",value="IsolateHarder"}"#
            ),
        "{metrics}"
    );
}

/// The simulated tenant serves evidence as MDE-API.md says the service does: a package
/// link only once the collection succeeded (404 before), wrapped in escaped quotes, at 2
/// calls a minute of its own; a plain link for a live response command that completed;
/// blob storage on another origin that takes no bearer token, answers 403
/// `AuthenticationFailed` once a link has expired, streams a package of the configured
/// size, gzips GetFile output and can cut a download short.
#[tokio::test]
async fn the_tenant_serves_evidence_links_and_blobs_like_the_service() {
    use mde_actiond::sim::evidence::{self, EvidenceConfig};
    let env = TestEnv::new(SimConfig {
        evidence: EvidenceConfig {
            package_size: 300_000,
            ..EvidenceConfig::default()
        },
        ..SimConfig::default()
    })
    .await;
    let sim = &env.sim;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let tokens = mde_actiond::auth::TokenProvider::new(
        mde_actiond::auth::build_source(
            &env.settings,
            mde_actiond::mde::http_client(Duration::from_secs(10), Duration::from_secs(5)).unwrap(),
        )
        .unwrap(),
    );
    let token = tokens.token().await.unwrap();
    let api = |path: String| {
        let http = http.clone();
        let bearer = format!("Bearer {}", token.expose());
        let url = format!("{}/api/machineactions/{path}", sim.base_url());
        async move {
            let r = http
                .get(url)
                .header("authorization", bearer)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value =
                serde_json::from_str(&r.text().await.unwrap()).unwrap_or_default();
            (status, body)
        }
    };
    let package = sim.create_action_on(
        Lifecycle::simple(
            Duration::from_millis(100),
            Duration::from_millis(400),
            ActionStatus::Succeeded,
        ),
        "CollectInvestigationPackage",
        3,
    );
    // Not complete yet: 404, ResourceNotFound.
    let (status, body) = api(format!("{package}/getPackageUri")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "ResourceNotFound");
    eventually(
        Duration::from_secs(10),
        "the collection succeeds",
        || async { sim.status_now(&package) == Some(ActionStatus::Succeeded) },
    )
    .await;
    // Ready: the URL wrapped in escaped quotes, on the blob origin.
    let (status, body) = api(format!("{package}/GetPackageUri")).await;
    assert_eq!(status, 200, "{body}");
    let quoted = body["value"].as_str().unwrap();
    assert!(quoted.starts_with('"') && quoted.ends_with('"'), "{quoted}");
    let url = quoted.trim_matches('"').to_string();
    assert!(url.starts_with(&sim.blob_url()), "{url}");
    // Its own limit: the third call within a minute is a 429 with Retry-After.
    let (status, _) = api(format!("{package}/getPackageUri")).await;
    assert_eq!(status, 429);
    let blob = http.get(&url).send().await.unwrap();
    assert_eq!(blob.status(), 200);
    let bytes = blob.bytes().await.unwrap();
    assert_eq!(bytes.len(), 300_000);
    assert_eq!(&bytes[..], &evidence::package_content(300_000)[..]);

    // Live response: a RunScript output (JSON) and a GetFile output (gzip), by index.
    let lr: Vec<ActionId> = (0..3)
        .map(|_| {
            sim.create_action_on(
                Lifecycle::simple(
                    Duration::from_millis(50),
                    Duration::from_millis(100),
                    ActionStatus::Succeeded,
                ),
                "LiveResponse",
                4,
            )
        })
        .collect();
    eventually(Duration::from_secs(10), "the sessions succeed", || async {
        lr.iter()
            .all(|id| sim.status_now(id) == Some(ActionStatus::Succeeded))
    })
    .await;
    let mut outputs = Vec::new();
    for id in &lr {
        for index in 0..2 {
            let (status, body) = api(format!(
                "{id}/GetLiveResponseResultDownloadLink(index={index})"
            ))
            .await;
            if status == 404 {
                continue;
            }
            assert_eq!(status, 200, "{body}");
            let url = body["value"].as_str().unwrap().to_string();
            assert!(
                !url.starts_with('"'),
                "only package links are quoted: {url}"
            );
            let bytes = http.get(&url).send().await.unwrap().bytes().await.unwrap();
            outputs.push((id.clone(), index, bytes.to_vec()));
        }
    }
    let scripts: Vec<_> = outputs.iter().filter(|(_, i, _)| *i == 0).collect();
    assert_eq!(scripts.len(), 3, "every session ran its script");
    for (id, _, bytes) in &scripts {
        let out: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(out["exit_code"], 0);
        assert!(out["script_output"].as_str().unwrap().contains(id.as_str()));
    }
    let files: Vec<_> = outputs.iter().filter(|(_, i, _)| *i == 1).collect();
    assert_eq!(files.len(), 1, "every third session also fetched a file");
    let gz = &files[0].2;
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "GetFile output is gzip");
    assert_eq!(
        gz,
        &evidence::gzip_stored(&evidence::get_file_content(&files[0].0))
    );

    // An expired link: 403 AuthenticationFailed; the link is made anew by asking again.
    sim.set_evidence(EvidenceConfig {
        link_lifetime: Duration::from_secs(1),
        package_size: 300_000,
        drop_downloads: 0,
        ..EvidenceConfig::default()
    });
    let (_, body) = api(format!(
        "{}/GetLiveResponseResultDownloadLink(index=0)",
        lr[0]
    ))
    .await;
    let short = body["value"].as_str().unwrap().to_string();
    let mut expired = http.get(&short).send().await.unwrap();
    assert_eq!(expired.status(), 200, "valid while young");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while expired.status() == 200 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        expired = http.get(&short).send().await.unwrap();
    }
    assert_eq!(expired.status(), 403);
    assert_eq!(
        expired.headers()["x-ms-error-code"].to_str().unwrap(),
        "AuthenticationFailed"
    );
    assert!(
        expired
            .text()
            .await
            .unwrap()
            .contains("Signature not valid")
    );

    // A download cut short: fewer bytes than announced, and the client sees an error.
    sim.set_evidence(EvidenceConfig {
        package_size: 300_000,
        drop_downloads: u32::MAX,
        ..EvidenceConfig::default()
    });
    let (_, body) = api(format!(
        "{}/GetLiveResponseResultDownloadLink(index=0)",
        lr[1]
    ))
    .await;
    let url = body["value"].as_str().unwrap().to_string();
    let cut = http.get(&url).send().await.unwrap().bytes().await;
    assert!(
        cut.is_err(),
        "a body cut short is an error, not a shorter file"
    );

    // Not a live response, or no such command: 404.
    let (status, _) = api(format!(
        "{package}/GetLiveResponseResultDownloadLink(index=0)"
    ))
    .await;
    assert_eq!(status, 404);
    let (status, _) = api(format!(
        "{}/GetLiveResponseResultDownloadLink(index=7)",
        lr[0]
    ))
    .await;
    assert_eq!(status, 404);

    let stats = sim.evidence_stats();
    assert_eq!(stats.authorization_headers, 0);
    assert_eq!(stats.package_uri_limited, 1);
    assert!(
        stats.expired_links >= 1 && stats.downloads_dropped >= 1,
        "{stats:?}"
    );
}
