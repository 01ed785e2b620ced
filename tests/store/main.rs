//! The database as a public interface: the documented schema, transition bookkeeping, the
//! index the scheduler relies on, and what other SQLite clients see.

use std::time::{Duration, SystemTime};

use mde_actiond::domain::{ActionFields, ActionId, ActionStatus, Tracking, format_time};
use mde_actiond::store::{
    Enqueued, NextStep, Observation, OpenMode, PollResult, PollWrite, Store, StoreError,
};
use sqlx::Row;

fn ids(n: usize, seed: u64) -> Vec<ActionId> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n).map(|_| ActionId::random(&mut rng)).collect()
}

async fn fresh() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.db"), OpenMode::ReadWrite)
        .await
        .unwrap();
    (dir, store)
}

/// The file as a reporting tool opens it, after the store has closed it.
async fn read_only(dir: &tempfile::TempDir) -> sqlx::SqlitePool {
    read_only_at(&dir.path().join("t.db")).await
}

fn observed(id: &ActionId, status: ActionStatus, next: NextStep) -> PollWrite {
    PollWrite {
        id: id.clone(),
        result: PollResult::Observed(Box::new(Observation {
            status: Some(status),
            updated_at: Some("2026-11-28T10:00:00.000Z".into()),
            fields: ActionFields {
                action_type: Some("Isolate".into()),
                ..ActionFields::default()
            },
            raw: "{}".into(),
        })),
        next,
    }
}

/// The same answer for each of `ids`.
fn observed_all(ids: &[ActionId], status: ActionStatus, next: &NextStep) -> Vec<PollWrite> {
    ids.iter()
        .map(|id| observed(id, status.clone(), next.clone()))
        .collect()
}

/// An action's transitions as (from, to).
async fn status_log(store: &Store, id: &ActionId) -> Vec<(Option<String>, String)> {
    store
        .transitions(id)
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.from_status, t.to_status))
        .collect()
}

/// (name, declared type, NOT NULL)
type Column = (&'static str, &'static str, bool);

/// The reporting contract: these tables and columns with these types. Adding is fine;
/// removing or retyping one fails here.
#[tokio::test]
async fn schema_matches_the_documented_contract() {
    let (dir, store) = fresh().await;
    store.close().await;
    let pool = read_only(&dir).await;
    let contract: &[(&str, &[Column])] = &[
        (
            "actions",
            &[
                ("action_id", "TEXT", true),
                ("tracking", "TEXT", true),
                ("status", "TEXT", false),
                ("action_type", "TEXT", false),
                ("machine_id", "TEXT", false),
                ("computer_dns_name", "TEXT", false),
                ("requestor", "TEXT", false),
                ("requestor_comment", "TEXT", false),
                ("external_id", "TEXT", false),
                ("mde_created_at", "TEXT", false),
                ("mde_updated_at", "TEXT", false),
                ("enqueued_at", "TEXT", true),
                ("last_polled_at", "TEXT", false),
                ("next_poll_at", "TEXT", false),
                ("poll_count", "INTEGER", true),
                ("error_count", "INTEGER", true),
                ("last_error", "TEXT", false),
                ("last_error_at", "TEXT", false),
                ("finished_at", "TEXT", false),
                ("last_response", "TEXT", false),
                ("request_source", "TEXT", false),
                ("scope", "TEXT", false),
                ("title", "TEXT", false),
                ("error_hresult", "INTEGER", false),
                ("cancellation_requestor", "TEXT", false),
                ("cancellation_comment", "TEXT", false),
                ("cancelled_at", "TEXT", false),
                ("revived_at", "TEXT", false),
                ("correlation", "TEXT", false),
                ("stuck_events", "INTEGER", true),
                ("source", "TEXT", false),
            ],
        ),
        (
            "action_callbacks",
            &[
                ("action_id", "TEXT", true),
                ("url", "TEXT", true),
                ("added_at", "TEXT", true),
            ],
        ),
        (
            "notify_destinations",
            &[
                ("name", "TEXT", true),
                ("kind", "TEXT", true),
                ("events", "TEXT", true),
                ("types", "TEXT", false),
                ("statuses", "TEXT", false),
                ("configured", "INTEGER", true),
                ("failing_since", "TEXT", false),
                ("disabled_at", "TEXT", false),
                ("disabled_reason", "TEXT", false),
            ],
        ),
        (
            "notify_events",
            &[
                ("id", "INTEGER", false),
                ("event_id", "TEXT", true),
                ("type", "TEXT", true),
                ("action_id", "TEXT", false),
                ("seq", "INTEGER", false),
                ("transition_id", "INTEGER", false),
                ("created_at", "TEXT", true),
                ("payload", "TEXT", true),
            ],
        ),
        (
            "notify_deliveries",
            &[
                ("destination", "TEXT", true),
                ("event", "INTEGER", true),
                ("action_id", "TEXT", false),
                ("state", "TEXT", true),
                ("attempts", "INTEGER", true),
                ("next_attempt_at", "TEXT", false),
                ("last_attempt_at", "TEXT", false),
                ("last_status", "INTEGER", false),
                ("last_error", "TEXT", false),
                ("finished_at", "TEXT", false),
            ],
        ),
        (
            "transitions",
            &[
                ("id", "INTEGER", false),
                ("action_id", "TEXT", true),
                ("from_status", "TEXT", false),
                ("to_status", "TEXT", true),
                ("observed_at", "TEXT", true),
                ("mde_updated_at", "TEXT", false),
            ],
        ),
        (
            "api_calls",
            &[
                ("id", "INTEGER", false),
                ("sent_at", "TEXT", true),
                ("endpoint", "TEXT", true),
                ("action_count", "INTEGER", true),
                ("http_status", "INTEGER", false),
                ("outcome", "TEXT", false),
                ("retry_after_ms", "INTEGER", false),
                ("duration_ms", "INTEGER", false),
                ("sweep_id", "INTEGER", false),
            ],
        ),
        (
            "sweeps",
            &[
                ("id", "INTEGER", false),
                ("started_at", "TEXT", true),
                ("finished_at", "TEXT", false),
                ("filter", "TEXT", true),
                ("pages", "INTEGER", true),
                ("listed", "INTEGER", true),
                ("checked", "INTEGER", true),
                ("changed", "INTEGER", true),
                ("missing", "INTEGER", true),
                ("outcome", "TEXT", false),
                ("discovered", "INTEGER", true),
            ],
        ),
    ];
    for (table, columns) in contract {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA table_info({table})")))
            .fetch_all(&pool)
            .await
            .unwrap();
        let actual: Vec<(String, String, bool)> = rows
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>("name"),
                    r.get::<String, _>("type"),
                    r.get::<i64, _>("notnull") == 1,
                )
            })
            .collect();
        for (name, ty, not_null) in *columns {
            let found = actual.iter().find(|(n, _, _)| n == name);
            assert_eq!(
                found.map(|(_, t, nn)| (t.as_str(), *nn)),
                Some((*ty, *not_null)),
                "{table}.{name}: documented as {ty}{}",
                if *not_null { " NOT NULL" } else { "" }
            );
        }
    }
    // The views and their columns (a view's columns are part of the contract too).
    let views: &[(&str, &[&str])] = &[
        (
            "action_summary",
            &[
                "action_id",
                "action_type",
                "machine_id",
                "computer_dns_name",
                "requestor",
                "tracking",
                "status",
                "mde_created_at",
                "enqueued_at",
                "finished_at",
                "in_progress_at",
                "terminal_at",
                "seconds_to_in_progress",
                "seconds_to_terminal",
                "poll_count",
                "error_count",
            ],
        ),
        (
            "device_containment",
            &[
                "machine_id",
                "computer_dns_name",
                "isolated",
                "isolation_action_id",
                "isolation_changed_at",
                "code_execution_restricted",
                "restriction_action_id",
                "restriction_changed_at",
            ],
        ),
        (
            "daily_stats",
            &[
                "day",
                "action_type",
                "actions",
                "finished",
                "succeeded",
                "success_rate",
                "p50_seconds_to_terminal",
                "p95_seconds_to_terminal",
            ],
        ),
        (
            "live_response_commands",
            &[
                "action_id",
                "machine_id",
                "computer_dns_name",
                "action_status",
                "command_index",
                "command_type",
                "command_status",
                "started_at",
                "ended_at",
                "errors",
                "params",
            ],
        ),
        (
            "stuck_actions",
            &[
                "action_id",
                "action_type",
                "computer_dns_name",
                "status",
                "mde_created_at",
                "enqueued_at",
                "last_polled_at",
                "poll_count",
                "error_count",
                "last_error",
                "age_seconds",
            ],
        ),
        ("schema_info", &["name", "value"]),
        ("report_settings", &["name", "value"]),
    ];
    for (view, columns) in views {
        let query = sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA table_info({view})")));
        let names = column(&pool, query, "name").await;
        for c in *columns {
            assert!(
                names.iter().any(|n| n == c),
                "{view}.{c} missing (has {names:?})"
            );
        }
    }
    let major: String = sqlx::query_scalar("SELECT value FROM schema_info WHERE name = 'major'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        major, "1",
        "a breaking change needs a new major version and a migration note"
    );
    let minor: String = sqlx::query_scalar("SELECT value FROM schema_info WHERE name = 'minor'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        minor, "6",
        "schema 1.6 moved the kinds of API call to api_call_kinds"
    );

    // The transitions table refers to actions.
    let fks = sqlx::query("PRAGMA foreign_key_list(transitions)")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(fks.len(), 1);
    assert_eq!(fks[0].get::<String, _>("table"), "actions");
    // WAL mode is a property of the file: readers rely on it.
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn enqueue_reports_known_ids_and_keeps_their_state() {
    let (_dir, store) = fresh().await;
    let a = ids(3, 1);
    let now = SystemTime::now();
    assert_eq!(
        store.enqueue(&a[..2], now).await.unwrap(),
        vec![Enqueued::Added; 2]
    );
    store
        .record_polls(
            &[observed(
                &a[0],
                ActionStatus::Succeeded,
                NextStep::Finish(Tracking::Done),
            )],
            now,
        )
        .await
        .unwrap();
    let again = store.enqueue(&a, now).await.unwrap();
    assert_eq!(
        again,
        vec![
            Enqueued::Known(Tracking::Done),
            Enqueued::Known(Tracking::Active),
            Enqueued::Added
        ]
    );
    assert_eq!(store.action(&a[0]).await.unwrap().unwrap().tracking, "done");
}

#[tokio::test]
async fn a_replayed_observation_is_not_a_new_transition() {
    let (_dir, store) = fresh().await;
    let a = ids(1, 2);
    let now = SystemTime::now();
    store.enqueue(&a, now).await.unwrap();
    let later = NextStep::PollAt(now + Duration::from_secs(5));
    for _ in 0..3 {
        let s = store
            .record_polls(
                &[observed(&a[0], ActionStatus::Pending, later.clone())],
                now,
            )
            .await
            .unwrap();
        let _ = s;
    }
    store
        .record_polls(
            &[observed(&a[0], ActionStatus::InProgress, later.clone())],
            now,
        )
        .await
        .unwrap();
    let s = store
        .record_polls(
            &[observed(
                &a[0],
                ActionStatus::Succeeded,
                NextStep::Finish(Tracking::Done),
            )],
            now,
        )
        .await
        .unwrap();
    assert_eq!(s.transitions.len(), 1);
    assert_eq!(s.finished, 1);
    // A late duplicate after the end changes nothing: finished actions are never reopened.
    let s = store
        .record_polls(&[observed(&a[0], ActionStatus::InProgress, later)], now)
        .await
        .unwrap();
    assert_eq!(s.transitions.len(), 0);
    assert_eq!(
        status_log(&store, &a[0]).await,
        vec![
            (None, "Pending".into()),
            (Some("Pending".into()), "InProgress".into()),
            (Some("InProgress".into()), "Succeeded".into()),
        ]
    );
    let row = store.action(&a[0]).await.unwrap().unwrap();
    assert_eq!(row.poll_count, 5);
    assert_eq!(row.tracking, "done");
    assert!(row.next_poll_at.is_none());
}

/// A sweep page writes in several batches and commits once: nothing is seen before the
/// commit, a dropped batch leaves no trace, and a later batch sees an earlier one's rows.
#[tokio::test]
async fn a_poll_batch_commits_all_its_writes_or_none() {
    let (_dir, store) = fresh().await;
    let a = ids(4, 9);
    let now = SystemTime::now();
    store.enqueue(&a, now).await.unwrap();
    let later = NextStep::PollAt(now + Duration::from_secs(5));
    let first = observed_all(&a, ActionStatus::Pending, &later);
    let second = [observed(&a[0], ActionStatus::InProgress, later.clone())];

    let mut batch = store.begin_polls().await.unwrap();
    batch.record(&first, now, true).await.unwrap();
    batch.record(&second, now, true).await.unwrap();
    drop(batch);
    for id in &a {
        assert!(store.transitions(id).await.unwrap().is_empty());
        let row = store.action(id).await.unwrap().unwrap();
        assert_eq!((row.status, row.poll_count), (None, 0));
    }

    let mut batch = store.begin_polls().await.unwrap();
    batch.record(&first, now, true).await.unwrap();
    // The writer is held: a reader still sees the state before the batch.
    assert!(store.transitions(&a[1]).await.unwrap().is_empty());
    batch.record(&second, now, true).await.unwrap();
    let summary = batch.commit().await.unwrap();
    assert_eq!(summary.transitions.len(), 5);
    assert_eq!(
        status_log(&store, &a[0]).await,
        vec![
            (None, "Pending".into()),
            (Some("Pending".into()), "InProgress".into()),
        ]
    );
    for id in &a[1..] {
        let row = store.action(id).await.unwrap().unwrap();
        assert_eq!(row.status.as_deref(), Some("Pending"));
    }
    // The write connection is free again.
    store
        .record_polls(&[observed(&a[1], ActionStatus::InProgress, later)], now)
        .await
        .unwrap();
    assert_eq!(store.transitions(&a[1]).await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_unchanged_listing_moves_only_the_schedule() {
    let (_dir, store) = fresh().await;
    let a = ids(2, 21);
    let now = SystemTime::now();
    store.enqueue(&a, now).await.unwrap();
    let soon = NextStep::PollAt(now + Duration::from_secs(5));
    let first = observed_all(&a, ActionStatus::InProgress, &soon);
    store.record_polls(&first, now).await.unwrap();
    let before = store.action(&a[0]).await.unwrap().unwrap();
    // What a sweep reads of the listed actions carries the stored update time.
    let rows = store.active_among(&a).await.unwrap();
    assert!(
        rows.iter()
            .all(|r| r.updated_at.as_deref() == Some("2026-11-28T10:00:00.000Z")),
        "{rows:?}"
    );

    let later = now + Duration::from_secs(60);
    let summary = store
        .record_polls(
            &[
                PollWrite {
                    id: a[0].clone(),
                    result: PollResult::Unchanged,
                    next: NextStep::PollAt(later + Duration::from_secs(600)),
                },
                PollWrite {
                    id: a[1].clone(),
                    result: PollResult::Unchanged,
                    next: NextStep::Finish(Tracking::GaveUp),
                },
            ],
            later,
        )
        .await
        .unwrap();
    assert!(summary.transitions.is_empty());
    assert_eq!(summary.finished, 1);
    let after = store.action(&a[0]).await.unwrap().unwrap();
    assert_eq!(after.poll_count, before.poll_count + 1);
    assert_eq!(after.last_polled_at, Some(format_time(later)));
    assert_eq!(
        after.next_poll_at,
        Some(format_time(later + Duration::from_secs(600)))
    );
    // The answer, the status and the error columns are the ones written before.
    assert_eq!(
        (
            &after.status,
            &after.last_response,
            &after.mde_updated_at,
            after.error_count,
            &after.last_error
        ),
        (
            &before.status,
            &before.last_response,
            &before.mde_updated_at,
            0,
            &None
        )
    );
    assert_eq!(status_log(&store, &a[0]).await.len(), 1);
    let gave_up = store.action(&a[1]).await.unwrap().unwrap();
    assert_eq!(gave_up.tracking, "gave_up");
    assert_eq!(gave_up.status.as_deref(), Some("InProgress"));
    assert!(gave_up.finished_at.is_some());
}

#[tokio::test]
async fn errors_count_without_touching_status() {
    let (_dir, store) = fresh().await;
    let a = ids(1, 3);
    let now = SystemTime::now();
    store.enqueue(&a, now).await.unwrap();
    store
        .record_polls(
            &[PollWrite {
                id: a[0].clone(),
                result: PollResult::Error("HTTP 503 from MDE".into()),
                next: NextStep::PollAt(now + Duration::from_secs(1)),
            }],
            now,
        )
        .await
        .unwrap();
    let row = store.action(&a[0]).await.unwrap().unwrap();
    assert_eq!((row.error_count, row.poll_count), (1, 1));
    assert_eq!(row.last_error.as_deref(), Some("HTTP 503 from MDE"));
    assert!(row.last_error_at.is_some());
    assert_eq!(row.status, None);
    assert_eq!(row.tracking, "active");
}

#[tokio::test]
async fn the_due_query_uses_its_index() {
    let (dir, store) = fresh().await;
    store
        .enqueue(&ids(500, 4), SystemTime::now())
        .await
        .unwrap();
    store.close().await;
    let pool = read_only(&dir).await;
    let plan: Vec<String> = sqlx::query(
        "EXPLAIN QUERY PLAN SELECT action_id, status, poll_count, enqueued_at, next_poll_at,
         mde_updated_at FROM actions WHERE tracking = 'active' AND next_poll_at <= ?1 ORDER BY next_poll_at LIMIT ?2",
    )
    .bind("2030-01-01T00:00:00.000Z")
    .bind(100)
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<String, _>("detail"))
    .collect();
    assert!(
        plan.iter().any(|d| d.contains("USING INDEX actions_due")),
        "{plan:?}"
    );
    assert!(!plan.iter().any(|d| d.contains("TEMP B-TREE")), "{plan:?}");
}

#[tokio::test]
async fn the_database_refuses_rows_that_break_the_contract() {
    let (dir, store) = fresh().await;
    store.close().await;
    let pool =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap();
    for bad in [
        // Not lowercase.
        "INSERT INTO actions (action_id, tracking, enqueued_at, next_poll_at) VALUES ('2E9DA30D-27F6-4208-81F2-9CD3D67893BA', 'active', 'x', 'x')",
        // Unknown tracking state.
        "INSERT INTO actions (action_id, tracking, enqueued_at, next_poll_at) VALUES ('2e9da30d-27f6-4208-81f2-9cd3d67893ba', 'paused', 'x', 'x')",
        // Active without a next poll.
        "INSERT INTO actions (action_id, tracking, enqueued_at) VALUES ('2e9da30d-27f6-4208-81f2-9cd3d67893ba', 'active', 'x')",
    ] {
        assert!(
            sqlx::query(sqlx::AssertSqlSafe(bad))
                .execute(&pool)
                .await
                .is_err(),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn read_only_commands_need_an_existing_database() {
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open(&dir.path().join("nope.db"), OpenMode::ReadOnly)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Missing { .. }));
    assert!(err.to_string().contains("nope.db"));
}

#[tokio::test]
async fn the_call_log_restores_the_budget() {
    let (_dir, store) = fresh().await;
    let now = SystemTime::now();
    for i in 0..5 {
        let id = store
            .start_api_call(
                mde_actiond::store::Endpoint::List,
                10,
                None,
                now - Duration::from_secs(i * 10),
            )
            .await
            .unwrap();
        let retry = (i == 0).then_some(Duration::from_secs(30));
        store
            .finish_api_call(
                id,
                Some(if retry.is_some() { 429 } else { 200 }),
                "ok",
                retry,
                Duration::from_millis(20),
            )
            .await
            .unwrap();
    }
    let past = store
        .api_calls_since(now - Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(past.len(), 5);
    let budget = mde_actiond::budget::RateBudget::new(100, 1500);
    budget.seed(&past, now);
    let left = budget.remaining();
    assert_eq!(left.this_minute, 95);
    assert!(left.paused_for.is_some_and(|d| d > Duration::from_secs(25)));
    assert_eq!(
        store
            .prune_api_calls(now - Duration::from_secs(25))
            .await
            .unwrap(),
        2
    );
}

/// The statements a sweep runs per 10,000-action page look each listed id up by key; a plan
/// that walks every active row instead made pages take most of a second at 100,000 actions.
#[tokio::test]
async fn sweep_statements_look_ids_up_by_key() {
    let (dir, store) = fresh().await;
    store
        .enqueue(&ids(500, 9), SystemTime::now())
        .await
        .unwrap();
    store.close().await;
    let pool = read_only(&dir).await;
    let list = serde_json::to_string(
        &ids(3, 9)
            .iter()
            .map(|i| serde_json::json!({"id": i.as_str(), "status": "Pending"}))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    for sql in mde_actiond::store::page_statements() {
        let mut query =
            sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}"))).bind(&list);
        if sql.contains("?2") {
            query = query.bind("2030-01-01T00:00:00.000Z");
        }
        let plan = column(&pool, query, "detail").await;
        assert!(
            plan.iter().any(|d| d.contains("USING PRIMARY KEY")),
            "{sql}\n{plan:?}"
        );
        assert!(
            !plan
                .iter()
                .any(|d| d.contains("actions USING") && d.contains("INDEX actions_")),
            "{sql}\n{plan:?}"
        );
    }
    // The index a sweep compares its pages with is read from an index alone, never from
    // the table's rows (about 2 KiB each, with the last answer).
    for sql in [
        mde_actiond::store::SWEEP_INDEX.as_str(),
        mde_actiond::store::SWEEP_INDEX_UNOBSERVED,
    ] {
        let query = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")));
        let plan = column(&pool, query, "detail").await;
        // A range of the index, in its order: each chunk costs its own size, not a scan.
        assert!(
            plan.iter()
                .any(|d| d.contains("USING COVERING INDEX actions_tracking (")),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|d| d.contains("TEMP B-TREE")), "{plan:?}");
    }
    // The due ones too, from the `actions_due` index alone.
    let query = sqlx::query(sqlx::AssertSqlSafe(format!(
        "EXPLAIN QUERY PLAN {}",
        mde_actiond::store::SWEEP_DUE
    )));
    let plan = column(&pool, query, "detail").await;
    assert!(
        plan.iter()
            .any(|d| d.contains("USING COVERING INDEX actions_due (")),
        "{plan:?}"
    );
    assert!(!plan.iter().any(|d| d.contains("TEMP B-TREE")), "{plan:?}");
}

/// The sweep index holds every active and not_found action with its last status, keyed
/// the way listed ids are.
#[tokio::test]
async fn the_sweep_index_holds_active_and_lost_actions() {
    let (_dir, store) = fresh().await;
    let all = ids(5, 3);
    let now = SystemTime::now();
    store.enqueue(&all, now).await.unwrap();
    assert!(store.sweep_index(now).await.unwrap().len() == 5);
    // Just enqueued: each is expected to change within young/10.
    let young = Duration::from_secs(600);
    let rate = store.young_change_rate(now, young).await.unwrap();
    assert!((rate - 5.0 / 60.0).abs() < 1e-3, "{rate}");
    let older = store
        .young_change_rate(now + Duration::from_secs(60), young)
        .await
        .unwrap();
    assert!((older - 5.0 / 120.0).abs() < 1e-3, "{older}");
    let old = store
        .young_change_rate(now + Duration::from_secs(601), young)
        .await
        .unwrap();
    assert_eq!(old, 0.0, "no longer young");
    let later = now + Duration::from_secs(3600);
    store.make_due(&all[..2], later).await.unwrap();
    let due = |index: &std::collections::HashMap<u128, mde_actiond::store::Tracked>| {
        let mut keys: Vec<u128> = index
            .iter()
            .filter(|(_, t)| t.due_soon)
            .map(|(k, _)| *k)
            .collect();
        keys.sort();
        keys
    };

    use mde_actiond::store::{NextStep, PollResult, PollWrite};
    let observed = mde_actiond::domain::Observation {
        status: Some(ActionStatus::InProgress),
        ..Default::default()
    };
    let writes = [
        PollWrite {
            id: all[0].clone(),
            result: PollResult::Observed(Box::new(observed.clone())),
            next: NextStep::PollAt(later),
        },
        PollWrite {
            id: all[1].clone(),
            result: PollResult::NotFound,
            next: NextStep::Finish(Tracking::NotFound),
        },
        PollWrite {
            id: all[2].clone(),
            result: PollResult::Observed(Box::new(mde_actiond::domain::Observation {
                status: Some(ActionStatus::Succeeded),
                ..observed
            })),
            next: NextStep::Finish(Tracking::Done),
        },
    ];
    store.record_polls(&writes, now).await.unwrap();
    let odd = PollWrite {
        id: all[3].clone(),
        result: PollResult::Observed(Box::new(mde_actiond::domain::Observation {
            status: Some(ActionStatus::Other("Queued".into())),
            ..Default::default()
        })),
        next: NextStep::PollAt(later),
    };
    store.record_polls(&[odd], now).await.unwrap();
    // all[4], never observed, has been due since its enqueueing (a sweep writes it
    // anyway); all[0] and all[3] are due at `later`; all[1] is lost and all[2] finished.
    let mut by_then = vec![all[0].key(), all[3].key(), all[4].key()];
    by_then.sort();
    assert_eq!(due(&store.sweep_index(later).await.unwrap()), by_then);
    assert_eq!(
        due(&store.sweep_index(now).await.unwrap()),
        vec![all[4].key()]
    );
    let index = store.sweep_index(now).await.unwrap();
    assert_eq!(
        index[&all[3].key()].status,
        Some(ActionStatus::Other("Queued".into())),
        "a status this version does not know is read apart"
    );
    assert_eq!(index.len(), 4, "the finished one is not in it");
    assert_eq!(index[&all[0].key()].status, Some(ActionStatus::InProgress));
    assert!(index[&all[1].key()].not_found);
    assert!(!index.contains_key(&all[2].key()));
    let t = &index[&all[4].key()];
    assert!(t.status.is_none() && !t.not_found && !t.seen);
}

/// More actions than one chunk of the index read, in several statuses: each is read once.
#[tokio::test]
async fn the_sweep_index_reads_in_chunks_across_statuses() {
    use mde_actiond::store::{NextStep, PollResult, PollWrite};
    let (_dir, store) = fresh().await;
    let all = ids(9_500, 4);
    let now = SystemTime::now();
    store.enqueue(&all, now).await.unwrap();
    let status = |i: usize| match i % 3 {
        0 => None,
        1 => Some(ActionStatus::Pending),
        _ => Some(ActionStatus::InProgress),
    };
    let writes: Vec<PollWrite> = (0..all.len())
        .filter_map(|i| {
            Some(PollWrite {
                id: all[i].clone(),
                result: PollResult::Observed(Box::new(mde_actiond::domain::Observation {
                    status: Some(status(i)?),
                    ..Default::default()
                })),
                next: NextStep::PollAt(now),
            })
        })
        .collect();
    store.record_polls(&writes, now).await.unwrap();
    let index = store.sweep_index(now).await.unwrap();
    assert_eq!(index.len(), all.len());
    for (i, id) in all.iter().enumerate() {
        assert_eq!(index[&id.key()].status, status(i), "{id}");
    }
    // Due now, every one, read in chunks of the due index as well.
    assert!(index.values().all(|t| t.due_soon));
    let earlier = store
        .sweep_index(now - Duration::from_secs(1))
        .await
        .unwrap();
    assert!(earlier.values().all(|t| !t.due_soon));
}

/// One text column of every row a query returns.
async fn column(
    pool: &sqlx::SqlitePool,
    query: sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    name: &str,
) -> Vec<String> {
    query
        .fetch_all(pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>(name))
        .collect()
}

fn route(name: &str, events: &[&str], types: &[&str]) -> mde_actiond::store::Route {
    mde_actiond::store::Route {
        name: name.into(),
        kind: "webhook".into(),
        events: events.iter().map(|s| s.to_string()).collect(),
        types: types.iter().map(|s| s.to_string()).collect(),
        statuses: Vec::new(),
    }
}

/// Events are written with their transitions, routed by each destination's filters, and a
/// sender sees only the head of each action's queue.
#[tokio::test]
async fn the_outbox_is_written_with_the_transitions_and_keeps_order_per_action() {
    let (_dir, store) = fresh().await;
    let a = ids(2, 31);
    let now = SystemTime::now();
    store.enqueue(&a, now).await.unwrap();
    // No destination: no event is written at all.
    let later = NextStep::PollAt(now + Duration::from_secs(5));
    let w = store
        .record_polls(
            &[observed(&a[0], ActionStatus::Pending, later.clone())],
            now,
        )
        .await
        .unwrap();
    assert_eq!((w.transitions.len(), w.deliveries), (1, 0));
    store
        .sync_routes(
            &[
                route("all", &["transition"], &[]),
                route("ends", &["terminal"], &[]),
                route("scans", &["transition"], &["RunAntiVirusScan"]),
            ],
            Some("tenant-1"),
        )
        .await
        .unwrap();
    let w = store
        .record_polls(
            &[
                observed(&a[0], ActionStatus::InProgress, later.clone()),
                observed(&a[1], ActionStatus::Pending, later.clone()),
            ],
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        w.deliveries, 2,
        "all hears both; ends and scans hear nothing"
    );
    let w = store
        .record_polls(
            &[observed(
                &a[0],
                ActionStatus::Succeeded,
                NextStep::Finish(Tracking::Done),
            )],
            now,
        )
        .await
        .unwrap();
    assert_eq!(w.deliveries, 2, "all and ends hear the terminal one");
    // Two pending events for a[0] at `all`: only the earlier is due.
    let due = store.due_deliveries("all", now, 10).await.unwrap();
    let heads: Vec<(String, i64)> = due
        .iter()
        .map(|d| {
            let v: serde_json::Value = serde_json::from_str(&d.payload).unwrap();
            (
                d.action_id.clone().unwrap(),
                v["data"]["seq"].as_i64().unwrap(),
            )
        })
        .collect();
    // Order is kept per action; across actions one batch's events are in key order.
    let mut expected = vec![(a[0].to_string(), 2), (a[1].to_string(), 1)];
    expected.sort();
    assert_eq!(heads, expected);
    let first = due
        .iter()
        .position(|d| d.action_id.as_deref() == Some(a[0].as_str()))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&due[first].payload).unwrap();
    assert_eq!(v["type"], "machine_action.status_changed");
    assert_eq!(v["data"]["fromStatus"], "Pending");
    assert_eq!(v["data"]["status"], "InProgress");
    assert_eq!(v["data"]["tenantId"], "tenant-1");
    assert_eq!(v["data"]["terminal"], false);
    // Delivered: the next of that action becomes the head.
    let done = mde_actiond::store::DeliveryResult::new(
        due[first].event,
        mde_actiond::domain::DeliveryState::Delivered,
        None,
        Some(200),
        None,
    );
    store
        .record_deliveries("all", &[done], true, false, None, now)
        .await
        .unwrap();
    let due = store.due_deliveries("all", now, 10).await.unwrap();
    let next = due
        .iter()
        .find(|d| d.action_id.as_deref() == Some(a[0].as_str()))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&next.payload).unwrap();
    assert_eq!(
        (v["data"]["seq"].as_i64(), v["data"]["terminal"].as_bool()),
        (Some(3), Some(true))
    );
    // Pruning keeps what is pending.
    assert_eq!(
        store
            .prune_outbox(now + Duration::from_secs(60), 100)
            .await
            .unwrap(),
        1
    );
    let counts = store.delivery_counts().await.unwrap();
    let all = counts.iter().find(|c| c.destination == "all").unwrap();
    assert_eq!((all.pending, all.delivered), (2, 0));
}

/// A database file made by the migrations named before `first_missing` (e.g. "0005"): what
/// an older version left. Returns its directory, its path and an open pool on it.
async fn database_before(
    first_missing: &str,
) -> (tempfile::TempDir, std::path::PathBuf, sqlx::SqlitePool) {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("migrations");
    std::fs::create_dir(&old).unwrap();
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for f in std::fs::read_dir(&here).unwrap() {
        let name = f.unwrap().file_name();
        if name.to_string_lossy().as_ref() < first_missing {
            std::fs::copy(here.join(&name), old.join(&name)).unwrap();
        }
    }
    let path = dir.path().join("t.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap();
    sqlx::migrate::Migrator::new(old.as_path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    (dir, path, pool)
}

/// A database of schema 1.3 (before the outbox) opens as the current minor with every row
/// kept.
#[tokio::test]
async fn a_1_3_database_gains_the_outbox_and_keeps_its_rows() {
    let (dir, path, pool) = database_before("0005").await;
    sqlx::query(
        "INSERT INTO actions (action_id, tracking, status, enqueued_at, next_poll_at)
         VALUES ('2e9da30d-27f6-4208-81f2-9cd3d67893ba', 'active', 'Pending',
                 '2026-11-28T10:00:00.000Z', '2026-11-28T10:00:00.000Z')",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let store = Store::open(&path, OpenMode::ReadWrite).await.unwrap();
    let id = ActionId::parse("2e9da30d-27f6-4208-81f2-9cd3d67893ba").unwrap();
    let row = store.action(&id).await.unwrap().expect("kept");
    assert_eq!(row.status.as_deref(), Some("Pending"));
    assert_eq!(store.delivery_counts().await.unwrap().len(), 0);
    store.close().await;
    let pool = read_only(&dir).await;
    let (minor, stuck): (String, i64) = sqlx::query_as(
        "SELECT (SELECT value FROM schema_info WHERE name = 'minor'),
                (SELECT stuck_events FROM actions)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((minor.as_str(), stuck), ("6", 0));
}

/// New files get 8 KiB pages (a row with its answer fits in one); a file made with 4 KiB
/// pages by an older version keeps them and works, and the conversion docs/schema.md gives
/// keeps every row and the file's settings.
#[tokio::test]
async fn new_files_use_8_kib_pages_and_older_files_convert() {
    use sqlx::Connection;
    async fn pragmas(path: &std::path::Path) -> (i64, String, i64) {
        let pool = read_only_at(path).await;
        let answer = sqlx::query_as(
            "SELECT (SELECT page_size FROM pragma_page_size()),
                    (SELECT journal_mode FROM pragma_journal_mode()),
                    (SELECT auto_vacuum FROM pragma_auto_vacuum())",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        // A dropped pool closes its connection in the background; the journal mode change
        // that follows needs the file to itself.
        pool.close().await;
        answer
    }
    let (dir, store) = fresh().await;
    store.close().await;
    assert_eq!(
        pragmas(&dir.path().join("t.db")).await,
        (8192, "wal".into(), 2)
    );

    // A file as older versions created it: 4 KiB pages, WAL, incremental auto-vacuum.
    let path = dir.path().join("old.db");
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap();
    sqlx::raw_sql(
        "PRAGMA page_size = 4096; PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL;
         CREATE TABLE placeholder (x); DROP TABLE placeholder;",
    )
    .execute(&mut c)
    .await
    .unwrap();
    c.close().await.unwrap();
    let store = Store::open(&path, OpenMode::ReadWrite).await.unwrap();
    let mine = ids(300, 41);
    store.enqueue(&mine, SystemTime::now()).await.unwrap();
    let writes: Vec<PollWrite> = mine
        .iter()
        .map(|id| {
            observed(
                id,
                ActionStatus::InProgress,
                NextStep::PollAt(SystemTime::now()),
            )
        })
        .collect();
    store
        .record_polls(&writes, SystemTime::now())
        .await
        .unwrap();
    store.close().await;
    assert_eq!(
        pragmas(&path).await,
        (4096, "wal".into(), 2),
        "kept as it was"
    );

    // The conversion, as docs/schema.md gives it for the sqlite3 shell.
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::raw_sql(
        "PRAGMA journal_mode = DELETE; PRAGMA page_size = 8192; VACUUM; PRAGMA journal_mode = WAL;",
    )
    .execute(&mut c)
    .await
    .unwrap();
    c.close().await.unwrap();
    assert_eq!(pragmas(&path).await, (8192, "wal".into(), 2));
    let store = Store::open(&path, OpenMode::ReadWrite).await.unwrap();
    let counts = store.counts().await.unwrap();
    assert_eq!(counts.tracking(Tracking::Active), 300);
    let row = store.action(&mine[7]).await.unwrap().expect("kept");
    assert_eq!(row.status.as_deref(), Some("InProgress"));
    let transitions: i64 = sqlx::query_scalar("SELECT count(*) FROM transitions")
        .fetch_one(&read_only_at(&path).await)
        .await
        .unwrap();
    assert_eq!(transitions, 300);
}

async fn read_only_at(path: &std::path::Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", path.display()))
        .await
        .unwrap()
}

/// The values a CHECK of the migrations allows in `column`, e.g. `CHECK (tracking IN
/// ('active', 'done'))`.
fn checked_values(column: &str) -> std::collections::BTreeSet<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let needle = format!("CHECK ({column} IN (");
    let mut found = std::collections::BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        for (at, _) in text.match_indices(&needle) {
            let rest = &text[at + needle.len()..];
            let list = &rest[..rest.find(')').unwrap()];
            found.extend(
                list.split(',')
                    .map(|v| v.trim().trim_matches('\'').to_string()),
            );
        }
    }
    assert!(!found.is_empty(), "no CHECK on {column} in the migrations");
    found
}

/// What the code writes and what the schema allows are the same lists: a new tracking
/// state or delivery state must reach both (their CHECKs), and the kinds of API call the
/// trigger on `api_calls` accepts are this version's `Endpoint`s, written at open.
#[tokio::test]
async fn the_enums_and_the_schemas_lists_agree() {
    use mde_actiond::domain::{DeliveryState, Endpoint};
    let set = |v: Vec<&str>| -> std::collections::BTreeSet<String> {
        v.into_iter().map(String::from).collect()
    };
    assert_eq!(
        checked_values("tracking"),
        set(Tracking::ALL.iter().map(|t| t.as_str()).collect())
    );
    assert_eq!(
        checked_values("state"),
        set(DeliveryState::ALL.iter().map(|s| s.as_str()).collect())
    );
    let (dir, store) = fresh().await;
    store.close().await;
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}?mode=rw",
        dir.path().join("t.db").display()
    ))
    .await
    .unwrap();
    let kinds: Vec<String> = sqlx::query_scalar("SELECT name FROM api_call_kinds")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        kinds.into_iter().collect::<std::collections::BTreeSet<_>>(),
        set(Endpoint::ALL.iter().map(|e| e.as_str()).collect())
    );
    let refused = sqlx::query(
        "INSERT INTO api_calls (sent_at, endpoint, action_count)
         VALUES ('2026-12-07T00:00:00.000Z', 'delete', 1)",
    )
    .execute(&pool)
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("api_call_kinds"), "{refused}");
    pool.close().await;
}

/// A database of schema 1.5 keeps its call log through 1.6's rebuild of `api_calls`: the
/// rows, their ids, and a budget restored from them.
#[tokio::test]
async fn a_1_5_database_keeps_its_call_log_through_the_rebuild() {
    let (_dir, path, pool) = database_before("0007").await;
    let sent = format_time(SystemTime::now() - Duration::from_secs(60));
    sqlx::query(
        "INSERT INTO api_calls (id, sent_at, endpoint, action_count, http_status, outcome,
                                duration_ms, sweep_id)
         VALUES (41, ?1, 'list', 0, 200, 'ok', 12, 7)",
    )
    .bind(&sent)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let store = Store::open(&path, OpenMode::ReadWrite).await.unwrap();
    assert_eq!(
        store
            .api_calls_since(SystemTime::now() - Duration::from_secs(3600))
            .await
            .unwrap()
            .len(),
        1
    );
    store.close().await;
    let pool = read_only_at(&path).await;
    let row: (i64, String, String, i64, Option<i64>) =
        sqlx::query_as("SELECT id, sent_at, endpoint, duration_ms, sweep_id FROM api_calls")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(row, (41, sent, "list".to_string(), 12, Some(7)));
    pool.close().await;
}

/// The cadence learns how long actions stay in each status from the transitions, by MDE's
/// update times: a stay is the time between the answer that entered a status and the one
/// that left it; the first status seen has no stay before it, and a stay whose entry was
/// not recorded (a status skipped between two looks) is not measured.
#[tokio::test]
async fn dwells_are_read_from_the_transitions_by_mde_times() {
    let (_dir, store) = fresh().await;
    let a = ids(2, 41);
    let now = SystemTime::now();
    store.enqueue(&a, now).await.unwrap();
    let at = |id: &ActionId, status: ActionStatus, updated: &str, next: NextStep| {
        let mut w = observed(id, status, next);
        if let PollResult::Observed(o) = &mut w.result {
            o.updated_at = Some(updated.into());
        }
        w
    };
    let later = NextStep::PollAt(now + Duration::from_secs(5));
    let steps = [
        (ActionStatus::Pending, "2026-11-28T10:00:00.000Z"),
        (ActionStatus::InProgress, "2026-11-28T10:01:30.000Z"),
        (ActionStatus::Succeeded, "2026-11-28T10:11:30.000Z"),
    ];
    for (status, updated) in steps {
        let next = if status.is_terminal() {
            NextStep::Finish(Tracking::Done)
        } else {
            later.clone()
        };
        store
            .record_polls(&[at(&a[0], status, updated, next)], now)
            .await
            .unwrap();
    }
    // The second action was seen Pending, then finished: the stay ending in Failed is
    // Pending's, measured; it has no InProgress stay.
    for (status, updated) in [
        (ActionStatus::Pending, "2026-11-28T10:00:00.000Z"),
        (ActionStatus::Failed, "2026-11-28T10:00:20.000Z"),
    ] {
        let next = if status.is_terminal() {
            NextStep::Finish(Tracking::Done)
        } else {
            later.clone()
        };
        store
            .record_polls(&[at(&a[1], status, updated, next)], now)
            .await
            .unwrap();
    }
    let dwells = store.dwells_after(0, 100).await.unwrap();
    let measured: Vec<(Option<String>, Option<String>, i64)> = dwells
        .iter()
        .filter_map(|d| {
            d.seconds
                .map(|s| (d.kind.clone(), d.status.clone(), s.round() as i64))
        })
        .collect();
    assert_eq!(
        measured,
        vec![
            (Some("Isolate".into()), Some("Pending".into()), 90),
            (Some("Isolate".into()), Some("InProgress".into()), 600),
            (Some("Isolate".into()), Some("Pending".into()), 20),
        ]
    );
    // Five transitions in all; reading on from the last id finds nothing more.
    assert_eq!(dwells.len(), 5);
    let last = store.last_transition_id().await.unwrap();
    assert_eq!(last, dwells.last().unwrap().id);
    assert!(store.dwells_after(last, 100).await.unwrap().is_empty());
    // Paged: two at a time, in order.
    let first_two = store.dwells_after(0, 2).await.unwrap();
    assert_eq!(first_two.len(), 2);
    assert!(first_two[0].id < first_two[1].id);
}

/// Ids enqueued since a sweep and not yet described by any answer owe the sweep their
/// first sighting; the cadence counts them.
#[tokio::test]
async fn unseen_arrivals_count_only_ids_no_answer_described() {
    let (_dir, store) = fresh().await;
    let a = ids(3, 42);
    let census = SystemTime::now() - Duration::from_secs(60);
    store
        .enqueue(&a[..1], census - Duration::from_secs(10))
        .await
        .unwrap();
    store
        .enqueue(&a[1..], census + Duration::from_secs(20))
        .await
        .unwrap();
    let (n, mean) = store.unseen_arrivals(census).await.unwrap();
    assert_eq!(n, 2);
    assert!((mean - 20.0).abs() < 0.01, "{mean}");
    store
        .record_polls(
            &[observed(
                &a[1],
                ActionStatus::Pending,
                NextStep::PollAt(census + Duration::from_secs(90)),
            )],
            census + Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(store.unseen_arrivals(census).await.unwrap().0, 1);
}
