//! Failures of calls to Azure services, classified once for every client:
//! what was being done to what, the class that decides retries, the status,
//! service code and Retry-After, and never a secret.

use super::auth;
use azure_core::{error::ErrorKind, http::headers::HeaderName};
use std::{fmt, time::Duration};

/// How a failed call should be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 404: the blob, container or queue is not there.
    NotFound,
    /// 409: conflicts such as a pending copy or an existing blob.
    Conflict,
    /// 412: an ETag or existence condition did not hold.
    PreconditionFailed,
    /// 503 ServerBusy, 429: the service asks us to slow down.
    Throttled,
    /// 500, 502, 504, 408, resets and timeouts: try again.
    Transient,
    /// 401, 403: credentials or SAS are wrong or expired.
    Denied,
    /// Any other client error: the request itself is wrong.
    Invalid,
}

impl ErrorClass {
    /// Whether trying the same request again may succeed.
    pub(crate) fn is_retryable(self) -> bool {
        matches!(self, ErrorClass::Throttled | ErrorClass::Transient)
    }

    /// Maps an HTTP status (and service error code) once for every backend.
    pub(crate) fn from_status(status: u16, code: Option<&str>) -> Self {
        match (status, code) {
            (404, _) => ErrorClass::NotFound,
            (409, _) => ErrorClass::Conflict,
            // A queue message taken again by someone else since we took it.
            (400, Some("PopReceiptMismatch")) => ErrorClass::Conflict,
            (412, _) => ErrorClass::PreconditionFailed,
            (429, _) | (503, _) => ErrorClass::Throttled,
            // A 500 CannotVerifyCopySource is documented as a verification that did
            // not finish in time (retry it, with a fresh SAS); the 403 of the same
            // name is a bad or expired SAS and stays `Denied`.
            (408, _) | (500, _) | (502, _) | (504, _) => ErrorClass::Transient,
            (401, _) | (403, _) => ErrorClass::Denied,
            _ => ErrorClass::Invalid,
        }
    }
}

/// How a request failed before any answer came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportFailure {
    /// The connection could not be made: the request never left.
    Connect,
    /// No answer within the attempt timeout: it may or may not have been acted on.
    Timeout,
    /// The connection broke (reset, closed) after the request may have left.
    Broken,
}

/// A failed call to an Azure service (blob, queue, Resource Manager), with
/// what was being done to what.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{operation} on {target}: {message}")]
pub struct ServiceError {
    /// Operation name, e.g. `start_copy`.
    pub operation: &'static str,
    /// What it was done to (never with a SAS signature).
    pub target: String,
    /// Classification for retries.
    pub class: ErrorClass,
    /// HTTP status, when there was a response.
    pub status: Option<u16>,
    /// Service error code, when there was one.
    pub code: Option<String>,
    /// Human-readable detail (never with a secret).
    pub message: String,
    /// Retry-After the service asked for.
    pub retry_after: Option<Duration>,
    /// For a failure without an answer: how it failed.
    pub transport: Option<TransportFailure>,
}

impl ServiceError {
    /// Builds an error from a status and code.
    pub fn http(
        operation: &'static str,
        target: impl fmt::Display,
        status: u16,
        code: Option<&str>,
    ) -> Self {
        let class = ErrorClass::from_status(status, code);
        Self {
            operation,
            target: auth::redact_sas(&target.to_string()),
            class,
            status: Some(status),
            code: code.map(str::to_owned),
            message: match code {
                Some(c) => format!("HTTP {status} {c}"),
                None => format!("HTTP {status}"),
            },
            retry_after: None,
            transport: None,
        }
    }

    /// An error without an HTTP response.
    pub fn other(
        operation: &'static str,
        target: impl fmt::Display,
        class: ErrorClass,
        message: impl fmt::Display,
    ) -> Self {
        Self {
            operation,
            target: auth::redact_sas(&target.to_string()),
            class,
            status: None,
            code: None,
            message: auth::redact_sas(&message.to_string()),
            retry_after: None,
            transport: None,
        }
    }

    /// A request that failed without an answer.
    pub fn transport(
        operation: &'static str,
        target: impl fmt::Display,
        failure: TransportFailure,
        message: impl fmt::Display,
    ) -> Self {
        Self {
            transport: Some(failure),
            ..Self::other(operation, target, ErrorClass::Transient, message)
        }
    }

    /// An attempt that got no answer within `after`.
    pub(crate) fn timed_out(
        operation: &'static str,
        target: impl fmt::Display,
        after: Duration,
    ) -> Self {
        Self::transport(
            operation,
            target,
            TransportFailure::Timeout,
            format!("no answer within {} s", after.as_secs_f64()),
        )
    }

    /// Whether the service may have carried the request out although it failed:
    /// no answer came back (a timeout, a broken connection) or the service said
    /// it ran out of time (500, 502, 504, 408). Throttling (429, 503) and a
    /// connection that was never made are definite: nothing happened. A request
    /// that is not idempotent is not sent again blindly after such a failure; its
    /// caller reconciles from what storage says.
    pub(crate) fn outcome_unknown(&self) -> bool {
        if self.class != ErrorClass::Transient {
            return false;
        }
        match (self.status, self.transport) {
            (None, Some(TransportFailure::Connect)) => false,
            (None, _) => true,
            (Some(_), _) => self.code.as_deref() != Some("CannotVerifyCopySource"),
        }
    }

    /// Whether this is a 404.
    pub fn is_not_found(&self) -> bool {
        self.class == ErrorClass::NotFound
    }

    /// For queue messages: the message is gone or was taken by someone else since.
    pub fn is_lost_message(&self) -> bool {
        matches!(self.class, ErrorClass::NotFound | ErrorClass::Conflict)
    }
}

/// Maps an SDK error once: status and service code to a class, Retry-After kept,
/// nothing secret carried along.
pub(crate) fn map_sdk_error(
    operation: &'static str,
    target: impl std::fmt::Display,
    e: azure_core::Error,
) -> ServiceError {
    match e.kind() {
        ErrorKind::HttpResponse {
            status,
            error_code,
            raw_response,
        } => {
            let mut err =
                ServiceError::http(operation, target, u16::from(*status), error_code.as_deref());
            err.retry_after = raw_response.as_ref().and_then(|r| {
                r.headers()
                    .get_optional_str(&HeaderName::from_static("retry-after"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs)
            });
            err
        }
        ErrorKind::Connection => {
            ServiceError::transport(operation, target, TransportFailure::Connect, e)
        }
        ErrorKind::Io => ServiceError::transport(operation, target, TransportFailure::Broken, e),
        // No token this time (IMDS or Entra ID briefly unavailable): the request
        // never left, so it is safe to retry; a credential that never works ends
        // as a job failure with this message after the retries.
        ErrorKind::Credential => ServiceError::transport(
            operation,
            target,
            TransportFailure::Connect,
            format!("cannot get an Entra ID token: {e}"),
        ),
        ErrorKind::DataConversion => ServiceError::other(operation, target, ErrorClass::Invalid, e),
        _ => ServiceError::other(operation, target, ErrorClass::Transient, e),
    }
}
