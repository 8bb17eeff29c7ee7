//! Executes a job: checks the source and accounts, freezes the source in a
//! snapshot, runs the server-side copies within each account's concurrency cap,
//! polls them on a progress-driven schedule, verifies every replica and hands the
//! set off. Progress is checkpointed to the job document, and every step can be
//! resumed from the document plus what storage says.

pub use crate::storage::limits;
pub mod poll;
pub mod schedule;

use crate::config::ValidatedSettings;
use crate::handoff::{HandOff, HandoffSinks};
use crate::job::ValidatedJob;
use crate::metrics::Metrics;
use crate::plan::{self, is_our_replica, replica_metadata};
use crate::state::{
    JobDocument, JobState, Owner, Phase, PoolClaim, PoolRecord, ReplicaRecord, ReplicaState,
    StateError, StateStore,
};
use crate::storage::{
    BlobKind, BlobPath, BlobProperties, BlobStore, CopyState, ErrorClass, StorageError,
};
use crate::vhd;
use futures::stream::{FuturesUnordered, StreamExt};
use limits::AccountLimits;
use schedule::{Scheduler, Strategy};
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
pub const MAX_REPLICA_ATTEMPTS: u32 = 3;

/// How often a running job considers writing its document: at once after a
/// replica changed state, else every `engine.checkpoint_seconds` for progress.
/// A cancel request written by another process is picked up on the next write.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);

/// Jobs this instance is running, by id, with their live documents.
pub type LiveJobs = Arc<Mutex<HashMap<String, Arc<Mutex<JobDocument>>>>>;

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
    /// A transient failure outlasted the request retries; run it again later.
    Retry(String),
}

#[derive(Debug)]
enum Failure {
    Fatal(String),
    Transient(String),
    Cancelled,
    Interrupted,
    Lost(String),
}

impl Failure {
    fn from_state(e: StateError) -> Self {
        match e {
            StateError::Lost(_, by) => Failure::Lost(by),
            other => Failure::Transient(format!("job state: {other}")),
        }
    }

    fn from_storage(context: &str, e: &StorageError) -> Self {
        match e.class {
            ErrorClass::Throttled | ErrorClass::Transient => {
                Failure::Transient(format!("{context}: {e}"))
            }
            ErrorClass::Denied => Failure::Fatal(format!(
                "{context}: access denied ({e}); check the account key or role assignment"
            )),
            _ => Failure::Fatal(format!("{context}: {e}")),
        }
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
    instance: String,
}

/// Writes a running job's document under its ETag, keeping a cancel request that
/// another writer added in the meantime.
struct Checkpoint<'a> {
    state: &'a StateStore,
    id: String,
    instance: &'a str,
    lease: Duration,
    etag: tokio::sync::Mutex<String>,
    last_saved: Mutex<Instant>,
    transition: std::sync::atomic::AtomicBool,
}

impl Checkpoint<'_> {
    fn new<'a>(
        state: &'a StateStore,
        id: &str,
        etag: String,
        instance: &'a str,
        lease: Duration,
    ) -> Checkpoint<'a> {
        Checkpoint {
            state,
            id: id.to_owned(),
            instance,
            lease,
            etag: tokio::sync::Mutex::new(etag),
            last_saved: Mutex::new(Instant::now()),
            transition: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A replica changed state: the next tick writes the document.
    fn note_transition(&self) {
        self.transition
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a tick should write: after a transition, or when progress alone
    /// has not been written for `every`.
    fn due(&self, every: Duration) -> bool {
        self.transition
            .swap(false, std::sync::atomic::Ordering::Relaxed)
            || self.last_saved.lock().expect("checkpoint lock").elapsed() >= every
    }

    async fn save(&self, live: &Mutex<JobDocument>) -> Result<(), StateError> {
        *self.last_saved.lock().expect("checkpoint lock") = Instant::now();
        let mut etag = self.etag.lock().await;
        for round in 0..crate::state::MAX_UPDATE_ROUNDS {
            if round > 0 {
                crate::state::contention_pause(round).await;
            }
            let mut doc = {
                let mut live = live.lock().expect("live doc lock");
                if !live.state().is_terminal() {
                    if let Some(owner) = live.owner.as_mut().filter(|o| o.instance == self.instance)
                    {
                        owner.until = OffsetDateTime::now_utc() + self.lease;
                    }
                }
                live.clone()
            };
            match self.state.save(&mut doc, &etag).await {
                Ok(new) => {
                    *etag = new;
                    return Ok(());
                }
                Err(StateError::Conflict(_)) => {
                    let (stored, new) = self
                        .state
                        .load(&self.id)
                        .await?
                        .ok_or_else(|| StateError::NotFound(self.id.clone()))?;
                    if let Some(other) = stored
                        .owner
                        .as_ref()
                        .filter(|o| o.instance != self.instance)
                    {
                        return Err(StateError::Lost(
                            stored.job_id.clone(),
                            other.instance.clone(),
                        ));
                    }
                    if stored.cancel_requested {
                        live.lock().expect("live doc lock").cancel_requested = true;
                    }
                    *etag = new;
                }
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Contended(
            format!("job {}", self.id),
            crate::state::MAX_UPDATE_ROUNDS,
        ))
    }
}

fn set_phase(live: &Mutex<JobDocument>, phase: Phase) {
    live.lock().expect("live doc lock").phase = Some(phase);
}

fn with_replica<T>(
    live: &Mutex<JobDocument>,
    index: u32,
    f: impl FnOnce(&mut ReplicaRecord) -> T,
) -> T {
    let mut doc = live.lock().expect("live doc lock");
    let rec = doc
        .replicas
        .iter_mut()
        .find(|r| r.index == index)
        .expect("replica records cover the plan");
    f(rec)
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
        Self {
            store,
            state,
            handoff,
            metrics,
            settings,
            limits,
            live: LiveJobs::default(),
            instance: instance_id(),
        }
    }

    /// This instance's id, as recorded in the documents of the jobs it runs.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(self.settings.engine.lease_seconds as u64)
    }

    /// The jobs running here, for the API's live view.
    pub fn live(&self) -> LiveJobs {
        self.live.clone()
    }

    /// Runs (or resumes) a job until it ends, `stop` fires, or it must be retried.
    #[tracing::instrument(skip_all, fields(job_id = %job.id))]
    pub async fn run(&self, job: &ValidatedJob, stop: CancellationToken) -> Outcome {
        let id = job.id.to_string();
        let loaded = match self.load_or_create(job).await {
            Ok(x) => x,
            Err(e) => return Outcome::Retry(format!("job state: {e}")),
        };
        let (mut doc, mut etag) = loaded;
        // Claim the job: an ETag-fenced write; whoever loses the race backs off.
        let mut round = 0;
        loop {
            round += 1;
            if round > crate::state::MAX_UPDATE_ROUNDS {
                return Outcome::Retry(format!(
                    "job {id} kept changing under {} attempts to claim it",
                    crate::state::MAX_UPDATE_ROUNDS
                ));
            }
            if doc.state().is_terminal() {
                return Outcome::AlreadyEnded(doc.state());
            }
            let now = OffsetDateTime::now_utc();
            if let Some(owner) = doc.owned_elsewhere(&self.instance, now) {
                tracing::info!(owner = %owner.instance, "job is running on another instance");
                return Outcome::OwnedElsewhere(owner.until);
            }
            if let Err(e) = doc.enter(JobState::Running) {
                tracing::error!(error = %e, "refusing an illegal state change");
                return Outcome::AlreadyEnded(doc.state());
            }
            doc.phase = Some(Phase::Planning);
            doc.error = None;
            doc.owner = Some(Owner {
                instance: self.instance.clone(),
                until: now + self.lease(),
            });
            match self.state.save(&mut doc, &etag).await {
                Ok(new) => {
                    etag = new;
                    break;
                }
                Err(StateError::Conflict(_)) => match self.state.load(&id).await {
                    Ok(Some((d, e))) => (doc, etag) = (d, e),
                    Ok(None) => return Outcome::Retry("job state vanished".into()),
                    Err(e) => return Outcome::Retry(format!("job state: {e}")),
                },
                Err(e) => return Outcome::Retry(format!("job state: {e}")),
            }
        }
        let live = Arc::new(Mutex::new(doc));
        let checkpoint = Checkpoint::new(&self.state, &id, etag, &self.instance, self.lease());
        // Registered while this run lasts, however it ends (an aborted task too):
        // the live view, the running gauge and the job's progress series.
        let _running = RunningJob::start(self, &id, live.clone());
        tracing::info!(replicas = job.replicas, accounts = ?job.accounts, "job running");

        let result = self.execute(job, &live, &checkpoint, &stop).await;
        let outcome = match result {
            Ok(()) => Outcome::Completed,
            Err(Failure::Fatal(reason)) => {
                self.clean_up(&live, job).await;
                self.finish(&live, JobState::Failed, Some(reason.clone()));
                Outcome::Failed(reason)
            }
            Err(Failure::Cancelled) => {
                self.clean_up(&live, job).await;
                self.finish(&live, JobState::Cancelled, None);
                Outcome::Cancelled
            }
            Err(Failure::Interrupted) => {
                // Let another instance resume at once rather than after the claim lapses.
                live.lock().expect("live doc lock").owner = None;
                Outcome::Interrupted
            }
            Err(Failure::Lost(by)) => {
                tracing::warn!(by = %by, "another instance took the job over; stopping here");
                return Outcome::Interrupted;
            }
            Err(Failure::Transient(reason)) => {
                live.lock().expect("live doc lock").error = Some(format!("will retry: {reason}"));
                Outcome::Retry(reason)
            }
        };
        if let Err(e) = checkpoint.save(&live).await {
            tracing::warn!(error = %e, "could not write the final job state; the job will be resumed");
            return match outcome {
                Outcome::Completed | Outcome::Failed(_) | Outcome::Cancelled => {
                    Outcome::Retry(format!("job state: {e}"))
                }
                other => other,
            };
        }
        // The job's end is on record: its pool is free for the next job or a
        // retire, which therefore always comes after this job's hand-off.
        if matches!(
            outcome,
            Outcome::Completed | Outcome::Failed(_) | Outcome::Cancelled
        ) {
            self.unlock_pool(job).await;
        }
        match &outcome {
            Outcome::Completed => tracing::info!("job completed"),
            Outcome::Failed(r) => tracing::warn!(reason = %r, "job failed"),
            Outcome::Cancelled => tracing::info!("job cancelled"),
            Outcome::Interrupted => tracing::info!("job interrupted; it will resume"),
            Outcome::Retry(r) => tracing::warn!(reason = %r, "job will be retried"),
            Outcome::AlreadyEnded(_) | Outcome::OwnedElsewhere(_) => {}
        }
        if let Some(label) = match &outcome {
            Outcome::Completed => Some("completed"),
            Outcome::Failed(_) => Some("failed"),
            Outcome::Cancelled => Some("cancelled"),
            _ => None,
        } {
            self.metrics.jobs_finished.with_label_values(&[label]).inc();
        }
        outcome
    }

    fn finish(&self, live: &Mutex<JobDocument>, state: JobState, error: Option<String>) {
        let mut doc = live.lock().expect("live doc lock");
        match doc.enter(state) {
            Ok(()) => doc.error = error,
            Err(e) => tracing::error!(error = %e, "refusing an illegal state change"),
        }
    }

    async fn load_or_create(
        &self,
        job: &ValidatedJob,
    ) -> Result<(JobDocument, String), StateError> {
        if let Some(found) = self.state.load(job.id.as_str()).await? {
            return Ok(found);
        }
        let doc = JobDocument::replicate(job.id.clone(), job.spec.clone());
        match self.state.create(&doc).await {
            Ok(etag) => Ok((doc, etag)),
            Err(StateError::Exists(_)) => self
                .state
                .load(job.id.as_str())
                .await?
                .ok_or_else(|| StateError::NotFound(job.id.to_string())),
            Err(e) => Err(e),
        }
    }

    async fn execute(
        &self,
        job: &ValidatedJob,
        live: &Arc<Mutex<JobDocument>>,
        checkpoint: &Checkpoint<'_>,
        stop: &CancellationToken,
    ) -> Result<(), Failure> {
        let save = Failure::from_state;
        if live.lock().expect("live doc lock").cancel_requested {
            return Err(Failure::Cancelled);
        }
        // Planning: the accounts suit Batch, the source is a fixed VHD page blob.
        for account in &job.accounts {
            let info = self
                .store
                .account_info(account)
                .await
                .map_err(|e| match e.class {
                    ErrorClass::NotFound | ErrorClass::Denied => {
                        Failure::Fatal(crate::storage::account_info_problem(account, &e))
                    }
                    _ => Failure::from_storage(&format!("account {account}"), &e),
                })?;
            info.suits_batch_images()
                .map_err(|m| Failure::Fatal(format!("account {account}: {m}")))?;
        }
        let source_url = &job.spec.source;
        let props = match self.store.properties(&job.source).await {
            Ok(p) => p,
            Err(e) if e.is_not_found() => {
                return Err(Failure::Fatal(format!(
                    "source {source_url} does not exist (HTTP 404); check the URL and that the blob was uploaded"
                )))
            }
            Err(e) => return Err(Failure::from_storage("source", &e)),
        };
        if props.kind != BlobKind::Page {
            return Err(Failure::Fatal(format!(
                "source {source_url} is a {:?} blob; a VHD for Batch must be a page blob (upload it as a page blob, e.g. az storage blob upload --type page)",
                props.kind
            )));
        }
        vhd::check_length(props.len)
            .map_err(|e| Failure::Fatal(format!("source {source_url}: {e}")))?;
        let (footer, _) = self
            .store
            .read(&job.source, Some(props.len - vhd::FOOTER_LEN..props.len))
            .await
            .map_err(|e| Failure::from_storage("source footer", &e))?;
        vhd::check_footer(&footer, props.len)
            .map_err(|e| Failure::Fatal(format!("source {source_url}: {e}")))?;

        // The pool's image set: a job for a pool that already has replicas of this
        // unchanged source tops the set up instead of copying it all again.
        let pool_id = job.spec.pool.id.clone();
        // From here until its hand-off is sent, this job alone may change the
        // pool's image sets (a retire or another job of the pool waits).
        let record = self.lock_pool(job, live, checkpoint, stop).await?;
        let fresh = live
            .lock()
            .expect("live doc lock")
            .source_snapshot
            .is_none();
        let mut inherited: Vec<crate::state::SetReplica> = Vec::new();
        if fresh {
            if let Some(set) = record.sets.last() {
                let same_source = set.source == job.spec.source;
                let snapshot_there = same_source
                    && set.source_etag == props.etag
                    && match self
                        .store
                        .properties(&job.source.at_snapshot(&set.source_snapshot))
                        .await
                    {
                        Ok(_) => true,
                        Err(e) if e.is_not_found() => false,
                        Err(e) => return Err(Failure::from_storage("image set snapshot", &e)),
                    };
                let note = if snapshot_there {
                    for r in &set.replicas {
                        match self.store.properties(&r.blob).await {
                            Ok(p)
                                if p.kind == BlobKind::Page
                                    && p.len == set.source_bytes
                                    && p.metadata.get(plan::META_POOL) == Some(&pool_id)
                                    && p.metadata.get(plan::META_SNAPSHOT)
                                        == Some(&set.source_snapshot) =>
                            {
                                inherited.push(r.clone())
                            }
                            Ok(_) => {}
                            Err(e) if e.is_not_found() => {}
                            Err(e) => return Err(Failure::from_storage("image set replica", &e)),
                        }
                    }
                    let mut doc = live.lock().expect("live doc lock");
                    doc.source_snapshot = Some(set.source_snapshot.clone());
                    doc.source_bytes = Some(set.source_bytes);
                    format!(
                        "top-up of the pool's image set of {}: {} of its {} replicas reused",
                        set.created_at.date(),
                        inherited.len().min(job.replicas as usize),
                        set.replicas.len()
                    )
                } else if same_source {
                    format!(
                        "new image set: the source changed since the pool's image set of {} (which stays until the pool is retired)",
                        set.created_at.date()
                    )
                } else {
                    format!(
                        "new image set: the pool's image set of {} is of another source, {} (it stays until the pool is retired)",
                        set.created_at.date(),
                        set.source
                    )
                };
                tracing::info!(pool = %pool_id, "{note}");
                live.lock().expect("live doc lock").image_set = Some(note);
            }
        }

        // Freeze the source: every replica comes from one snapshot.
        let existing_snapshot = live.lock().expect("live doc lock").source_snapshot.clone();
        let snapshot = match existing_snapshot {
            Some(s) => {
                match self.store.properties(&job.source.at_snapshot(&s)).await {
                    Ok(_) => s,
                    Err(e) if e.is_not_found() => {
                        return Err(Failure::Fatal(format!(
                            "the job's source snapshot {s} was deleted; resubmit the job under a new job_id"
                        )))
                    }
                    Err(e) => return Err(Failure::from_storage("source snapshot", &e)),
                }
            }
            None => {
                let s = self.take_snapshot(job).await?;
                {
                    let mut doc = live.lock().expect("live doc lock");
                    doc.source_snapshot = Some(s.clone());
                    doc.source_bytes = Some(props.len);
                    doc.source_etag = Some(props.etag.clone());
                }
                checkpoint.save(live).await.map_err(save)?;
                tracing::info!(snapshot = %s, bytes = props.len, "source frozen in a snapshot");
                s
            }
        };
        let source_len = live
            .lock()
            .expect("live doc lock")
            .source_bytes
            .unwrap_or(props.len);

        // The plan, recorded once so a resume keeps the same names and places:
        // replicas kept from the image set first, then new ones where fewest are.
        if live.lock().expect("live doc lock").replicas.is_empty() {
            let keep = inherited.len().min(job.replicas as usize);
            let (kept, surplus) = inherited.split_at(keep);
            let mut held: std::collections::BTreeMap<String, u32> = Default::default();
            for r in kept {
                *held.entry(r.account.clone()).or_default() += 1;
            }
            let capacity = job
                .accounts
                .iter()
                .map(|a| {
                    (
                        a.clone(),
                        self.settings.account(a).and_then(|c| c.max_replicas),
                    )
                })
                .collect();
            let places =
                plan::place_more(job.replicas - keep as u32, &job.accounts, &held, &capacity)
                    .map_err(|e| Failure::Fatal(e.to_string()))?;
            let mut records = Vec::with_capacity(job.replicas as usize);
            for (i, r) in kept.iter().enumerate() {
                records.push(ReplicaRecord {
                    index: i as u32,
                    account: r.account.clone(),
                    uri: r.uri.clone(),
                    blob: r.blob.clone(),
                    state: ReplicaState::Verified,
                    copy_id: None,
                    bytes_copied: source_len,
                    bytes_total: source_len,
                    attempts: 0,
                    status_requests: 0,
                    error: None,
                    inherited: true,
                });
            }
            for (i, account) in places.into_iter().enumerate() {
                let index = (keep + i) as u32;
                let blob = BlobPath::new(
                    &account,
                    &job.container,
                    &plan::replica_name(&pool_id, job.id.as_str(), &job.source.name, index),
                );
                let uri = self
                    .store
                    .blob_url(&blob)
                    .map(|u| u.to_string())
                    .unwrap_or_default();
                records.push(ReplicaRecord {
                    index,
                    account,
                    uri,
                    blob,
                    state: ReplicaState::Pending,
                    copy_id: None,
                    bytes_copied: 0,
                    bytes_total: source_len,
                    attempts: 0,
                    status_requests: 0,
                    error: None,
                    inherited: false,
                });
            }
            live.lock().expect("live doc lock").replicas = records;
            checkpoint.save(live).await.map_err(save)?;
            // A smaller pool: the set's surplus replicas go.
            for r in surplus {
                match self.store.delete(&r.blob).await {
                    Ok(()) => {
                        tracing::info!(blob = %r.blob, "surplus replica of a smaller pool deleted")
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) => {
                        tracing::warn!(blob = %r.blob, error = %e, "could not delete a surplus replica")
                    }
                }
            }
        }
        for account in &job.accounts {
            self.store
                .ensure_container(account, &job.container)
                .await
                .map_err(|e| {
                    Failure::from_storage(&format!("container {account}/{}", job.container), &e)
                })?;
        }

        // Copying: seed each account, grow inside it (or naive: all from the snapshot).
        self.copy_all(job, live, checkpoint, stop, &snapshot, source_len)
            .await?;

        // The pool's image set now holds exactly this job's replicas.
        set_phase(live, Phase::HandingOff);
        self.record_image_set(job, live, &snapshot, source_len)
            .await?;

        // Hand-off: recorded before it is sent, so a repeat sends the same thing.
        let recorded = live.lock().expect("live doc lock").handoff.clone();
        let handoff: HandOff = match recorded.and_then(|v| serde_json::from_value(v).ok()) {
            Some(h) => h,
            None => {
                let mut uris: Vec<(u32, String)> = live
                    .lock()
                    .expect("live doc lock")
                    .replicas
                    .iter()
                    .map(|r| (r.index, r.uri.clone()))
                    .collect();
                uris.sort();
                let h = HandOff::new(job, &snapshot, uris.into_iter().map(|(_, u)| u).collect());
                live.lock().expect("live doc lock").handoff =
                    Some(serde_json::to_value(&h).expect("hand-off serialises"));
                checkpoint.save(live).await.map_err(save)?;
                h
            }
        };
        self.handoff
            .deliver(&handoff)
            .await
            .map_err(|e| Failure::Transient(e.to_string()))?;
        self.finish(live, JobState::Completed, None);
        self.metrics
            .job_progress
            .with_label_values(&[job.id.as_str()])
            .set(1.0);
        Ok(())
    }

    /// Takes the pool's lock for this job, waiting while another job of the pool
    /// or its retirement holds it (a holder whose job has ended is taken over).
    /// The wait keeps this job's claim alive and heeds cancel and shutdown.
    /// Returns the pool's record as locked (its image sets, maybe none).
    async fn lock_pool(
        &self,
        job: &ValidatedJob,
        live: &Arc<Mutex<JobDocument>>,
        checkpoint: &Checkpoint<'_>,
        stop: &CancellationToken,
    ) -> Result<PoolRecord, Failure> {
        let pool = &job.spec.pool.id;
        let every =
            Duration::from_secs(self.settings.engine.checkpoint_seconds).min(self.lease() / 3);
        let mut stale: Option<String> = None;
        let mut waited = false;
        loop {
            let claim = self
                .state
                .lock_pool(pool, job.id.as_str(), false, stale.as_deref())
                .await
                .map_err(Failure::from_state)?;
            let holder = match claim {
                PoolClaim::Held(record, _) => {
                    if waited {
                        live.lock().expect("live doc lock").image_set = None;
                        tracing::info!(pool = %pool, "the pool is free; going on");
                    }
                    return Ok(record);
                }
                PoolClaim::Busy(holder) => holder,
            };
            if self.job_has_ended(&holder.job_id).await? {
                stale = Some(holder.job_id);
                continue;
            }
            let note = if holder.retiring {
                format!("waiting: pool {pool} is being retired by job {}; this job makes a new image set after it", holder.job_id)
            } else {
                format!("waiting for job {} of pool {pool} to end", holder.job_id)
            };
            if !waited {
                tracing::info!(pool = %pool, holder = %holder.job_id, "{note}");
                live.lock().expect("live doc lock").image_set = Some(note);
                checkpoint.note_transition();
                waited = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(POOL_WAIT) => {}
                _ = stop.cancelled() => return Err(Failure::Interrupted),
            }
            if checkpoint.due(every) {
                checkpoint.save(live).await.map_err(Failure::from_state)?;
            }
            if live.lock().expect("live doc lock").cancel_requested {
                return Err(Failure::Cancelled);
            }
        }
    }

    /// Whether the job holding a pool's lock has ended (or left no document).
    async fn job_has_ended(&self, job_id: &str) -> Result<bool, Failure> {
        match self.state.load(job_id).await {
            Ok(None) | Err(StateError::Corrupt(..)) => Ok(true),
            Ok(Some((d, _))) => Ok(d.state().is_terminal()),
            Err(e) => Err(Failure::from_state(e)),
        }
    }

    /// Gives up the job's lock on its pool. Best effort: a lock left by an ended
    /// job is taken over by the next one.
    async fn unlock_pool(&self, job: &ValidatedJob) {
        if let Err(e) = self
            .state
            .unlock_pool(&job.spec.pool.id, job.id.as_str())
            .await
        {
            tracing::warn!(error = %e, "could not release the pool's lock; the next job of the pool takes it over");
        }
    }

    /// Freezes the source in a snapshot tagged with the job. Create Snapshot is
    /// not idempotent: when its answer was lost, the snapshot the request may have
    /// made is looked up by its tag rather than a second one taken.
    async fn take_snapshot(&self, job: &ValidatedJob) -> Result<String, Failure> {
        let metadata = crate::storage::Metadata::from([
            (plan::META_OWNER.to_owned(), plan::owner_tag(&self.settings)),
            (plan::META_JOB.to_owned(), job.id.to_string()),
            (plan::META_POOL.to_owned(), job.spec.pool.id.clone()),
        ]);
        let lost = match self.store.snapshot(&job.source, &metadata).await {
            Ok(s) => return Ok(s),
            Err(e) if e.outcome_unknown() => e,
            Err(e) => return Err(Failure::from_storage("source snapshot", &e)),
        };
        let src = &job.source;
        let listed = self
            .store
            .list_detailed(&src.account, &src.container, &src.name, true)
            .await
            .map_err(|e| Failure::from_storage("source snapshot", &e))?;
        let made = listed.into_iter().find(|b| {
            b.name == src.name
                && b.snapshot.is_some()
                && b.metadata.get(plan::META_JOB).map(String::as_str) == Some(job.id.as_str())
        });
        match made.and_then(|b| b.snapshot) {
            Some(s) => {
                tracing::info!(snapshot = %s, "the lost answer's snapshot was found by its tag");
                Ok(s)
            }
            None => Err(Failure::from_storage("source snapshot", &lost)),
        }
    }

    /// Runs a retire job: deletes every replica of the pool's image sets (only
    /// blobs whose metadata names the pool) and the sets' snapshots, then the
    /// pool's record. Idempotent, so a resumed retire finishes the work.
    #[tracing::instrument(skip_all, fields(job_id = %id, pool = %pool))]
    pub async fn retire(&self, id: &crate::job::JobId, pool: &str) -> Outcome {
        let doc = match self.state.load(id.as_str()).await {
            Ok(Some((d, _))) => d,
            Ok(None) => {
                let d = JobDocument::retire(id.clone(), pool);
                match self.state.create(&d).await {
                    Ok(_) | Err(StateError::Exists(_)) => d,
                    Err(e) => return Outcome::Retry(format!("job state: {e}")),
                }
            }
            Err(e) => return Outcome::Retry(format!("job state: {e}")),
        };
        if doc.state().is_terminal() {
            return Outcome::AlreadyEnded(doc.state());
        }
        let mark = |state: JobState, error: Option<String>, note: Option<String>| {
            move |d: &mut JobDocument| {
                if let Err(e) = d.enter(state) {
                    tracing::error!(error = %e, "refusing an illegal state change");
                    return false;
                }
                d.phase = None;
                d.error = error.clone();
                if note.is_some() {
                    d.image_set = note.clone();
                }
                true
            }
        };
        if let Err(e) = self
            .state
            .update(id.as_str(), mark(JobState::Running, None, None))
            .await
        {
            return Outcome::Retry(format!("job state: {e}"));
        }
        // The pool's `retiring` mark: no job of the pool changes its image sets
        // while it is held, and a job that holds it makes the retire fail.
        let mut stale: Option<String> = None;
        let (record, etag) = loop {
            match self
                .state
                .lock_pool(pool, id.as_str(), true, stale.as_deref())
                .await
            {
                Ok(PoolClaim::Held(record, etag)) => break (record, etag),
                Ok(PoolClaim::Busy(holder)) => match self.job_has_ended(&holder.job_id).await {
                    Ok(true) => stale = Some(holder.job_id),
                    Ok(false) => {
                        let reason = format!(
                            "pool {pool} has job {} running; retire the pool after that job ends (cancel it first to stop it)",
                            holder.job_id
                        );
                        return self.fail_retire(id, reason).await;
                    }
                    Err(_) => return Outcome::Retry(format!("job state of {}", holder.job_id)),
                },
                Err(e) => return Outcome::Retry(format!("pool record: {e}")),
            }
        };
        // Never pull the replicas from under a job of the pool that is still to run.
        let busy = match self.state.list().await {
            Ok(listing) => listing.jobs.into_iter().find(|d| {
                d.kind == "replicate"
                    && d.pool_id == pool
                    && matches!(d.state, JobState::Queued | JobState::Running)
            }),
            Err(e) => return Outcome::Retry(format!("job state: {e}")),
        };
        if let Some(d) = busy {
            let reason = format!(
                "pool {pool} has job {} {}; retire the pool after that job ends (cancel it first to stop it)",
                d.job_id,
                d.state.as_str()
            );
            if let Err(e) = self.state.unlock_pool(pool, id.as_str()).await {
                tracing::warn!(error = %e, "could not clear the pool's retiring mark; the next job takes it over");
            }
            return self.fail_retire(id, reason).await;
        }
        tracing::info!("retiring the pool's image sets");
        let owner = plan::owner_tag(&self.settings);
        let plan = match retire_plan(self.store.as_ref(), &record, pool, &owner).await {
            Ok(p) => p,
            Err(e) => return Outcome::Retry(e),
        };
        let mut deleted = 0;
        for blob in &plan {
            match self.store.delete(blob).await {
                Ok(()) => deleted += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) if e.class.is_retryable() => return Outcome::Retry(e.to_string()),
                Err(e) => {
                    let reason = format!("could not delete {blob}: {e}");
                    return self.fail_retire(id, reason).await;
                }
            }
        }
        // With the ETag of the mark: a record someone changed since is not ours
        // to delete (the retire runs again and sees what changed).
        if let Err(e) = self.state.delete_pool_if(pool, &etag).await {
            return Outcome::Retry(format!("pool record: {e}"));
        }
        let note = format!(
            "retired pool {pool}: deleted {deleted} of {} blobs (replicas and snapshots)",
            plan.len()
        );
        tracing::info!("{note}");
        if let Err(e) = self
            .state
            .update(id.as_str(), mark(JobState::Completed, None, Some(note)))
            .await
        {
            return Outcome::Retry(format!("job state: {e}"));
        }
        self.metrics
            .jobs_finished
            .with_label_values(&["completed"])
            .inc();
        Outcome::Completed
    }

    /// Ends a retire job as failed with `reason`.
    async fn fail_retire(&self, id: &crate::job::JobId, reason: String) -> Outcome {
        let _ = self
            .state
            .update(id.as_str(), |d| {
                if d.enter(JobState::Failed).is_err() {
                    return false;
                }
                d.error = Some(reason.clone());
                true
            })
            .await;
        self.metrics
            .jobs_finished
            .with_label_values(&["failed"])
            .inc();
        Outcome::Failed(reason)
    }

    /// Writes the pool's image set: the current set (same snapshot) takes this job's
    /// replicas, or a new set starts.
    async fn record_image_set(
        &self,
        job: &ValidatedJob,
        live: &Mutex<JobDocument>,
        snapshot: &str,
        source_len: u64,
    ) -> Result<(), Failure> {
        let (mut records, etag) = {
            let doc = live.lock().expect("live doc lock");
            (doc.replicas.clone(), doc.source_etag.clone())
        };
        records.sort_by_key(|r| r.index);
        let now = OffsetDateTime::now_utc();
        self.state
            .update_pool(&job.spec.pool.id, |record| {
                let previous: HashMap<BlobPath, String> = record
                    .sets
                    .iter()
                    .flat_map(|s| {
                        s.replicas
                            .iter()
                            .map(|r| (r.blob.clone(), r.job_id.clone()))
                    })
                    .collect();
                let replicas = records
                    .iter()
                    .map(|r| crate::state::SetReplica {
                        account: r.account.clone(),
                        uri: r.uri.clone(),
                        blob: r.blob.clone(),
                        job_id: previous
                            .get(&r.blob)
                            .cloned()
                            .unwrap_or_else(|| job.id.to_string()),
                    })
                    .collect();
                match record
                    .sets
                    .iter_mut()
                    .find(|s| s.source_snapshot == snapshot)
                {
                    Some(set) => {
                        set.replicas = replicas;
                        set.updated_at = now;
                    }
                    None => record.sets.push(crate::state::ImageSet {
                        source: job.spec.source.clone(),
                        source_blob: job.source.clone(),
                        source_snapshot: snapshot.to_owned(),
                        source_etag: etag.clone().unwrap_or_default(),
                        source_bytes: source_len,
                        replicas,
                        created_at: now,
                        updated_at: now,
                    }),
                }
            })
            .await
            .map_err(Failure::from_state)?;
        Ok(())
    }

    /// Runs every copy of the job under the scheduler, the account gates and the
    /// per-source read cap, checkpointing and watching for a cancel request.
    async fn copy_all(
        &self,
        job: &ValidatedJob,
        live: &Arc<Mutex<JobDocument>>,
        checkpoint: &Checkpoint<'_>,
        stop: &CancellationToken,
        snapshot: &str,
        source_len: u64,
    ) -> Result<(), Failure> {
        let snapshot_blob = job.source.at_snapshot(snapshot);
        let records = live.lock().expect("live doc lock").replicas.clone();
        // Replicas recorded as verified are checked again: someone may have deleted one.
        let mut verified = Vec::new();
        let mut targets = Vec::new();
        for r in &records {
            let still_there = r.state == ReplicaState::Verified
                && match self.store.properties(&r.blob).await {
                    Ok(p) if r.inherited => {
                        p.metadata.get(plan::META_POOL) == Some(&job.spec.pool.id)
                            && p.metadata.get(plan::META_SNAPSHOT).map(String::as_str)
                                == Some(snapshot)
                            && p.len == source_len
                    }
                    Ok(p) => {
                        is_our_replica(&p.metadata, job, r.index, snapshot) && p.len == source_len
                    }
                    Err(e) if e.is_not_found() => false,
                    Err(e) => return Err(Failure::from_storage("replica check", &e)),
                };
            if still_there {
                verified.push((r.index, r.account.clone()));
            } else {
                targets.push((r.index, r.account.clone()));
            }
        }
        let strategy = self.settings.engine.strategy;
        let mut sched = Scheduler::new(
            strategy,
            self.settings.engine.max_reads_per_source,
            &job.source.account,
            targets,
            verified,
        );
        let blob_of = |index: u32| -> BlobPath {
            records
                .iter()
                .find(|r| r.index == index)
                .expect("record per replica")
                .blob
                .clone()
        };
        let phase = |sched: &Scheduler| {
            if strategy == Strategy::Fanout && !sched.seeded() {
                Phase::Seeding
            } else {
                Phase::Copying
            }
        };
        set_phase(live, phase(&sched));
        checkpoint
            .save(live)
            .await
            .map_err(|e| Failure::Transient(format!("job state: {e}")))?;

        let token = CancellationToken::new();
        let ctx = CopyContext {
            transition: &checkpoint.transition,
            job,
            live,
            snapshot,
            source_len,
            token: &token,
        };
        let mut copies = FuturesUnordered::new();
        let mut attempts: HashMap<u32, u32> = HashMap::new();
        let mut fatal: Vec<String> = Vec::new();
        let mut transient: Vec<String> = Vec::new();
        let mut cancelled = false;
        let mut lost: Option<String> = None;
        let mut ticker = tokio::time::interval(CHECKPOINT_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Progress is written at least every third of the claim's lease, which keeps
        // the claim alive.
        let progress_every =
            Duration::from_secs(self.settings.engine.checkpoint_seconds).min(self.lease() / 3);
        // A checkpoint write in flight: polled beside the copies, never awaited in
        // their place, so a slow write does not stall polling or starting copies.
        let mut saving: Option<futures::future::BoxFuture<'_, Result<(), StateError>>> = None;
        loop {
            // Start whatever may start now.
            for account in sched.waiting_accounts() {
                let Some(gate) = self.limits.gate(&account) else {
                    return Err(Failure::Fatal(format!(
                        "account {account} is not configured"
                    )));
                };
                while let Some(slot) = gate.try_acquire() {
                    let Some(pick) = sched.next_for(&account) else {
                        break;
                    };
                    let source = match sched.sources()[pick.source].replica {
                        None => snapshot_blob.clone(),
                        Some(i) => blob_of(i),
                    };
                    let record = records
                        .iter()
                        .find(|r| r.index == pick.index)
                        .expect("record")
                        .clone();
                    let ctx = &ctx;
                    let account = account.clone();
                    copies.push(async move {
                        let in_flight = crate::metrics::GaugeGuard::new(
                            self.metrics.copies_in_flight.with_label_values(&[&account]),
                        );
                        let started = tokio::time::Instant::now();
                        let result = self.copy_once(ctx, &record, &source).await;
                        drop(in_flight);
                        drop(slot);
                        (
                            pick,
                            account,
                            source.account.clone(),
                            started.elapsed(),
                            result,
                        )
                    });
                }
            }
            if copies.is_empty()
                && (sched.is_drained() || !fatal.is_empty() || cancelled || stop.is_cancelled())
            {
                break;
            }
            let waiting = sched.waiting_accounts();
            let gates_freed = async {
                let gates: Vec<_> = waiting.iter().filter_map(|a| self.limits.gate(a)).collect();
                if gates.is_empty() {
                    std::future::pending::<()>().await;
                }
                let waits = gates.iter().map(|g| Box::pin(g.released()));
                futures::future::select_all(waits).await;
            };
            tokio::select! {
                Some((pick, account, source_account, took, result)) = copies.next(), if !copies.is_empty() => {
                    let ok = result.is_ok();
                    sched.finished(pick, &account, ok);
                    checkpoint.note_transition();
                    match result {
                        Ok(copied_now) => {
                            if copied_now {
                                let kind = if source_account == account { "same_account" } else { "cross_account" };
                                self.metrics.copy_duration.with_label_values(&[kind]).observe(took.as_secs_f64());
                                self.metrics.copy_bytes.with_label_values(&[&account]).inc_by(source_len);
                            }
                            self.metrics.replicas_finished.with_label_values(&["completed"]).inc();
                            set_phase(live, phase(&sched));
                        }
                        Err(CopyError::Stop(Failure::Interrupted)) => {}
                        Err(CopyError::Stop(Failure::Lost(by))) => {
                            lost = Some(by);
                            sched.clear();
                            token.cancel();
                        }
                        Err(CopyError::Stop(Failure::Cancelled)) => cancelled = true,
                        Err(CopyError::Stop(Failure::Fatal(reason))) => {
                            self.replica_failed(live, pick.index, &reason);
                            fatal.push(reason);
                            sched.clear();
                        }
                        Err(CopyError::Retry(reason)) | Err(CopyError::Stop(Failure::Transient(reason))) => {
                            let n = attempts.entry(pick.index).or_default();
                            *n += 1;
                            if *n < MAX_REPLICA_ATTEMPTS {
                                tracing::warn!(replica = pick.index, %account, reason = %reason, "replica copy failed; trying again");
                                with_replica(live, pick.index, |r| r.error = Some(reason.clone()));
                                sched.requeue(pick.index, &account);
                            } else {
                                let reason = format!("replica {} in {account}: {reason} (gave up after {MAX_REPLICA_ATTEMPTS} tries)", pick.index);
                                self.replica_failed(live, pick.index, &reason);
                                transient.push(reason);
                                sched.clear();
                            }
                        }
                    }
                },
                written = in_flight(&mut saving), if saving.is_some() => {
                    saving = None;
                    if let Some(by) = self.checkpoint_written(written, checkpoint) {
                        lost = Some(by);
                        sched.clear();
                        token.cancel();
                    }
                },
                _ = ticker.tick() => {
                    if saving.is_none() && checkpoint.due(progress_every) {
                        saving = Some(Box::pin(checkpoint.save(live)));
                    }
                    let (progress, cancel_requested) = {
                        let doc = live.lock().expect("live doc lock");
                        (doc.progress(), doc.cancel_requested)
                    };
                    self.metrics.job_progress.with_label_values(&[job.id.as_str()]).set(progress);
                    if cancel_requested && !cancelled {
                        tracing::info!("cancel requested; aborting copies");
                        cancelled = true;
                        sched.clear();
                        token.cancel();
                    }
                },
                _ = stop.cancelled(), if !token.is_cancelled() => {
                    sched.clear();
                    token.cancel();
                },
                _ = gates_freed, if copies.is_empty() => {},
            }
        }
        // A write still in flight is dropped, not awaited: the job's next write
        // carries the same state and more (a write dropped after it landed only
        // costs that next write one ETag round).
        drop(saving);
        if let Some(by) = lost {
            return Err(Failure::Lost(by));
        }
        if cancelled || live.lock().expect("live doc lock").cancel_requested {
            return Err(Failure::Cancelled);
        }
        if stop.is_cancelled() {
            let written = checkpoint.save(live).await;
            if let Some(by) = self.checkpoint_written(written, checkpoint) {
                return Err(Failure::Lost(by));
            }
            return Err(Failure::Interrupted);
        }
        if !fatal.is_empty() {
            fatal.extend(transient);
            return Err(Failure::Fatal(format!(
                "{} of {} replicas failed: {}",
                fatal.len(),
                job.replicas,
                fatal.join("; ")
            )));
        }
        if !transient.is_empty() {
            return Err(Failure::Fatal(format!(
                "{} of {} replicas failed: {}",
                transient.len(),
                job.replicas,
                transient.join("; ")
            )));
        }
        Ok(())
    }

    /// Handles the end of a checkpoint write during copying: returns the instance
    /// that took the job over, if one did; a failed write is logged, counted and
    /// tried again at the next tick (the copies go on meanwhile).
    fn checkpoint_written(
        &self,
        written: Result<(), StateError>,
        checkpoint: &Checkpoint<'_>,
    ) -> Option<String> {
        match written {
            Ok(()) => None,
            Err(StateError::Lost(_, by)) => Some(by),
            Err(e) => {
                self.metrics.checkpoint_failures.inc();
                tracing::warn!(error = %e, "could not write a checkpoint; the copies go on and the next tick tries again");
                checkpoint.note_transition();
                None
            }
        }
    }

    fn replica_failed(&self, live: &Mutex<JobDocument>, index: u32, reason: &str) {
        with_replica(live, index, |r| {
            r.state = ReplicaState::Failed;
            r.error = Some(reason.to_owned());
        });
        self.metrics
            .replicas_finished
            .with_label_values(&["failed"])
            .inc();
    }

    /// One try: adopt, resume or start the copy, poll it, verify it. Returns
    /// whether bytes were copied by this call (false when the replica was already there).
    async fn copy_once(
        &self,
        ctx: &CopyContext<'_>,
        rec: &ReplicaRecord,
        source: &BlobPath,
    ) -> Result<bool, CopyError> {
        let dest = &rec.blob;
        let ours =
            |p: &BlobProperties| is_our_replica(&p.metadata, ctx.job, rec.index, ctx.snapshot);
        let existing = match self.store.properties(dest).await {
            Ok(p) => Some(p),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(CopyError::from_storage(&e)),
        };
        let mut copied_now = true;
        let copy_id = match existing
            .as_ref()
            .filter(|p| ours(p))
            .and_then(|p| p.copy.clone())
        {
            Some(c)
                if c.state == CopyState::Success
                    && self
                        .verify(ctx, rec, existing.as_ref().expect("checked"), &c.id)
                        .is_ok() =>
            {
                // Already there and sound (a resumed job): keep it.
                copied_now = false;
                return Ok(copied_now);
            }
            Some(c) if c.state == CopyState::Pending => c.id,
            seen => {
                let previous = seen.map(|c| c.id);
                self.start(ctx, rec, source, previous.as_deref()).await?
            }
        };
        self.poll_until_done(ctx, rec, &copy_id).await?;
        Ok(copied_now)
    }

    /// Starts the copy into `rec`'s blob. `previous` is the copy id the
    /// destination showed before (if any), so a copy this call started can be
    /// told from an older one.
    async fn start(
        &self,
        ctx: &CopyContext<'_>,
        rec: &ReplicaRecord,
        source: &BlobPath,
        previous: Option<&str>,
    ) -> Result<String, CopyError> {
        let dest = &rec.blob;
        let expiry = OffsetDateTime::now_utc()
            + time::Duration::hours(self.settings.engine.sas_hours as i64);
        let url = self
            .store
            .copy_source_url(source, &dest.account, expiry)
            .await
            .map_err(|e| CopyError::Stop(Failure::from_storage("copy source", &e)))?;
        let metadata = replica_metadata(
            ctx.job,
            rec.index,
            ctx.snapshot,
            &plan::owner_tag(&self.settings),
        );
        let started = match self.store.start_copy(dest, &url, &metadata).await {
            Ok(s) => s,
            // The answer was lost (a timeout, a broken connection, a 500): the copy
            // may be running. The destination says whether it started; only if it
            // did not is it started again.
            Err(e) if e.outcome_unknown() => match self.started_by_us(ctx, rec, previous).await? {
                Some(s) => {
                    tracing::info!(replica = rec.index, copy_id = %s.copy_id, "the copy of a lost Start Copy answer is running; adopting it");
                    s
                }
                None => self
                    .store
                    .start_copy(dest, &url, &metadata)
                    .await
                    .map_err(|e| CopyError::from_storage(&e))?,
            },
            Err(e) if e.class == ErrorClass::Conflict => {
                // A copy is pending there: ours (a retried request) or someone else's.
                let p = self
                    .store
                    .properties(dest)
                    .await
                    .map_err(|e| CopyError::from_storage(&e))?;
                match p.copy {
                    Some(c) if is_our_replica(&p.metadata, ctx.job, rec.index, ctx.snapshot) => {
                        crate::storage::CopyStarted {
                            copy_id: c.id,
                            state: c.state,
                        }
                    }
                    _ => {
                        return Err(CopyError::Retry(format!(
                            "{dest}: another copy is pending on the destination ({e})"
                        )))
                    }
                }
            }
            Err(e) => return Err(CopyError::from_storage(&e)),
        };
        with_replica(ctx.live, rec.index, |r| {
            r.copy_id = Some(started.copy_id.clone());
            r.attempts += 1;
            r.state = ReplicaState::Copying;
            r.bytes_total = ctx.source_len;
            r.error = None;
        });
        // The copy id must reach the document soon: cancel and resume use it.
        ctx.transition
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(replica = rec.index, account = %dest.account, copy_id = %started.copy_id, "copy started");
        Ok(started.copy_id)
    }

    /// A copy into `rec`'s blob that carries this job's tags for this replica and
    /// is not the one the destination showed before `previous`: the copy a Start
    /// Copy whose answer was lost started.
    async fn started_by_us(
        &self,
        ctx: &CopyContext<'_>,
        rec: &ReplicaRecord,
        previous: Option<&str>,
    ) -> Result<Option<crate::storage::CopyStarted>, CopyError> {
        let p = match self.store.properties(&rec.blob).await {
            Ok(p) => p,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(CopyError::from_storage(&e)),
        };
        if !is_our_replica(&p.metadata, ctx.job, rec.index, ctx.snapshot) {
            return Ok(None);
        }
        Ok(p.copy
            .filter(|c| matches!(c.state, CopyState::Pending | CopyState::Success))
            .filter(|c| Some(c.id.as_str()) != previous)
            .map(|c| crate::storage::CopyStarted {
                copy_id: c.id,
                state: c.state,
            }))
    }

    async fn poll_until_done(
        &self,
        ctx: &CopyContext<'_>,
        rec: &ReplicaRecord,
        copy_id: &str,
    ) -> Result<(), CopyError> {
        let min = Duration::from_millis(self.settings.engine.min_poll_ms);
        let max = Duration::from_millis(self.settings.engine.max_poll_ms);
        let mut wait = Duration::ZERO;
        let mut last_copied = 0u64;
        let mut last_at = Instant::now();
        loop {
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ctx.token.cancelled() => return Err(CopyError::Stop(Failure::Interrupted)),
                }
            }
            let p = self
                .store
                .properties(&rec.blob)
                .await
                .map_err(|e| CopyError::from_storage(&e))?;
            with_replica(ctx.live, rec.index, |r| r.status_requests += 1);
            let c = p.copy.clone().ok_or_else(|| {
                CopyError::Retry(format!("{}: the destination has no copy status", rec.blob))
            })?;
            if c.id != copy_id {
                return Err(CopyError::Retry(format!(
                    "{}: the copy id changed (another writer started a copy on this blob)",
                    rec.blob
                )));
            }
            match c.state {
                CopyState::Success => return self.verify(ctx, rec, &p, copy_id),
                CopyState::Failed | CopyState::Aborted => {
                    return Err(CopyError::Retry(format!(
                        "{}: copy {:?}{}",
                        rec.blob,
                        c.state,
                        c.description.map(|d| format!(" ({d})")).unwrap_or_default()
                    )))
                }
                CopyState::Pending => {
                    with_replica(ctx.live, rec.index, |r| {
                        r.bytes_copied = c.copied;
                        if c.total > 0 {
                            r.bytes_total = c.total;
                        }
                        r.state = ReplicaState::Copying;
                    });
                    let now = Instant::now();
                    wait = poll::next_poll(
                        wait,
                        c.copied.saturating_sub(last_copied),
                        now - last_at,
                        c.total.saturating_sub(c.copied),
                        min,
                        max,
                    );
                    last_copied = c.copied;
                    last_at = now;
                }
            }
        }
    }

    fn verify(
        &self,
        ctx: &CopyContext<'_>,
        rec: &ReplicaRecord,
        p: &BlobProperties,
        copy_id: &str,
    ) -> Result<(), CopyError> {
        let problem = if p.kind != BlobKind::Page {
            Some(format!("is a {:?} blob, not a page blob", p.kind))
        } else if p.len != ctx.source_len {
            Some(format!(
                "holds {} bytes, the source {}",
                p.len, ctx.source_len
            ))
        } else if p.copy.as_ref().map(|c| (c.id.as_str(), c.state))
            != Some((copy_id, CopyState::Success))
        {
            Some("does not show our successful copy".to_owned())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(CopyError::Retry(format!("{} {problem}", rec.blob)));
        }
        with_replica(ctx.live, rec.index, |r| {
            r.state = ReplicaState::Verified;
            r.copy_id = Some(copy_id.to_owned());
            r.bytes_copied = ctx.source_len;
            r.bytes_total = ctx.source_len;
            r.error = None;
        });
        tracing::info!(replica = rec.index, account = %rec.account, "replica verified");
        Ok(())
    }

    /// Aborts copies still pending and deletes what the job made: its replicas
    /// and its source snapshot, so a failed or cancelled job leaves nothing behind.
    async fn clean_up(&self, live: &Mutex<JobDocument>, job: &ValidatedJob) {
        let (replicas, snapshot) = {
            let doc = live.lock().expect("live doc lock");
            (doc.replicas.clone(), doc.source_snapshot.clone())
        };
        for r in replicas {
            if let (
                Some(copy_id),
                ReplicaState::Copying | ReplicaState::Pending | ReplicaState::Failed,
            ) = (&r.copy_id, r.state)
            {
                if let Err(e) = self.store.abort_copy(&r.blob, copy_id).await {
                    if !matches!(e.class, ErrorClass::Conflict | ErrorClass::NotFound) {
                        tracing::warn!(blob = %r.blob, error = %e, "could not abort copy");
                    }
                }
            }
            match self.store.properties(&r.blob).await {
                // Only blobs this job made: never someone else's at the same name.
                Ok(p)
                    if p.metadata.get(plan::META_JOB).map(String::as_str)
                        == Some(job.id.as_str()) =>
                {
                    if let Err(e) = self.store.delete(&r.blob).await {
                        if !e.is_not_found() {
                            tracing::warn!(blob = %r.blob, error = %e, "could not delete a replica of an ended job");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::warn!(blob = %r.blob, error = %e, "could not check a replica of an ended job")
                }
            }
            with_replica(live, r.index, |rec| {
                if !matches!(rec.state, ReplicaState::Failed) {
                    rec.state = ReplicaState::Cancelled;
                }
            });
            if !matches!(r.state, ReplicaState::Failed | ReplicaState::Verified) {
                self.metrics
                    .replicas_finished
                    .with_label_values(&["cancelled"])
                    .inc();
            }
        }
        if let Some(s) = snapshot {
            match self.store.delete(&job.source.at_snapshot(&s)).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::warn!(snapshot = %s, error = %e, "could not delete the job's source snapshot")
                }
            }
        }
    }
}

struct CopyContext<'a> {
    /// Set when a replica changes state, so the next tick writes the document.
    transition: &'a std::sync::atomic::AtomicBool,
    job: &'a ValidatedJob,
    live: &'a Arc<Mutex<JobDocument>>,
    snapshot: &'a str,
    source_len: u64,
    token: &'a CancellationToken,
}

enum CopyError {
    Retry(String),
    Stop(Failure),
}

impl CopyError {
    fn from_storage(e: &StorageError) -> Self {
        match e.class {
            ErrorClass::Denied => CopyError::Stop(Failure::from_storage("copy", e)),
            ErrorClass::Throttled | ErrorClass::Transient => {
                CopyError::Stop(Failure::Transient(e.to_string()))
            }
            _ => CopyError::Retry(e.to_string()),
        }
    }
}

/// A job running on this instance, for as long as the value lives: in the live
/// view, counted in `vhdrep_jobs{state="running"}`, its progress series
/// exported. Dropping it (the run ended, returned early or its task was aborted)
/// undoes all three.
struct RunningJob<'a> {
    engine: &'a Engine,
    id: String,
    _gauge: crate::metrics::GaugeGuard,
}

impl<'a> RunningJob<'a> {
    fn start(engine: &'a Engine, id: &str, live: Arc<Mutex<JobDocument>>) -> Self {
        engine
            .live
            .lock()
            .expect("live lock")
            .insert(id.to_owned(), live);
        Self {
            engine,
            id: id.to_owned(),
            _gauge: crate::metrics::GaugeGuard::new(
                engine.metrics.jobs.with_label_values(&["running"]),
            ),
        }
    }
}

impl Drop for RunningJob<'_> {
    fn drop(&mut self) {
        self.engine.live.lock().expect("live lock").remove(&self.id);
        let _ = self
            .engine
            .metrics
            .job_progress
            .remove_label_values(&[&self.id]);
    }
}

/// Waits for the future in `slot`, or forever when there is none (a
/// `select!` branch guarded by `slot.is_some()`).
async fn in_flight<F: std::future::Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
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

/// What retiring `pool` deletes: every replica of its image sets whose metadata
/// says this deployment (`owner`) made it for that pool (never anything else), then
/// the sets' source snapshots.
pub async fn retire_plan(
    store: &dyn BlobStore,
    record: &PoolRecord,
    pool: &str,
    owner: &str,
) -> Result<Vec<BlobPath>, String> {
    let mut out = Vec::new();
    for set in &record.sets {
        for r in &set.replicas {
            match store.properties(&r.blob).await {
                Ok(p)
                    if p.metadata.get(plan::META_POOL).map(String::as_str) == Some(pool)
                        && p.metadata.get(plan::META_OWNER).map(String::as_str) == Some(owner) =>
                {
                    out.push(r.blob.clone())
                }
                Ok(_) => {
                    tracing::warn!(blob = %r.blob, "not retiring a blob whose metadata names another pool")
                }
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let snapshot = set.source_blob.at_snapshot(&set.source_snapshot);
        match store.properties(&snapshot).await {
            Ok(_) => out.push(snapshot),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(out)
}
