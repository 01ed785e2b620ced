//! Standard Webhooks signing: `webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>`,
//! one signature per key, space-separated, so receivers keep verifying through a rotation.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The keys of one destination, the first the current one. Never printed.
#[derive(Clone)]
pub struct SigningKeys(Vec<aws_lc_rs::hmac::Key>);

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKeys({} keys)", self.0.len())
    }
}

impl SigningKeys {
    /// Parses a secret file's text: one `whsec_<base64>` key per line (blank lines and
    /// `#` comments skipped). The error never quotes a key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some(b64) = line.strip_prefix("whsec_") else {
                return Err(format!(
                    "line {}: a Standard Webhooks key starts with whsec_",
                    n + 1
                ));
            };
            let raw = STANDARD
                .decode(b64)
                .map_err(|_| format!("line {}: the part after whsec_ is not base64", n + 1))?;
            if !(16..=64).contains(&raw.len()) {
                return Err(format!(
                    "line {}: the key is {} bytes; Standard Webhooks keys are 24 to 64 (at least 16)",
                    n + 1,
                    raw.len()
                ));
            }
            keys.push(aws_lc_rs::hmac::Key::new(
                aws_lc_rs::hmac::HMAC_SHA256,
                &raw,
            ));
        }
        if keys.is_empty() {
            return Err("no whsec_ key in it".into());
        }
        Ok(Self(keys))
    }

    /// The `webhook-signature` header value for this message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        self.0
            .iter()
            .map(|key| {
                let mut ctx = aws_lc_rs::hmac::Context::with_key(key);
                ctx.update(id.as_bytes());
                ctx.update(b".");
                ctx.update(timestamp.to_string().as_bytes());
                ctx.update(b".");
                ctx.update(body);
                format!("v1,{}", STANDARD.encode(ctx.sign().as_ref()))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_specs_example() {
        // The example of the Standard Webhooks specification (and its reference libraries'
        // tests): this key, id, timestamp and body give this signature.
        let keys = SigningKeys::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            keys.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn signs_with_every_key_during_a_rotation() {
        let text = "# new\nwhsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\nwhsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0\n";
        let sig = SigningKeys::parse(text).unwrap().sign("id", 1, b"{}");
        assert_eq!(sig.split(' ').count(), 2);
        assert!(sig.split(' ').all(|s| s.starts_with("v1,")));
        for bad in ["", "secret", "whsec_???", "whsec_c2hvcnQ="] {
            let e = SigningKeys::parse(bad).unwrap_err();
            assert!(!e.contains("c2hvcnQ"), "{e}");
        }
    }
}
