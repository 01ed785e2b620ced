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
pub const DEFAULT_BASE_URL: &str = "https://api.securitycenter.microsoft.com";
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
pub const DEFAULT_SCOPE: &str = "https://api.securitycenter.microsoft.com/.default";
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
}

/// Pruning of finished actions; off unless `keep_finished` is set.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Delete actions (and their transitions) this long after they finished.
    #[serde(
        with = "optional_duration_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub keep_finished: Option<Duration>,
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    pub base_url: String,
    /// Whole-request timeout for one API call.
    #[serde(with = "duration_text")]
    pub timeout: Duration,
    #[serde(with = "duration_text")]
    pub connect_timeout: Duration,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_string(),
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    pub authority: String,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_secret_file: Option<PathBuf>,
    /// Name of a systemd credential (`LoadCredential=NAME:...`) holding the secret, read from
    /// `$CREDENTIALS_DIRECTORY/NAME`.
    pub client_secret_credential: Option<String>,
    pub scope: String,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            authority: DEFAULT_AUTHORITY.to_string(),
            tenant_id: None,
            client_id: None,
            client_secret: None,
            client_secret_file: None,
            client_secret_credential: None,
            scope: DEFAULT_SCOPE.to_string(),
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
    pub batch_size: u32,
    pub concurrency: u32,
    /// Actions due within this window ride along in a list call that goes out anyway.
    #[serde(with = "duration_text")]
    pub ride_along: Duration,
    /// How long a stopping daemon waits for calls in flight.
    #[serde(with = "duration_text")]
    pub shutdown_grace: Duration,
}

impl Default for PollSettings {
    fn default() -> Self {
        let policy = PollPolicy::default();
        Self {
            initial_interval: policy.initial_interval,
            multiplier: policy.multiplier,
            max_interval: policy.max_interval,
            jitter: policy.jitter,
            give_up_after: Duration::from_secs(7 * 86_400),
            batch_size: 100,
            concurrency: 4,
            ride_along: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
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
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            per_minute: 100,
            per_hour: 1500,
        }
    }
}

impl Settings {
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
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        // Only `SECTION__KEY` variables are settings; `MDE_ACTIOND_CONFIG` and friends belong to
        // the command line and must not trip the unknown-key check.
        let prefix = format!("{ENV_PREFIX}_");
        let vars: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix) && k.contains("__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .source(Some(vars.into_iter().collect())),
        );
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Load(describe_load_error(e)))?;
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
        if self
            .retention
            .keep_finished
            .is_some_and(|k| k < Duration::from_secs(60))
        {
            bad(
                "retention.keep_finished",
                "must be at least 1m (or unset to keep everything)".into(),
            );
        }
        if let Err(e) = check_http_url(&self.api.base_url) {
            bad("api.base_url", e);
        }
        if let Err(e) = check_http_url(&self.auth.authority) {
            bad("auth.authority", e);
        }
        if self.api.timeout.is_zero() {
            bad("api.timeout", "must be more than zero".into());
        }
        if self.api.connect_timeout.is_zero() {
            bad("api.connect_timeout", "must be more than zero".into());
        }
        if self.auth.scope.trim().is_empty() {
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
        if p.batch_size == 0 || p.batch_size > MAX_BATCH_SIZE {
            bad(
                "poll.batch_size",
                format!(
                    "must be between 1 and {MAX_BATCH_SIZE} (1 means one GET per action), not {}",
                    p.batch_size
                ),
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
        out
    }

    /// What `run` needs beyond `problems`: the credentials.
    pub fn credential_problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let a = &self.auth;
        match a.tenant_id.as_deref().map(str::trim) {
            None | Some("") => out.push(Problem {
                key: "auth.tenant_id",
                message: "is required (the directory/tenant id of the app registration)".into(),
            }),
            Some(t) if !is_tenant_id(t) => out.push(Problem {
                key: "auth.tenant_id",
                message: format!(
                    "'{t}' is not a tenant id (a GUID or a domain such as contoso.onmicrosoft.com)"
                ),
            }),
            Some(_) => {}
        }
        if a.client_id.as_deref().is_none_or(|c| c.trim().is_empty()) {
            out.push(Problem {
                key: "auth.client_id",
                message: "is required (the application/client id)".into(),
            });
        }
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
        assert!(err.contains("auth.client_secret"), "{err}");
        assert_eq!(s.rate_limit.per_minute, 100);
        assert_eq!(s.rate_limit.per_hour, 1500);
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
        s.api.base_url = "ftp://example".into();
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
        assert_eq!(s.auth.scope, defaults.auth.scope);
        assert_eq!(s.api.base_url, defaults.api.base_url);
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
