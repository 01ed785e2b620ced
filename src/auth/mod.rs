//! OAuth tokens: a `TokenSource` fetches one, `TokenProvider` caches it, refreshes it before it
//! expires, lets concurrent callers share one refresh, and backs off when the identity
//! platform fails.
//!
//! Nothing here logs or formats a secret or a token: they live in `Secret`.
// Network input is parsed here: no unwrap, no unchecked arithmetic, no indexing that can
// panic (tests may).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::arithmetic_side_effects
    )
)]

pub mod certificate;
pub mod files;
pub mod jwt;
pub mod managed;
pub mod workload;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::outbound::{Answer, Cap, Outbound};
use crate::schedule::{PollPolicy, next_delay};
use crate::secret::Secret;

/// Refresh this long before expiry at most (a fifth of the lifetime for short tokens).
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The identity platform refused the request (wrong secret, unknown tenant, ...);
    /// retrying will not help until someone fixes the configuration.
    #[error("token request refused (HTTP {status}): {error}: {description}")]
    Refused {
        status: u16,
        error: String,
        description: String,
    },
    /// Network trouble or a 5xx/429 from the token endpoint.
    #[error("token request failed: {0}")]
    Transient(String),
    /// A local problem, such as an unreadable secret file.
    #[error("{0}")]
    Local(String),
    /// The endpoint answered with a redirect, which is never followed: the secret or
    /// assertion goes only to the configured authority.
    #[error(
        "token endpoint answered HTTP {status} redirecting to {origin}; not followed (the credential is sent only to the configured authority); check auth.authority or a proxy on the way"
    )]
    Redirected { status: u16, origin: String },
    /// A 2xx whose token cannot be used: too long, not a bearer token, characters a header
    /// cannot carry.
    #[error("unusable token answer: {0}")]
    Invalid(String),
    /// The token request panicked (a bug, or an answer nothing anticipated); contained.
    #[error("the token request panicked: {0}")]
    Panicked(String),
    /// An earlier failure is still being backed off from.
    #[error("waiting {}s before the next token request; last failure: {last}", .wait.as_secs())]
    BackingOff { wait: Duration, last: String },
}

impl AuthError {
    /// How long the caller should wait before trying again, when that is known.
    pub fn wait(&self) -> Option<Duration> {
        match self {
            AuthError::BackingOff { wait, .. } => Some(*wait),
            _ => None,
        }
    }

    /// The `cause` label of `mde_actiond_token_failures_by_cause_total`.
    pub fn cause(&self) -> &'static str {
        match self {
            AuthError::Refused { .. } => "refused",
            AuthError::Transient(_) => "transient",
            AuthError::Local(_) => "local",
            AuthError::Redirected { .. } => "redirected",
            AuthError::Invalid(_) => "invalid_answer",
            AuthError::Panicked(_) => "panic",
            AuthError::BackingOff { .. } => "backing_off",
        }
    }
}

/// Every `cause` a failed token request is counted under.
pub const FAILURE_CAUSES: [&str; 6] = [
    "refused",
    "transient",
    "local",
    "redirected",
    "invalid_answer",
    "panic",
];

/// The range a token's lifetime is taken in: an answer outside it is clamped (with a
/// warning). Entra ID issues 60-90 minutes (up to 28 hours with continuous access
/// evaluation); managed identity up to 24 hours. Longer would keep a token past any rotation.
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(1);
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The longest access token taken: it becomes an `Authorization` header, and front ends
/// refuse headers past 16 KiB (HTTP.sys's default). Entra ID's are 1-4 KiB.
pub const MAX_TOKEN_BYTES: usize = 16_000;

/// An access token and when it stops working.
#[derive(Clone, Debug)]
pub struct AccessToken {
    pub secret: Secret,
    pub expires_at: Instant,
    pub lifetime: Duration,
}

pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<AccessToken, AuthError>> + Send + 'a>>;

/// Something that can get a fresh access token.
pub trait TokenSource: Send + Sync {
    fn fetch(&self) -> TokenFuture<'_>;
}

/// Where the client secret comes from.
#[derive(Clone, Debug)]
pub enum SecretSource {
    Inline(Secret),
    /// Read at every token request, so a rotated file is picked up without a restart.
    File(PathBuf),
}

impl SecretSource {
    async fn read(&self) -> Result<Secret, AuthError> {
        match self {
            SecretSource::Inline(s) => Ok(s.clone()),
            SecretSource::File(path) => files::read_private(path, "auth.client_secret_file")
                .map(Secret::new)
                .map_err(AuthError::Local),
        }
    }
}

/// Client-credentials grant with a client secret against the Microsoft identity platform.
pub struct ClientSecretSource {
    http: Outbound,
    token_url: String,
    client_id: String,
    secret: SecretSource,
    scope: String,
}

pub fn token_url(authority: &str, tenant_id: &str) -> String {
    format!(
        "{}/{}/oauth2/v2.0/token",
        authority.trim_end_matches('/'),
        tenant_id
    )
}

impl TokenSource for ClientSecretSource {
    fn fetch(&self) -> TokenFuture<'_> {
        Box::pin(async move {
            let secret = self.secret.read().await?;
            let form = [
                ("grant_type", "client_credentials"),
                ("client_id", self.client_id.as_str()),
                ("client_secret", secret.expose()),
                ("scope", self.scope.as_str()),
            ];
            post_token_form(&self.http, &self.token_url, &form).await
        })
    }
}

/// POSTs a token request form and reads the answer.
pub async fn post_token_form(
    http: &Outbound,
    url: &str,
    form: &[(&str, &str)],
) -> Result<AccessToken, AuthError> {
    let answer = http
        .post(url)
        .form(form)
        .send()
        .await
        .map_err(|e| AuthError::Transient(e.to_string()))?;
    read_token_answer(answer).await
}

/// A token endpoint's answer: a redirect is refused unread, the body is read up to
/// `Cap::TOKEN`, then parsed.
pub async fn read_token_answer(answer: Answer) -> Result<AccessToken, AuthError> {
    if let Some(r) = answer.redirect() {
        return Err(AuthError::Redirected {
            status: r.status,
            origin: r.origin,
        });
    }
    let status = answer.status().as_u16();
    let body = answer
        .text(Cap::TOKEN)
        .await
        .map_err(|e| AuthError::Transient(e.to_string()))?;
    parse_token_answer(status, &body)
}

/// Builds the token source the settings ask for. Fails with the key to fix when a file or
/// variable it needs is missing.
pub fn build_source(
    settings: &crate::config::Settings,
    http: Outbound,
) -> Result<Box<dyn TokenSource>, crate::config::Problem> {
    use crate::config::{AuthMethod, Problem};
    let a = &settings.auth;
    let method = settings.auth_method()?;
    let trimmed = |v: &Option<String>| v.as_deref().unwrap_or_default().trim().to_string();
    let client_id = trimmed(&a.client_id);
    let token_url = token_url(&settings.authority(), &trimmed(&a.tenant_id));
    let scope = settings.scope();
    Ok(match method {
        AuthMethod::ClientSecret => {
            let secret = secret_source(a)?;
            Box::new(ClientSecretSource {
                http,
                token_url,
                client_id,
                secret,
                scope,
            })
        }
        AuthMethod::Certificate => Box::new(certificate::CertificateSource {
            http,
            token_url,
            client_id,
            scope,
            certificate_file: a.certificate_file.clone().ok_or_else(|| Problem {
                key: "auth.certificate_file",
                message: "is required for the certificate method".into(),
            })?,
            private_key_file: a.private_key_file.clone(),
            algorithm: a.signing_algorithm,
        }),
        AuthMethod::WorkloadIdentity => Box::new(workload::WorkloadIdentitySource {
            http,
            token_url,
            client_id,
            scope,
            token_file: a.federated_token_file.clone().ok_or_else(|| Problem {
                key: "auth.federated_token_file",
                message: "is required for workload identity (AZURE_FEDERATED_TOKEN_FILE)".into(),
            })?,
        }),
        AuthMethod::ManagedIdentity => {
            let endpoint = a
                .managed_identity_endpoint
                .clone()
                .unwrap_or_else(|| crate::config::IMDS_ENDPOINT.to_string());
            Box::new(managed::ManagedIdentitySource {
                http,
                // The App Service form is the one with an identity header.
                identity_header: a
                    .managed_identity_header
                    .clone()
                    .filter(|_| a.managed_identity_endpoint.is_some()),
                endpoint,
                resource: managed::resource_of(&scope),
                client_id: a.managed_identity_client_id.clone(),
            })
        }
    })
}

/// Where the client secret comes from: inline, a file, or a systemd credential.
fn secret_source(a: &crate::config::AuthSettings) -> Result<SecretSource, crate::config::Problem> {
    use crate::config::Problem;
    Ok(
        match (
            &a.client_secret,
            &a.client_secret_file,
            &a.client_secret_credential,
        ) {
            (Some(s), _, _) if !s.is_empty() => SecretSource::Inline(s.clone()),
            (_, Some(path), _) => SecretSource::File(path.clone()),
            (_, _, Some(name)) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| Problem {
                key: "auth.client_secret_credential",
                message: format!(
                    "is '{name}' but $CREDENTIALS_DIRECTORY is not set; add LoadCredential={name}:/path/to/secret to the unit"
                ),
            })?;
                SecretSource::File(PathBuf::from(dir).join(name))
            }
            _ => {
                return Err(Problem {
                    key: "auth.client_secret",
                    message: "no client secret configured".into(),
                });
            }
        },
    )
}

/// Seconds in a lifetime field: a number (or a number in a string, as the v1 endpoint and
/// managed identity send it). Negative is zero; fractions are dropped; too large saturates.
fn seconds_of(value: &serde_json::Value, what: &str) -> Result<u64, AuthError> {
    let unreadable = || AuthError::Invalid(format!("{what} is not a number of seconds"));
    let number = match value {
        serde_json::Value::Number(n) => n.clone(),
        serde_json::Value::String(s) => {
            serde_json::from_str::<serde_json::Number>(s.trim()).map_err(|_| unreadable())?
        }
        _ => return Err(unreadable()),
    };
    if let Some(n) = number.as_u64() {
        return Ok(n);
    }
    if number.as_i64().is_some() {
        return Ok(0);
    }
    // `as` saturates a float into u64 (NaN is 0).
    number.as_f64().map(|f| f as u64).ok_or_else(unreadable)
}

/// Whether `token` can be sent as `Authorization: Bearer <token>`: RFC 6750's b64token.
fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// The lifetime to use for an answer's `secs`: clamped into
/// [`MIN_TOKEN_LIFETIME`, `MAX_TOKEN_LIFETIME`], with a warning when it had to be.
fn clamped_lifetime(secs: u64) -> Duration {
    let asked = Duration::from_secs(secs);
    let lifetime = asked.clamp(MIN_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME);
    if lifetime != asked {
        tracing::warn!(
            expires_in_s = secs,
            used_s = lifetime.as_secs(),
            "token lifetime outside 1s..24h; using the nearest bound"
        );
    }
    lifetime
}

fn parse_token_answer(status: u16, body: &str) -> Result<AccessToken, AuthError> {
    if (200..300).contains(&status) {
        return parse_granted(body);
    }
    #[derive(Deserialize)]
    struct Refusal {
        error: String,
        #[serde(default)]
        error_description: Option<String>,
    }
    let refusal = serde_json::from_str::<Refusal>(body).ok();
    match (status, refusal) {
        (400 | 401 | 403, Some(r)) => Err(AuthError::Refused {
            status,
            error: snippet(&r.error),
            // The AADSTS message is the useful part; it names no secret.
            description: snippet(&first_line(r.error_description.as_deref().unwrap_or(""))),
        }),
        (_, r) => Err(AuthError::Transient(format!(
            "HTTP {status} from the token endpoint{}",
            r.map(|r| format!(": {}", snippet(&r.error)))
                .unwrap_or_else(|| {
                    let d = crate::mde::describe_error_body(body);
                    if d.is_empty() {
                        String::new()
                    } else {
                        format!(": {d}")
                    }
                })
        ))),
    }
}

/// A 2xx token answer: data to check, not trust. The token becomes a header, so its
/// length and characters are checked; its lifetime is clamped.
fn parse_granted(body: &str) -> Result<AccessToken, AuthError> {
    #[derive(Deserialize)]
    struct Granted {
        access_token: String,
        #[serde(default)]
        expires_in: Option<serde_json::Value>,
        /// Managed identity answers carry the expiry as epoch seconds (sometimes only that).
        #[serde(default)]
        expires_on: Option<serde_json::Value>,
        #[serde(default)]
        token_type: Option<String>,
    }
    let granted: Granted = serde_json::from_str(body).map_err(|e| {
        AuthError::Transient(format!(
            "unreadable token answer ({} bytes): {e}",
            body.len()
        ))
    })?;
    match &granted.token_type {
        Some(t) if t.eq_ignore_ascii_case("bearer") => {}
        Some(t) => {
            return Err(AuthError::Invalid(format!(
                "token_type '{}' is not Bearer",
                snippet(t)
            )));
        }
        None => return Err(AuthError::Invalid("no token_type".into())),
    }
    let token = granted.access_token;
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Invalid(format!(
            "access_token of {} bytes is longer than {MAX_TOKEN_BYTES}",
            token.len()
        )));
    }
    if !is_b64token(&token) {
        return Err(AuthError::Invalid(
            "access_token is empty or holds characters a bearer token cannot have".into(),
        ));
    }
    let secs = granted_seconds(granted.expires_in, granted.expires_on)?;
    let lifetime = clamped_lifetime(secs);
    let now = Instant::now();
    Ok(AccessToken {
        secret: Secret::new(token),
        // Within a day of now cannot overflow; should it, the token is taken as expiring
        // in a second rather than never.
        expires_at: now.checked_add(lifetime).unwrap_or(now),
        lifetime,
    })
}

/// The seconds a token answer grants: `expires_in`, or `expires_on` (epoch seconds) less
/// now.
fn granted_seconds(
    expires_in: Option<serde_json::Value>,
    expires_on: Option<serde_json::Value>,
) -> Result<u64, AuthError> {
    match (expires_in, expires_on) {
        (Some(l), _) => seconds_of(&l, "expires_in"),
        (None, Some(on)) => {
            let at = seconds_of(&on, "expires_on")?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            Ok(at.saturating_sub(now))
        }
        (None, None) => Err(AuthError::Invalid(
            "token answer has neither expires_in nor expires_on".into(),
        )),
    }
}

/// At most 300 characters of a field from the network, for messages.
fn snippet(s: &str) -> String {
    const MAX: usize = 300;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

fn first_line(s: &str) -> String {
    // AAD descriptions end with "Trace ID: ... Correlation ID: ... Timestamp: ..." lines.
    s.lines().next().unwrap_or("").trim().to_string()
}

/// Caches one token for the process.
pub struct TokenProvider {
    source: Box<dyn TokenSource>,
    state: Mutex<State>,
    /// What readiness reads; a plain lock never held across an await, so `/readyz` gets an
    /// answer while a slow token request holds `state`.
    health: std::sync::Mutex<Health>,
    /// How long no usable token may last before `unusable` says so.
    grace: Duration,
    refreshes: AtomicU64,
    failures: AtomicU64,
    failures_by_cause: [AtomicU64; FAILURE_CAUSES.len()],
    panics: AtomicU64,
    /// Fresh tokens the API refused (401) in a row, until it accepts one.
    rejections: std::sync::atomic::AtomicU32,
}

#[derive(Default)]
struct State {
    token: Option<AccessToken>,
    consecutive_failures: u32,
    retry_at: Option<(Instant, String)>,
}

#[derive(Default)]
struct Health {
    /// When the cached token expires; `None` without one.
    valid_until: Option<Instant>,
    /// The identity platform's last refusal, until a token is granted again.
    refused: Option<String>,
    /// The first failure since the last token granted, and the latest failure's text.
    failing_since: Option<Instant>,
    last_failure: Option<String>,
}

fn failure_backoff() -> PollPolicy {
    PollPolicy {
        initial_interval: Duration::from_secs(1),
        multiplier: 2.0,
        max_interval: Duration::from_secs(300),
        jitter: 0.2,
    }
}

impl TokenProvider {
    pub fn new(source: Box<dyn TokenSource>) -> Self {
        Self::with_grace(source, crate::config::DEFAULT_TOKEN_GRACE)
    }

    pub fn with_grace(source: Box<dyn TokenSource>, grace: Duration) -> Self {
        Self {
            source,
            state: Mutex::new(State::default()),
            health: std::sync::Mutex::new(Health::default()),
            grace,
            refreshes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            failures_by_cause: Default::default(),
            panics: AtomicU64::new(0),
            rejections: std::sync::atomic::AtomicU32::new(0),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The API refused a token that was fetched for the retry of a refused call: new tokens
    /// will not help at once (wrong tenant or resource, missing consent), and fetching one
    /// per call spun (hundreds of token requests in seconds). Backs off token requests as
    /// for the identity platform's own failures; returns how long.
    pub async fn rejected(&self, token: &Secret, detail: &str) -> Duration {
        let n = self.rejections.fetch_add(1, Ordering::Relaxed);
        let delay = next_delay(n, &failure_backoff(), fastrand::f64());
        let mut state = self.state.lock().await;
        if state.token.as_ref().is_some_and(|t| &t.secret == token) {
            state.token = None;
            self.health().valid_until = None;
        }
        let why = format!("MDE refused a freshly issued token: {detail}");
        state.retry_at = Some((later(delay), why.clone()));
        let mut health = self.health();
        health.failing_since.get_or_insert_with(Instant::now);
        health.last_failure = Some(why);
        delay
    }

    /// Whether the API has been refusing fresh tokens (no point in an immediate retry).
    pub fn rejecting(&self) -> bool {
        self.rejections.load(Ordering::Relaxed) > 0
    }

    /// The API accepted a token: rejections are over. True when some had been counted.
    pub fn accepted(&self) -> bool {
        self.rejections.swap(0, Ordering::Relaxed) > 0
    }

    /// A token valid for a while yet. Holding the lock across the fetch is what makes the
    /// refresh single-flight: callers that arrive meanwhile wait and reuse its result.
    pub async fn token(&self) -> Result<Secret, AuthError> {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(t) = &state.token
            && now.checked_add(refresh_margin(t.lifetime)) < Some(t.expires_at)
        {
            return Ok(t.secret.clone());
        }
        if let Some((at, last)) = &state.retry_at
            && *at > now
        {
            return Err(AuthError::BackingOff {
                wait: at.saturating_duration_since(now),
                last: last.clone(),
            });
        }
        match self.fetch_contained().await {
            Ok(token) => {
                self.refreshes.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    lifetime_s = token.lifetime.as_secs(),
                    "obtained an access token"
                );
                let secret = token.secret.clone();
                *self.health() = Health {
                    valid_until: Some(token.expires_at),
                    ..Health::default()
                };
                state.token = Some(token);
                state.consecutive_failures = 0;
                state.retry_at = None;
                Ok(secret)
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if let Some(i) = FAILURE_CAUSES.iter().position(|c| *c == e.cause())
                    && let Some(n) = self.failures_by_cause.get(i)
                {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                let delay = next_delay(
                    state.consecutive_failures,
                    &failure_backoff(),
                    fastrand::f64(),
                );
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                state.retry_at = Some((later(delay), e.to_string()));
                {
                    let mut health = self.health();
                    health.failing_since.get_or_insert_with(Instant::now);
                    health.last_failure = Some(e.to_string());
                    if matches!(e, AuthError::Refused { .. } | AuthError::Local(_)) {
                        health.refused = Some(e.to_string());
                    }
                }
                // Keep a still-valid token: an early refresh that failed does not make it bad.
                if let Some(current) = state
                    .token
                    .as_ref()
                    .filter(|t| Instant::now() < t.expires_at)
                {
                    tracing::warn!(error = %e, "token refresh failed; using the current token meanwhile");
                    return Ok(current.secret.clone());
                }
                Err(e)
            }
        }
    }

    /// The source's fetch, with a panic in it turned into a failure (backed off like any
    /// other): whatever a token answer holds, it cannot take the loop down.
    async fn fetch_contained(&self) -> Result<AccessToken, AuthError> {
        use futures_util::FutureExt;
        match std::panic::AssertUnwindSafe(self.source.fetch())
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(panic) => {
                self.panics.fetch_add(1, Ordering::Relaxed);
                let what = crate::panics::message(&*panic);
                tracing::error!(panic = %what, "the token request panicked; backing off as for a failure");
                Err(AuthError::Panicked(what))
            }
        }
    }

    /// Drops the cached token if it is the one the API just refused, so the next `token()`
    /// fetches a new one (and a refusal of an older token does not discard a newer one).
    pub async fn invalidate(&self, refused: &Secret) {
        let mut state = self.state.lock().await;
        if state.token.as_ref().is_some_and(|t| &t.secret == refused) {
            state.token = None;
            state.retry_at = None;
            self.health().valid_until = None;
        }
    }

    /// Why no token can be had, when the identity platform refused the credentials (or the
    /// secret cannot be read) and no valid token is cached.
    pub fn refusal(&self) -> Option<String> {
        let health = self.health();
        let valid = health.valid_until.is_some_and(|v| Instant::now() < v);
        if valid { None } else { health.refused.clone() }
    }

    /// Why the daemon has no usable token, for `/readyz`: a refusal at once; any other
    /// failure once no valid token has been held for `grace` (a failed early refresh while
    /// the current token is still valid is not counted).
    pub fn unusable(&self) -> Option<String> {
        let health = self.health();
        let now = Instant::now();
        if health.valid_until.is_some_and(|v| now < v) {
            return None;
        }
        if let Some(r) = &health.refused {
            return Some(format!("no access token: {r}"));
        }
        let since = health.failing_since?;
        // From the later of the first failure and the expiry of the last token.
        let since = health.valid_until.map_or(since, |v| v.max(since));
        let lasted = now.saturating_duration_since(since);
        (lasted >= self.grace).then(|| {
            format!(
                "no usable access token for {} (auth.token_grace is {}): {}",
                crate::domain::format_duration(lasted),
                crate::domain::format_duration(self.grace),
                health.last_failure.as_deref().unwrap_or("no token yet")
            )
        })
    }

    /// Successful token requests so far.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// Failed token requests so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Failed token requests by cause, every cause listed.
    pub fn failures_by_cause(&self) -> Vec<(&'static str, u64)> {
        FAILURE_CAUSES
            .iter()
            .zip(&self.failures_by_cause)
            .map(|(c, n)| (*c, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Panics of the token source caught so far.
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::Relaxed)
    }
}

fn refresh_margin(lifetime: Duration) -> Duration {
    lifetime
        .checked_div(5)
        .unwrap_or_default()
        .min(MAX_REFRESH_MARGIN)
}

/// Now plus `delay` (a backoff of at most minutes), or now should that not fit.
fn later(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn reads_granted_and_refused_answers() {
        let t = parse_token_answer(
            200,
            r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0"}"#,
        )
        .unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(3599));
        assert_eq!(t.secret.expose(), "eyJ0");
        let t = parse_token_answer(
            200,
            r#"{"token_type":"bearer","expires_in":"60","access_token":"a"}"#,
        )
        .unwrap();
        assert_eq!(t.lifetime, Duration::from_secs(60));

        let e = parse_token_answer(
            401,
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x\r\nCorrelation ID: y"}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "token request refused (HTTP 401): invalid_client: AADSTS7000215: Invalid client secret provided."
        );
        assert!(matches!(
            parse_token_answer(503, "<html><title>Service Unavailable</title></html>").unwrap_err(),
            AuthError::Transient(m) if m.contains("503") && m.contains("Service Unavailable")
        ));
        assert!(matches!(
            parse_token_answer(200, r#"{"access_token":"#).unwrap_err(),
            AuthError::Transient(_)
        ));
    }

    /// Token answers as a hostile endpoint would shape them: any lifetime spelling, any
    /// token text, any token_type.
    fn token_answer() -> impl Strategy<Value = String> {
        let lifetime = prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| if f.is_finite() {
                format!("{f:e}")
            } else {
                "1e999".into()
            }),
            "[0-9]{1,40}".prop_map(|d| format!("\"{d}\"")),
            Just("null".to_string()),
            Just("\"soon\"".to_string()),
        ];
        let token = prop_oneof![
            "[A-Za-z0-9._~+/-]{1,64}=*",
            ".{0,64}",
            (1usize..40_000).prop_map(|n| "a".repeat(n)),
        ];
        let kind = prop_oneof![Just("Bearer"), Just("bearer"), Just("pop"), Just("")];
        (lifetime, token, kind, any::<bool>()).prop_map(|(l, t, k, on)| {
            let field = if on { "expires_on" } else { "expires_in" };
            serde_json::json!({"token_type": k, "access_token": t})
                .to_string()
                .replacen('}', &format!(",\"{field}\":{l}}}"), 1)
        })
    }

    proptest! {
        #[test]
        fn arbitrary_token_answers_never_panic(status in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_token_answer(status, &String::from_utf8_lossy(&body));
        }

        /// Whatever the answer says, a token taken can be a header and lives 1 s to a day.
        #[test]
        fn tokens_taken_are_bounded(body in token_answer()) {
            if let Ok(t) = parse_token_answer(200, &body) {
                prop_assert!(t.lifetime >= MIN_TOKEN_LIFETIME && t.lifetime <= MAX_TOKEN_LIFETIME);
                prop_assert!(t.secret.expose().len() <= MAX_TOKEN_BYTES);
                prop_assert!(is_b64token(t.secret.expose()));
                let header = format!("Bearer {}", t.secret.expose());
                prop_assert!(reqwest::header::HeaderValue::from_str(&header).is_ok());
            }
        }
    }

    #[test]
    fn token_fields_are_checked() {
        let answer = |fields: &str| parse_token_answer(200, &format!("{{{fields}}}"));
        let ok = r#""token_type":"Bearer","access_token":"eyJ0.eyJ1.c2ln""#;
        for huge in [
            "18446744073709551615",
            "9223372036854775807",
            "1e300",
            "\"99999999999999999999\"",
        ] {
            let t = answer(&format!("{ok},\"expires_in\":{huge}")).unwrap();
            assert_eq!(t.lifetime, MAX_TOKEN_LIFETIME, "{huge}");
        }
        for short in ["0", "-5", "0.2"] {
            let t = answer(&format!("{ok},\"expires_in\":{short}")).unwrap();
            assert_eq!(t.lifetime, MIN_TOKEN_LIFETIME, "{short}");
        }
        let e = answer(r#""token_type":"pop","access_token":"abc","expires_in":60"#).unwrap_err();
        assert!(
            matches!(e, AuthError::Invalid(ref m) if m.contains("not Bearer")),
            "{e}"
        );
        let e = answer(r#""access_token":"abc","expires_in":60"#).unwrap_err();
        assert!(matches!(e, AuthError::Invalid(_)), "{e}");
        let e =
            answer(r#""token_type":"Bearer","access_token":"a b\r\nX-Evil: 1","expires_in":60"#)
                .unwrap_err();
        assert!(
            matches!(e, AuthError::Invalid(ref m) if m.contains("characters")),
            "{e}"
        );
        let long = "a".repeat(MAX_TOKEN_BYTES + 1);
        let e = answer(&format!(
            r#""token_type":"Bearer","access_token":"{long}","expires_in":60"#
        ))
        .unwrap_err();
        assert!(
            matches!(e, AuthError::Invalid(ref m) if m.contains("longer")),
            "{e}"
        );
        assert_eq!(e.cause(), "invalid_answer");
    }

    struct Panicking;

    impl TokenSource for Panicking {
        fn fetch(&self) -> TokenFuture<'_> {
            Box::pin(async move { panic!("a parser bug") })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_token_source_is_contained_and_backed_off() {
        let provider = TokenProvider::with_grace(Box::new(Panicking), Duration::from_secs(10));
        let e = provider.token().await.unwrap_err();
        assert!(e.to_string().contains("panicked: a parser bug"), "{e}");
        assert_eq!(provider.panics(), 1);
        // Backed off like any failure: the next caller does not re-run it at once.
        assert!(matches!(
            provider.token().await,
            Err(AuthError::BackingOff { .. })
        ));
        assert_eq!(provider.panics(), 1);
        assert!(provider.unusable().is_none(), "within the grace");
        tokio::time::advance(Duration::from_secs(11)).await;
        let why = provider.unusable().expect("past the grace");
        assert!(why.contains("panicked"), "{why}");
    }

    struct Counting {
        calls: Arc<AtomicU32>,
        lifetime: Duration,
        fail: bool,
    }

    impl TokenSource for Counting {
        fn fetch(&self) -> TokenFuture<'_> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.fail {
                    return Err(AuthError::Transient("boom".into()));
                }
                Ok(AccessToken {
                    secret: Secret::new(format!("token-{n}")),
                    expires_at: Instant::now() + self.lifetime,
                    lifetime: self.lifetime,
                })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_refresh_and_refresh_before_expiry() {
        let calls = Arc::new(AtomicU32::new(0));
        let provider = Arc::new(TokenProvider::new(Box::new(Counting {
            calls: calls.clone(),
            lifetime: Duration::from_secs(10),
            fail: false,
        })));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let p = provider.clone();
                tokio::spawn(async move { p.token().await.unwrap() })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().expose(), "token-0");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Within the margin (2 s before expiry) a new token is fetched.
        tokio::time::sleep(Duration::from_millis(8_100)).await;
        assert_eq!(provider.token().await.unwrap().expose(), "token-1");
        provider.invalidate(&Secret::new("token-0")).await;
        assert_eq!(provider.token().await.unwrap().expose(), "token-1");
        provider.invalidate(&Secret::new("token-1")).await;
        assert_eq!(provider.token().await.unwrap().expose(), "token-2");
        assert_eq!(provider.refreshes(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off() {
        let calls = Arc::new(AtomicU32::new(0));
        let provider = TokenProvider::new(Box::new(Counting {
            calls: calls.clone(),
            lifetime: Duration::from_secs(10),
            fail: true,
        }));
        assert!(matches!(
            provider.token().await,
            Err(AuthError::Transient(_))
        ));
        let e = provider.token().await.unwrap_err();
        assert!(e.wait().is_some(), "{e}");
        assert!(e.to_string().contains("boom"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(e.wait().unwrap()).await;
        assert!(matches!(
            provider.token().await,
            Err(AuthError::Transient(_))
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(provider.failures(), 2);
    }
}
