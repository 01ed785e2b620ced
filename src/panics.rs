//! Panic containment: a task that panics is counted, logged and backed off from like any
//! fault, instead of taking the daemon down or re-running at once.

use std::any::Any;
use std::time::Duration;

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::schedule::{PollPolicy, next_delay};

/// Runs the task `run` makes until it returns or `stop` fires; when it panics, counts the
/// panic under `task`, logs it, waits out a backoff that doubles while panics come in a row
/// (so each is logged once per window) and starts it anew.
pub async fn restart_on_panic<F, Fut>(
    task: &'static str,
    metrics: &Metrics,
    stop: &CancellationToken,
    mut run: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut in_a_row = 0u32;
    loop {
        let started = tokio::time::Instant::now();
        let Err(panic) = std::panic::AssertUnwindSafe(run()).catch_unwind().await else {
            return;
        };
        // A task that ran fine for a while before panicking starts its backoff over.
        if started.elapsed() > Duration::from_secs(600) {
            in_a_row = 0;
        }
        let n = metrics.count_panic(task);
        let wait = backoff(in_a_row);
        in_a_row = in_a_row.saturating_add(1);
        tracing::error!(
            task,
            panic = %message(&*panic),
            panics = n,
            wait_s = wait.as_secs(),
            "a task panicked; restarting it after a backoff"
        );
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The text a panic carried (`panic!("...")` gives a `&str` or a `String`).
pub fn message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// How long a task waits after its `consecutive`-th panic in a row (0-based): 1 s doubling
/// to 5 minutes, as for token failures.
pub fn backoff(consecutive: u32) -> Duration {
    let policy = PollPolicy {
        initial_interval: Duration::from_secs(1),
        multiplier: 2.0,
        max_interval: Duration::from_secs(300),
        jitter: 0.2,
    };
    next_delay(consecutive, &policy, fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn messages_and_backoff() {
        let caught = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
        assert_eq!(message(&*caught), "boom 1");
        let caught = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(message(&*caught), "static");
        assert!(backoff(0) <= Duration::from_millis(1200));
        assert!(backoff(30) <= Duration::from_secs(360));
        assert!(backoff(30) >= Duration::from_secs(240));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_counted_backed_off_and_restarted() {
        let metrics = Metrics::default();
        let stop = CancellationToken::new();
        let runs = std::sync::atomic::AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        restart_on_panic("notify", &metrics, &stop, || {
            let n = runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n < 3 {
                    panic!("run {n}");
                }
            }
        })
        .await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 4);
        assert_eq!(metrics.panics("notify"), 3);
        // Three backoffs of about 1, 2 and 4 s (±20%), in paused time: never at once.
        assert!(started.elapsed() >= Duration::from_millis(800 + 1600 + 3200));
    }
}
