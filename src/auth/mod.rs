//! OAuth tokens: a `TokenSource` fetches one, `TokenProvider` caches it, refreshes it before it
//! expires, lets concurrent callers share one refresh, and backs off when the identity
//! platform fails.
//!
//! Nothing here logs or formats a secret or a token: they live in `Secret`.

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
}

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
    http: reqwest::Client,
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
    http: &reqwest::Client,
    url: &str,
    form: &[(&str, &str)],
) -> Result<AccessToken, AuthError> {
    let response = http
        .post(url)
        .form(form)
        .send()
        .await
        .map_err(|e| AuthError::Transient(crate::mde::error_chain(&e)))?;
    let status = response.status();
    let body = response.text().await.map_err(|e| {
        AuthError::Transient(format!("answer cut off: {}", crate::mde::error_chain(&e)))
    })?;
    parse_token_answer(status.as_u16(), &body)
}

/// Builds the token source the settings ask for. Fails with the key to fix when a file or
/// variable it needs is missing.
pub fn build_source(
    settings: &crate::config::Settings,
    http: reqwest::Client,
) -> Result<Box<dyn TokenSource>, crate::config::Problem> {
    use crate::config::{AuthMethod, Problem};
    let a = &settings.auth;
    let method = settings.auth_method()?;
    let tenant = a
        .tenant_id
        .as_deref()
        .unwrap_or_default()
        .trim()
        .to_string();
    let client_id = a
        .client_id
        .as_deref()
        .unwrap_or_default()
        .trim()
        .to_string();
    let token_url = token_url(&settings.authority(), &tenant);
    let scope = settings.scope();
    Ok(match method {
        AuthMethod::ClientSecret => {
            let secret = match (
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
            };
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

#[derive(Deserialize)]
#[serde(untagged)]
enum Lifetime {
    Number(u64),
    Text(String),
}

fn parse_token_answer(status: u16, body: &str) -> Result<AccessToken, AuthError> {
    #[derive(Deserialize)]
    struct Granted {
        access_token: String,
        #[serde(default)]
        expires_in: Option<Lifetime>,
        /// Managed identity answers carry the expiry as epoch seconds (sometimes only that).
        #[serde(default)]
        expires_on: Option<Lifetime>,
        #[serde(default)]
        token_type: Option<String>,
    }
    #[derive(Deserialize)]
    struct Refusal {
        error: String,
        #[serde(default)]
        error_description: Option<String>,
    }
    if (200..300).contains(&status) {
        let granted: Granted = serde_json::from_str(body).map_err(|e| {
            AuthError::Transient(format!(
                "unreadable token answer ({} bytes): {e}",
                body.len()
            ))
        })?;
        if let Some(t) = &granted.token_type
            && !t.eq_ignore_ascii_case("bearer")
        {
            return Err(AuthError::Transient(format!("unexpected token_type '{t}'")));
        }
        let number = |l: Lifetime, what: &str| match l {
            Lifetime::Number(n) => Ok(n),
            // The v1 endpoint and managed identity send numbers as strings.
            Lifetime::Text(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| AuthError::Transient(format!("unreadable {what} '{s}'"))),
        };
        let secs = match (granted.expires_in, granted.expires_on) {
            (Some(l), _) => number(l, "expires_in")?,
            (None, Some(on)) => {
                let at = number(on, "expires_on")?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                at.saturating_sub(now)
            }
            (None, None) => {
                return Err(AuthError::Transient(
                    "token answer has neither expires_in nor expires_on".into(),
                ));
            }
        };
        if granted.access_token.is_empty() {
            return Err(AuthError::Transient("empty access_token".into()));
        }
        let lifetime = Duration::from_secs(secs.max(1));
        return Ok(AccessToken {
            secret: Secret::new(granted.access_token),
            expires_at: Instant::now() + lifetime,
            lifetime,
        });
    }
    let refusal = serde_json::from_str::<Refusal>(body).ok();
    match (status, refusal) {
        (400 | 401 | 403, Some(r)) => Err(AuthError::Refused {
            status,
            error: r.error,
            // The AADSTS message is the useful part; it names no secret.
            description: first_line(r.error_description.as_deref().unwrap_or("")),
        }),
        (_, r) => Err(AuthError::Transient(format!(
            "HTTP {status} from the token endpoint{}",
            r.map(|r| format!(": {}", r.error)).unwrap_or_else(|| {
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

fn first_line(s: &str) -> String {
    // AAD descriptions end with "Trace ID: ... Correlation ID: ... Timestamp: ..." lines.
    s.lines().next().unwrap_or("").trim().to_string()
}

/// Caches one token for the process.
pub struct TokenProvider {
    source: Box<dyn TokenSource>,
    state: Mutex<State>,
    refreshes: AtomicU64,
    failures: AtomicU64,
    /// Fresh tokens the API refused (401) in a row, until it accepts one.
    rejections: std::sync::atomic::AtomicU32,
}

#[derive(Default)]
struct State {
    token: Option<AccessToken>,
    consecutive_failures: u32,
    retry_at: Option<(Instant, String)>,
    /// The identity platform's last refusal, until a token is granted again.
    refused: Option<String>,
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
        Self {
            source,
            state: Mutex::new(State::default()),
            refreshes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            rejections: std::sync::atomic::AtomicU32::new(0),
        }
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
        }
        state.retry_at = Some((
            Instant::now() + delay,
            format!("MDE refused a freshly issued token (401): {detail}"),
        ));
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
            && now + refresh_margin(t.lifetime) < t.expires_at
        {
            return Ok(t.secret.clone());
        }
        if let Some((at, last)) = &state.retry_at
            && *at > now
        {
            return Err(AuthError::BackingOff {
                wait: *at - now,
                last: last.clone(),
            });
        }
        match self.source.fetch().await {
            Ok(token) => {
                self.refreshes.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    lifetime_s = token.lifetime.as_secs(),
                    "obtained an access token"
                );
                let secret = token.secret.clone();
                state.token = Some(token);
                state.consecutive_failures = 0;
                state.retry_at = None;
                state.refused = None;
                Ok(secret)
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let delay = next_delay(
                    state.consecutive_failures,
                    &failure_backoff(),
                    fastrand::f64(),
                );
                state.consecutive_failures = state.consecutive_failures.saturating_add(1);
                state.retry_at = Some((Instant::now() + delay, e.to_string()));
                if matches!(e, AuthError::Refused { .. } | AuthError::Local(_)) {
                    state.refused = Some(e.to_string());
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

    /// Drops the cached token if it is the one the API just refused, so the next `token()`
    /// fetches a new one (and a refusal of an older token does not discard a newer one).
    pub async fn invalidate(&self, refused: &Secret) {
        let mut state = self.state.lock().await;
        if state.token.as_ref().is_some_and(|t| &t.secret == refused) {
            state.token = None;
            state.retry_at = None;
        }
    }

    /// Why no token can be had, when the identity platform refused the credentials (or the
    /// secret cannot be read) and no valid token is cached. A refresh in progress counts as
    /// obtainable.
    pub fn refusal(&self) -> Option<String> {
        let state = self.state.try_lock().ok()?;
        let valid = state
            .token
            .as_ref()
            .is_some_and(|t| Instant::now() < t.expires_at);
        if valid { None } else { state.refused.clone() }
    }

    /// Successful token requests so far.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// Failed token requests so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 5).min(MAX_REFRESH_MARGIN)
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let t = parse_token_answer(200, r#"{"expires_in":"60","access_token":"a"}"#).unwrap();
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
