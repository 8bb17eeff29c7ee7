//! The one retry policy for every outbound call (blobs, queues, the hand-off
//! webhook, delegation keys): each attempt under a timeout, exponential backoff
//! with full jitter between attempts, bounded by attempts and by elapsed time,
//! Retry-After honoured. Only [`ErrorClass::Throttled`](super::ErrorClass::Throttled) and
//! [`ErrorClass::Transient`](super::ErrorClass::Transient) failures are retried, and a call that is not
//! idempotent is not sent again after a failure whose outcome is unknown (see
//! `ServiceError::outcome_unknown`): its caller reconciles from what storage
//! says instead.

use super::ServiceError;

type StorageResult<T> = Result<T, ServiceError>;
use rand::Rng;
use std::{future::Future, time::Duration};
use tokio::time::Instant;

/// Whether a call may be sent again when its first answer was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Sending it twice is the same as sending it once (reads, deletes,
    /// conditional writes whose second try fails in a way the caller handles).
    Idempotent,
    /// A second send may do the work twice (Start Copy, Create Snapshot): after a
    /// timeout or a broken connection the error is returned for reconciliation.
    NotIdempotent,
}

/// Bounds of the per-call retry loop.
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
    /// Longest one attempt may wait for its answer; then it fails as a timeout.
    pub attempt_timeout: Duration,
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
            attempt_timeout: Duration::from_secs(30),
            jitter_seed: None,
        }
    }
}

impl RetryPolicy {
    /// The default policy with the configured attempt timeout.
    pub(crate) fn with_timeout(attempt_timeout: Duration) -> Self {
        Self {
            attempt_timeout,
            ..Self::default()
        }
    }

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

    /// One attempt, failing as a timeout when no answer comes within
    /// [`RetryPolicy::attempt_timeout`].
    pub(crate) async fn timed<T>(
        &self,
        operation: &'static str,
        target: &str,
        attempt: impl Future<Output = StorageResult<T>>,
    ) -> StorageResult<T> {
        match tokio::time::timeout(self.attempt_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(ServiceError::timed_out(
                operation,
                target,
                self.attempt_timeout,
            )),
        }
    }

    /// Runs `attempt` until it succeeds, fails with an error that is not
    /// retryable (or, for a call that is not idempotent, whose outcome is
    /// unknown), or the policy's bounds are reached. `on_retry` hears of every
    /// retry (for metrics). Each attempt should be wrapped in
    /// `RetryPolicy::timed` by the caller, after any rate-limit wait.
    pub async fn run<T, F, Fut>(
        &self,
        idempotency: Idempotency,
        mut on_retry: impl FnMut(&ServiceError),
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
            let e = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let unsafe_to_resend = idempotency == Idempotency::NotIdempotent && e.outcome_unknown();
            if !e.class.is_retryable() || unsafe_to_resend || tries >= self.max_attempts {
                return Err(e);
            }
            let fraction: f64 = match self.jitter_seed {
                Some(seed) => {
                    use rand::SeedableRng;
                    rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(u64::from(tries))).random()
                }
                None => rand::rng().random(),
            };
            let delay = self.backoff(tries, fraction, e.retry_after);
            if started.elapsed() + delay > self.max_elapsed {
                return Err(e);
            }
            on_retry(&e);
            tracing::debug!(operation = e.operation, target = %e.target, error = %e.message, delay_ms = delay.as_millis() as u64, "retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::azure::{ErrorClass, TransportFailure};
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

    fn busy() -> ServiceError {
        ServiceError::http("t", "x", 503, Some("ServerBusy"))
    }

    async fn count_calls(
        idempotency: Idempotency,
        error: impl Fn() -> ServiceError,
    ) -> (StorageResult<()>, u32) {
        let calls = AtomicU32::new(0);
        let r = RetryPolicy::default()
            .run(
                idempotency,
                |_| {},
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(error())
                },
            )
            .await;
        (r, calls.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_then_succeeds() {
        let calls = AtomicU32::new(0);
        let mut retries = 0;
        let r = RetryPolicy::default()
            .run(
                Idempotency::Idempotent,
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
        let (r, calls) = count_calls(Idempotency::Idempotent, busy).await;
        assert_eq!(r.unwrap_err().class, ErrorClass::Throttled);
        assert_eq!(calls, 6);
        let (r, calls) = count_calls(Idempotency::Idempotent, || {
            ServiceError::http("t", "x", 403, Some("AuthenticationFailed"))
        })
        .await;
        assert_eq!(r.unwrap_err().class, ErrorClass::Denied);
        assert_eq!(calls, 1);
    }

    /// A call that is not idempotent is retried only when the failure says
    /// nothing happened (throttling, no connection), never after a lost answer.
    #[tokio::test(start_paused = true)]
    async fn a_lost_answer_is_not_sent_again_when_not_idempotent() {
        let lost = || ServiceError::timed_out("start_copy", "d", Duration::from_secs(1));
        let reset = || {
            ServiceError::transport("start_copy", "d", TransportFailure::Broken, "reset by peer")
        };
        let timed_out_500 =
            || ServiceError::http("start_copy", "d", 500, Some("OperationTimedOut"));
        for (name, error) in [
            ("timeout", &lost as &dyn Fn() -> ServiceError),
            ("reset", &reset),
            ("500", &timed_out_500),
        ] {
            let (r, calls) = count_calls(Idempotency::NotIdempotent, error).await;
            assert_eq!(calls, 1, "{name}: sent once");
            assert!(r.unwrap_err().outcome_unknown(), "{name}");
            let (_, calls) = count_calls(Idempotency::Idempotent, error).await;
            assert_eq!(calls, 6, "{name}: an idempotent call is retried");
        }
        let refused =
            || ServiceError::transport("start_copy", "d", TransportFailure::Connect, "refused");
        let unverified =
            || ServiceError::http("start_copy", "d", 500, Some("CannotVerifyCopySource"));
        for error in [&busy as &dyn Fn() -> ServiceError, &refused, &unverified] {
            let (r, calls) = count_calls(Idempotency::NotIdempotent, error).await;
            assert_eq!(calls, 6, "definite failures are retried: {:?}", r);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_without_an_answer_times_out() {
        let p = RetryPolicy::with_timeout(Duration::from_secs(3));
        let started = Instant::now();
        let r: StorageResult<()> = p.timed("put_blob", "x", std::future::pending()).await;
        let e = r.unwrap_err();
        assert_eq!(e.transport, Some(TransportFailure::Timeout));
        assert!(e.class.is_retryable() && e.outcome_unknown());
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[test]
    fn classification_of_copy_source_errors() {
        let e = ServiceError::http("start_copy", "d", 500, Some("CannotVerifyCopySource"));
        assert_eq!(
            e.class,
            ErrorClass::Transient,
            "500: a verification timeout"
        );
        let e = ServiceError::http("start_copy", "d", 403, Some("CannotVerifyCopySource"));
        assert_eq!(e.class, ErrorClass::Denied, "403: a bad or expired SAS");
    }

    /// No retry starts past `max_elapsed`: with Retry-After fixing each delay at
    /// 1 s and a 3 s budget, attempts run at 0, 1, 2 and 3 s (the last retry
    /// ends exactly at the budget), and a delay beyond the budget is not waited.
    #[tokio::test(start_paused = true)]
    async fn no_retry_starts_past_the_elapsed_budget() {
        let policy = RetryPolicy {
            max_attempts: 100,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(1),
            max_elapsed: Duration::from_secs(3),
            ..RetryPolicy::default()
        };
        let after = |secs| {
            let mut e = busy();
            e.retry_after = Some(Duration::from_secs(secs));
            e
        };
        for (retry_after, calls_expected, elapsed) in [(1, 4, 3), (5, 1, 0)] {
            let calls = AtomicU32::new(0);
            let started = Instant::now();
            let r: StorageResult<()> = policy
                .run(
                    Idempotency::Idempotent,
                    |_| {},
                    || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Err(after(retry_after))
                    },
                )
                .await;
            assert!(r.is_err());
            assert_eq!(
                calls.load(Ordering::SeqCst),
                calls_expected,
                "Retry-After {retry_after} s"
            );
            assert_eq!(started.elapsed(), Duration::from_secs(elapsed));
        }
    }
}
