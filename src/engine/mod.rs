//! Executes a job: checks the source and accounts, freezes the source in a
//! snapshot, runs the server-side copies within each account's concurrency cap,
//! polls them on a progress-driven schedule, verifies every replica and hands the
//! set off. Progress is checkpointed to the job document, and every step can be
//! resumed from the document plus what storage says.

mod checkpoint;
mod cleanup;
mod copier;
mod copy;
mod error;
mod lifecycle;
pub mod poll;
mod pool_stage;
mod prepare;
mod publish;
mod ranged;
pub mod relay;
mod replica;
mod retire;
mod run;
pub mod schedule;

use checkpoint::Checkpoint;
pub use error::JobError;
pub(crate) use retire::retire_plan;
use run::JobRun;

use crate::azure::limits::AccountLimits;
use crate::config::Strategy;
use crate::config::ValidatedSettings;
use crate::handoff::{HandOff, HandoffSinks};
use crate::job::ValidatedJob;
use crate::metrics::Metrics;
use crate::plan::{self, is_our_replica, replica_metadata};
use crate::state::{
    JobDocument, JobState, Owner, Phase, PoolClaim, PoolRecord, ReplicaRecord, ReplicaState,
    StateError, StateStore,
};
use crate::vhd;
use crate::{
    azure::{ErrorClass, ServiceError},
    storage::{BlobKind, BlobPath, BlobProperties, BlobStore, CopyState},
};
use futures::stream::{FuturesUnordered, StreamExt};
use schedule::Scheduler;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often a job waiting for its pool's lock looks again.
const POOL_WAIT: Duration = Duration::from_secs(2);

/// Copies started for one replica before the job gives up on it.
pub(crate) const MAX_REPLICA_ATTEMPTS: u32 = 3;

/// How often a running job considers writing its document: at once after a
/// replica changed state, else every `engine.checkpoint_seconds` for progress.
/// A cancel request written by another process is picked up on the next write.
pub(crate) const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);

/// Jobs this instance is running, by id, with their live documents.
pub(crate) type LiveJobs = Arc<Mutex<HashMap<String, Arc<Mutex<JobDocument>>>>>;

/// The jobs this instance has a run of, registered and checked in one step
/// ([`Engine::reserve`]), so two deliveries of one job can never both start a
/// run here, however close together they come.
#[derive(Debug, Default, Clone)]
struct Reservations(Arc<Mutex<std::collections::HashSet<String>>>);

/// Destination accounts whose service answered Put Page From URL as a thing it
/// does not do, learned once per process and shared by every job.
#[derive(Debug, Default)]
pub(super) struct FromUrlSupport(Mutex<std::collections::HashSet<String>>);

impl FromUrlSupport {
    /// Whether `account` is known not to do Put Page From URL.
    pub(super) fn contains(&self, account: &str) -> bool {
        self.0.lock().expect("from-url lock").contains(account)
    }

    /// Records that `account` does not; `true` the first time.
    pub(super) fn insert(&self, account: &str) -> bool {
        self.0
            .lock()
            .expect("from-url lock")
            .insert(account.to_owned())
    }
}

/// This instance's one run of a job, from the moment the job was taken until
/// the value is dropped (the run ended, or its task was aborted).
#[derive(Debug)]
pub(crate) struct RunSlot {
    reservations: Reservations,
    job_id: String,
}

impl RunSlot {
    /// The job reserved.
    pub(crate) fn job_id(&self) -> &str {
        &self.job_id
    }
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        self.reservations
            .0
            .lock()
            .expect("reservations lock")
            .remove(&self.job_id);
    }
}

/// How a job run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every replica verified and handed off.
    Completed,
    /// Failed for a reason retrying will not fix.
    Failed(String),
    /// Cancelled on request.
    Cancelled,
    /// The job had already ended before this run (a duplicate message).
    AlreadyEnded(JobState),
    /// Another instance holds the job until this time.
    OwnedElsewhere(OffsetDateTime),
    /// Stopped by shutdown or a lost lease; resumable.
    Interrupted,
    /// This instance runs the job already (a duplicate delivery): nothing was
    /// done, and the run under way keeps its own message.
    RunningHere,
    /// A transient failure outlasted the request retries; run it again later.
    Retry(String),
}

impl From<JobError> for Outcome {
    /// Classified once: a transient error runs the job again later, any other fails it.
    fn from(e: JobError) -> Self {
        if e.is_transient() {
            Outcome::Retry(e.to_string())
        } else {
            Outcome::Failed(e.to_string())
        }
    }
}

/// Why a run of a job stopped before its end.
#[derive(Debug)]
enum Failure {
    /// An error: transient or fatal as [`JobError::is_transient`] says.
    Job(Box<JobError>),
    Cancelled,
    Interrupted,
    /// Another instance took the job over.
    Lost(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Job(e) => e.fmt(f),
            Failure::Cancelled => f.write_str("cancelled"),
            Failure::Interrupted => f.write_str("interrupted"),
            Failure::Lost(by) => write!(f, "taken over by {by}"),
        }
    }
}

impl From<JobError> for Failure {
    fn from(e: JobError) -> Self {
        Failure::Job(Box::new(e))
    }
}

impl Failure {
    fn from_state(e: StateError) -> Self {
        match e {
            StateError::Lost(_, by) => Failure::Lost(by),
            StateError::LockLost(pool) => {
                Failure::Lost(format!("another run (it holds the lock of pool {pool})"))
            }
            other => JobError::job_state(other).into(),
        }
    }

    fn from_storage(context: impl Into<String>, e: &ServiceError) -> Self {
        JobError::storage(context, e.clone()).into()
    }
}

/// Everything a job run needs.
#[derive(Debug)]
pub struct Engine {
    store: Arc<dyn BlobStore>,
    state: StateStore,
    handoff: HandoffSinks,
    metrics: Metrics,
    settings: Arc<ValidatedSettings>,
    limits: Arc<AccountLimits>,
    live: LiveJobs,
    reservations: Reservations,
    without_from_url: FromUrlSupport,
    instance: String,
    gallery: Option<Arc<crate::gallery::Gallery>>,
    batch: Option<Arc<crate::batch::Batch>>,
}

impl Engine {
    /// An engine over `store` (already rate-limited and instrumented), sharing
    /// the accounts' copy gates in `limits` with every job of this instance.
    pub fn new(
        store: Arc<dyn BlobStore>,
        state: StateStore,
        handoff: HandoffSinks,
        metrics: Metrics,
        limits: Arc<AccountLimits>,
        settings: Arc<ValidatedSettings>,
    ) -> Self {
        let gallery = settings.gallery.as_ref().map(|g| {
            Arc::new(
                crate::gallery::Gallery::new(
                    g,
                    settings.retry_policy(),
                    settings.connect_timeout(),
                )
                .expect("validated: the gallery's CA file parses"),
            )
        });
        let batch = settings.pool_stage.as_ref().map(|s| {
            Arc::new(
                crate::batch::Batch::new(s, settings.retry_policy(), settings.connect_timeout())
                    .expect("validated: the pool stage's CA file parses"),
            )
        });
        Self {
            store,
            state,
            handoff,
            metrics,
            settings,
            limits,
            live: LiveJobs::default(),
            reservations: Reservations::default(),
            without_from_url: FromUrlSupport::default(),
            instance: instance_id(),
            gallery,
            batch,
        }
    }

    /// This instance's id, as recorded in the documents of the jobs it runs.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(self.settings.engine.lease_seconds as u64)
    }

    /// The copy phase, over this engine's store, limits, metrics and settings.
    fn copier(&self) -> copier::Copier<'_> {
        copier::Copier {
            without_from_url: &self.without_from_url,
            store: self.store.as_ref(),
            limits: &self.limits,
            metrics: &self.metrics,
            settings: &self.settings,
        }
    }

    /// The pool stage, when `[pool_stage]` is configured.
    fn pool_stager(&self) -> Option<pool_stage::PoolStager<'_>> {
        Some(pool_stage::PoolStager {
            batch: self.batch.as_deref()?,
            state: &self.state,
            cfg: self.settings.pool_stage.as_ref()?,
            metrics: &self.metrics,
            settings: &self.settings,
        })
    }

    /// The publishing phase, over this engine's gallery, metrics and settings.
    fn publisher(&self) -> publish::Publisher<'_> {
        publish::Publisher {
            gallery: self.gallery.as_deref(),
            metrics: &self.metrics,
            settings: &self.settings,
        }
    }

    /// The jobs running here, for the API's live view.
    pub fn live(&self) -> LiveJobs {
        self.live.clone()
    }

    /// Registers a run of `job_id` on this instance, in one step with the check
    /// that none is registered: `None` when a run of it is here already.
    pub(crate) fn reserve(&self, job_id: &str) -> Option<RunSlot> {
        let mut held = self.reservations.0.lock().expect("reservations lock");
        if !held.insert(job_id.to_owned()) {
            return None;
        }
        Some(RunSlot {
            reservations: self.reservations.clone(),
            job_id: job_id.to_owned(),
        })
    }

    /// Jobs with a run on this instance now.
    pub(crate) fn runs_here(&self) -> usize {
        self.reservations.0.lock().expect("reservations lock").len()
    }
}

/// A new run's id: unique, short enough for blob names and logs.
fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

/// A process-unique instance id: host name, process id and a random part.
fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}
