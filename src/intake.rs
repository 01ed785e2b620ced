//! Intake: the one way ids enter the queue, whoever brings them (the CLI, the HTTP API, a
//! test). Callers parse and refuse what is not an id in their own terms (a file's line, a
//! JSON position); here the valid ids are enqueued in one transaction, a repeat within one
//! intake is one enqueue, and each id gets its outcome. Waking a running loop is the
//! caller's, since only an in-process caller can.

use std::time::SystemTime;

use crate::domain::{ActionId, HostPattern, Source, Tracking};
use crate::store::{Enqueued, NotifyRequest, Store, StoreError};

/// The longest `correlation` kept (it is echoed in every event of the action).
pub const MAX_CORRELATION: usize = 1024;

/// Checks what a caller attaches to its ids: a correlation of printable text, a callback
/// URL whose host `allow` lists. The error says what to change.
pub fn check_request(request: &NotifyRequest, allow: &[HostPattern]) -> Result<(), String> {
    if let Some(c) = &request.correlation {
        if c.len() > MAX_CORRELATION {
            return Err(format!(
                "correlation is {} bytes; at most {MAX_CORRELATION}",
                c.len()
            ));
        }
        if c.chars().any(char::is_control) {
            return Err("correlation must not contain control characters".into());
        }
    }
    if let Some(url) = &request.callback_url {
        crate::domain::check_callback_url(url, allow)?;
    }
    Ok(())
}

/// What became of one id of an intake, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub id: ActionId,
    pub outcome: Enqueued,
    /// The id came earlier in the same intake; `outcome` says what its first occurrence
    /// found (a repeat of an added id is known and active).
    pub repeat: bool,
}

impl Taken {
    /// The tracking state after this intake: a new id is active.
    pub fn tracking(&self) -> Tracking {
        match self.outcome {
            Enqueued::Added => Tracking::Active,
            Enqueued::Known(t) => t,
        }
    }
}

/// Enqueues `ids` (repeats allowed) in one transaction.
pub async fn enqueue(
    store: &Store,
    ids: &[ActionId],
    now: SystemTime,
) -> Result<Vec<Taken>, StoreError> {
    enqueue_with(store, ids, now, Source::Cli, &NotifyRequest::default()).await
}

/// `enqueue` from `source`, with a correlation and callback URL for every id
/// (`check_request` first).
pub async fn enqueue_with(
    store: &Store,
    ids: &[ActionId],
    now: SystemTime,
    source: Source,
    request: &NotifyRequest,
) -> Result<Vec<Taken>, StoreError> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    let unique: Vec<ActionId> = ids.iter().filter(|id| seen.insert(*id)).cloned().collect();
    let outcomes = if unique.is_empty() {
        Vec::new()
    } else {
        store.enqueue_with(&unique, now, source, request).await?
    };
    let first: std::collections::HashMap<&ActionId, &Enqueued> =
        unique.iter().zip(&outcomes).collect();
    let mut reported = std::collections::HashSet::with_capacity(unique.len());
    Ok(ids
        .iter()
        .map(|id| {
            let repeat = !reported.insert(id);
            // Every id is among `unique`, so it has a first outcome.
            let outcome = match first[id] {
                Enqueued::Added if repeat => Enqueued::Known(Tracking::Active),
                o => o.clone(),
            };
            Taken {
                id: id.clone(),
                outcome,
                repeat,
            }
        })
        .collect())
}
