//! What a running daemon shares, built once by `Daemon::start` and handed to whoever needs
//! it (the HTTP handlers, the systemd supervisor, the demo): the store, the rate budget, the
//! token cache, the metrics and the poll loop. Nothing reaches one of these through another.

use std::sync::Arc;

use crate::auth::TokenProvider;
use crate::budget::RateBudget;
use crate::metrics::Metrics;
use crate::poller::Poller;
use crate::store::Store;

#[derive(Clone)]
pub struct Runtime {
    pub store: Store,
    pub budget: Arc<RateBudget>,
    pub tokens: Arc<TokenProvider>,
    pub metrics: Arc<Metrics>,
    /// The loop: its progress (`is_alive`), its wake-up for new ids.
    pub poller: Arc<Poller>,
}

impl Runtime {
    /// Why the daemon is not ready, every cheap check of `/readyz` (all but its probe of the
    /// database write lock, which a metrics scrape must not wait on); empty when ready.
    pub fn not_ready(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if let Some(refusal) = self.tokens.refusal() {
            reasons.push(format!("no access token: {refusal}"));
        }
        reasons.extend(self.metrics.blockers());
        if let Some(left) = self.budget.remaining().paused_for {
            reasons.push(format!(
                "MDE rate limit (429): every call paused until {} (Retry-After, at most 1h)",
                crate::domain::format_time(std::time::SystemTime::now() + left)
            ));
        }
        if !self.poller.is_alive() {
            reasons.push(format!(
                "poll loop shows no progress for {}s",
                self.poller.since_progress().as_secs()
            ));
        }
        reasons
    }
}
