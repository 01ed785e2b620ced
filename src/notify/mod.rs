//! Notifications: one sender task per destination takes its due deliveries from the outbox
//! (written by the poll transaction, see `store::outbox`), sends them, and records what
//! came of each. Delivery is at least once and in order per action; it holds no database
//! connection across a request and never touches the poll loop.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use reqwest::header::HeaderName;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{NotifyKind, Problem, Settings};
use crate::domain::{DeliveryState, HostPattern};
use crate::metrics::Metrics;
use crate::outbound::{Cap, Outbound, Policy, SendFailure};
use crate::secret::Secret;
use crate::store::{CALLBACK, DeliveryResult, DueDelivery, Route, Store};

mod format;
mod sign;

pub use sign::SigningKeys;

/// Deliveries one sender takes at a time, and how many of them are in flight at once
/// (each for a different action, so order per action holds).
const BATCH: u32 = 32;
const IN_FLIGHT: usize = 8;
/// How long an idle sender sleeps when nothing wakes it (a replay by the CLI, a
/// destination enabled again).
const IDLE: Duration = Duration::from_secs(5);
/// How much of an error answer's body is kept (logs, `notify list`).
const ANSWER_BYTES: usize = 200;

/// Where a destination's URL comes from.
#[derive(Clone, Debug)]
enum Target {
    Fixed(Secret),
    /// Each action's own `callback_url`, checked again against `callbacks.allow` at each
    /// attempt (the list may have changed since the URL was taken).
    Callback(Vec<HostPattern>),
}

/// One destination, ready to send.
#[derive(Debug)]
pub struct Destination {
    pub name: String,
    pub kind: NotifyKind,
    target: Target,
    keys: Option<SigningKeys>,
    token: Option<Secret>,
    waits: Vec<Duration>,
    /// Disabled after failing this long without a success (not for callbacks).
    disable_after: Option<Duration>,
    client: Outbound,
    /// The Defender portal of the tenant's cloud, for links in chat messages.
    portal: &'static str,
    host: String,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Delivered(u16),
    /// Worth another attempt: a 5xx, a 429, a timeout, a dropped connection.
    Retry {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
    },
    /// 400, 401, 403, 404 (or not sent at all: `status` None): this event will never be
    /// taken.
    Refused {
        status: Option<u16>,
        error: String,
    },
    /// 410: the receiver is gone for good.
    Gone {
        error: String,
    },
}

impl Answer {
    pub fn status(&self) -> Option<u16> {
        match self {
            Answer::Delivered(s) => Some(*s),
            Answer::Retry { status, .. } => *status,
            Answer::Refused { status, .. } => *status,
            Answer::Gone { .. } => Some(410),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Answer::Delivered(s) => format!("HTTP {s}"),
            Answer::Retry { error, .. }
            | Answer::Refused { error, .. }
            | Answer::Gone { error } => error.clone(),
        }
    }
}

fn read_file(path: &Path, key: &'static str) -> Result<String, Problem> {
    crate::auth::files::read_private(path, key).map_err(|message| Problem { key, message })
}

/// The signing keys in `path` (`key` names the setting in errors), if one is set.
fn read_keys(path: Option<&Path>, key: &'static str) -> Result<Option<SigningKeys>, Problem> {
    let Some(path) = path else {
        return Ok(None);
    };
    SigningKeys::parse(&read_file(path, key)?)
        .map(Some)
        .map_err(|e| Problem {
            key,
            message: format!("{}: {e}", path.display()),
        })
}

fn client(timeout: Duration, allow: Option<Vec<HostPattern>>) -> Result<Outbound, Problem> {
    let mut policy = Policy::new(timeout, timeout.min(Duration::from_secs(10)));
    if let Some(allow) = allow {
        policy.resolver = Some(Arc::new(GuardedResolver { allow }));
    }
    Outbound::new(policy).map_err(|e| Problem {
        key: "notify",
        message: e.to_string(),
    })
}

/// The destinations of `settings` (the callback one when callbacks are allowed), each
/// with its secrets read: what `run` starts and `check-config` checks.
pub fn destinations(settings: &Settings) -> Result<Vec<Destination>, Problem> {
    let portal = settings.api.cloud.portal_url();
    let host = hostname();
    let mut out = Vec::new();
    for n in &settings.notify {
        let url = match (&n.url, &n.url_file) {
            (Some(u), _) => u.clone(),
            (None, Some(path)) => {
                let text = read_file(path, "notify.url_file")?;
                crate::config::check_notify_url(&text).map_err(|e| Problem {
                    key: "notify.url_file",
                    message: format!("{}: {e}", path.display()),
                })?;
                Secret::new(text.trim())
            }
            (None, None) => {
                return Err(Problem {
                    key: "notify.url",
                    message: format!("destination '{}' has no url", n.name),
                });
            }
        };
        let keys = read_keys(n.secret_file.as_deref(), "notify.secret_file")?;
        let token = match &n.token_file {
            Some(path) => Some(Secret::new(read_file(path, "notify.token_file")?.trim())),
            None => None,
        };
        out.push(Destination {
            name: n.name.clone(),
            kind: n.kind,
            target: Target::Fixed(url),
            keys,
            token,
            waits: n.retry_waits().map_err(|message| Problem {
                key: "notify.retry_schedule",
                message,
            })?,
            disable_after: Some(n.disable_after),
            client: client(n.timeout, None)?,
            portal,
            host: host.clone(),
        });
    }
    let c = &settings.callbacks;
    if !c.allow.is_empty() {
        let keys = read_keys(c.secret_file.as_deref(), "callbacks.secret_file")?;
        out.push(Destination {
            name: CALLBACK.to_string(),
            kind: NotifyKind::Webhook,
            target: Target::Callback(c.patterns()),
            keys,
            token: None,
            waits: c.retry_waits().map_err(|message| Problem {
                key: "callbacks.retry_schedule",
                message,
            })?,
            disable_after: None,
            client: client(c.timeout, Some(c.patterns()))?,
            portal,
            host,
        });
    }
    Ok(out)
}

/// The routing rows for the store (callbacks route by their own table).
pub fn routes(settings: &Settings) -> Vec<Route> {
    settings
        .notify
        .iter()
        .map(|n| Route {
            name: n.name.clone(),
            kind: n.kind.as_str().to_string(),
            events: n.events.iter().map(|e| e.as_str().to_string()).collect(),
            types: n.types.clone(),
            statuses: n.statuses.clone(),
        })
        .collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "mde-actiond".to_string())
}

/// The wait after the `attempts`-th failed attempt (1-based), ±20% jitter; None when
/// the schedule is spent.
pub fn retry_wait(waits: &[Duration], attempts: usize) -> Option<Duration> {
    let base = *waits.get(attempts.checked_sub(1)?)?;
    Some(base.mul_f64(0.8 + 0.4 * fastrand::f64()))
}

impl Destination {
    /// Sends one event and says what came of it.
    pub async fn attempt(&self, d: &DueDelivery) -> Answer {
        let url = match &self.target {
            Target::Fixed(u) => u.expose().to_string(),
            Target::Callback(allow) => match &d.callback_url {
                Some(u) => {
                    if let Err(why) = crate::domain::check_callback_url(u, allow) {
                        return Answer::Refused {
                            status: None,
                            error: format!("not sent: {why}"),
                        };
                    }
                    u.clone()
                }
                None => {
                    return Answer::Refused {
                        status: None,
                        error: "the action's callback URL is gone (pruned with the action)".into(),
                    };
                }
            },
        };
        self.send(&url, &d.event_id, &d.payload).await
    }

    /// Sends a test envelope to a fixed destination (`notify test`).
    pub async fn send_test(&self, id: &str, envelope: &str) -> Answer {
        match &self.target {
            Target::Fixed(u) => self.send(u.expose(), id, envelope).await,
            Target::Callback(_) => Answer::Refused {
                status: None,
                error: "callbacks have no URL of their own to test".into(),
            },
        }
    }

    /// Sends `envelope` as event `id` to `url`.
    async fn send(&self, url: &str, id: &str, envelope: &str) -> Answer {
        let url = match self.kind {
            NotifyKind::SplunkHec => splunk_endpoint(url),
            NotifyKind::Webhook | NotifyKind::Teams | NotifyKind::Slack => url.to_string(),
        };
        let body = format::body(self.kind, envelope, self.portal, &self.host);
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut req = self
            .client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(HeaderName::from_static("webhook-id"), id)
            .header(
                HeaderName::from_static("webhook-timestamp"),
                &timestamp.to_string(),
            );
        if let Some(keys) = &self.keys {
            req = req.header(
                HeaderName::from_static("webhook-signature"),
                &keys.sign(id, timestamp, &body),
            );
        }
        if let Some(t) = &self.token {
            req = match self.kind {
                NotifyKind::SplunkHec => req.header(
                    reqwest::header::AUTHORIZATION,
                    &format!("Splunk {}", t.expose()),
                ),
                NotifyKind::Webhook | NotifyKind::Teams | NotifyKind::Slack => {
                    req.bearer_auth(t.expose())
                }
            };
        }
        let response = match req.body(body).send().await {
            Ok(r) => r,
            Err(e) => {
                // Without the URL: Teams and Slack URLs are credentials.
                let what = match e.kind {
                    SendFailure::TimedOut => "timed out".to_string(),
                    SendFailure::Connect => format!("cannot connect: {}", e.root_cause),
                    SendFailure::Other => format!("no answer: {}", e.root_cause),
                };
                return Answer::Retry {
                    status: None,
                    error: what,
                    retry_after: None,
                };
            }
        };
        let status = response.status().as_u16();
        // The API's reading: seconds or an HTTP date, capped at an hour with a warning.
        let retry_after = crate::mde::parse_retry_after(response.headers(), SystemTime::now());
        if (200..300).contains(&status) {
            return Answer::Delivered(status);
        }
        let error = format!("HTTP {status}: {}", first_bytes(response).await);
        match status {
            410 => Answer::Gone { error },
            400 | 401 | 403 | 404 => Answer::Refused {
                status: Some(status),
                error,
            },
            429 | 503 => Answer::Retry {
                status: Some(status),
                error,
                retry_after,
            },
            _ => Answer::Retry {
                status: Some(status),
                error,
                retry_after: None,
            },
        }
    }
}

/// HEC's event endpoint, unless the URL names a path of its own.
fn splunk_endpoint(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.path() == "/" || u.path().is_empty() => {
            u.set_path("/services/collector/event");
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// The start of an error answer, on one line of printable text.
async fn first_bytes(answer: crate::outbound::Answer) -> String {
    let mut buf = answer
        .first_bytes(Cap::RECEIVER, Duration::from_secs(2))
        .await;
    buf.truncate(ANSWER_BYTES);
    let text: String = String::from_utf8_lossy(&buf)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        "(no body)".into()
    } else {
        text
    }
}

/// Resolves callback hosts, dropping loopback and link-local addresses unless the host is
/// listed exactly: a name that is allowed by a wildcard must not lead to this machine.
struct GuardedResolver {
    allow: Vec<HostPattern>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let listed = self.allow.iter().any(|p| p.matches_host_exactly(&host));
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| listed || !crate::domain::is_local_address(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!(
                    "{host} resolves only to loopback or link-local addresses, which callbacks reach only when callbacks.allow lists the host exactly"
                )
                .into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The running senders and the stuck scan.
pub struct Notifications {
    destinations: Vec<Arc<Destination>>,
    store: Store,
    metrics: Arc<Metrics>,
    stuck_after: Duration,
}

impl Notifications {
    pub fn new(
        destinations: Vec<Destination>,
        store: Store,
        metrics: Arc<Metrics>,
        stuck_after: Duration,
    ) -> Self {
        Self {
            destinations: destinations.into_iter().map(Arc::new).collect(),
            store,
            metrics,
            stuck_after,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.destinations.is_empty()
    }

    /// Starts a sender per destination and the stuck scan; they end when `stop` fires.
    pub fn spawn(
        self,
        written: tokio::sync::watch::Receiver<u64>,
        stop: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        let (scan_tx, _) = tokio::sync::watch::channel(0u64);
        for d in &self.destinations {
            let sender = Sender {
                destination: d.clone(),
                store: self.store.clone(),
                metrics: self.metrics.clone(),
            };
            let wake = written.clone();
            let scanned = scan_tx.subscribe();
            let stop = stop.clone();
            let metrics = self.metrics.clone();
            tasks.push(tokio::spawn(async move {
                crate::panics::restart_on_panic("notify", &metrics, &stop, || {
                    let (sender, mut wake, mut scanned, stop) =
                        (sender.clone(), wake.clone(), scanned.clone(), stop.clone());
                    async move { sender.run(&mut wake, &mut scanned, stop).await }
                })
                .await
            }));
        }
        if !self.destinations.is_empty() {
            tasks.push(tokio::spawn(stuck_scan(
                self.store.clone(),
                self.stuck_after,
                scan_tx,
                stop,
            )));
        }
        tasks
    }
}

/// Emits stuck events once a minute (more often when `stuck_after` is short).
async fn stuck_scan(
    store: Store,
    stuck_after: Duration,
    woke: tokio::sync::watch::Sender<u64>,
    stop: CancellationToken,
) {
    let every = (stuck_after / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match store.stuck_wanted().await {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                warn!(error = %e, "cannot check for stuck actions");
                continue;
            }
        }
        match store.emit_stuck(stuck_after, SystemTime::now(), 1000).await {
            Ok(0) => {}
            Ok(n) => {
                info!(deliveries = n, "stuck actions: events queued");
                woke.send_modify(|n| *n = n.wrapping_add(1));
            }
            Err(e) => warn!(error = %e, "cannot queue stuck events; will retry"),
        }
    }
}

#[derive(Clone)]
struct Sender {
    destination: Arc<Destination>,
    store: Store,
    metrics: Arc<Metrics>,
}

/// What a batch of attempts came to, for the store and the destination's standing.
struct Outcome {
    results: Vec<DeliveryResult>,
    any_success: bool,
    any_failure: bool,
    disable: Option<String>,
    pause: Option<Duration>,
    gone_callbacks: Vec<(String, String)>,
}

impl Sender {
    async fn run(
        &self,
        written: &mut tokio::sync::watch::Receiver<u64>,
        scanned: &mut tokio::sync::watch::Receiver<u64>,
        stop: CancellationToken,
    ) {
        let name = self.destination.name.as_str();
        let mut disabled_logged = false;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let wait = match self.step(&mut disabled_logged).await {
                Ok(Step::Again) => continue,
                Ok(Step::Pause(d)) => d,
                Ok(Step::Idle(next)) => next.unwrap_or(IDLE).min(IDLE),
                Err(e) => {
                    warn!(destination = name, error = %e, "notification outbox unreadable; retrying");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = written.changed() => {}
                _ = scanned.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn step(&self, disabled_logged: &mut bool) -> Result<Step, crate::store::StoreError> {
        let d = &*self.destination;
        if d.disable_after.is_some() {
            let standing = self.store.destination(&d.name).await?.unwrap_or_default();
            if let Some(at) = standing.disabled_at {
                if !*disabled_logged {
                    *disabled_logged = true;
                    warn!(
                        destination = d.name.as_str(),
                        since = at.as_str(),
                        reason = standing.disabled_reason.as_deref().unwrap_or(""),
                        "notification destination disabled; `mde-actiond notify enable {}` resumes it",
                        d.name
                    );
                }
                return Ok(Step::Idle(None));
            }
            *disabled_logged = false;
        }
        let now = SystemTime::now();
        let due = self.store.due_deliveries(&d.name, now, BATCH).await?;
        if due.is_empty() {
            let next = self.store.next_delivery_at(&d.name).await?;
            return Ok(Step::Idle(
                next.map(|t| t.duration_since(SystemTime::now()).unwrap_or_default()),
            ));
        }
        // Each answer is committed as soon as it is in (with any others ready at that
        // moment), not when the whole batch is: a crash then re-sends only what was in
        // flight, the one window at-least-once delivery cannot close.
        let mut answers = futures_util::stream::iter(due)
            .map(|delivery| async move {
                let answer = d.attempt(&delivery).await;
                (delivery, answer)
            })
            .buffer_unordered(IN_FLIGHT)
            .ready_chunks(IN_FLIGHT);
        let mut pause: Option<Duration> = None;
        while let Some(chunk) = answers.next().await {
            let outcome = self.judge(chunk).await?;
            self.store
                .record_deliveries(
                    &d.name,
                    &outcome.results,
                    outcome.any_success,
                    outcome.any_failure,
                    outcome.disable.as_deref(),
                    SystemTime::now(),
                )
                .await?;
            for (action, why) in &outcome.gone_callbacks {
                self.store
                    .drop_callback(action, why, SystemTime::now())
                    .await?;
            }
            if let Some(why) = &outcome.disable {
                warn!(
                    destination = d.name.as_str(),
                    reason = why.as_str(),
                    "notification destination disabled"
                );
            }
            pause = pause.max(outcome.pause);
        }
        Ok(match pause {
            Some(p) => Step::Pause(p),
            None => Step::Again,
        })
    }

    /// Turns answers into delivery states, counts them, and decides the destination's
    /// standing.
    async fn judge(
        &self,
        answers: Vec<(DueDelivery, Answer)>,
    ) -> Result<Outcome, crate::store::StoreError> {
        let d = &*self.destination;
        let name = d.name.as_str();
        let now = SystemTime::now();
        let mut out = Outcome {
            results: Vec::with_capacity(answers.len()),
            any_success: false,
            any_failure: false,
            disable: None,
            pause: None,
            gone_callbacks: Vec::new(),
        };
        for (delivery, answer) in answers {
            let (state, next, outcome) = self.verdict(&mut out, &delivery, &answer, now);
            self.metrics.count_delivery(name, outcome);
            let error = match &answer {
                Answer::Delivered(_) => None,
                a => Some(a.describe()),
            };
            out.results.push(DeliveryResult::new(
                delivery.event,
                state,
                next,
                answer.status(),
                error,
            ));
        }
        if out.disable.is_none() && out.any_failure && !out.any_success {
            out.disable = self.failing_too_long(now).await?;
        }
        Ok(out)
    }

    /// What becomes of one delivery after `answer`: its state, its next attempt and the
    /// outcome counted; what it means for the whole destination goes to `out`.
    fn verdict(
        &self,
        out: &mut Outcome,
        delivery: &DueDelivery,
        answer: &Answer,
        now: SystemTime,
    ) -> (DeliveryState, Option<SystemTime>, &'static str) {
        let d = &*self.destination;
        let action = delivery.action_id.as_deref().unwrap_or("-");
        match answer {
            Answer::Delivered(_) => {
                out.any_success = true;
                (DeliveryState::Delivered, None, "delivered")
            }
            Answer::Refused { error, .. } => {
                out.any_failure = true;
                warn!(
                    destination = d.name.as_str(),
                    event_id = delivery.event_id.as_str(),
                    action_id = action,
                    answer = error.as_str(),
                    "notification refused by the receiver; the event is dead"
                );
                (DeliveryState::Dead, None, "dead")
            }
            Answer::Gone { error } => {
                out.any_failure = true;
                if d.disable_after.is_some() {
                    out.disable = Some(format!("the receiver answered {error} (gone)"));
                    // Kept pending: it goes out if the destination is enabled again.
                    (DeliveryState::Pending, Some(now), "gone")
                } else {
                    out.gone_callbacks
                        .push((action.to_string(), format!("callback answered {error}")));
                    (DeliveryState::Dead, None, "gone")
                }
            }
            Answer::Retry {
                error, retry_after, ..
            } => {
                out.any_failure = true;
                if let Some(r) = retry_after {
                    out.pause = Some(out.pause.unwrap_or_default().max(*r));
                }
                self.retry_verdict(delivery, error, *retry_after, now)
            }
        }
    }

    /// A delivery that may be tried again: when, or dead after its last attempt.
    fn retry_verdict(
        &self,
        delivery: &DueDelivery,
        error: &str,
        retry_after: Option<Duration>,
        now: SystemTime,
    ) -> (DeliveryState, Option<SystemTime>, &'static str) {
        let d = &*self.destination;
        let attempts = usize::try_from(delivery.attempts).unwrap_or(0) + 1;
        let wait = retry_after.or_else(|| retry_wait(&d.waits, attempts));
        match wait.filter(|_| attempts <= d.waits.len()) {
            Some(w) => {
                tracing::debug!(
                    destination = d.name.as_str(),
                    event_id = delivery.event_id.as_str(),
                    attempts,
                    retry_in_ms = w.as_millis() as u64,
                    answer = error,
                    "notification failed; will retry"
                );
                (DeliveryState::Pending, Some(now + w), "retry")
            }
            None => {
                warn!(
                    destination = d.name.as_str(),
                    event_id = delivery.event_id.as_str(),
                    action_id = delivery.action_id.as_deref().unwrap_or("-"),
                    attempts,
                    answer = error,
                    "notification failed on its last attempt; the event is dead"
                );
                (DeliveryState::Dead, None, "dead")
            }
        }
    }

    /// Why the destination is to be disabled: failing without a success for longer than
    /// `notify.disable_after`; `None` while it is not.
    async fn failing_too_long(
        &self,
        now: SystemTime,
    ) -> Result<Option<String>, crate::store::StoreError> {
        let Some(limit) = self.destination.disable_after else {
            return Ok(None);
        };
        let since = self
            .store
            .destination(&self.destination.name)
            .await?
            .and_then(|s| s.failing_since)
            .as_deref()
            .and_then(crate::domain::parse_time);
        Ok(since
            .filter(|since| now.duration_since(*since).unwrap_or_default() >= limit)
            .map(|since| {
                format!(
                    "failing without a success since {} (notify.disable_after {})",
                    crate::domain::format_time(since),
                    crate::domain::format_duration(limit)
                )
            }))
    }
}

enum Step {
    /// More may be due at once.
    Again,
    /// Retry-After: nothing goes to this destination for a while.
    Pause(Duration),
    /// Nothing due; the next is due in this long (None: nothing pending).
    Idle(Option<Duration>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_jittered_and_ends() {
        let waits = crate::config::DEFAULT_RETRY_SCHEDULE;
        for _ in 0..100 {
            let w = retry_wait(&waits, 1).unwrap();
            assert!(
                w >= Duration::from_secs(4) && w <= Duration::from_secs(6),
                "{w:?}"
            );
        }
        assert!(retry_wait(&waits, 7).unwrap() >= Duration::from_secs(28_800));
        assert_eq!(retry_wait(&waits, 8), None);
        assert_eq!(retry_wait(&waits, 0), None);
    }

    #[test]
    fn retry_after_is_read_and_capped() {
        let parse_retry_after = |v: &str| {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::RETRY_AFTER, v.parse().unwrap());
            crate::mde::parse_retry_after(&h, SystemTime::now())
        };
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("1e30"),
            Some(crate::domain::MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("NaN"), None);
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn chat_destinations_stop_after_the_two_hour_attempt() {
        let chat = crate::config::parse_schedule(None, true).unwrap();
        assert_eq!(chat.last(), Some(&Duration::from_secs(7200)));
        assert_eq!(crate::config::parse_schedule(None, false).unwrap().len(), 7);
    }

    #[tokio::test]
    async fn callback_names_never_lead_to_loopback_through_a_wildcard() {
        use reqwest::dns::Resolve;
        use std::str::FromStr;
        let name = || reqwest::dns::Name::from_str("localhost").unwrap();
        let wildcard = GuardedResolver {
            allow: vec![HostPattern::parse("*").unwrap()],
        };
        let refused = wildcard.resolve(name()).await.err().expect("refused");
        assert!(refused.to_string().contains("loopback"), "{refused}");
        let listed = GuardedResolver {
            allow: vec![HostPattern::parse("localhost").unwrap()],
        };
        let addrs: Vec<_> = listed.resolve(name()).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }

    #[test]
    fn splunk_gets_the_event_endpoint() {
        assert_eq!(
            splunk_endpoint("https://hec.example:8088"),
            "https://hec.example:8088/services/collector/event"
        );
        assert_eq!(
            splunk_endpoint("https://hec.example/services/collector/raw"),
            "https://hec.example/services/collector/raw"
        );
    }
}
