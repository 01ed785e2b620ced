//! Command line: argument parsing and the commands' output. Business logic lives elsewhere.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Settings};
use crate::daemon::{Daemon, DaemonError};
use crate::domain::{ActionId, Tracking, parse_duration};
use crate::logging::LogFormat;
use crate::report::{Format, Report};
use crate::store::{Enqueued, OpenMode, Store};

mod notify;

/// Exit status for configuration errors (sysexits EX_CONFIG); systemd units can refuse to
/// restart on it.
pub const EXIT_CONFIG: u8 = 78;
/// Exit status of `wait` when the timeout passed first (as timeout(1)).
pub const EXIT_TIMEOUT: u8 = 124;

const ABOUT: &str =
    "Tracks Microsoft Defender for Endpoint machine actions to their terminal status, durably.";

const EXAMPLES: &str = "\
Examples:
  mde-actiond demo                                  # try it against the built-in simulator
  mde-actiond --config /etc/mde-actiond/mde-actiond.toml run
  mde-actiond enqueue 2e9da30d-27f6-4208-81f2-9cd3d67893ba
  mde-actiond enqueue --file ids.txt
  mde-actiond wait --enqueue --timeout 2h 2e9da30d-27f6-4208-81f2-9cd3d67893ba && echo isolated
  mde-actiond list --tracking active
  sqlite3 -readonly mde-actiond.db 'SELECT action_id, status FROM actions'";

#[derive(Debug, Parser)]
#[command(name = "mde-actiond", version, about = ABOUT, after_help = EXAMPLES)]
pub struct Cli {
    /// Configuration file (TOML). Environment variables MDE_ACTIOND_<SECTION>__<KEY> override it.
    #[arg(long, global = true, env = "MDE_ACTIOND_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Database file; overrides [database] path.
    #[arg(long, global = true, env = "MDE_ACTIOND_DB", value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// One tenant's instance (mde-actiond@NAME.service): its configuration
    /// /etc/mde-actiond/NAME.toml and, unless that sets one, its database
    /// /var/lib/mde-actiond/NAME/mde-actiond.db.
    #[arg(
        long,
        global = true,
        env = "MDE_ACTIOND_TENANT",
        value_name = "NAME",
        conflicts_with = "config",
        value_parser = parse_tenant
    )]
    pub tenant: Option<String>,
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "MDE_ACTIOND_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: poll every active action until it ends. Stops on SIGTERM or SIGINT.
    #[command(
        after_help = "Example:\n  MDE_ACTIOND_AUTH__CLIENT_SECRET_FILE=/run/secrets/mde mde-actiond --config mde-actiond.toml run"
    )]
    Run,
    /// Add action ids to the queue (a running daemon picks them up within a second).
    #[command(
        after_help = "Examples:\n  mde-actiond enqueue 2e9da30d-27f6-4208-81f2-9cd3d67893ba\n  mde-actiond enqueue --file ids.txt      # one id per line; '#' starts a comment\n  cat ids.txt | mde-actiond enqueue --file -\n\nExit status: 0 when every id was taken (or already known), 1 when any was refused."
    )]
    Enqueue(EnqueueArgs),
    /// Show one action and its recorded transitions.
    #[command(
        after_help = "Example:\n  mde-actiond status 2e9da30d-27f6-4208-81f2-9cd3d67893ba --json"
    )]
    Status {
        id: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Same as --format json.
        #[arg(long, conflicts_with = "format")]
        json: bool,
    },
    /// List tracked actions, newest first.
    #[command(after_help = "Example:\n  mde-actiond list --tracking active --json")]
    List {
        /// Only actions in this tracking state: active, done, not_found, gave_up.
        #[arg(long, value_parser = parse_tracking)]
        tracking: Option<Tracking>,
        /// Only actions that first came this way: cli, http, discovered.
        #[arg(long, value_parser = parse_source)]
        source: Option<crate::domain::Source>,
        /// At most this many rows.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Output format (the table fits the terminal's width).
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Same as --format json.
        #[arg(long, conflicts_with = "format")]
        json: bool,
    },
    /// Summarize for a lead: counts by tracking, status and type, time to terminal, oldest
    /// active actions, API calls spent.
    #[command(
        after_help = "Examples:\n  mde-actiond report\n  mde-actiond report --since 7d --format json\n  mde-actiond report --since 2026-11-01T00:00:00Z --format csv > november.csv"
    )]
    Report {
        /// Only actions enqueued (and calls sent) since then: a time or a duration back (7d).
        #[arg(long, value_parser = crate::report::parse_since)]
        since: Option<SystemTime>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Delete finished actions (and their transitions) older than retention.keep_finished.
    #[command(
        after_help = "Examples:\n  mde-actiond prune --dry-run\n  mde-actiond prune --keep 30d\n\nA running daemon prunes hourly by itself when retention.keep_finished is set."
    )]
    Prune {
        /// Only say what would go.
        #[arg(long)]
        dry_run: bool,
        /// Keep actions finished within this long, at least 1m (default:
        /// retention.keep_finished).
        #[arg(long, value_parser = parse_keep)]
        keep: Option<Duration>,
        /// Delete more than 1,000 actions without asking (needed when stdin is a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Stream actions or transitions for SIEM ingestion, in constant memory.
    #[command(
        after_help = "Examples:\n  mde-actiond export --what transitions --since 1d > transitions.jsonl\n  mde-actiond export --format csv > actions.csv\n\nEach transition line carries its action's type, device and who asked for it, so it stands alone."
    )]
    Export {
        /// What to export.
        #[arg(long, value_enum, default_value = "actions")]
        what: ExportWhat,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Only rows since then (enqueued, or observed for transitions): a time or a duration back.
        #[arg(long, value_parser = crate::report::parse_since)]
        since: Option<SystemTime>,
        /// Print rows written and peak memory to stderr at the end.
        #[arg(long)]
        stats: bool,
    },
    /// Block until the given actions end (for scripts and playbooks).
    #[command(
        after_help = "Examples:\n  mde-actiond wait 2e9da30d-27f6-4208-81f2-9cd3d67893ba\n  mde-actiond wait --enqueue --timeout 30m ID1 ID2\n\nExit status: 0 when all ended Succeeded; 1 when any ended otherwise (Failed, TimeOut,\nCancelled, not found, given up); 124 when the timeout passed first; 2 for bad arguments\nor untracked ids. A running daemon does the polling; wait only reads the database."
    )]
    Wait(WaitArgs),
    /// Validate the configuration and print it as the daemon sees it (secrets redacted).
    CheckConfig,
    /// Check a deployment end to end: configuration, credential, token, roles, one API call.
    #[command(
        after_help = "Example:\n  mde-actiond --config /etc/mde-actiond/mde-actiond.toml doctor\n\nExit status 0 only when everything `run` needs works."
    )]
    Doctor,
    /// Probe the running daemon's /readyz (or /healthz with --live); exit 0 when ok, 1 if not.
    #[command(
        after_help = "For container images without curl:\n  HEALTHCHECK CMD [\"/mde-actiond\", \"healthcheck\"]\n  mde-actiond healthcheck --url http://127.0.0.1:9187"
    )]
    Healthcheck {
        /// Base URL of the listener; defaults to http.listen from the configuration.
        #[arg(long)]
        url: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        timeout: Duration,
        /// Probe liveness (/healthz: the process and its loop) instead of readiness (/readyz).
        #[arg(long)]
        live: bool,
    },
    /// Notifications: what is pending, failed or dead; send again; test a destination.
    #[command(subcommand)]
    Notify(notify::NotifyCommand),
    /// Run the daemon against the built-in simulated tenant and show it working.
    #[command(after_help = "Example:\n  cargo run --release -- demo --actions 40")]
    Demo(crate::demo::DemoArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  mde-actiond completions bash > /usr/share/bash-completion/completions/mde-actiond\n  mde-actiond completions zsh > /usr/share/zsh/vendor-completions/_mde-actiond\n  mde-actiond completions fish > /usr/share/fish/vendor_completions.d/mde-actiond.fish"
    )]
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff), for man(1).
    #[command(
        after_help = "Example:\n  mde-actiond man | gzip > /usr/share/man/man1/mde-actiond.1.gz"
    )]
    Man,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Action ids (GUIDs).
    pub ids: Vec<String>,
    /// Read ids from a file, one per line ('-' for standard input).
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Free text echoed in every notification event of these actions (e.g. a ticket or
    /// playbook run id).
    #[arg(long, value_name = "TEXT")]
    pub correlation: Option<String>,
    /// This URL receives these actions' events as a signed webhook (its host must be in
    /// callbacks.allow).
    #[arg(long, value_name = "URL")]
    pub callback_url: Option<String>,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Action ids (GUIDs).
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Give up waiting after this long (e.g. 90s, 30m, 2h).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Enqueue ids that are not tracked yet instead of refusing them.
    #[arg(long)]
    pub enqueue: bool,
    /// How often to look at the database.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportWhat {
    Actions,
    Transitions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

fn pick(format: Format, json: bool) -> Format {
    if json { Format::Json } else { format }
}

fn parse_tracking(s: &str) -> Result<Tracking, String> {
    s.parse()
}

fn parse_source(s: &str) -> Result<crate::domain::Source, String> {
    s.parse()
}

/// What went wrong, mapped to an exit status at the edge.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) => EXIT_CONFIG,
            CliError::Usage(_) => 2,
            CliError::Other(_) => 1,
        }
    }
}

impl From<DaemonError> for CliError {
    fn from(e: DaemonError) -> Self {
        match e {
            DaemonError::Config(c) => CliError::Config(c),
            other => CliError::Other(other.into()),
        }
    }
}

impl From<crate::store::StoreError> for CliError {
    fn from(e: crate::store::StoreError) -> Self {
        CliError::Other(e.into())
    }
}

/// Where the packaged service keeps its configuration.
pub const SYSTEM_CONFIG_DIR: &str = "/etc/mde-actiond";
/// Where the packaged service keeps its databases.
pub const SYSTEM_STATE_DIR: &str = "/var/lib/mde-actiond";

fn parse_tenant(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not an instance name (letters, digits, '-' and '_', as in mde-actiond@NAME)"
        ))
    }
}

/// The configuration file a command reads: `--config`, the tenant's, or, when nothing says
/// where the database is, the installed service's (so `mde-actiond enqueue ID` on a host
/// running the service reaches its database rather than a stray one here).
fn config_file(cli: &Cli) -> Option<PathBuf> {
    let db_in_env = std::env::var_os("MDE_ACTIOND_DATABASE__PATH").is_some();
    config_file_in(cli, Path::new(SYSTEM_CONFIG_DIR), db_in_env)
}

fn config_file_in(cli: &Cli, etc: &Path, db_in_env: bool) -> Option<PathBuf> {
    if let Some(c) = &cli.config {
        return Some(c.clone());
    }
    if let Some(t) = &cli.tenant {
        return Some(etc.join(format!("{t}.toml")));
    }
    let told = cli.db.is_some() || db_in_env;
    let system = etc.join("mde-actiond.toml");
    (!told && system.exists()).then_some(system)
}

/// Loads settings for any command: file, environment, then `--db`.
pub fn load_settings(cli: &Cli) -> Result<Settings, ConfigError> {
    let file = config_file(cli);
    let mut settings = Settings::load(file.as_deref())?;
    // An instance's configuration often starts as a copy of the single service's: its path
    // (or none) means "this instance's own".
    let single = Path::new(SYSTEM_STATE_DIR).join("mde-actiond.db");
    if let Some(t) = &cli.tenant
        && (settings.database.path == crate::config::DatabaseSettings::default().path
            || settings.database.path == single)
    {
        settings.database.path = Path::new(SYSTEM_STATE_DIR).join(t).join("mde-actiond.db");
    }
    if let Some(db) = &cli.db {
        settings.database.path = db.clone();
    }
    Ok(settings)
}

pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match &cli.command {
        Command::Demo(args) => {
            return crate::demo::run(cli.db.clone(), args)
                .await
                .map_err(|e| match e {
                    crate::demo::DemoError::Usage(m) => CliError::Usage(m),
                    crate::demo::DemoError::Other(e) => CliError::Other(e),
                });
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "mde-actiond", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(command)
                .render(&mut std::io::stdout())
                .context("cannot write the manual page")?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::CheckConfig => return check_config(&cli),
        Command::Doctor => {
            let settings = load_settings(&cli)?;
            return Ok(crate::doctor::run(&settings).await);
        }
        Command::Healthcheck { url, timeout, live } => {
            let path = if *live { "/healthz" } else { "/readyz" };
            return healthcheck(&cli, url.as_deref(), *timeout, path).await;
        }
        _ => {}
    }
    let settings = load_settings(&cli)?;
    settings.validate()?;
    let db = settings.database.path.clone();
    match cli.command {
        Command::Run => run_daemon(&settings).await,
        Command::Enqueue(args) => enqueue(&db, &args, &settings).await,
        Command::Notify(command) => notify::run(&db, &settings, command).await,
        Command::Status { id, format, json } => status(&db, &id, pick(format, json)).await,
        Command::List {
            tracking,
            source,
            limit,
            format,
            json,
        } => list(&db, tracking, source, limit, pick(format, json)).await,
        Command::Report { since, format } => report(&db, since, format).await,
        Command::Prune { dry_run, keep, yes } => {
            prune(&db, keep.or(settings.retention.keep_finished), dry_run, yes).await
        }
        Command::Export {
            what,
            format,
            since,
            stats,
        } => export(&db, what, format, since, stats).await,
        Command::Wait(args) => wait(&db, &args).await,
        Command::CheckConfig
        | Command::Demo(_)
        | Command::Healthcheck { .. }
        | Command::Doctor
        | Command::Completions { .. }
        | Command::Man => {
            unreachable!("handled above")
        }
    }
}

fn check_config(cli: &Cli) -> Result<ExitCode, CliError> {
    let settings = load_settings(cli)?;
    let problems = crate::daemon::run_problems(&settings);
    // Show what the daemon will use, cloud presets and inferred method filled in.
    let mut shown = settings.clone();
    shown.api.base_url = Some(crate::secret::redact_userinfo(&settings.api_base_url()));
    shown.auth.authority = Some(crate::secret::redact_userinfo(&settings.authority()));
    shown.auth.scope = Some(settings.scope());
    shown.auth.method = settings.auth_method().ok();
    print!("{}", shown.to_toml());
    if problems.is_empty() {
        eprintln!("configuration is valid");
        Ok(ExitCode::SUCCESS)
    } else {
        Err(ConfigError::Invalid(problems).into())
    }
}

async fn healthcheck(
    cli: &Cli,
    url: Option<&str>,
    timeout: Duration,
    path: &str,
) -> Result<ExitCode, CliError> {
    let addr = match url {
        Some(u) => {
            let parsed =
                reqwest::Url::parse(u).map_err(|e| CliError::Usage(format!("--url '{u}': {e}")))?;
            let host = parsed
                .host_str()
                .unwrap_or("127.0.0.1")
                .trim_matches(['[', ']']);
            let ip: std::net::IpAddr = host.parse().map_err(|_| {
                CliError::Usage(format!("--url '{u}': give an IP address, not a host name"))
            })?;
            std::net::SocketAddr::new(ip, parsed.port_or_known_default().unwrap_or(80))
        }
        None => {
            let settings = load_settings(cli)?;
            match settings.http.listen_addr() {
                Some(Ok(addr)) => addr,
                Some(Err(e)) => {
                    return Err(ConfigError::Invalid(vec![crate::config::Problem {
                        key: "http.listen",
                        message: e,
                    }])
                    .into());
                }
                None => {
                    return Err(CliError::Usage(
                        "no listener to probe: set [http] listen (MDE_ACTIOND_HTTP__LISTEN) or pass --url".into(),
                    ));
                }
            }
        }
    };
    match crate::http::probe(addr, path, timeout).await {
        Ok(()) => {
            println!("ok: {path}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("not ok: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

async fn run_daemon(settings: &Settings) -> Result<ExitCode, CliError> {
    // Handlers first: a SIGTERM that arrives while the database opens must still mean an
    // orderly stop, not the default instant death.
    let signals = StopSignals::install()
        .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
    let stop = CancellationToken::new();
    tokio::spawn(signals.stop_on_signals(stop.clone()));
    let daemon = Daemon::start(settings).await?;
    daemon.run_until_stopped(stop).await?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT, registered synchronously so none is missed.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    /// First signal: orderly stop. Second: exit at once (committed work is safe anyway).
    pub async fn stop_on_signals(mut self, stop: CancellationToken) {
        let name = self.next().await;
        tracing::info!(signal = name, "stop requested");
        stop.cancel();
        let name = self.next().await;
        tracing::warn!(signal = name, "second stop signal: exiting now");
        std::process::exit(130);
    }
}

/// The longest line `enqueue --file` reads: an id with a CSV row's other columns fits
/// many times over.
const MAX_ID_LINE: usize = 4096;

/// Reads ids from arguments and/or a file; refusals carry the value and line.
fn collect_ids(args: &EnqueueArgs) -> anyhow::Result<(Vec<ActionId>, Vec<String>)> {
    let mut ids = Vec::new();
    let mut refused = Vec::new();
    for raw in &args.ids {
        match ActionId::parse(raw) {
            Ok(id) => ids.push(id),
            Err(e) => refused.push(format!("refused: {e}")),
        }
    }
    if let Some(path) = &args.file {
        let (reader, name): (Box<dyn BufRead>, String) = if path.as_os_str() == "-" {
            (Box::new(std::io::stdin().lock()), "stdin".into())
        } else {
            let f = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            (
                Box::new(std::io::BufReader::new(f)),
                path.display().to_string(),
            )
        };
        let mut reader = reader;
        let mut buf = Vec::new();
        for n in 1.. {
            buf.clear();
            // Bounded: `--file /dev/zero` (or a binary file) has no line end to wait for.
            let read = (&mut reader)
                .take(MAX_ID_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .with_context(|| format!("cannot read {name}"))?;
            if read == 0 {
                break;
            }
            if buf.len() > MAX_ID_LINE && buf.last() != Some(&b'\n') {
                anyhow::bail!(
                    "{name}:{n}: a line longer than {MAX_ID_LINE} bytes; expected one action id per line (nothing was enqueued)"
                );
            }
            let Ok(line) = std::str::from_utf8(&buf) else {
                refused.push(format!("{name}:{n}: refused: not UTF-8 text"));
                continue;
            };
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            // Accept "id,anything" so a CSV export's first column works too.
            let first = content.split([',', '\t', ' ']).next().unwrap_or(content);
            match ActionId::parse(first) {
                Ok(id) => ids.push(id),
                Err(e) => refused.push(format!("{name}:{n}: refused: {e}")),
            }
        }
    }
    Ok((ids, refused))
}

async fn enqueue(db: &Path, args: &EnqueueArgs, settings: &Settings) -> Result<ExitCode, CliError> {
    if args.ids.is_empty() && args.file.is_none() {
        return Err(CliError::Usage(
            "give action ids as arguments or with --file PATH (or --file - for stdin)".into(),
        ));
    }
    let request = crate::store::NotifyRequest {
        correlation: args.correlation.clone(),
        callback_url: args.callback_url.clone(),
    };
    crate::intake::check_request(&request, &settings.callbacks.patterns())
        .map_err(|e| CliError::Usage(format!("nothing was enqueued: {e}")))?;
    // The database first: pointed at the wrong place, say so before reading a long file.
    let store = Store::open(db, OpenMode::WriteExisting).await?;
    let (ids, refused) = collect_ids(args)?;
    for r in &refused {
        eprintln!("{r}");
    }
    let mut added = 0usize;
    let mut known = 0usize;
    if ids.is_empty() {
        store.close().await;
    } else {
        let taken = crate::intake::enqueue_with(
            &store,
            &ids,
            SystemTime::now(),
            crate::domain::Source::Cli,
            &request,
        )
        .await?;
        store.close().await;
        let mut out = std::io::stdout().lock();
        // The same id twice in one command is one enqueue, told once.
        let firsts: Vec<_> = taken.iter().filter(|t| !t.repeat).collect();
        let verbose = firsts.len() <= 1000;
        for t in firsts {
            match &t.outcome {
                Enqueued::Added => {
                    added += 1;
                    if verbose {
                        let _ = writeln!(out, "added {}", t.id);
                    }
                }
                Enqueued::Known(state) => {
                    known += 1;
                    if verbose {
                        let _ = writeln!(out, "known {} (tracking {state})", t.id);
                    }
                }
            }
        }
    }
    eprintln!(
        "{added} added, {known} already known, {} refused",
        refused.len()
    );
    Ok(if refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn parse_id_arg(raw: &str) -> Result<ActionId, CliError> {
    ActionId::parse(raw).map_err(|e| CliError::Usage(e.to_string()))
}

async fn status(db: &Path, raw: &str, format: Format) -> Result<ExitCode, CliError> {
    let id = parse_id_arg(raw)?;
    let store = Store::open(db, OpenMode::ReadOnly).await?;
    let Some(row) = store.action(&id).await? else {
        return Err(CliError::Usage(format!(
            "{id} is not tracked in {} (enqueue it first)",
            db.display()
        )));
    };
    let transitions = store.transitions(&id).await?;
    let mut out = std::io::stdout().lock();
    if format == Format::Csv {
        let _ =
            out.write_all(crate::report::csv_header(&crate::report::action_columns()).as_bytes());
        let _ =
            out.write_all(crate::report::csv_line(&crate::report::action_values(&row)).as_bytes());
        return Ok(ExitCode::SUCCESS);
    }
    if format == Format::Json {
        let doc = serde_json::json!({
            "action": crate::report::action_json(&row),
            "transitions": transitions,
        });
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let _ = out.write_all(crate::report::status_text(&row, &transitions).as_bytes());
    Ok(ExitCode::SUCCESS)
}

/// An action row as JSON, with the last MDE answer embedded as JSON rather than a string.
async fn list(
    db: &Path,
    tracking: Option<Tracking>,
    source: Option<crate::domain::Source>,
    limit: u32,
    format: Format,
) -> Result<ExitCode, CliError> {
    let store = Store::open(db, OpenMode::ReadOnly).await?;
    let rows = store.list(tracking, source, limit).await?;
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            let docs: Vec<serde_json::Value> =
                rows.iter().map(crate::report::action_list_json).collect();
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&docs).unwrap_or_default()
            );
        }
        Format::Csv => {
            // last_response is the last column: too large for a listing.
            let mut columns = crate::report::action_columns();
            columns.pop();
            let _ = out.write_all(crate::report::csv_header(&columns).as_bytes());
            for r in &rows {
                let mut values = crate::report::action_values(r);
                values.pop();
                let _ = out.write_all(crate::report::csv_line(&values).as_bytes());
            }
        }
        Format::Table => {
            let table = crate::report::action_table(&rows);
            let _ = out.write_all(table.render(crate::report::terminal_width()).as_bytes());
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn report(
    db: &Path,
    since: Option<SystemTime>,
    format: Format,
) -> Result<ExitCode, CliError> {
    let store = Store::open(db, OpenMode::ReadOnly).await?;
    let report = Report::build(&store, since).await?;
    let mut out = std::io::stdout().lock();
    report
        .write(format, &mut out)
        .context("cannot write the report")?;
    Ok(ExitCode::SUCCESS)
}

/// More than this many actions to delete, asked from a terminal, needs `--yes`.
const PRUNE_ASK_ABOVE: i64 = 1_000;

fn parse_keep(s: &str) -> Result<Duration, String> {
    let keep = parse_duration(s)?;
    crate::config::check_keep_finished(keep)?;
    Ok(keep)
}

async fn prune(
    db: &Path,
    keep: Option<Duration>,
    dry_run: bool,
    yes: bool,
) -> Result<ExitCode, CliError> {
    use std::io::IsTerminal;
    let Some(keep) = keep else {
        return Err(CliError::Usage(
            "nothing to prune by: set retention.keep_finished or pass --keep (e.g. --keep 90d)"
                .into(),
        ));
    };
    crate::config::check_keep_finished(keep).map_err(|e| CliError::Usage(format!("--keep {e}")))?;
    let cutoff = SystemTime::now() - keep;
    let cutoff_text = crate::domain::format_time(cutoff);
    if dry_run {
        let store = Store::open(db, OpenMode::ReadOnly).await?;
        let (actions, transitions) = store.prunable(cutoff).await?;
        println!(
            "would delete {actions} actions finished before {cutoff_text} and their {transitions} transitions"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let store = Store::open(db, OpenMode::WriteExisting).await?;
    let (actions, transitions) = store.prunable(cutoff).await?;
    // A slip of the finger at a prompt should not cost a year of records; scripts (no
    // terminal) and the daemon's own retention are not asked.
    if actions > PRUNE_ASK_ABOVE && !yes && std::io::stdin().is_terminal() {
        store.close().await;
        return Err(CliError::Usage(format!(
            "this would delete {actions} actions finished before {cutoff_text} and their {transitions} transitions; pass --yes to go ahead (or --dry-run to look first)"
        )));
    }
    let deleted =
        crate::housekeeping::prune_finished(&store, cutoff, &CancellationToken::new()).await?;
    store.close().await;
    println!(
        "deleted {deleted} actions finished before {cutoff_text} and their {transitions} transitions"
    );
    Ok(ExitCode::SUCCESS)
}

async fn export(
    db: &Path,
    what: ExportWhat,
    format: ExportFormat,
    since: Option<SystemTime>,
    stats: bool,
) -> Result<ExitCode, CliError> {
    let store = Store::open(db, OpenMode::ReadOnly).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let rows = match what {
        ExportWhat::Actions => {
            write_export(
                &mut out,
                format,
                &crate::report::action_columns(),
                store.export_actions(since),
                |out, row| serde_json::to_writer(out, &crate::report::action_json(row)),
                crate::report::action_values,
            )
            .await?
        }
        ExportWhat::Transitions => {
            write_export(
                &mut out,
                format,
                &crate::report::transition_columns(),
                store.export_transitions(since),
                |out, t| serde_json::to_writer(out, t),
                crate::report::transition_values,
            )
            .await?
        }
    };
    out.flush().map_err(export_write_error)?;
    if stats {
        eprintln!(
            "exported {rows} rows; peak RSS {} KiB",
            crate::report::peak_rss_kib().map_or("unknown".into(), |k| k.to_string())
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn export_write_error(e: std::io::Error) -> CliError {
    CliError::Other(anyhow::anyhow!("cannot write: {e}"))
}

/// One export: a CSV header or nothing, then one line per row as the stream yields it, so the
/// memory used does not grow with the table. Returns the rows written.
async fn write_export<T>(
    out: &mut impl Write,
    format: ExportFormat,
    columns: &[&str],
    mut stream: futures_util::stream::BoxStream<'_, Result<T, sqlx::Error>>,
    json: impl Fn(&mut dyn Write, &T) -> serde_json::Result<()>,
    csv: impl Fn(&T) -> Vec<String>,
) -> Result<u64, CliError> {
    use futures_util::TryStreamExt;
    if format == ExportFormat::Csv {
        out.write_all(crate::report::csv_header(columns).as_bytes())
            .map_err(export_write_error)?;
    }
    let mut rows = 0u64;
    while let Some(row) = stream
        .try_next()
        .await
        .map_err(crate::store::StoreError::from)?
    {
        match format {
            ExportFormat::Jsonl => {
                json(out, &row).map_err(|e| export_write_error(e.into()))?;
                out.write_all(b"\n").map_err(export_write_error)?;
            }
            ExportFormat::Csv => out
                .write_all(crate::report::csv_line(&csv(&row)).as_bytes())
                .map_err(export_write_error)?,
        }
        rows += 1;
    }
    Ok(rows)
}

async fn wait(db: &Path, args: &WaitArgs) -> Result<ExitCode, CliError> {
    let mut ids = Vec::new();
    for raw in &args.ids {
        ids.push(parse_id_arg(raw)?);
    }
    if args.enqueue {
        let store = Store::open(db, OpenMode::WriteExisting).await?;
        store.enqueue(&ids, SystemTime::now()).await?;
        store.close().await;
    }
    let store = Store::open(db, OpenMode::ReadOnly).await?;
    for id in &ids {
        if store.action(id).await?.is_none() {
            return Err(CliError::Usage(format!(
                "{id} is not tracked in {}; enqueue it first or pass --enqueue",
                db.display()
            )));
        }
    }
    let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut pending: Vec<ActionId> = ids.clone();
    let mut all_succeeded = true;
    let mut out = std::io::stdout();
    loop {
        let mut still = Vec::new();
        for id in pending {
            let row = store.action(&id).await?;
            match row {
                Some(r) if r.tracking != Tracking::Active => {
                    let status = r.status.as_deref().unwrap_or("-");
                    let ok = r.tracking == Tracking::Done && status == "Succeeded";
                    all_succeeded &= ok;
                    let _ = writeln!(out, "{id} {} {status}", r.tracking);
                    let _ = out.flush();
                }
                _ => still.push(id),
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            for id in &pending {
                let _ = writeln!(out, "{id} active (still waiting when the timeout passed)");
            }
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        tokio::time::sleep(args.interval).await;
    }
    Ok(if all_succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("mde-actiond").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn commands_find_the_installed_service_unless_told_otherwise() {
        let etc = tempfile::tempdir().unwrap();
        let installed = etc.path().join("mde-actiond.toml");
        // Nothing installed: no file.
        assert_eq!(config_file_in(&cli(&["list"]), etc.path(), false), None);
        std::fs::write(&installed, "").unwrap();
        assert_eq!(
            config_file_in(&cli(&["list"]), etc.path(), false),
            Some(installed.clone())
        );
        // --db, MDE_ACTIOND_DATABASE__PATH or --config say where to look instead.
        assert_eq!(
            config_file_in(&cli(&["--db", "x.db", "list"]), etc.path(), false),
            None
        );
        assert_eq!(config_file_in(&cli(&["list"]), etc.path(), true), None);
        assert_eq!(
            config_file_in(
                &cli(&["--config", "/tmp/c.toml", "list"]),
                etc.path(),
                false
            ),
            Some(PathBuf::from("/tmp/c.toml"))
        );
        assert_eq!(
            config_file_in(&cli(&["--tenant", "contoso", "list"]), etc.path(), false),
            Some(etc.path().join("contoso.toml"))
        );
        assert!(Cli::try_parse_from(["mde-actiond", "--tenant", "../x", "list"]).is_err());
        assert!(
            Cli::try_parse_from(["mde-actiond", "--tenant", "a", "--config", "b", "list"]).is_err()
        );
    }
}
