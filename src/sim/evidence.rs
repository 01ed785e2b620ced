//! Evidence downloads as the service serves them (see "Evidence downloads" in MDE-API.md):
//! `getPackageUri` answers 404 until the collection has succeeded, then a link wrapped in
//! escaped quotes, at 2 calls a minute and 120 an hour of its own; a live response command
//! that completed has `GetLiveResponseResultDownloadLink(index=N)`, a plain link. The
//! links point at blob storage on another origin (its own listener): a SAS token valid for
//! `link_lifetime` (403 `AuthenticationFailed` after, as Azure Storage answers), packages
//! of realistic size streamed, RunScript output as JSON, GetFile output gzip-compressed,
//! and the first `drop_downloads` downloads cut mid-body.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::http::{Handler, Reply, Request};
use super::{SimRateLimit, Tenant};
use crate::domain::ActionId;

/// How the simulated tenant serves evidence.
#[derive(Debug, Clone)]
pub struct EvidenceConfig {
    /// Bytes of an investigation package (a real one is about 15 MB).
    pub package_size: u64,
    /// How long a download link works (30 minutes at the service).
    pub link_lifetime: Duration,
    /// The first this many downloads are cut off halfway through the body.
    pub drop_downloads: u32,
    /// `getPackageUri`'s own limits: 2 calls a minute, 120 an hour.
    pub package_rate_limit: Option<SimRateLimit>,
    pub package_long_rate_limit: Option<SimRateLimit>,
}

impl Default for EvidenceConfig {
    fn default() -> Self {
        Self {
            package_size: 15 * 1024 * 1024,
            link_lifetime: Duration::from_secs(30 * 60),
            drop_downloads: 0,
            package_rate_limit: Some(SimRateLimit {
                calls: 2,
                window: Duration::from_secs(60),
            }),
            package_long_rate_limit: Some(SimRateLimit {
                calls: 120,
                window: Duration::from_secs(3600),
            }),
        }
    }
}

/// What a link leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blob {
    Package(ActionId),
    /// The output of command `index` of a live response action, of the command's type.
    CommandOutput {
        action: ActionId,
        index: u32,
        command: &'static str,
    },
}

#[derive(Debug)]
pub(super) struct Link {
    blob: Blob,
    expires: Instant,
}

/// The evidence side of the tenant's state.
#[derive(Debug, Default)]
pub(super) struct EvidenceState {
    /// Issued links by their SAS signature.
    links: HashMap<String, Link>,
    package_window: std::collections::VecDeque<Instant>,
    package_long_window: std::collections::VecDeque<Instant>,
    downloads: u32,
}

/// What the evidence endpoints saw; tests assert on it.
#[derive(Debug, Clone, Default)]
pub struct EvidenceStats {
    pub package_uri_calls: u64,
    /// `getPackageUri` calls refused by its own limit.
    pub package_uri_limited: u64,
    pub live_response_link_calls: u64,
    pub links_issued: u64,
    /// Download requests at the blob origin, whole or not.
    pub downloads: u64,
    pub downloads_completed: u64,
    pub downloads_dropped: u64,
    /// Downloads refused because their link had expired (or was never issued).
    pub expired_links: u64,
    /// Requests at the blob origin that carried an `Authorization` header: the API's
    /// bearer token must never leave for another origin.
    pub authorization_headers: u64,
}

/// The content of a package: a zip's local-file signature, then filler byte to its size
/// (what is hashed is what matters, not what a zip tool would find).
pub const PACKAGE_HEAD: &[u8] = b"PK\x03\x04";
pub const PACKAGE_FILL: u8 = b'z';

/// A whole package of `size` bytes, for a test to hash.
pub fn package_content(size: u64) -> Vec<u8> {
    let mut body = PACKAGE_HEAD.to_vec();
    body.resize(usize::try_from(size).unwrap_or(usize::MAX), PACKAGE_FILL);
    body
}

/// RunScript output as the service stores it.
pub fn run_script_output(action: &ActionId, index: u32) -> String {
    serde_json::json!({
        "script_name": "collect-triage.ps1",
        "exit_code": 0,
        "script_output": format!("Transcript started for {action}\ncommand {index}: 42 processes, 7 services collected\n"),
        "script_errors": "",
    })
    .to_string()
}

/// The file a GetFile command fetched, before compression.
pub fn get_file_content(action: &ActionId) -> Vec<u8> {
    format!(
        "C:\\Windows\\Temp\\suspicious.ps1 from action {action}\r\nInvoke-Expression $payload\r\n"
    )
    .into_bytes()
}

/// `data` as a gzip member of stored (uncompressed) deflate blocks: what any gzip reader
/// accepts, without a compressor in the simulator.
pub fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut chunks = data.chunks(65_535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        let last = u8::from(chunks.peek().is_none());
        let len = chunk.len() as u16;
        out.push(last);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Whether one more call fits `limit` in `window` at `now` (and counts it if so).
fn admit(
    window: &mut std::collections::VecDeque<Instant>,
    limit: &Option<SimRateLimit>,
    now: Instant,
) -> Option<Instant> {
    let limit = limit.as_ref()?;
    while window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= limit.window)
    {
        window.pop_front();
    }
    if window.len() >= limit.calls as usize {
        return Some(window[window.len() - limit.calls as usize] + limit.window);
    }
    None
}

impl EvidenceState {
    /// `getPackageUri`'s own limits: when the call is refused, until when.
    pub(super) fn package_call(
        &mut self,
        config: &EvidenceConfig,
        now: Instant,
    ) -> Option<Instant> {
        let refused = admit(&mut self.package_window, &config.package_rate_limit, now).max(admit(
            &mut self.package_long_window,
            &config.package_long_rate_limit,
            now,
        ));
        if refused.is_none() {
            if config.package_rate_limit.is_some() {
                self.package_window.push_back(now);
            }
            if config.package_long_rate_limit.is_some() {
                self.package_long_window.push_back(now);
            }
        }
        refused
    }

    /// A new link to `blob`, valid for the configured lifetime: its signature.
    pub(super) fn issue(
        &mut self,
        blob: Blob,
        lifetime: Duration,
        now: Instant,
        rng: &mut fastrand::Rng,
    ) -> String {
        let sig: String = (0..32)
            .map(|_| char::from_digit(rng.u32(0..16), 16).unwrap_or('0'))
            .collect();
        self.links.insert(
            sig.clone(),
            Link {
                blob,
                expires: now + lifetime,
            },
        );
        sig
    }
}

/// The blob storage origin: serves what links point at.
pub(super) struct BlobStorage {
    pub(super) tenant: Arc<Tenant>,
}

impl Handler for BlobStorage {
    async fn handle(&self, req: Request) -> Reply {
        let now = Instant::now();
        let mut guard = self.tenant.lock();
        let s = &mut *guard;
        s.evidence_stats.downloads += 1;
        if req.header("authorization").is_some() {
            s.evidence_stats.authorization_headers += 1;
        }
        let sig = super::http::form_decode(&req.query)
            .into_iter()
            .find(|(k, _)| k == "sig")
            .map(|(_, v)| v)
            .unwrap_or_default();
        let blob = match s.evidence.links.get(&sig) {
            Some(link) if link.expires > now => link.blob.clone(),
            _ => {
                s.evidence_stats.expired_links += 1;
                return Reply::Full {
                    status: 403,
                    content_type: "application/xml",
                    extra_headers: vec![("x-ms-error-code", "AuthenticationFailed".into())],
                    body: b"<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>AuthenticationFailed</Code><Message>Server failed to authenticate the request. Make sure the value of Authorization header is formed correctly including the signature.\nRequestId:5e0f5a1c-001e-0042-3c1a-000000000000\nTime:2026-12-07T10:00:00.0000000Z</Message><AuthenticationErrorDetail>Signature not valid in the specified time frame</AuthenticationErrorDetail></Error>".to_vec(),
                };
            }
        };
        s.evidence.downloads += 1;
        let drop = s.evidence.downloads <= s.config.evidence.drop_downloads;
        let body = match &blob {
            Blob::Package(_) => {
                let size = s.config.evidence.package_size;
                if drop {
                    s.evidence_stats.downloads_dropped += 1;
                    let body = package_content(size);
                    return Reply::CutShort {
                        status: 200,
                        keep: body.len() / 2,
                        body,
                    };
                }
                s.evidence_stats.downloads_completed += 1;
                return Reply::Stream {
                    status: 200,
                    head: PACKAGE_HEAD.to_vec(),
                    fill: PACKAGE_FILL,
                    tail: Vec::new(),
                    length: Some(size),
                };
            }
            Blob::CommandOutput {
                action,
                command: "GetFile",
                ..
            } => gzip_stored(&get_file_content(action)),
            Blob::CommandOutput { action, index, .. } => {
                run_script_output(action, *index).into_bytes()
            }
        };
        if drop {
            s.evidence_stats.downloads_dropped += 1;
            return Reply::CutShort {
                status: 200,
                keep: body.len() / 2,
                body,
            };
        }
        s.evidence_stats.downloads_completed += 1;
        Reply::Full {
            status: 200,
            content_type: "application/octet-stream",
            extra_headers: Vec::new(),
            body,
        }
    }
}
