//! Every HTTP request the daemon makes leaves through here: the MDE API, the token endpoint,
//! managed and workload identity, the notification senders and `healthcheck`.
//!
//! One policy, built once ([`Outbound::new`]): no redirect is followed (a 3xx is handed back
//! as an answer, with only its target's origin readable), connect and total timeouts, TLS by
//! rustls. An [`Answer`] hides the response it wraps: its body can only be read through
//! [`Answer::read`] with a [`Cap`], so no caller can read an unbounded body by mistake
//! (`clippy.toml` forbids reqwest's own readers everywhere else).
// Network input is parsed here: no unwrap, no unchecked arithmetic, no indexing that can
// panic (tests may).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::arithmetic_side_effects,
        clippy::indexing_slicing
    )
)]

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

const USER_AGENT: &str = concat!("mde-actiond/", env!("CARGO_PKG_VERSION"));

/// How many bytes of an answer a caller takes, and what the answer is called in the error
/// that refuses a longer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub bytes: usize,
    pub what: &'static str,
}

impl Cap {
    /// A token answer: a JWT of a few KiB and four short fields.
    pub const TOKEN: Cap = Cap {
        bytes: 64 << 10,
        what: "token answer",
    };
    /// One MachineAction: a few KiB, more with many live response commands.
    pub const ACTION: Cap = Cap {
        bytes: 1 << 20,
        what: "single action",
    };
    /// An error answer: read as far as it explains itself.
    pub const ERROR: Cap = Cap {
        bytes: 64 << 10,
        what: "error answer",
    };
    /// What a receiver answers a delivery: read to say why it failed, the rest discarded.
    pub const RECEIVER: Cap = Cap {
        bytes: 1 << 10,
        what: "receiver's answer",
    };
    /// The longest list page: 10,000 entries (`poll.sweep_page_size`'s maximum).
    pub const LONGEST_PAGE: Cap = Cap::page(10_000);

    /// A list answer of up to `entries` actions. Real entries are 1-2 KiB; 8 KiB each leaves
    /// room for long live response command lists without letting an endless answer in.
    pub const fn page(entries: u32) -> Cap {
        let entries = if entries == 0 { 1 } else { entries } as usize;
        Cap {
            bytes: (64usize << 10).saturating_add(entries.saturating_mul(PAGE_ENTRY_BYTES)),
            what: "list page",
        }
    }
}

/// Room per listed action in [`Cap::page`].
pub const PAGE_ENTRY_BYTES: usize = 8 << 10;

#[derive(Debug, thiserror::Error)]
#[error("cannot build HTTP client: {0}")]
pub struct BuildError(String);

/// Why a request got no answer at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendFailure {
    TimedOut,
    Connect,
    Other,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", match .kind { SendFailure::TimedOut => "timed out", SendFailure::Connect => "cannot connect", SendFailure::Other => "connection failed" })]
pub struct SendError {
    pub kind: SendFailure,
    /// The cause chain, with any userinfo of the URL redacted.
    pub message: String,
    /// The deepest cause alone, which does not name the URL (some URLs are credentials).
    pub root_cause: String,
}

impl SendError {
    fn from_reqwest(e: &reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            SendFailure::TimedOut
        } else if e.is_connect() {
            SendFailure::Connect
        } else {
            SendFailure::Other
        };
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        SendError {
            kind,
            message: error_chain(e),
            root_cause: crate::secret::redact_userinfo(&cause.to_string()),
        }
    }
}

/// Why a body was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("{what} longer than {} (HTTP {status}); refused unread", size(*.cap))]
    TooLong {
        what: &'static str,
        cap: usize,
        status: u16,
    },
    #[error("answer cut off (HTTP {status}): {message}")]
    Cut { status: u16, message: String },
}

fn size(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// A 3xx that was not followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub status: u16,
    /// `scheme://host[:port]` of the `Location`, or a word when there is none: never its path
    /// or query, which may carry what the other side wants to collect.
    pub origin: String,
}

/// The outbound HTTP client of the process (cheap to clone: one connection pool).
#[derive(Clone, Debug)]
pub struct Outbound {
    client: reqwest::Client,
}

/// Settings of one [`Outbound`].
pub struct Policy {
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Resolves names in place of the system (callbacks drop loopback addresses).
    pub resolver: Option<Arc<dyn reqwest::dns::Resolve>>,
    /// Ignore `HTTP(S)_PROXY` (for `healthcheck`, which only talks to this host).
    pub no_proxy: bool,
}

impl Policy {
    pub fn new(timeout: Duration, connect_timeout: Duration) -> Self {
        Policy {
            timeout,
            connect_timeout,
            resolver: None,
            no_proxy: false,
        }
    }
}

impl Outbound {
    pub fn new(policy: Policy) -> Result<Self, BuildError> {
        #[allow(clippy::disallowed_methods)] // the one place a client is built
        let mut b = reqwest::Client::builder();
        b = b
            .user_agent(USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(policy.timeout)
            .connect_timeout(policy.connect_timeout.min(policy.timeout))
            .pool_idle_timeout(Duration::from_secs(50))
            .tcp_nodelay(true);
        if let Some(r) = policy.resolver {
            b = b.dns_resolver(r);
        }
        if policy.no_proxy {
            b = b.no_proxy();
        }
        b.build().map(|client| Outbound { client }).map_err(|e| {
            // reqwest says only "builder error"; the usual cause in a slim image is a missing
            // trust store, which TLS to Microsoft's endpoints needs.
            BuildError(format!(
                "{}; TLS needs the system's CA certificates (/etc/ssl/certs/ca-certificates.crt, package ca-certificates)",
                error_chain(&e)
            ))
        })
    }

    pub fn get(&self, url: &str) -> Request {
        Request(self.client.get(url))
    }

    pub fn post(&self, url: &str) -> Request {
        Request(self.client.post(url))
    }
}

/// A request being built; `send` gives an [`Answer`].
pub struct Request(reqwest::RequestBuilder);

impl Request {
    pub fn bearer_auth(self, token: &str) -> Self {
        Request(self.0.bearer_auth(token))
    }

    /// A header; a value that cannot be one fails the request at `send`.
    pub fn header(self, name: HeaderName, value: &str) -> Self {
        Request(self.0.header(name, value))
    }

    /// A header whose value is already checked.
    pub fn header_value(self, name: HeaderName, value: HeaderValue) -> Self {
        Request(self.0.header(name, value))
    }

    pub fn form<T: serde::Serialize + ?Sized>(self, form: &T) -> Self {
        Request(self.0.form(form))
    }

    pub fn query<T: serde::Serialize + ?Sized>(self, query: &T) -> Self {
        Request(self.0.query(query))
    }

    pub fn body(self, body: impl Into<reqwest::Body>) -> Self {
        Request(self.0.body(body))
    }

    pub async fn send(self) -> Result<Answer, SendError> {
        self.0
            .send()
            .await
            .map(|response| Answer { response })
            .map_err(|e| SendError::from_reqwest(&e))
    }
}

/// An answer whose body has not been read.
#[derive(Debug)]
pub struct Answer {
    response: reqwest::Response,
}

impl Answer {
    pub fn status(&self) -> StatusCode {
        self.response.status()
    }

    pub fn headers(&self) -> &HeaderMap {
        self.response.headers()
    }

    /// The redirect this answer asks for, if it is a 3xx (never followed).
    pub fn redirect(&self) -> Option<Redirect> {
        let status = self.status();
        if !status.is_redirection() {
            return None;
        }
        let origin = self
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|l| origin_of(l, self.response.url()))
            .unwrap_or_else(|| "(no Location)".to_string());
        Some(Redirect {
            status: status.as_u16(),
            origin,
        })
    }

    /// The body into `buffer` (emptied first; a sweep hands the same one from page to page),
    /// refused as soon as it announces or reaches more than `cap`.
    pub async fn read(self, cap: Cap, mut buffer: Vec<u8>) -> Result<Vec<u8>, BodyError> {
        let status = self.status().as_u16();
        let too_long = || BodyError::TooLong {
            what: cap.what,
            cap: cap.bytes,
            status,
        };
        let mut response = self.response;
        let announced = response.content_length().unwrap_or(0);
        if announced > cap.bytes as u64 {
            return Err(too_long());
        }
        buffer.clear();
        // The announced length is at most the cap here, so reserving it is bounded; a body
        // of that length is read into one allocation instead of a doubling series.
        buffer.reserve(announced as usize);
        loop {
            #[allow(clippy::disallowed_methods)] // the capped reader itself
            let chunk = response.chunk().await.map_err(|e| BodyError::Cut {
                status,
                message: error_chain(&e),
            })?;
            let Some(chunk) = chunk else { break };
            if buffer.len().saturating_add(chunk.len()) > cap.bytes {
                return Err(too_long());
            }
            buffer.extend_from_slice(&chunk);
        }
        Ok(buffer)
    }

    /// The body as text (invalid UTF-8 replaced), at most `cap`.
    pub async fn text(self, cap: Cap) -> Result<String, BodyError> {
        let bytes = self.read(cap, Vec::new()).await?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The first bytes of the body, up to `cap`, giving up on a chunk that takes longer than
    /// `wait`; the rest is never read (the connection is dropped with the answer). For
    /// answers that only explain a failure.
    pub async fn first_bytes(self, cap: Cap, wait: Duration) -> Vec<u8> {
        let mut response = self.response;
        let mut buf = Vec::new();
        while buf.len() < cap.bytes {
            #[allow(clippy::disallowed_methods)] // bounded by the loop and the cap
            let next = tokio::time::timeout(wait, response.chunk()).await;
            match next {
                Ok(Ok(Some(chunk))) => {
                    let room = cap.bytes.saturating_sub(buf.len());
                    buf.extend_from_slice(chunk.get(..room).unwrap_or(&chunk));
                }
                _ => break,
            }
        }
        buf
    }
}

/// `scheme://host[:port]` of `location`, resolved against `base` as a client would.
pub fn origin_of(location: &str, base: &reqwest::Url) -> String {
    match base.join(location.trim()) {
        Ok(u) => match u.host_str() {
            Some(host) => match u.port() {
                Some(p) => format!("{}://{host}:{p}", u.scheme()),
                None => format!("{}://{host}", u.scheme()),
            },
            None => format!("{}:", u.scheme()),
        },
        Err(_) => "(unreadable Location)".to_string(),
    }
}

/// The error and its causes on one line; reqwest's top-level message alone rarely says why.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    // reqwest names the URL it failed on, userinfo and all.
    crate::secret::redact_userinfo(&s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_caps_grow_with_the_page_and_stay_bounded() {
        assert_eq!(Cap::page(0), Cap::page(1));
        assert!(Cap::page(100).bytes < Cap::page(1000).bytes);
        assert_eq!(
            Cap::LONGEST_PAGE.bytes,
            (64 << 10) + 10_000 * PAGE_ENTRY_BYTES
        );
        const { assert!(Cap::LONGEST_PAGE.bytes < 128 << 20) };
    }

    #[test]
    fn redirect_targets_are_reduced_to_their_origin() {
        let base = reqwest::Url::parse("https://api.example/api/machineactions?x=1").unwrap();
        assert_eq!(
            origin_of("https://evil.example:8443/collect?secret=1", &base),
            "https://evil.example:8443"
        );
        assert_eq!(
            origin_of("/elsewhere?token=2", &base),
            "https://api.example"
        );
        assert_eq!(origin_of("http://[::1]/x", &base), "http://[::1]");
        assert_eq!(origin_of("data:text/plain,hi", &base), "data:");
    }

    #[test]
    fn body_errors_say_what_and_how_much() {
        let e = BodyError::TooLong {
            what: "token answer",
            cap: 64 << 10,
            status: 200,
        };
        assert_eq!(
            e.to_string(),
            "token answer longer than 64 KiB (HTTP 200); refused unread"
        );
    }
}
