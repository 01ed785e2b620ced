//! The Debian package and its units under a real systemd: a Debian 12 root filesystem booted
//! with systemd-nspawn (systemd as PID 1), the package installed as the README says, the
//! daemon tracking actions of the simulated tenant on the host's loopback.
//!
//! Needs root, systemd-nspawn, debootstrap (or a cached root filesystem) and the package
//! (`deploy/debian/build-deb.sh`); `.ci/run` provides all of them. Where one is missing the
//! test says which in one line and does nothing else.
// The tests talk to the daemon as its users do; the outbound policy of clippy.toml is the
// daemon's own.
#![allow(clippy::disallowed_methods)]

#[path = "../common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use mde_actiond::domain::{ActionId, ActionStatus};
use mde_actiond::sim::{
    Lifecycle, SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_SCOPE, SIM_TENANT, SimConfig,
};

const LIMIT: Duration = Duration::from_secs(90);
/// A debootstrapped Debian 12 with systemd, kept between runs (about 320 MB, a minute to
/// make).
const ROOTFS_CACHE: &str = "/var/cache/mde-actiond-ci/rootfs-bookworm";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The newest package `build-deb.sh` made, in the target directory this test was built in.
fn package() -> Option<PathBuf> {
    let target = Path::new(env!("CARGO_BIN_EXE_mde-actiond"))
        .parent()?
        .parent()?;
    let dir = target.join("debian");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    debs.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    debs.pop()
}

fn rootfs() -> Result<PathBuf, String> {
    let cache = PathBuf::from(ROOTFS_CACHE);
    if cache.join("usr/lib/systemd/systemd").exists() {
        return Ok(cache);
    }
    if !have("debootstrap") {
        return Err("debootstrap is not installed and no cached root filesystem exists".into());
    }
    let tmp = cache.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(cache.parent().unwrap()).map_err(|e| e.to_string())?;
    let out = run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus,ca-certificates",
            "bookworm",
        ])
        .arg(&tmp)
        .arg("http://deb.debian.org/debian"));
    if !out.status.success() {
        return Err(format!(
            "debootstrap failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    std::fs::rename(&tmp, &cache).map_err(|e| e.to_string())?;
    Ok(cache)
}

/// A booted container: systemd as PID 1 in its own namespaces, sharing the host's network.
struct Machine {
    root: PathBuf,
    nspawn: std::process::Child,
    leader: u32,
    _dir: tempfile::TempDir,
}

impl Machine {
    fn boot(base: &Path) -> Self {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let root = dir.path().join("root");
        ok(Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(base)
            .arg(&root));
        // The host has no systemd or D-Bus to register with.
        let log = std::fs::File::create(dir.path().join("console.log")).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            .args(["--register=no", "--keep-unit", "--boot", "--quiet", "-D"])
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let started = Instant::now();
        let leader = loop {
            let children = std::fs::read_to_string(format!(
                "/proc/{}/task/{}/children",
                nspawn.id(),
                nspawn.id()
            ))
            .unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
            {
                break pid;
            }
            assert!(started.elapsed() < LIMIT, "the container did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let m = Self {
            root,
            nspawn,
            leader,
            _dir: dir,
        };
        // Waits for the boot to finish (degraded is fine: a container lacks some units).
        let _ = m.exec(&["systemctl", "is-system-running", "--wait"]);
        m
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.leader.to_string(), "-m", "-u", "-i", "-p", "--"])
            .args(args);
        c
    }

    fn exec(&self, args: &[&str]) -> Output {
        run(&mut self.command(args))
    }

    fn sh(&self, script: &str) -> String {
        ok(&mut self.command(&["sh", "-c", script]))
    }

    fn show(&self, unit: &str, property: &str) -> String {
        self.sh(&format!("systemctl show -P {property} {unit}"))
            .trim()
            .to_string()
    }

    fn write(&self, path: &str, text: &str) {
        let host = self.root.join(path.trim_start_matches('/'));
        std::fs::write(host, text).unwrap();
    }

    /// Polls a shell condition inside the container; an event we cannot subscribe to from
    /// outside, checked every 200 ms.
    fn until(&self, what: &str, script: &str) {
        let started = Instant::now();
        while !self.exec(&["sh", "-c", script]).status.success() {
            assert!(started.elapsed() < LIMIT, "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.exec(&["systemctl", "poweroff"]);
        let started = Instant::now();
        while self.nspawn.try_wait().ok().flatten().is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                let _ = self.nspawn.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.wait();
    }
}

fn configuration(env: &TestEnv, extra: &str) -> String {
    let example = std::fs::read_to_string(repo("config/mde-actiond.toml")).unwrap();
    // What the README asks of a user (tenant and app), plus pointing it at the simulated
    // tenant on the host's loopback and polling at test speed.
    example
        .replace(
            "tenant_id = \"00000000-0000-0000-0000-000000000000\"",
            &format!("tenant_id = \"{SIM_TENANT}\""),
        )
        .replacen(
            "\nclient_id = \"00000000-0000-0000-0000-000000000000\"",
            &format!(
                "\nclient_id = \"{SIM_CLIENT_ID}\"\nauthority = \"{}\"\nscope = \"{SIM_SCOPE}\"",
                env.sim.authority()
            ),
            1,
        )
        .replace(
            "# base_url = \"https://api.securitycenter.microsoft.com\"",
            &format!("base_url = \"{}\"", env.sim.base_url()),
        )
        + "\n"
        + extra
}

fn fast_polling(text: &str) -> String {
    text.replace("initial_interval = \"10s\"", "initial_interval = \"300ms\"")
        .replace("max_interval = \"5m\"", "max_interval = \"1s\"")
}

fn action(env: &TestEnv, secs: u64) -> ActionId {
    env.sim.create_action(Lifecycle::simple(
        Duration::from_millis(300),
        Duration::from_secs(secs),
        ActionStatus::Succeeded,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_runs_under_systemd_as_the_readme_says() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: booting a container needs root");
        return;
    }
    if !have("systemd-nspawn") || !have("nsenter") {
        eprintln!(
            "skipped: systemd-nspawn (package systemd-container) or nsenter is not installed"
        );
        return;
    }
    let Some(deb) = package() else {
        eprintln!("skipped: no package in target/debian (run deploy/debian/build-deb.sh)");
        return;
    };
    let base = match tokio::task::spawn_blocking(rootfs).await.unwrap() {
        Ok(b) => b,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let env = TestEnv::new(SimConfig::default()).await;
    let timer = Instant::now();
    let m = tokio::task::spawn_blocking(move || Machine::boot(&base))
        .await
        .unwrap();
    eprintln!("booted in {:.1}s", timer.elapsed().as_secs_f64());

    // Install as the README says.
    // (/tmp is the container's own tmpfs.)
    std::fs::copy(&deb, m.root.join("opt/mde-actiond.deb")).unwrap();
    m.sh("dpkg -i /opt/mde-actiond.deb");
    assert_eq!(
        m.sh("stat -c '%a %U:%G' /etc/mde-actiond/mde-actiond.toml")
            .trim(),
        "640 root:mde-actiond"
    );
    assert_eq!(m.show("mde-actiond.service", "ActiveState"), "inactive");
    assert!(m.root.join("usr/share/man/man1/mde-actiond.1.gz").exists());
    assert!(
        m.root
            .join("usr/share/bash-completion/completions/mde-actiond")
            .exists()
    );
    let config = fast_polling(&configuration(&env, ""));
    m.write("/etc/mde-actiond/mde-actiond.toml", &config);
    m.sh(&format!(
        "printf %s '{SIM_CLIENT_SECRET}' | install -m 0600 /dev/stdin /etc/mde-actiond/client-secret"
    ));
    m.sh("systemctl enable --now mde-actiond || { journalctl -u mde-actiond --no-pager | tail -30; exit 1; }");
    assert_eq!(m.show("mde-actiond.service", "ActiveState"), "active");
    m.until(
        "a STATUS= line",
        "systemctl show -P StatusText mde-actiond | grep -q active",
    );

    // The README's enqueue, from a shell on the host, reaches the daemon's database.
    let id = action(&env, 2);
    m.sh(&format!("mde-actiond enqueue {id}"));
    m.until(
        "the action ends",
        &format!("mde-actiond status {id} --json | grep -q '\"tracking\": \"done\"'"),
    );
    assert!(
        !m.root.join("mde-actiond.db").exists() && !m.root.join("root/mde-actiond.db").exists(),
        "a stray database"
    );

    // kill -9 is restarted; a stop is clean.
    let pid = m.show("mde-actiond.service", "MainPID");
    // (kill(1), not `systemctl kill`: this host's cgroups refuse cgroup-wide signals.)
    m.sh(&format!("kill -9 {pid}"));
    m.until(
        "a restart after kill -9",
        &format!(
            "[ \"$(systemctl show -P NRestarts mde-actiond)\" = 1 ] && [ \"$(systemctl show -P MainPID mde-actiond)\" != {pid} ] && systemctl is-active -q mde-actiond"
        ),
    );
    let resumed = action(&env, 1);
    m.sh(&format!("mde-actiond enqueue {resumed}"));
    m.until(
        "an action after the restart ends",
        &format!("mde-actiond status {resumed} --json | grep -q '\"tracking\": \"done\"'"),
    );
    m.sh("systemctl stop mde-actiond");
    assert_eq!(m.show("mde-actiond.service", "Result"), "success");
    assert_eq!(m.show("mde-actiond.service", "ExecMainStatus"), "0");

    // A configuration error (exit 78) is not restarted.
    // per_minute above per_hour: refused with exit 78.
    let refused = config.replace("per_minute = 80\n", "per_minute = 100000\n");
    assert_ne!(
        refused, config,
        "the example configuration sets per_minute = 80"
    );
    m.write("/etc/mde-actiond/mde-actiond.toml", &refused);
    let _ = m.exec(&["systemctl", "start", "mde-actiond"]);
    m.until(
        "the refused start",
        "[ \"$(systemctl show -P ExecMainStatus mde-actiond)\" = 78 ]",
    );
    // RestartSec is 5 s: a restart would have come by now.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(m.show("mde-actiond.service", "ActiveState"), "failed");
    assert_eq!(m.show("mde-actiond.service", "NRestarts"), "0");
    m.write("/etc/mde-actiond/mde-actiond.toml", &config);
    m.sh("systemctl reset-failed mde-actiond");

    // Two tenants side by side, each reached with --tenant.
    let mut ids = Vec::new();
    for name in ["alpha", "beta"] {
        m.sh(&format!(
            "cp -p /etc/mde-actiond/mde-actiond.toml /etc/mde-actiond/{name}.toml && printf %s '{SIM_CLIENT_SECRET}' | install -m 0600 /dev/stdin /etc/mde-actiond/client-secret-{name}"
        ));
        m.sh(&format!("systemctl enable --now mde-actiond@{name}"));
        assert_eq!(
            m.show(&format!("mde-actiond@{name}.service"), "ActiveState"),
            "active"
        );
        let id = action(&env, 1);
        m.sh(&format!("mde-actiond --tenant {name} enqueue {id}"));
        ids.push((name, id));
    }
    for (name, id) in &ids {
        m.until(
            &format!("{name}'s action ends"),
            &format!(
                "mde-actiond --tenant {name} status {id} --json | grep -q '\"tracking\": \"done\"'"
            ),
        );
        assert!(
            m.root
                .join(format!("var/lib/mde-actiond/{name}/mde-actiond.db"))
                .exists()
        );
    }
    // Each instance tracks only its own.
    let other = m.exec(&[
        "mde-actiond",
        "--tenant",
        "beta",
        "status",
        ids[0].1.as_str(),
    ]);
    assert!(!other.status.success());
    eprintln!(
        "real-systemd test took {:.1}s",
        timer.elapsed().as_secs_f64()
    );
}

/// The distroless base cannot be pulled here: a stand-in of the same name made from the
/// Debian packages distroless `cc` is built from (glibc, libgcc, OpenSSL, tzdata, netbase,
/// CA certificates) and a nonroot user 65532.
const BASE_IMAGE: &str = "gcr.io/distroless/cc-debian12:nonroot";

fn podman(args: &[&str]) -> Command {
    let mut c = Command::new("podman");
    c.args(args);
    c
}

fn stand_in_base(conf: &Path) -> Result<(), String> {
    let exists = run(podman(&["image", "exists", BASE_IMAGE]).env("CONTAINERS_CONF", conf));
    if exists.status.success() {
        return Ok(());
    }
    let dir = tempfile::tempdir().unwrap();
    let debs = dir.path().join("debs");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&debs).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let got = run(Command::new("apt-get")
        .args([
            "download",
            "libc6",
            "libgcc-s1",
            "libssl3",
            "tzdata",
            "netbase",
            "ca-certificates",
        ])
        .current_dir(&debs));
    if !got.status.success() {
        return Err(format!(
            "cannot download the base image's Debian packages: {}",
            String::from_utf8_lossy(&got.stderr).trim()
        ));
    }
    for deb in std::fs::read_dir(&debs).unwrap() {
        ok(Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb.unwrap().path())
            .arg(&root));
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n").unwrap();
    // The trust store distroless carries (update-ca-certificates' bundle).
    let mut bundle = String::new();
    for cert in std::fs::read_dir(root.join("usr/share/ca-certificates/mozilla")).unwrap() {
        bundle.push_str(&std::fs::read_to_string(cert.unwrap().path()).unwrap());
    }
    std::fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
    std::fs::write(root.join("etc/ssl/certs/ca-certificates.crt"), bundle).unwrap();
    ok(Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C {} -c . | podman import - {BASE_IMAGE}",
            root.display()
        ))
        .env("CONTAINERS_CONF", conf));
    Ok(())
}

/// Removes the test's container and volume, whatever happens.
struct Cleanup {
    conf: PathBuf,
    name: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ =
            run(podman(&["rm", "-f", "-t", "0", &self.name]).env("CONTAINERS_CONF", &self.conf));
        let _ = run(podman(&["volume", "rm", "-f", &self.name]).env("CONTAINERS_CONF", &self.conf));
        let _ = run(podman(&["rmi", "-f", &self.name]).env("CONTAINERS_CONF", &self.conf));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_in_podman_as_the_readme_says() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the container test runs rootful podman (root)");
        return;
    }
    if !have("podman") || !have("runc") {
        eprintln!("skipped: podman or runc is not installed");
        return;
    }
    let target = Path::new(env!("CARGO_BIN_EXE_mde-actiond"))
        .parent()
        .and_then(Path::parent)
        .unwrap();
    let binary = target.join("release/mde-actiond");
    if !binary.exists() {
        eprintln!("skipped: no release binary (deploy/debian/build-deb.sh builds it)");
        return;
    }
    let timer = Instant::now();
    let work = tempfile::tempdir().unwrap();
    // This host: crun refuses its hybrid cgroups (runc works), there is no systemd for
    // podman's cgroup manager or event log, and podman's default ulimits exceed the hard
    // limits here.
    let conf = work.path().join("containers.conf");
    std::fs::write(
        &conf,
        "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
    )
    .unwrap();
    let p = |args: &[&str]| {
        let mut c = podman(args);
        c.env("CONTAINERS_CONF", &conf);
        c
    };
    if let Err(why) = tokio::task::spawn_blocking({
        let conf = conf.clone();
        move || stand_in_base(&conf)
    })
    .await
    .unwrap()
    {
        eprintln!("skipped: {why}");
        return;
    }

    // The Containerfile's runtime stage as it is, its build stage's output put in the
    // context instead (its base, the Rust image, cannot be pulled here either).
    let context = work.path().join("context");
    std::fs::create_dir_all(context.join("var/lib/mde-actiond")).unwrap();
    std::fs::copy(&binary, context.join("mde-actiond")).unwrap();
    let containerfile = std::fs::read_to_string(repo("deploy/container/Containerfile")).unwrap();
    let runtime_stage = &containerfile[containerfile
        .find("FROM gcr.io/distroless/")
        .expect("a distroless runtime stage")..];
    let runtime_stage = runtime_stage
        .replace("COPY --from=build /out/mde-actiond ", "COPY mde-actiond ")
        .replace(
            "COPY --from=build --chown=65532:65532 /out/var/lib/mde-actiond ",
            "COPY --chown=65532:65532 var/lib/mde-actiond ",
        );
    assert!(!runtime_stage.contains("--from=build"), "{runtime_stage}");
    std::fs::write(context.join("Containerfile"), runtime_stage).unwrap();
    let name = format!("mde-actiond-test-{}", std::process::id());
    let _cleanup = Cleanup {
        conf: conf.clone(),
        name: name.clone(),
    };
    // As the README builds it: --format docker keeps the HEALTHCHECK.
    ok(p(&["build", "--format", "docker", "-q", "-t", &name, "-f"])
        .arg(context.join("Containerfile"))
        .arg(&context));
    let inspect = ok(&mut p(&["image", "inspect", &name]));
    assert!(
        inspect.contains("Healthcheck"),
        "the image lost its HEALTHCHECK"
    );

    // As the README runs it; the simulated tenant is on the host's loopback.
    let env = TestEnv::new(SimConfig::default()).await;
    let secret = work.path().join("client-secret");
    private_file(&secret, SIM_CLIENT_SECRET);
    std::os::unix::fs::chown(&secret, Some(65532), Some(65532)).unwrap();
    let port = free_port();
    let e = |k: &str, v: &str| format!("{k}={v}");
    let args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--read-only".into(),
        "--name".into(),
        name.clone(),
        "--network".into(),
        "host".into(),
        "-v".into(),
        format!("{name}:/var/lib/mde-actiond"),
        "-v".into(),
        format!(
            "{}:/run/secrets/mde-actiond/client-secret:ro",
            secret.display()
        ),
        "-e".into(),
        e(
            "MDE_ACTIOND_AUTH__CLIENT_SECRET_FILE",
            "/run/secrets/mde-actiond/client-secret",
        ),
        "-e".into(),
        e("MDE_ACTIOND_AUTH__TENANT_ID", SIM_TENANT),
        "-e".into(),
        e("MDE_ACTIOND_AUTH__CLIENT_ID", SIM_CLIENT_ID),
        "-e".into(),
        e("MDE_ACTIOND_AUTH__AUTHORITY", &env.sim.authority()),
        "-e".into(),
        e("MDE_ACTIOND_AUTH__SCOPE", SIM_SCOPE),
        "-e".into(),
        e("MDE_ACTIOND_API__BASE_URL", &env.sim.base_url()),
        "-e".into(),
        e("MDE_ACTIOND_HTTP__LISTEN", &format!("127.0.0.1:{port}")),
        "-e".into(),
        e("MDE_ACTIOND_POLL__INITIAL_INTERVAL", "300ms"),
        "-e".into(),
        e("MDE_ACTIOND_POLL__MAX_INTERVAL", "1s"),
        name.clone(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&mut p(&args));
    let healthy = || {
        run(p(&["healthcheck", "run", &name]).stderr(Stdio::null()))
            .status
            .success()
    };
    let started = Instant::now();
    while !healthy() {
        assert!(
            started.elapsed() < LIMIT,
            "never healthy:\n{}",
            String::from_utf8_lossy(&run(&mut p(&["logs", &name])).stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Intake over HTTP, as a sidecar's neighbour does.
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let track = |id: ActionId| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = http
                .post(format!("{base}/v1/actions"))
                .header("content-type", "application/json")
                .body(serde_json::json!({ "ids": [id.as_str()] }).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
        }
    };
    let done = |id: ActionId| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            eventually(LIMIT, "the action ends", || async {
                let Ok(r) = http.get(format!("{base}/v1/actions/{id}")).send().await else {
                    return false;
                };
                let text = r.text().await.unwrap_or_default();
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                v["action"]["tracking"] == "done"
            })
            .await;
        }
    };
    let quick = action(&env, 1);
    track(quick.clone()).await;
    done(quick).await;

    // Stop within the grace with exit 0; a restart resumes from the volume.
    let long = action(&env, 12);
    track(long.clone()).await;
    let stopping = Instant::now();
    ok(&mut p(&["stop", "-t", "30", &name]));
    let stop_took = stopping.elapsed();
    assert_eq!(
        ok(&mut p(&["inspect", "-f", "{{.State.ExitCode}}", &name])).trim(),
        "0"
    );
    assert!(
        stop_took < Duration::from_secs(15),
        "stop took {stop_took:?}"
    );
    ok(&mut p(&["start", &name]));
    done(long).await;
    // Its files on the volume are not world-readable (containers have no umask).
    let mount = ok(&mut p(&[
        "volume",
        "inspect",
        "-f",
        "{{.Mountpoint}}",
        &name,
    ]));
    for entry in std::fs::read_dir(mount.trim()).unwrap() {
        let entry = entry.unwrap();
        use std::os::unix::fs::MetadataExt;
        let mode = entry.metadata().unwrap().mode();
        assert_eq!(mode & 0o007, 0, "{:?} is {mode:o}", entry.path());
    }
    eprintln!(
        "podman test took {:.1}s (stop {:.1}s)",
        timer.elapsed().as_secs_f64(),
        stop_took.as_secs_f64()
    );
}
