//! The simulated identity platform's side: issuing JWT-shaped access tokens, checking what
//! clients prove themselves with (secret, signed certificate assertion, federated token),
//! and the API's audience and role checks.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::time::Instant;

use super::http::{Reply, Request};
use super::routes::aad_error;
use super::{SIM_API_AUDIENCE, SIM_CLIENT_ID, SIM_CLIENT_SECRET, SIM_TENANT, State};

pub(super) fn seed_token(seed: u64) -> u64 {
    fastrand::Rng::with_seed(seed ^ 0x5eed).u64(..)
}

/// Issues a JWT-shaped access token (unsigned: only the simulator checks it) carrying the
/// configured audience and roles, and remembers when it expires.
pub(super) fn issue_token(s: &mut State, app_id: &str) -> (String, Duration) {
    use crate::auth::jwt::b64url;
    let lifetime = s.config.token_lifetime;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let header = json!({"typ": "JWT", "alg": "RS256", "kid": "sim"});
    let mut claims = json!({
        "aud": s.config.token_audience,
        "iss": format!("https://sts.windows.net/{SIM_TENANT}/"),
        "tid": SIM_TENANT,
        "appid": app_id,
        "roles": s.config.token_roles,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime.as_secs().max(1),
        "uti": format!("{:016x}", s.rng.u64(..)),
    });
    // A token grown by claims (an app in hundreds of groups, a gateway adding its own), so
    // that it is still one the API takes when the front end does.
    if let Some(super::Hostile::LongToken(bytes)) = &s.config.hostile_token {
        claims["xms_pad"] = json!("x".repeat(bytes.saturating_mul(3) / 4));
    }
    let token = format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(&s.rng.u64(..).to_le_bytes())
    );
    s.tokens.insert(token.clone(), Instant::now() + lifetime);
    s.issued.push(token.clone());
    s.stats.tokens_issued += 1;
    (token, lifetime)
}

/// Why the API refuses a (valid, unexpired) token with 403, if it does.
pub(super) fn token_forbidden(token: &str) -> Option<String> {
    let decoded = crate::auth::jwt::decode(token).ok()?;
    let aud = decoded.claims["aud"].as_str().unwrap_or("");
    if aud != SIM_API_AUDIENCE {
        return Some(format!("The token's audience '{aud}' is not this API"));
    }
    let roles: Vec<&str> = decoded.claims["roles"]
        .as_array()
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if !roles
        .iter()
        .any(|r| *r == "Machine.Read.All" || *r == "Machine.ReadWrite.All")
    {
        // The service's current wording, with the roles the app has.
        return Some(format!(
            "Missing application roles. API required roles: Machine.Read.All,Machine.ReadWrite.All, application roles: {}.",
            roles.join(",")
        ));
    }
    None
}

/// Checks the client's proof: a secret, a certificate's signed assertion, or the federated
/// token. `None` when it is good.
pub(super) fn check_client_credential(
    s: &mut State,
    form: &HashMap<String, String>,
    tenant: &str,
    req: &Request,
) -> Option<Reply> {
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let assertion = field("client_assertion");
    if assertion.is_empty() {
        if field("client_secret") == SIM_CLIENT_SECRET {
            return None;
        }
        return Some(aad_error(
            401,
            "invalid_client",
            &format!(
                "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{SIM_CLIENT_ID}'."
            ),
        ));
    }
    if field("client_assertion_type") != crate::auth::certificate::ASSERTION_TYPE {
        return Some(aad_error(
            400,
            "invalid_request",
            "AADSTS50027: Invalid client_assertion_type.",
        ));
    }
    if s.config.federated && assertion == s.federated_token {
        return None;
    }
    if s.config.federated && assertion.starts_with("federated.") {
        return Some(aad_error(
            400,
            "invalid_client",
            "AADSTS700024: Client assertion is not within its valid time range (the federated token was rotated).",
        ));
    }
    let refuse = |code: &str| Some(aad_error(401, "invalid_client", code));
    let Some(cert) = s.config.certificate.clone() else {
        return refuse(
            "AADSTS700027: Client assertion contains an invalid signature. [Reason - No certificate is registered on the app.]",
        );
    };
    let Ok(jwt) = crate::auth::jwt::decode(assertion) else {
        return refuse("AADSTS50027: JWT token is invalid or malformed.");
    };
    let thumbprint = crate::auth::jwt::b64url(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &cert.certificate_der).as_ref(),
    );
    if jwt.header["typ"] != "JWT" || jwt.header["x5t#S256"].as_str() != Some(thumbprint.as_str()) {
        return refuse(
            "AADSTS700027: Client assertion contains an invalid signature. [Reason - The key was not found.]",
        );
    }
    use aws_lc_rs::signature::{
        RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256, UnparsedPublicKey,
    };
    let algorithm: &'static dyn aws_lc_rs::signature::VerificationAlgorithm =
        match jwt.header["alg"].as_str() {
            Some("PS256") => &RSA_PSS_2048_8192_SHA256,
            Some("RS256") => &RSA_PKCS1_2048_8192_SHA256,
            _ => {
                return refuse(
                    "AADSTS5002730: Invalid JWT token. Unsupported key for the signing algorithm.",
                );
            }
        };
    if UnparsedPublicKey::new(algorithm, &cert.public_key)
        .verify(jwt.signing_input.as_bytes(), &jwt.signature)
        .is_err()
    {
        return refuse(
            "AADSTS700027: Client assertion contains an invalid signature. [Reason - The provided signature value did not match the expected signature value.]",
        );
    }
    if cert.expired {
        return refuse(
            "AADSTS700027: Client assertion contains an invalid signature. [Reason - The key used is expired.]",
        );
    }
    let c = &jwt.claims;
    let host = req.header("host").unwrap_or("");
    let audience = format!("http://{host}/{tenant}/oauth2/v2.0/token");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let number = |k: &str| c[k].as_u64().unwrap_or(0);
    if c["aud"].as_str() != Some(audience.as_str()) {
        return refuse(&format!(
            "AADSTS50027: JWT token is invalid or malformed. [Reason - audience {} is not {audience}]",
            c["aud"]
        ));
    }
    if c["iss"].as_str() != Some(SIM_CLIENT_ID) || c["sub"].as_str() != Some(SIM_CLIENT_ID) {
        return refuse(
            "AADSTS700021: Client assertion application identifier doesn't match 'client_id' parameter.",
        );
    }
    // A minute of clock skew, as the service allows.
    if number("nbf") > now + 60
        || number("exp") + 60 < now
        || number("exp") > now + 3600
        || number("exp") <= number("nbf")
    {
        return refuse("AADSTS700024: Client assertion is not within its valid time range.");
    }
    let Some(jti) = c["jti"].as_str().filter(|j| !j.is_empty()) else {
        return refuse("AADSTS50027: JWT token is invalid or malformed. [Reason - no jti]");
    };
    if !s.seen_assertion_ids.insert(jti.to_string()) {
        return refuse(
            "AADSTS50027: JWT token is invalid or malformed. [Reason - the assertion was replayed]",
        );
    }
    None
}
