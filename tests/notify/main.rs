//! Notifications end to end: the real daemon, the simulated tenant, and receivers of our own
//! that verify Standard Webhooks signatures and fail on purpose. Every transition must reach
//! every matching destination at least once and in order per action, through kill -9 and
//! receiver faults; a dead receiver must never hold polling back; callbacks go only where
//! `callbacks.allow` says; secrets appear nowhere.
// The tests talk to the daemon as its users do; the outbound policy of clippy.toml is the
// daemon's own.
#![allow(clippy::disallowed_methods)]

#[path = "../common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::receiver::{Fault, Received, Receiver, new_secret};
use common::*;
use mde_actiond::domain::{ActionId, ActionStatus, parse_time};
use mde_actiond::sim::{Lifecycle, SimConfig};
use mde_actiond::store::{OpenMode, Store};

const LIMIT: Duration = Duration::from_secs(120);

/// A private file (the daemon refuses secrets others can read).
fn secret_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    private_file(&path, &format!("{text}\n"));
    path
}

fn config_file(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("notify.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// Short waits so a test sees a dozen retries in seconds.
const FAST_RETRIES: &str = r#"retry_schedule = ["200ms", "400ms", "800ms", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]"#;

fn webhook(name: &str, url: &str, secret: &Path, events: &str, extra: &str) -> String {
    format!(
        "[[notify]]\nname = \"{name}\"\nkind = \"webhook\"\nurl = \"{url}\"\nsecret_file = \"{}\"\nevents = {events}\ntimeout = \"1s\"\n{FAST_RETRIES}\n{extra}\n",
        secret.display()
    )
}

/// Per action: (seq, from, to) of each transition.
type Expected = BTreeMap<String, Vec<(i64, Option<String>, String)>>;

/// The events a receiver took, by action: (seq, from, to, webhook-id) in arrival order.
type Heard = BTreeMap<String, Vec<(i64, Option<String>, String, String)>>;

fn heard(received: &[Received], kind: &str) -> Heard {
    let mut out: Heard = BTreeMap::new();
    for r in received.iter().filter(|r| r.accepted) {
        let v = r.json();
        if v["type"] != kind {
            continue;
        }
        let d = &v["data"];
        out.entry(d["id"].as_str().unwrap().to_string())
            .or_default()
            .push((
                d["seq"].as_i64().unwrap(),
                d["fromStatus"].as_str().map(String::from),
                d["status"].as_str().unwrap().to_string(),
                r.id().to_string(),
            ));
    }
    out
}

/// Checks a receiver heard exactly `expected` (per action: seq, from, to), in order per
/// action, each event always under one webhook-id; returns the duplicates (a webhook-id
/// taken more than once).
fn check_heard(who: &str, received: &[Received], expected: &Expected) -> usize {
    let heard = heard(received, "machine_action.status_changed");
    let mut duplicates = 0;
    let mut ids_by_event: HashMap<(String, i64), String> = HashMap::new();
    for (action, want) in expected {
        let got = heard.get(action).cloned().unwrap_or_default();
        let mut seqs: Vec<i64> = got.iter().map(|g| g.0).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "{who}: {action} heard out of order: {seqs:?}"
        );
        seqs.dedup();
        let want_seqs: Vec<i64> = want.iter().map(|w| w.0).collect();
        assert_eq!(
            seqs, want_seqs,
            "{who}: {action} heard {got:?}, want {want:?}"
        );
        for (seq, from, to, id) in &got {
            let w = want.iter().find(|w| w.0 == *seq).unwrap();
            assert_eq!((from, to), (&w.1, &w.2), "{who}: {action} seq {seq}");
            let first = ids_by_event
                .entry((action.clone(), *seq))
                .or_insert_with(|| id.clone());
            assert_eq!(
                first, id,
                "{who}: {action} seq {seq} came under two webhook-ids"
            );
        }
        duplicates += got.len() - seqs.len();
    }
    for action in heard.keys() {
        assert!(
            expected.contains_key(action),
            "{who}: heard of {action}, which it should not"
        );
    }
    // A duplicate carries the same body: it is the same event sent again.
    let mut bodies: HashMap<&str, &[u8]> = HashMap::new();
    for r in received.iter().filter(|r| r.accepted) {
        let b = bodies.entry(r.id()).or_insert(&r.body);
        assert_eq!(
            *b,
            &r.body[..],
            "{who}: webhook-id {} with two bodies",
            r.id()
        );
    }
    duplicates
}

/// Every transition the database recorded, per action: (seq, from, to).
async fn recorded(store: &Store, ids: &[ActionId], keep: impl Fn(&str) -> bool) -> Expected {
    let mut out = BTreeMap::new();
    for id in ids {
        let log = store.transitions(id).await.unwrap();
        let events: Vec<_> = log
            .iter()
            .enumerate()
            .map(|(i, t)| (i as i64 + 1, t.from_status.clone(), t.to_status.clone()))
            .filter(|(_, _, to)| keep(to))
            .collect();
        if !events.is_empty() {
            out.insert(id.to_string(), events);
        }
    }
    out
}

async fn pending_deliveries(db: &Path) -> i64 {
    let store = Store::open(db, OpenMode::ReadOnly).await.unwrap();
    let n = store
        .delivery_counts()
        .await
        .unwrap()
        .iter()
        .map(|c| c.pending)
        .sum();
    store.close().await;
    n
}

/// How long after `field` (a time in the event's data) each event first arrived (max,
/// p50), in seconds.
fn delays(received: &[Received], field: &str) -> (f64, f64) {
    let mut seen = std::collections::HashSet::new();
    let mut d: Vec<f64> = received
        .iter()
        .filter(|r| r.accepted && seen.insert(r.id().to_string()))
        .filter_map(|r| {
            let v = r.json();
            let changed = parse_time(v["data"][field].as_str()?)?;
            Some(
                r.at.duration_since(changed)
                    .unwrap_or_default()
                    .as_secs_f64(),
            )
        })
        .collect();
    d.sort_by(f64::total_cmp);
    (
        d.last().copied().unwrap_or(0.0),
        d.get(d.len() / 2).copied().unwrap_or(0.0),
    )
}

/// Checks a body against docs/notify-event.schema.json: required fields, no others, and
/// each field's JSON type (the subset of JSON Schema the file uses).
fn conforms(body: &serde_json::Value) {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/notify-event.schema.json"
        ))
        .unwrap(),
    )
    .unwrap();
    fn check(value: &serde_json::Value, schema: &serde_json::Value, at: &str) {
        let types: Vec<&str> = match &schema["type"] {
            serde_json::Value::String(t) => vec![t.as_str()],
            serde_json::Value::Array(a) => a.iter().filter_map(|t| t.as_str()).collect(),
            _ => vec![],
        };
        let actual = match value {
            serde_json::Value::Null => "null",
            serde_json::Value::Bool(_) => "boolean",
            serde_json::Value::Number(n) if n.is_i64() => "integer",
            serde_json::Value::Number(_) => "number",
            serde_json::Value::String(_) => "string",
            serde_json::Value::Array(_) => "array",
            serde_json::Value::Object(_) => "object",
        };
        assert!(
            types.is_empty()
                || types.contains(&actual)
                || (actual == "integer" && types.contains(&"number")),
            "{at}: {actual} where the schema says {types:?}"
        );
        if let Some(list) = schema["enum"].as_array() {
            assert!(
                list.contains(value),
                "{at}: {value} not in the schema's enum"
            );
        }
        if let serde_json::Value::Object(map) = value {
            let props = schema["properties"].as_object().expect("properties");
            for key in map.keys() {
                assert!(props.contains_key(key), "{at}.{key} is not in the schema");
            }
            for r in schema["required"].as_array().into_iter().flatten() {
                assert!(
                    map.contains_key(r.as_str().unwrap()),
                    "{at}: {r} is required"
                );
            }
            for (k, v) in map {
                check(v, &props[k], &format!("{at}.{k}"));
            }
        }
    }
    check(body, &schema, "$");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transition_is_delivered_in_order_through_kill_9_and_receiver_faults() {
    let env = TestEnv::new(SimConfig {
        seed: 1414,
        ..SimConfig::default()
    })
    .await;
    let soar_key = new_secret();
    let lead_key = new_secret();
    let soar = Receiver::start(&[&soar_key], 1).await;
    let lead = Receiver::start(&[&lead_key], 2).await;
    let faults = vec![
        Fault::Status(500),
        Fault::Status(502),
        Fault::TooMany(1),
        Fault::Hang(Duration::from_secs(3)),
        Fault::Drop,
    ];
    soar.set_faults(0.2, faults.clone());
    lead.set_faults(0.2, faults);
    let dir = env.dir.path();
    let config = config_file(
        dir,
        &format!(
            "{}{}",
            webhook(
                "soar",
                &soar.url("/hooks/mde"),
                &secret_file(dir, "soar.key", &soar_key),
                r#"["transition"]"#,
                ""
            ),
            webhook(
                "lead",
                &lead.url("/lead"),
                &secret_file(dir, "lead.key", &lead_key),
                r#"["terminal"]"#,
                ""
            ),
        ),
    );
    let ids = env.sim.create_random_actions(200, Duration::from_secs(8));
    create_db(&env.db()).await;
    enqueue_with_cli(&env.db(), &ids).await;

    let args = ["--config", config.to_str().unwrap()];
    let started = tokio::time::Instant::now();
    let mut kills = 0;
    let mut rng = fastrand::Rng::with_seed(9);
    loop {
        let mut child = spawn_daemon(&env, &[], &args);
        // Drained, or a full pipe would block the daemon's logging (and the daemon).
        let logs = tokio::spawn(read_all(child.stderr.take().unwrap()));
        drop(child.stdout.take());
        // Chaos on a clock: the crash lands wherever the daemon happens to be.
        tokio::time::sleep(Duration::from_millis(rng.u64(1500..4000))).await;
        let reader = env.reader().await;
        let active = reader.active_count().await.unwrap();
        reader.close().await;
        let pending = pending_deliveries(&env.db()).await;
        if active == 0 && pending == 0 {
            signal(&child, nix::sys::signal::Signal::SIGTERM);
            let status = child.wait().await.unwrap();
            let logs = logs.await.unwrap();
            assert!(status.success(), "clean stop: {status:?}\n{logs}");
            assert!(!logs.contains(soar_key.trim_start_matches("whsec_")));
            break;
        }
        signal(&child, nix::sys::signal::Signal::SIGKILL);
        child.wait().await.unwrap();
        let _ = logs.await;
        kills += 1;
        assert!(
            started.elapsed() < LIMIT * 2,
            "not done after {kills} kills: {active} active, {pending} pending"
        );
    }
    env.assert_all_true(&ids).await;

    let reader = env.reader().await;
    let all = recorded(&reader, &ids, |_| true).await;
    let terminal = recorded(&reader, &ids, |s| ActionStatus::parse(s).is_terminal()).await;
    reader.close().await;
    let transitions: usize = all.values().map(Vec::len).sum();
    let soar_got = soar.requests();
    let lead_got = lead.requests();
    assert!(
        soar_got.iter().chain(&lead_got).all(|r| r.verified),
        "every request is signed with the destination's key"
    );
    let soar_dups = check_heard("soar", &soar_got, &all);
    let lead_dups = check_heard("lead", &lead_got, &terminal);
    // Duplicates come only from a crash between a send and its commit: at most one batch
    // per destination per kill.
    assert!(
        soar_dups + lead_dups <= kills * 2 * 32,
        "{soar_dups} + {lead_dups} duplicates for {kills} kills"
    );
    for r in soar_got.iter().filter(|r| r.accepted).take(50) {
        conforms(&r.json());
    }
    let faulted = soar_got
        .iter()
        .chain(&lead_got)
        .filter(|r| !r.accepted)
        .count();
    let (soar_max, soar_p50) = delays(&soar_got, "observedAt");
    let (lead_max, _) = delays(&lead_got, "observedAt");
    let (mde_max, mde_p50) = delays(&soar_got, "lastUpdateDateTimeUtc");
    eprintln!(
        "figures: 200 actions, {transitions} transitions, {kills} kill -9, {} + {} events delivered (soar every transition, lead terminal), {faulted} receiver faults ({} requests), duplicates {soar_dups} + {lead_dups}; delivery after the daemon recorded the change p50 {soar_p50:.1}s max {:.1}s; after MDE's change p50 {mde_p50:.1}s max {mde_max:.1}s; run {:.0}s",
        all.values().map(Vec::len).sum::<usize>(),
        terminal.values().map(Vec::len).sum::<usize>(),
        soar_got.len() + lead_got.len(),
        soar_max.max(lead_max),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_receiver_never_holds_polling_back() {
    let mut env = TestEnv::new(SimConfig {
        seed: 77,
        ..SimConfig::default()
    })
    .await;
    let key = new_secret();
    let dead = Receiver::start(&[&key], 3).await;
    dead.set_always(Some(Fault::Hang(Duration::from_secs(30))));
    let mut n = toml_notify(
        "dead",
        &dead.url("/"),
        &secret_file(env.dir.path(), "k", &key),
    );
    n.timeout = Duration::from_secs(10);
    n.events = vec![mde_actiond::config::NotifyEvent::Transition];
    env.settings.notify = vec![n];
    let daemon = env.start_daemon().await;
    let ids = env.sim.create_random_actions(40, Duration::from_secs(4));
    daemon.enqueue(&ids).await;
    wait_finished(&daemon.store, &ids, LIMIT).await;
    env.assert_all_true(&ids).await;
    // Each status was recorded soon after it happened although every delivery hangs for
    // 30 s: the poll loop never waited on one.
    let reader = env.reader().await;
    let mut worst = 0.0f64;
    for id in &ids {
        let truth = env.sim.truth(id).unwrap();
        for t in reader.transitions(id).await.unwrap() {
            let happened = truth
                .iter()
                .find(|(s, _)| s.as_str() == t.to_status)
                .unwrap()
                .1;
            let seen = parse_time(&t.observed_at).unwrap();
            worst = worst.max(
                seen.duration_since(happened)
                    .unwrap_or_default()
                    .as_secs_f64(),
            );
        }
    }
    reader.close().await;
    assert!(
        worst < 15.0,
        "a transition was recorded {worst:.1}s late: polling waited on the receiver"
    );
    assert!(!dead.requests().is_empty() || pending_deliveries(&env.db()).await > 0);
    eprintln!(
        "figures: 40 actions with a receiver that hangs every request 30 s: worst detection lag {worst:.1}s"
    );
    daemon.shutdown().await;
}

fn toml_notify(name: &str, url: &str, secret: &Path) -> mde_actiond::config::NotifySettings {
    let text = format!(
        "name = \"{name}\"\nkind = \"webhook\"\nurl = \"{url}\"\nsecret_file = \"{}\"\ntimeout = \"1s\"\n{FAST_RETRIES}\n",
        secret.display()
    );
    toml::from_str(&text).expect("a destination")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_decide_retry_dead_gone_and_the_five_day_rule() {
    let mut env = TestEnv::new(SimConfig::default()).await;
    let key = new_secret();
    let r = Receiver::start(&[&key], 4).await;
    let secret = secret_file(env.dir.path(), "k", &key);
    let mut n = toml_notify("soar", &r.url("/"), &secret);
    n.events = vec![mde_actiond::config::NotifyEvent::Transition];
    env.settings.notify = vec![n];
    env.settings.http.listen = Some("127.0.0.1:0".into());
    // First event: a redirect (not followed), 500, 429 (Retry-After 2), then 200. Second:
    // 400 (dead at once).
    r.script(vec![
        Fault::Status(302),
        Fault::Status(500),
        Fault::TooMany(2),
    ]);
    let daemon = env.start_daemon().await;
    let base = format!("http://{}", daemon.http_addr.unwrap());
    let one = env.sim.create_action(Lifecycle::new(vec![(
        Duration::ZERO,
        ActionStatus::Succeeded,
    )]));
    daemon.enqueue(std::slice::from_ref(&one)).await;
    r.wait_for(LIMIT, "the first event delivered", |got| {
        got.iter().any(|g| g.accepted)
    })
    .await;
    let got = r.requests();
    assert_eq!(got.len(), 4, "302, 500, 429, then delivered: {got:?}");
    assert!(
        got.iter().all(|g| g.path == "/"),
        "the redirect was not followed"
    );
    let after_429 = got[3].at.duration_since(got[2].at).unwrap();
    assert!(
        after_429 >= Duration::from_millis(1900),
        "Retry-After 2 honoured: {after_429:?}"
    );
    assert!(
        got.iter().all(|g| g.id() == got[0].id()),
        "one webhook-id across retries"
    );

    r.script(vec![Fault::Status(400)]);
    let two = env
        .sim
        .create_action(Lifecycle::new(vec![(Duration::ZERO, ActionStatus::Failed)]));
    daemon.enqueue(std::slice::from_ref(&two)).await;
    eventually(LIMIT, "a 400 makes the event dead at once", || async {
        let s = env.reader().await;
        let dead = s.deliveries(Some("dead"), false, 10).await.unwrap();
        s.close().await;
        dead.len() == 1 && dead[0].attempts == 1 && dead[0].last_status == Some(400)
    })
    .await;

    // 410: the destination is disabled and says so; what comes later waits, and goes out
    // once it is enabled again.
    r.script(vec![Fault::Status(410)]);
    let three = env.sim.create_action(Lifecycle::new(vec![(
        Duration::ZERO,
        ActionStatus::Cancelled,
    )]));
    daemon.enqueue(std::slice::from_ref(&three)).await;
    let http = reqwest::Client::new();
    eventually(LIMIT, "410 disables the destination in /readyz", || async {
        let text = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.contains("notify destination soar disabled")
    })
    .await;
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("mde_actiond_notify_disabled{destination=\"soar\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mde_actiond_notify_pending{destination=\"soar\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "mde_actiond_notify_deliveries_total{destination=\"soar\",outcome=\"gone\"} 1"
        ),
        "{metrics}"
    );
    let list = bin()
        .args(["--db", env.db().to_str().unwrap(), "notify", "list"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("disabled since") && text.contains("410"),
        "{text}"
    );
    let enable = bin()
        .args([
            "--db",
            env.db().to_str().unwrap(),
            "notify",
            "enable",
            "soar",
        ])
        .output()
        .await
        .unwrap();
    assert!(enable.status.success(), "{enable:?}");
    r.wait_for(LIMIT, "the held event delivered after enable", |got| {
        got.iter().filter(|g| g.accepted).count() == 2
    })
    .await;
    daemon.shutdown().await;

    // A destination that never succeeds is disabled after disable_after.
    r.set_always(Some(Fault::Status(503)));
    env.settings.notify[0].disable_after = Duration::from_secs(2);
    let daemon = env.start_daemon().await;
    let four = env.sim.create_action(Lifecycle::new(vec![(
        Duration::ZERO,
        ActionStatus::Succeeded,
    )]));
    daemon.enqueue(&[four]).await;
    eventually(
        LIMIT,
        "disabled after disable_after of failures",
        || async {
            let s = env.reader().await;
            let d = s.destination("soar").await.unwrap().unwrap();
            s.close().await;
            d.disabled_reason
                .is_some_and(|r| r.contains("failing without a success"))
        },
    )
    .await;
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_reach_only_their_action_and_only_allowed_hosts() {
    let mut env = TestEnv::new(SimConfig::default()).await;
    let key = new_secret();
    let cb = Receiver::start(&[&key], 5).await;
    env.settings.callbacks.allow = vec!["127.0.0.1".into(), "*.example.com".into()];
    env.settings.callbacks.secret_file = Some(secret_file(env.dir.path(), "cb", &key));
    env.settings.callbacks.retry_schedule = Some(vec!["200ms".into(), "500ms".into()]);
    env.settings.http.listen = Some("127.0.0.1:0".into());
    let daemon = env.start_daemon().await;
    let base = format!("http://{}/v1/actions", daemon.http_addr.unwrap());
    let life = || {
        Lifecycle::simple(
            Duration::from_millis(500),
            Duration::from_millis(500),
            ActionStatus::Succeeded,
        )
    };
    let mine = env.sim.create_action(life());
    let other = env.sim.create_action(life());
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let r = http
                .post(&base)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    // Refused: a host not listed, loopback reached through a wildcard, a user in the URL.
    for url in [
        "http://soar.example.org/cb",
        "http://127.0.0.2:9/cb",
        "http://localhost/cb",
        "http://u:p@a.example.com/cb",
    ] {
        let (status, text) =
            post(serde_json::json!({"ids": [other.as_str()], "callback_url": url})).await;
        assert_eq!(status, 400, "{url}: {text}");
        assert!(text.contains("nothing was enqueued"), "{text}");
    }
    let s = env.reader().await;
    assert!(
        s.action(&other).await.unwrap().is_none(),
        "a refused request enqueues nothing"
    );
    s.close().await;
    let (status, text) = post(serde_json::json!({
        "ids": [mine.as_str()],
        "correlation": "playbook-run-42",
        "callback_url": cb.url("/workflows/run42?sig=s3cr3t"),
    }))
    .await;
    assert_eq!(status, 200, "{text}");
    daemon.enqueue(std::slice::from_ref(&other)).await;
    wait_finished(&daemon.store, &[mine.clone(), other.clone()], LIMIT).await;
    cb.wait_for(LIMIT, "the terminal event at the callback", |got| {
        got.iter()
            .any(|g| g.accepted && g.json()["data"]["status"] == "Succeeded")
    })
    .await;
    let got = cb.accepted();
    for g in &got {
        let v = g.json();
        assert_eq!(
            v["data"]["id"],
            mine.as_str(),
            "only its own action's events"
        );
        assert_eq!(v["data"]["correlation"], "playbook-run-42");
        assert_eq!(g.path, "/workflows/run42?sig=s3cr3t");
        assert!(g.verified);
        conforms(&v);
    }
    let statuses: Vec<String> = got
        .iter()
        .map(|g| g.json()["data"]["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        statuses,
        ["Pending", "InProgress", "Succeeded"],
        "every transition, in order"
    );
    daemon.shutdown().await;

    // The CLI takes the same options and refuses the same hosts.
    let config = config_file(env.dir.path(), "[callbacks]\nallow = [\"*.example.com\"]\n");
    let out = bin()
        .args([
            "--config",
            config.to_str().unwrap(),
            "--db",
            env.db().to_str().unwrap(),
        ])
        .args([
            "enqueue",
            "--callback-url",
            "http://10.0.0.1/cb",
            other.as_str(),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in callbacks.allow"));
    let out = bin()
        .args([
            "--config",
            config.to_str().unwrap(),
            "--db",
            env.db().to_str().unwrap(),
        ])
        .args([
            "enqueue",
            "--correlation",
            "t-1",
            "--callback-url",
            "https://hooks.example.com/cb",
        ])
        .arg(
            ActionId::parse("2e9da30d-27f6-4208-81f2-9cd3d67893ba")
                .unwrap()
                .as_str(),
        )
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_splunk_formats_filters_stuck_replay_and_no_secret_anywhere() {
    let env = TestEnv::new(SimConfig::default()).await;
    let dir = env.dir.path();
    let key = new_secret();
    let hook = Receiver::start(&[&key], 6).await;
    let chat = Receiver::start(&[], 7).await;
    let splunk = Receiver::start(&[], 8).await;
    let hec_token = "hec-0b5e7c1e-token";
    let bearer = "bearer-7d1f-token";
    let teams_url = chat.url("/workflows/abc/triggers/manual/paths/invoke?sig=teams-sig-9f8e");
    let slack_url = chat.url("/services/T000/B000/slack-secret-4c3d");
    let config = config_file(
        dir,
        &format!(
            "[report]\nstuck_after = \"2s\"\n\n{}\
             [[notify]]\nname = \"teams\"\nkind = \"teams\"\nurl_file = \"{}\"\nevents = [\"terminal\"]\n\n\
             [[notify]]\nname = \"slack\"\nkind = \"slack\"\nurl = \"{slack_url}\"\nevents = [\"terminal\"]\nstatuses = [\"Failed\"]\n\n\
             [[notify]]\nname = \"splunk\"\nkind = \"splunk_hec\"\nurl = \"{}\"\ntoken_file = \"{}\"\nevents = [\"transition\", \"stuck\"]\n",
            webhook(
                "isolations",
                &hook.url("/hook"),
                &secret_file(dir, "hook.key", &key),
                r#"["transition", "stuck"]"#,
                &format!(
                    "types = [\"Isolate\"]\ntoken_file = \"{}\"",
                    secret_file(dir, "bearer", bearer).display()
                ),
            ),
            secret_file(dir, "teams.url", &teams_url).display(),
            splunk.url(""),
            secret_file(dir, "hec", hec_token).display(),
        ),
    );
    let listen = free_port();
    let mut child = spawn_daemon(
        &env,
        &[("MDE_ACTIOND_HTTP__LISTEN", format!("127.0.0.1:{listen}"))],
        &["--config", config.to_str().unwrap()],
    );
    let logs = tokio::spawn(read_all(child.stderr.take().unwrap()));
    // One action of each kind that matters: an isolation that fails, a scan that
    // succeeds, an isolation that stays pending (stuck).
    let life = |end| Lifecycle::simple(Duration::from_millis(300), Duration::from_millis(300), end);
    let isolate_fail = env
        .sim
        .create_action_on(life(ActionStatus::Failed), "Isolate", 1);
    let scan_ok = env
        .sim
        .create_action_on(life(ActionStatus::Succeeded), "RunAntiVirusScan", 2);
    let stuck = env.sim.create_action_on(
        Lifecycle::new(vec![(Duration::ZERO, ActionStatus::Pending)]),
        "Isolate",
        3,
    );
    let db = env.db();
    eventually(LIMIT, "the daemon created its database", || async {
        db.exists()
    })
    .await;
    enqueue_with_cli(&db, &[isolate_fail.clone(), scan_ok.clone(), stuck.clone()]).await;

    // The webhook hears only isolations (types filter), including two stuck events.
    hook.wait_for(LIMIT, "two stuck events of the pending isolation", |got| {
        got.iter()
            .filter(|g| {
                let v = g.json();
                g.accepted
                    && v["type"] == "machine_action.stuck"
                    && v["data"]["id"] == stuck.as_str()
            })
            .count()
            >= 2
    })
    .await;
    chat.wait_for(LIMIT, "teams and slack messages", |got| {
        got.iter().filter(|g| g.accepted).count() >= 3
    })
    .await;
    let reader = env.reader().await;
    wait_finished(&reader, &[isolate_fail.clone(), scan_ok.clone()], LIMIT).await;
    let mut transitions = 0;
    for id in [&isolate_fail, &scan_ok, &stuck] {
        transitions += reader.transitions(id).await.unwrap().len();
    }
    reader.close().await;
    splunk
        .wait_for(LIMIT, "HEC events for every transition", |got| {
            got.iter()
                .filter(|g| g.accepted && g.json()["sourcetype"] == "mde:action:transition")
                .count()
                == transitions
        })
        .await;
    let hooked = hook.accepted();
    assert!(
        hooked.iter().all(|g| g.json()["data"]["type"] == "Isolate"),
        "types = [\"Isolate\"]"
    );
    assert!(
        hooked
            .iter()
            .all(|g| g.headers.get("authorization").map(String::as_str)
                == Some(&format!("Bearer {bearer}")))
    );
    let stuck_events: Vec<serde_json::Value> = hooked
        .iter()
        .map(Received::json)
        .filter(|v| v["type"] == "machine_action.stuck")
        .collect();
    // (The others may be seen stuck too: 2 s is shorter than their first backoffs.)
    let counts: Vec<i64> = stuck_events
        .iter()
        .filter(|v| v["data"]["id"] == stuck.as_str())
        .map(|v| v["data"]["stuckCount"].as_i64().unwrap())
        .collect();
    assert_eq!(counts[..2], [1, 2], "one event per stuck_after: {counts:?}");
    for g in &hooked {
        conforms(&g.json());
        assert!(g.body.len() < 20_000);
    }
    // Teams: the Workflows message with an Adaptive Card 1.4; Slack: only Failed.
    let chats = chat.accepted();
    let teams: Vec<_> = chats
        .iter()
        .filter(|g| g.path.starts_with("/workflows/"))
        .collect();
    let slack: Vec<_> = chats
        .iter()
        .filter(|g| g.path.starts_with("/services/"))
        .collect();
    assert_eq!(teams.len(), 2, "terminal events of both finished actions");
    let card = &teams[0].json()["attachments"][0];
    assert_eq!(
        card["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    assert_eq!(card["content"]["version"], "1.4");
    assert_eq!(card["content"]["body"][1]["type"], "FactSet");
    assert_eq!(card["content"]["actions"][0]["type"], "Action.OpenUrl");
    assert_eq!(slack.len(), 1, "statuses = [\"Failed\"]");
    let s = slack[0].json();
    assert!(s["text"].as_str().unwrap().contains("Failed"), "{s}");
    assert!(s["blocks"].as_array().is_some_and(|b| !b.is_empty()));
    // Splunk HEC: the event endpoint, the token, the envelope as the event.
    let hec = splunk.accepted();
    assert!(hec.iter().all(|g| g.path == "/services/collector/event"));
    assert!(
        hec.iter()
            .all(|g| g.headers.get("authorization").map(String::as_str)
                == Some(&format!("Splunk {hec_token}")))
    );
    let e = hec[0].json();
    assert_eq!(e["source"], "mde-actiond");
    assert!(e["time"].as_f64().unwrap() > 1.7e9 && e["host"].is_string());
    assert!(e["event"]["data"]["id"].is_string());

    // Replay: the same event again, its webhook-id unchanged.
    let first = hooked[0].id().to_string();
    let out = bin()
        .args([
            "--config",
            config.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ])
        .args(["notify", "replay", &first, "--to", "isolations"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    hook.wait_for(LIMIT, "the replayed event", |got| {
        got.iter().filter(|g| g.accepted && g.id() == first).count() == 2
    })
    .await;

    // `notify test` sends a signed test event and prints the answer.
    let out = bin()
        .args([
            "--config",
            config.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ])
        .args(["notify", "test", "isolations"])
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("HTTP 200"), "{out:?}");
    let test = hook
        .accepted()
        .into_iter()
        .find(|g| g.json()["type"] == "machine_action.test")
        .expect("test event");
    assert!(test.verified);
    conforms(&test.json());

    // No secret anywhere: logs, metrics, check-config, the database file.
    let metrics = reqwest::get(format!("http://127.0.0.1:{listen}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "mde_actiond_notify_deliveries_total{destination=\"teams\",outcome=\"delivered\"} 2"
        ),
        "{metrics}"
    );
    let check = bin()
        .args(["--config", config.to_str().unwrap()])
        .envs(daemon_env(&env))
        .arg("check-config")
        .output()
        .await
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let stderr = logs.await.unwrap();
    assert!(child.wait().await.unwrap().success(), "{stderr}");
    let mut file = std::fs::read(&db).unwrap();
    for side in ["-wal", "-shm"] {
        if let Ok(more) = std::fs::read(format!("{}{side}", db.display())) {
            file.extend(more);
        }
    }
    let file = String::from_utf8_lossy(&file);
    let secret_key = key.trim_start_matches("whsec_");
    for secret in [
        secret_key,
        hec_token,
        bearer,
        "teams-sig-9f8e",
        "slack-secret-4c3d",
    ] {
        for (place, text) in [
            ("logs", stderr.as_str()),
            ("metrics", metrics.as_str()),
            ("check-config", &String::from_utf8_lossy(&check.stdout)),
            (
                "check-config stderr",
                &String::from_utf8_lossy(&check.stderr),
            ),
            ("database", &file),
        ] {
            assert!(!text.contains(secret), "{secret} appears in the {place}");
        }
    }
    eprintln!(
        "figures: webhook {} events (isolations only), teams {}, slack {}, splunk {} (transitions and stuck)",
        hooked.len(),
        teams.len(),
        slack.len(),
        hec.len()
    );
}
