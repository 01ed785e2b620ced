//! The little JWT handling we need: compact serialization of a signed client assertion, and
//! reading (never trusting) the claims of a token for diagnostics.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn b64url_decode(text: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|e| format!("bad base64url: {e}"))
}

/// `header.payload` ready to sign.
pub fn signing_input(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// The three parts of a compact JWS, decoded (header and claims as JSON). No verification.
pub struct Decoded {
    pub header: serde_json::Value,
    pub claims: serde_json::Value,
    pub signing_input: String,
    pub signature: Vec<u8>,
}

pub fn decode(token: &str) -> Result<Decoded, String> {
    let mut parts = token.trim().split('.');
    let (Some(h), Some(c), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT (expected three dot-separated parts)".into());
    };
    let json = |part: &str, what: &str| -> Result<serde_json::Value, String> {
        let bytes = b64url_decode(part).map_err(|e| format!("{what}: {e}"))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{what} is not JSON: {e}"))
    };
    Ok(Decoded {
        header: json(h, "header")?,
        claims: json(c, "claims")?,
        signing_input: format!("{h}.{c}"),
        signature: b64url_decode(sig)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_header_and_claims() {
        let input = signing_input(
            &serde_json::json!({"alg": "PS256"}),
            &serde_json::json!({"aud": "x"}),
        );
        let token = format!("{input}.{}", b64url(b"sig"));
        let d = decode(&token).unwrap();
        assert_eq!(d.header["alg"], "PS256");
        assert_eq!(d.claims["aud"], "x");
        assert_eq!(d.signature, b"sig");
        assert_eq!(d.signing_input, input);
        assert!(decode("a.b").is_err());
        assert!(decode("!!.??.x").is_err());
    }
}
