//! Why a job cannot go on: typed, with its context, and classified once as
//! transient (run the job again later) or not (fail it with this reason). The
//! job document and the log get its `Display`; nothing above formats a reason
//! by hand.

use crate::handoff::HandoffError;
use crate::placement::CapacityError;
use crate::state::StateError;
use crate::vhd::VhdError;
use crate::{
    azure::{ErrorClass, ServiceError},
    storage::BlobKind,
};
use std::fmt;

/// Why a job, or one step of it, failed.
#[derive(Debug)]
pub enum JobError {
    /// A storage request failed; `context` says what it was for. Transient when
    /// the service may answer differently next time (throttling, timeouts).
    Storage {
        /// What the request was for ("source", "copy", "delete", ...).
        context: String,
        /// The failure, classified by the storage layer.
        source: ServiceError,
    },
    /// Get Account Information failed on a destination account.
    AccountInfo {
        /// The account.
        account: String,
        /// The failure.
        source: ServiceError,
    },
    /// A destination account is of a kind Batch cannot boot images from.
    AccountUnsuitable {
        /// The account.
        account: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The job names an account the configuration does not have.
    AccountNotConfigured(String),
    /// The source blob does not exist.
    SourceMissing(String),
    /// The source is not a page blob.
    SourceNotPageBlob {
        /// The source URL.
        url: String,
        /// What it is.
        kind: BlobKind,
    },
    /// The source is not a fixed VHD Azure accepts.
    SourceNotVhd {
        /// The source URL.
        url: String,
        /// What is wrong with it.
        source: VhdError,
    },
    /// The snapshot a resumed job was copying from is gone.
    SnapshotDeleted(String),
    /// The accounts cannot hold the replicas.
    Capacity(CapacityError),
    /// Replicas failed; each reason names its replica.
    ReplicasFailed {
        /// One reason per failed replica.
        failed: Vec<String>,
        /// Replicas of the job.
        total: u32,
    },
    /// Another job of the pool is queued or running: a retire must wait for it.
    PoolBusy {
        /// The pool.
        pool: String,
        /// The other job.
        job: String,
        /// Its state, in words.
        state: &'static str,
    },
    /// Reading or writing a job document or pool record failed.
    State {
        /// Which document ("job state", "pool record", ...).
        context: String,
        /// The failure.
        source: StateError,
    },
    /// The job's document disappeared while it was being claimed.
    StateVanished,
    /// The job's document kept changing under every attempt to claim it.
    ClaimContended {
        /// The job.
        job: String,
        /// Attempts made.
        rounds: u32,
    },
    /// The hand-off could not be delivered.
    HandOff(HandoffError),
    /// Publishing to the gallery failed.
    Gallery(crate::gallery::GalleryError),
    /// A Batch request of the pool stage failed.
    Batch(ServiceError),
}

impl JobError {
    /// A storage failure in `context`.
    pub fn storage(context: impl Into<String>, source: ServiceError) -> Self {
        JobError::Storage {
            context: context.into(),
            source,
        }
    }

    /// A state failure on the job's own document.
    pub(crate) fn job_state(source: StateError) -> Self {
        Self::state("job state", source)
    }

    /// A state failure on the document named by `context`.
    pub fn state(context: impl Into<String>, source: StateError) -> Self {
        JobError::State {
            context: context.into(),
            source,
        }
    }

    /// Whether running the job again later may succeed: throttling, timeouts,
    /// unreachable state or hand-off sinks. Everything else fails the job.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            JobError::Storage { source, .. } => source.class.is_retryable(),
            JobError::AccountInfo { source, .. } => {
                !matches!(source.class, ErrorClass::NotFound | ErrorClass::Denied)
                    && source.class.is_retryable()
            }
            JobError::State { .. } | JobError::StateVanished | JobError::ClaimContended { .. } => {
                true
            }
            JobError::HandOff(e) => !e.is_permanent(),
            JobError::Gallery(e) => e.is_transient(),
            JobError::Batch(e) => e.class.is_retryable(),
            JobError::AccountUnsuitable { .. }
            | JobError::AccountNotConfigured(_)
            | JobError::SourceMissing(_)
            | JobError::SourceNotPageBlob { .. }
            | JobError::SourceNotVhd { .. }
            | JobError::SnapshotDeleted(_)
            | JobError::Capacity(_)
            | JobError::ReplicasFailed { .. }
            | JobError::PoolBusy { .. } => false,
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::Storage { context, source } if source.class == ErrorClass::Denied => write!(
                f,
                "{context}: access denied ({source}); check the account key or role assignment"
            ),
            JobError::Storage { context, source } => write!(f, "{context}: {source}"),
            JobError::AccountInfo { account, source } => match source.class {
                ErrorClass::NotFound | ErrorClass::Denied => {
                    f.write_str(&crate::storage::account_info_problem(account, source))
                }
                _ => write!(f, "account {account}: {source}"),
            },
            JobError::AccountUnsuitable { account, reason } => {
                write!(f, "account {account}: {reason}")
            }
            JobError::AccountNotConfigured(account) => {
                write!(f, "account {account} is not configured")
            }
            JobError::SourceMissing(url) => write!(
                f,
                "source {url} does not exist (HTTP 404); check the URL and that the blob was uploaded"
            ),
            JobError::SourceNotPageBlob { url, kind } => write!(
                f,
                "source {url} is a {kind:?} blob; a VHD for Batch must be a page blob (upload it as a page blob, e.g. az storage blob upload --type page)"
            ),
            JobError::SourceNotVhd { url, source } => write!(f, "source {url}: {source}"),
            JobError::SnapshotDeleted(s) => write!(
                f,
                "the job's source snapshot {s} was deleted; resubmit the job under a new job_id"
            ),
            JobError::Capacity(e) => e.fmt(f),
            JobError::ReplicasFailed { failed, total } => write!(
                f,
                "{} of {total} replicas failed: {}",
                failed.len(),
                failed.join("; ")
            ),
            JobError::PoolBusy { pool, job, state } => write!(
                f,
                "pool {pool} has job {job} {state}; retire the pool after that job ends (cancel it first to stop it)"
            ),
            JobError::State { context, source } => write!(f, "{context}: {source}"),
            JobError::StateVanished => f.write_str("job state vanished"),
            JobError::ClaimContended { job, rounds } => {
                write!(f, "job {job} kept changing under {rounds} attempts to claim it")
            }
            JobError::HandOff(e) if e.is_permanent() => write!(
                f,
                "{e}: the queue will never take this message; the hand-off stays in the job document (send it by hand)"
            ),
            JobError::HandOff(e) => e.fmt(f),
            JobError::Gallery(e) => write!(f, "gallery: {e}"),
            JobError::Batch(e) => write!(f, "pool stage: {e}"),
        }
    }
}

impl std::error::Error for JobError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            JobError::Storage { source, .. } | JobError::AccountInfo { source, .. } => Some(source),
            JobError::SourceNotVhd { source, .. } => Some(source),
            JobError::Capacity(e) => Some(e),
            JobError::State { source, .. } => Some(source),
            JobError::HandOff(e) => Some(e),
            JobError::Gallery(e) => Some(e),
            JobError::Batch(e) => Some(e),
            _ => None,
        }
    }
}

impl From<HandoffError> for JobError {
    fn from(e: HandoffError) -> Self {
        JobError::HandOff(e)
    }
}

impl From<CapacityError> for JobError {
    fn from(e: CapacityError) -> Self {
        JobError::Capacity(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_failures_are_classified_by_the_storage_layer() {
        let e = |status, code| {
            JobError::storage("source", ServiceError::http("get", "x", status, code))
        };
        assert!(e(503, Some("ServerBusy")).is_transient());
        assert!(e(500, None).is_transient());
        assert!(!e(404, None).is_transient());
        let denied = e(403, Some("AuthenticationFailed"));
        assert!(!denied.is_transient());
        assert!(
            denied.to_string().starts_with("source: access denied (")
                && denied
                    .to_string()
                    .ends_with("check the account key or role assignment"),
            "{denied}"
        );
        assert_eq!(
            e(409, None).to_string(),
            format!("source: {}", ServiceError::http("get", "x", 409, None))
        );
    }

    #[test]
    fn an_identity_without_a_role_is_told_which_to_assign() {
        let no_role = JobError::AccountInfo {
            account: "dst1".into(),
            source: ServiceError::http("account info", "dst1", 404, Some("ResourceNotFound")),
        };
        assert!(!no_role.is_transient());
        assert!(
            no_role
                .to_string()
                .contains("Storage Blob Data Contributor"),
            "{no_role}"
        );
        let busy = JobError::AccountInfo {
            account: "dst1".into(),
            source: ServiceError::http("account info", "dst1", 503, None),
        };
        assert!(busy.is_transient());
        assert!(busy.to_string().starts_with("account dst1: "), "{busy}");
    }

    #[test]
    fn input_problems_fail_the_job_and_state_problems_retry_it() {
        assert!(!JobError::SourceMissing("https://a/c/b.vhd".into()).is_transient());
        assert!(!JobError::ReplicasFailed {
            failed: vec!["replica 1 in dst1: x".into()],
            total: 3
        }
        .is_transient());
        assert!(JobError::StateVanished.is_transient());
        assert!(JobError::ClaimContended {
            job: "j".into(),
            rounds: 16
        }
        .is_transient());
        assert_eq!(
            JobError::ReplicasFailed {
                failed: vec!["a".into(), "b".into()],
                total: 5
            }
            .to_string(),
            "2 of 5 replicas failed: a; b"
        );
    }
}
