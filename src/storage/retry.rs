//! Per-request retries: exponential backoff with full jitter, bounded by attempts
//! and by elapsed time, honouring Retry-After. Only [`ErrorClass::Throttled`] and
//! [`ErrorClass::Transient`] failures are retried.

use super::{StorageError, StorageResult};
use rand::Rng;
use std::{future::Future, time::Duration};
use tokio::time::Instant;

/// Bounds of the per-request retry loop.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Backoff before the first retry (before jitter).
    pub base_delay: Duration,
    /// Cap on one backoff.
    pub max_delay: Duration,
    /// No retry starts after this much time since the first attempt.
    pub max_elapsed: Duration,
    /// Seed for the jitter (simulations and tests); `None` draws from the thread RNG.
    pub jitter_seed: Option<u64>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
            max_elapsed: Duration::from_secs(120),
            jitter_seed: None,
        }
    }
}

impl RetryPolicy {
    /// Backoff before retry number `retry` (1-based), given a random fraction in [0, 1).
    pub fn backoff(&self, retry: u32, fraction: f64, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
            .min(self.max_delay);
        let jittered = exp.mul_f64(fraction.clamp(0.0, 1.0));
        match retry_after {
            Some(after) => after.max(jittered).min(self.max_delay.max(after)),
            None => jittered,
        }
    }
}

/// Runs `attempt` until it succeeds, fails with an error that is not retryable, or
/// the policy's bounds are reached. `on_retry` hears of every retry (for metrics).
pub async fn with_retries<T, F, Fut>(
    policy: &RetryPolicy,
    mut on_retry: impl FnMut(&StorageError),
    mut attempt: F,
) -> StorageResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = StorageResult<T>>,
{
    let started = Instant::now();
    let mut tries = 0u32;
    loop {
        tries += 1;
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if !e.class.is_retryable() || tries >= policy.max_attempts => return Err(e),
            Err(e) => {
                let fraction: f64 = match policy.jitter_seed {
                    Some(seed) => {
                        use rand::SeedableRng;
                        rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(u64::from(tries)))
                            .random()
                    }
                    None => rand::rng().random(),
                };
                let delay = policy.backoff(tries, fraction, e.retry_after);
                if started.elapsed() + delay > policy.max_elapsed {
                    return Err(e);
                }
                on_retry(&e);
                tracing::debug!(operation = e.operation, target = %e.target, error = %e.message, delay_ms = delay.as_millis() as u64, "retrying storage request");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ErrorClass;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1, 1.0, None), Duration::from_millis(200));
        assert_eq!(p.backoff(3, 1.0, None), Duration::from_millis(800));
        assert_eq!(p.backoff(30, 1.0, None), Duration::from_secs(30));
        assert_eq!(p.backoff(3, 0.5, None), Duration::from_millis(400));
        assert_eq!(
            p.backoff(1, 0.0, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
    }

    fn busy() -> StorageError {
        StorageError::http("t", "x", 503, Some("ServerBusy"))
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_then_succeeds() {
        let calls = AtomicU32::new(0);
        let mut retries = 0;
        let r = with_retries(
            &RetryPolicy::default(),
            |_| retries += 1,
            || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(busy())
                } else {
                    Ok(7)
                }
            },
        )
        .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(retries, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_max_attempts_and_never_retries_fatal() {
        let calls = AtomicU32::new(0);
        let r: StorageResult<()> = with_retries(
            &RetryPolicy::default(),
            |_| {},
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(busy())
            },
        )
        .await;
        assert_eq!(r.unwrap_err().class, ErrorClass::Throttled);
        assert_eq!(calls.load(Ordering::SeqCst), 6);

        let calls = AtomicU32::new(0);
        let r: StorageResult<()> = with_retries(
            &RetryPolicy::default(),
            |_| {},
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(StorageError::http(
                    "t",
                    "x",
                    403,
                    Some("AuthenticationFailed"),
                ))
            },
        )
        .await;
        assert_eq!(r.unwrap_err().class, ErrorClass::Denied);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
