//! What a running daemon shares, built once by `Daemon::start` and handed to whoever needs
//! it (the HTTP handlers, the systemd supervisor, the demo): the store, the rate budget, the
//! token cache, the metrics and the poll loop. Nothing reaches one of these through another.

use std::sync::Arc;

use crate::auth::TokenProvider;
use crate::budget::RateBudget;
use crate::domain::HostPattern;
use crate::metrics::{Metrics, NotifySnapshot};
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
    /// `callbacks.allow`: which callback URLs intake takes.
    pub callback_allow: Arc<[HostPattern]>,
}

impl Runtime {
    /// Why the daemon is not ready, every cheap check of `/readyz` (all but its probe of the
    /// database write lock, which a metrics scrape must not wait on); empty when ready.
    pub fn not_ready(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        reasons.extend(self.tokens.unusable());
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

    /// Each configured destination's backlog and standing (and the callbacks', once any
    /// was queued), for `/metrics` and `/readyz`.
    pub async fn notify_standing(&self) -> Result<Vec<NotifySnapshot>, crate::store::StoreError> {
        let (destinations, counts) =
            tokio::try_join!(self.store.destinations(), self.store.delivery_counts())?;
        let now = std::time::SystemTime::now();
        let mut out: Vec<NotifySnapshot> = destinations
            .iter()
            .filter(|d| d.configured)
            .map(|d| NotifySnapshot {
                destination: d.name.clone(),
                disabled: d.disabled_at.is_some(),
                ..Default::default()
            })
            .collect();
        for c in counts {
            let slot = match out.iter_mut().position(|n| n.destination == c.destination) {
                Some(i) => i,
                None if c.destination == crate::store::CALLBACK => {
                    out.push(NotifySnapshot {
                        destination: c.destination.clone(),
                        ..Default::default()
                    });
                    out.len() - 1
                }
                None => continue,
            };
            out[slot].pending = c.pending;
            out[slot].oldest_pending_seconds = c
                .oldest_pending
                .as_deref()
                .and_then(crate::domain::parse_time)
                .and_then(|t| now.duration_since(t).ok())
                .map_or(0.0, |d| d.as_secs_f64());
        }
        Ok(out)
    }
}
