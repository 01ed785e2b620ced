//! The process-wide API rate budget: at most `per_minute` calls in any 60 s and `per_hour` in
//! any 3600 s (sliding windows), and nothing at all while a 429's Retry-After runs.
//!
//! Every call takes a slot before it is sent; a call is never sent early.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
#[error("stopped while waiting for the API budget")]
pub struct Cancelled;

#[derive(Debug)]
pub struct RateBudget {
    per_minute: usize,
    per_hour: usize,
    /// The windows: a minute and an hour, unless compressed for a time-scaled benchmark.
    minute: Duration,
    hour: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Send times of the calls in the last hour, oldest first.
    sent: VecDeque<Instant>,
    paused_until: Option<Instant>,
    paused_total: Duration,
}

/// An API call as the rate budget needs to know it after a restart (read from the call
/// log).
#[derive(Debug, Clone)]
pub struct PastCall {
    pub sent_at: SystemTime,
    /// When a 429 asked us to wait, the moment the wait ends.
    pub retry_not_before: Option<SystemTime>,
}

/// What is left right now, for status lines and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    pub this_minute: u32,
    pub this_hour: u32,
    pub paused_for: Option<Duration>,
}

impl RateBudget {
    pub fn new(per_minute: u32, per_hour: u32) -> Self {
        Self::with_time_scale(per_minute, per_hour, 1.0)
    }

    /// Windows shortened by `scale` (0.01 makes a minute 0.6 s), for benchmarks that
    /// compress time; 1.0 in production.
    pub fn with_time_scale(per_minute: u32, per_hour: u32, scale: f64) -> Self {
        let scale = if scale.is_finite() && scale > 0.0 {
            scale
        } else {
            1.0
        };
        Self {
            per_minute: per_minute.max(1) as usize,
            per_hour: per_hour.max(1) as usize,
            minute: MINUTE.mul_f64(scale),
            hour: HOUR.mul_f64(scale),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Counts calls a previous run made (from the database), so a restart does not reset the
    /// windows or forget a Retry-After.
    pub fn seed(&self, past: &[PastCall], now: SystemTime) {
        let now_i = Instant::now();
        // A time before the monotonic clock's origin (shortly after boot) is counted as now:
        // erring towards fewer calls is the safe side of a budget.
        let to_instant = |t: SystemTime| match now.duration_since(t) {
            Ok(ago) => Some(now_i.checked_sub(ago).unwrap_or(now_i)),
            Err(ahead) => Some(now_i + ahead.duration()),
        };
        let longest = now_i + crate::domain::MAX_RETRY_AFTER;
        let mut inner = self.lock();
        for call in past {
            // A call dated after now was logged under a clock that has since stepped back:
            // counting it would hold calls back for the size of the step, not for any limit.
            if call.sent_at > now {
                continue;
            }
            if let Some(at) = to_instant(call.sent_at) {
                inner.sent.push_back(at);
            }
            if let Some(until) = call.retry_not_before.and_then(to_instant)
                && until > now_i
            {
                // Rows written before the cap existed may hold years.
                inner.paused_until = inner.paused_until.max(Some(until.min(longest)));
            }
        }
        inner.sent.make_contiguous().sort();
    }

    /// The shortest spacing at which `calls` calls can repeat forever within both windows,
    /// using `share` (0 to 1] of the budget: what a recurring round of calls must not beat.
    pub fn sustainable_interval(&self, calls: u32, share: f64) -> Duration {
        let per_call = (self.minute / self.per_minute as u32).max(self.hour / self.per_hour as u32);
        let share = if share.is_finite() && share > 0.0 {
            share.min(1.0)
        } else {
            1.0
        };
        per_call.mul_f64(f64::from(calls) / share)
    }

    /// Waits for a slot and takes it. Returns `Cancelled` if `cancel` fires first.
    pub async fn acquire(&self, cancel: &CancellationToken) -> Result<(), Cancelled> {
        loop {
            let wait_until = match self.try_take(Instant::now()) {
                Ok(()) => return Ok(()),
                Err(until) => until,
            };
            tokio::select! {
                _ = cancel.cancelled() => return Err(Cancelled),
                _ = tokio::time::sleep_until(wait_until) => {}
            }
        }
    }

    /// Waits out a Retry-After pause without taking a slot.
    pub async fn wait_while_paused(&self, cancel: &CancellationToken) -> Result<(), Cancelled> {
        loop {
            let until = {
                let inner = self.lock();
                match inner.paused_until {
                    Some(until) if until > Instant::now() => until,
                    _ => return Ok(()),
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return Err(Cancelled),
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Takes a slot if one is free now; otherwise says when to look again.
    fn try_take(&self, now: Instant) -> Result<(), Instant> {
        let mut inner = self.lock();
        if let Some(until) = inner.paused_until {
            if until > now {
                return Err(until);
            }
            inner.paused_until = None;
        }
        while inner
            .sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.hour)
        {
            inner.sent.pop_front();
        }
        if inner.sent.len() >= self.per_hour {
            return Err(inner.sent[inner.sent.len() - self.per_hour] + self.hour);
        }
        let in_minute = minute_count(&inner.sent, now, self.minute);
        if in_minute >= self.per_minute {
            return Err(inner.sent[inner.sent.len() - self.per_minute] + self.minute);
        }
        inner.sent.push_back(now);
        Ok(())
    }

    /// Stops every call until `retry_after` has passed (a 429 speaks for the whole tenant).
    pub fn pause(&self, retry_after: Duration) {
        let retry_after = retry_after.min(crate::domain::MAX_RETRY_AFTER);
        let until = Instant::now() + retry_after;
        let mut inner = self.lock();
        let start = inner.paused_until.filter(|p| *p > Instant::now());
        let added = match start {
            Some(p) if p >= until => Duration::ZERO,
            Some(p) => until - p,
            None => retry_after,
        };
        inner.paused_total += added;
        inner.paused_until = inner.paused_until.max(Some(until));
    }

    pub fn remaining(&self) -> Remaining {
        let now = Instant::now();
        let inner = self.lock();
        let in_hour = inner
            .sent
            .iter()
            .filter(|t| now.duration_since(**t) < self.hour)
            .count();
        let in_minute = minute_count(&inner.sent, now, self.minute);
        Remaining {
            this_minute: self.per_minute.saturating_sub(in_minute) as u32,
            this_hour: self.per_hour.saturating_sub(in_hour) as u32,
            paused_for: inner.paused_until.filter(|p| *p > now).map(|p| p - now),
        }
    }

    /// Total time calls were held back by Retry-After in this process.
    pub fn paused_total(&self) -> Duration {
        self.lock().paused_total
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The lock is never held across an await or a panic-prone call; a poisoned lock still
        // holds consistent data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn minute_count(sent: &VecDeque<Instant>, now: Instant, minute: Duration) -> usize {
    let first_in_window = sent.partition_point(|t| now.duration_since(*t) >= minute);
    sent.len() - first_in_window
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sustainable_interval_follows_the_tighter_window() {
        // 100/min allows a call every 0.6 s, 1,500/h one every 2.4 s: the hour decides.
        let budget = RateBudget::new(100, 1500);
        assert_eq!(
            budget.sustainable_interval(1, 1.0),
            Duration::from_millis(2400)
        );
        assert_eq!(
            budget.sustainable_interval(10, 0.8),
            Duration::from_secs(30)
        );
        let minute_bound = RateBudget::new(10, 100_000);
        assert_eq!(
            minute_bound.sustainable_interval(2, 1.0),
            Duration::from_secs(12)
        );
        let scaled = RateBudget::with_time_scale(100, 1500, 0.01);
        assert_eq!(
            scaled.sustainable_interval(1, 1.0),
            Duration::from_millis(24)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_the_minute_window() {
        let budget = RateBudget::new(5, 1000);
        let cancel = CancellationToken::new();
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..12 {
            budget.acquire(&cancel).await.unwrap();
            times.push(Instant::now() - start);
        }
        // 5 at once, 5 a minute later, 2 a minute after that.
        assert!(times[..5].iter().all(|t| *t == Duration::ZERO));
        assert!(times[5..10].iter().all(|t| *t == MINUTE));
        assert_eq!(times[10], 2 * MINUTE);
        for (i, t) in times.iter().enumerate() {
            let in_window = times
                .iter()
                .filter(|u| **u <= *t && *t - **u < MINUTE)
                .count();
            assert!(
                in_window <= 5,
                "call {i} at {t:?} saw {in_window} in its minute"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn time_scaled_windows_shrink_together() {
        let budget = RateBudget::with_time_scale(5, 1000, 0.01);
        let cancel = CancellationToken::new();
        let start = Instant::now();
        for _ in 0..6 {
            budget.acquire(&cancel).await.unwrap();
        }
        assert_eq!(Instant::now() - start, Duration::from_millis(600));
    }

    #[tokio::test(start_paused = true)]
    async fn hour_window_binds_too() {
        let budget = RateBudget::new(100, 150);
        let cancel = CancellationToken::new();
        let start = Instant::now();
        for _ in 0..150 {
            budget.acquire(&cancel).await.unwrap();
        }
        assert_eq!(budget.remaining().this_hour, 0);
        budget.acquire(&cancel).await.unwrap();
        assert!(Instant::now() - start >= HOUR);
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_everyone() {
        let budget = RateBudget::new(100, 1000);
        let cancel = CancellationToken::new();
        budget.pause(Duration::from_secs(7));
        let start = Instant::now();
        budget.acquire(&cancel).await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_secs(7));
        assert_eq!(budget.paused_total(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_interrupts_a_wait() {
        let budget = RateBudget::new(1, 1);
        let cancel = CancellationToken::new();
        budget.acquire(&cancel).await.unwrap();
        cancel.cancel();
        assert!(budget.acquire(&cancel).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn seeded_calls_and_pauses_count() {
        let budget = RateBudget::new(3, 1000);
        let now = SystemTime::now();
        let past: Vec<PastCall> = (0..3)
            .map(|i| PastCall {
                sent_at: now - Duration::from_secs(10 + i),
                retry_not_before: (i == 0).then(|| now + Duration::from_secs(5)),
            })
            .collect();
        budget.seed(&past, now);
        let r = budget.remaining();
        assert_eq!(r.this_minute, 0);
        assert!(r.paused_for.is_some());
        let start = Instant::now();
        budget.acquire(&CancellationToken::new()).await.unwrap();
        // The oldest seeded call (12 s ago) leaves the window 48 s from now.
        assert_eq!(Instant::now() - start, Duration::from_secs(48));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_dated_in_the_future_and_years_of_retry_after_are_not_restored() {
        let budget = RateBudget::new(3, 1000);
        let now = SystemTime::now();
        // Logged before the clock stepped back a day: "sent" tomorrow.
        let past: Vec<PastCall> = (0..3)
            .map(|i| PastCall {
                sent_at: now + Duration::from_secs(86_400 - i),
                retry_not_before: None,
            })
            .collect();
        budget.seed(&past, now);
        assert_eq!(budget.remaining().this_minute, 3);
        budget.seed(
            &[PastCall {
                sent_at: now - Duration::from_secs(1),
                retry_not_before: Some(now + Duration::from_secs(315_360_000)),
            }],
            now,
        );
        let paused = budget.remaining().paused_for.unwrap();
        assert!(paused <= crate::domain::MAX_RETRY_AFTER, "{paused:?}");
    }
}
