//! A string that must never be printed: client secrets and access tokens.

use std::fmt;

/// Every URL in `text` with its userinfo (`user:password@`) replaced by `[redacted]@`: a
/// password in `api.base_url` (a proxy's, say) must not reach logs, errors or
/// `check-config`'s output, wherever the URL is printed.
pub fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | ')' | '"' | '\'') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(i) => {
                out.push_str(REDACTED);
                out.push_str(&authority[i..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

pub const REDACTED: &str = "[redacted]";

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The only way to the value: greppable, so every use can be reviewed.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"[redacted]\"");
        assert_eq!(s.expose(), "hunter2");
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn userinfo_is_redacted_in_every_url_of_a_text() {
        assert_eq!(
            redact_userinfo(
                "error sending request for url (https://bob:hunter2@proxy.example:8443/api/x?y=1)"
            ),
            "error sending request for url (https://[redacted]@proxy.example:8443/api/x?y=1)"
        );
        assert_eq!(
            redact_userinfo("base_url = \"http://u:p@h/api\" and ftp://anon@h2"),
            "base_url = \"http://[redacted]@h/api\" and ftp://[redacted]@h2"
        );
        let plain = "https://api.securitycenter.microsoft.com/api/machineactions?$filter=a@b";
        assert_eq!(redact_userinfo(plain), plain);
        assert_eq!(redact_userinfo("no url here"), "no url here");
    }
}
