//! The call gate every API call goes through: a budget slot, a token, its row in the call
//! log before it is sent, one retry with a fresh token on a 401, the tenant-wide pause on a
//! 429; and what a failed call means for the loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::auth::{AuthError, TokenProvider};
use crate::budget::RateBudget;
use crate::mde::MdeError;
use crate::metrics::{Blocker, Metrics};
use crate::secret::Secret;
use crate::store::{Endpoint, Store};

use super::stall::StallWatch;
use super::{CallError, DEFAULT_RETRY_AFTER, Halt};

/// Owns what every call shares: the tenant's budget, the token source, the call log and
/// what MDE's refusals mean.
pub(super) struct CallGate {
    pub(super) store: Store,
    pub(super) tokens: Arc<TokenProvider>,
    pub(super) budget: Arc<RateBudget>,
    metrics: Arc<Metrics>,
    stall: Arc<StallWatch>,
    /// Whether a 404 that was not the API's has been logged at error level.
    not_api_logged: AtomicBool,
}

/// One call as sent: the token it carried, its row in the call log, what came back.
struct Sent<T> {
    token: Secret,
    call_id: i64,
    started: tokio::time::Instant,
    result: Result<T, MdeError>,
}

impl CallGate {
    pub(super) fn new(
        store: Store,
        tokens: Arc<TokenProvider>,
        budget: Arc<RateBudget>,
        metrics: Arc<Metrics>,
        stall: Arc<StallWatch>,
    ) -> Self {
        Self {
            store,
            tokens,
            budget,
            metrics,
            stall,
            not_api_logged: AtomicBool::new(false),
        }
    }

    /// Turns a failed call into the error text to record, or a reason to stop the chunk.
    pub(super) fn halt_or_error(&self, e: CallError) -> Result<String, Halt> {
        match e {
            CallError::Api(MdeError::RateLimited { .. }) => Err(Halt::RateLimited),
            CallError::Api(e) => {
                self.metrics.errors.inc();
                self.metrics.set_last_error(&e.to_string());
                match &e {
                    MdeError::Forbidden(detail) => {
                        error!(error = %e, "MDE refuses the app; grant it the application permission Machine.Read.All (WindowsDefenderATP) with admin consent");
                        self.metrics.set_blocker(
                            Blocker::ApiForbidden,
                            Some(crate::mde::explain_refusal(detail)),
                        );
                    }
                    MdeError::NotApi { .. } => {
                        self.metrics.not_api_answers.inc();
                        // Every call would say the same: once is enough.
                        if !self.not_api_logged.swap(true, Ordering::Relaxed) {
                            error!(error = %e, "an answer did not come from the MDE API; nothing ends tracking while this lasts");
                        } else {
                            debug!(error = %e, "not an MDE API answer");
                        }
                    }
                    MdeError::Rejected { .. } | MdeError::Unauthorized(_) => {
                        error!(error = %e, "MDE refused the call");
                    }
                    MdeError::Redirected { .. } => {
                        self.metrics.redirects_refused.inc();
                        warn!(error = %e, "redirect refused; will retry with backoff");
                    }
                    _ => warn!(error = %e, "poll failed; will retry with backoff"),
                }
                Ok(e.to_string())
            }
            CallError::Auth(e) => Err(Halt::Auth(e)),
            CallError::Cancelled => Err(Halt::Cancelled),
            CallError::Store(e) => Err(Halt::Store(e)),
        }
    }

    /// Sends one API call within the budget, with a token; on a 401 gets a new token and
    /// tries once more; on a 429 pauses every call for the Retry-After.
    pub(super) async fn call<T, F, Fut>(
        &self,
        endpoint: Endpoint,
        count: usize,
        sweep: Option<i64>,
        cancel: &CancellationToken,
        send: F,
    ) -> Result<T, CallError>
    where
        F: Fn(Secret) -> Fut,
        Fut: std::future::Future<Output = Result<T, MdeError>>,
    {
        let mut retried = false;
        loop {
            let sent = self
                .send_once(endpoint, count, sweep, cancel, &send)
                .await?;
            let retry_after = self.record_answer(endpoint, &sent).await;
            let refusal = sent.result.as_ref().err().and_then(MdeError::token_refusal);
            match sent.result {
                // While fresh tokens are being refused, the token this call used was fresh.
                Err(_) if refusal.is_some() && !retried && !self.tokens.rejecting() => {
                    debug!(
                        detail = refusal.as_deref().unwrap_or_default(),
                        "token refused; fetching a new one and retrying once"
                    );
                    self.tokens.invalidate(&sent.token).await;
                    retried = true;
                }
                Err(e) if refusal.is_some() => {
                    let detail = refusal.unwrap_or_default();
                    return Err(self.tokens_rejected(&sent.token, &e, &detail).await);
                }
                Err(MdeError::RateLimited { .. }) => {
                    let wait = retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
                    self.metrics.rate_limited.inc();
                    warn!(
                        retry_after_ms = wait.as_millis() as u64,
                        "MDE rate limit (429); pausing every call"
                    );
                    return Err(CallError::Api(MdeError::RateLimited {
                        retry_after: Some(wait),
                    }));
                }
                other => return other.map_err(CallError::Api),
            }
        }
    }

    /// Waits for a budget slot, takes a token, logs the call and sends it; a 429 pauses
    /// every call before anything else happens.
    async fn send_once<T, F, Fut>(
        &self,
        endpoint: Endpoint,
        count: usize,
        sweep: Option<i64>,
        cancel: &CancellationToken,
        send: &F,
    ) -> Result<Sent<T>, CallError>
    where
        F: Fn(Secret) -> Fut,
        Fut: std::future::Future<Output = Result<T, MdeError>>,
    {
        self.stall
            .beating(self.budget.acquire(cancel))
            .await
            .map_err(|_| CallError::Cancelled)?;
        let token = self.tokens.token().await.map_err(CallError::Auth)?;
        let call_id = self
            .store
            .start_api_call(endpoint, count, sweep, SystemTime::now())
            .await
            .map_err(CallError::Store)?;
        // Recording the call took a moment; a 429 seen meanwhile by another call holds
        // this one too.
        self.stall
            .beating(self.budget.wait_while_paused(cancel))
            .await
            .map_err(|_| CallError::Cancelled)?;
        self.metrics.api_calls.inc();
        let started = tokio::time::Instant::now();
        let result = send(token.clone()).await;
        if let Err(MdeError::RateLimited { retry_after }) = &result {
            // Pause before anything else (even the write below) so other calls stop now.
            self.budget
                .pause(retry_after.unwrap_or(DEFAULT_RETRY_AFTER));
        }
        Ok(Sent {
            token,
            call_id,
            started,
            result,
        })
    }

    /// Clears the blockers an answer disproves, counts it and finishes its row in the
    /// call log. Returns the wait a 429 asked for.
    async fn record_answer<T>(&self, endpoint: Endpoint, sent: &Sent<T>) -> Option<Duration> {
        let result = &sent.result;
        if result.is_ok() && self.metrics.set_blocker(Blocker::ApiForbidden, None) {
            info!("MDE accepts the app's calls again");
        }
        // Answers only an authenticated caller gets: the token was good.
        let authenticated = matches!(
            result,
            Ok(_) | Err(MdeError::NotFound | MdeError::Forbidden(_) | MdeError::FilterRejected(_))
        );
        if authenticated && self.tokens.accepted() {
            self.metrics.set_blocker(Blocker::TokensRejected, None);
            info!("MDE accepts our tokens again");
        }
        let (status, outcome, retry_after) = match result {
            Ok(_) => (Some(200), "ok", None),
            Err(e @ MdeError::RateLimited { retry_after }) => (
                e.http_status(),
                e.outcome(),
                Some(retry_after.unwrap_or(DEFAULT_RETRY_AFTER)),
            ),
            Err(e) => (e.http_status(), e.outcome(), None),
        };
        self.metrics.count_call(endpoint.as_str(), status);
        let took = sent.started.elapsed();
        if let Err(e) = self
            .store
            .finish_api_call(sent.call_id, status, outcome, retry_after, took)
            .await
        {
            warn!(error = %e, "cannot record an API call's outcome");
        }
        retry_after
    }

    /// A freshly issued token was refused too: token requests back off and readiness says
    /// why.
    async fn tokens_rejected(&self, token: &Secret, e: &MdeError, detail: &str) -> CallError {
        let wait = self.tokens.rejected(token, detail).await;
        let code = e.http_status().unwrap_or(401);
        let why = format!(
            "MDE rejects our tokens ({code} to a freshly issued one: {detail}); token requests back off, next in {}",
            crate::domain::format_duration(wait)
        );
        if self
            .metrics
            .set_blocker(Blocker::TokensRejected, Some(why.clone()))
        {
            error!("{why}; check auth.tenant_id, auth.scope and the app's consent");
        }
        CallError::Auth(AuthError::BackingOff { wait, last: why })
    }
}
