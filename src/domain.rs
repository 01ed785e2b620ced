//! Domain types shared by every module: action ids, MDE statuses, tracking states and the
//! timestamp format of the database.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

/// The longest pause a `Retry-After` can impose: the longest window of the API's limits
/// (1,500 calls an hour). Anything longer is a broken or hostile answer, and obeying it would
/// stop tracking for years (and across restarts, as the pause is persisted).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A MachineAction id: always a lowercase GUID, so it is safe to put in URLs and OData filters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActionId(String);

/// The number a GUID (as `ActionId::parse` accepts it) stands for, without allocating;
/// `None` for anything `ActionId::parse` refuses.
pub fn guid_key(input: &str) -> Option<u128> {
    let trimmed = input.trim();
    let bare = trimmed
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(trimmed);
    if bare.len() != 36 {
        return None;
    }
    let mut key = 0u128;
    for (i, b) in bare.bytes().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if b != b'-' {
                return None;
            }
            continue;
        }
        let digit = (b as char).to_digit(16)?;
        key = key << 4 | u128::from(digit);
    }
    Some(key)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{value}' is not an action id: {reason} (expected a GUID like 2e9da30d-27f6-4208-81f2-9cd3d67893ba)"
)]
pub struct InvalidActionId {
    pub value: String,
    pub reason: &'static str,
}

impl ActionId {
    pub fn parse(input: &str) -> Result<Self, InvalidActionId> {
        let err = |reason| InvalidActionId {
            value: shorten(input),
            reason,
        };
        let trimmed = input.trim();
        // Accept the braced registry form people paste from Windows tooling.
        let bare = trimmed
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or(trimmed);
        if bare.is_empty() {
            return Err(err("it is empty"));
        }
        if bare.len() != 36 {
            return Err(err("it is not 36 characters long"));
        }
        for (i, b) in bare.bytes().enumerate() {
            let hyphen_position = matches!(i, 8 | 13 | 18 | 23);
            if hyphen_position {
                if b != b'-' {
                    return Err(err("hyphens must separate groups of 8-4-4-4-12 hex digits"));
                }
            } else if !b.is_ascii_hexdigit() {
                return Err(err("it contains a character that is not a hex digit"));
            }
        }
        Ok(Self(bare.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a number: a sweep holds 100,000 of them in a map, 16 bytes each instead of
    /// a heap string.
    pub fn key(&self) -> u128 {
        guid_key(&self.0).unwrap_or_default()
    }

    /// The id of a `key`, in the canonical lower-case form.
    pub fn from_key(key: u128) -> Self {
        let h = format!("{key:032x}");
        Self(format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        ))
    }

    /// A fresh random (version 4) id; used by the simulator.
    pub fn random(rng: &mut fastrand::Rng) -> Self {
        let mut bytes = [0u8; 16];
        rng.fill(&mut bytes);
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self(format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        ))
    }
}

fn shorten(input: &str) -> String {
    const MAX: usize = 80;
    if input.chars().count() <= MAX {
        input.to_string()
    } else {
        let mut s: String = input.chars().take(MAX).collect();
        s.push('…');
        s
    }
}

/// Lets a set of ids be asked about a `&str` from the database without parsing it: the
/// derived `Hash` and `Eq` are those of the inner string.
impl std::borrow::Borrow<str> for ActionId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for ActionId {
    type Err = InvalidActionId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ActionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ActionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ActionId({})", self.0)
    }
}

/// The `status` of a MachineAction as MDE reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ActionStatus {
    Pending,
    InProgress,
    Succeeded,
    Failed,
    TimeOut,
    Cancelled,
    /// A value this version does not know; recorded verbatim and polled on.
    Other(String),
}

impl ActionStatus {
    pub const TERMINAL: [ActionStatus; 4] = [
        ActionStatus::Succeeded,
        ActionStatus::Failed,
        ActionStatus::TimeOut,
        ActionStatus::Cancelled,
    ];

    /// The documented statuses, in lifecycle order.
    pub const KNOWN: [ActionStatus; 6] = [
        ActionStatus::Pending,
        ActionStatus::InProgress,
        ActionStatus::Succeeded,
        ActionStatus::Failed,
        ActionStatus::TimeOut,
        ActionStatus::Cancelled,
    ];

    pub fn parse(s: &str) -> Self {
        Self::KNOWN
            .iter()
            .find(|status| status.as_str().eq_ignore_ascii_case(s))
            .cloned()
            .unwrap_or_else(|| ActionStatus::Other(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            ActionStatus::Pending => "Pending",
            ActionStatus::InProgress => "InProgress",
            ActionStatus::Succeeded => "Succeeded",
            ActionStatus::Failed => "Failed",
            ActionStatus::TimeOut => "TimeOut",
            ActionStatus::Cancelled => "Cancelled",
            ActionStatus::Other(s) => s,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            ActionStatus::Succeeded
                | ActionStatus::Failed
                | ActionStatus::TimeOut
                | ActionStatus::Cancelled
        )
    }

    pub fn is_known(&self) -> bool {
        !matches!(self, ActionStatus::Other(_))
    }
}

impl fmt::Display for ActionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The action `type`s MDE documents; others are kept verbatim and counted as unknown.
pub const ACTION_TYPES: [&str; 9] = [
    "RunAntiVirusScan",
    "Offboard",
    "LiveResponse",
    "CollectInvestigationPackage",
    "Isolate",
    "Unisolate",
    "StopAndQuarantineFile",
    "RestrictCodeExecution",
    "UnrestrictCodeExecution",
];

pub fn is_known_action_type(t: &str) -> bool {
    ACTION_TYPES.contains(&t)
}

/// Where the daemon stands with an action; the `tracking` column (read as this type:
/// `sqlx::Type`, the column's text).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, sqlx::Type,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(rename_all = "snake_case")]
pub enum Tracking {
    /// Still polled.
    Active,
    /// A terminal status was seen.
    Done,
    /// MDE confirmed with a 404 that it does not know the id.
    NotFound,
    /// `give_up_after` passed without a terminal status.
    GaveUp,
}

impl Tracking {
    pub const ALL: [Tracking; 4] = [
        Tracking::Active,
        Tracking::Done,
        Tracking::NotFound,
        Tracking::GaveUp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Tracking::Active => "active",
            Tracking::Done => "done",
            Tracking::NotFound => "not_found",
            Tracking::GaveUp => "gave_up",
        }
    }
}

/// Where a notification delivery stands; the `notify_deliveries.state` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// To be tried (again) at `next_attempt_at`.
    Pending,
    Delivered,
    /// Refused, gone, or failed on its last attempt.
    Dead,
}

impl DeliveryState {
    pub const ALL: [DeliveryState; 3] = [
        DeliveryState::Pending,
        DeliveryState::Delivered,
        DeliveryState::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }
}

/// How an action first came to be tracked (`actions.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `enqueue`, `wait --enqueue` (and in-process callers).
    Cli,
    /// `POST /v1/actions`.
    Http,
    /// A sweep listed it and nobody had enqueued it (`poll.discover`).
    Discovered,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Cli, Source::Http, Source::Discovered];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cli => "cli",
            Source::Http => "http",
            Source::Discovered => "discovered",
        }
    }
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Source::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown source '{s}' (expected cli, http or discovered)"))
    }
}

impl FromStr for Tracking {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tracking::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown tracking state '{s}' (expected active, done, not_found or gave_up)"
                )
            })
    }
}

/// So that a row's state reads against its text (`row.tracking == "done"`).
impl PartialEq<&str> for Tracking {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for Tracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `d` before now, or `None` when that is before 1970 (which no timestamp here can name:
/// `--since 100000y` is an input error, not a panic).
pub fn time_ago(d: Duration) -> Option<SystemTime> {
    SystemTime::now()
        .checked_sub(d)
        .filter(|t| *t >= SystemTime::UNIX_EPOCH)
}

/// Formats a time the way the database stores it: UTC RFC 3339 with milliseconds and `Z`,
/// fixed width so that text order is time order.
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A time MDE sent, cut to the milliseconds the database keeps: what `normalize_time`
/// stores, without rendering it (a sweep compares 100,000 of them).
pub fn parse_time_millis(s: &str) -> Option<SystemTime> {
    let t = parse_time(s)?;
    let since = t.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64))
}

/// Parses a time MDE sent (any number of fractional digits, `Z`) or one we stored.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s.trim()).ok()
}

/// Re-renders an MDE timestamp in the database's format; `None` when it cannot be read.
pub fn normalize_time(s: &str) -> Option<String> {
    parse_time(s).map(format_time)
}

/// Parses durations written as text: `250ms`, `10s`, `5m`, `7d`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration ({e}); write e.g. 250ms, 10s, 5m, 7d"))
}

/// Renders a duration compactly for people and for `check-config`.
pub fn format_duration(d: Duration) -> String {
    // Round to milliseconds; humantime would print nanoseconds of jitter otherwise.
    let ms = Duration::from_millis(d.as_millis() as u64);
    humantime::format_duration(ms).to_string()
}

/// The API endpoint a call went to, as the call log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Get,
    List,
}

impl Endpoint {
    /// Every kind of call; `api_calls.endpoint` takes these (a test checks the migration's
    /// CHECK against this list).
    pub const ALL: [Endpoint; 2] = [Endpoint::Get, Endpoint::List];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Get => "get",
            Endpoint::List => "list",
        }
    }
}

/// Declares the MachineAction fields that `actions` keeps as columns, each once: its column
/// (the Rust field), its type, its name on the wire and in events, how it is read from an
/// answer (a function of `wire` below), and whether it is free text (cut in events). Everything that
/// copies these fields follows from the declaration: reading them from MDE's JSON, the poll
/// write's SQL, the rows read back, the exports, the event payload.
macro_rules! action_fields {
    ($( $(#[doc = $doc:literal])* $column:ident : $ty:ident = $wire:literal via $read:literal $(, $text:ident)? ; )*) => {
        /// The MachineAction fields `actions` keeps as columns (`ACTION_FIELDS` describes
        /// them), normalized as `wire` reads them. It serializes with the column names (the
        /// exports) and deserializes from a MachineAction's JSON (the wire names); unknown
        /// keys are ignored.
        #[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
        pub struct ActionFields {
            $(
                $(#[doc = $doc])*
                #[serde(default, rename(deserialize = $wire), deserialize_with = $read)]
                pub $column: Option<$ty>,
            )*
        }

        /// Each field of `ActionFields`, in declaration order.
        pub const ACTION_FIELDS: &[FieldSpec] = &[
            $( FieldSpec {
                column: stringify!($column),
                wire: $wire,
                free_text: action_fields!(@text $($text)?),
            }, )*
        ];

        impl ActionFields {
            /// The values, in the order of `ACTION_FIELDS`.
            pub fn cells(&self) -> Vec<Cell<'_>> {
                vec![$( Cell::from(&self.$column), )*]
            }
        }
    };
    (@text free_text) => { true };
    (@text) => { false };
}

/// How `ActionFields` reads each field of a MachineAction. The fields the poll needs to
/// trust the answer are `text`/`time`: a value of another JSON type makes the answer
/// unreadable. The fields only reports read are `lenient_*`: a value of an unexpected
/// type is dropped rather than costing the whole action. Times are re-rendered in the
/// database's format (`normalize_time`); one that cannot be read is kept as NULL.
mod wire {
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Option::<String>::deserialize(d)
    }

    pub fn time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(text(d)?.as_deref().and_then(super::normalize_time))
    }

    pub fn lenient_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => Some(s),
            _ => None,
        })
    }

    pub fn lenient_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(lenient_text(d)?.as_deref().and_then(super::normalize_time))
    }

    /// An integer (`errorHResult` is a signed 32-bit HRESULT), or `None`.
    pub fn lenient_integer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        Ok(Value::deserialize(d)?.as_i64())
    }
}

/// One column of `ActionFields`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    /// Its column in `actions` (and its key in exports).
    pub column: &'static str,
    /// Its name in a MachineAction and in notification events.
    pub wire: &'static str,
    /// Free text that a person wrote: events carry its first 2,000 characters.
    pub free_text: bool,
}

/// A value of a column, for output that is not JSON (CSV, tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell<'a> {
    Null,
    Text(&'a str),
    Integer(i64),
}

impl<'a> From<&'a Option<String>> for Cell<'a> {
    fn from(v: &'a Option<String>) -> Self {
        v.as_deref().map_or(Cell::Null, Cell::Text)
    }
}

impl From<&Option<i64>> for Cell<'_> {
    fn from(v: &Option<i64>) -> Self {
        v.map_or(Cell::Null, Cell::Integer)
    }
}

impl fmt::Display for Cell<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cell::Null => Ok(()),
            Cell::Text(t) => f.write_str(t),
            Cell::Integer(n) => write!(f, "{n}"),
        }
    }
}

action_fields! {
    action_type: String = "type" via "wire::text";
    machine_id: String = "machineId" via "wire::text";
    computer_dns_name: String = "computerDnsName" via "wire::text";
    requestor: String = "requestor" via "wire::text";
    requestor_comment: String = "requestorComment" via "wire::text", free_text;
    /// Some answers spell it `externalID`; `mde` reads that too.
    external_id: String = "externalId" via "wire::text";
    mde_created_at: String = "creationDateTimeUtc" via "wire::time";
    request_source: String = "requestSource" via "wire::lenient_text";
    scope: String = "scope" via "wire::lenient_text";
    title: String = "title" via "wire::lenient_text", free_text;
    /// `errorHResult`: a signed 32-bit HRESULT.
    error_hresult: i64 = "errorHResult" via "wire::lenient_integer";
    cancellation_requestor: String = "cancellationRequestor" via "wire::lenient_text";
    cancellation_comment: String = "cancellationComment" via "wire::lenient_text", free_text;
    cancelled_at: String = "cancellationDateTimeUtc" via "wire::lenient_time";
}

impl ActionFields {
    /// The action's type when this version does not know it (it is recorded as sent).
    pub fn unknown_type(&self) -> Option<&str> {
        self.action_type
            .as_deref()
            .filter(|t| !is_known_action_type(t))
    }

    /// Whether the type and the requestor pass discovery's filters (empty: any).
    pub fn matches(&self, types: &[String], requestors: &[String]) -> bool {
        let any = |allowed: &[String], v: &Option<String>| {
            allowed.is_empty() || v.as_ref().is_some_and(|v| allowed.contains(v))
        };
        any(types, &self.action_type) && any(requestors, &self.requestor)
    }
}

/// What a poll read of a MachineAction, already normalized.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub status: Option<ActionStatus>,
    /// `lastUpdateDateTimeUtc` (the `mde_updated_at` column): apart from `fields` because
    /// the poll compares it and the transition records it.
    pub updated_at: Option<String>,
    pub fields: ActionFields,
    /// The JSON object exactly as MDE sent it.
    pub raw: String,
}

/// One `callbacks.allow` entry: a host (`soar.example`, `10.1.2.3`, `[::1]`), or any
/// subdomain of one (`*.logic.azure.com`), or `*` (any host that is not loopback or
/// link-local); optionally with `:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// `Some("logic.azure.com")` for `*.logic.azure.com`, `Some("")` for `*`.
    suffix: Option<String>,
    host: String,
    port: Option<u16>,
}

impl HostPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim().to_ascii_lowercase();
        let bad = |why: &str| {
            Err(format!(
                "'{text}' {why}; expected a host such as soar.example, *.logic.azure.com or 10.0.0.5:8443"
            ))
        };
        if t.is_empty() || t.contains('/') || t.contains('@') {
            return bad("is not a host pattern");
        }
        let (host, port) = match t.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((h, "")) => (h.to_string(), None),
                Some((h, p)) => match p.strip_prefix(':').map(str::parse::<u16>) {
                    Some(Ok(p)) => (h.to_string(), Some(p)),
                    _ => return bad("has a bad port"),
                },
                None => return bad("has an unclosed ["),
            },
            None => match t.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => match p.parse::<u16>() {
                    Ok(p) => (h.to_string(), Some(p)),
                    Err(_) => return bad("has a bad port"),
                },
                _ => (t.clone(), None),
            },
        };
        let suffix = if host == "*" {
            Some(String::new())
        } else {
            host.strip_prefix("*.").map(str::to_string)
        };
        let name = suffix.as_deref().unwrap_or(&host);
        if suffix.as_deref() != Some("")
            && (name.is_empty()
                || name.contains('*')
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':')))
        {
            return bad("is not a host pattern");
        }
        Ok(Self { suffix, host, port })
    }

    /// This pattern names `host` itself (no wildcard), whatever the port.
    pub fn matches_host_exactly(&self, host: &str) -> bool {
        self.suffix.is_none() && self.host == host
    }

    /// Whether `host` (lowercase, IPv6 without brackets) and `port` match; `explicit`
    /// only counts an exact host (how loopback and link-local must be listed).
    pub fn matches(&self, host: &str, port: u16, explicit: bool) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match &self.suffix {
            None => self.host == host,
            Some(_) if explicit => false,
            Some(s) if s.is_empty() => true,
            Some(s) => {
                host.len() > s.len() + 1
                    && host.ends_with(s.as_str())
                    && host[..host.len() - s.len()].ends_with('.')
            }
        }
    }
}

/// Loopback, link-local or unspecified: addresses a callback reaches only when listed.
pub fn is_local_address(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        std::net::IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_local_address(std::net::IpAddr::V4(v4));
            }
            v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Checks a callback URL against `callbacks.allow`: the host must match a pattern, and a
/// loopback or link-local host (or `localhost`) must be listed exactly.
pub fn check_callback_url(url: &str, allow: &[HostPattern]) -> Result<(), String> {
    if allow.is_empty() {
        return Err("callbacks are refused: callbacks.allow is empty".into());
    }
    if url.len() > 4096 {
        return Err("callback_url is longer than 4096 bytes".into());
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("callback_url is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("callback_url must be https:// (or http://)".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("callback_url must not carry a user or password".into());
    }
    let Some(host) = parsed.host_str() else {
        return Err("callback_url has no host".into());
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let local = host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(is_local_address);
    if allow.iter().any(|p| p.matches(&host, port, local)) {
        Ok(())
    } else if local {
        Err(format!(
            "callback host {host} is loopback or link-local: refused unless callbacks.allow lists it exactly"
        ))
    } else {
        Err(format!(
            "callback host {host}:{port} is not in callbacks.allow"
        ))
    }
}

/// The destination name of per-action callback URLs: reserved, no `[[notify]]` may take it.
pub const CALLBACK: &str = "callback";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_lowercases_guids() {
        let id = ActionId::parse("2E9DA30D-27F6-4208-81F2-9CD3D67893BA").unwrap();
        assert_eq!(id.as_str(), "2e9da30d-27f6-4208-81f2-9cd3d67893ba");
        let braced = ActionId::parse(" {2e9da30d-27f6-4208-81f2-9cd3d67893ba} ").unwrap();
        assert_eq!(braced, id);
    }

    proptest! {
        /// The numeric key accepts exactly what `parse` accepts and round-trips to the
        /// canonical form.
        #[test]
        fn keys_agree_with_parse(raw in "[{ ]?[0-9a-fA-F-]{34,38}[} ]?", bytes in any::<u128>()) {
            prop_assert_eq!(guid_key(&raw).is_some(), ActionId::parse(&raw).is_ok());
            if let Ok(id) = ActionId::parse(&raw) {
                prop_assert_eq!(ActionId::from_key(guid_key(&raw).unwrap()), id.clone());
                prop_assert_eq!(ActionId::from_key(id.key()), id);
            }
            let id = ActionId::from_key(bytes);
            prop_assert_eq!(ActionId::parse(id.as_str()).unwrap().key(), bytes);
        }
    }

    #[test]
    fn refuses_non_guids_with_the_value_and_reason() {
        for (input, reason) in [
            ("", "empty"),
            ("abc", "36 characters"),
            ("2e9da30d-27f6-4208-81f2-9cd3d67893bz", "hex digit"),
            ("2e9da30d027f6-4208-81f2-9cd3d67893ba", "hyphens"),
            ("../../../../etc/passwd-aaaaaaaaaaaaa", "hex digit"),
        ] {
            let err = ActionId::parse(input).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(reason), "{input:?}: {msg}");
            assert!(msg.contains(&format!("'{input}'")), "{msg}");
        }
    }

    #[test]
    fn long_garbage_is_shortened_in_messages() {
        let input = "x".repeat(500);
        let msg = ActionId::parse(&input).unwrap_err().to_string();
        assert!(msg.len() < 250, "{msg}");
    }

    #[test]
    fn random_ids_are_valid() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..100 {
            let id = ActionId::random(&mut rng);
            assert_eq!(ActionId::parse(id.as_str()).unwrap(), id);
        }
    }

    #[test]
    fn statuses_classify() {
        assert!(ActionStatus::parse("Succeeded").is_terminal());
        assert!(ActionStatus::parse("timeout").is_terminal());
        assert_eq!(ActionStatus::parse("timeout").as_str(), "TimeOut");
        assert!(!ActionStatus::parse("InProgress").is_terminal());
        let other = ActionStatus::parse("Queued");
        assert!(!other.is_terminal() && !other.is_known());
        assert_eq!(other.as_str(), "Queued");
    }

    #[test]
    fn times_are_fixed_width_and_normalized() {
        assert_eq!(
            normalize_time("2018-12-04T12:18:27.1293487Z").as_deref(),
            Some("2018-12-04T12:18:27.129Z")
        );
        assert_eq!(
            normalize_time("2018-12-04T12:18:27Z").as_deref(),
            Some("2018-12-04T12:18:27.000Z")
        );
        assert_eq!(normalize_time("yesterday"), None);
    }

    #[test]
    fn durations_parse_from_text() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert!(parse_duration("soon").unwrap_err().contains("'soon'"));
    }

    proptest! {
        #[test]
        fn any_guid_shape_parses(bytes in proptest::array::uniform16(any::<u8>()), upper in any::<bool>()) {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let s = format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]);
            let input = if upper { s.to_uppercase() } else { s.clone() };
            let parsed = ActionId::parse(&input).unwrap();
            prop_assert_eq!(parsed.as_str(), s.as_str());
        }

        #[test]
        fn arbitrary_text_never_panics_and_valid_ids_are_canonical(s in ".{0,60}") {
            if let Ok(id) = ActionId::parse(&s) {
                prop_assert_eq!(id.as_str().len(), 36);
                prop_assert!(id.as_str().bytes().all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            }
        }

        #[test]
        fn stored_times_sort_as_text(a in 0u64..4_000_000_000_000, b in 0u64..4_000_000_000_000) {
            let ta = SystemTime::UNIX_EPOCH + Duration::from_millis(a);
            let tb = SystemTime::UNIX_EPOCH + Duration::from_millis(b);
            prop_assert_eq!(format_time(ta).cmp(&format_time(tb)), ta.cmp(&tb));
        }
    }

    #[test]
    fn callback_hosts_follow_the_allowlist() {
        let allow: Vec<HostPattern> = ["*.logic.azure.com", "soar.example:8443", "127.0.0.1"]
            .iter()
            .map(|p| HostPattern::parse(p).unwrap())
            .collect();
        let ok = |u: &str| check_callback_url(u, &allow);
        assert!(ok("https://prod-1.westeurope.logic.azure.com/workflows/x?sig=abc").is_ok());
        assert!(
            ok("https://logic.azure.com/x").is_err(),
            "a bare suffix is not a subdomain"
        );
        assert!(ok("https://evillogic.azure.com/x").is_err());
        assert!(ok("https://soar.example:8443/hook").is_ok());
        assert!(ok("https://soar.example/hook").is_err(), "port must match");
        assert!(ok("http://127.0.0.1:9000/cb").is_ok(), "listed exactly");
        assert!(ok("http://127.0.0.2/cb").is_err());
        assert!(ok("https://user:pw@soar.example:8443/").is_err());
        assert!(ok("ftp://soar.example:8443/").is_err());
        let any = [HostPattern::parse("*").unwrap()];
        assert!(check_callback_url("https://example.org/", &any).is_ok());
        for local in [
            "http://127.0.0.1/",
            "http://localhost/",
            "http://[::1]/",
            "http://169.254.169.254/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
        ] {
            assert!(
                check_callback_url(local, &any).is_err(),
                "{local} through *"
            );
        }
        assert!(
            check_callback_url("https://example.org/", &[]).is_err(),
            "empty allow refuses"
        );
        for bad in ["", "a/b", "x:99999", "*.*.com", "[::1"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
