//! The files in deploy/: checked for the fields that matter, and by systemd's own analyzer
//! where it is installed. (tests/runtime runs the image in podman; the image's
//! promises are also proven on the binary in tests/ops.)
// The tests talk to the daemon as its users do; the outbound policy of clippy.toml is the
// daemon's own.
#![allow(clippy::disallowed_methods)]

#[path = "../common/mod.rs"]
mod common;
mod operators;

use std::path::{Path, PathBuf};
use std::process::Command;

const LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `Key=value` lines of a unit (later lines win, except for keys that accumulate).
fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

#[test]
fn systemd_unit_declares_what_the_daemon_needs() {
    let unit = read("deploy/systemd/mde-actiond.service");
    let one = |k: &str| unit_values(&unit, k).last().cloned().unwrap_or_default();
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert!(!one("WatchdogSec").is_empty());
    assert_eq!(one("User"), "mde-actiond");
    assert_eq!(one("Group"), "mde-actiond");
    assert!(
        unit_values(&unit, "DynamicUser").is_empty(),
        "DynamicUser would lock reporting tools out"
    );
    assert_eq!(one("StateDirectory"), "mde-actiond");
    assert_eq!(one("StateDirectoryMode"), "0750");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("RestartPreventExitStatus"), "78");
    // The secret comes as a credential named in the environment, never inline.
    assert!(one("LoadCredential").starts_with("client-secret:"));
    let env = unit_values(&unit, "Environment").join(" ");
    assert!(env.contains("MDE_ACTIOND_AUTH__CLIENT_SECRET_CREDENTIAL=client-secret"));
    assert!(
        !env.contains("CLIENT_SECRET="),
        "a secret in the environment"
    );
    for (key, value) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("RestrictNamespaces", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    assert!(unit_values(&unit, "SystemCallFilter").contains(&"@system-service".to_string()));

    let sysusers = read("deploy/systemd/mde-actiond.sysusers");
    assert!(sysusers.lines().any(|l| l.starts_with("u mde-actiond ")));
    let tmpfiles = read("deploy/systemd/mde-actiond.tmpfiles");
    assert!(
        tmpfiles
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [
                    "d",
                    "/var/lib/mde-actiond",
                    "0750",
                    "mde-actiond",
                    "mde-actiond",
                    "-"
                ])
    );
}

/// What a user gets who follows the README: the example configuration with only tenant_id
/// and client_id edited, under the unit's environment, is a configuration `run` accepts
/// (it used to name two secret sources and exit 78).
#[test]
fn the_example_configuration_under_the_unit_is_valid() {
    let unit = read("deploy/systemd/mde-actiond.service");
    let config = read("config/mde-actiond.toml")
        .replace(
            "tenant_id = \"00000000-0000-0000-0000-000000000000\"",
            "tenant_id = \"contoso.onmicrosoft.com\"",
        )
        .replace(
            "client_id = \"00000000-0000-0000-0000-000000000000\"",
            "client_id = \"11111111-2222-3333-4444-555555555555\"",
        );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mde-actiond.toml");
    std::fs::write(&file, config).unwrap();
    let env: Vec<(String, String)> = unit_values(&unit, "Environment")
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(!env.is_empty());
    let settings = mde_actiond::config::Settings::load_from(Some(&file), env).unwrap();
    // (The credential itself needs systemd's $CREDENTIALS_DIRECTORY: the real-runtime test
    // covers it; here, every check of the configuration.)
    let mut problems = settings.problems();
    problems.extend(settings.credential_problems());
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(
        settings.auth.client_secret_credential.as_deref(),
        Some("client-secret")
    );
    assert_eq!(settings.auth.client_secret_file, None);
    // The database is the configuration's, so CLI commands reading it find the daemon's.
    assert_eq!(
        settings.database.path,
        Path::new("/var/lib/mde-actiond/mde-actiond.db")
    );
    assert!(
        !unit.contains("MDE_ACTIOND_DATABASE__PATH"),
        "the unit must not move the database away from the configuration's path"
    );
}

/// The per-tenant template differs from the single unit only where an instance must.
#[test]
fn the_per_tenant_template_is_the_unit_with_instance_paths() {
    let single = read("deploy/systemd/mde-actiond.service");
    let template = read("deploy/systemd/mde-actiond@.service");
    let one = |k: &str| {
        unit_values(&template, k)
            .last()
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(one("ExecStart"), "/usr/bin/mde-actiond --tenant %i run");
    assert_eq!(
        one("LoadCredential"),
        "client-secret:/etc/mde-actiond/client-secret-%i"
    );
    assert_eq!(one("StateDirectory"), "mde-actiond/%i");
    let settings = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains('='))
            .filter(|l| {
                ![
                    "Description=",
                    "ExecStart=",
                    "LoadCredential=",
                    "StateDirectory=",
                ]
                .iter()
                .any(|k| l.starts_with(k))
            })
            .map(str::to_string)
            .collect()
    };
    assert_eq!(settings(&single), settings(&template));
}

/// `systemd-analyze verify` is clean and the exposure score is 2.0 or lower.
#[test]
fn systemd_analyze_accepts_the_unit() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed (.ci/run installs it where it can)");
        return;
    }
    for (file, name) in [
        ("deploy/systemd/mde-actiond.service", "mde-actiond.service"),
        (
            "deploy/systemd/mde-actiond@.service",
            "mde-actiond@contoso.service",
        ),
    ] {
        analyze(file, name);
    }
}

fn analyze(file: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    // verify wants ExecStart's binary to exist: point it at the one under test.
    let unit = read(file).replace("/usr/bin/mde-actiond", env!("CARGO_BIN_EXE_mde-actiond"));
    let path = dir.path().join(name);
    std::fs::write(&path, unit).unwrap();

    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&verify.stderr).into_owned();
    assert!(verify.status.success(), "{complaints}");
    assert!(
        complaints.lines().all(|l| l.trim().is_empty()),
        "systemd-analyze verify: {complaints}"
    );

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout).into_owned()
        + &String::from_utf8_lossy(&security.stderr);
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{report}"));
    eprintln!("systemd-analyze security exposure of {name}: {score}");
    assert!(score <= 2.0, "exposure {score}:\n{report}");
}

#[test]
fn containerfile_builds_a_small_non_root_image_with_a_healthcheck() {
    let text = read("deploy/container/Containerfile");
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&&str> = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "multi-stage build");
    assert!(
        froms.last().unwrap().contains("distroless"),
        "small final image"
    );
    let final_stage = text.split("\nFROM ").last().unwrap();
    assert!(final_stage.contains("USER 65532:65532"));
    assert!(final_stage.contains("VOLUME [\"/var/lib/mde-actiond\"]"));
    assert!(final_stage.contains("MDE_ACTIOND_DATABASE__PATH=/var/lib/mde-actiond/"));
    assert!(final_stage.contains("CMD [\"/usr/local/bin/mde-actiond\", \"healthcheck\"]"));
    assert!(final_stage.contains("--locked") || text.contains("--locked"));
    for tool in ["curl", "wget"] {
        assert!(
            !final_stage.contains(tool),
            "the final image needs no {tool}"
        );
    }
    // What the build copies exists.
    for path in ["Cargo.toml", "Cargo.lock", "build.rs", "src", "migrations"] {
        assert!(repo(path).exists(), "{path}");
    }
}

fn get<'a>(y: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(y, |acc, key| &acc[*key])
}

#[test]
fn kubernetes_pod_runs_a_restricted_native_sidecar() {
    let docs = YamlLoader::load_from_str(&read("deploy/kubernetes/pod.yaml")).expect("valid YAML");
    let pod = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("Pod"))
        .expect("a Pod");
    let spec = &pod["spec"];
    let grace = spec["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(
        grace >= 15,
        "shutdown needs poll.shutdown_grace plus a checkpoint"
    );
    assert_eq!(
        get(spec, &["securityContext", "runAsNonRoot"]).as_bool(),
        Some(true)
    );
    assert_eq!(
        get(spec, &["securityContext", "seccompProfile", "type"]).as_str(),
        Some("RuntimeDefault")
    );

    let sidecar = spec["initContainers"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some("mde-actiond"))
        .expect("mde-actiond init container");
    assert_eq!(
        sidecar["restartPolicy"].as_str(),
        Some("Always"),
        "native sidecar"
    );
    // The restricted Pod Security Standard.
    let sc = &sidecar["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        get(sc, &["capabilities", "drop"]).as_vec().unwrap()[0].as_str(),
        Some("ALL")
    );
    assert_eq!(
        get(sc, &["seccompProfile", "type"]).as_str(),
        Some("RuntimeDefault")
    );
    for container in spec["containers"].as_vec().unwrap() {
        let sc = &container["securityContext"];
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "main container too"
        );
        assert_eq!(
            get(sc, &["capabilities", "drop"]).as_vec().unwrap()[0].as_str(),
            Some("ALL")
        );
    }
    // Probes use the binary itself.
    for (probe, live) in [
        ("startupProbe", false),
        ("readinessProbe", false),
        ("livenessProbe", true),
    ] {
        let cmd: Vec<&str> = get(sidecar, &[probe, "exec", "command"])
            .as_vec()
            .unwrap_or_else(|| panic!("{probe}"))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(cmd[1], "healthcheck", "{probe}");
        assert_eq!(cmd.contains(&"--live"), live, "{probe}");
    }
    // The database directory is a volume, the secret a read-only file mount.
    let env: Vec<(&str, &str)> = sidecar["env"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["value"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let db = env
        .iter()
        .find(|(k, _)| *k == "MDE_ACTIOND_DATABASE__PATH")
        .unwrap()
        .1;
    let secret_file = env
        .iter()
        .find(|(k, _)| *k == "MDE_ACTIOND_AUTH__CLIENT_SECRET_FILE")
        .unwrap()
        .1;
    assert!(
        !env.iter()
            .any(|(k, _)| *k == "MDE_ACTIOND_AUTH__CLIENT_SECRET"),
        "secret inline"
    );
    let mounts = sidecar["volumeMounts"].as_vec().unwrap();
    let mount_of = |file: &str| {
        mounts
            .iter()
            .find(|m| file.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
            .unwrap_or_else(|| panic!("no mount holds {file}"))
    };
    let data = mount_of(db);
    assert_eq!(
        Path::new(db).parent().unwrap().to_str(),
        data["mountPath"].as_str(),
        "mount the database's directory"
    );
    assert!(
        data["subPath"].is_badvalue(),
        "a subPath file mount would hide -wal and -shm"
    );
    let secret = mount_of(secret_file);
    assert_eq!(secret["readOnly"].as_bool(), Some(true));
    let volumes = spec["volumes"].as_vec().unwrap();
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap()
    };
    assert!(!volume(secret["name"].as_str().unwrap())["secret"].is_badvalue());
    assert!(!volume(data["name"].as_str().unwrap())["persistentVolumeClaim"].is_badvalue());
}
