//! The copy phase's shared pieces: the [`Copier`] (what copying reads from
//! the engine), the context of one copy, and why a copy fails. The fan-out
//! loop (`copy.rs`), one replica's try (`replica.rs`), ranged copies
//! (`ranged.rs`) and relays (`relay.rs`) all stand on it.

use super::*;

/// The copy phase of a run. It owns its scheduling state ([`CopyRun`]) and
/// reads from the engine only what copying needs: the store, the accounts'
/// limits, the metrics and the settings. The run's document is reached only
/// through the [`JobRun`] it is given.
pub(super) struct Copier<'a> {
    /// Destination accounts whose service does not do Put Page From URL: with
    /// `copy_method = "auto"` their copies use Copy Blob.
    pub(super) without_from_url: &'a FromUrlSupport,
    pub(super) store: &'a dyn BlobStore,
    pub(super) limits: &'a AccountLimits,
    pub(super) metrics: &'a Metrics,
    pub(super) settings: &'a ValidatedSettings,
}

impl Copier<'_> {
    /// The claim's lease: progress is written at least every third of it.
    pub(super) fn lease(&self) -> Duration {
        Duration::from_secs(self.settings.engine.lease_seconds as u64)
    }
}

pub(super) struct CopyContext<'a> {
    /// The run, the one writer of the job's document.
    pub(super) job_run: &'a JobRun<'a>,
    pub(super) job: &'a ValidatedJob,
    pub(super) snapshot: &'a str,
    pub(super) source_len: u64,
    pub(super) token: &'a CancellationToken,
}

/// Why one copy into a replica (or a relay) did not end in a sound blob.
/// Storage failures keep the storage layer's classification; the copy loop
/// decides from it what a replica does next ([`CopyError::is_fatal`]).
#[derive(Debug)]
pub(super) enum CopyError {
    /// A storage request failed, classified where it arose.
    Storage(ServiceError),
    /// The copy ended but the blob is not sound: the service reported the copy
    /// failed or aborted, another writer replaced it, or it does not verify.
    Unsound(String),
    /// The blob the copy read from is gone (a relay deleted under it): not the
    /// replica's failure; it is tried again from another source.
    SourceLost(BlobPath),
    /// The service does not do the copy method (Put Page From URL on Azurite,
    /// or an older API): with `copy_method = "auto"` the account falls back
    /// to Copy Blob; with `ranges` the job cannot go on.
    MethodUnsupported(ServiceError),
    /// The job is stopping (cancel, shutdown, a lost claim) or failed as a whole.
    Stop(Failure),
}

impl CopyError {
    pub(super) fn from_storage(e: &ServiceError) -> Self {
        CopyError::Storage(e.clone())
    }

    /// Whether no further try of the replica can succeed: the identity is
    /// denied the copy (a key or role to fix), so the job fails now.
    pub(super) fn is_fatal(&self) -> bool {
        match self {
            CopyError::Storage(e) => e.class == ErrorClass::Denied,
            // Reached only with an explicit `ranges`: `auto` falls back first.
            CopyError::MethodUnsupported(_) => true,
            CopyError::Stop(Failure::Job(e)) => !e.is_transient(),
            _ => false,
        }
    }

    /// The reason, for the replica's record and the log.
    pub(super) fn reason(&self) -> String {
        match self {
            CopyError::Storage(e) if e.class == ErrorClass::Denied => {
                JobError::storage("copy", e.clone()).to_string()
            }
            CopyError::Storage(e) => e.to_string(),
            CopyError::Unsound(r) => r.clone(),
            CopyError::SourceLost(b) => format!("the blob copied from, {b}, is gone"),
            CopyError::MethodUnsupported(e) => format!(
                "the service does not do Put Page From URL ({e}); set engine.copy_method = \"auto\" (or \"async\") for this endpoint"
            ),
            CopyError::Stop(f) => f.to_string(),
        }
    }

    /// Whether the service said a blob the copy named is not there (the
    /// source, or the destination's container).
    pub(super) fn is_not_found(&self) -> bool {
        matches!(self, CopyError::Storage(e) if e.is_not_found())
    }
}
