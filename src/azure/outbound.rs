//! The one way out to Azure: every attempt of every call takes a token from
//! the account's request-rate limiter (governor), runs under the attempt
//! timeout, is counted in the metrics, tells the account's adaptive copy gate
//! whether it was throttled, and retryable failures are retried under the one
//! [`RetryPolicy`]. The blob store ([`crate::storage::instrumented`]) and the
//! queue client call through it.

use super::limits::AccountLimits;
use super::retry::{Idempotency, RetryPolicy};
use super::{ErrorClass, ServiceError, TransportFailure};
use crate::metrics::Metrics;
use std::{future::Future, sync::Arc};

/// The one way out to Azure: rate limit, timeout, metrics, throttling
/// feedback and retries for each call.
#[derive(Debug, Clone)]
pub struct Outbound {
    limits: Arc<AccountLimits>,
    metrics: Metrics,
    retry: RetryPolicy,
}

impl Outbound {
    /// Calls under these limits, metrics and retry policy.
    pub fn new(limits: Arc<AccountLimits>, metrics: Metrics, retry: RetryPolicy) -> Self {
        Self {
            limits,
            metrics,
            retry,
        }
    }

    /// The retry policy.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Runs one call to `account`: every attempt waits for a request token, then
    /// gets [`RetryPolicy::attempt_timeout`] to answer.
    pub async fn call<T, F, Fut>(
        &self,
        account: &str,
        operation: &'static str,
        idempotency: Idempotency,
        f: F,
    ) -> Result<T, ServiceError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, ServiceError>>,
    {
        let limits = &self.limits;
        let metrics = &self.metrics;
        let retry = &self.retry;
        retry
            .run(
                idempotency,
                |e| {
                    metrics
                        .storage_retries
                        .with_label_values(&[account, retry_reason(e)])
                        .inc();
                },
                || {
                    let fut = f();
                    async move {
                        limits.request(account).await;
                        let r = retry.timed(operation, account, fut).await;
                        let status = match &r {
                            Ok(_) => Some(200),
                            Err(e) => e.status,
                        };
                        metrics.storage_request(account, operation, status);
                        limits.feedback(
                            account,
                            matches!(&r, Err(e) if e.class == ErrorClass::Throttled),
                        );
                        r
                    }
                },
            )
            .await
    }
}

/// The `reason` label of `vhdrep_storage_retries_total` for a retried failure.
pub(crate) fn retry_reason(e: &ServiceError) -> &'static str {
    match (e.class, e.transport) {
        (ErrorClass::Throttled, _) => "throttled",
        (_, Some(TransportFailure::Timeout)) => "timeout",
        _ => "transient",
    }
}
