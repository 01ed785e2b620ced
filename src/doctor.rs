//! `mde-actiond doctor`: for the first hour of a deployment. Checks the configuration, the
//! credential, a token and its claims, and one cheap API call, and says in plain words what
//! to fix. Exit status 0 only when everything `run` needs works.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use crate::auth::{AuthError, build_source, jwt};
use crate::config::{AuthMethod, Settings};
use crate::domain::format_time;
use crate::mde::{MdeClient, http_client};

/// The WindowsDefenderATP application, the API's other name in a token's `aud`.
const MDE_APP_ID: &str = "fc780465-2017-40d4-a0c5-307022471b92";
const WARN_EXPIRY: Duration = Duration::from_secs(30 * 86_400);

struct Checks {
    failed: bool,
}

impl Checks {
    fn ok(&mut self, what: &str, detail: &str) {
        println!("[ok]   {what}: {detail}");
    }
    fn warn(&mut self, what: &str, detail: &str) {
        println!("[warn] {what}: {detail}");
    }
    fn fail(&mut self, what: &str, detail: &str) {
        self.failed = true;
        println!("[FAIL] {what}: {detail}");
    }
}

pub async fn run(settings: &Settings) -> ExitCode {
    let mut c = Checks { failed: false };
    let mut problems = settings.problems();
    problems.extend(settings.credential_problems());
    if !problems.is_empty() {
        for p in &problems {
            c.fail("configuration", &p.to_string());
        }
        return ExitCode::from(1);
    }
    let method = match settings.auth_method() {
        Ok(m) => m,
        Err(p) => {
            c.fail("configuration", &p.to_string());
            return ExitCode::from(1);
        }
    };
    c.ok(
        "configuration",
        &format!(
            "method {}, API {}, identity platform {}, tenant {}, scope {}",
            method.as_str(),
            crate::secret::redact_userinfo(&settings.api_base_url()),
            crate::secret::redact_userinfo(&settings.authority()),
            settings.auth.tenant_id.as_deref().unwrap_or("-"),
            settings.scope()
        ),
    );
    check_credential(&mut c, settings, method);
    if c.failed {
        return ExitCode::from(1);
    }

    let http = match http_client(settings.api.timeout, settings.api.connect_timeout) {
        Ok(h) => h,
        Err(e) => {
            c.fail("http", &e.to_string());
            return ExitCode::from(1);
        }
    };
    let source = match build_source(settings, http.clone()) {
        Ok(s) => s,
        Err(p) => {
            c.fail("credential", &p.to_string());
            return ExitCode::from(1);
        }
    };
    let token = match source.fetch().await {
        Ok(t) => {
            c.ok(
                "token",
                &format!("obtained, valid for {}s", t.lifetime.as_secs()),
            );
            t
        }
        Err(e) => {
            c.fail("token", &explain_auth_error(&e, method));
            return ExitCode::from(1);
        }
    };
    check_claims(&mut c, settings, token.secret.expose());

    let client = MdeClient::new(http, &settings.api_base_url());
    match client.probe(&token.secret).await {
        Ok(()) => c.ok("API", "GET /api/machineactions?$top=1 answered 200"),
        Err(e) => c.fail("API", &format!("{e}; {}", api_advice(&e))),
    }
    if c.failed {
        println!("\nSome checks failed; `run` will not work until they pass.");
        ExitCode::from(1)
    } else {
        println!("\nEverything `run` needs works.");
        ExitCode::SUCCESS
    }
}

/// What to do about a failed probe of the API.
fn api_advice(e: &crate::mde::MdeError) -> String {
    match (e, e.http_status()) {
        (crate::mde::MdeError::Forbidden(detail), _) => crate::mde::explain_refusal(detail),
        (_, Some(401)) => "the API did not accept the token: check api.cloud / api.base_url against auth.authority and auth.scope (a token for another cloud or resource is refused)".into(),
        (_, Some(404)) => "api.base_url does not look like the MDE API (check its path)".into(),
        _ => "the API could not be reached; check api.base_url, proxies and firewalls".to_string(),
    }
}

fn check_credential(c: &mut Checks, settings: &Settings, method: AuthMethod) {
    let a = &settings.auth;
    match method {
        AuthMethod::ClientSecret => check_client_secret(c, a),
        AuthMethod::Certificate => check_certificate(c, a),
        AuthMethod::WorkloadIdentity => check_federated_token(c, a),
        AuthMethod::ManagedIdentity => c.ok(
            "credential",
            &format!(
                "managed identity via {} ({})",
                a.managed_identity_endpoint
                    .as_deref()
                    .unwrap_or(crate::config::IMDS_ENDPOINT),
                a.managed_identity_client_id
                    .as_deref()
                    .map(|id| format!("user-assigned {id}"))
                    .unwrap_or_else(|| "system-assigned".into())
            ),
        ),
    }
}

fn check_client_secret(c: &mut Checks, a: &crate::config::AuthSettings) {
    let file = a.client_secret_file.clone().or_else(|| {
        let name = a.client_secret_credential.as_ref()?;
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
        Some(std::path::PathBuf::from(dir).join(name))
    });
    match file {
        Some(path) => match crate::auth::files::read_private(&path, "client secret") {
            Ok(_) => c.ok("credential", &format!("client secret in {} (private)", path.display())),
            Err(e) => c.fail("credential", &e),
        },
        None if a.client_secret_credential.is_some() => c.fail(
            "credential",
            "auth.client_secret_credential is set but $CREDENTIALS_DIRECTORY is not (run under systemd with LoadCredential=)",
        ),
        None => c.warn(
            "credential",
            "client secret inline in the configuration; prefer auth.client_secret_file or a systemd credential",
        ),
    }
}

fn check_certificate(c: &mut Checks, a: &crate::config::AuthSettings) {
    let Some(cert) = &a.certificate_file else {
        return c.fail("credential", "auth.certificate_file is not set");
    };
    match crate::auth::certificate::Credential::load(cert, a.private_key_file.as_deref()) {
        Ok(cred) => {
            let now = SystemTime::now();
            if let Err(e) = cred.check_valid(now) {
                return c.fail("credential", &e);
            }
            let expiry = cred
                .not_after
                .map(format_time)
                .unwrap_or_else(|| "unknown".into());
            c.ok(
                "credential",
                &format!(
                    "certificate {} (x5t#S256 {}), valid until {expiry}, signing with {:?}",
                    cert.display(),
                    cred.thumbprint_sha256(),
                    a.signing_algorithm
                ),
            );
            if cred
                .not_after
                .is_some_and(|t| t.duration_since(now).unwrap_or_default() < WARN_EXPIRY)
            {
                c.warn(
                    "credential",
                    &format!("the certificate expires on {expiry}; renew it soon"),
                );
            }
        }
        Err(e) => c.fail("credential", &e),
    }
}

fn check_federated_token(c: &mut Checks, a: &crate::config::AuthSettings) {
    let Some(path) = &a.federated_token_file else {
        return c.fail(
            "credential",
            "no federated token file (AZURE_FEDERATED_TOKEN_FILE)",
        );
    };
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => {
            let detail = match jwt::decode(t.trim()) {
                Ok(d) => format!(
                    "federated token {} (issuer {}, subject {})",
                    path.display(),
                    d.claims["iss"].as_str().unwrap_or("?"),
                    d.claims["sub"].as_str().unwrap_or("?")
                ),
                Err(_) => format!("federated token {}", path.display()),
            };
            c.ok("credential", &detail);
        }
        Ok(_) => c.fail("credential", &format!("{} is empty", path.display())),
        Err(e) => c.fail(
            "credential",
            &format!("cannot read {}: {e}", path.display()),
        ),
    }
}

/// Reads the token's claims (without verifying them: that is the API's job) and checks the
/// audience and the roles.
fn check_claims(c: &mut Checks, settings: &Settings, token: &str) {
    let Ok(decoded) = jwt::decode(token) else {
        return c.warn(
            "token claims",
            "the token is not a JWT; cannot check its roles",
        );
    };
    let claims = &decoded.claims;
    let aud = claims["aud"].as_str().unwrap_or("");
    let api = settings.api_base_url();
    let api_host = api.trim_end_matches('/');
    let scope_resource = settings.scope().trim_end_matches("/.default").to_string();
    if aud == api_host || aud == scope_resource || aud == MDE_APP_ID {
        c.ok("token audience", aud);
    } else {
        c.fail(
            "token audience",
            &format!("'{aud}' is not the MDE API ({api_host}); set auth.scope to {api_host}/.default or fix api.cloud"),
        );
    }
    let roles: Vec<&str> = claims["roles"]
        .as_array()
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if roles
        .iter()
        .any(|r| *r == "Machine.Read.All" || *r == "Machine.ReadWrite.All")
    {
        c.ok("token roles", &roles.join(", "));
    } else {
        c.fail(
            "token roles",
            &format!(
                "no Machine.Read.All or Machine.ReadWrite.All among [{}]: add the application permission under 'APIs my organization uses > WindowsDefenderATP' and grant admin consent",
                roles.join(", ")
            ),
        );
    }
}

/// The identity platform's error in plain words, with what to do.
pub fn explain_auth_error(e: &AuthError, method: AuthMethod) -> String {
    let text = e.to_string();
    let code = text
        .split("AADSTS")
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .unwrap_or_default();
    let advice = match code.as_str() {
        "7000215" => {
            "wrong client secret: use the secret's Value (not its Secret ID), or create a new one"
        }
        "7000222" => "the client secret has expired: create a new one in the app registration",
        "700016" => {
            "no application with this client id in the tenant: check auth.client_id, auth.tenant_id and api.cloud"
        }
        "90002" | "90072" => {
            "the tenant was not found: check auth.tenant_id and api.cloud (commercial vs GCC High/DoD)"
        }
        "700027" => {
            "the certificate was not accepted: upload it to the app registration (Certificates & secrets), or it has expired"
        }
        "700024" => {
            "the assertion is outside its valid time: check the system clock (workload identity: the federated token expired)"
        }
        "700021" => "the assertion names another application: check auth.client_id",
        "70021" | "700211" | "700212" | "700213" => {
            "no matching federated identity credential: add one for this service account's issuer and subject"
        }
        "65001" | "500011" => {
            "consent is missing or WindowsDefenderATP is not available in this tenant: grant admin consent"
        }
        "1002012" | "70011" => "invalid scope: check auth.scope and api.cloud",
        _ => match (e, method) {
            (AuthError::Local(_), _) => "fix the local file or setting named above",
            (AuthError::Transient(_), AuthMethod::ManagedIdentity) => {
                "the managed identity endpoint did not answer: is this running on Azure with an identity assigned?"
            }
            (AuthError::Transient(_), _) => {
                "the identity platform could not be reached; check network, proxy and auth.authority"
            }
            (AuthError::Redirected { .. }, _) => {
                "something between here and the identity platform redirects token requests: check auth.authority and any proxy (redirects are never followed, so the credential stays here)"
            }
            (AuthError::Invalid(_), _) => {
                "the answer is not a token this daemon can use: is auth.authority really the identity platform?"
            }
            _ => "see the identity platform's message",
        },
    };
    format!("{text}\n       -> {advice}")
}
