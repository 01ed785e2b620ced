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
