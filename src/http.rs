//! The optional HTTP listener: liveness, readiness, Prometheus metrics, and intake for
//! sidecar deployments where the main container cannot run our CLI.
//!
//! `/healthz` and `/metrics` are open; `/v1/*` needs the bearer token when one is configured.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::domain::ActionId;
use crate::metrics::Snapshot;
use crate::secret::Secret;
use crate::store::{Enqueued, NotifyRequest};

/// Largest intake body: about 20,000 ids.
pub const MAX_BODY: usize = 1024 * 1024;
/// How long a client may take to send a request's headers, then its body.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/readyz` waits for the database write lock.
const READY_DB_TIMEOUT: Duration = Duration::from_secs(2);

pub struct HttpState {
    pub runtime: crate::runtime::Runtime,
    pub api_token: Option<Secret>,
    pub started: tokio::time::Instant,
}

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/actions", axum::routing::post(enqueue))
        .route("/v1/actions/{id}", get(action))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Serves until `stop` fires. Our own accept loop rather than `axum::serve`, which sets no
/// timer: a client that sends half its headers and then nothing held a connection (and its
/// task) forever.
pub async fn serve(listener: TcpListener, state: Arc<HttpState>, stop: CancellationToken) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let app = router(state);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, typically: wait rather than spin.
                    tracing::warn!(error = %e, "HTTP listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    while connections.join_next().await.is_some() {}
}

/// An error answer: problem details (RFC 9457, `application/problem+json`), with `error`
/// repeating `detail` for the clients of earlier versions.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    detail: String,
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
        }
    }

    fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = json!({
            "type": "about:blank",
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
            "error": self.detail,
        });
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
    }
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    Problem::new(status, message).into_response()
}

async fn healthz(State(s): State<Arc<HttpState>>) -> Response {
    if s.runtime.poller.is_alive() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let stalled = s.runtime.poller.since_progress().as_secs();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("poll loop shows no progress for {stalled}s\n"),
        )
            .into_response()
    }
}

async fn readyz(State(s): State<Arc<HttpState>>) -> Response {
    let mut failures = Vec::new();
    match tokio::time::timeout(READY_DB_TIMEOUT, s.runtime.store.check_writable()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failures.push(format!("database not writable: {e}")),
        Err(_) => failures.push("database write lock not available within 2s".to_string()),
    }
    failures.extend(s.runtime.not_ready());
    // Notifications do not make the daemon unready (it still tracks every action), but a
    // disabled destination is said here, after the verdict.
    let mut notes = Vec::new();
    if let Ok(destinations) = s.runtime.store.destinations().await {
        for d in destinations.iter().filter(|d| d.configured) {
            if let Some(at) = &d.disabled_at {
                notes.push(format!(
                    "notify destination {} disabled since {at}: {} (mde-actiond notify enable {})",
                    d.name,
                    d.disabled_reason.as_deref().unwrap_or("no reason recorded"),
                    d.name
                ));
            }
        }
    }
    let mut lines = if failures.is_empty() {
        vec!["ready".to_string()]
    } else {
        failures.clone()
    };
    lines.extend(notes);
    let status = if failures.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{}\n", lines.join("\n"))).into_response()
}

async fn metrics(State(s): State<Arc<HttpState>>) -> Response {
    let counts = match s.runtime.store.counts().await {
        Ok(c) => c,
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let budget = s.runtime.budget.remaining();
    let (oldest, stuck, notify) = match tokio::try_join!(
        s.runtime.store.oldest_active_created(),
        s.runtime.store.stuck_count(),
        s.runtime.notify_standing()
    ) {
        Ok(v) => v,
        Err(e) => return problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let oldest_active_seconds = oldest
        .as_deref()
        .and_then(crate::domain::parse_time)
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    let snapshot = Snapshot {
        by_tracking: counts.by_tracking,
        by_status: counts.by_status,
        budget_minute: budget.this_minute,
        budget_hour: budget.this_hour,
        paused_seconds_total: s.runtime.budget.paused_total().as_secs_f64(),
        paused_now: budget.paused_for.is_some(),
        token_refreshes: s.runtime.tokens.refreshes(),
        token_failures: s.runtime.tokens.failures(),
        token_failures_by_cause: s.runtime.tokens.failures_by_cause(),
        token_panics: s.runtime.tokens.panics(),
        up_seconds: s.started.elapsed().as_secs_f64(),
        ready: s.runtime.not_ready().is_empty(),
        since_progress_seconds: s.runtime.poller.since_progress().as_secs_f64(),
        stall_limit_seconds: s.runtime.poller.stall_limit().as_secs_f64(),
        oldest_active_seconds,
        stuck,
        notify,
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.runtime.metrics.render(&snapshot),
    )
        .into_response()
}

/// Proof that a `/v1/*` request carried the configured bearer token (checked in constant
/// time); a handler that takes it cannot run without the check.
pub struct Authorized;

impl axum::extract::FromRequestParts<Arc<HttpState>> for Authorized {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &Arc<HttpState>,
    ) -> Result<Self, Problem> {
        let Some(expected) = s.api_token.as_ref() else {
            return Ok(Authorized);
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(presented.as_bytes(), expected.expose().as_bytes()) {
            Ok(Authorized)
        } else {
            Err(Problem::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer <token from http.api_token_file>)",
            ))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

async fn enqueue(
    _: Authorized,
    State(s): State<Arc<HttpState>>,
    request: axum::extract::Request,
) -> Result<Response, Problem> {
    use axum::extract::FromRequest;
    // A body shorter than its Content-Length would otherwise be waited on forever.
    let body = match tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(request, &())).await {
        Ok(Ok(body)) => body,
        Ok(Err(rejection)) => return Ok(rejection.into_response()),
        Err(_) => {
            let waited = BODY_TIMEOUT.as_secs();
            return Err(Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {waited}s"),
            ));
        }
    };
    let intake = read_intake(&body).map_err(|m| Problem::new(StatusCode::BAD_REQUEST, m))?;
    // A refused callback refuses the whole request: taking the ids without it would leave
    // the caller waiting for a call that never comes.
    if let Err(why) = crate::intake::check_request(&intake.request, &s.runtime.callback_allow) {
        let detail = format!("nothing was enqueued: {why}");
        return Err(Problem::new(StatusCode::BAD_REQUEST, detail));
    }
    let taken = crate::intake::enqueue_with(
        &s.runtime.store,
        &intake.valid,
        SystemTime::now(),
        crate::domain::Source::Http,
        &intake.request,
    )
    .await
    .map_err(|e| Problem::unavailable(format!("cannot enqueue: {e}")))?;
    s.runtime.poller.wake();
    let answer = EnqueueAnswer::new(&intake, &taken);
    let status = if answer.refused == 0 {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    Ok((status, axum::Json(answer)).into_response())
}

// Typed rather than `serde_json::Value`s: a map per id made a 10,000-id answer cost over
// 12 MB of tree nodes at once.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum EnqueuedId<'a> {
    Taken(&'a str),
    Refused(&'a serde_json::Value),
}

#[derive(serde::Serialize)]
struct EnqueueOutcome<'a> {
    id: EnqueuedId<'a>,
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracking: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// What `POST /v1/actions` answers: the counts and, per id in the order sent, its result.
#[derive(serde::Serialize)]
struct EnqueueAnswer<'a> {
    added: usize,
    known: usize,
    refused: usize,
    results: Vec<EnqueueOutcome<'a>>,
}

impl<'a> EnqueueAnswer<'a> {
    /// `taken` has one entry per valid id of `intake`, in order; a duplicate within one
    /// request reports what happened to its first occurrence.
    fn new(intake: &'a Intake, taken: &'a [crate::intake::Taken]) -> Self {
        let mut answer = Self {
            added: 0,
            known: 0,
            refused: 0,
            results: Vec::with_capacity(intake.ids.len()),
        };
        let mut taken = taken.iter();
        for (raw, refusal) in intake.ids.iter().zip(&intake.refusals) {
            let outcome = match refusal {
                Some(reason) => {
                    answer.refused += 1;
                    EnqueueOutcome {
                        id: EnqueuedId::Refused(raw),
                        result: "refused",
                        tracking: None,
                        reason: Some(reason),
                    }
                }
                None => {
                    let Some(t) = taken.next() else { continue };
                    let id = EnqueuedId::Taken(t.id.as_str());
                    let (result, tracking) = match &t.outcome {
                        Enqueued::Added => {
                            answer.added += 1;
                            ("added", None)
                        }
                        Enqueued::Known(_) => {
                            answer.known += 1;
                            ("known", Some(t.tracking().as_str()))
                        }
                    };
                    EnqueueOutcome {
                        id,
                        result,
                        tracking,
                        reason: None,
                    }
                }
            };
            answer.results.push(outcome);
        }
        answer
    }
}

async fn action(
    _: Authorized,
    State(s): State<Arc<HttpState>>,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    let id =
        ActionId::parse(&raw).map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let row = match s.runtime.store.action(&id).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                format!("{id} is not tracked"),
            ));
        }
        Err(e) => return Err(Problem::unavailable(e)),
    };
    let transitions = s
        .runtime
        .store
        .transitions(&id)
        .await
        .map_err(Problem::unavailable)?;
    let body = json!({"action": crate::report::action_json(&row), "transitions": transitions});
    Ok(axum::Json(body).into_response())
}

/// An intake body, read: each id parsed on its own (the CLI's validation), so valid ones
/// are taken even when others are refused.
struct Intake {
    ids: Vec<serde_json::Value>,
    valid: Vec<ActionId>,
    /// Per entry of `ids`: why it was refused, if it was.
    refusals: Vec<Option<String>>,
    request: NotifyRequest,
}

fn read_intake(body: &[u8]) -> Result<Intake, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        ids: Vec<serde_json::Value>,
        #[serde(default)]
        correlation: Option<String>,
        #[serde(default)]
        callback_url: Option<String>,
    }
    let body: Body = serde_json::from_slice(body).map_err(|e| {
        format!(
            "body must be JSON like {{\"ids\": [\"<guid>\", ...], \"correlation\": \"...\", \"callback_url\": \"https://...\"}} (the last two optional): {e}"
        )
    })?;
    if body.ids.is_empty() {
        return Err("\"ids\" is empty".into());
    }
    let mut valid = Vec::new();
    let mut refusals = Vec::with_capacity(body.ids.len());
    for raw in &body.ids {
        let parsed = match raw {
            serde_json::Value::String(text) => ActionId::parse(text).map_err(|e| e.to_string()),
            other => Err(format!("{other} is not a string")),
        };
        match parsed {
            Ok(id) => {
                valid.push(id);
                refusals.push(None);
            }
            Err(reason) => refusals.push(Some(reason)),
        }
    }
    Ok(Intake {
        ids: body.ids,
        valid,
        refusals,
        request: NotifyRequest {
            correlation: body.correlation,
            callback_url: body.callback_url,
        },
    })
}

/// `mde-actiond healthcheck`: GET `path` on the configured listener; Ok on a 2xx.
pub async fn probe(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(), String> {
    // A wildcard listen address is reached through loopback.
    let host = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    let url = format!("http://{host}:{}{path}", addr.port());
    let mut policy = crate::outbound::Policy::new(timeout, timeout);
    policy.no_proxy = true;
    let client = crate::outbound::Outbound::new(policy).map_err(|e| e.to_string())?;
    let answer = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = answer.status();
    let body = answer
        .text(crate::outbound::Cap::ERROR)
        .await
        .unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{url}: HTTP {}: {}", status.as_u16(), body.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::{constant_time_eq, read_intake};
    use proptest::prelude::*;

    /// An intake body's id entries: GUIDs in their accepted spellings, near misses, other
    /// JSON types.
    fn id_entry() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<u128>().prop_map(|n| format!("\"{}\"", uuid_text(n))),
            any::<u128>().prop_map(|n| format!("\"{{{}}}\"", uuid_text(n).to_uppercase())),
            "\"[0-9a-f-]{0,40}\"",
            any::<i64>().prop_map(|n| n.to_string()),
            Just("null".to_string()),
            Just("[]".to_string()),
        ]
    }

    fn uuid_text(n: u128) -> String {
        crate::domain::ActionId::from_key(n).to_string()
    }

    proptest! {
        #[test]
        fn arbitrary_intake_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = read_intake(&body);
        }

        /// Every id taken is one the body named, and each entry is taken or refused.
        #[test]
        fn intake_takes_only_ids_the_body_names(entries in proptest::collection::vec(id_entry(), 1..20)) {
            let body = format!("{{\"ids\": [{}]}}", entries.join(","));
            let intake = read_intake(body.as_bytes()).unwrap();
            prop_assert_eq!(intake.refusals.len(), entries.len());
            prop_assert_eq!(intake.valid.len(), intake.refusals.iter().filter(|r| r.is_none()).count());
            let lower = body.to_lowercase();
            for id in &intake.valid {
                prop_assert!(lower.contains(id.as_str()), "{} not in {}", id, body);
            }
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }
}
