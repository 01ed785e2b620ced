//! Certificate credentials: a client assertion (a JWT signed with the app's RSA key) instead of
//! a secret, the method Microsoft recommends for apps. Signing uses aws-lc-rs, the crypto
//! provider rustls already brings; no OpenSSL.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RSA_PSS_SHA256, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;

use super::jwt::{b64url, signing_input};
use super::{AuthError, TokenFuture, TokenSource, post_token_form};
use crate::config::SigningAlgorithm;
use crate::domain::{ActionId, format_time};

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long an assertion is valid; Entra ID accepts up to 10 minutes.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

/// A certificate and its key, read from PEM.
pub struct Credential {
    pub certificate_der: Vec<u8>,
    pub key: RsaKeyPair,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
}

impl Credential {
    /// Reads the certificate (first one in the file) and the RSA key (from `key_file`, or the
    /// certificate file when it holds both). The key file must not be readable by others.
    pub fn load(cert_file: &Path, key_file: Option<&Path>) -> Result<Self, String> {
        let cert_pem = std::fs::read(cert_file).map_err(|e| {
            format!(
                "auth.certificate_file: cannot read {}: {e}",
                cert_file.display()
            )
        })?;
        let certificate_der = CertificateDer::pem_slice_iter(&cert_pem)
            .next()
            .ok_or_else(|| {
                format!(
                    "auth.certificate_file: {} holds no PEM certificate",
                    cert_file.display()
                )
            })?
            .map_err(|e| format!("auth.certificate_file: {}: {e}", cert_file.display()))?
            .to_vec();
        let (key_path, key_name) = match key_file {
            Some(k) => (k, "auth.private_key_file"),
            None => (cert_file, "auth.certificate_file"),
        };
        super::files::check_private(key_path, key_name)?;
        let key_pem = std::fs::read(key_path)
            .map_err(|e| format!("{key_name}: cannot read {}: {e}", key_path.display()))?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            format!(
                "{key_name}: {} holds no usable PEM private key ({e})",
                key_path.display()
            )
        })?;
        let key = match &key_der {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            PrivateKeyDer::Sec1(_) => {
                return Err(format!(
                    "{key_name}: {} holds an EC key; client assertions need an RSA key",
                    key_path.display()
                ));
            }
            _ => return Err(format!("{key_name}: unsupported key type")),
        }
        .map_err(|e| {
            format!(
                "{key_name}: {} is not a usable RSA key: {e}",
                key_path.display()
            )
        })?;
        let (not_before, not_after) = validity(&certificate_der).unwrap_or((None, None));
        Ok(Self {
            certificate_der,
            key,
            not_before,
            not_after,
        })
    }

    /// base64url SHA-256 of the DER certificate: the `x5t#S256` header.
    pub fn thumbprint_sha256(&self) -> String {
        b64url(digest::digest(&digest::SHA256, &self.certificate_der).as_ref())
    }

    /// base64url SHA-1 of the DER certificate: the `x5t` header older setups expect.
    pub fn thumbprint_sha1(&self) -> String {
        b64url(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &self.certificate_der).as_ref())
    }

    /// Refuses a certificate outside its validity period, saying when.
    pub fn check_valid(&self, now: SystemTime) -> Result<(), String> {
        if let Some(after) = self.not_after
            && now > after
        {
            return Err(format!(
                "auth.certificate_file: the certificate expired on {}; create a new one and upload it to the app registration",
                format_time(after)
            ));
        }
        if let Some(before) = self.not_before
            && now < before
        {
            return Err(format!(
                "auth.certificate_file: the certificate is not valid before {}",
                format_time(before)
            ));
        }
        Ok(())
    }

    /// A signed client assertion for `audience` (the token endpoint URL).
    pub fn assertion(
        &self,
        client_id: &str,
        audience: &str,
        algorithm: SigningAlgorithm,
        now: SystemTime,
    ) -> Result<String, String> {
        let mut header = json!({
            "typ": "JWT",
            "x5t#S256": self.thumbprint_sha256(),
        });
        let padding: &'static dyn aws_lc_rs::signature::RsaEncoding = match algorithm {
            SigningAlgorithm::PS256 => {
                header["alg"] = json!("PS256");
                &RSA_PSS_SHA256
            }
            SigningAlgorithm::RS256 => {
                header["alg"] = json!("RS256");
                header["x5t"] = json!(self.thumbprint_sha1());
                &RSA_PKCS1_SHA256
            }
        };
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut rng = fastrand::Rng::new();
        let claims = json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": ActionId::random(&mut rng).as_str(),
            "nbf": secs,
            "iat": secs,
            "exp": secs.saturating_add(ASSERTION_LIFETIME.as_secs()),
        });
        let input = signing_input(&header, &claims);
        let mut signature = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                padding,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "signing the client assertion failed".to_string())?;
        Ok(format!("{input}.{}", b64url(&signature)))
    }
}

/// The certificate's validity period, read from its DER (Certificate -> TBSCertificate ->
/// Validity). A few lines of DER walking spare an X.509 parser.
pub fn validity(der: &[u8]) -> Option<(Option<SystemTime>, Option<SystemTime>)> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    // [0] version is optional.
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..3 {
        // serialNumber, signature, issuer
        let (_, _, after) = tlv(rest)?;
        rest = after;
    }
    let (_, validity, _) = tlv(rest)?;
    let (t1, v1, after) = tlv(validity)?;
    let (t2, v2, _) = tlv(after)?;
    Some((asn1_time(t1, v1), asn1_time(t2, v2)))
}

fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            // At most 4 length bytes: 32 bits, which fit.
            len = (len << 8) | *input.get(i.checked_add(2)?)? as usize;
        }
        (len, n.checked_add(2)?)
    };
    let end = header.checked_add(len)?;
    Some((tag, input.get(header..end)?, input.get(end..)?))
}

fn asn1_time(tag: u8, value: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(value).ok()?.trim_end_matches('Z');
    let full = match tag {
        // UTCTime: YYMMDDHHMMSS; years 50-99 are 19xx.
        0x17 if text.len() == 12 => {
            let yy: u32 = text[..2].parse().ok()?;
            format!("{}{text}", if yy >= 50 { "19" } else { "20" })
        }
        0x18 if text.len() == 14 => text.to_string(),
        _ => return None,
    };
    let rfc = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &full[0..4],
        &full[4..6],
        &full[6..8],
        &full[8..10],
        &full[10..12],
        &full[12..14]
    );
    humantime::parse_rfc3339(&rfc).ok()
}

/// Client-credentials grant with a certificate's client assertion.
pub struct CertificateSource {
    pub http: crate::outbound::Outbound,
    pub token_url: String,
    pub client_id: String,
    pub scope: String,
    pub certificate_file: PathBuf,
    pub private_key_file: Option<PathBuf>,
    pub algorithm: SigningAlgorithm,
}

impl TokenSource for CertificateSource {
    fn fetch(&self) -> TokenFuture<'_> {
        Box::pin(async move {
            // Read at every request: a renewed certificate is picked up without a restart.
            let credential =
                Credential::load(&self.certificate_file, self.private_key_file.as_deref())
                    .map_err(AuthError::Local)?;
            let now = SystemTime::now();
            credential.check_valid(now).map_err(AuthError::Local)?;
            let assertion = credential
                .assertion(&self.client_id, &self.token_url, self.algorithm, now)
                .map_err(AuthError::Local)?;
            let form = [
                ("grant_type", "client_credentials"),
                ("client_id", self.client_id.as_str()),
                ("scope", self.scope.as_str()),
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", assertion.as_str()),
            ];
            post_token_form(&self.http, &self.token_url, &form).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_validity_from_der() {
        assert_eq!(
            asn1_time(0x17, b"491231235959Z")
                .map(format_time)
                .as_deref(),
            Some("2049-12-31T23:59:59.000Z")
        );
        assert_eq!(
            asn1_time(0x17, b"700101000001Z")
                .map(format_time)
                .as_deref(),
            Some("1970-01-01T00:00:01.000Z")
        );
        assert_eq!(
            asn1_time(0x18, b"20991231235959Z")
                .map(format_time)
                .as_deref(),
            Some("2099-12-31T23:59:59.000Z")
        );
        assert_eq!(asn1_time(0x18, b"garbage"), None);
        assert!(validity(&[0x30, 0x82]).is_none());
    }
}
