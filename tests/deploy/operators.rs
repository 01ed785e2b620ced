//! The operators' views: every metric the alert rules and the Grafana dashboard use is one
//! the daemon really exports (scraped from a running daemon), and promtool accepts the
//! rules, passes their unit tests, and parses every dashboard query.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use crate::LIMIT;
use crate::common::*;
use mde_actiond::domain::ActionStatus;
use mde_actiond::sim::{Lifecycle, SimConfig};

/// Metric names (`mde_actiond_*`) an expression reads.
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("mde_actiond_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

fn alert_exprs() -> Vec<String> {
    let text = crate::read("deploy/prometheus/alerts.yml");
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
    docs[0]["groups"]
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_vec().unwrap().iter())
        .map(|r| r["expr"].as_str().unwrap().to_string())
        .collect()
}

fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(&crate::read("deploy/grafana/mde-actiond.json")).unwrap();
    let mut out: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(out.len() >= 10, "a dashboard of {} queries", out.len());
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"].as_str().filter(|q| q.contains("mde_actiond_")) {
            out.push(q.to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboard_use_only_metrics_the_daemon_exports() {
    let env = TestEnv::new(SimConfig::default()).await;
    let mut settings = env.settings.clone();
    settings.http.listen = Some("127.0.0.1:0".into());
    // A destination, so that the notification series exist (a family without a sample
    // is not written).
    let key = crate::common::receiver::new_secret();
    let receiver = crate::common::receiver::Receiver::start(&[&key], 1).await;
    let secret = env.dir.path().join("whsec");
    private_file(&secret, &format!("{key}\n"));
    settings.notify = vec![
        toml::from_str(&format!(
            "name = \"soar\"\nkind = \"webhook\"\nurl = \"http://{}/\"\nsecret_file = \"{}\"\n",
            receiver.addr,
            secret.display()
        ))
        .unwrap(),
    ];
    let daemon = RunningDaemon::start(&settings).await.unwrap();
    let id = env.sim.create_action(Lifecycle::simple(
        Duration::from_millis(100),
        Duration::from_millis(200),
        ActionStatus::Succeeded,
    ));
    daemon.enqueue(std::slice::from_ref(&id)).await;
    wait_finished(&daemon.store, std::slice::from_ref(&id), LIMIT).await;
    let text = reqwest::get(format!("http://{}/metrics", daemon.http_addr.unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    daemon.shutdown().await;
    let mut exported = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            exported.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    let mut used = BTreeSet::new();
    for expr in alert_exprs().iter().chain(&dashboard_exprs()) {
        used.extend(names_in(expr));
    }
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "not exported: {missing:?}");
    eprintln!(
        "{} metrics used by alerts and dashboard, all exported",
        used.len()
    );
}

#[test]
fn promtool_accepts_the_rules_their_tests_and_the_dashboard_queries() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!(
            "skipped: promtool is not installed (Debian package prometheus; .ci/run installs it)"
        );
        return;
    }
    let dir = crate::repo("deploy/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each dashboard query as a recording rule, so promtool parses it; Grafana's variables
    // get values of the same shape.
    let tmp = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs().iter().enumerate() {
        let expr = expr
            .replace("$job", "mde-actiond")
            .replace("$instance", ".*");
        if expr.starts_with("label_values(") {
            continue;
        }
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let file = tmp.path().join("dashboard.yml");
    std::fs::write(&file, rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
