//! Settings: defaults < TOML file < `MDE_ACTIOND_<SECTION>__<KEY>` environment variables.
//!
//! Loading never touches the network or the database; `validate` reports every problem at once,
//! each naming its key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::schedule::PollPolicy;
use crate::secret::Secret;

pub const ENV_PREFIX: &str = "MDE_ACTIOND";
/// Each id costs about 45 bytes of URL in an `id in (...)` filter; this keeps a list URL near
/// 7 KB, under the 8 KB that front ends commonly refuse.
pub const MAX_BATCH_SIZE: u32 = 150;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Load(String),
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// One thing wrong with the configuration, naming the key (`section.key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: &'static str,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub api: ApiSettings,
    pub auth: AuthSettings,
    pub poll: PollSettings,
    pub rate_limit: RateLimitSettings,
    pub http: HttpSettings,
    pub retention: RetentionSettings,
    pub report: ReportSettings,
    /// `[[notify]]`: where events go (docs in README "Notifications").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<NotifySettings>,
    /// Per-request callback URLs (`callback_url` at enqueue).
    pub callbacks: CallbackSettings,
}

/// What a destination is: the body it gets and how it authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyKind {
    Webhook,
    Teams,
    Slack,
    SplunkHec,
}

/// Whether a kind of destination takes a file of its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Takes {
    Required,
    Optional,
    Refused,
}

impl NotifyKind {
    /// What the kind takes: (`secret_file`, `token_file`). A new kind must say it here.
    fn takes(self) -> (Takes, Takes) {
        match self {
            NotifyKind::Webhook => (Takes::Required, Takes::Optional),
            NotifyKind::SplunkHec => (Takes::Refused, Takes::Required),
            NotifyKind::Teams | NotifyKind::Slack => (Takes::Refused, Takes::Refused),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NotifyKind::Webhook => "webhook",
            NotifyKind::Teams => "teams",
            NotifyKind::Slack => "slack",
            NotifyKind::SplunkHec => "splunk_hec",
        }
    }

    /// Chat messages lose their point after a while: they expire after the 2 h attempt.
    pub fn is_chat(self) -> bool {
        match self {
            NotifyKind::Teams | NotifyKind::Slack => true,
            NotifyKind::Webhook | NotifyKind::SplunkHec => false,
        }
    }
}

/// Which events a destination hears of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyEvent {
    /// Every status change.
    Transition,
    /// Status changes into Succeeded, Failed, TimeOut or Cancelled.
    Terminal,
    /// An action still active after each `report.stuck_after`.
    Stuck,
}

impl NotifyEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::Transition => "transition",
            NotifyEvent::Terminal => "terminal",
            NotifyEvent::Stuck => "stuck",
        }
    }
}

/// One `[[notify]]` destination.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySettings {
    /// Unique; names the destination in logs, metrics and the CLI.
    pub name: String,
    pub kind: NotifyKind,
    /// Where to POST. Teams Workflow and Slack URLs are credentials, so `url_file` is the
    /// better place for them; either way the URL is never logged or shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// webhook: the Standard Webhooks signing key (`whsec_...`); more lines during a
    /// rotation, each signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// splunk_hec: the HEC token; webhook: an optional static bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(default = "default_notify_events")]
    pub events: Vec<NotifyEvent>,
    /// Only these action types (MDE's values, e.g. "Isolate"); empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    /// Only events whose (new) status is one of these; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<String>,
    /// One attempt's whole-request limit.
    #[serde(with = "duration_text", default = "default_notify_timeout")]
    pub timeout: Duration,
    /// Waits after each failed attempt (±20% jitter); the event is dead after the last.
    /// Default: Svix's 5s, 5m, 30m, 2h, 5h, 10h, 10h (teams and slack stop after 2h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_schedule: Option<Vec<String>>,
    /// A destination failing without a single success for this long is disabled.
    #[serde(with = "duration_text", default = "default_disable_after")]
    pub disable_after: Duration,
}

fn default_notify_events() -> Vec<NotifyEvent> {
    vec![NotifyEvent::Terminal]
}

fn default_notify_timeout() -> Duration {
    Duration::from_secs(15)
}

fn default_disable_after() -> Duration {
    Duration::from_secs(5 * 86_400)
}

/// Svix's retry schedule: the wait after each failed attempt.
pub const DEFAULT_RETRY_SCHEDULE: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(300),
    Duration::from_secs(1800),
    Duration::from_secs(7200),
    Duration::from_secs(18_000),
    Duration::from_secs(36_000),
    Duration::from_secs(36_000),
];

/// Where chat destinations stop: after the attempt that follows the 2 h wait.
pub const CHAT_RETRIES: usize = 4;

impl NotifySettings {
    /// The first thing wrong with the files the destination's kind takes.
    fn credential_problem(&self) -> Option<(&'static str, String)> {
        let (secret, token) = self.kind.takes();
        let kind = self.kind.as_str();
        if secret == Takes::Required && self.secret_file.is_none() {
            return Some((
                "notify.secret_file",
                "a webhook needs its Standard Webhooks key (whsec_...)".into(),
            ));
        }
        if token == Takes::Required && self.token_file.is_none() {
            return Some(("notify.token_file", format!("{kind} needs the HEC token")));
        }
        if secret == Takes::Refused && self.secret_file.is_some() {
            return Some((
                "notify.secret_file",
                format!("only webhooks are signed; {kind} takes no secret_file"),
            ));
        }
        if token == Takes::Refused && self.token_file.is_some() {
            return Some((
                "notify.token_file",
                format!("{kind} takes no token_file (the URL is the credential)"),
            ));
        }
        None
    }

    /// The waits after each failed attempt, as configured or by default.
    pub fn retry_waits(&self) -> Result<Vec<Duration>, String> {
        parse_schedule(self.retry_schedule.as_deref(), self.kind.is_chat())
    }
}

pub(crate) fn parse_schedule(
    given: Option<&[String]>,
    chat: bool,
) -> Result<Vec<Duration>, String> {
    match given {
        Some(list) => list
            .iter()
            .map(|s| crate::domain::parse_duration(s))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|v| {
                if v.len() > 20 {
                    Err("at most 20 waits".to_string())
                } else {
                    Ok(v)
                }
            }),
        None if chat => Ok(DEFAULT_RETRY_SCHEDULE[..CHAT_RETRIES].to_vec()),
        None => Ok(DEFAULT_RETRY_SCHEDULE.to_vec()),
    }
}

/// `[callbacks]`: the per-request `callback_url`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackSettings {
    /// Host patterns a callback URL must match: `soar.example`, `*.logic.azure.com`
    /// (any subdomain), optionally with `:port`. Empty: callbacks are refused. Loopback and
    /// link-local hosts only when listed as such (never through `*`).
    pub allow: Vec<String>,
    /// Standard Webhooks signing key for callbacks; unsigned without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_schedule: Option<Vec<String>>,
}

impl Default for CallbackSettings {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            secret_file: None,
            timeout: default_notify_timeout(),
            retry_schedule: None,
        }
    }
}

impl CallbackSettings {
    pub fn retry_waits(&self) -> Result<Vec<Duration>, String> {
        parse_schedule(self.retry_schedule.as_deref(), false)
    }

    pub fn patterns(&self) -> Vec<crate::domain::HostPattern> {
        self.allow
            .iter()
            .filter_map(|p| crate::domain::HostPattern::parse(p).ok())
            .collect()
    }
}

/// Pruning of finished actions (off unless `keep_finished` is set) and of the outbox.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Delete actions (and their transitions) this long after they finished.
    #[serde(
        with = "optional_duration_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub keep_finished: Option<Duration>,
    /// Delete delivered and dead notification deliveries (and their events) this long
    /// after they ended. Pending ones are never deleted.
    #[serde(with = "duration_text")]
    pub keep_notifications: Duration,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            keep_finished: None,
            keep_notifications: Duration::from_secs(7 * 86_400),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportSettings {
    /// Active actions older than this appear in the `stuck_actions` view.
    #[serde(with = "duration_text")]
    pub stuck_after: Duration,
}

impl Default for ReportSettings {
    fn default() -> Self {
        Self {
            stuck_after: Duration::from_secs(86_400),
        }
    }
}

/// The optional HTTP listener: health, readiness, metrics and intake for sidecars.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address to listen on, e.g. `127.0.0.1:9187`; no listener when unset.
    pub listen: Option<String>,
    /// File holding a bearer token that `/v1/*` requests must present.
    pub api_token_file: Option<PathBuf>,
}

impl HttpSettings {
    pub fn listen_addr(&self) -> Option<Result<std::net::SocketAddr, String>> {
        self.listen.as_deref().map(|l| {
            l.trim()
                .parse()
                .map_err(|_| format!("'{l}' is not an address:port such as 127.0.0.1:9187"))
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    pub path: PathBuf,
    /// How often the WAL is checkpointed (and truncated when no reader holds it).
    #[serde(with = "duration_text")]
    pub checkpoint_interval: Duration,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("mde-actiond.db"),
            checkpoint_interval: Duration::from_secs(60),
        }
    }
}

/// The Microsoft cloud the tenant lives in; sets the API host, the authority and the scope
/// together. An explicit `api.base_url`, `auth.authority` or `auth.scope` overrides it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cloud {
    #[default]
    Commercial,
    Gcc,
    GccHigh,
    Dod,
}

impl Cloud {
    pub fn api_base_url(self) -> &'static str {
        match self {
            Cloud::Commercial => "https://api.securitycenter.microsoft.com",
            Cloud::Gcc => "https://api-gcc.securitycenter.microsoft.us",
            Cloud::GccHigh | Cloud::Dod => "https://api-gov.securitycenter.microsoft.us",
        }
    }

    /// The Microsoft Defender portal of this cloud (links in chat notifications).
    pub fn portal_url(self) -> &'static str {
        match self {
            Cloud::Commercial | Cloud::Gcc => "https://security.microsoft.com",
            Cloud::GccHigh => "https://security.microsoft.us",
            Cloud::Dod => "https://security.apps.mil",
        }
    }

    pub fn authority(self) -> &'static str {
        match self {
            Cloud::Commercial | Cloud::Gcc => "https://login.microsoftonline.com",
            Cloud::GccHigh | Cloud::Dod => "https://login.microsoftonline.us",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    pub cloud: Cloud,
    /// Overrides the cloud's API host (e.g. a regional host such as
    /// https://eu.api.security.microsoft.com).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Whole-request timeout for one API call.
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    #[serde(with = "duration_text")]
    pub connect_timeout: Duration,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            cloud: Cloud::Commercial,
            base_url: None,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// How the daemon proves who it is to the identity platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    ClientSecret,
    Certificate,
    WorkloadIdentity,
    ManagedIdentity,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecret => "client_secret",
            AuthMethod::Certificate => "certificate",
            AuthMethod::WorkloadIdentity => "workload_identity",
            AuthMethod::ManagedIdentity => "managed_identity",
        }
    }
}

/// JWS algorithm of a certificate's client assertion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum SigningAlgorithm {
    #[default]
    PS256,
    RS256,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Inferred from the keys that are set when unambiguous.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<AuthMethod>,
    /// Overrides the cloud's identity platform (or AZURE_AUTHORITY_HOST).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_secret_file: Option<PathBuf>,
    /// Name of a systemd credential (`LoadCredential=NAME:...`) holding the secret, read from
    /// `$CREDENTIALS_DIRECTORY/NAME`.
    pub client_secret_credential: Option<String>,
    /// PEM certificate of the app registration (may also hold the private key).
    pub certificate_file: Option<PathBuf>,
    /// PEM private key (PKCS#8 or PKCS#1 RSA); defaults to `certificate_file`.
    pub private_key_file: Option<PathBuf>,
    pub signing_algorithm: SigningAlgorithm,
    /// Kubernetes workload identity: the projected service account token (defaults to
    /// AZURE_FEDERATED_TOKEN_FILE); read at every token request, as it rotates.
    pub federated_token_file: Option<PathBuf>,
    /// Managed identity endpoint: IMDS by default, IDENTITY_ENDPOINT on App Service and
    /// Container Apps.
    pub managed_identity_endpoint: Option<String>,
    /// A user-assigned managed identity's client id (system-assigned when unset).
    pub managed_identity_client_id: Option<String>,
    /// The X-IDENTITY-HEADER value for the App Service form (defaults to IDENTITY_HEADER).
    pub managed_identity_header: Option<Secret>,
    /// Overrides `https://<api host>/.default`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// `/readyz` turns not ready once no usable token could be had for this long
    /// (`DEFAULT_TOKEN_GRACE` when unset); a refusal by the identity platform does at once.
    #[serde(
        with = "optional_duration_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub token_grace: Option<Duration>,
}

/// `auth.token_grace` by default: longer than a few token requests backed off (1, 2, 4, 8,
/// 16, 32 s), shorter than the 5 minutes before a token's expiry that refreshes start.
pub const DEFAULT_TOKEN_GRACE: Duration = Duration::from_secs(120);

impl AuthSettings {
    pub fn token_grace(&self) -> Duration {
        self.token_grace.unwrap_or(DEFAULT_TOKEN_GRACE)
    }
}

pub const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

impl AuthSettings {
    /// The client secret comes from one place. Precedence (file < environment) applies to
    /// that choice as a whole: a source named in the environment (the shipped unit names
    /// its credential) replaces the file's, instead of making two and a refusal to start.
    fn secret_source_from_environment(&mut self, env: &HashMap<String, String>) {
        let var = |key: &str| env.contains_key(&format!("{ENV_PREFIX}_AUTH__{key}"));
        let (inline, file, credential) = (
            var("CLIENT_SECRET"),
            var("CLIENT_SECRET_FILE"),
            var("CLIENT_SECRET_CREDENTIAL"),
        );
        if !(inline || file || credential) {
            return;
        }
        if !inline {
            self.client_secret = None;
        }
        if !file {
            self.client_secret_file = None;
        }
        if !credential {
            self.client_secret_credential = None;
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollSettings {
    #[serde(with = "duration_text")]
    pub initial_interval: Duration,
    pub multiplier: f64,
    #[serde(with = "duration_text")]
    pub max_interval: Duration,
    /// Fraction of each delay spread at random (0 to 1).
    pub jitter: f64,
    #[serde(with = "duration_text")]
    pub give_up_after: Duration,
    /// A 404 ends tracking (`not_found`) only once the id has been unknown this long since
    /// it was enqueued: MDE makes a new action visible only after a few seconds.
    #[serde(with = "duration_text")]
    pub not_found_after: Duration,
    pub batch_size: u32,
    pub concurrency: u32,
    /// Actions due within this window ride along in a list call that goes out anyway.
    #[serde(with = "duration_text")]
    pub ride_along: Duration,
    /// How long a stopping daemon waits for calls in flight.
    #[serde(with = "duration_text")]
    pub shutdown_grace: Duration,
    /// Whether to check every tracked action at once with a paged listing of the tenant when
    /// that is cheaper than asking by id (`auto`), or never (`off`).
    pub sweep: SweepMode,
    /// The longest time between two sweeps while actions are tracked (or discovery is on).
    /// Sweeps come sooner while changes are likely (see `lag_per_call`), never faster
    /// than 80% of the budget pays for.
    #[serde(with = "duration_text")]
    pub sweep_interval: Duration,
    /// How much detection lag one list call is worth: sweeps come every
    /// `sqrt(2 x lag_per_call / rate of change)`, the interval that minimises lag plus calls
    /// (`lag_per_call` lag-seconds each), so calls go where changes are: often while
    /// actions are young or changing, rarely for week-old ones.
    #[serde(with = "duration_text")]
    pub lag_per_call: Duration,
    /// Actions enqueued within this long are expected to change soon: before any change
    /// is seen, each counts as one change per (age + young_for/10).
    #[serde(with = "duration_text")]
    pub young_for: Duration,
    /// How the expected changes that time sweeps are worked out: from the tenant's
    /// recorded transitions, per action type and status and time in it (`learned`), or
    /// from the changes the last sweeps saw and the young actions (`observed`, the rule
    /// before 1.6; also what `learned` does while the history is too thin to say).
    pub cadence: Cadence,
    /// Actions per page of a sweep (`$top`; the service allows up to 10,000).
    pub sweep_page_size: u32,
    /// How long the poll loop may show no progress (a hung call, a database that refuses
    /// writes) before `/healthz` fails and the systemd watchdog stops being fed. Unset:
    /// `api.timeout` plus the database busy timeout plus 15 s, the longest legitimate wait.
    #[serde(
        with = "optional_duration_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub stall_after: Option<Duration>,
    /// Track only the ids given (`off`), or every action of the tenant, whoever started it
    /// (`all`): sweeps then add each listed action nobody enqueued.
    pub discover: DiscoverMode,
    /// On the first start with discovery on, the actions created since this long ago are
    /// recorded (finished ones as finished, active ones tracked).
    #[serde(with = "duration_text")]
    pub discover_since: Duration,
    /// Only discover actions of these types (MDE's values, e.g. "Isolate"); empty: all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub discover_types: Vec<String>,
    /// Only discover actions requested by these (MDE's `requestor`, exact); empty: all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub discover_requestors: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepMode {
    Auto,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cadence {
    #[default]
    Learned,
    Observed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoverMode {
    #[default]
    Off,
    All,
}

/// The shortest retention of finished actions: below it, `prune` would delete actions that
/// reporting tools have not had a chance to read (`0s` deletes every finished one).
pub const MIN_KEEP_FINISHED: Duration = Duration::from_secs(60);

/// The one rule for `retention.keep_finished` and `prune --keep`.
pub fn check_keep_finished(keep: Duration) -> Result<(), String> {
    if keep < MIN_KEEP_FINISHED {
        return Err(format!(
            "must be at least 1m, not {} (or unset to keep everything)",
            crate::domain::format_duration(keep)
        ));
    }
    if crate::domain::time_ago(keep).is_none() {
        return Err(format!(
            "{} reaches back before 1970",
            crate::domain::format_duration(keep)
        ));
    }
    Ok(())
}

/// The largest `$top` the service accepts.
pub const MAX_PAGE_SIZE: u32 = 10_000;

impl Default for PollSettings {
    fn default() -> Self {
        let policy = PollPolicy::default();
        Self {
            initial_interval: policy.initial_interval,
            multiplier: policy.multiplier,
            max_interval: policy.max_interval,
            jitter: policy.jitter,
            give_up_after: Duration::from_secs(7 * 86_400),
            not_found_after: Duration::from_secs(120),
            batch_size: 100,
            concurrency: 4,
            ride_along: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(5),
            sweep: SweepMode::Auto,
            sweep_interval: Duration::from_secs(120),
            lag_per_call: Duration::from_secs(75),
            young_for: Duration::from_secs(600),
            cadence: Cadence::Learned,
            sweep_page_size: MAX_PAGE_SIZE,
            stall_after: None,
            discover: DiscoverMode::Off,
            discover_since: Duration::from_secs(7 * 86_400),
            discover_types: Vec::new(),
            discover_requestors: Vec::new(),
        }
    }
}

impl PollSettings {
    pub fn policy(&self) -> PollPolicy {
        PollPolicy {
            initial_interval: self.initial_interval,
            multiplier: self.multiplier,
            max_interval: self.max_interval,
            jitter: self.jitter,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    pub per_minute: u32,
    pub per_hour: u32,
    /// Compresses the minute and hour windows (benchmarks that run time faster); not a
    /// configuration key.
    #[serde(skip)]
    pub time_scale: f64,
}

impl Default for RateLimitSettings {
    /// 80% of what MDE allows each app and tenant (100/min, 1,500/h): the app's budget is
    /// shared with whatever creates the actions (a SOAR, the playbooks, scripts).
    fn default() -> Self {
        Self {
            per_minute: 80,
            per_hour: 1200,
            time_scale: 1.0,
        }
    }
}

impl Settings {
    /// The API root: `api.base_url`, or the cloud's.
    pub fn api_base_url(&self) -> String {
        self.api
            .base_url
            .clone()
            .unwrap_or_else(|| self.api.cloud.api_base_url().to_string())
    }

    /// The identity platform: `auth.authority`, or the cloud's.
    pub fn authority(&self) -> String {
        self.auth
            .authority
            .clone()
            .unwrap_or_else(|| self.api.cloud.authority().to_string())
    }

    /// The token scope: `auth.scope`, or `https://<cloud's API host>/.default`.
    pub fn scope(&self) -> String {
        self.auth
            .scope
            .clone()
            .unwrap_or_else(|| format!("{}/.default", self.api.cloud.api_base_url()))
    }

    /// `auth.method`, or the one method whose keys are set.
    pub fn auth_method(&self) -> Result<AuthMethod, Problem> {
        if let Some(m) = self.auth.method {
            return Ok(m);
        }
        let a = &self.auth;
        let mut found = Vec::new();
        if a.client_secret.is_some()
            || a.client_secret_file.is_some()
            || a.client_secret_credential.is_some()
        {
            found.push(AuthMethod::ClientSecret);
        }
        if a.certificate_file.is_some() || a.private_key_file.is_some() {
            found.push(AuthMethod::Certificate);
        }
        if a.federated_token_file.is_some() {
            found.push(AuthMethod::WorkloadIdentity);
        }
        if a.managed_identity_endpoint.is_some() || a.managed_identity_client_id.is_some() {
            found.push(AuthMethod::ManagedIdentity);
        }
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(Problem {
                key: "auth.method",
                message: "no credentials configured: set auth.client_secret_file (or client_secret, client_secret_credential), auth.certificate_file, auth.federated_token_file, or auth.method = \"managed_identity\"".into(),
            }),
            many => Err(Problem {
                key: "auth.method",
                message: format!(
                    "keys of several methods are set ({}); choose one with auth.method",
                    many.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
                ),
            }),
        }
    }

    /// Fills unset keys from the variables Azure injects (AKS workload identity, App Service
    /// and Container Apps managed identity).
    fn apply_azure_environment(&mut self, env: &HashMap<String, String>) {
        let get = |k: &str| {
            env.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let a = &mut self.auth;
        if a.tenant_id.is_none() {
            a.tenant_id = get("AZURE_TENANT_ID");
        }
        if a.client_id.is_none() {
            a.client_id = get("AZURE_CLIENT_ID");
        }
        let explicit_other = a.client_secret.is_some()
            || a.client_secret_file.is_some()
            || a.client_secret_credential.is_some()
            || a.certificate_file.is_some()
            || matches!(a.method, Some(m) if m != AuthMethod::WorkloadIdentity);
        if a.federated_token_file.is_none() && !explicit_other {
            a.federated_token_file = get("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from);
        }
        if a.authority.is_none() && a.federated_token_file.is_some() {
            a.authority = get("AZURE_AUTHORITY_HOST");
        }
        if a.managed_identity_endpoint.is_none() && a.method == Some(AuthMethod::ManagedIdentity) {
            a.managed_identity_endpoint = get("IDENTITY_ENDPOINT");
        }
        if a.managed_identity_header.is_none() {
            a.managed_identity_header = get("IDENTITY_HEADER").map(Secret::new);
        }
    }

    /// Loads defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like `load`, with the environment given (tests use this instead of mutating the process).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            let text = crate::textfile::read(path).map_err(|message| ConfigError::File {
                path: path.to_path_buf(),
                message,
            })?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        // Only `SECTION__KEY` variables are settings; `MDE_ACTIOND_CONFIG` and friends belong to
        // the command line and must not trip the unknown-key check.
        let prefix = format!("{ENV_PREFIX}_");
        let all: HashMap<String, String> = env.into_iter().collect();
        let vars: HashMap<String, String> = all
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix) && k.contains("__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .source(Some(vars.into_iter().collect())),
        );
        let mut settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load(describe_load_error(e)))?;
        settings.apply_azure_environment(&all);
        settings.auth.secret_source_from_environment(&all);
        Ok(settings)
    }

    /// Every problem that would make the daemon misbehave, each naming its key.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: &'static str, message: String| out.push(Problem { key, message });

        if self.database.path.as_os_str().is_empty() {
            bad("database.path", "must not be empty".into());
        }
        if self.database.checkpoint_interval < Duration::from_millis(100) {
            bad(
                "database.checkpoint_interval",
                "must be at least 100ms".into(),
            );
        }
        if let Some(k) = self.retention.keep_finished
            && let Err(e) = check_keep_finished(k)
        {
            bad("retention.keep_finished", e);
        }
        if let Err(e) = check_http_url(&self.api_base_url()) {
            bad("api.base_url", e);
        }
        if let Err(e) = check_http_url(&self.authority()) {
            bad("auth.authority", e);
        }
        if let Some(ep) = &self.auth.managed_identity_endpoint
            && let Err(e) = check_http_url(ep)
        {
            bad("auth.managed_identity_endpoint", e);
        }
        if self.api.timeout.is_zero() {
            bad("api.timeout", "must be more than zero".into());
        }
        if self.api.connect_timeout.is_zero() {
            bad("api.connect_timeout", "must be more than zero".into());
        }
        if self.scope().trim().is_empty() {
            bad("auth.scope", "must not be empty".into());
        }
        let p = &self.poll;
        if p.initial_interval < Duration::from_millis(10) {
            bad("poll.initial_interval", "must be at least 10ms".into());
        }
        if p.max_interval < p.initial_interval {
            bad(
                "poll.max_interval",
                "must not be shorter than poll.initial_interval".into(),
            );
        }
        if !(p.multiplier.is_finite() && p.multiplier >= 1.0 && p.multiplier <= 100.0) {
            bad(
                "poll.multiplier",
                format!("must be between 1 and 100, not {}", p.multiplier),
            );
        }
        if !(p.jitter.is_finite() && (0.0..=1.0).contains(&p.jitter)) {
            bad(
                "poll.jitter",
                format!("must be between 0 and 1, not {}", p.jitter),
            );
        }
        if p.give_up_after.is_zero() {
            bad("poll.give_up_after", "must be more than zero".into());
        }
        if p.not_found_after > p.give_up_after {
            bad(
                "poll.not_found_after",
                format!(
                    "{} is longer than poll.give_up_after ({}): an unknown id would be given up on before it could be found missing",
                    crate::domain::format_duration(p.not_found_after),
                    crate::domain::format_duration(p.give_up_after)
                ),
            );
        }
        if let Some(stall) = p.stall_after
            && stall < Duration::from_secs(1)
        {
            bad(
                "poll.stall_after",
                format!(
                    "must be at least 1s, not {}",
                    crate::domain::format_duration(stall)
                ),
            );
        }
        if p.batch_size == 0 || p.batch_size > MAX_BATCH_SIZE {
            bad(
                "poll.batch_size",
                format!(
                    "must be between 1 and {MAX_BATCH_SIZE} (1 means one GET per action), not {}",
                    p.batch_size
                ),
            );
        }
        if p.sweep_page_size == 0 || p.sweep_page_size > MAX_PAGE_SIZE {
            bad(
                "poll.sweep_page_size",
                format!(
                    "must be between 1 and {MAX_PAGE_SIZE}, not {}",
                    p.sweep_page_size
                ),
            );
        }
        if p.sweep_interval.is_zero() {
            bad("poll.sweep_interval", "must be more than zero".into());
        }
        if p.discover == DiscoverMode::All && p.sweep == SweepMode::Off {
            bad(
                "poll.discover",
                "\"all\" finds actions through sweeps; it needs poll.sweep = \"auto\"".into(),
            );
        }
        if crate::domain::time_ago(p.discover_since).is_none()
            || p.discover_since > Duration::from_secs(180 * 86_400)
        {
            bad(
                "poll.discover_since",
                "must be at most 180d (MDE keeps six months of actions)".into(),
            );
        }
        if p.concurrency == 0 || p.concurrency > 64 {
            bad(
                "poll.concurrency",
                format!("must be between 1 and 64, not {}", p.concurrency),
            );
        }
        if let Some(Err(e)) = self.http.listen_addr() {
            bad("http.listen", e);
        }
        let r = &self.rate_limit;
        if r.per_minute == 0 {
            bad("rate_limit.per_minute", "must be at least 1".into());
        }
        if r.per_hour == 0 {
            bad("rate_limit.per_hour", "must be at least 1".into());
        }
        if r.per_minute > r.per_hour {
            bad(
                "rate_limit.per_minute",
                format!(
                    "{} is above rate_limit.per_hour ({}): a minute cannot allow more calls than the hour it is in",
                    r.per_minute, r.per_hour
                ),
            );
        }
        if self.retention.keep_notifications < Duration::from_secs(60) {
            bad("retention.keep_notifications", "must be at least 1m".into());
        }
        out.extend(self.notify_problems());
        out
    }

    /// The `[[notify]]` and `[callbacks]` checks that need no file.
    fn notify_problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: &'static str, message: String| out.push(Problem { key, message });
        let mut names = std::collections::HashSet::new();
        for n in &self.notify {
            let who = format!("destination '{}'", n.name);
            let valid_name = !n.name.is_empty()
                && n.name.len() <= 64
                && n.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid_name {
                bad(
                    "notify.name",
                    format!("'{}' must be 1-64 letters, digits, '-' or '_'", n.name),
                );
            } else if n.name == crate::domain::CALLBACK {
                bad(
                    "notify.name",
                    "'callback' is reserved for per-request callback URLs".into(),
                );
            } else if !names.insert(n.name.as_str()) {
                bad("notify.name", format!("'{}' appears twice", n.name));
            }
            match (&n.url, &n.url_file) {
                (Some(_), Some(_)) => bad(
                    "notify.url",
                    format!("{who}: set url or url_file, not both"),
                ),
                (None, None) => bad(
                    "notify.url",
                    format!("{who}: url (or url_file) is required"),
                ),
                (Some(url), None) => {
                    if let Err(e) = check_notify_url(url.expose()) {
                        bad("notify.url", format!("{who}: {e}"));
                    }
                }
                (None, Some(_)) => {}
            }
            if let Some((key, message)) = n.credential_problem() {
                bad(key, format!("{who}: {message}"));
            }
            if n.events.is_empty() {
                bad(
                    "notify.events",
                    format!("{who}: name at least one of transition, terminal, stuck"),
                );
            }
            if n.timeout.is_zero() || n.timeout > Duration::from_secs(120) {
                bad(
                    "notify.timeout",
                    format!("{who}: must be between 1ms and 2m"),
                );
            }
            if let Err(e) = n.retry_waits() {
                bad("notify.retry_schedule", format!("{who}: {e}"));
            }
            if n.disable_after < Duration::from_secs(1) {
                bad(
                    "notify.disable_after",
                    format!("{who}: must be at least 1s"),
                );
            }
        }
        let c = &self.callbacks;
        for pattern in &c.allow {
            if let Err(e) = crate::domain::HostPattern::parse(pattern) {
                bad("callbacks.allow", e);
            }
        }
        if c.timeout.is_zero() || c.timeout > Duration::from_secs(120) {
            bad("callbacks.timeout", "must be between 1ms and 2m".into());
        }
        if let Err(e) = c.retry_waits() {
            bad("callbacks.retry_schedule", e);
        }
        out
    }

    /// What `run` needs beyond `problems`: the credentials.
    pub fn credential_problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let a = &self.auth;
        let inferred = self.auth_method();
        if let Err(p) = &inferred {
            out.push(p.clone());
        }
        let need = |out: &mut Vec<Problem>, key: &'static str, present: bool, what: &str| {
            if !present {
                out.push(Problem {
                    key,
                    message: format!("is required ({what})"),
                });
            }
        };
        // Every method but managed identity names the tenant and the app.
        if inferred != Ok(AuthMethod::ManagedIdentity) {
            match a.tenant_id.as_deref().map(str::trim) {
                None | Some("") => need(&mut out, "auth.tenant_id", false, "the directory (tenant) id; AZURE_TENANT_ID also works"),
                Some(t) if !is_tenant_id(t) => out.push(Problem {
                    key: "auth.tenant_id",
                    message: format!(
                        "'{t}' is not a tenant id (a GUID or a domain such as contoso.onmicrosoft.com)"
                    ),
                }),
                Some(_) => {}
            }
            need(
                &mut out,
                "auth.client_id",
                a.client_id.as_deref().is_some_and(|c| !c.trim().is_empty()),
                "the application (client) id; AZURE_CLIENT_ID also works",
            );
        }
        let Ok(method) = inferred else {
            return out;
        };
        match method {
            AuthMethod::ClientSecret => {
                let inline = a.client_secret.as_ref().is_some_and(|s| !s.is_empty());
                let sources = usize::from(inline)
                    + usize::from(a.client_secret_file.is_some())
                    + usize::from(a.client_secret_credential.is_some());
                if sources == 0 {
                    out.push(Problem {
                        key: "auth.client_secret",
                        message: "set one of auth.client_secret, auth.client_secret_file or auth.client_secret_credential".into(),
                    });
                } else if sources > 1 {
                    out.push(Problem {
                        key: "auth.client_secret",
                        message: "set only one of auth.client_secret, auth.client_secret_file and auth.client_secret_credential".into(),
                    });
                }
                if let Some(name) = &a.client_secret_credential
                    && (name.is_empty() || name.contains('/') || name == "." || name == "..")
                {
                    out.push(Problem {
                        key: "auth.client_secret_credential",
                        message: format!("'{name}' is not a credential name (a plain file name as in LoadCredential=NAME:...)"),
                    });
                }
            }
            AuthMethod::Certificate => need(
                &mut out,
                "auth.certificate_file",
                a.certificate_file.is_some(),
                "the app's PEM certificate; its key in the same file or auth.private_key_file",
            ),
            AuthMethod::WorkloadIdentity => need(
                &mut out,
                "auth.federated_token_file",
                a.federated_token_file.is_some(),
                "the projected service account token; AZURE_FEDERATED_TOKEN_FILE also works",
            ),
            AuthMethod::ManagedIdentity => {}
        }
        out
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        into_result(self.problems())
    }

    pub fn validate_for_run(&self) -> Result<(), ConfigError> {
        let mut problems = self.problems();
        problems.extend(self.credential_problems());
        into_result(problems)
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

fn into_result(problems: Vec<Problem>) -> Result<(), ConfigError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

fn describe_load_error(e: config::ConfigError) -> String {
    // The config crate already names the key ("... for key `poll.batch_size`"); add the hint
    // people need most often.
    let text = e.to_string();
    if text.contains("unknown field") {
        format!("{text} (check the spelling against config/mde-actiond.toml)")
    } else {
        text
    }
}

/// A destination URL: http(s), no userinfo (it would land in logs of proxies).
pub fn check_notify_url(s: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(s.trim()).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must start with https:// (or http://)".into());
    }
    if url.host_str().is_none() {
        return Err("has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry a user or password; use token_file".into());
    }
    Ok(())
}

fn check_http_url(s: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(s).map_err(|e| format!("'{s}' is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "'{s}' must start with https:// (or http:// for tests)"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("'{s}' must not have a query or fragment"));
    }
    Ok(())
}

fn is_tenant_id(s: &str) -> bool {
    // A GUID or a verified domain; either way only characters that are safe in a URL path.
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !s.starts_with('.')
        && !s.contains("..")
}

/// An optional duration as text; absent means off.
mod optional_duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_text::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::duration_text")] Duration);
        Option::<Wrap>::deserialize(d).map(|o| o.map(|w| w.0))
    }
}

/// Durations in config are text (`250ms`, `10s`, `5m`, `7d`).
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::domain::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(f64),
        }
        match Raw::deserialize(d)? {
            Raw::Text(s) => crate::domain::parse_duration(&s).map_err(serde::de::Error::custom),
            Raw::Number(n) => Err(serde::de::Error::custom(format!(
                "{n} has no unit; write durations as text with a unit, e.g. \"{n}s\""
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load_toml(text: &str, vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Settings::load_from(Some(&path), env(vars))
    }

    #[test]
    fn defaults_are_valid_but_lack_credentials() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert!(s.validate().is_ok());
        let err = s.validate_for_run().unwrap_err().to_string();
        assert!(err.contains("auth.tenant_id"), "{err}");
        assert!(err.contains("auth.client_id"), "{err}");
        assert!(
            err.contains("auth.method") && err.contains("client_secret_file"),
            "{err}"
        );
        // 80% of the service's 100/min and 1,500/h: the rest is for other users of the app.
        assert_eq!(s.rate_limit.per_minute, 80);
        assert_eq!(s.rate_limit.per_hour, 1200);
        assert_eq!(s.poll.give_up_after, Duration::from_secs(7 * 86400));
    }

    #[test]
    fn file_then_env_override() {
        let s = load_toml(
            "[poll]\ninitial_interval = \"2s\"\nbatch_size = 20\n[auth]\ntenant_id = \"contoso.onmicrosoft.com\"\n",
            &[
                ("MDE_ACTIOND_POLL__BATCH_SIZE", "7"),
                ("MDE_ACTIOND_AUTH__CLIENT_SECRET", "s3cret"),
                ("MDE_ACTIOND_CONFIG", "/ignored/because/cli/level.toml"),
                ("OTHER_POLL__BATCH_SIZE", "9"),
            ],
        )
        .unwrap();
        assert_eq!(s.poll.initial_interval, Duration::from_secs(2));
        assert_eq!(s.poll.batch_size, 7);
        assert_eq!(s.auth.client_secret.unwrap().expose(), "s3cret");
        assert_eq!(s.auth.tenant_id.as_deref(), Some("contoso.onmicrosoft.com"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load_toml("[poll]\nintial_interval = \"2s\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("intial_interval"), "{err}");
    }

    #[test]
    fn bad_durations_name_the_key_and_value() {
        let err = load_toml("[poll]\nmax_interval = \"soonish\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("soonish") && err.contains("max_interval"),
            "{err}"
        );
        let err = load_toml("[api]\ntimeout = 30\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("30s") && err.contains("timeout"), "{err}");
    }

    #[test]
    fn bad_numbers_name_the_key() {
        let err = Settings::load_from(None, env(&[("MDE_ACTIOND_POLL__BATCH_SIZE", "many")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_size"), "{err}");
    }

    #[test]
    fn range_problems_are_all_reported() {
        let mut s = Settings::default();
        s.poll.batch_size = 0;
        s.poll.multiplier = 0.5;
        s.poll.max_interval = Duration::from_millis(20);
        s.api.base_url = Some("ftp://example".into());
        s.rate_limit.per_minute = 0;
        let keys: Vec<_> = s.problems().iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            vec![
                "api.base_url",
                "poll.max_interval",
                "poll.multiplier",
                "poll.batch_size",
                "rate_limit.per_minute"
            ]
        );
    }

    #[test]
    fn tenant_ids_cannot_inject_paths() {
        let mut s = Settings::default();
        s.auth.client_id = Some("c".into());
        s.auth.client_secret = Some(Secret::new("x"));
        s.auth.tenant_id = Some("../evil".into());
        let err = s.validate_for_run().unwrap_err().to_string();
        assert!(err.contains("auth.tenant_id"), "{err}");
        s.auth.tenant_id = Some("2e9da30d-27f6-4208-81f2-9cd3d67893ba".into());
        assert!(s.validate_for_run().is_ok());
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mde-actiond.toml");
        let s = Settings::load_from(Some(&path), env(&[])).unwrap();
        s.validate_for_run().unwrap();
        let defaults = Settings::default();
        // The example documents the defaults; it must not drift from them.
        assert_eq!(s.poll.policy(), defaults.poll.policy());
        assert_eq!(s.poll.batch_size, defaults.poll.batch_size);
        assert_eq!(s.poll.concurrency, defaults.poll.concurrency);
        assert_eq!(s.poll.give_up_after, defaults.poll.give_up_after);
        assert_eq!(s.poll.ride_along, defaults.poll.ride_along);
        assert_eq!(s.poll.shutdown_grace, defaults.poll.shutdown_grace);
        assert_eq!(s.api.timeout, defaults.api.timeout);
        assert_eq!(s.rate_limit.per_minute, defaults.rate_limit.per_minute);
        assert_eq!(s.rate_limit.per_hour, defaults.rate_limit.per_hour);
        assert_eq!(s.scope(), defaults.scope());
        assert_eq!(s.api_base_url(), defaults.api_base_url());
        assert_eq!(s.authority(), defaults.authority());
    }

    #[test]
    fn rendered_config_redacts_secrets() {
        let mut s = Settings::default();
        s.auth.client_secret = Some(Secret::new("hunter2"));
        let text = s.to_toml();
        assert!(!text.contains("hunter2"));
        assert!(text.contains("[redacted]"));
        assert!(text.contains("initial_interval = \"10s\""), "{text}");
    }
}
