//! A job's document: its state, phase, replicas, claim and publication, and
//! the only transitions its life allows.

use super::stored::StoredDocument;
use crate::job::{JobId, JobSpec};
use crate::storage::BlobPath;
use serde::{Deserialize, Serialize};
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
    /// Creating or resizing the pool, and following its allocation.
    PoolStage,
}

impl Phase {
    const ALL: [Phase; 7] = [
        Phase::Planning,
        Phase::Seeding,
        Phase::Copying,
        Phase::Verifying,
        Phase::Publishing,
        Phase::HandingOff,
        Phase::PoolStage,
    ];

    /// Order of the phases: a running job never goes back to a lower rank.
    fn rank(self) -> u8 {
        match self {
            Phase::Planning => 0,
            Phase::Seeding | Phase::Copying | Phase::Verifying => 1,
            Phase::Publishing => 2,
            Phase::HandingOff => 3,
            Phase::PoolStage => 4,
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
            Phase::PoolStage => "pool_stage",
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
    pub(super) state: JobState,
    /// Phase while running.
    pub(super) phase: Option<Phase>,
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
    pub(super) owner: Option<Owner>,
    /// The gallery image version the job publishes (its name is fixed here
    /// before it is asked for, so a resumed job follows the same version).
    pub gallery: Option<Publication>,
    /// What the pool stage did with the job's pool (`[pool_stage]`).
    pub pool_stage: Option<PoolStage>,
    /// Relays the job made and has not deleted yet (short-lived same-account
    /// copies of the snapshot that seed other accounts).
    pub relays: Vec<BlobPath>,
    /// When the job first started running.
    pub started_at: Option<OffsetDateTime>,
    /// Bytes copied over time, one sample per checkpoint (the last few), for
    /// throughput and ETA.
    pub progress_log: Vec<crate::estimate::Sample>,
}

/// What the pool stage does with a job's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolAction {
    /// Pool - Add.
    Create,
    /// Pool - Resize.
    Resize,
    /// Nothing asked of Batch.
    None,
}

/// Where the pool stage stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolStageState {
    /// Deciding, or waiting for the pool to be steady before a resize.
    Waiting,
    /// The pool is allocating nodes.
    Resizing,
    /// The pool is steady at its target.
    Steady,
    /// The pool fell short (resize errors) or did not settle in time.
    Failed,
    /// Left alone, for the reason given.
    Skipped,
}

impl PoolStageState {
    /// Whether the stage is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            PoolStageState::Steady | PoolStageState::Failed | PoolStageState::Skipped
        )
    }

    /// The name in the job document and views.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolStageState::Waiting => "waiting",
            PoolStageState::Resizing => "resizing",
            PoolStageState::Steady => "steady",
            PoolStageState::Failed => "failed",
            PoolStageState::Skipped => "skipped",
        }
    }
}

/// The pool stage's record in a job document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStage {
    /// What it does.
    pub action: PoolAction,
    /// Where it stands.
    pub state: PoolStageState,
    /// The dedicated nodes asked for.
    pub target_nodes: u32,
    /// The dedicated nodes the pool has, last seen.
    pub current_nodes: u32,
    /// Batch's resize errors, in its own words.
    #[serde(default)]
    pub errors: Vec<String>,
    /// Why it was skipped, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The Pool - Add or Pool - Resize was answered (so a resumed stage never
    /// sends it again).
    #[serde(default)]
    pub requested: bool,
    /// When that request was answered: the allocation's deadline runs from here.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub requested_at: Option<OffsetDateTime>,
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
            pool_stage: None,
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
