//! Durable job state: one JSON document per job in the control account's state
//! container, written under ETag conditions so concurrent writers never lose an
//! update silently.

mod summary;

pub use summary::JobSummary;

use crate::job::{JobId, JobSpec};
use crate::{
    azure::{ErrorClass, ServiceError},
    storage::{BlobPath, BlobStore, Condition},
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::{sync::Arc, time::Duration};
use time::OffsetDateTime;

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Submitted, not yet taken.
    Queued,
    /// Taken by an instance.
    Running,
    /// Every replica verified and handed off.
    Completed,
    /// Ended with a reason.
    Failed,
    /// Cancelled on request.
    Cancelled,
}

impl JobState {
    /// The state named `text` (as [`JobState::as_str`] writes it).
    pub fn parse(text: &str) -> Option<Self> {
        [
            JobState::Queued,
            JobState::Running,
            JobState::Completed,
            JobState::Failed,
            JobState::Cancelled,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }

    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// What a running job is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Checking the source and accounts, taking the snapshot.
    Planning,
    /// First copies into each account.
    Seeding,
    /// Copies under way.
    Copying,
    /// Checking finished copies.
    Verifying,
    /// Sending the hand-off.
    HandingOff,
    /// Making the gallery image version and waiting for its replicas.
    Publishing,
}

impl Phase {
    const ALL: [Phase; 6] = [
        Phase::Planning,
        Phase::Seeding,
        Phase::Copying,
        Phase::Verifying,
        Phase::Publishing,
        Phase::HandingOff,
    ];

    /// Order of the phases: a running job never goes back to a lower rank.
    fn rank(self) -> u8 {
        match self {
            Phase::Planning => 0,
            Phase::Seeding | Phase::Copying | Phase::Verifying => 1,
            Phase::Publishing => 2,
            Phase::HandingOff => 3,
        }
    }

    /// The phase in words: "handing off".
    pub fn words(self) -> String {
        self.as_str().replace('_', " ")
    }

    /// The phase's name, as the contract spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Planning => "planning",
            Phase::Seeding => "seeding",
            Phase::Copying => "copying",
            Phase::Verifying => "verifying",
            Phase::HandingOff => "handing_off",
            Phase::Publishing => "publishing",
        }
    }

    /// The phase named `text`.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == text)
    }
}

/// Where one replica stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// Not started.
    Pending,
    /// Copy running.
    Copying,
    /// Copy finished and checked.
    Verified,
    /// Gave up on it.
    Failed,
    /// Aborted by a cancel.
    Cancelled,
}

/// Where a job's gallery image version stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublicationState {
    /// Named, not asked for yet.
    Pending,
    /// Being created (with the first replica-count step).
    Creating,
    /// Its replica count being raised, or a failed replication updated again.
    Updating,
    /// A failed replication being recovered.
    Recovering,
    /// Replicated everywhere it should be.
    Succeeded,
}

impl PublicationState {
    /// The name in the job document and views.
    pub fn as_str(self) -> &'static str {
        match self {
            PublicationState::Pending => "pending",
            PublicationState::Creating => "creating",
            PublicationState::Updating => "updating",
            PublicationState::Recovering => "recovering",
            PublicationState::Succeeded => "succeeded",
        }
    }
}

impl std::fmt::Display for PublicationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a replica was (or is being) made; recorded in its record and tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaMethod {
    /// An asynchronous Copy Blob.
    Async,
    /// Put Page From URL over the source's written ranges.
    Ranges,
}

impl ReplicaMethod {
    /// The name recorded in the replica's record and tags.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaMethod::Async => "async",
            ReplicaMethod::Ranges => "ranges",
        }
    }
}

/// One replica in a job document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// Index in the job.
    pub index: u32,
    /// Destination account.
    pub account: String,
    /// Blob URL (no SAS).
    pub uri: String,
    /// Destination blob.
    pub blob: BlobPath,
    /// State.
    pub state: ReplicaState,
    /// Id of the copy in flight or last finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_id: Option<String>,
    /// Bytes copied.
    pub bytes_copied: u64,
    /// Bytes to copy.
    pub bytes_total: u64,
    /// Copies started for it (retries included).
    #[serde(default)]
    pub attempts: u32,
    /// Status requests spent polling it.
    #[serde(default)]
    pub status_requests: u32,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Made by an earlier job of the pool's image set and reused by this one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inherited: bool,
    /// How it was copied: `async` (Copy Blob) or `ranges` (Put Page From URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<ReplicaMethod>,
    /// Ranges of a ranged copy written so far (merged), so a resumed copy
    /// writes only the rest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges_done: Vec<std::ops::Range<u64>>,
    /// The blob its last copy read: `snapshot`, or `<account>/<name>` of a
    /// replica or relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_from: Option<String>,
}

/// A replica's state change its life does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replica {index} cannot go from {from:?} to {to:?}")]
pub struct IllegalReplicaTransition {
    /// The replica.
    pub index: u32,
    /// Where it stands.
    pub from: ReplicaState,
    /// Where it was asked to go.
    pub to: ReplicaState,
}

impl ReplicaState {
    /// Whether a replica may go from `self` to `to`: a copy starts from
    /// pending, from a copy under way (a new try) or from a verified replica
    /// found gone; it is verified from pending (kept or adopted) or copying;
    /// it fails before it is verified; any but a failed one is cancelled when
    /// its job ends without completing. Failed and cancelled are ends.
    pub(crate) fn may_enter(self, to: ReplicaState) -> bool {
        use ReplicaState::*;
        matches!(
            (self, to),
            (Pending | Copying | Verified, Copying)
                | (Pending | Copying | Verified, Verified)
                | (Pending | Copying, Failed)
                | (Pending | Copying | Verified, Cancelled)
        )
    }
}

impl ReplicaRecord {
    /// Moves the replica to `to`, if its life allows it.
    pub fn enter(&mut self, to: ReplicaState) -> Result<(), IllegalReplicaTransition> {
        if !self.state.may_enter(to) {
            return Err(IllegalReplicaTransition {
                index: self.index,
                from: self.state,
                to,
            });
        }
        self.state = to;
        Ok(())
    }
}

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Replicate a VHD for a pool: the job as submitted (id filled in).
    Replicate(JobSpec),
    /// Retire a pool's image sets.
    Retire {
        /// The pool.
        pool: String,
    },
}

/// The durable record of a job. Its state changes only through
/// [`JobDocument::enter`], which knows the legal transitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StoredDocument", into = "StoredDocument")]
pub struct JobDocument {
    /// Job id.
    pub job_id: JobId,
    /// What the job does.
    pub work: Work,
    state: JobState,
    /// Phase while running.
    phase: Option<Phase>,
    /// Reason of a failure, in words a person can act on.
    pub error: Option<String>,
    /// When it was submitted.
    pub created_at: OffsetDateTime,
    /// Last change.
    pub updated_at: OffsetDateTime,
    /// Someone asked to cancel it.
    pub cancel_requested: bool,
    /// Snapshot of the source all replicas are copied from.
    pub source_snapshot: Option<String>,
    /// Length of the source in bytes.
    pub source_bytes: Option<u64>,
    /// The source's ETag when it was snapshotted.
    pub source_etag: Option<String>,
    /// Replicas, by index.
    pub replicas: Vec<ReplicaRecord>,
    /// The hand-off as sent (recorded before it is sent).
    pub handoff: Option<serde_json::Value>,
    /// How the job relates to the pool's image set (top-up, new set and why).
    pub image_set: Option<String>,
    /// The instance running the job and until when its claim holds (renewed by
    /// every checkpoint; cleared when the instance stops).
    owner: Option<Owner>,
    /// The gallery image version the job publishes (its name is fixed here
    /// before it is asked for, so a resumed job follows the same version).
    pub gallery: Option<Publication>,
    /// Relays the job made and has not deleted yet (short-lived same-account
    /// copies of the snapshot that seed other accounts).
    pub relays: Vec<BlobPath>,
    /// When the job first started running.
    pub started_at: Option<OffsetDateTime>,
    /// Bytes copied over time, one sample per checkpoint (the last few), for
    /// throughput and ETA.
    pub progress_log: Vec<crate::estimate::Sample>,
}

/// A gallery image version a job publishes or resizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publication {
    /// Version name, `YYYY.MMDD.P`.
    pub version: String,
    /// Its ARM id.
    pub version_id: String,
    /// Replicas wanted in the gallery's region.
    pub replicas: u32,
    /// The staged VHD it is made from.
    pub staged_uri: String,
    /// Where the version stands.
    pub state: PublicationState,
    /// Replication progress, 0 to 1.
    #[serde(default)]
    pub progress: f64,
    /// The long-running operation being followed, as ARM gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<serde_json::Value>,
    /// How many names were found taken by others before this one.
    #[serde(default)]
    pub attempt: u32,
    /// What happened on the way, in order, for people: each replica-count
    /// step asked for, each failed replication and how it was recovered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<String>,
    /// Replication has made no progress for `gallery.stall_minutes`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stalled: bool,
}

/// A state change the job's life does not allow (a finished job never runs
/// again, nothing goes back to queued).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job {job_id} cannot go from {from} to {to}")]
pub struct IllegalTransition {
    /// The job.
    pub job_id: String,
    /// Its state.
    pub from: &'static str,
    /// The state asked for.
    pub to: &'static str,
}

/// A job document as stored: the JSON fields of every version (a retire job
/// was once a placeholder `spec` with `retire_pool`; `kind` says which now).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredDocument {
    job_id: JobId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spec: Option<JobSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retire_pool: Option<String>,
    state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    #[serde(default)]
    cancel_requested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_etag: Option<String>,
    #[serde(default)]
    replicas: Vec<ReplicaRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    handoff: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_set: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<Owner>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gallery: Option<Publication>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    relays: Vec<BlobPath>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    started_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    progress_log: Vec<crate::estimate::Sample>,
}

impl TryFrom<StoredDocument> for JobDocument {
    type Error = String;
    fn try_from(d: StoredDocument) -> Result<Self, String> {
        let work = match (d.kind.as_deref(), d.retire_pool, d.spec) {
            (Some("retire") | None, Some(pool), _) => Work::Retire { pool },
            (Some("replicate") | None, None, Some(spec)) => Work::Replicate(spec),
            (kind, _, _) => {
                return Err(format!(
                "a job document of kind {kind:?} needs a spec (replicate) or retire_pool (retire)"
            ))
            }
        };
        Ok(Self {
            job_id: d.job_id,
            work,
            state: d.state,
            phase: d.phase,
            error: d.error,
            created_at: d.created_at,
            updated_at: d.updated_at,
            cancel_requested: d.cancel_requested,
            source_snapshot: d.source_snapshot,
            source_bytes: d.source_bytes,
            source_etag: d.source_etag,
            replicas: d.replicas,
            handoff: d.handoff,
            image_set: d.image_set,
            owner: d.owner,
            gallery: d.gallery,
            relays: d.relays,
            started_at: d.started_at,
            progress_log: d.progress_log,
        })
    }
}

impl From<JobDocument> for StoredDocument {
    fn from(d: JobDocument) -> Self {
        let (kind, spec, retire_pool) = match d.work {
            Work::Replicate(spec) => ("replicate", Some(spec), None),
            Work::Retire { pool } => ("retire", None, Some(pool)),
        };
        Self {
            job_id: d.job_id,
            kind: Some(kind.to_owned()),
            spec,
            retire_pool,
            state: d.state,
            phase: d.phase,
            error: d.error,
            created_at: d.created_at,
            updated_at: d.updated_at,
            cancel_requested: d.cancel_requested,
            source_snapshot: d.source_snapshot,
            source_bytes: d.source_bytes,
            source_etag: d.source_etag,
            replicas: d.replicas,
            handoff: d.handoff,
            image_set: d.image_set,
            owner: d.owner,
            gallery: d.gallery,
            relays: d.relays,
            started_at: d.started_at,
            progress_log: d.progress_log,
        }
    }
}

/// The time claims are written and judged by: the wall clock, moved on by as
/// much as tokio's clock runs ahead of the process's monotonic clock. In a
/// daemon the two run together and this is the wall clock; on a paused test
/// clock (the simulations) it follows virtual time, so a claim lapses after
/// its lease of virtual time, as it would after that much real time.
pub(crate) fn claim_now() -> OffsetDateTime {
    let ahead = tokio::time::Instant::now()
        .into_std()
        .saturating_duration_since(std::time::Instant::now());
    OffsetDateTime::now_utc() + ahead
}

/// Which run of a job holds it, fenced by ETag-guarded writes. The claim is
/// per run, not per instance: a second run of the same job in the same process
/// is a competitor like any other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Instance id (host, process and a random part).
    pub instance: String,
    /// The run's id, unique per run (absent in documents of earlier versions,
    /// whose claims are then another run's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// The claim lapses at this time unless renewed.
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
}

impl JobDocument {
    /// A new queued job.
    pub fn queued(job_id: JobId, work: Work) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            job_id,
            work,
            state: JobState::Queued,
            phase: None,
            error: None,
            created_at: now,
            updated_at: now,
            cancel_requested: false,
            source_snapshot: None,
            source_bytes: None,
            source_etag: None,
            replicas: Vec::new(),
            handoff: None,
            image_set: None,
            owner: None,
            gallery: None,
            relays: Vec::new(),
            started_at: None,
            progress_log: Vec::new(),
        }
    }

    /// A new queued replication job.
    pub fn replicate(job_id: JobId, spec: JobSpec) -> Self {
        Self::queued(job_id, Work::Replicate(spec))
    }

    /// A new queued retire job.
    pub fn retire(job_id: JobId, pool: &str) -> Self {
        Self::queued(
            job_id,
            Work::Retire {
                pool: pool.to_owned(),
            },
        )
    }

    /// Where the job stands.
    pub fn state(&self) -> JobState {
        self.state
    }

    /// Moves the job to `to`, if its life allows it: queued to running or to an
    /// end; running to running (claimed again) or to an end; never out of an end,
    /// never back to queued. A job that ends leaves its phase.
    pub fn enter(&mut self, to: JobState) -> Result<(), IllegalTransition> {
        use JobState::*;
        let legal = matches!(
            (self.state, to),
            (Queued, Running | Completed | Failed | Cancelled)
                | (Running, Running | Completed | Failed | Cancelled)
        );
        if !legal {
            return Err(IllegalTransition {
                job_id: self.job_id.to_string(),
                from: self.state.as_str(),
                to: to.as_str(),
            });
        }
        self.state = to;
        if to.is_terminal() {
            self.phase = None;
        }
        if to == Running && self.started_at.is_none() {
            self.started_at = Some(OffsetDateTime::now_utc());
        }
        Ok(())
    }

    /// Bytes copied so far, over every replica.
    pub fn bytes_copied(&self) -> u64 {
        self.replicas
            .iter()
            .map(|r| r.bytes_copied.min(r.bytes_total))
            .sum()
    }

    /// Notes the progress at `now` in the log throughput and ETA come from
    /// (while running).
    pub(crate) fn note_progress(&mut self, now: OffsetDateTime) {
        if self.state == JobState::Running {
            let bytes = self.bytes_copied();
            crate::estimate::record(&mut self.progress_log, now, bytes);
        }
    }

    /// The pool the job is for.
    pub fn pool_id(&self) -> &str {
        match &self.work {
            Work::Replicate(spec) => &spec.pool.id,
            Work::Retire { pool } => pool,
        }
    }

    /// The submitted spec of a replication job.
    pub fn spec(&self) -> Option<&JobSpec> {
        match &self.work {
            Work::Replicate(spec) => Some(spec),
            Work::Retire { .. } => None,
        }
    }

    /// The phase while running.
    pub fn phase(&self) -> Option<Phase> {
        self.phase
    }

    /// Moves a running job to `to`. Phases only go forward (planning, then
    /// seeding, copying or verifying in any order, then publishing, then
    /// handing off); a new run starts again at planning through
    /// [`JobDocument::claim`].
    pub fn enter_phase(&mut self, to: Phase) -> Result<(), IllegalTransition> {
        let legal = self.state == JobState::Running
            && self.phase.is_none_or(|from| from.rank() <= to.rank());
        if !legal {
            return Err(IllegalTransition {
                job_id: self.job_id.to_string(),
                from: self.phase.map_or(self.state.as_str(), Phase::as_str),
                to: to.as_str(),
            });
        }
        self.phase = Some(to);
        Ok(())
    }

    /// The job ends as failed with `reason`.
    pub fn fail(&mut self, reason: String) -> Result<(), IllegalTransition> {
        self.enter(JobState::Failed)?;
        self.error = Some(reason);
        Ok(())
    }

    /// The run holding the job's claim, if any.
    pub fn owner(&self) -> Option<&Owner> {
        self.owner.as_ref()
    }

    /// Takes the job for `owner`'s run: running (a replication at planning),
    /// the last run's error cleared. Refused for an ended job.
    pub fn claim(&mut self, owner: Owner) -> Result<(), IllegalTransition> {
        self.enter(JobState::Running)?;
        self.phase = self.spec().map(|_| Phase::Planning);
        self.error = None;
        self.owner = Some(owner);
        Ok(())
    }

    /// Extends the claim of run `run` to `until`; nothing when another run (or
    /// none) holds it.
    pub(crate) fn renew_claim(&mut self, run: &str, until: OffsetDateTime) {
        if self.state.is_terminal() {
            return;
        }
        if let Some(o) = self
            .owner
            .as_mut()
            .filter(|o| o.run.as_deref() == Some(run))
        {
            o.until = until;
        }
    }

    /// Gives the claim up, so the next run may take the job at once.
    pub(crate) fn release_claim(&mut self) {
        self.owner = None;
    }

    /// Another run's live claim on this job, if any (a run of this instance
    /// too: each run is fenced on its own).
    pub(crate) fn owned_by_another_run(&self, run: &str, now: OffsetDateTime) -> Option<&Owner> {
        self.owner
            .as_ref()
            .filter(|o| o.run.as_deref() != Some(run) && o.until > now && !self.state.is_terminal())
    }

    /// Whether run `run` holds the job's claim (written by it, not ended).
    pub(crate) fn held_by(&self, run: &str) -> bool {
        !self.state.is_terminal()
            && self
                .owner
                .as_ref()
                .is_some_and(|o| o.run.as_deref() == Some(run))
    }

    /// Bytes copied over bytes to copy, 0 to 1.
    pub fn progress(&self) -> f64 {
        let total: u64 = self.replicas.iter().map(|r| r.bytes_total).sum();
        if total == 0 {
            return if self.state == JobState::Completed {
                1.0
            } else {
                0.0
            };
        }
        let done: u64 = self
            .replicas
            .iter()
            .map(|r| r.bytes_copied.min(r.bytes_total))
            .sum();
        done as f64 / total as f64
    }
}

/// A state operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The document changed since it was read (someone else wrote it).
    #[error("job {0} was changed by another writer")]
    Conflict(JobId),
    /// A document with this id exists already.
    #[error("job {0} exists already")]
    Exists(JobId),
    /// No such job.
    #[error("job {0} not found")]
    NotFound(String),
    /// Another instance has taken the job over.
    #[error("job {0} was taken over by {1}")]
    Lost(JobId, String),
    /// The run no longer holds the pool's lock (another run of its job took it).
    #[error("the lock of pool {0} is held by another run")]
    LockLost(String),
    /// The stored document is not valid JSON of a job.
    #[error("job document {0} is corrupt: {1}")]
    Corrupt(String, String),
    /// A pool record changed since it was read.
    #[error("pool record {0} was changed by another writer")]
    PoolChanged(String),
    /// Other writers won every one of this many read-change-write rounds.
    #[error("{0} kept changing under {1} attempts to update it; try again later")]
    Contended(String, u32),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] ServiceError),
}

/// Job documents in a container of the control account.
#[derive(Debug, Clone)]
pub struct StateStore {
    store: Arc<dyn BlobStore>,
    account: String,
    container: String,
}

const PREFIX: &str = "jobs/";

/// Read-change-write rounds an update tries before it gives up as contended.
pub(crate) const MAX_UPDATE_ROUNDS: u32 = 16;

/// A short, growing, jittered pause between read-change-write rounds, so
/// writers that collided do not collide again in lockstep.
pub(crate) async fn contention_pause(round: u32) {
    use rand::Rng;
    let cap = Duration::from_millis(10u64 << round.min(6));
    let wait = cap.mul_f64(rand::rng().random::<f64>());
    tokio::time::sleep(wait).await;
}

impl StateStore {
    /// Documents in `container` of `account`.
    pub fn new(store: Arc<dyn BlobStore>, account: &str, container: &str) -> Self {
        Self {
            store,
            account: account.to_owned(),
            container: container.to_owned(),
        }
    }

    fn path(&self, id: &str) -> BlobPath {
        BlobPath::new(
            &self.account,
            &self.container,
            &format!("{PREFIX}{id}.json"),
        )
    }

    /// Creates the container.
    pub async fn ensure(&self) -> Result<(), StateError> {
        Ok(self
            .store
            .ensure_container(&self.account, &self.container)
            .await?)
    }

    /// Stores a new document; fails with [`StateError::Exists`] if the id is taken.
    pub async fn create(&self, doc: &JobDocument) -> Result<String, StateError> {
        match self
            .store
            .put_block_blob(
                &self.path(doc.job_id.as_str()),
                to_bytes(doc),
                &JobSummary::of(doc).to_metadata(),
                Condition::IfAbsent,
            )
            .await
        {
            Ok(etag) => Ok(etag),
            Err(e)
                if matches!(
                    e.class,
                    ErrorClass::PreconditionFailed | ErrorClass::Conflict
                ) =>
            {
                Err(StateError::Exists(doc.job_id.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads a document and its ETag.
    pub async fn load(&self, id: &str) -> Result<Option<(JobDocument, String)>, StateError> {
        match self.store.read(&self.path(id), None).await {
            Ok((bytes, etag)) => {
                let doc = serde_json::from_slice(&bytes)
                    .map_err(|e| StateError::Corrupt(id.to_owned(), e.to_string()))?;
                Ok(Some((doc, etag)))
            }
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes a document if it still has `etag`; returns the new ETag.
    pub async fn save(&self, doc: &mut JobDocument, etag: &str) -> Result<String, StateError> {
        doc.updated_at = OffsetDateTime::now_utc();
        match self
            .store
            .put_block_blob(
                &self.path(doc.job_id.as_str()),
                to_bytes(doc),
                &JobSummary::of(doc).to_metadata(),
                Condition::IfMatch(etag.to_owned()),
            )
            .await
        {
            Ok(etag) => Ok(etag),
            Err(e) if e.class == ErrorClass::PreconditionFailed => {
                Err(StateError::Conflict(doc.job_id.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads, changes and writes a document, again from the start whenever another
    /// writer got there first. `change` returns false to leave it as it is.
    pub async fn update(
        &self,
        id: &str,
        mut change: impl FnMut(&mut JobDocument) -> bool,
    ) -> Result<JobDocument, StateError> {
        for round in 0..MAX_UPDATE_ROUNDS {
            if round > 0 {
                contention_pause(round).await;
            }
            let (mut doc, etag) = self
                .load(id)
                .await?
                .ok_or_else(|| StateError::NotFound(id.to_owned()))?;
            if !change(&mut doc) {
                return Ok(doc);
            }
            match self.save(&mut doc, &etag).await {
                Ok(_) => return Ok(doc),
                Err(StateError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Contended(
            format!("job {id}"),
            MAX_UPDATE_ROUNDS,
        ))
    }

    /// Every job's summary, newest first, from one listing of the documents'
    /// metadata (a document written before summaries existed is read instead).
    /// A document that cannot be read as a job is left out and reported in
    /// [`JobListing::skipped`], never failing the whole list.
    pub async fn list(&self) -> Result<JobListing, StateError> {
        let listed = self
            .store
            .list_detailed(&self.account, &self.container, PREFIX, false)
            .await?;
        let mut listing = JobListing::default();
        for blob in listed {
            let Some(id) = blob
                .name
                .strip_prefix(PREFIX)
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if let Some(summary) = JobSummary::from_metadata(id, &blob.metadata) {
                listing.jobs.push(summary);
                continue;
            }
            match self.load(id).await {
                Ok(Some((doc, _))) => listing.jobs.push(JobSummary::of(&doc)),
                Ok(None) => {}
                Err(StateError::Corrupt(name, error)) => {
                    tracing::warn!(document = %name, %error, "skipping a job document that is not a job");
                    listing.skipped.push(SkippedDocument { name, error });
                }
                Err(e) => return Err(e),
            }
        }
        listing.jobs.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(b.job_id.cmp(&a.job_id))
        });
        Ok(listing)
    }

    /// Deletes the documents (and stored hand-offs) of jobs that ended before
    /// `cutoff`; returns their ids. Unless `dry_run`.
    pub(crate) async fn prune(
        &self,
        cutoff: OffsetDateTime,
        dry_run: bool,
    ) -> Result<Vec<String>, StateError> {
        let mut pruned = Vec::new();
        for job in self.list().await?.jobs {
            if !job.state.is_terminal() || job.updated_at >= cutoff {
                continue;
            }
            if !dry_run {
                for path in [
                    self.path(&job.job_id),
                    BlobPath::new(
                        &self.account,
                        &self.container,
                        &format!("handoffs/{}.json", job.job_id),
                    ),
                ] {
                    match self.store.delete(&path).await {
                        Ok(()) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            pruned.push(job.job_id);
        }
        Ok(pruned)
    }
}

/// Every job's summary and the documents that could not be read.
#[derive(Debug, Clone, Default)]
pub struct JobListing {
    /// Summaries, newest first.
    pub jobs: Vec<JobSummary>,
    /// Documents left out: not JSON of a job.
    pub skipped: Vec<SkippedDocument>,
}

/// A job document the listing could not read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedDocument {
    /// Its name.
    pub name: String,
    /// Why.
    pub error: String,
}

/// One replica of a pool's image set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetReplica {
    /// Account.
    pub account: String,
    /// Blob URL (no SAS).
    pub uri: String,
    /// The blob.
    pub blob: BlobPath,
    /// The job that made it.
    pub job_id: String,
    /// Beyond what the pool's latest job needs (a smaller pool): kept, since an
    /// earlier hand-off named it and a pool built from that may still boot
    /// from it, until the pool is retired; a later, larger job reuses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub surplus: bool,
}

/// The identical replicas a pool's nodes boot from, all copies of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSet {
    /// Source URL as submitted.
    pub source: String,
    /// The source blob.
    pub source_blob: BlobPath,
    /// The snapshot every replica holds.
    pub source_snapshot: String,
    /// The source's ETag when the snapshot was taken.
    pub source_etag: String,
    /// Length of the VHD.
    pub source_bytes: u64,
    /// The replicas, in hand-off order.
    pub replicas: Vec<SetReplica>,
    /// When the set was started.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// The gallery image version made from this set's staged VHD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gallery_version: Option<SetVersion>,
}

/// A gallery image version of an image set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetVersion {
    /// Version name.
    pub version: String,
    /// Its ARM id.
    pub version_id: String,
    /// Replicas in the gallery's region.
    pub replicas: u32,
}

/// Everything the daemon made for one pool: its image sets, newest last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    /// Batch pool id.
    pub pool_id: String,
    /// Image sets, oldest first; the last is the current one.
    pub sets: Vec<ImageSet>,
    /// The one job that may change the pool's image sets now: a job from its
    /// planning until its hand-off is sent, or a retire (the `retiring` mark)
    /// until the record is deleted. Written under the record's ETag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<PoolLock>,
}

/// Who holds a pool's image sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolLock {
    /// The job holding it.
    pub job_id: String,
    /// The run of that job holding it (absent in records of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// `true` for a retire job: the pool is being retired.
    #[serde(default)]
    pub retiring: bool,
    /// Since when.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

/// One run of one job: who may hold a job's claim and its pool's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunRef<'a> {
    /// The job.
    pub job_id: &'a str,
    /// The run.
    pub run: &'a str,
}

impl RunRef<'_> {
    /// Whether `lock` is this run's.
    pub(crate) fn holds(&self, lock: &PoolLock) -> bool {
        lock.job_id == self.job_id && lock.run.as_deref() == Some(self.run)
    }
}

/// What taking a pool's lock found.
#[derive(Debug)]
pub(crate) enum PoolClaim {
    /// The lock is ours: the record as written (sets from before, maybe none)
    /// and its ETag.
    Held(PoolRecord, String),
    /// Another job holds it.
    Busy(PoolLock),
}

impl StateStore {
    fn pool_path(&self, pool_id: &str) -> BlobPath {
        BlobPath::new(
            &self.account,
            &self.container,
            &format!("pools/{pool_id}.json"),
        )
    }

    /// A pool's record and its ETag.
    pub async fn load_pool(
        &self,
        pool_id: &str,
    ) -> Result<Option<(PoolRecord, String)>, StateError> {
        match self.store.read(&self.pool_path(pool_id), None).await {
            Ok((bytes, etag)) => serde_json::from_slice(&bytes)
                .map(|r| Some((r, etag)))
                .map_err(|e| StateError::Corrupt(format!("pools/{pool_id}"), e.to_string())),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every pool's record.
    pub(crate) async fn list_pools(&self) -> Result<Vec<PoolRecord>, StateError> {
        let names = self
            .store
            .list(&self.account, &self.container, "pools/")
            .await?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let id = name.trim_start_matches("pools/").trim_end_matches(".json");
            if let Some((r, _)) = self.load_pool(id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Takes the lock of `pool_id`'s record for run `run` of `job_id` (creating
    /// the record when there is none). Re-entrant: the run that holds it gets it
    /// again. A lock held by another run of the same job is taken over: only the
    /// run that holds the job's fenced claim calls this, so that other run has
    /// lost the job. `stale` names a holder job known to have ended, whose lock
    /// is taken over.
    pub(crate) async fn lock_pool(
        &self,
        pool_id: &str,
        holder: &RunRef<'_>,
        retiring: bool,
        stale: Option<&str>,
    ) -> Result<PoolClaim, StateError> {
        for round in 0..MAX_UPDATE_ROUNDS {
            if round > 0 {
                contention_pause(round).await;
            }
            let (mut record, condition) = match self.load_pool(pool_id).await? {
                Some((r, etag)) => (r, Condition::IfMatch(etag)),
                None => (
                    PoolRecord {
                        pool_id: pool_id.to_owned(),
                        sets: Vec::new(),
                        lock: None,
                    },
                    Condition::IfAbsent,
                ),
            };
            match &record.lock {
                Some(l) if holder.holds(l) => {
                    if let Condition::IfMatch(etag) = condition {
                        return Ok(PoolClaim::Held(record, etag));
                    }
                }
                Some(l) if l.job_id == holder.job_id => {
                    tracing::info!(pool = %pool_id, previous_run = ?l.run, "taking the pool's lock over from an earlier run of this job");
                }
                Some(l) if Some(l.job_id.as_str()) != stale => {
                    return Ok(PoolClaim::Busy(l.clone()))
                }
                _ => {}
            }
            record.lock = Some(PoolLock {
                job_id: holder.job_id.to_owned(),
                run: Some(holder.run.to_owned()),
                retiring,
                since: OffsetDateTime::now_utc(),
            });
            match self.put_pool(pool_id, &record, condition).await {
                Ok(etag) => return Ok(PoolClaim::Held(record, etag)),
                Err(StateError::PoolChanged(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Contended(
            format!("pool record {pool_id}"),
            MAX_UPDATE_ROUNDS,
        ))
    }

    /// Gives up the lock of `pool_id` if `holder` holds it.
    pub(crate) async fn unlock_pool(
        &self,
        pool_id: &str,
        holder: &RunRef<'_>,
    ) -> Result<(), StateError> {
        for round in 0..MAX_UPDATE_ROUNDS {
            if round > 0 {
                contention_pause(round).await;
            }
            let Some((mut record, etag)) = self.load_pool(pool_id).await? else {
                return Ok(());
            };
            if !record.lock.as_ref().is_some_and(|l| holder.holds(l)) {
                return Ok(());
            }
            record.lock = None;
            match self
                .put_pool(pool_id, &record, Condition::IfMatch(etag))
                .await
            {
                Ok(_) => return Ok(()),
                Err(StateError::PoolChanged(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Contended(
            format!("pool record {pool_id}"),
            MAX_UPDATE_ROUNDS,
        ))
    }

    /// Changes `pool_id`'s record only while `holder` holds its lock, under the
    /// record's ETag: a run that lost its job (and with it the pool's lock)
    /// never writes the pool's image sets. [`StateError::LockLost`] otherwise.
    pub(crate) async fn update_pool_held(
        &self,
        pool_id: &str,
        holder: &RunRef<'_>,
        mut change: impl FnMut(&mut PoolRecord),
    ) -> Result<PoolRecord, StateError> {
        for round in 0..MAX_UPDATE_ROUNDS {
            if round > 0 {
                contention_pause(round).await;
            }
            let (mut record, etag) = self
                .load_pool(pool_id)
                .await?
                .ok_or_else(|| StateError::LockLost(pool_id.to_owned()))?;
            if !record.lock.as_ref().is_some_and(|l| holder.holds(l)) {
                return Err(StateError::LockLost(pool_id.to_owned()));
            }
            change(&mut record);
            match self
                .put_pool(pool_id, &record, Condition::IfMatch(etag))
                .await
            {
                Ok(_) => return Ok(record),
                Err(StateError::PoolChanged(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Contended(
            format!("pool record {pool_id}"),
            MAX_UPDATE_ROUNDS,
        ))
    }

    /// Deletes a pool's record if it is still as read with `etag`; a record
    /// changed since fails with [`StateError::PoolChanged`].
    pub(crate) async fn delete_pool_if(&self, pool_id: &str, etag: &str) -> Result<(), StateError> {
        match self
            .store
            .delete_if_match(&self.pool_path(pool_id), etag)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) if e.class == ErrorClass::PreconditionFailed => {
                Err(StateError::PoolChanged(pool_id.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn put_pool(
        &self,
        pool_id: &str,
        record: &PoolRecord,
        condition: Condition,
    ) -> Result<String, StateError> {
        let bytes = Bytes::from(serde_json::to_vec_pretty(record).expect("pool records serialise"));
        match self
            .store
            .put_block_blob(
                &self.pool_path(pool_id),
                bytes,
                &Default::default(),
                condition,
            )
            .await
        {
            Ok(etag) => Ok(etag),
            Err(e) if e.code.as_deref() == Some("ContainerNotFound") => Err(e.into()),
            Err(e)
                if matches!(
                    e.class,
                    ErrorClass::PreconditionFailed | ErrorClass::Conflict | ErrorClass::NotFound
                ) =>
            {
                Err(StateError::PoolChanged(pool_id.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl StateStore {
    /// Writes the whole hand-off document of a job (for a hand-off too large for
    /// one queue message) and returns where it is. Overwrites: the document of a
    /// job never changes once recorded.
    pub(crate) async fn put_handoff(
        &self,
        job_id: &str,
        json: &str,
    ) -> Result<crate::storage::BlobReference, StateError> {
        let path = BlobPath::new(
            &self.account,
            &self.container,
            &format!("handoffs/{job_id}.json"),
        );
        self.store
            .put_block_blob(
                &path,
                Bytes::from(json.to_owned()),
                &Default::default(),
                Condition::Always,
            )
            .await?;
        Ok(crate::storage::BlobReference {
            uri: self.store.blob_url(&path)?.to_string(),
            account: path.account,
            container: path.container,
            blob: path.name,
        })
    }
}

fn to_bytes(doc: &JobDocument) -> Bytes {
    Bytes::from(serde_json::to_vec_pretty(doc).expect("job documents serialise"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::sim::{SimConfig, SimStore};

    fn spec() -> JobSpec {
        crate::job::parse_job_json(
            r#"{"source":"http://x/c/b.vhd","pool":{"id":"p","os":"linux","nodes":3}}"#,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn create_is_idempotent_and_saves_are_fenced() {
        let s = StateStore::new(
            Arc::new(SimStore::new(SimConfig::instant())),
            "ops",
            "state",
        );
        s.ensure().await.unwrap();
        let id = JobId::parse("j1").unwrap();
        let doc = JobDocument::replicate(id.clone(), spec());
        let etag = s.create(&doc).await.unwrap();
        assert!(matches!(s.create(&doc).await, Err(StateError::Exists(_))));

        let (mut a, _) = s.load("j1").await.unwrap().unwrap();
        let mut b = a.clone();
        a.state = JobState::Running;
        let new_etag = s.save(&mut a, &etag).await.unwrap();
        b.cancel_requested = true;
        assert!(matches!(
            s.save(&mut b, &etag).await,
            Err(StateError::Conflict(_))
        ));

        let d = s
            .update("j1", |d| {
                d.cancel_requested = true;
                true
            })
            .await
            .unwrap();
        assert!(d.cancel_requested);
        assert_eq!(d.state, JobState::Running);
        assert!(matches!(
            s.save(&mut a, &new_etag).await,
            Err(StateError::Conflict(_))
        ));
        assert!(s.load("nope").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn list_is_newest_first() {
        let s = StateStore::new(
            Arc::new(SimStore::new(SimConfig::instant())),
            "ops",
            "state",
        );
        s.ensure().await.unwrap();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let mut d = JobDocument::replicate(JobId::parse(id).unwrap(), spec());
            d.created_at += time::Duration::seconds(i as i64);
            s.create(&d).await.unwrap();
        }
        let ids: Vec<_> = s
            .list()
            .await
            .unwrap()
            .jobs
            .into_iter()
            .map(|d| d.job_id)
            .collect();
        assert_eq!(ids, vec!["c", "b", "a"]);
    }

    /// The list reads summaries from one listing, not the documents; a corrupt
    /// document is skipped and reported; a document written before summaries
    /// existed is read; pruning removes only old finished jobs.
    #[tokio::test]
    async fn listing_reads_summaries_and_skips_what_it_cannot_read() {
        let sim = Arc::new(SimStore::new(SimConfig::instant()));
        let s = StateStore::new(sim.clone(), "ops", "state");
        s.ensure().await.unwrap();
        for i in 0..50 {
            let mut d = JobDocument::replicate(JobId::parse(&format!("j{i}")).unwrap(), spec());
            d.created_at += time::Duration::seconds(i);
            if i % 2 == 0 {
                d.state = JobState::Failed;
                d.error = Some("ö".repeat(500));
            }
            s.create(&d).await.unwrap();
        }
        sim.put_block_blob(
            &BlobPath::new("ops", "state", "jobs/broken.json"),
            Bytes::from_static(b"{ not a job"),
            &Default::default(),
            Condition::Always,
        )
        .await
        .unwrap();
        let old = serde_json::to_vec(&JobDocument::replicate(
            JobId::parse("old").unwrap(),
            spec(),
        ))
        .unwrap();
        sim.put_block_blob(
            &BlobPath::new("ops", "state", "jobs/old.json"),
            Bytes::from(old),
            &Default::default(),
            Condition::Always,
        )
        .await
        .unwrap();

        let before = sim.stats().requests;
        let listing = s.list().await.unwrap();
        let requests = sim.stats().requests - before;
        assert_eq!(listing.jobs.len(), 51);
        assert_eq!(
            requests, 3,
            "one listing, then the two documents without a summary"
        );
        assert_eq!(listing.skipped.len(), 1);
        assert_eq!(listing.skipped[0].name, "broken");
        let failed = listing.jobs.iter().find(|j| j.job_id == "j48").unwrap();
        assert_eq!(failed.state, JobState::Failed);
        assert_eq!(
            failed.error.as_deref().map(|e| e.chars().count()),
            Some(300)
        );
        assert!(failed.error.as_deref().unwrap().starts_with("öö"));
        assert_eq!(failed.pool_id, "p");

        let pruned = s
            .prune(
                OffsetDateTime::now_utc() + time::Duration::minutes(5),
                false,
            )
            .await
            .unwrap();
        assert_eq!(pruned.len(), 25, "the finished ones");
        let left = s.list().await.unwrap();
        assert!(left.jobs.iter().all(|j| !j.state.is_terminal()));
        assert_eq!(left.jobs.len(), 26);
        let kept = s
            .prune(OffsetDateTime::now_utc() - time::Duration::days(1), false)
            .await
            .unwrap();
        assert!(kept.is_empty(), "younger than the cutoff");
    }

    /// An update against a missing container, or one that loses every round to
    /// other writers, ends with an error instead of trying forever.
    #[tokio::test(start_paused = true)]
    async fn updates_are_bounded() {
        use crate::testkit::sim::{SimFault, SimFaultAction};
        let sim = Arc::new(SimStore::new(SimConfig::instant()));
        let s = StateStore::new(sim.clone(), "ops", "state");
        let bounded = Duration::from_secs(600);
        let run = RunRef {
            job_id: "j1",
            run: "r1",
        };
        let r = tokio::time::timeout(bounded, s.lock_pool("p", &run, false, None))
            .await
            .expect("a missing container ends the update");
        assert!(
            matches!(r, Err(StateError::Storage(ref e)) if e.code.as_deref() == Some("ContainerNotFound")),
            "{r:?}"
        );

        s.ensure().await.unwrap();
        s.create(&JobDocument::replicate(JobId::parse("j1").unwrap(), spec()))
            .await
            .unwrap();
        assert!(matches!(
            s.lock_pool("p", &run, false, None).await.unwrap(),
            PoolClaim::Held(..)
        ));
        for target in ["jobs/j1", "pools/p"] {
            sim.inject(SimFault {
                operation: "put_blob",
                target_contains: target.into(),
                action: SimFaultAction::Fail(412, "ConditionNotMet"),
                times: 1000,
                from: Duration::ZERO,
            });
        }
        let r = tokio::time::timeout(
            bounded,
            s.update("j1", |d| {
                d.cancel_requested = true;
                true
            }),
        )
        .await
        .expect("a contended update ends");
        assert!(
            matches!(r, Err(StateError::Contended(_, MAX_UPDATE_ROUNDS))),
            "{r:?}"
        );
        let r = tokio::time::timeout(bounded, s.update_pool_held("p", &run, |r| r.sets.clear()))
            .await
            .expect("a contended pool update ends");
        assert!(
            matches!(r, Err(StateError::Contended(_, MAX_UPDATE_ROUNDS))),
            "{r:?}"
        );
    }

    /// The claim is per run: another run of the same instance is a competitor
    /// while its claim lasts; a lapsed claim, or one of an ended job, is not.
    #[test]
    fn claims_are_fenced_per_run_not_per_instance() {
        let now = OffsetDateTime::now_utc();
        let mut d = JobDocument::replicate(JobId::parse("j1").unwrap(), spec());
        d.enter(JobState::Running).unwrap();
        d.owner = Some(Owner {
            instance: "host-1".into(),
            run: Some("run-a".into()),
            until: now + time::Duration::seconds(30),
        });
        assert!(
            d.owned_by_another_run("run-b", now).is_some(),
            "same instance, other run"
        );
        assert!(
            d.owned_by_another_run("run-a", now).is_none(),
            "its own run"
        );
        assert!(d.held_by("run-a") && !d.held_by("run-b"));
        assert!(
            d.owned_by_another_run("run-b", now + time::Duration::seconds(31))
                .is_none(),
            "a lapsed claim may be taken"
        );
        // A claim written by an earlier version (no run) belongs to another run.
        d.owner.as_mut().unwrap().run = None;
        assert!(d.owned_by_another_run("run-a", now).is_some());
        d.enter(JobState::Completed).unwrap();
        assert!(d.owned_by_another_run("run-b", now).is_none());
        assert!(!d.held_by("run-a"), "an ended job is held by nobody");
    }

    /// A pool's lock belongs to one run: that run gets it again, another run of
    /// the same job (which holds the job's claim) takes it over, another job
    /// finds it busy; only the holder may change the image sets.
    #[tokio::test]
    async fn pool_locks_are_held_per_run() {
        let s = StateStore::new(
            Arc::new(SimStore::new(SimConfig::instant())),
            "ops",
            "state",
        );
        s.ensure().await.unwrap();
        let a = RunRef {
            job_id: "j1",
            run: "a",
        };
        let b = RunRef {
            job_id: "j1",
            run: "b",
        };
        let other = RunRef {
            job_id: "j2",
            run: "c",
        };
        assert!(matches!(
            s.lock_pool("p", &a, false, None).await.unwrap(),
            PoolClaim::Held(..)
        ));
        assert!(matches!(
            s.lock_pool("p", &a, false, None).await.unwrap(),
            PoolClaim::Held(..)
        ));
        assert!(
            matches!(s.lock_pool("p", &other, false, None).await.unwrap(), PoolClaim::Busy(l) if l.job_id == "j1")
        );
        s.update_pool_held("p", &a, |_| {}).await.unwrap();
        assert!(matches!(
            s.lock_pool("p", &b, false, None).await.unwrap(),
            PoolClaim::Held(..)
        ));
        assert!(
            matches!(
                s.update_pool_held("p", &a, |_| {}).await,
                Err(StateError::LockLost(_))
            ),
            "the run that lost the lock may not write the image sets"
        );
        s.unlock_pool("p", &a).await.unwrap();
        let (record, _) = s.load_pool("p").await.unwrap().unwrap();
        assert_eq!(
            record.lock.unwrap().run.as_deref(),
            Some("b"),
            "only the holder unlocks"
        );
        s.unlock_pool("p", &b).await.unwrap();
        assert!(s.load_pool("p").await.unwrap().unwrap().0.lock.is_none());
    }

    /// A job's state changes only along its life: never out of an end, never
    /// back to queued.
    #[test]
    fn only_legal_transitions() {
        use JobState::*;
        let doc = || JobDocument::replicate(JobId::parse("t").unwrap(), spec());
        for (path, ok) in [
            (vec![Running, Running, Completed], true),
            (vec![Failed], true),
            (vec![Cancelled], true),
            (vec![Running, Failed], true),
            (vec![Running, Completed, Running], false),
            (vec![Failed, Running], false),
            (vec![Running, Queued], false),
            (vec![Queued], false),
            (vec![Cancelled, Completed], false),
        ] {
            let mut d = doc();
            let r: Result<(), IllegalTransition> = path.iter().try_for_each(|s| d.enter(*s));
            assert_eq!(r.is_ok(), ok, "{path:?}: {r:?}");
        }
        let mut d = doc();
        d.enter(Running).unwrap();
        d.enter_phase(Phase::Copying).unwrap();
        d.enter(Completed).unwrap();
        assert_eq!(d.phase, None, "an ended job has no phase");
    }

    /// A replica moves only along its life: exactly these moves are allowed,
    /// every other one is refused and leaves the record as it was.
    #[test]
    fn replica_transitions_follow_the_table() {
        use ReplicaState::*;
        let all = [Pending, Copying, Verified, Failed, Cancelled];
        let legal = [
            (Pending, Copying),
            (Copying, Copying),
            (Verified, Copying),
            (Pending, Verified),
            (Copying, Verified),
            (Verified, Verified),
            (Pending, Failed),
            (Copying, Failed),
            (Pending, Cancelled),
            (Copying, Cancelled),
            (Verified, Cancelled),
        ];
        for from in all {
            for to in all {
                let mut r = ReplicaRecord {
                    index: 3,
                    account: "a".into(),
                    uri: String::new(),
                    blob: BlobPath::new("a", "c", "b"),
                    state: from,
                    copy_id: None,
                    bytes_copied: 0,
                    bytes_total: 0,
                    attempts: 0,
                    status_requests: 0,
                    error: None,
                    inherited: false,
                    method: None,
                    ranges_done: Vec::new(),
                    copied_from: None,
                };
                let ok = legal.contains(&(from, to));
                assert_eq!(r.enter(to).is_ok(), ok, "{from:?} -> {to:?}");
                assert_eq!(r.state, if ok { to } else { from });
            }
        }
    }

    /// A running job's phase only moves forward; a job that is not running has
    /// none to move; a new claim starts again at planning, with the claim's run.
    #[test]
    fn phases_only_move_forward_and_a_claim_starts_again() {
        let mut d = JobDocument::replicate(JobId::parse("t").unwrap(), spec());
        assert!(d.enter_phase(Phase::Copying).is_err(), "queued: no phase");
        let owner = |run: &str| Owner {
            instance: "i".into(),
            run: Some(run.into()),
            until: OffsetDateTime::now_utc(),
        };
        d.claim(owner("a")).unwrap();
        assert_eq!(d.phase(), Some(Phase::Planning));
        for p in [
            Phase::Seeding,
            Phase::Copying,
            Phase::Seeding,
            Phase::Publishing,
            Phase::HandingOff,
        ] {
            d.enter_phase(p).unwrap();
        }
        for back in [Phase::Planning, Phase::Copying, Phase::Publishing] {
            assert!(d.enter_phase(back).is_err(), "handing off -> {back:?}");
            assert_eq!(d.phase(), Some(Phase::HandingOff));
        }
        d.error = Some("will retry".into());
        d.claim(owner("b")).unwrap();
        assert_eq!(d.phase(), Some(Phase::Planning), "a new run plans again");
        assert_eq!(d.error, None);
        assert_eq!(d.owner().and_then(|o| o.run.as_deref()), Some("b"));
        d.renew_claim("a", OffsetDateTime::now_utc() + time::Duration::hours(1));
        let until = d.owner().unwrap().until;
        assert!(
            until < OffsetDateTime::now_utc() + time::Duration::minutes(1),
            "another run cannot renew the claim"
        );
        d.enter(JobState::Completed).unwrap();
        assert!(
            d.claim(owner("c")).is_err(),
            "an ended job is not claimed again"
        );
    }

    /// Documents written before job kinds were typed still read: a retire job
    /// (a placeholder spec with `retire_pool`) and a replication (no `kind`).
    #[test]
    fn documents_of_earlier_versions_still_read() {
        let legacy_retire = r#"{"job_id":"r1","spec":{"source":"","pool":{"id":"p","os":"windows","nodes":0}},
            "state":"completed","created_at":"2026-11-29T10:00:00Z","updated_at":"2026-11-29T10:00:00Z",
            "retire_pool":"p"}"#;
        let d: JobDocument = serde_json::from_str(legacy_retire).unwrap();
        assert_eq!(d.work, Work::Retire { pool: "p".into() });
        assert_eq!(d.state(), JobState::Completed);
        let legacy_job = r#"{"job_id":"j1","spec":{"source":"http://x/c/b.vhd","pool":{"id":"q","os":"linux","nodes":3}},
            "state":"running","created_at":"2026-11-29T10:00:00Z","updated_at":"2026-11-29T10:00:00Z"}"#;
        let d: JobDocument = serde_json::from_str(legacy_job).unwrap();
        assert_eq!(d.pool_id(), "q");
        assert!(matches!(d.work, Work::Replicate(_)));
        // New documents say their kind, and a retire job carries no spec.
        let r = JobDocument::retire(JobId::parse("r2").unwrap(), "p");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["kind"], "retire");
        assert!(v.get("spec").is_none());
        assert_eq!(serde_json::from_value::<JobDocument>(v).unwrap(), r);
        let bad = r#"{"job_id":"x","kind":"replicate","state":"queued","created_at":"2026-11-29T10:00:00Z","updated_at":"2026-11-29T10:00:00Z"}"#;
        assert!(serde_json::from_str::<JobDocument>(bad).is_err());
    }
}
