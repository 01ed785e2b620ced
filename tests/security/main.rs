//! Every network answer is hostile: redirects to another origin, oversized and endless
//! bodies, absurd token fields, answers that make the API refuse the token, a token endpoint
//! that fails for minutes. Each test puts the simulated tenant in one of its hostile modes
//! and proves what docs/security.md promises: no credential leaves for another origin, no
//! answer of another origin is recorded, memory stays bounded, nothing panics, readiness
//! tells the truth, and tracking recovers by itself when the fault passes.
// The tests talk to the daemon as its users do; the outbound policy of clippy.toml is the
// daemon's own.
#![allow(clippy::disallowed_methods)]

#[path = "../common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use mde_actiond::domain::{ActionId, ActionStatus};
use mde_actiond::sim::recorder::Recorder;
use mde_actiond::sim::{Hostile, Lifecycle, SIM_CLIENT_SECRET, SimConfig};

fn quick() -> Lifecycle {
    Lifecycle::simple(
        Duration::from_millis(200),
        Duration::from_millis(300),
        ActionStatus::Succeeded,
    )
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .expect("daemon answers");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// The value of one sample of `/metrics` (0 when absent).
async fn metric(addr: std::net::SocketAddr, sample: &str) -> f64 {
    let (_, text) = get(addr, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// What a recorder must never see: the secret, any bearer token, any client assertion.
fn assert_nothing_reached(recorder: &Recorder) {
    let requests = recorder.requests();
    for r in &requests {
        let body = String::from_utf8_lossy(&r.body);
        assert!(!body.contains(SIM_CLIENT_SECRET), "secret sent: {r:?}");
        assert!(!body.contains("client_assertion"), "assertion sent: {r:?}");
        assert!(r.header("authorization").is_none(), "bearer sent: {r:?}");
    }
    assert!(
        requests.is_empty(),
        "the other origin got {} requests: {requests:?}",
        requests.len()
    );
}

/// Waits for `id` to end, once a fault has passed.
async fn finishes(daemon: &RunningDaemon, id: &ActionId) {
    wait_finished(
        &daemon.store,
        std::slice::from_ref(id),
        Duration::from_secs(60),
    )
    .await;
}

fn with_listener(env: &mut TestEnv) {
    env.settings.http.listen = Some("127.0.0.1:0".into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_redirects_are_never_followed_and_nothing_is_recorded_from_them() {
    let mut env = TestEnv::new(SimConfig::default()).await;
    with_listener(&mut env);
    let ids: Vec<ActionId> = (0..8).map(|_| env.sim.create_action(quick())).collect();
    let recorder = Recorder::start(ids.clone()).await.unwrap();
    env.sim
        .set_hostile_api(Some(Hostile::RedirectTo(recorder.origin())));
    let daemon = env.start_daemon().await;
    let addr = daemon.http_addr.unwrap();
    daemon.enqueue(&ids).await;

    // Long past every action's end: had the daemon followed, the forged answers would have
    // ended all of them.
    eventually(Duration::from_secs(20), "redirects answered", || async {
        env.sim.stats().hostile_answers >= 12
            && metric(addr, "mde_actiond_redirects_refused_total").await >= 1.0
    })
    .await;
    let refused = metric(addr, "mde_actiond_redirects_refused_total").await;
    assert_nothing_reached(&recorder);
    let reader = env.reader().await;
    for id in &ids {
        let row = row(&reader, id).await;
        assert_eq!(row.tracking, "active", "{id}: {row:?}");
        assert!(row.status.is_none(), "{id}: a status from nowhere: {row:?}");
        assert!(reader.transitions(id).await.unwrap().is_empty(), "{id}");
        let error = row.last_error.clone().unwrap_or_default();
        assert!(
            error.contains("307") && error.contains(&recorder.origin()),
            "{id}: the error names the redirect's origin: {error}"
        );
        assert!(
            !error.contains("/api/machineactions"),
            "only the origin is named: {error}"
        );
    }
    reader.close().await;

    env.sim.set_hostile_api(None);
    wait_finished(&daemon.store, &ids, Duration::from_secs(30)).await;
    env.assert_all_true(&ids).await;
    eprintln!(
        "figures: API redirected {} times ({refused} refused and counted), other origin saw {} requests",
        env.sim.stats().hostile_answers,
        recorder.requests().len()
    );
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_redirects_never_carry_the_secret_elsewhere_and_readiness_says_why() {
    let mut env = TestEnv::new(SimConfig::default()).await;
    with_listener(&mut env);
    env.settings.auth.token_grace = Some(Duration::from_millis(500));
    let recorder = Recorder::start(Vec::new()).await.unwrap();
    env.sim
        .set_hostile_token(Some(Hostile::RedirectTo(recorder.origin())));
    let id = env.sim.create_action(quick());
    let daemon = env.start_daemon().await;
    let addr = daemon.http_addr.unwrap();
    daemon.enqueue(std::slice::from_ref(&id)).await;

    eventually(
        Duration::from_secs(20),
        "token tries redirected",
        || async { env.sim.stats().hostile_answers >= 3 },
    )
    .await;
    eventually(Duration::from_secs(10), "readyz not ready", || async {
        let (status, body) = get(addr, "/readyz").await;
        status == 503 && body.contains("no usable access token") && body.contains("307")
    })
    .await;
    let (health, _) = get(addr, "/healthz").await;
    assert_eq!(health, 200, "liveness is not readiness");
    assert!(
        metric(
            addr,
            "mde_actiond_token_failures_by_cause_total{cause=\"redirected\"}"
        )
        .await
            >= 3.0
    );
    assert_nothing_reached(&recorder);
    assert!(env.sim.issued_tokens().is_empty());

    env.sim.set_hostile_token(None);
    finishes(&daemon, &id).await;
    eventually(Duration::from_secs(10), "ready again", || async {
        get(addr, "/readyz").await.0 == 200
    })
    .await;
    env.assert_all_true(std::slice::from_ref(&id)).await;
    eprintln!(
        "figures: token endpoint redirected {} times, other origin saw {} requests",
        env.sim.stats().hostile_answers,
        recorder.requests().len()
    );
    daemon.shutdown().await;
}

/// Peak resident memory of a process, from /proc (KiB).
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .expect("VmHWM")
}

/// Runs the real binary against a tenant answering `hostile` (to token requests when
/// `token`, else to API calls) until it has met it `times` times; returns its peak RSS in
/// KiB, after checking it recovers once the fault passes.
async fn peak_rss_meeting(hostile: Hostile, token: bool, times: u64) -> u64 {
    let env = TestEnv::new(SimConfig::default()).await;
    if token {
        env.sim.set_hostile_token(Some(hostile));
    } else {
        env.sim.set_hostile_api(Some(hostile));
    }
    let id = env.sim.create_action(quick());
    enqueue_with_cli(&env.db(), std::slice::from_ref(&id)).await;
    let port = free_port();
    let mut child = spawn_daemon(
        &env,
        &[
            ("MDE_ACTIOND_HTTP__LISTEN", format!("127.0.0.1:{port}")),
            ("MDE_ACTIOND_AUTH__TOKEN_GRACE", "1s".into()),
            ("MDE_ACTIOND_API__TIMEOUT", "20s".into()),
        ],
        &[],
    );
    let pid = child.id().unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually(Duration::from_secs(60), "hostile answers met", || async {
        env.sim.stats().hostile_answers >= times
    })
    .await;
    if token {
        eventually(Duration::from_secs(20), "readyz says why", || async {
            let Ok(r) = reqwest::get(format!("http://{addr}/readyz")).await else {
                return false;
            };
            r.status().as_u16() == 503
                && r.text()
                    .await
                    .unwrap_or_default()
                    .contains("no usable access token")
        })
        .await;
    }
    let peak = peak_rss_kib(pid);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the daemon is still running"
    );
    if token {
        env.sim.set_hostile_token(None);
    } else {
        env.sim.set_hostile_api(None);
    }
    let reader = env.reader().await;
    wait_finished(&reader, std::slice::from_ref(&id), Duration::from_secs(60)).await;
    reader.close().await;
    signal(&child, nix::sys::signal::Signal::SIGTERM);
    let status = child.wait().await.unwrap();
    assert!(status.success(), "{status:?}");
    env.assert_all_true(std::slice::from_ref(&id)).await;
    peak
}

const GIB: u64 = 1 << 30;
/// What the daemon needs on its own (runtime, SQLite cache, buffers), measured at 14-20 MiB,
/// with room: the caps are 64 KiB for token answers and about a megabyte for a list call.
const BOUND_KIB: u64 = 48 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_endless_token_answers_are_refused_with_bounded_memory() {
    let mut figures = Vec::new();
    for (name, hostile) in [
        ("1 GiB token answer", Hostile::Huge(GIB)),
        ("100 MB access_token", Hostile::Huge(100_000_000)),
        ("endless token answer", Hostile::Endless),
    ] {
        let peak = peak_rss_meeting(hostile, true, 2).await;
        figures.push(format!("{name}: peak RSS {} MiB", peak >> 10));
        assert!(peak < BOUND_KIB, "{name}: peak RSS {peak} KiB");
    }
    eprintln!("figures: {}", figures.join("; "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_endless_api_answers_are_refused_with_bounded_memory() {
    let mut figures = Vec::new();
    for (name, hostile) in [
        ("1 GiB API answer", Hostile::Huge(GIB)),
        ("endless API answer", Hostile::Endless),
    ] {
        let peak = peak_rss_meeting(hostile, false, 4).await;
        figures.push(format!("{name}: peak RSS {} MiB", peak >> 10));
        assert!(peak < BOUND_KIB, "{name}: peak RSS {peak} KiB");
    }
    eprintln!("figures: {}", figures.join("; "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_token_lifetimes_never_panic_and_are_clamped() {
    for raw in [
        "18446744073709551615",
        "9223372036854775807",
        "1e300",
        "-5",
        "\"99999999999999999999999\"",
        "0",
    ] {
        let mut env = TestEnv::new(SimConfig::default()).await;
        with_listener(&mut env);
        env.sim
            .set_hostile_token(Some(Hostile::ExpiresIn(raw.to_string())));
        let ids: Vec<ActionId> = (0..3).map(|_| env.sim.create_action(quick())).collect();
        let daemon = env.start_daemon().await;
        let addr = daemon.http_addr.unwrap();
        daemon.enqueue(&ids).await;
        wait_finished(&daemon.store, &ids, Duration::from_secs(30)).await;
        env.assert_all_true(&ids).await;
        let (ready, body) = get(addr, "/readyz").await;
        assert_eq!(ready, 200, "expires_in {raw}: {body}");
        for task in ["poller", "token"] {
            let sample = format!("mde_actiond_panics_total{{task=\"{task}\"}}");
            assert_eq!(metric(addr, &sample).await, 0.0, "expires_in {raw}");
        }
        let stats = env.sim.stats();
        // A lifetime clamped to a day needs one token; one clamped to a second, one per
        // second of the run at most (refreshed as calls need it, never in a spin).
        assert!(
            stats.token_requests <= 40,
            "expires_in {raw}: {} token requests",
            stats.token_requests
        );
        eprintln!(
            "figures: expires_in {raw}: {} token requests, {} API calls",
            stats.token_requests, stats.api_calls
        );
        daemon.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_front_end_refuses_is_dropped_and_refreshed_with_backoff() {
    let mut env = TestEnv::new(SimConfig::default()).await;
    with_listener(&mut env);
    // A 10 KB token passes the daemon's checks; a front end that takes 8 KiB of head
    // answers 431 to every call that carries it.
    env.sim.set_max_request_head(8 << 10);
    env.sim.set_hostile_token(Some(Hostile::LongToken(10_000)));
    let id = env.sim.create_action(quick());
    let daemon = env.start_daemon().await;
    let addr = daemon.http_addr.unwrap();
    daemon.enqueue(std::slice::from_ref(&id)).await;
    eventually(Duration::from_secs(20), "431s met and told", || async {
        let (status, body) = get(addr, "/readyz").await;
        env.sim.stats().oversized_heads >= 2 && status == 503 && body.contains("431")
    })
    .await;
    // Backed off: not a token per call.
    let before = env.sim.stats();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = env.sim.stats();
    assert!(
        after.token_requests - before.token_requests <= 3,
        "{} token requests in 3 s",
        after.token_requests - before.token_requests
    );
    assert!(after.tokens_issued >= 2, "each refusal dropped the token");
    assert!(
        row(&daemon.store, &id).await.status.is_none(),
        "nothing recorded from refused calls"
    );

    env.sim.set_hostile_token(None);
    finishes(&daemon, &id).await;
    env.assert_all_true(std::slice::from_ref(&id)).await;
    eventually(Duration::from_secs(10), "ready again", || async {
        get(addr, "/readyz").await.0 == 200
    })
    .await;
    eprintln!(
        "figures: 10 KB token: {} calls answered 431, {} tokens issued before recovery",
        after.oversized_heads, after.tokens_issued
    );
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_too_long_for_a_header_are_refused_before_any_call() {
    let mut env = TestEnv::new(SimConfig::default()).await;
    with_listener(&mut env);
    env.sim.set_hostile_token(Some(Hostile::LongToken(40_000)));
    let id = env.sim.create_action(quick());
    let daemon = env.start_daemon().await;
    let addr = daemon.http_addr.unwrap();
    daemon.enqueue(std::slice::from_ref(&id)).await;
    eventually(
        Duration::from_secs(20),
        "invalid answers counted",
        || async {
            metric(
                addr,
                "mde_actiond_token_failures_by_cause_total{cause=\"invalid_answer\"}",
            )
            .await
                >= 2.0
        },
    )
    .await;
    let stats = env.sim.stats();
    assert_eq!(stats.api_calls, 0, "no call carried the token");
    assert_eq!(stats.oversized_heads, 0);
    env.sim.set_hostile_token(None);
    finishes(&daemon, &id).await;
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_token_endpoint_turns_readiness_off_after_the_grace() {
    let mut env = TestEnv::new(SimConfig {
        token_fault_rate: 1.0,
        ..SimConfig::default()
    })
    .await;
    with_listener(&mut env);
    env.settings.auth.token_grace = Some(Duration::from_secs(2));
    let id = env.sim.create_action(quick());
    let daemon = env.start_daemon().await;
    let addr = daemon.http_addr.unwrap();
    daemon.enqueue(std::slice::from_ref(&id)).await;
    eventually(Duration::from_secs(5), "a token request failed", || async {
        env.sim.stats().token_requests >= 1
    })
    .await;
    // Within the grace a failure is not yet unreadiness (retries are backed off 1, 2 s).
    eventually(
        Duration::from_secs(20),
        "not ready past the grace",
        || async {
            let (status, body) = get(addr, "/readyz").await;
            status == 503 && body.contains("no usable access token") && body.contains("503")
        },
    )
    .await;
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert!(
        metric(
            addr,
            "mde_actiond_token_failures_by_cause_total{cause=\"transient\"}"
        )
        .await
            >= 1.0
    );
    env.sim.set_token_fault_rate(0.0);
    finishes(&daemon, &id).await;
    eventually(Duration::from_secs(10), "ready again", || async {
        get(addr, "/readyz").await.0 == 200
    })
    .await;
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_and_workload_assertions_are_never_sent_to_a_redirect() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_certificate(dir.path(), false);
    let mut env = TestEnv::new(SimConfig {
        certificate: Some(cert.sim.clone()),
        federated: true,
        ..SimConfig::default()
    })
    .await;
    with_listener(&mut env);
    let federated = dir.path().join("federated-token");
    std::fs::write(&federated, env.sim.federated_token()).unwrap();
    let recorder = Recorder::start(Vec::new()).await.unwrap();
    for method in ["certificate", "workload identity"] {
        let mut settings = env.settings.clone();
        settings.auth.client_secret = None;
        if method == "certificate" {
            settings.auth.certificate_file = Some(cert.cert_file.clone());
            settings.auth.private_key_file = Some(cert.key_file.clone());
        } else {
            settings.auth.federated_token_file = Some(federated.clone());
        }
        env.sim
            .set_hostile_token(Some(Hostile::RedirectTo(recorder.origin())));
        let id = env.sim.create_action(quick());
        let before = env.sim.stats().hostile_answers;
        let daemon = RunningDaemon::start(&settings).await.unwrap();
        daemon.enqueue(std::slice::from_ref(&id)).await;
        eventually(
            Duration::from_secs(20),
            "token tries redirected",
            || async { env.sim.stats().hostile_answers >= before + 2 },
        )
        .await;
        assert_nothing_reached(&recorder);
        env.sim.set_hostile_token(None);
        finishes(&daemon, &id).await;
        daemon.shutdown().await;
    }
    assert_nothing_reached(&recorder);
}
