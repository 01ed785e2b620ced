//! The number of active actions, which every step of the loop asks for. Counting them is a
//! walk of the tracking index (milliseconds at 100,000), and a churning tenant wakes the
//! loop many times a second (every intake request does): the count is read again only when
//! it is older than `RECOUNT_AFTER`, was zero (new ids may just have arrived), or the loop
//! itself changed it (actions finished, revived, discovered).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How stale the count may be. It decides between sweeps and passes and whether the loop
/// idles; neither is worse for a count a second or two old.
const RECOUNT_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub(super) struct ActiveCount {
    last: Mutex<Option<(Instant, u64)>>,
}

impl ActiveCount {
    /// The count as last read, when it may still serve.
    pub(super) fn fresh(&self) -> Option<u64> {
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.filter(|(at, n)| *n > 0 && at.elapsed() < RECOUNT_AFTER)
            .map(|(_, n)| n)
    }

    pub(super) fn read(&self, n: u64) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), n));
    }

    /// The loop changed the count: the next step reads it again.
    pub(super) fn changed(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_count_serves_until_stale_zero_or_changed() {
        let c = ActiveCount::default();
        assert_eq!(c.fresh(), None);
        c.read(5);
        assert_eq!(c.fresh(), Some(5));
        tokio::time::advance(RECOUNT_AFTER).await;
        assert_eq!(c.fresh(), None, "stale");
        c.read(5);
        c.changed();
        assert_eq!(c.fresh(), None, "changed by the loop");
        c.read(0);
        assert_eq!(c.fresh(), None, "zero: an arrival must be seen at once");
    }
}
