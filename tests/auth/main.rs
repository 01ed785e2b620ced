//! Every credential method end to end against a token endpoint that really checks what it
//! is given (assertion signatures, claims, thumbprints, federated and managed identity
//! forms), plus `doctor`'s verdicts.

#[path = "../common/mod.rs"]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use mde_actiond::config::{AuthMethod, Settings, SigningAlgorithm};
use mde_actiond::sim::{SimConfig, SimManagedIdentity};

const LIMIT: Duration = Duration::from_secs(60);

/// Settings with no credential at all: each test adds one method's keys.
fn bare(env: &TestEnv) -> Settings {
    let mut s = env.settings.clone();
    s.auth.client_secret = None;
    s
}

/// Runs the daemon to the end of a few actions and checks they ended truly.
async fn track_some(env: &TestEnv, settings: &Settings) -> RunningDaemon {
    let ids = env.sim.create_random_actions(6, Duration::from_millis(600));
    let daemon = RunningDaemon::start(settings).await.unwrap();
    daemon.enqueue(&ids).await;
    wait_finished(&daemon.store, &ids, LIMIT).await;
    env.assert_all_true(&ids).await;
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_assertions_with_ps256_and_rs256() {
    let dir = tempfile::tempdir().unwrap();
    let cert = test_certificate(dir.path(), false);
    let env = TestEnv::new(SimConfig {
        certificate: Some(cert.sim.clone()),
        token_lifetime: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await;
    for algorithm in [SigningAlgorithm::PS256, SigningAlgorithm::RS256] {
        let mut s = bare(&env);
        s.auth.certificate_file = Some(cert.cert_file.clone());
        s.auth.private_key_file = Some(cert.key_file.clone());
        s.auth.signing_algorithm = algorithm;
        assert_eq!(s.auth_method().unwrap(), AuthMethod::Certificate);
        let daemon = track_some(&env, &s).await;
        assert!(daemon.poller.tokens().refreshes() >= 1);
        daemon.shutdown().await;
    }
    let stats = env.sim.stats();
    assert_eq!(stats.token_refusals, 0, "{stats:?}");
    assert_eq!(stats.expired_token_calls, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_the_tenant_does_not_know_or_that_expired_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let registered = test_certificate(dir.path(), false);
    let other_dir = tempfile::tempdir().unwrap();
    let stranger = test_certificate(other_dir.path(), false);
    let expired = test_certificate(dir.path(), true);
    let env = TestEnv::new(SimConfig {
        certificate: Some(registered.sim.clone()),
        ..SimConfig::default()
    })
    .await;

    // Not registered: the platform refuses the signature (AADSTS700027).
    let mut s = bare(&env);
    s.auth.certificate_file = Some(stranger.cert_file.clone());
    s.auth.private_key_file = Some(stranger.key_file.clone());
    let out = doctor(&env, &s).await;
    assert_eq!(out.0, Some(1));
    assert!(
        out.1.contains("AADSTS700027") && out.1.contains("upload it to the app registration"),
        "{}",
        out.1
    );

    // Expired: refused before anything is sent, saying when it expired.
    s.auth.certificate_file = Some(expired.cert_file.clone());
    s.auth.private_key_file = Some(expired.key_file.clone());
    let before = env.sim.stats().token_requests;
    let out = doctor(&env, &s).await;
    assert_eq!(out.0, Some(1));
    assert!(out.1.contains("expired on 2021-01-01"), "{}", out.1);
    assert_eq!(
        env.sim.stats().token_requests,
        before,
        "an expired certificate was sent"
    );

    // A key file others can read is refused with the fix.
    std::fs::set_permissions(&registered.key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    s.auth.certificate_file = Some(registered.cert_file.clone());
    s.auth.private_key_file = Some(registered.key_file.clone());
    let out = doctor(&env, &s).await;
    assert_eq!(out.0, Some(1));
    assert!(out.1.contains("chmod 600"), "{}", out.1);

    // The identity platform's own expiry verdict reaches readiness in plain words.
    std::fs::set_permissions(&registered.key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let env2 = TestEnv::new(SimConfig {
        certificate: Some(mde_actiond::sim::SimCertificate {
            expired: true,
            ..registered.sim.clone()
        }),
        ..SimConfig::default()
    })
    .await;
    let mut s2 = bare(&env2);
    s2.auth.certificate_file = Some(registered.cert_file.clone());
    s2.auth.private_key_file = Some(registered.key_file.clone());
    let out = doctor(&env2, &s2).await;
    assert!(out.1.contains("The key used is expired"), "{}", out.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_identity_reads_the_rotating_token_file() {
    let env = TestEnv::new(SimConfig {
        federated: true,
        token_lifetime: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    std::fs::write(&file, env.sim.federated_token()).unwrap();
    // As AKS injects it: only environment variables, no keys in the file.
    let vars = vec![
        (
            "AZURE_FEDERATED_TOKEN_FILE".to_string(),
            file.display().to_string(),
        ),
        (
            "AZURE_CLIENT_ID".to_string(),
            mde_actiond::sim::SIM_CLIENT_ID.to_string(),
        ),
        (
            "AZURE_TENANT_ID".to_string(),
            mde_actiond::sim::SIM_TENANT.to_string(),
        ),
        (
            "AZURE_AUTHORITY_HOST".to_string(),
            format!("{}/", env.sim.authority()),
        ),
        ("MDE_ACTIOND_API__BASE_URL".to_string(), env.sim.base_url()),
    ];
    let mut s = Settings::load_from(None, vars).unwrap();
    s.database.path = env.db();
    s.poll = env.settings.poll.clone();
    s.auth.scope = Some(mde_actiond::sim::SIM_SCOPE.to_string());
    assert_eq!(s.auth_method().unwrap(), AuthMethod::WorkloadIdentity);
    let daemon = track_some(&env, &s).await;

    // The kubelet rotates the token; the old one stops working at once.
    let fresh = env.sim.rotate_federated_token();
    std::fs::write(&file, &fresh).unwrap();
    env.sim.revoke_tokens();
    let more = env.sim.create_random_actions(4, Duration::from_millis(400));
    daemon.enqueue(&more).await;
    wait_finished(&daemon.store, &more, LIMIT).await;
    daemon.shutdown().await;
    env.assert_all_true(&more).await;
    assert_eq!(
        env.sim.stats().token_refusals,
        0,
        "the rotated file was not re-read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_identity_on_vms_and_app_service() {
    let env = TestEnv::new(SimConfig {
        managed_identity: Some(SimManagedIdentity {
            user_assigned_client_id: Some("11111111-2222-3333-4444-555555555555".into()),
            identity_header: "header-secret".into(),
        }),
        ..SimConfig::default()
    })
    .await;
    // IMDS form with a user-assigned identity.
    let mut s = bare(&env);
    s.auth.method = Some(AuthMethod::ManagedIdentity);
    s.auth.tenant_id = None;
    s.auth.client_id = None;
    s.auth.managed_identity_endpoint = Some(format!(
        "{}/metadata/identity/oauth2/token",
        env.sim.base_url()
    ));
    s.auth.managed_identity_client_id = Some("11111111-2222-3333-4444-555555555555".into());
    track_some(&env, &s).await.shutdown().await;

    // App Service / Container Apps form, from the variables the platform sets.
    let vars = vec![
        (
            "IDENTITY_ENDPOINT".to_string(),
            format!("{}/msi/token", env.sim.base_url()),
        ),
        ("IDENTITY_HEADER".to_string(), "header-secret".to_string()),
        (
            "MDE_ACTIOND_AUTH__METHOD".to_string(),
            "managed_identity".to_string(),
        ),
        (
            "MDE_ACTIOND_AUTH__MANAGED_IDENTITY_CLIENT_ID".to_string(),
            "11111111-2222-3333-4444-555555555555".to_string(),
        ),
        ("MDE_ACTIOND_API__BASE_URL".to_string(), env.sim.base_url()),
    ];
    let mut s = Settings::load_from(None, vars).unwrap();
    s.database.path = env.db();
    s.poll = env.settings.poll.clone();
    s.validate_for_run().unwrap();
    track_some(&env, &s).await.shutdown().await;
    assert_eq!(env.sim.stats().token_refusals, 0);
    assert!(
        !format!("{s:?}").contains("header-secret"),
        "identity header printed"
    );
}

/// Runs `doctor` for `settings` through the binary; returns (exit code, stdout).
async fn doctor(env: &TestEnv, settings: &Settings) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("doctor.toml");
    let mut s = settings.clone();
    s.database.path = env.db();
    // The rendered config redacts secrets, so pass the one secret through the environment.
    let secret = s.auth.client_secret.take();
    std::fs::write(&config, toml::to_string(&s).unwrap()).unwrap();
    let mut cmd = bin();
    if let Some(secret) = secret {
        cmd.env("MDE_ACTIOND_AUTH__CLIENT_SECRET", secret.expose());
    }
    let out = cmd
        .arg("--config")
        .arg(&config)
        .arg("doctor")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_says_what_works_and_what_to_fix() {
    let env = TestEnv::new(SimConfig::default()).await;
    let good = doctor(&env, &env.settings).await;
    assert_eq!(good.0, Some(0), "{}", good.1);
    assert!(
        good.1.contains("[ok]   token roles: Machine.Read.All"),
        "{}",
        good.1
    );
    assert!(good.1.contains("[ok]   API"), "{}", good.1);

    let mut wrong = env.settings.clone();
    wrong.auth.client_secret = Some(mde_actiond::secret::Secret::new("not-the-secret"));
    let out = doctor(&env, &wrong).await;
    assert_eq!(out.0, Some(1));
    assert!(
        out.1.contains("AADSTS7000215") && out.1.contains("use the secret's Value"),
        "{}",
        out.1
    );
    assert!(!out.1.contains("not-the-secret"), "secret printed");

    let mut tenant = env.settings.clone();
    tenant.auth.tenant_id = Some("contoso.onmicrosoft.com".into());
    let out = doctor(&env, &tenant).await;
    assert!(
        out.1.contains("AADSTS90002") && out.1.contains("check auth.tenant_id"),
        "{}",
        out.1
    );

    let mut missing = env.settings.clone();
    missing.auth.client_id = None;
    let out = doctor(&env, &missing).await;
    assert_eq!(out.0, Some(1));
    assert!(
        out.1.contains("[FAIL] configuration: auth.client_id"),
        "{}",
        out.1
    );

    // A file others can read is refused with the fix.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, mde_actiond::sim::SIM_CLIENT_SECRET).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut loose = env.settings.clone();
    loose.auth.client_secret = None;
    loose.auth.client_secret_file = Some(file.clone());
    let out = doctor(&env, &loose).await;
    assert_eq!(out.0, Some(1));
    assert!(
        out.1.contains("readable by other users") && out.1.contains("chmod 600"),
        "{}",
        out.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_audience_and_missing_roles_are_explained() {
    let env = TestEnv::new(SimConfig {
        token_audience: "https://graph.microsoft.com".into(),
        ..SimConfig::default()
    })
    .await;
    let out = doctor(&env, &env.settings).await;
    assert_eq!(out.0, Some(1));
    assert!(
        out.1
            .contains("[FAIL] token audience: 'https://graph.microsoft.com'"),
        "{}",
        out.1
    );
    assert!(out.1.contains("403"), "{}", out.1);

    // The daemon records the 403 on the action and keeps it for later.
    let id = env.sim.create_action(mde_actiond::sim::Lifecycle::simple(
        Duration::from_millis(10),
        Duration::from_millis(10),
        mde_actiond::domain::ActionStatus::Succeeded,
    ));
    let daemon = env.start_daemon().await;
    daemon.enqueue(std::slice::from_ref(&id)).await;
    let store = daemon.store.clone();
    eventually(LIMIT, "the 403 recorded", || async {
        store.action(&id).await.unwrap().unwrap().error_count > 0
    })
    .await;
    let r = row(&store, &id).await;
    assert_eq!(r.tracking, "active");
    assert!(r.last_error.unwrap().contains("403"));
    daemon.shutdown().await;

    let roles = TestEnv::new(SimConfig {
        token_roles: vec!["Alert.Read.All".into()],
        ..SimConfig::default()
    })
    .await;
    let out = doctor(&roles, &roles.settings).await;
    assert_eq!(out.0, Some(1));
    assert!(
        out.1.contains("no Machine.Read.All") && out.1.contains("admin consent"),
        "{}",
        out.1
    );
}

#[test]
fn clouds_set_hosts_authority_and_scope_together() {
    let load = |pairs: &[(&str, &str)]| {
        Settings::load_from(
            None,
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap()
    };
    let c = load(&[]);
    assert_eq!(c.api_base_url(), "https://api.securitycenter.microsoft.com");
    assert_eq!(c.authority(), "https://login.microsoftonline.com");
    assert_eq!(
        c.scope(),
        "https://api.securitycenter.microsoft.com/.default"
    );
    let gcc = load(&[("MDE_ACTIOND_API__CLOUD", "gcc")]);
    assert_eq!(
        gcc.api_base_url(),
        "https://api-gcc.securitycenter.microsoft.us"
    );
    assert_eq!(gcc.authority(), "https://login.microsoftonline.com");
    assert_eq!(
        gcc.scope(),
        "https://api-gcc.securitycenter.microsoft.us/.default"
    );
    for cloud in ["gcc-high", "dod"] {
        let g = load(&[("MDE_ACTIOND_API__CLOUD", cloud)]);
        assert_eq!(
            g.api_base_url(),
            "https://api-gov.securitycenter.microsoft.us"
        );
        assert_eq!(g.authority(), "https://login.microsoftonline.us");
        assert_eq!(
            g.scope(),
            "https://api-gov.securitycenter.microsoft.us/.default"
        );
    }
    let eu = load(&[
        ("MDE_ACTIOND_API__CLOUD", "gcc-high"),
        (
            "MDE_ACTIOND_API__BASE_URL",
            "https://eu.api.security.microsoft.com",
        ),
    ]);
    assert_eq!(eu.api_base_url(), "https://eu.api.security.microsoft.com");
    assert_eq!(eu.authority(), "https://login.microsoftonline.us");
    let err = Settings::load_from(
        None,
        vec![("MDE_ACTIOND_API__CLOUD".to_string(), "mars".to_string())],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("mars") && err.contains("cloud"), "{err}");

    // Method inference and its errors.
    let both = load(&[
        ("MDE_ACTIOND_AUTH__CLIENT_SECRET", "x"),
        ("MDE_ACTIOND_AUTH__CERTIFICATE_FILE", "/x.pem"),
    ]);
    let e = both.auth_method().unwrap_err().to_string();
    assert!(
        e.contains("client_secret, certificate") && e.contains("auth.method"),
        "{e}"
    );
    let cert = load(&[
        ("MDE_ACTIOND_AUTH__CERTIFICATE_FILE", "/x.pem"),
        ("MDE_ACTIOND_AUTH__TENANT_ID", "contoso.onmicrosoft.com"),
    ]);
    let e = cert.validate_for_run().unwrap_err().to_string();
    assert!(e.contains("auth.client_id"), "{e}");
}
