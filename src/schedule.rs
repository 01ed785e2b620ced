//! The poll schedule: a pure function of how often an action was polled.
//!
//! Keeping it pure (no clock, no I/O, randomness passed in) means the next poll time can be
//! computed from what is persisted, so a restart continues the same schedule.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct PollPolicy {
    /// Delay after the first poll.
    pub initial_interval: Duration,
    /// Growth factor per poll (>= 1).
    pub multiplier: f64,
    /// No delay is ever longer than this.
    pub max_interval: Duration,
    /// Spread, as a fraction of the delay (0 to 1), so that actions enqueued together do not
    /// stay in lockstep.
    pub jitter: f64,
}

impl Default for PollPolicy {
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_secs(10),
            multiplier: 1.5,
            max_interval: Duration::from_secs(300),
            jitter: 0.1,
        }
    }
}

/// Delay before the next poll of an action that has been polled `poll_count` times.
///
/// `random` is a uniform sample in `[0, 1)`. The result is
/// `min(initial * multiplier^poll_count, max) * (1 + jitter * (2 * random - 1))`, never above
/// `max_interval` and never below one millisecond.
pub fn next_delay(poll_count: u32, policy: &PollPolicy, random: f64) -> Duration {
    let initial = policy.initial_interval.as_secs_f64();
    let max = policy.max_interval.as_secs_f64();
    // powi saturates to infinity for large counts; min() then caps it.
    let exponent = poll_count.min(i32::MAX as u32) as i32;
    let base = (initial * policy.multiplier.max(1.0).powi(exponent)).min(max);
    let jitter = policy.jitter.clamp(0.0, 1.0);
    let factor = 1.0 + jitter * (2.0 * random.clamp(0.0, 1.0) - 1.0);
    let secs = (base * factor).min(max).max(0.001);
    Duration::from_secs_f64(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> PollPolicy {
        PollPolicy {
            initial_interval: Duration::from_secs(10),
            multiplier: 2.0,
            max_interval: Duration::from_secs(300),
            jitter: 0.0,
        }
    }

    #[test]
    fn grows_geometrically_then_caps() {
        let p = policy();
        let delays: Vec<u64> = (0..8).map(|n| next_delay(n, &p, 0.5).as_secs()).collect();
        assert_eq!(delays, vec![10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn jitter_spreads_both_ways() {
        let p = PollPolicy {
            jitter: 0.2,
            ..policy()
        };
        assert_eq!(next_delay(0, &p, 0.0), Duration::from_secs(8));
        assert_eq!(next_delay(0, &p, 0.5), Duration::from_secs(10));
        assert!(next_delay(0, &p, 0.999_999) > Duration::from_millis(11_999));
    }

    #[test]
    fn huge_poll_counts_do_not_overflow() {
        let p = policy();
        assert_eq!(next_delay(u32::MAX, &p, 0.5), Duration::from_secs(300));
    }

    proptest! {
        #[test]
        fn always_within_bounds(
            n in 0u32..10_000,
            initial_ms in 1u64..100_000,
            max_ms in 1u64..10_000_000,
            multiplier in 1.0f64..10.0,
            jitter in 0.0f64..1.0,
            random in 0.0f64..1.0,
        ) {
            let p = PollPolicy {
                initial_interval: Duration::from_millis(initial_ms),
                multiplier,
                max_interval: Duration::from_millis(max_ms),
                jitter,
            };
            let d = next_delay(n, &p, random);
            prop_assert!(d <= p.max_interval);
            prop_assert!(d >= Duration::from_millis(1));
            let unjittered = (initial_ms as f64 / 1000.0 * multiplier.powi(n.min(i32::MAX as u32) as i32)).min(max_ms as f64 / 1000.0);
            prop_assert!(d.as_secs_f64() >= unjittered * (1.0 - jitter) - 1e-6);
        }

        #[test]
        fn never_shrinks_without_jitter(n in 0u32..200, multiplier in 1.0f64..5.0) {
            let p = PollPolicy { multiplier, ..policy() };
            prop_assert!(next_delay(n + 1, &p, 0.5) >= next_delay(n, &p, 0.5));
        }
    }
}
