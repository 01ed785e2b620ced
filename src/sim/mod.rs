//! A simulated MDE tenant on loopback: the identity platform's token endpoint and the two
//! MachineAction calls, with lifecycles that unfold in real time, expiring tokens, a rate
//! limit that answers 429 + Retry-After, and switchable faults.
//!
//! Used by `demo`, the tests and the benchmarks. It counts what it saw so that tests can
//! assert on the daemon's manners: calls per action, calls sent early after a 429, calls with
//! an expired token.

mod http;
mod identity;
pub mod recorder;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::{ActionId, ActionStatus, format_time};
pub use http::Request;
use http::{Reply, form_decode};
use identity::{check_client_credential, issue_token, seed_token, token_forbidden};

pub const SIM_TENANT: &str = "00000000-0000-4000-8000-00000000beef";
pub const SIM_CLIENT_ID: &str = "00000000-0000-4000-8000-0000000c11e7";
pub const SIM_CLIENT_SECRET: &str = "sim-client-secret-not-a-real-one";
pub const SIM_SCOPE: &str = "https://api.securitycenter.microsoft.com/.default";

/// Ways the simulated service can misbehave on an API call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// 500 with an OData error body.
    InternalError,
    /// 503 with an error body whose `code` is empty.
    Unavailable,
    /// 502 with an HTML page, as a gateway sends.
    BadGatewayHtml,
    /// 200 whose JSON body is cut in half (with a matching Content-Length).
    TruncatedJson,
    /// 200 that promises a body and closes the connection half way.
    CutConnection,
    /// Closes the connection without answering.
    Drop,
    /// Answers only after `slow_delay`.
    Slow,
    /// 429 with a Retry-After of `fault_retry_after`.
    TooManyRequests,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::InternalError,
        Fault::Unavailable,
        Fault::BadGatewayHtml,
        Fault::TruncatedJson,
        Fault::CutConnection,
        Fault::Drop,
        Fault::Slow,
        Fault::TooManyRequests,
    ];
}

/// Answers an attacker on the network path (or a compromised proxy, or a wrong
/// `api.base_url`/authority) would give, for the security tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hostile {
    /// 307 to this origin, path and query kept (a hijacking proxy collecting requests).
    RedirectTo(String),
    /// 200 announcing this many bytes (`Content-Length`) and sending them.
    Huge(u64),
    /// 200 without a length, sending until the client hangs up.
    Endless,
    /// Token endpoint: a granted token of about this many bytes (a JWT grown by claims),
    /// which the API takes while its header fits the front end's limit.
    LongToken(usize),
    /// Token endpoint: a granted answer with this JSON text as `expires_in`.
    ExpiresIn(String),
}

/// HTTP.sys's default `MaxRequestBytes`: a request head longer than this gets 431.
pub const SIM_MAX_REQUEST_HEAD: usize = 16 * 1024;

/// A sliding-window rate limit like the service's (per app and tenant).
#[derive(Debug, Clone)]
pub struct SimRateLimit {
    pub calls: u32,
    pub window: Duration,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub token_lifetime: Duration,
    pub rate_limit: Option<SimRateLimit>,
    /// A second, longer window (the service's 1,500 calls per hour beside 100 per minute).
    pub long_rate_limit: Option<SimRateLimit>,
    /// Retry-After with fractions of a second (time-scaled benchmarks only).
    pub fractional_retry_after: bool,
    /// Probability that an API call meets a fault, drawn from `faults`.
    pub fault_rate: f64,
    pub faults: Vec<Fault>,
    /// Probability that a token request fails with a 503.
    pub token_fault_rate: f64,
    pub slow_delay: Duration,
    pub fault_retry_after: Duration,
    /// The `Retry-After` header sent verbatim with a `TooManyRequests` fault instead of
    /// `fault_retry_after` (a hostile or broken gateway: ten years, 10^23 s, a date in 2100).
    pub fault_retry_after_header: Option<String>,
    /// Id-list answers repeat each action as it looked at its earlier steps, after the
    /// current entry: one answer, one id, several statuses (seen from gateways that merge
    /// replicas).
    pub stale_copies: bool,
    /// The API answers 401 to every token, fresh ones too (an app registered in another
    /// tenant, a token for the wrong resource, a key rollover gone wrong).
    pub reject_all_tokens: bool,
    /// `$filter` forms answered with a 400 (`ODataError`), as the service answers forms it
    /// does not support.
    pub rejected_filters: Vec<FilterForm>,
    /// `$filter` forms accepted but not applied: the answer lists actions as if there were
    /// no filter, as a service that silently ignores an undocumented form would.
    pub ignored_filters: Vec<FilterForm>,
    /// Each new action stays invisible (404 to a GET, absent from listings) for a random
    /// time up to this long after its creation, as the real service's new ids do.
    pub visibility_delay: Duration,
    /// A request that arrives this soon after a 429 was written was already on its way and is
    /// not counted as an early retry.
    pub early_retry_grace: Duration,
    pub seed: u64,
    /// The certificate registered on the app, for client assertions.
    pub certificate: Option<SimCertificate>,
    /// Accept client assertions equal to the current federated token (workload identity).
    pub federated: bool,
    /// Serve the managed identity endpoints (IMDS at /metadata/identity/oauth2/token, App
    /// Service at /msi/token).
    pub managed_identity: Option<SimManagedIdentity>,
    /// `roles` in issued tokens.
    pub token_roles: Vec<String>,
    /// `aud` in issued tokens; the API answers 403 unless it is `SIM_API_AUDIENCE`.
    pub token_audience: String,
    /// What API calls meet instead of the API (`None`: the API).
    pub hostile_api: Option<Hostile>,
    /// What token requests meet instead of the identity platform (`None`: the platform).
    pub hostile_token: Option<Hostile>,
    /// The longest request head the front end takes; longer ones get 431.
    pub max_request_head: usize,
}

/// The app registration's certificate: the public key that verifies assertions and the DER
/// certificate whose SHA-256 thumbprint they must name.
#[derive(Debug, Clone)]
pub struct SimCertificate {
    /// PKCS#1 RSAPublicKey DER.
    pub public_key: Vec<u8>,
    pub certificate_der: Vec<u8>,
    /// The identity platform refuses assertions of an expired certificate.
    pub expired: bool,
}

#[derive(Debug, Clone)]
pub struct SimManagedIdentity {
    /// A user-assigned identity's client id; requests naming another one fail.
    pub user_assigned_client_id: Option<String>,
    /// The App Service X-IDENTITY-HEADER value.
    pub identity_header: String,
}

/// The audience the simulated API accepts.
pub const SIM_API_AUDIENCE: &str = "https://api.securitycenter.microsoft.com";

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            token_lifetime: Duration::from_secs(3599),
            rate_limit: None,
            long_rate_limit: None,
            fractional_retry_after: false,
            fault_rate: 0.0,
            faults: Fault::ALL.to_vec(),
            token_fault_rate: 0.0,
            slow_delay: Duration::from_millis(1500),
            fault_retry_after: Duration::from_secs(1),
            fault_retry_after_header: None,
            stale_copies: false,
            reject_all_tokens: false,
            rejected_filters: Vec::new(),
            ignored_filters: Vec::new(),
            visibility_delay: Duration::ZERO,
            early_retry_grace: Duration::from_millis(100),
            seed: 42,
            certificate: None,
            federated: false,
            managed_identity: None,
            token_roles: vec!["Machine.Read.All".into()],
            token_audience: SIM_API_AUDIENCE.into(),
            hostile_api: None,
            hostile_token: None,
            max_request_head: SIM_MAX_REQUEST_HEAD,
        }
    }
}

/// An action's scripted life: from each offset on, the status is the one given.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    pub steps: Vec<(Duration, ActionStatus)>,
}

impl Lifecycle {
    pub fn new(steps: Vec<(Duration, ActionStatus)>) -> Self {
        assert!(!steps.is_empty(), "a lifecycle needs at least one status");
        Self { steps }
    }

    /// Pending for `pending`, InProgress for `running`, then `end`.
    pub fn simple(pending: Duration, running: Duration, end: ActionStatus) -> Self {
        Self::new(vec![
            (Duration::ZERO, ActionStatus::Pending),
            (pending, ActionStatus::InProgress),
            (pending + running, end),
        ])
    }

    /// A realistic mix scaled to `scale`: most succeed, some fail or time out, some are
    /// cancelled while pending or running, a few run three times as long.
    pub fn random(rng: &mut fastrand::Rng, scale: Duration) -> Self {
        let s = scale.as_secs_f64();
        let pending = Duration::from_secs_f64(s * (0.05 + 0.3 * rng.f64()));
        let running = Duration::from_secs_f64(s * (0.1 + 0.6 * rng.f64()));
        match rng.u32(0..100) {
            0..55 => Self::simple(pending, running, ActionStatus::Succeeded),
            55..67 => Self::simple(pending, running, ActionStatus::Failed),
            67..75 => Self::simple(pending, running * 2, ActionStatus::TimeOut),
            75..85 => Self::new(vec![
                (Duration::ZERO, ActionStatus::Pending),
                (pending, ActionStatus::Cancelled),
            ]),
            85..90 => Self::simple(pending, running, ActionStatus::Cancelled),
            _ => Self::simple(pending, scale * 2 + running, ActionStatus::Succeeded),
        }
    }

    fn at(&self, elapsed: Duration) -> (usize, &ActionStatus) {
        let i = self
            .steps
            .iter()
            .rposition(|(t, _)| *t <= elapsed)
            .unwrap_or(0);
        (i, &self.steps[i].1)
    }

    pub fn terminal(&self) -> &ActionStatus {
        &self.steps.last().expect("non-empty").1
    }

    /// How long until the last status is reached.
    pub fn length(&self) -> Duration {
        self.steps.last().expect("non-empty").0
    }
}

pub const ACTION_TYPES: [&str; 8] = [
    "Isolate",
    "Unisolate",
    "RunAntiVirusScan",
    "CollectInvestigationPackage",
    "RestrictCodeExecution",
    "UnrestrictCodeExecution",
    "LiveResponse",
    "StopAndQuarantineFile",
];

struct SimAction {
    id: ActionId,
    index: usize,
    lifecycle: Lifecycle,
    created: Instant,
    created_wall: SystemTime,
    action_type: &'static str,
    device: usize,
    /// How long after its creation the service starts to show it.
    hidden_for: Duration,
    /// Someone other than the automation started it (an analyst in the portal, another
    /// tool): its `requestor`, with `requestSource` "Portal".
    requested_by: Option<&'static str>,
    /// How long before `created` it was really created (a monotonic instant cannot reach
    /// back before boot; days-old actions need this).
    backdate: Duration,
}

/// The simulated tenant's devices: actions land on a small fleet, so one device sees
/// several actions (isolate, later release) as in real incidents.
const DEVICES: usize = 24;

fn machine_id(device: usize) -> String {
    // 40 hex digits, like MDE's machine ids, stable per device.
    let seed = (device as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..40)
        .map(|_| char::from_digit(rng.u32(0..16), 16).unwrap_or('0'))
        .collect()
}

fn dns_name(device: usize) -> String {
    format!("ws-{device:04}.contoso.local")
}

impl SimAction {
    /// Time since it was created, as of `now`.
    fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.created) + self.backdate
    }

    /// Whether the service shows the action yet: a new id answers 404 and is missing from
    /// listings for a few seconds after its creation.
    fn visible(&self, now: Instant) -> bool {
        self.age(now) >= self.hidden_for
    }

    /// The wall-clock time of step `i`, as the service reports it (see `sim_time`).
    fn step_time(&self, i: usize) -> SystemTime {
        sim_time(self.created_wall + self.lifecycle.steps[i].0)
    }

    fn to_json(&self, now: Instant, context: bool) -> ActionJson<'_> {
        let (step, status) = self.lifecycle.at(self.age(now));
        // Real answers print 2 to 7 fractional digits (.92Z, .93163Z, .1341831Z).
        let digits = 2 + self.index % 6;
        let updated = mde_time(self.step_time(step), digits);
        let external = format!("soar-{}", self.index);
        // Half the actions use the spellings some docs show, as real answers vary.
        let (a, b) = (self.index.is_multiple_of(2), !self.index.is_multiple_of(2));
        let cancelled = *status == ActionStatus::Cancelled;
        let scope = match self.action_type {
            "Isolate" => Some(if self.index.is_multiple_of(3) {
                "Selective"
            } else {
                "Full"
            }),
            "RunAntiVirusScan" => Some(if self.index.is_multiple_of(2) {
                "Quick"
            } else {
                "Full"
            }),
            _ => None,
        };
        let commands = (self.action_type == "LiveResponse").then(|| {
            // Cancelled after it ran: the "partial cancel" of real answers, whose command
            // completed although the action says Cancelled.
            let ran = step > 1 || (step == 1 && *status != ActionStatus::Cancelled);
            let start_time = ran.then(|| mde_time(self.step_time(1), 7));
            let command_status = match status {
                ActionStatus::Succeeded => "Completed",
                ActionStatus::Failed | ActionStatus::TimeOut => "Failed",
                ActionStatus::Cancelled if ran => "Completed",
                _ => "Created",
            };
            vec![LiveResponseCommand {
                index: 0,
                start_time,
                end_time: status
                    .is_terminal()
                    .then(|| mde_time(self.step_time(step), 7)),
                command_status,
                errors: if command_status == "Failed" {
                    vec!["The script timed out or failed on the device"]
                } else {
                    Vec::new()
                },
                command: LiveResponseCommandBody {
                    command_type: "RunScript",
                    params: vec![KeyValue {
                        key: "ScriptName",
                        value: "collect-triage.ps1",
                    }],
                },
            }]
        });
        ActionJson {
            context: context.then_some(
                "https://api.securitycenter.microsoft.com/api/$metadata#MachineActions/$entity",
            ),
            id: self.id.as_str(),
            action_type: self.action_type,
            title: (self.index % 4 == 3).then(|| format!("{} by automation", self.action_type)),
            requestor: match self.requested_by {
                Some(r) => r,
                None if self.index % 5 == 4 => "Contoso SOAR app",
                None => "soc-automation@contoso.com",
            },
            requestor_comment: format!("Automated response to alert {}", 3200 + self.index),
            status: status.as_str(),
            machine_id: machine_id(self.device),
            computer_dns_name: dns_name(self.device),
            created: mde_time(sim_time(self.created_wall), digits),
            cancellation_requestor: cancelled.then_some("lead@contoso.com"),
            cancellation_comment: cancelled.then_some("Cancelled: wrong device"),
            cancellation_time: cancelled.then(|| mde_time(self.step_time(step), digits)),
            error_hresult: if *status == ActionStatus::Failed {
                -2_147_024_891
            } else {
                0
            },
            scope,
            request_source: if self.requested_by.is_some() {
                "Portal"
            } else {
                "PublicApi"
            },
            related_file_info: None,
            commands: commands.unwrap_or_default(),
            troubleshoot_info: None,
            last_update_long: a.then(|| updated.clone()),
            last_update_short: b.then_some(updated),
            external_id: a.then(|| external.clone()),
            external_id_caps: b.then_some(external),
        }
    }
}

/// A MachineAction as the service prints it; a struct rather than a `json!` map because
/// serializing 10,000 of them for one page was the simulator's own bottleneck.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ActionJson<'a> {
    #[serde(rename = "@odata.context", skip_serializing_if = "Option::is_none")]
    context: Option<&'static str>,
    id: &'a str,
    #[serde(rename = "type")]
    action_type: &'a str,
    title: Option<String>,
    requestor: &'static str,
    requestor_comment: String,
    status: &'a str,
    machine_id: String,
    computer_dns_name: String,
    #[serde(rename = "creationDateTimeUtc")]
    created: String,
    cancellation_requestor: Option<&'static str>,
    cancellation_comment: Option<&'static str>,
    #[serde(rename = "cancellationDateTimeUtc")]
    cancellation_time: Option<String>,
    #[serde(rename = "errorHResult")]
    error_hresult: i64,
    scope: Option<&'static str>,
    request_source: &'static str,
    related_file_info: Option<()>,
    commands: Vec<LiveResponseCommand>,
    troubleshoot_info: Option<()>,
    #[serde(
        rename = "lastUpdateDateTimeUtc",
        skip_serializing_if = "Option::is_none"
    )]
    last_update_long: Option<String>,
    #[serde(rename = "lastUpdateTimeUtc", skip_serializing_if = "Option::is_none")]
    last_update_short: Option<String>,
    #[serde(rename = "externalId", skip_serializing_if = "Option::is_none")]
    external_id: Option<String>,
    #[serde(rename = "externalID", skip_serializing_if = "Option::is_none")]
    external_id_caps: Option<String>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LiveResponseCommand {
    index: u32,
    start_time: Option<String>,
    end_time: Option<String>,
    command_status: &'static str,
    errors: Vec<&'static str>,
    command: LiveResponseCommandBody,
}

#[derive(serde::Serialize)]
struct LiveResponseCommandBody {
    #[serde(rename = "type")]
    command_type: &'static str,
    params: Vec<KeyValue>,
}

#[derive(serde::Serialize)]
struct KeyValue {
    key: &'static str,
    value: &'static str,
}

/// The simulator's times are whole hundredths of a second, so that every number of
/// fractional digits it prints (2 to 7) states the same instant and the truth it is checked
/// against.
fn sim_time(t: SystemTime) -> SystemTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let centis = since.as_millis() / 10;
    SystemTime::UNIX_EPOCH + Duration::from_millis((centis * 10) as u64)
}

/// MDE's format with `digits` (2 to 7) fractional digits.
fn mde_time(t: SystemTime, digits: usize) -> String {
    let ms = format_time(t);
    // "2018-12-04T12:18:27.129Z": the three digits, padded to seven, cut to `digits`.
    let (head, frac) = ms[..ms.len() - 1].split_at(ms.len() - 4);
    let frac = format!("{}0000", &frac[..3]);
    format!("{head}{}Z", &frac[..digits.clamp(1, 7)])
}

/// What the simulator saw; tests assert on it.
#[derive(Debug, Clone, Default)]
pub struct SimStats {
    pub api_calls: u64,
    pub list_calls: u64,
    pub get_calls: u64,
    pub token_requests: u64,
    pub tokens_issued: u64,
    pub token_refusals: u64,
    /// 429s answered, whether from the rate limit or a fault.
    pub rate_limited: u64,
    /// Calls that arrived while a Retry-After was running (beyond the grace for calls already
    /// on their way).
    pub early_retries: u64,
    pub expired_token_calls: u64,
    pub unknown_token_calls: u64,
    /// Calls refused with 403 (wrong audience, no Machine.Read.All role).
    pub forbidden_calls: u64,
    pub faults_injected: u64,
    pub faults_by_kind: HashMap<String, u64>,
    /// Requests refused with 431 because their head was longer than `max_request_head`.
    pub oversized_heads: u64,
    /// Requests answered with a `Hostile` answer, API and token endpoint.
    pub hostile_answers: u64,
    pub not_found_answers: u64,
    /// API calls that named each action (a list call counts for every id in it).
    pub calls_by_action: HashMap<ActionId, u64>,
    /// List calls by `$filter` form, refused ones included (unreadable filters not counted).
    pub list_calls_by_form: HashMap<FilterForm, u64>,
}

struct State {
    config: SimConfig,
    rng: fastrand::Rng,
    actions: HashMap<ActionId, SimAction>,
    tokens: HashMap<String, Instant>,
    issued: Vec<String>,
    federated_token: String,
    seen_assertion_ids: std::collections::HashSet<String>,
    window: VecDeque<Instant>,
    long_window: VecDeque<Instant>,
    /// A 429 was written at `.0`; calls before `.1` earn another.
    retry_window: Option<(Instant, Instant)>,
    stats: SimStats,
}

pub struct Simulator {
    addr: SocketAddr,
    tenant: Arc<Tenant>,
    stop: CancellationToken,
}

struct Tenant {
    state: Mutex<State>,
}

impl Simulator {
    /// Binds 127.0.0.1 on a free port and starts serving on the current runtime.
    pub async fn start(config: SimConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let rng = fastrand::Rng::with_seed(config.seed);
        let config_seed = config.seed;
        let tenant = Arc::new(Tenant {
            state: Mutex::new(State {
                config,
                rng,
                actions: HashMap::new(),
                tokens: HashMap::new(),
                issued: Vec::new(),
                federated_token: format!("federated.{:016x}", seed_token(config_seed)),
                seen_assertion_ids: std::collections::HashSet::new(),
                window: VecDeque::new(),
                long_window: VecDeque::new(),
                retry_window: None,
                stats: SimStats::default(),
            }),
        });
        let stop = CancellationToken::new();
        tokio::spawn(http::serve(listener, tenant.clone(), stop.clone()));
        Ok(Self { addr, tenant, stop })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The authority to configure (`auth.authority`); the tenant is `SIM_TENANT`.
    pub fn authority(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.tenant.lock()
    }

    /// Creates an action with the given life, starting now, of a random type on one of the
    /// tenant's devices.
    pub fn create_action(&self, lifecycle: Lifecycle) -> ActionId {
        let (action_type, device) = {
            let mut s = self.lock();
            (
                ACTION_TYPES[s.rng.usize(0..ACTION_TYPES.len())],
                s.rng.usize(0..DEVICES),
            )
        };
        self.create_action_on(lifecycle, action_type, device)
    }

    /// Creates an action of `action_type` on device number `device` (0 to 23).
    pub fn create_action_on(
        &self,
        lifecycle: Lifecycle,
        action_type: &'static str,
        device: usize,
    ) -> ActionId {
        let hidden_for = {
            let mut s = self.lock();
            let max = s.config.visibility_delay;
            // No draw without a delay: seeded runs keep their sequence.
            if max.is_zero() {
                Duration::ZERO
            } else {
                max.mul_f64(s.rng.f64())
            }
        };
        self.create_hidden_action(lifecycle, action_type, device, hidden_for)
    }

    /// Creates an action that the service shows only `hidden_for` after its creation.
    pub fn create_hidden_action(
        &self,
        lifecycle: Lifecycle,
        action_type: &'static str,
        device: usize,
        hidden_for: Duration,
    ) -> ActionId {
        self.insert(
            lifecycle,
            action_type,
            device,
            hidden_for,
            None,
            Duration::ZERO,
        )
    }

    /// Creates an action that `requestor` started `ago` (its lifecycle counted from then:
    /// an old one may be finished already), as another tool or the portal would.
    pub fn create_action_by(
        &self,
        lifecycle: Lifecycle,
        action_type: &'static str,
        device: usize,
        requestor: &'static str,
        ago: Duration,
    ) -> ActionId {
        self.insert(
            lifecycle,
            action_type,
            device,
            Duration::ZERO,
            Some(requestor),
            ago,
        )
    }

    fn insert(
        &self,
        lifecycle: Lifecycle,
        action_type: &'static str,
        device: usize,
        hidden_for: Duration,
        requested_by: Option<&'static str>,
        backdate: Duration,
    ) -> ActionId {
        let mut s = self.lock();
        let id = ActionId::random(&mut s.rng);
        let index = s.actions.len();
        s.actions.insert(
            id.clone(),
            SimAction {
                id: id.clone(),
                index,
                lifecycle,
                created: Instant::now(),
                created_wall: SystemTime::now() - backdate,
                action_type,
                device: device % DEVICES,
                hidden_for,
                requested_by,
                backdate,
            },
        );
        id
    }

    /// Every action the simulated tenant holds.
    pub fn all_ids(&self) -> Vec<ActionId> {
        self.lock().actions.keys().cloned().collect()
    }

    /// The type, machine id and DNS name of a simulated action.
    pub fn describe(&self, id: &ActionId) -> Option<(String, String, String)> {
        let s = self.lock();
        let a = s.actions.get(id)?;
        Some((
            a.action_type.to_string(),
            machine_id(a.device),
            dns_name(a.device),
        ))
    }

    /// Creates `n` actions with random lifecycles scaled to `scale`.
    pub fn create_random_actions(&self, n: usize, scale: Duration) -> Vec<ActionId> {
        (0..n)
            .map(|_| {
                let lifecycle = {
                    let mut s = self.lock();
                    Lifecycle::random(&mut s.rng, scale)
                };
                self.create_action(lifecycle)
            })
            .collect()
    }

    /// The status the service reports for `id` now.
    pub fn status_now(&self, id: &ActionId) -> Option<ActionStatus> {
        let s = self.lock();
        let a = s.actions.get(id)?;
        Some(a.lifecycle.at(a.age(Instant::now())).1.clone())
    }

    /// The full scripted life of `id`: each status with the wall-clock time it began.
    pub fn truth(&self, id: &ActionId) -> Option<Vec<(ActionStatus, SystemTime)>> {
        let s = self.lock();
        let a = s.actions.get(id)?;
        Some(
            a.lifecycle
                .steps
                .iter()
                .map(|(t, st)| (st.clone(), sim_time(a.created_wall + *t)))
                .collect(),
        )
    }

    pub fn terminal_status(&self, id: &ActionId) -> Option<ActionStatus> {
        let s = self.lock();
        s.actions.get(id).map(|a| a.lifecycle.terminal().clone())
    }

    /// Checks a recorded transition log against the scripted truth: it starts from nothing,
    /// each entry continues the previous one, statuses appear in their true order without
    /// repeats, none is seen before it happened, `mde_updated_at` is the true change time, and
    /// (when `finished`) it ends at the true terminal status.
    pub fn verify_transitions(
        &self,
        id: &ActionId,
        recorded: &[crate::store::TransitionRow],
        finished: bool,
    ) -> Result<(), String> {
        let truth = self
            .truth(id)
            .ok_or_else(|| format!("{id}: unknown to the simulator"))?;
        let first = recorded
            .first()
            .ok_or_else(|| format!("{id}: no transitions"))?;
        if first.from_status.is_some() {
            return Err(format!(
                "{id}: first transition starts from {:?}",
                first.from_status
            ));
        }
        let mut last_index = None;
        for (i, t) in recorded.iter().enumerate() {
            if i > 0 && t.from_status.as_deref() != Some(recorded[i - 1].to_status.as_str()) {
                return Err(format!(
                    "{id}: transition {} does not continue from {}",
                    t.id,
                    recorded[i - 1].to_status
                ));
            }
            let Some(pos) = truth.iter().position(|(s, _)| s.as_str() == t.to_status) else {
                return Err(format!(
                    "{id}: recorded status {} never happened",
                    t.to_status
                ));
            };
            if last_index.is_some_and(|l| pos <= l) {
                return Err(format!(
                    "{id}: {} recorded out of order or twice",
                    t.to_status
                ));
            }
            last_index = Some(pos);
            let happened = format_time(truth[pos].1);
            if t.observed_at < happened {
                return Err(format!(
                    "{id}: {} observed at {} before it happened at {happened}",
                    t.to_status, t.observed_at
                ));
            }
            if let Some(u) = &t.mde_updated_at
                && *u != happened
            {
                return Err(format!(
                    "{id}: {} has mde_updated_at {u}, truth {happened}",
                    t.to_status
                ));
            }
        }
        if finished && last_index != Some(truth.len() - 1) {
            return Err(format!(
                "{id}: log ends at {} but the true terminal status is {}",
                recorded.last().map(|t| t.to_status.as_str()).unwrap_or("-"),
                truth[truth.len() - 1].0
            ));
        }
        Ok(())
    }

    pub fn stats(&self) -> SimStats {
        self.lock().stats.clone()
    }

    /// The federated token the tenant currently trusts (what the kubelet would project).
    pub fn federated_token(&self) -> String {
        self.lock().federated_token.clone()
    }

    /// Rotates the federated token: the old one stops working.
    pub fn rotate_federated_token(&self) -> String {
        let mut s = self.lock();
        let next = format!("federated.{:016x}", s.rng.u64(..));
        s.federated_token = next.clone();
        next
    }

    /// Every access token handed out so far (tests look for leaks of them).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.lock().issued.clone()
    }

    pub fn set_fault_rate(&self, rate: f64) {
        self.lock().config.fault_rate = rate;
    }

    /// Probability that a token request fails with a 503 from now on.
    pub fn set_token_fault_rate(&self, rate: f64) {
        self.lock().config.token_fault_rate = rate;
    }

    pub fn set_faults(&self, faults: Vec<Fault>) {
        self.lock().config.faults = faults;
    }

    pub fn set_reject_all_tokens(&self, on: bool) {
        self.lock().config.reject_all_tokens = on;
    }

    pub fn set_stale_copies(&self, on: bool) {
        self.lock().config.stale_copies = on;
    }

    /// Sends this `Retry-After` value verbatim with `TooManyRequests` faults (`None`: the
    /// simulator's own).
    pub fn set_retry_after_header(&self, raw: Option<&str>) {
        self.lock().config.fault_retry_after_header = raw.map(str::to_string);
    }

    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.lock().config.token_lifetime = lifetime;
    }

    /// Makes every token issued so far invalid, as a key rollover or revocation would.
    pub fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    /// Refuses (or accepts again) every form of the `id` list filter.
    pub fn set_reject_list_filter(&self, reject: bool) {
        self.lock().config.rejected_filters = if reject {
            vec![FilterForm::IdIn, FilterForm::IdEqOr]
        } else {
            Vec::new()
        };
    }

    /// Refuses these `$filter` forms with a 400 from now on.
    pub fn set_rejected_filters(&self, forms: Vec<FilterForm>) {
        self.lock().config.rejected_filters = forms;
    }

    /// Accepts these `$filter` forms but answers as if there were no filter.
    pub fn set_ignored_filters(&self, forms: Vec<FilterForm>) {
        self.lock().config.ignored_filters = forms;
    }

    /// API calls meet `hostile` from now on (`None`: the API again).
    pub fn set_hostile_api(&self, hostile: Option<Hostile>) {
        self.lock().config.hostile_api = hostile;
    }

    /// Token requests meet `hostile` from now on (`None`: the identity platform again).
    pub fn set_hostile_token(&self, hostile: Option<Hostile>) {
        self.lock().config.hostile_token = hostile;
    }

    pub fn set_max_request_head(&self, bytes: usize) {
        self.lock().config.max_request_head = bytes;
    }

    /// Sets the roles of tokens issued from now on.
    pub fn set_token_roles(&self, roles: Vec<String>) {
        self.lock().config.token_roles = roles;
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Tenant {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl http::Handler for Tenant {
    fn max_head(&self) -> usize {
        self.lock().config.max_request_head
    }

    fn head_too_long(&self) {
        self.lock().stats.oversized_heads += 1;
    }

    async fn handle(&self, req: Request) -> Reply {
        if req.method == "POST" && req.path.ends_with("/oauth2/v2.0/token") {
            let hostile = self.lock().config.hostile_token.clone();
            if let Some(reply) = hostile.as_ref().and_then(|h| self.hostile(h, &req, true)) {
                return reply;
            }
            return self.token(&req).await;
        }
        if req.method == "GET"
            && (req.path == "/metadata/identity/oauth2/token" || req.path == "/msi/token")
        {
            return self.managed_identity(&req);
        }
        if req.path == "/api/machineactions" || req.path.starts_with("/api/machineactions/") {
            if req.method != "GET" {
                return odata_error(405, "MethodNotAllowed", "Only GET is simulated");
            }
            let hostile = self.lock().config.hostile_api.clone();
            if let Some(reply) = hostile.as_ref().and_then(|h| self.hostile(h, &req, false)) {
                return reply;
            }
            return self.api(&req).await;
        }
        // What a wrong `api.base_url` path meets: the front end's page, not the API's JSON.
        Reply::Full {
            status: 404,
            content_type: "text/html",
            extra_headers: Vec::new(),
            body: b"<!DOCTYPE html><html><head><title>404 - File or directory not found.</title></head><body><h2>404 - File or directory not found.</h2></body></html>".to_vec(),
        }
    }
}

impl Tenant {
    /// The hostile answer to `req`, or `None` when `hostile` is one the normal path gives
    /// (the token endpoint's long tokens and odd lifetimes).
    fn hostile(&self, hostile: &Hostile, req: &Request, token_endpoint: bool) -> Option<Reply> {
        let reply = match hostile {
            Hostile::RedirectTo(origin) => {
                let target = if req.query.is_empty() {
                    format!("{}{}", origin.trim_end_matches('/'), req.path)
                } else {
                    format!("{}{}?{}", origin.trim_end_matches('/'), req.path, req.query)
                };
                Reply::Full {
                    status: 307,
                    content_type: "text/html",
                    extra_headers: vec![("location", target)],
                    body: b"<html><body>Moved</body></html>".to_vec(),
                }
            }
            // Something that starts like the answer it replaces, then goes on and on.
            Hostile::Huge(bytes) => Reply::Stream {
                status: 200,
                head: if token_endpoint {
                    b"{\"token_type\":\"Bearer\",\"expires_in\":3599,\"access_token\":\"".to_vec()
                } else {
                    b"{\"value\":[{\"status\":\"Succeeded\",\"id\":\"".to_vec()
                },
                fill: b'A',
                tail: if token_endpoint {
                    b"\"}".to_vec()
                } else {
                    b"\"}]}".to_vec()
                },
                length: Some(*bytes),
            },
            Hostile::Endless => Reply::Stream {
                status: 200,
                head: b"{\"value\":\"".to_vec(),
                fill: b'A',
                tail: Vec::new(),
                length: None,
            },
            Hostile::LongToken(_) | Hostile::ExpiresIn(_) => return None,
        };
        self.lock().stats.hostile_answers += 1;
        Some(reply)
    }
}

fn odata_error(status: u16, code: &str, message: &str) -> Reply {
    Reply::json(
        status,
        json!({"error": {"code": code, "message": message, "target": format!("{:x}", fastrand::u64(..))}})
            .to_string(),
    )
}

fn aad_error(status: u16, error: &str, description: &str) -> Reply {
    Reply::json(
        status,
        json!({
            "error": error,
            "error_description": format!("{description}\r\nTrace ID: 0000\r\nCorrelation ID: 0000\r\nTimestamp: {}", format_time(SystemTime::now())),
            "error_codes": [description.get(5..12).and_then(|c| c.parse::<u32>().ok()).unwrap_or(0)],
        })
        .to_string(),
    )
}

impl Tenant {
    async fn token(&self, req: &Request) -> Reply {
        let form: HashMap<String, String> = form_decode(&String::from_utf8_lossy(&req.body))
            .into_iter()
            .collect();
        let tenant = req
            .path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        let mut s = self.lock();
        s.stats.token_requests += 1;
        let fault_rate = s.config.token_fault_rate;
        if fault_rate > 0.0 && s.rng.f64() < fault_rate {
            s.stats.faults_injected += 1;
            *s.stats
                .faults_by_kind
                .entry("token_503".into())
                .or_default() += 1;
            return Reply::Full {
                status: 503,
                content_type: "text/html",
                extra_headers: Vec::new(),
                body: b"<html><head><title>Service Unavailable</title></head></html>".to_vec(),
            };
        }
        let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        let refusal = if tenant != SIM_TENANT {
            Some(aad_error(
                400,
                "invalid_request",
                &format!(
                    "AADSTS90002: Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
                ),
            ))
        } else if field("grant_type") != "client_credentials" {
            Some(aad_error(
                400,
                "unsupported_grant_type",
                "AADSTS70003: The app requested an unsupported grant type.",
            ))
        } else if field("client_id") != SIM_CLIENT_ID {
            Some(aad_error(
                400,
                "unauthorized_client",
                &format!(
                    "AADSTS700016: Application with identifier '{}' was not found in the directory.",
                    field("client_id")
                ),
            ))
        } else if let Some(r) = check_client_credential(&mut s, &form, &tenant, req) {
            Some(r)
        } else if field("scope") != SIM_SCOPE {
            Some(aad_error(
                400,
                "invalid_scope",
                &format!(
                    "AADSTS1002012: The provided value for scope {} is not valid.",
                    field("scope")
                ),
            ))
        } else {
            None
        };
        if let Some(r) = refusal {
            s.stats.token_refusals += 1;
            return r;
        }
        let (token, lifetime) = issue_token(&mut s, SIM_CLIENT_ID);
        if let Some(Hostile::ExpiresIn(raw)) = s.config.hostile_token.clone() {
            s.stats.hostile_answers += 1;
            return Reply::json(
                200,
                format!(
                    r#"{{"token_type":"Bearer","expires_in":{raw},"ext_expires_in":{raw},"access_token":"{token}"}}"#
                ),
            );
        }
        if matches!(s.config.hostile_token, Some(Hostile::LongToken(_))) {
            s.stats.hostile_answers += 1;
        }
        Reply::json(
            200,
            json!({
                "token_type": "Bearer",
                "expires_in": lifetime.as_secs().max(1),
                "ext_expires_in": lifetime.as_secs().max(1),
                "access_token": token,
            })
            .to_string(),
        )
    }

    /// IMDS (`Metadata: true`) and App Service (`X-IDENTITY-HEADER`) managed identity.
    fn managed_identity(&self, req: &Request) -> Reply {
        let query: HashMap<String, String> = form_decode(&req.query).into_iter().collect();
        let mut s = self.lock();
        s.stats.token_requests += 1;
        let Some(mi) = s.config.managed_identity.clone() else {
            return aad_error(400, "invalid_request", "Identity not found");
        };
        let app_service = req.path == "/msi/token";
        if app_service {
            if req.header("x-identity-header") != Some(mi.identity_header.as_str()) {
                s.stats.token_refusals += 1;
                return aad_error(401, "unauthorized", "X-IDENTITY-HEADER missing or wrong");
            }
        } else if req.header("metadata") != Some("true") {
            s.stats.token_refusals += 1;
            return aad_error(
                400,
                "invalid_request",
                "Required metadata header not specified",
            );
        }
        let expected_version = if app_service {
            "2019-08-01"
        } else {
            "2018-02-01"
        };
        let resource = query.get("resource").map(String::as_str).unwrap_or("");
        let client_id = query.get("client_id").cloned();
        let refusal = if query.get("api-version").map(String::as_str) != Some(expected_version) {
            Some("api-version missing or unsupported")
        } else if resource != SIM_API_AUDIENCE {
            Some("resource is not a known application")
        } else if client_id != mi.user_assigned_client_id {
            Some("Identity not found")
        } else {
            None
        };
        if let Some(r) = refusal {
            s.stats.token_refusals += 1;
            return aad_error(400, "invalid_request", r);
        }
        let (token, lifetime) =
            issue_token(&mut s, client_id.as_deref().unwrap_or("system-assigned"));
        let expires_on = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + lifetime.as_secs().max(1);
        let mut body = json!({
            "access_token": token,
            "expires_on": expires_on.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        });
        if !app_service {
            body["expires_in"] = json!(lifetime.as_secs().max(1).to_string());
        }
        Reply::json(200, body.to_string())
    }

    async fn api(&self, req: &Request) -> Reply {
        let (reply, delay) = self.api_reply(req);
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        reply
    }

    fn api_reply(&self, req: &Request) -> (Reply, Option<Duration>) {
        let now = Instant::now();
        let mut guard = self.lock();
        let s = &mut *guard;
        s.stats.api_calls += 1;
        let single = req
            .path
            .strip_prefix("/api/machineactions/")
            .map(str::to_string);
        if single.is_some() {
            s.stats.get_calls += 1;
        } else {
            s.stats.list_calls += 1;
        }

        // A Retry-After in force answers everything with another 429.
        if let Some((written, until)) = s.retry_window {
            if now < until {
                if now.duration_since(written) > s.config.early_retry_grace {
                    s.stats.early_retries += 1;
                }
                s.stats.rate_limited += 1;
                return (self.too_many(&s.config, until - now), None);
            }
            s.retry_window = None;
        }

        let token = req
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or("");
        match s.tokens.get(token).filter(|_| !s.config.reject_all_tokens) {
            None => {
                s.stats.unknown_token_calls += 1;
                return (
                    odata_error(
                        401,
                        "Unauthorized",
                        "Authorization token is missing or invalid.",
                    ),
                    None,
                );
            }
            Some(exp) if *exp <= now => {
                s.stats.expired_token_calls += 1;
                return (
                    odata_error(401, "Unauthorized", "The access token has expired."),
                    None,
                );
            }
            Some(_) => {}
        }
        if let Some(why) = token_forbidden(token) {
            s.stats.forbidden_calls += 1;
            return (odata_error(403, "Forbidden", &why), None);
        }

        // A call counts against both windows; either one full earns a 429.
        let mut until: Option<Instant> = None;
        for (limit, window) in [
            (s.config.rate_limit.clone(), &mut s.window),
            (s.config.long_rate_limit.clone(), &mut s.long_window),
        ] {
            let Some(limit) = limit else { continue };
            while window
                .front()
                .is_some_and(|t| now.duration_since(*t) >= limit.window)
            {
                window.pop_front();
            }
            if window.len() >= limit.calls as usize {
                let free = window[window.len() - limit.calls as usize] + limit.window;
                until = until.max(Some(free));
            }
        }
        if let Some(until) = until {
            s.retry_window = Some((now, until));
            s.stats.rate_limited += 1;
            return (self.too_many(&s.config, until - now), None);
        }
        if s.config.rate_limit.is_some() {
            s.window.push_back(now);
        }
        if s.config.long_rate_limit.is_some() {
            s.long_window.push_back(now);
        }

        let fault = if s.config.fault_rate > 0.0
            && !s.config.faults.is_empty()
            && s.rng.f64() < s.config.fault_rate
        {
            Some(s.config.faults[s.rng.usize(0..s.config.faults.len())])
        } else {
            None
        };
        if let Some(f) = fault {
            s.stats.faults_injected += 1;
            *s.stats.faults_by_kind.entry(format!("{f:?}")).or_default() += 1;
        }
        let mut delay = None;
        match fault {
            Some(Fault::InternalError) => {
                return (
                    odata_error(500, "InternalServerError", "An unexpected error occurred"),
                    None,
                );
            }
            Some(Fault::Unavailable) => {
                return (
                    Reply::json(
                        503,
                        r#"{"error":{"code":"","message":"The service is temporarily unavailable.","details":[{"code":"Transient","message":"retry later"}]}}"#,
                    ),
                    None,
                );
            }
            Some(Fault::BadGatewayHtml) => {
                return (
                    Reply::Full {
                        status: 502,
                        content_type: "text/html",
                        extra_headers: Vec::new(),
                        body: b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1><p>The proxy server received an invalid response from an upstream server.</p></body></html>".to_vec(),
                    },
                    None,
                );
            }
            Some(Fault::Drop) => return (Reply::Drop, None),
            Some(Fault::TooManyRequests) => {
                let wait = s.config.fault_retry_after;
                s.retry_window = Some((now, now + wait));
                s.stats.rate_limited += 1;
                let reply = match &s.config.fault_retry_after_header {
                    Some(raw) => odata_error(
                        429,
                        "TooManyRequests",
                        "Rate limit is exceeded. Try again later.",
                    )
                    .with_header("retry-after", raw.clone()),
                    None => self.too_many(&s.config, wait),
                };
                return (reply, None);
            }
            Some(Fault::Slow) => delay = Some(s.config.slow_delay),
            _ => {}
        }

        let body = match single {
            Some(raw_id) => {
                let Ok(id) = ActionId::parse(&raw_id) else {
                    return (
                        odata_error(
                            400,
                            "InvalidRequestBody",
                            &format!("'{raw_id}' is not a valid action id"),
                        ),
                        None,
                    );
                };
                *s.stats.calls_by_action.entry(id.clone()).or_default() += 1;
                match s.actions.get(&id).filter(|a| a.visible(now)) {
                    Some(a) => serde_json::to_string(&a.to_json(now, true)).expect("serializes"),
                    None => {
                        s.stats.not_found_answers += 1;
                        return (
                            odata_error(
                                404,
                                "ResourceNotFound",
                                &format!("MachineAction {id} was not found"),
                            ),
                            delay,
                        );
                    }
                }
            }
            None => {
                let query: HashMap<String, String> = form_decode(&req.query).into_iter().collect();
                let filter = query.get("$filter").map(String::as_str).unwrap_or("");
                let parsed = parse_filter(filter);
                if let Some((form, _)) = &parsed {
                    *s.stats.list_calls_by_form.entry(*form).or_default() += 1;
                }
                let refused = match &parsed {
                    None => true,
                    Some((form, _)) => s.config.rejected_filters.contains(form),
                };
                if refused {
                    // Both shapes the service is seen to use: with a code, and the query
                    // parser's own with an empty code, no target and `details`.
                    let reply = if s.rng.bool() {
                        odata_error(
                            400,
                            "ODataError",
                            &format!("Invalid filter clause: '{filter}' is not supported."),
                        )
                    } else {
                        Reply::json(
                            400,
                            json!({"error": {"code": "", "message": "The query specified in the URI is not valid. Could not find a property named 'x' on type 'MachineAction'.", "details": []}}).to_string(),
                        )
                    };
                    return (reply, None);
                }
                let (form, selection) = parsed.expect("refused above when None");
                let selection = if s.config.ignored_filters.contains(&form) {
                    Selection::All
                } else {
                    selection
                };
                let top = match query.get("$top").map(|t| t.parse::<usize>()) {
                    None => 10_000,
                    Some(Ok(t)) if t <= 10_000 => t,
                    Some(_) => {
                        return (
                            odata_error(
                                400,
                                "ODataError",
                                "The limit of '10000' for Top query has been exceeded.",
                            ),
                            None,
                        );
                    }
                };
                let skip = query
                    .get("$skip")
                    .and_then(|t| t.parse::<usize>().ok())
                    .unwrap_or(0);
                let mut value = Vec::new();
                if let Selection::Ids(ids) = &selection {
                    for id in ids {
                        *s.stats.calls_by_action.entry(id.clone()).or_default() += 1;
                        if let Some(a) = s.actions.get(id)
                            && a.visible(now)
                            && value.len() < top
                        {
                            value.push(a.to_json(now, false));
                            if s.config.stale_copies {
                                let (step, _) = a.lifecycle.at(a.age(now));
                                for earlier in 0..step {
                                    let then = (a.created + a.lifecycle.steps[earlier].0)
                                        .checked_sub(a.backdate)
                                        .unwrap_or(a.created);
                                    value.push(a.to_json(then, false));
                                }
                            }
                        }
                    }
                } else {
                    // Newest first, as the service pages them; $skip counts in that order.
                    let mut matching: Vec<&SimAction> = s
                        .actions
                        .values()
                        .filter(|a| a.visible(now) && selection.admits(a, now))
                        .collect();
                    matching.sort_unstable_by_key(|a| std::cmp::Reverse((a.created_wall, a.index)));
                    value.extend(
                        matching
                            .into_iter()
                            .skip(skip)
                            .take(top)
                            .map(|a| a.to_json(now, false)),
                    );
                }
                #[derive(serde::Serialize)]
                struct Page<'a> {
                    #[serde(rename = "@odata.context")]
                    context: &'static str,
                    value: Vec<ActionJson<'a>>,
                }
                serde_json::to_string(&Page {
                    context: "https://api.securitycenter.microsoft.com/api/$metadata#MachineActions",
                    value,
                })
                .expect("serializes")
            }
        };
        let reply = match fault {
            Some(Fault::TruncatedJson) => {
                let cut = body.len() / 2;
                Reply::json(200, body.as_bytes()[..cut].to_vec())
            }
            Some(Fault::CutConnection) => Reply::CutShort {
                status: 200,
                keep: body.len() / 2,
                body: body.into_bytes(),
            },
            _ => Reply::json(200, body),
        };
        (reply, delay)
    }
}

impl Tenant {
    fn too_many(&self, config: &SimConfig, wait: Duration) -> Reply {
        // Whole seconds, rounded up, as the service sends; fractions only for time-scaled
        // benchmarks, where a whole second would be minutes of simulated time.
        let value = if config.fractional_retry_after {
            format!("{:.3}", wait.as_secs_f64())
        } else {
            wait.as_millis().div_ceil(1000).max(1).to_string()
        };
        odata_error(
            429,
            "TooManyRequests",
            "Rate limit is exceeded. Try again later.",
        )
        .with_header("retry-after", value)
    }
}

/// The `$filter` forms the simulated service understands; a test can refuse any of them with
/// a 400 (`SimConfig::rejected_filters`), as the real service may refuse undocumented ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilterForm {
    /// No `$filter`: every action.
    None,
    /// `id in ('a','b')`
    IdIn,
    /// `id eq 'a' or id eq 'b'`
    IdEqOr,
    /// `status eq 'Pending'` (the documented form)
    StatusEq,
    /// `status in ('Pending','InProgress')`
    StatusIn,
    /// `status eq 'Pending' or status eq 'InProgress'`
    StatusEqOr,
    /// `creationDateTimeUtc ge 2026-11-28T10:00:00Z` (or `gt`)
    CreatedSince,
}

/// Which actions a list call selects.
#[derive(Debug, Clone, PartialEq)]
enum Selection {
    All,
    Ids(Vec<ActionId>),
    Status(Vec<String>),
    CreatedSince { at: SystemTime, inclusive: bool },
}

impl Selection {
    fn admits(&self, a: &SimAction, now: Instant) -> bool {
        match self {
            Selection::All => true,
            Selection::Ids(ids) => ids.contains(&a.id),
            Selection::Status(statuses) => {
                let (_, status) = a.lifecycle.at(a.age(now));
                statuses.iter().any(|s| s == status.as_str())
            }
            Selection::CreatedSince { at, inclusive } => {
                // MDE compares its own seven-digit times; the simulator's are whole ms.
                let created = crate::domain::parse_time(&format_time(a.created_wall))
                    .unwrap_or(a.created_wall);
                if *inclusive {
                    created >= *at
                } else {
                    created > *at
                }
            }
        }
    }
}

fn quoted(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix('\'')?.strip_suffix('\'')?;
    (!inner.contains('\'')).then_some(inner)
}

/// Reads the terms of `field in ('a','b')`.
fn in_list<'a>(f: &'a str, field: &str) -> Option<Vec<&'a str>> {
    let rest = f.strip_prefix(field)?.trim_start().strip_prefix("in")?;
    let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner.split(',').map(quoted).collect()
}

/// Reads the terms of `field eq 'a' or field eq 'b'`.
fn eq_terms<'a>(f: &'a str, field: &str) -> Option<Vec<&'a str>> {
    f.split(" or ")
        .map(|term| {
            quoted(
                term.trim()
                    .strip_prefix(field)?
                    .trim_start()
                    .strip_prefix("eq")?,
            )
        })
        .collect()
}

/// Reads a `$filter`; anything it does not know is refused with a 400, as the service does.
fn parse_filter(filter: &str) -> Option<(FilterForm, Selection)> {
    let f = filter.trim();
    if f.is_empty() {
        return Some((FilterForm::None, Selection::All));
    }
    let ids = |terms: Vec<&str>| -> Option<Vec<ActionId>> {
        terms.into_iter().map(|t| ActionId::parse(t).ok()).collect()
    };
    let statuses =
        |terms: Vec<&str>| Selection::Status(terms.into_iter().map(String::from).collect());
    if let Some(terms) = in_list(f, "id") {
        return Some((FilterForm::IdIn, Selection::Ids(ids(terms)?)));
    }
    if let Some(terms) = eq_terms(f, "id") {
        return Some((FilterForm::IdEqOr, Selection::Ids(ids(terms)?)));
    }
    if let Some(terms) = in_list(f, "status") {
        return Some((FilterForm::StatusIn, statuses(terms)));
    }
    if let Some(terms) = eq_terms(f, "status") {
        let form = if terms.len() == 1 {
            FilterForm::StatusEq
        } else {
            FilterForm::StatusEqOr
        };
        return Some((form, statuses(terms)));
    }
    let rest = f.strip_prefix("creationDateTimeUtc")?.trim_start();
    let (inclusive, time) = if let Some(t) = rest.strip_prefix("ge ") {
        (true, t)
    } else {
        (false, rest.strip_prefix("gt ")?)
    };
    let at = crate::domain::parse_time(time.trim())?;
    Some((
        FilterForm::CreatedSince,
        Selection::CreatedSince { at, inclusive },
    ))
}

/// Settings pointing a daemon at `sim`, with polling tuned for seconds-long lifecycles.
pub fn settings_for(sim: &Simulator, db: &std::path::Path) -> crate::config::Settings {
    let mut s = crate::config::Settings::default();
    s.database.path = db.to_path_buf();
    s.api.base_url = Some(sim.base_url());
    s.api.timeout = Duration::from_secs(5);
    s.auth.authority = Some(sim.authority());
    s.auth.tenant_id = Some(SIM_TENANT.to_string());
    s.auth.client_id = Some(SIM_CLIENT_ID.to_string());
    s.auth.client_secret = Some(crate::secret::Secret::new(SIM_CLIENT_SECRET));
    s.auth.scope = Some(SIM_SCOPE.to_string());
    s.poll.initial_interval = Duration::from_millis(300);
    s.poll.multiplier = 1.5;
    s.poll.max_interval = Duration::from_secs(2);
    s.poll.ride_along = Duration::from_secs(1);
    s.poll.shutdown_grace = Duration::from_secs(3);
    // The simulator answers in microseconds: a budget that never holds a test back (tests
    // of the budget set their own).
    s.poll.sweep_interval = Duration::from_millis(500);
    // A sweep every sweep_interval, as tests count on (the adaptive cadence is measured
    // by the benchmark and unit-tested).
    s.poll.lag_per_call = Duration::from_secs(3600);
    s.rate_limit.per_minute = 6_000;
    s.rate_limit.per_hour = 360_000;
    // Unknown ids end within seconds; tests of the visibility delay set their own.
    s.poll.not_found_after = Duration::from_secs(1);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse() {
        let a = "2e9da30d-27f6-4208-81f2-9cd3d67893ba";
        let b = "11111111-2222-3333-4444-555555555555";
        let form = |f: &str| parse_filter(f).map(|(form, _)| form);
        let ids = |f: &str| match parse_filter(f) {
            Some((_, Selection::Ids(ids))) => ids.len(),
            other => panic!("{f}: {other:?}"),
        };
        assert_eq!(ids(&format!("id in ('{a}','{b}')")), 2);
        assert_eq!(ids(&format!("id in ( '{a}' , '{b}' )")), 2);
        assert_eq!(ids(&format!("id eq '{a}' or id eq '{b}'")), 2);
        assert_eq!(form(&format!("id in ('{a}')")), Some(FilterForm::IdIn));
        assert_eq!(form(&format!("id in ('{a}') and x")), None);
        assert_eq!(form("id in ('not-an-id')"), None);
        assert_eq!(form(""), Some(FilterForm::None));
        assert_eq!(form("status eq 'Pending'"), Some(FilterForm::StatusEq));
        assert_eq!(
            form("status in ('Pending','InProgress')"),
            Some(FilterForm::StatusIn)
        );
        assert_eq!(
            form("status eq 'Pending' or status eq 'InProgress'"),
            Some(FilterForm::StatusEqOr)
        );
        assert_eq!(
            parse_filter("creationDateTimeUtc ge 2026-11-28T10:00:00.1234567Z"),
            Some((
                FilterForm::CreatedSince,
                Selection::CreatedSince {
                    at: crate::domain::parse_time("2026-11-28T10:00:00.1234567Z").unwrap(),
                    inclusive: true
                }
            ))
        );
        assert_eq!(form("creationDateTimeUtc lt 2026-11-28T10:00:00Z"), None);
        assert_eq!(form("status eq 'Pending' and machineId eq 'x'"), None);
    }

    #[test]
    fn lifecycles_report_status_by_time() {
        let l = Lifecycle::simple(
            Duration::from_secs(1),
            Duration::from_secs(2),
            ActionStatus::Failed,
        );
        assert_eq!(l.at(Duration::ZERO).1, &ActionStatus::Pending);
        assert_eq!(
            l.at(Duration::from_millis(1500)).1,
            &ActionStatus::InProgress
        );
        assert_eq!(l.at(Duration::from_secs(10)).1, &ActionStatus::Failed);
        assert_eq!(l.length(), Duration::from_secs(3));
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..200 {
            let l = Lifecycle::random(&mut rng, Duration::from_secs(10));
            assert!(l.terminal().is_terminal());
            assert_eq!(l.steps[0].1, ActionStatus::Pending);
        }
    }

    #[test]
    fn mde_times_have_two_to_seven_digits() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_543_925_907_129);
        assert_eq!(mde_time(t, 7), "2018-12-04T12:18:27.1290000Z");
        assert_eq!(mde_time(sim_time(t), 2), "2018-12-04T12:18:27.12Z");
        assert_eq!(mde_time(sim_time(t), 5), "2018-12-04T12:18:27.12000Z");
        for digits in 2..=7 {
            assert_eq!(
                crate::domain::normalize_time(&mde_time(sim_time(t), digits)).as_deref(),
                Some("2018-12-04T12:18:27.120Z")
            );
        }
    }
}
