//! A simulated MDE tenant on loopback: the identity platform's token endpoint and the two
//! MachineAction calls, with lifecycles that unfold in real time, expiring tokens, a rate
//! limit that answers 429 + Retry-After, and switchable faults.
//!
//! Used by `demo`, the tests and the benchmarks. It counts what it saw so that tests can
//! assert on the daemon's manners: calls per action, calls sent early after a 429, calls with
//! an expired token.
//!
//! This file is the simulator's configuration and its handle (`Simulator`: create actions,
//! switch faults, read `SimStats`); `routes` answers the requests, `identity` issues and
//! checks tokens, `actions` holds the lifecycles and the MachineAction JSON, `filter`
//! parses `$filter`, `http` is the loopback server with its hostile answers, `recorder`
//! the other origin a redirect points at (it must never be reached).

mod actions;
pub mod evidence;
mod filter;
mod http;
mod identity;
pub mod recorder;
mod routes;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::{ActionId, ActionStatus, format_time};
pub use actions::{ACTION_TYPES, Lifecycle};
use actions::{DEVICES, SimAction, dns_name, machine_id, sim_time};
pub use filter::FilterForm;
pub use http::Request;
use identity::seed_token;

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
    /// Investigation packages and live response output, and the blob storage behind them.
    pub evidence: evidence::EvidenceConfig,
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
            evidence: evidence::EvidenceConfig::default(),
        }
    }
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
    evidence: evidence::EvidenceState,
    evidence_stats: evidence::EvidenceStats,
    /// Where the blob storage listens, as links name it.
    blob_base: String,
}

pub struct Simulator {
    addr: SocketAddr,
    blob_addr: SocketAddr,
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
        // Blob storage is another origin: its own port, never sent the API's token.
        let blob_listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let blob_addr = blob_listener.local_addr()?;
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
                evidence: evidence::EvidenceState::default(),
                evidence_stats: evidence::EvidenceStats::default(),
                blob_base: format!("http://{blob_addr}"),
            }),
        });
        let stop = CancellationToken::new();
        tokio::spawn(http::serve(listener, tenant.clone(), stop.clone()));
        let blobs = Arc::new(evidence::BlobStorage {
            tenant: tenant.clone(),
        });
        tokio::spawn(http::serve(blob_listener, blobs, stop.clone()));
        Ok(Self {
            addr,
            blob_addr,
            tenant,
            stop,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The blob storage origin evidence links point at (`http://127.0.0.1:port`).
    pub fn blob_url(&self) -> String {
        format!("http://{}", self.blob_addr)
    }

    /// What the evidence endpoints and the blob storage saw.
    pub fn evidence_stats(&self) -> evidence::EvidenceStats {
        self.lock().evidence_stats.clone()
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

    /// How evidence is served from now on (links issued before keep their expiry).
    pub fn set_evidence(&self, config: evidence::EvidenceConfig) {
        self.lock().config.evidence = config;
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
}
