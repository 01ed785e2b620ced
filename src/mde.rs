//! Typed client for the two MachineAction calls, with error classification.
//!
//! Knows nothing of the database or the budget: it sends one request and says what came back.
// Network input is parsed here: no unwrap, no unchecked arithmetic, no indexing that can
// panic (tests may).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::arithmetic_side_effects
    )
)]

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::domain::{ActionFields, Observation};
use crate::domain::{ActionId, ActionStatus, MAX_RETRY_AFTER, normalize_time};
use crate::outbound::{BodyError, Cap, Outbound, Policy};
pub use crate::outbound::{BuildError, error_chain};
use crate::secret::Secret;

/// How much of an error body is kept in messages.
const ERROR_SNIPPET: usize = 300;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum MdeError {
    #[error("MDE does not know this action (404)")]
    NotFound,
    #[error("access token rejected (401){}", detail_suffix(.0))]
    Unauthorized(String),
    #[error("rate limited (429){}", .retry_after.map(|d| format!(", retry after {}", crate::domain::format_duration(d))).unwrap_or_default())]
    RateLimited { retry_after: Option<Duration> },
    /// The service refused the `id in (...)` list filter.
    #[error("list filter rejected (400){}", detail_suffix(.0))]
    FilterRejected(String),
    /// The service accepted a list filter but answered entries that contradict it (an id not
    /// asked for, a status or creation time outside the filter): it does not apply that form.
    #[error("list filter ignored by the service: {0}")]
    FilterIgnored(String),
    /// A 404 that is not the API's: an HTML or empty body (a proxy, or `api.base_url` with a
    /// wrong path), or any 404 to a list call. Says nothing about the action.
    #[error("HTTP 404 from {url} is not an answer of the MDE API{}; check api.base_url (a wrong path or a proxy)", detail_suffix(.detail))]
    NotApi { url: String, detail: String },
    /// 403: the app lacks an application role (Machine.Read.All), or the token is for
    /// another resource.
    #[error("MDE refused the app (403){}", detail_suffix(.0))]
    Forbidden(String),
    /// Worth retrying later: 5xx, time-outs, dropped connections, unreadable answers.
    #[error("{message}")]
    Transient {
        status: Option<u16>,
        message: String,
    },
    /// A 4xx that retrying will not fix by itself (e.g. 403: the app lacks Machine.Read.All).
    #[error("{message}")]
    Rejected { status: u16, message: String },
    /// A 3xx: not followed (the bearer token and the answer's trust stay with the configured
    /// origin), and nothing in it is read.
    #[error(
        "HTTP {status} redirecting to {origin} refused: redirects are never followed; check api.base_url (or a proxy on the way)"
    )]
    Redirected { status: u16, origin: String },
    /// The front end could not take the request's headers (431, or a 400 page about header
    /// size): the token is unusable as it is, like a 401.
    #[error("MDE cannot take the token as a header (HTTP {status}){}", detail_suffix(.detail))]
    TokenUnusable { status: u16, detail: String },
}

fn detail_suffix(s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

impl MdeError {
    pub fn http_status(&self) -> Option<u16> {
        match self {
            MdeError::NotFound => Some(404),
            MdeError::Unauthorized(_) => Some(401),
            MdeError::RateLimited { .. } => Some(429),
            MdeError::FilterRejected(_) => Some(400),
            MdeError::FilterIgnored(_) => Some(200),
            MdeError::NotApi { .. } => Some(404),
            MdeError::Forbidden(_) => Some(403),
            MdeError::Transient { status, .. } => *status,
            MdeError::Rejected { status, .. } => Some(*status),
            MdeError::Redirected { status, .. } => Some(*status),
            MdeError::TokenUnusable { status, .. } => Some(*status),
        }
    }

    /// What the API said about the token, when it refused it (401, 431, a 400 on the header):
    /// the call gate drops that token and gets another.
    pub fn token_refusal(&self) -> Option<String> {
        match self {
            MdeError::Unauthorized(detail) => Some(detail.clone()),
            MdeError::TokenUnusable { .. } => Some(self.to_string()),
            _ => None,
        }
    }

    /// Short label for the call log.
    pub fn outcome(&self) -> &'static str {
        match self {
            MdeError::NotFound => "not_found",
            MdeError::Unauthorized(_) => "unauthorized",
            MdeError::RateLimited { .. } => "rate_limited",
            MdeError::FilterRejected(_) => "filter_rejected",
            MdeError::FilterIgnored(_) => "filter_ignored",
            MdeError::NotApi { .. } => "not_api",
            MdeError::Forbidden(_) => "forbidden",
            MdeError::Transient { .. } => "transient",
            MdeError::Rejected { .. } => "rejected",
            MdeError::Redirected { .. } => "redirected",
            MdeError::TokenUnusable { .. } => "token_unusable",
        }
    }
}

/// What of a MachineAction the poll needs apart from `ActionFields`. Unknown fields are
/// ignored; only `id` and `status` are required, since nothing can be tracked without them.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireAction {
    id: String,
    status: String,
    // Real answers say lastUpdateDateTimeUtc, some docs lastUpdateTimeUtc; a serde alias would
    // fail on an answer that carries both, so both are read and merged.
    last_update_date_time_utc: Option<String>,
    last_update_time_utc: Option<String>,
    #[serde(rename = "externalID")]
    external_id_upper: Option<String>,
}

/// A MachineAction read from an answer, with its JSON kept verbatim.
#[derive(Debug, Clone)]
pub struct FetchedAction {
    pub id: ActionId,
    pub status: ActionStatus,
    pub observation: Observation,
}

impl FetchedAction {
    pub fn from_json(raw: &str) -> Result<Self, String> {
        let unreadable = |e: serde_json::Error| format!("unreadable MachineAction: {e}");
        let wire: WireAction = serde_json::from_str(raw).map_err(unreadable)?;
        let id = ActionId::parse(&wire.id).map_err(|e| format!("answer has a bad id: {e}"))?;
        let status = ActionStatus::parse(&wire.status);
        // A second pass over the same text: cheaper than buffering every other key for a
        // `#[serde(flatten)]`, and each field's rules stay with its declaration in `domain`.
        let mut fields: ActionFields = serde_json::from_str(raw).map_err(unreadable)?;
        fields.external_id = fields.external_id.or(wire.external_id_upper);
        let updated = wire.last_update_date_time_utc.or(wire.last_update_time_utc);
        let observation = Observation {
            status: Some(status.clone()),
            updated_at: updated.as_deref().and_then(normalize_time),
            fields,
            raw: raw.to_string(),
        };
        Ok(Self {
            id,
            status,
            observation,
        })
    }
}

/// A list answer: the actions that could be read, and the problems with those that could not.
#[derive(Debug, Default)]
pub struct ListAnswer {
    pub actions: HashMap<ActionId, FetchedAction>,
    pub unreadable: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct MdeClient {
    http: Outbound,
    base_url: String,
}

/// Builds the one HTTP client of the process (shared with the token source).
pub fn http_client(timeout: Duration, connect_timeout: Duration) -> Result<Outbound, BuildError> {
    Outbound::new(Policy::new(timeout, connect_timeout))
}

impl MdeClient {
    pub fn new(http: Outbound, base_url: &str) -> Self {
        Self {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
        }
    }

    /// `GET /api/machineactions/{id}`.
    pub async fn get_action(
        &self,
        token: &Secret,
        id: &ActionId,
    ) -> Result<FetchedAction, MdeError> {
        // ActionId holds only hex digits and hyphens, so it is safe in a path as it is.
        let url = format!("{}/api/machineactions/{}", self.base_url, id);
        let body = self.send(token, &url, Expect::Action).await?;
        let action = FetchedAction::from_json(&body).map_err(|message| MdeError::Transient {
            status: Some(200),
            message,
        })?;
        if action.id != *id {
            return Err(MdeError::Transient {
                status: Some(200),
                message: format!("asked for {id}, answer is about {}", action.id),
            });
        }
        Ok(action)
    }

    /// `GET /api/machineactions?$filter=id in (...)`; ids missing from the answer are simply
    /// absent (not proof of a 404).
    pub async fn list_actions(
        &self,
        token: &Secret,
        ids: &[ActionId],
    ) -> Result<ListAnswer, MdeError> {
        let url = self.list_url(ids);
        let entries = u32::try_from(ids.len()).unwrap_or(u32::MAX);
        let body = self.send(token, &url, Expect::Page(entries)).await?;
        parse_list(body, ids)
    }

    /// One page of a tenant-wide listing: `GET /api/machineactions?$filter=...&$top=&$skip=`.
    /// `since` is the creation time a `CreatedSince` listing starts from. A page whose
    /// entries contradict the filter is `FilterIgnored`.
    pub async fn list_page(
        &self,
        token: &Secret,
        filter: SweepFilter,
        since: &str,
        top: u32,
        skip: u64,
        buffer: Vec<u8>,
    ) -> Result<ListPage, MdeError> {
        let url = self.page_url(&filter.text(since), top, skip);
        let body = self
            .send_into(token, &url, Expect::Page(top), buffer)
            .await?;
        ListPage::parse(body, Some((filter, crate::domain::parse_time(since))))
    }

    pub fn page_url(&self, filter: &str, top: u32, skip: u64) -> String {
        let mut url = format!(
            "{}/api/machineactions?$filter={}&$top={top}",
            self.base_url,
            encode_query_value(filter)
        );
        if skip > 0 {
            url.push_str(&format!("&$skip={skip}"));
        }
        url
    }

    /// The cheapest call there is (`$top=1`), for `doctor`.
    pub async fn probe(&self, token: &Secret) -> Result<(), MdeError> {
        let url = format!("{}/api/machineactions?$top=1", self.base_url);
        self.send(token, &url, Expect::Page(1)).await.map(|_| ())
    }

    pub fn list_url(&self, ids: &[ActionId]) -> String {
        let quoted: Vec<String> = ids.iter().map(|id| format!("'{id}'")).collect();
        format!(
            "{}/api/machineactions?$filter=id%20in%20({})&$top={}",
            self.base_url,
            quoted.join(","),
            ids.len().max(1)
        )
    }

    async fn send(&self, token: &Secret, url: &str, expect: Expect) -> Result<String, MdeError> {
        self.send_into(token, url, expect, Vec::new()).await
    }

    /// `send`, reading the answer into `buffer` (emptied first): a sweep hands the same
    /// buffer from page to page, so a page's megabytes are allocated once, not once a page
    /// (freed pages stay resident in the allocator's per-thread arenas).
    async fn send_into(
        &self,
        token: &Secret,
        url: &str,
        expect: Expect,
        buffer: Vec<u8>,
    ) -> Result<String, MdeError> {
        let single = matches!(expect, Expect::Action);
        let answer = self
            .http
            .get(url)
            .bearer_auth(token.expose())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| MdeError::Transient {
                status: None,
                message: e.to_string(),
            })?;
        let status = answer.status();
        if let Some(r) = answer.redirect() {
            return Err(MdeError::Redirected {
                status: r.status,
                origin: r.origin,
            });
        }
        let retry_after = parse_retry_after(answer.headers(), SystemTime::now());
        let bytes = if status.is_success() {
            answer
                .read(expect.cap(), buffer)
                .await
                .map_err(|e| MdeError::Transient {
                    status: Some(status.as_u16()),
                    message: match (e, expect) {
                        (e @ BodyError::TooLong { .. }, Expect::Page(_)) => {
                            format!("{e}; a smaller poll.sweep_page_size asks for less")
                        }
                        (e, _) => e.to_string(),
                    },
                })?
        } else {
            // An error answer is read only as far as it explains itself: a 429 with an
            // endless body is still a 429.
            answer.first_bytes(Cap::ERROR, ERROR_READ_WAIT).await
        };
        let body = String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        classify(status, retry_after, body, single, url)
    }
}

/// How long the next piece of an error answer is waited for.
const ERROR_READ_WAIT: Duration = Duration::from_secs(5);

/// What a call's answer holds, which sets how much of it is read and what a 404 means.
#[derive(Clone, Copy)]
enum Expect {
    /// One action: a 404 in the API's shape says the id is unknown.
    Action,
    /// A list of up to this many actions.
    Page(u32),
}

impl Expect {
    fn cap(self) -> Cap {
        match self {
            Expect::Action => Cap::ACTION,
            Expect::Page(n) => Cap::page(n),
        }
    }
}

/// The statuses of an action that has not finished.
pub const UNFINISHED: [&str; 2] = ["Pending", "InProgress"];

/// The `$filter` forms a sweep can list the tenant with. Only `status eq` and
/// `creationDateTimeUtc ge` are documented, so each form is tried at run time and dropped for
/// good (until restart) on a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepFilter {
    /// `creationDateTimeUtc ge T`: every action created since the oldest one tracked, in any
    /// status, so finished ones are seen without another call.
    CreatedSince,
    /// `status in ('Pending','InProgress')`: every unfinished action of the tenant; a tracked
    /// action missing from it has finished and needs one targeted fetch.
    StatusIn,
    /// The same with `eq` terms joined by `or`.
    StatusEqOr,
}

impl SweepFilter {
    pub const ALL: [SweepFilter; 3] = [
        SweepFilter::CreatedSince,
        SweepFilter::StatusIn,
        SweepFilter::StatusEqOr,
    ];

    /// The filter text; `since` is the creation time to list from (only `CreatedSince`).
    pub fn text(self, since: &str) -> String {
        match self {
            SweepFilter::CreatedSince => format!("creationDateTimeUtc ge {since}"),
            SweepFilter::StatusIn => {
                let quoted: Vec<String> = UNFINISHED.iter().map(|s| format!("'{s}'")).collect();
                format!("status in ({})", quoted.join(","))
            }
            SweepFilter::StatusEqOr => UNFINISHED
                .iter()
                .map(|s| format!("status eq '{s}'"))
                .collect::<Vec<_>>()
                .join(" or "),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SweepFilter::CreatedSince => "created_since",
            SweepFilter::StatusIn => "status_in",
            SweepFilter::StatusEqOr => "status_eq_or",
        }
    }

    /// Whether the listing holds finished actions too (so nothing missing from it finished).
    pub fn lists_finished(self) -> bool {
        self == SweepFilter::CreatedSince
    }

    /// Why an action listed with `status` and `created` cannot be in this listing, if it
    /// cannot: the service then ignores the form.
    fn contradicted_by(
        self,
        id: &str,
        status: &ActionStatus,
        created: Option<&str>,
        since: Option<SystemTime>,
    ) -> Option<String> {
        match self {
            SweepFilter::CreatedSince => {
                let since = since?;
                // Stored times are cut to milliseconds, as is `since`: compare like with like.
                let text = created?;
                let created = crate::domain::parse_time_millis(text)?;
                (created < since).then(|| {
                    format!(
                        "{id} was created at {text}, before the filter's {}",
                        crate::domain::format_time(since)
                    )
                })
            }
            SweepFilter::StatusIn | SweepFilter::StatusEqOr => (!UNFINISHED
                .contains(&status.as_str()))
            .then(|| format!("{id} has status {status}")),
        }
    }
}

/// One page of a listing, in the service's order. A sweep page holds up to 10,000
/// actions, and most have not changed since the last sweep: each entry keeps only what
/// matching needs (the id as a number, the status) and where its JSON lies in the body,
/// which stays the one copy of the text. The whole action is read (`action`) only for
/// the entries that are written.
#[derive(Debug, Default)]
pub struct ListPage {
    body: String,
    pub listed: Vec<Listed>,
    /// Entries on the page, readable or not: fewer than `$top` means the last page.
    pub entries: usize,
    pub unreadable: Vec<String>,
}

/// One readable entry of a `ListPage`.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: u128,
    pub status: ActionStatus,
    /// Its `type`: 1 + the index in `domain::ACTION_TYPES`, 0 for another or none.
    kind: u8,
    /// Since when it has been in its status, as far as the entry says (its last update
    /// time, else its creation), for an entry not finished; None otherwise.
    pub since: Option<SystemTime>,
    /// Where the entry's JSON object lies in the page's body.
    span: (u32, u32),
}

impl Listed {
    pub fn id(&self) -> ActionId {
        ActionId::from_key(self.key)
    }

    /// MDE's `type` when it is one of the documented ones, else "other".
    pub fn kind(&self) -> &'static str {
        usize::from(self.kind)
            .checked_sub(1)
            .and_then(|i| crate::domain::ACTION_TYPES.get(i))
            .copied()
            .unwrap_or("other")
    }
}

/// The fields of a listed action that matching needs, borrowed from the body where they
/// need no unescaping; the rest of the object is skipped, not copied.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireListed<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(borrow, default)]
    creation_date_time_utc: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    last_update_date_time_utc: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    last_update_time_utc: Option<Cow<'a, str>>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<Cow<'a, str>>,
}

impl ListPage {
    /// Reads a list answer. A body that is not a `{"value": [...]}` object fails the whole
    /// answer; an entry that cannot be read goes to `unreadable` and the rest stand. With
    /// `listing`, an entry the filter could not have listed fails the answer as
    /// `FilterIgnored`.
    pub fn parse(
        body: String,
        listing: Option<(SweepFilter, Option<SystemTime>)>,
    ) -> Result<Self, MdeError> {
        #[derive(Deserialize)]
        struct Page<'a> {
            #[serde(borrow)]
            value: Vec<&'a RawValue>,
        }
        let mut listed = Vec::new();
        let mut unreadable = Vec::new();
        let entries = {
            let page: Page = serde_json::from_str(&body).map_err(|e| MdeError::Transient {
                status: Some(200),
                message: format!("unreadable list answer ({} bytes): {e}", body.len()),
            })?;
            listed.reserve_exact(page.value.len());
            let base = body.as_ptr() as usize;
            for raw in &page.value {
                let text = raw.get();
                let w = match serde_json::from_str::<WireListed>(text) {
                    Ok(w) => w,
                    Err(e) => {
                        unreadable.push(format!("unreadable MachineAction: {e}"));
                        continue;
                    }
                };
                let Some(key) = crate::domain::guid_key(&w.id) else {
                    let why = ActionId::parse(&w.id).err().map(|e| e.to_string());
                    unreadable.push(format!("answer has a bad id: {}", why.unwrap_or_default()));
                    continue;
                };
                let status = ActionStatus::parse(&w.status);
                if let Some((filter, since)) = listing
                    && let Some(why) = filter.contradicted_by(
                        &w.id,
                        &status,
                        w.creation_date_time_utc.as_deref(),
                        since,
                    )
                {
                    return Err(MdeError::FilterIgnored(format!(
                        "{} listing: {why}",
                        filter.as_str()
                    )));
                }
                let since = (!status.is_terminal())
                    .then(|| {
                        w.last_update_date_time_utc
                            .as_deref()
                            .or(w.last_update_time_utc.as_deref())
                            .or(w.creation_date_time_utc.as_deref())
                            .and_then(crate::domain::parse_time)
                    })
                    .flatten();
                let kind = w
                    .kind
                    .as_deref()
                    .and_then(|k| crate::domain::ACTION_TYPES.iter().position(|t| *t == k))
                    .and_then(|i| u8::try_from(i).ok())
                    .map_or(0, |i| i.saturating_add(1));
                listed.push(Listed {
                    key,
                    status,
                    kind,
                    since,
                    // A sub-slice of the body (capped far below 4 GiB), so the offset fits.
                    span: (
                        (text.as_ptr() as usize).saturating_sub(base) as u32,
                        text.len() as u32,
                    ),
                });
            }
            page.value.len()
        };
        let mut page = Self {
            body,
            listed,
            entries,
            unreadable,
        };
        page.resolve_duplicates();
        Ok(page)
    }

    /// The page's buffer, emptied, for the next page (`MdeClient::list_page`).
    pub fn into_buffer(self) -> Vec<u8> {
        let mut buffer = self.body.into_bytes();
        buffer.clear();
        buffer
    }

    /// The entry's JSON object as MDE sent it.
    pub fn raw(&self, l: &Listed) -> &str {
        let (start, len) = (l.span.0 as usize, l.span.1 as usize);
        self.body
            .get(start..start.saturating_add(len))
            .unwrap_or("")
    }

    /// Whether the entry says nothing the store lacks, given the update time stored for
    /// it (`DueAction::updated_at`): MDE moves `lastUpdateDateTimeUtc` with each change of
    /// an action, so the same status (the caller compares it) and the same update time
    /// are the same answer. A live response's commands progress under one status and
    /// nothing documents that they move the update time, so such an entry is never taken
    /// as unchanged; nor is one without an update time.
    pub fn unchanged_since(&self, l: &Listed, stored_updated_at: Option<&str>) -> bool {
        let Some(stored) = stored_updated_at.and_then(crate::domain::parse_time) else {
            return false;
        };
        serde_json::from_str::<WireListed>(self.raw(l)).is_ok_and(|w| {
            w.kind.as_deref() != Some("LiveResponse")
                && w.last_update_date_time_utc
                    .or(w.last_update_time_utc)
                    .and_then(|t| crate::domain::parse_time_millis(&t))
                    == Some(stored)
        })
    }

    /// The whole action of an entry.
    pub fn action(&self, l: &Listed) -> Result<FetchedAction, String> {
        FetchedAction::from_json(self.raw(l))
    }

    /// One answer listing an id more than once: the copy updated last is the one to
    /// believe. Copies updated at the same moment that disagree on the status say nothing
    /// reliable, so none is kept (the id counts as not listed this time) and the conflict
    /// goes to `unreadable`.
    fn resolve_duplicates(&mut self) {
        let mut keys = std::collections::HashSet::with_capacity(self.listed.len());
        let repeated: std::collections::HashSet<u128> = self
            .listed
            .iter()
            .filter(|l| !keys.insert(l.key))
            .map(|l| l.key)
            .collect();
        if repeated.is_empty() {
            return;
        }
        let updated = |l: &Listed| {
            serde_json::from_str::<WireListed>(self.raw(l))
                .ok()
                .and_then(|w| w.last_update_date_time_utc.or(w.last_update_time_utc))
                .and_then(|t| normalize_time(&t))
                .and_then(|t| crate::domain::parse_time(&t))
        };
        let mut keep = vec![true; self.listed.len()];
        let mut conflicts = Vec::new();
        for key in &repeated {
            let at: Vec<usize> = (0..self.listed.len())
                .filter(|&i| self.listed[i].key == *key)
                .collect();
            let latest = at.iter().map(|&i| updated(&self.listed[i])).max().flatten();
            let newest: Vec<usize> = at
                .iter()
                .copied()
                .filter(|&i| updated(&self.listed[i]) == latest)
                .collect();
            let status = &self.listed[newest[0]].status;
            let agreed = newest.iter().all(|&i| self.listed[i].status == *status);
            for &i in &at {
                keep[i] = agreed && i == newest[0];
            }
            if !agreed {
                conflicts.push(format!(
                    "{} is listed {} times with conflicting statuses ({}) and the same update time; nothing recorded for it from this answer",
                    ActionId::from_key(*key),
                    at.len(),
                    newest
                        .iter()
                        .map(|&i| self.listed[i].status.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        self.unreadable.append(&mut conflicts);
        let mut keep = keep.into_iter();
        self.listed.retain(|_| keep.next().unwrap_or(false));
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay as they are).
fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len().saturating_mul(2));
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn parse_list(body: String, ids: &[ActionId]) -> Result<ListAnswer, MdeError> {
    let page = ListPage::parse(body, None)?;
    let mut answer = ListAnswer {
        unreadable: page.unreadable.clone(),
        ..ListAnswer::default()
    };
    let asked: std::collections::HashSet<&ActionId> = ids.iter().collect();
    for l in &page.listed {
        let a = match page.action(l) {
            Ok(a) => a,
            Err(e) => {
                answer.unreadable.push(e);
                continue;
            }
        };
        // An action not asked for means the service did not apply the filter: nothing in
        // such an answer can be trusted to be complete.
        if !asked.contains(&a.id) {
            return Err(MdeError::FilterIgnored(format!(
                "the answer to an id list holds {}, which was not asked for",
                a.id
            )));
        }
        answer.actions.insert(a.id.clone(), a);
    }
    Ok(answer)
}

fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: String,
    single: bool,
    url: &str,
) -> Result<String, MdeError> {
    if status.is_success() {
        return Ok(body);
    }
    let detail = describe_error_body(&body);
    let code = status.as_u16();
    Err(match code {
        // Only the API's own error body says the id is unknown; a proxy's page says nothing.
        404 if single && is_api_error(&body) => MdeError::NotFound,
        404 => MdeError::NotApi {
            url: redact_query(url),
            detail,
        },
        401 => MdeError::Unauthorized(detail),
        431 => MdeError::TokenUnusable {
            status: code,
            detail,
        },
        // HTTP.sys and gateways answer an oversized header with a 400 page of their own; the
        // API's 400s are its JSON error shape.
        400 if !is_api_error(&body) && body.to_ascii_lowercase().contains("header") => {
            MdeError::TokenUnusable {
                status: code,
                detail,
            }
        }
        403 => MdeError::Forbidden(detail),
        429 => MdeError::RateLimited { retry_after },
        400 if !single => MdeError::FilterRejected(detail),
        408 | 500..=599 => MdeError::Transient {
            status: Some(code),
            message: format!("HTTP {code} from MDE{}", detail_suffix(&detail)),
        },
        _ => MdeError::Rejected {
            status: code,
            message: format!("HTTP {code} from MDE{}", detail_suffix(&detail)),
        },
    })
}

/// Whether `body` is the API's JSON error shape (`{"error": {...}}`), whatever its `code`.
fn is_api_error(body: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(body.trim())
        .is_ok_and(|v| v.get("error").is_some_and(serde_json::Value::is_object))
}

/// A URL for messages: list calls carry up to 150 ids in their query, which says nothing.
fn redact_query(url: &str) -> String {
    let url = crate::secret::redact_userinfo(url);
    match url.split_once('?') {
        Some((path, _)) => format!("{path}?…"),
        None => url,
    }
}

/// A 403's message in a line, for `/readyz` and `doctor`: the roles it names, when it names
/// them, and what to do.
pub fn explain_refusal(detail: &str) -> String {
    match roles_in_refusal(detail) {
        Some((required, has)) => format!(
            "MDE refuses the app (403): it needs one of the application roles {} (WindowsDefenderATP){}; grant one with an admin's consent",
            required.join(", "),
            if has.is_empty() {
                String::new()
            } else {
                format!("; it has {}", has.join(", "))
            }
        ),
        None => format!(
            "MDE refuses the app (403): {detail}; grant the application permission Machine.Read.All (WindowsDefenderATP) with an admin's consent"
        ),
    }
}

/// The roles a 403 says the API requires and the app has: `Missing application roles. API
/// required roles: A,B, application roles: C.` or the older `... the required application
/// permissions (A, B)`. For explanations only: classification never reads message text.
pub fn roles_in_refusal(detail: &str) -> Option<(Vec<String>, Vec<String>)> {
    let split = |s: &str| -> Vec<String> {
        s.split(',')
            .map(|r| r.trim().trim_end_matches('.').trim().to_string())
            .filter(|r| !r.is_empty())
            .collect()
    };
    if let Some((_, rest)) = detail.split_once("required roles:") {
        let (required, has) = match rest.split_once("application roles:") {
            Some((req, has)) => (req.trim().trim_end_matches(','), has),
            None => (rest, ""),
        };
        return Some((split(required), split(has)));
    }
    let (_, rest) = detail.split_once("required application permissions")?;
    let inner = rest.split_once('(')?.1.split_once(')')?.0;
    Some((split(inner), Vec::new()))
}

/// Turns an error body into one readable line: the OData error's code and message, an HTML
/// page's title, or the start of whatever else came.
pub fn describe_error_body(body: &str) -> String {
    #[derive(Deserialize)]
    struct Envelope {
        error: ErrorBody,
    }
    #[derive(Deserialize)]
    struct ErrorBody {
        #[serde(default)]
        code: Option<String>,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        target: Option<String>,
    }
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return String::new();
    }
    if let Ok(env) = serde_json::from_str::<Envelope>(trimmed) {
        let e = env.error;
        let mut parts = Vec::new();
        if let Some(c) = e.code.filter(|c| !c.is_empty()) {
            parts.push(c);
        }
        if let Some(m) = e.message.filter(|m| !m.is_empty()) {
            parts.push(m);
        }
        let mut s = parts.join(": ");
        if let Some(t) = e.target.filter(|t| !t.is_empty()) {
            s.push_str(&format!(" (target {t})"));
        }
        return snippet(&s);
    }
    if trimmed.starts_with('<') {
        let lower = trimmed.to_ascii_lowercase();
        if let (Some(a), Some(b)) = (lower.find("<title>"), lower.find("</title>"))
            && let Some(title) = trimmed.get(a.saturating_add("<title>".len())..b)
        {
            return format!("HTML page: {}", snippet(title.trim()));
        }
        return "HTML page".to_string();
    }
    snippet(trimmed)
}

fn snippet(s: &str) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(ERROR_SNIPPET)
        .collect();
    if s.chars().count() > ERROR_SNIPPET {
        format!("{one_line}…")
    } else {
        one_line
    }
}

/// `Retry-After` as delay-seconds or an HTTP date, at most `MAX_RETRY_AFTER` (with a warning
/// naming the value). Never panics, whatever the header holds.
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = retry_after_value(value, now)?;
    if wait > MAX_RETRY_AFTER {
        tracing::warn!(
            retry_after = value,
            "Retry-After is longer than an hour, the longest window of the API's limits; pausing for an hour"
        );
        return Some(MAX_RETRY_AFTER);
    }
    Some(wait)
}

fn retry_after_value(value: &str, now: SystemTime) -> Option<Duration> {
    if value.bytes().all(|b| b.is_ascii_digit()) && !value.is_empty() {
        // Digits too many for u64 are still a (very long) delay.
        return Some(
            value
                .parse::<u64>()
                .map(Duration::from_secs)
                .unwrap_or(Duration::MAX),
        );
    }
    if let Ok(secs) = value.parse::<f64>()
        && secs >= 0.0
    {
        return Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "2e9da30d-27f6-4208-81f2-9cd3d67893ba";
    const ID2: &str = "4c3f1a2b-0d5e-4f6a-8b7c-9d0e1f2a3b4c";
    const ID3: &str = "7a8b9c0d-1e2f-4a3b-8c4d-5e6f7a8b9c0d";

    #[test]
    fn reads_the_documented_example_and_both_field_spellings() {
        let doc = r#"{
            "@odata.context": "https://api.securitycenter.windows.com/api/$metadata#MachineActions/$entity",
            "id": "2e9da30d-27f6-4208-81f2-9cd3d67893ba", "type": "RunAntiVirusScan",
            "requestor": "Analyst@contoso.com", "requestorComment": "Check machine for viruses due to alert 3212",
            "status": "Succeeded", "machineId": "f46b9bb259ed4a7fb9981b73510e3cc7aa81ec1f",
            "creationDateTimeUtc": "2018-12-04T12:18:27.1293487Z",
            "lastUpdateTimeUtc": "2018-12-04T12:18:57.5511934Z", "relatedFileInfo": null,
            "externalID": "ext-1", "someNewField": {"nested": [1, 2]}
        }"#;
        let a = FetchedAction::from_json(doc).unwrap();
        assert_eq!(a.id.as_str(), ID);
        assert_eq!(a.status, ActionStatus::Succeeded);
        let o = &a.observation;
        assert_eq!(o.updated_at.as_deref(), Some("2018-12-04T12:18:57.551Z"));
        assert_eq!(
            o.fields.mde_created_at.as_deref(),
            Some("2018-12-04T12:18:27.129Z")
        );
        assert_eq!(o.fields.external_id.as_deref(), Some("ext-1"));
        assert_eq!(o.fields.action_type.as_deref(), Some("RunAntiVirusScan"));
        assert_eq!(o.raw, doc);

        let both = format!(
            r#"{{"id":"{ID}","status":"Pending","lastUpdateDateTimeUtc":"2020-01-01T00:00:00Z","lastUpdateTimeUtc":"2019-01-01T00:00:00Z","type":"SomethingNew"}}"#
        );
        let a = FetchedAction::from_json(&both).unwrap();
        assert_eq!(
            a.observation.updated_at.as_deref(),
            Some("2020-01-01T00:00:00.000Z")
        );
        assert_eq!(
            a.observation.fields.action_type.as_deref(),
            Some("SomethingNew")
        );
    }

    #[test]
    fn missing_status_or_bad_id_is_an_error() {
        assert!(FetchedAction::from_json(&format!(r#"{{"id":"{ID}"}}"#)).is_err());
        assert!(FetchedAction::from_json(r#"{"id":"nope","status":"Pending"}"#).is_err());
    }

    #[test]
    fn list_answers_hold_only_requested_ids() {
        let other = "11111111-2222-3333-4444-555555555555";
        let body = format!(
            r#"{{"@odata.context":"x","value":[{{"id":"{ID}","status":"InProgress"}},{{"id":"{other}","status":"Failed"}},{{"id":"{ID}"}}]}}"#
        );
        let ids = [ActionId::parse(ID).unwrap()];
        // An id not asked for: the service ignored the filter.
        assert!(matches!(
            parse_list(body.clone(), &ids),
            Err(MdeError::FilterIgnored(_))
        ));
        let both = [ids[0].clone(), ActionId::parse(other).unwrap()];
        let answer = parse_list(body.clone(), &both).unwrap();
        assert_eq!(answer.actions.len(), 2);
        assert_eq!(answer.unreadable.len(), 1);
        assert!(parse_list(body[..body.len() / 2].to_string(), &ids).is_err());
    }

    #[test]
    fn error_bodies_become_one_line() {
        assert_eq!(
            describe_error_body(
                r#"{"error":{"code":"ResourceNotFound","message":"Action not found","target":"abc"}}"#
            ),
            "ResourceNotFound: Action not found (target abc)"
        );
        assert_eq!(
            describe_error_body(r#"{"error":{"code":"","message":"Oops","details":[]}}"#),
            "Oops"
        );
        assert_eq!(
            describe_error_body("<html><head><TITLE>502 Bad Gateway</TITLE></head></html>"),
            "HTML page: 502 Bad Gateway"
        );
        assert_eq!(describe_error_body("{\"error\":{\"co"), "{\"error\":{\"co");
        assert_eq!(describe_error_body(""), "");
    }

    #[test]
    fn classification() {
        let with_body = |code: u16, single: bool, body: &str| {
            classify(
                StatusCode::from_u16(code).unwrap(),
                None,
                body.to_string(),
                single,
                "https://api.example/api/machineactions?$filter=secret-ids",
            )
            .unwrap_err()
        };
        let c = |code: u16, single: bool| with_body(code, single, "");
        let api_404 =
            r#"{"error":{"code":"ResourceNotFound","message":"Action not found","target":"x"}}"#;
        // Only the API's own error body says the id is unknown.
        assert_eq!(with_body(404, true, api_404), MdeError::NotFound);
        assert_eq!(
            with_body(
                404,
                true,
                r#"{"error":{"code":"","message":"gone","details":[]}}"#
            ),
            MdeError::NotFound
        );
        for body in ["", "<html><title>404 Not Found</title></html>", "Not Found"] {
            let e = with_body(404, true, body);
            assert!(matches!(e, MdeError::NotApi { .. }), "{body:?}: {e:?}");
            let text = e.to_string();
            assert!(
                text.contains("https://api.example/api/machineactions?…"),
                "{text}"
            );
            assert!(
                !text.contains("secret-ids") && text.contains("api.base_url"),
                "{text}"
            );
        }
        // A list call's 404 names the URL, whatever its body: it is not about permissions.
        let e = with_body(404, false, api_404);
        assert!(matches!(e, MdeError::NotApi { .. }), "{e:?}");
        assert!(!e.to_string().contains("permission"), "{e}");
        assert!(matches!(c(400, false), MdeError::FilterRejected(_)));
        assert!(matches!(c(400, true), MdeError::Rejected { .. }));
        assert!(matches!(c(403, true), MdeError::Forbidden(_)));
        assert!(matches!(
            c(503, true),
            MdeError::Transient {
                status: Some(503),
                ..
            }
        ));
        assert!(matches!(c(401, true), MdeError::Unauthorized(_)));
        assert!(matches!(
            c(429, true),
            MdeError::RateLimited { retry_after: None }
        ));
    }

    #[test]
    fn refusals_name_the_roles() {
        assert_eq!(
            roles_in_refusal(
                "Forbidden: Missing application roles. API required roles: Machine.Read.All,Machine.ReadWrite.All, application roles: Machine.Isolate."
            ),
            Some((
                vec!["Machine.Read.All".into(), "Machine.ReadWrite.All".into()],
                vec!["Machine.Isolate".into()]
            ))
        );
        assert_eq!(
            roles_in_refusal(
                "The application does not have any of the required application permissions (Machine.ReadWrite.All, Machine.Read.All) to access the resource."
            ),
            Some((
                vec!["Machine.ReadWrite.All".into(), "Machine.Read.All".into()],
                vec![]
            ))
        );
        assert_eq!(roles_in_refusal("Forbidden"), None);
    }

    #[test]
    fn the_full_entity_is_read_and_odd_fields_do_not_cost_the_action() {
        let doc = format!(
            r#"{{"id":"{ID}","type":"LiveResponse","status":"Cancelled","title":null,"scope":"Selective",
            "requestSource":"PublicApi","errorHResult":-2147024891,"cancellationRequestor":"lead@contoso.com",
            "cancellationComment":"wrong device","cancellationDateTimeUtc":"2026-11-30T10:00:01.93Z",
            "creationDateTimeUtc":"2026-11-30T09:59:00.1Z","lastUpdateDateTimeUtc":"2026-11-30T10:00:01.9316Z",
            "commands":[{{"index":0,"commandStatus":"Completed","errors":[],"command":{{"type":"RunScript","params":[]}}}}]}}"#
        );
        let o = FetchedAction::from_json(&doc).unwrap().observation;
        assert_eq!(o.fields.scope.as_deref(), Some("Selective"));
        assert_eq!(o.fields.request_source.as_deref(), Some("PublicApi"));
        assert_eq!(o.fields.error_hresult, Some(-2147024891));
        assert_eq!(
            o.fields.cancellation_requestor.as_deref(),
            Some("lead@contoso.com")
        );
        assert_eq!(
            o.fields.cancellation_comment.as_deref(),
            Some("wrong device")
        );
        assert_eq!(
            o.fields.cancelled_at.as_deref(),
            Some("2026-11-30T10:00:01.930Z")
        );
        assert_eq!(
            o.fields.mde_created_at.as_deref(),
            Some("2026-11-30T09:59:00.100Z")
        );
        assert_eq!(o.updated_at.as_deref(), Some("2026-11-30T10:00:01.931Z"));
        assert_eq!(o.fields.title, None);
        let odd = format!(
            r#"{{"id":"{ID}","status":"Pending","title":{{"x":1}},"errorHResult":"0x80004005","scope":7}}"#
        );
        let o = FetchedAction::from_json(&odd).unwrap().observation;
        assert_eq!(
            (o.fields.title, o.fields.error_hresult, o.fields.scope),
            (None, None, None)
        );
    }

    #[test]
    fn listings_that_contradict_their_filter_are_caught() {
        let page = |status: &str, created: &str| {
            format!(
                r#"{{"value":[{{"id":"{ID}","status":"{status}","creationDateTimeUtc":"{created}"}}]}}"#
            )
        };
        let since = crate::domain::parse_time("2026-11-30T10:00:00.000Z");
        let early = page("Pending", "2026-11-30T09:59:59.99Z");
        let late = page("Succeeded", "2026-11-30T10:00:00.0004Z");
        let ignored = |body: &String, filter, since| {
            matches!(
                ListPage::parse(body.clone(), Some((filter, since))),
                Err(MdeError::FilterIgnored(_))
            )
        };
        assert!(ignored(&early, SweepFilter::CreatedSince, since));
        assert!(!ignored(&late, SweepFilter::CreatedSince, since));
        assert!(ignored(&late, SweepFilter::StatusIn, None));
        assert!(!ignored(&early, SweepFilter::StatusEqOr, None));
        // Without a listing to check against (an id list), nothing is contradicted.
        assert_eq!(ListPage::parse(early, None).unwrap().listed.len(), 1);
    }

    #[test]
    fn a_listed_answer_is_unchanged_only_with_the_stored_update_time() {
        let page = ListPage::parse(
            format!(
                r#"{{"value":[
                {{"id":"{ID}","type":"Isolate","status":"InProgress","lastUpdateDateTimeUtc":"2026-11-30T10:00:01.9316312Z"}},
                {{"id":"{ID2}","type":"LiveResponse","status":"InProgress","lastUpdateTimeUtc":"2026-11-30T10:00:01.93Z"}},
                {{"id":"{ID3}","status":"Pending"}}]}}"#
            ),
            None,
        )
        .unwrap();
        let [isolate, live, bare] = &page.listed[..] else {
            panic!("{:?}", page.listed)
        };
        // The stored time is the normalized one: fractional digits past the millisecond
        // say nothing new.
        let stored = "2026-11-30T10:00:01.931Z";
        assert!(page.unchanged_since(isolate, Some(stored)));
        assert!(!page.unchanged_since(isolate, Some("2026-11-30T10:00:01.932Z")));
        assert!(!page.unchanged_since(isolate, None));
        // A live response's commands move under one status: always read in full.
        assert!(!page.unchanged_since(live, Some("2026-11-30T10:00:01.930Z")));
        assert!(!page.unchanged_since(bare, Some(stored)));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(parse_retry_after(&h, now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(42));
        h.insert(RETRY_AFTER, later.parse().unwrap());
        assert_eq!(parse_retry_after(&h, now), Some(Duration::from_secs(42)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(parse_retry_after(&h, now), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h, now), None);
    }

    #[test]
    fn duplicate_entries_resolve_to_the_latest_update_or_to_nothing() {
        let entry = |status: &str, updated: &str| {
            format!(
                r#"{{"id": "{ID}", "type": "Isolate", "status": "{status}", "lastUpdateDateTimeUtc": "{updated}"}}"#
            )
        };
        let page = |entries: &[String]| format!(r#"{{"value": [{}]}}"#, entries.join(","));
        let later = page(&[
            entry("Pending", "2026-11-28T10:00:00Z"),
            entry("Succeeded", "2026-11-28T10:00:09.5Z"),
            entry("InProgress", "2026-11-28T10:00:05Z"),
        ]);
        let p = ListPage::parse(later, None).unwrap();
        assert_eq!(p.entries, 3);
        assert_eq!(p.listed.len(), 1);
        assert_eq!(p.listed[0].status.as_str(), "Succeeded");
        assert!(p.raw(&p.listed[0]).contains("10:00:09.5Z"));
        assert!(p.unreadable.is_empty());
        let same = page(&[
            entry("InProgress", "2026-11-28T10:00:05Z"),
            entry("InProgress", "2026-11-28T10:00:05Z"),
        ]);
        assert_eq!(ListPage::parse(same, None).unwrap().listed.len(), 1);
        let conflict = page(&[
            entry("Failed", "2026-11-28T10:00:05Z"),
            entry("Succeeded", "2026-11-28T10:00:05Z"),
            entry("Pending", "2026-11-28T10:00:00Z"),
        ]);
        let p = ListPage::parse(conflict, None).unwrap();
        assert!(p.listed.is_empty());
        assert!(
            p.unreadable[0].contains("conflicting"),
            "{:?}",
            p.unreadable
        );
    }

    #[test]
    fn a_listed_entry_keeps_its_verbatim_json_and_reads_in_full_on_demand() {
        // Escapes cannot be borrowed: the status and the id still read right.
        let body = format!(
            r#"{{"value": [{{"id": "{}", "status": "In\u0050rogress", "requestor": "a\"b", "extra": [1, {{"x": null}}]}}, {{"id": "nope", "status": "Pending"}}, 7]}}"#,
            ID.to_uppercase()
        );
        let p = ListPage::parse(body, None).unwrap();
        assert_eq!(p.entries, 3);
        assert_eq!(p.listed.len(), 1);
        assert_eq!(p.unreadable.len(), 2, "{:?}", p.unreadable);
        let l = &p.listed[0];
        assert_eq!(l.status, ActionStatus::InProgress);
        assert_eq!(l.id().as_str(), ID);
        assert!(p.raw(l).starts_with(r#"{"id""#) && p.raw(l).ends_with("}]}"));
        let full = p.action(l).unwrap();
        assert_eq!(full.observation.fields.requestor.as_deref(), Some("a\"b"));
        assert_eq!(full.observation.raw, p.raw(l));
    }

    #[test]
    fn hostile_retry_after_values_are_capped_at_an_hour_and_never_panic() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let read = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, v.parse().unwrap());
            parse_retry_after(&h, now)
        };
        for v in [
            "315360000",
            "99999999999999999999999",
            "1e300",
            "1e400",
            "inf",
            "Fri, 01 Jan 2100 00:00:00 GMT",
        ] {
            assert_eq!(read(v), Some(MAX_RETRY_AFTER), "{v}");
        }
        assert_eq!(read("3599.5"), Some(Duration::from_secs_f64(3599.5)));
        for v in ["-5", "NaN", "-inf", ""] {
            assert_eq!(read(v), None, "{v}");
        }
    }

    #[test]
    fn list_urls_stay_well_under_8kb() {
        let mut rng = fastrand::Rng::with_seed(1);
        let ids: Vec<ActionId> = (0..crate::config::MAX_BATCH_SIZE)
            .map(|_| ActionId::random(&mut rng))
            .collect();
        let client = MdeClient::new(
            http_client(Duration::from_secs(5), Duration::from_secs(5)).unwrap(),
            "https://api.securitycenter.microsoft.com/",
        );
        let url = client.list_url(&ids);
        assert!(url.len() < 7_200, "{}", url.len());
        assert!(url.starts_with(
            "https://api.securitycenter.microsoft.com/api/machineactions?$filter=id%20in%20('"
        ));
        assert!(reqwest::Url::parse(&url).is_ok());
    }

    /// One listed entry as a hostile service might write it: an id asked for or not, any
    /// status, times and fields of odd types, sometimes not an object at all.
    fn entry(asked: Vec<String>) -> impl Strategy<Value = String> {
        let id = prop_oneof![
            proptest::sample::select(asked).prop_map(|s| format!("\"{s}\"")),
            any::<u128>().prop_map(|n| format!("\"{}\"", guid(n))),
            Just("null".to_string()),
            Just("42".to_string()),
        ];
        let status = prop_oneof![
            Just("\"Succeeded\""),
            Just("\"Pending\""),
            Just("\"InProgress\""),
            Just("\"Cancelled\""),
            Just("\"Bogus\""),
            Just("7"),
        ];
        let time = prop_oneof![
            Just("\"2026-01-01T00:00:00.1234567Z\"".to_string()),
            Just("\"9999-99-99T99:99:99Z\"".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
        ];
        let odd = prop_oneof![
            Just("{}".to_string()),
            any::<f64>().prop_map(|f| if f.is_finite() {
                format!("{f:e}")
            } else {
                "0".into()
            }),
            "\"[^\"\\\\]{0,20}\"",
        ];
        (id, status, time, odd, 0u8..10).prop_map(|(id, status, time, odd, shape)| match shape {
            0 => "[]".to_string(),
            1 => odd,
            _ => format!(
                r#"{{"id":{id},"status":{status},"lastUpdateDateTimeUtc":{time},"errorHResult":{odd},"title":{odd},"commands":[{odd}]}}"#
            ),
        })
    }

    fn guid(n: u128) -> String {
        crate::domain::ActionId::from_key(n).to_string()
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in ".{0,400}") {
            let _ = describe_error_body(&body);
            let _ = FetchedAction::from_json(&body);
            let _ = parse_list(body.clone(), &[]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let body = String::from_utf8_lossy(&bytes).into_owned();
            let _ = describe_error_body(&body);
            let _ = FetchedAction::from_json(&body);
            let _ = ListPage::parse(body.clone(), Some((SweepFilter::StatusIn, None)));
            let _ = parse_list(body, &[]);
        }

        /// A list answer yields only actions that were asked for, or no answer at all.
        #[test]
        fn list_answers_never_yield_an_action_outside_the_request(
            asked in proptest::collection::vec(any::<u128>(), 1..5),
            entries in proptest::collection::vec(entry(vec![guid(1), guid(2)]), 0..8),
        ) {
            let mut ids: Vec<ActionId> = asked.iter().map(|n| ActionId::parse(&guid(*n)).unwrap()).collect();
            ids.push(ActionId::parse(&guid(1)).unwrap());
            ids.push(ActionId::parse(&guid(2)).unwrap());
            let body = format!(r#"{{"value":[{}]}}"#, entries.join(","));
            if let Ok(answer) = parse_list(body, &ids) {
                for (id, action) in &answer.actions {
                    prop_assert!(ids.contains(id));
                    prop_assert_eq!(&action.id, id);
                }
            }
        }

        /// A single action's answer is about the id it names, or an error.
        #[test]
        fn single_answers_are_whole_or_refused(e in entry(vec![guid(1)])) {
            if let Ok(a) = FetchedAction::from_json(&e) {
                prop_assert!(e.contains(a.id.as_str()));
            }
        }

        /// Whatever Retry-After holds, the pause is at most an hour and nothing panics.
        #[test]
        fn retry_after_is_bounded(value in prop_oneof![
            ".{0,40}",
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| f.to_string()),
            "[0-9]{20,60}",
            Just("Fri, 31 Dec 9999 23:59:59 GMT".to_string()),
        ]) {
            let mut headers = HeaderMap::new();
            if let Ok(v) = reqwest::header::HeaderValue::from_str(&value) {
                headers.insert(RETRY_AFTER, v);
            }
            if let Some(wait) = parse_retry_after(&headers, SystemTime::now()) {
                prop_assert!(wait <= MAX_RETRY_AFTER);
            }
        }
    }
}
