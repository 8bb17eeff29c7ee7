//! Executes a job: checks the source and accounts, freezes the source in a
//! snapshot, runs the server-side copies within each account's concurrency cap,
//! polls them on a progress-driven schedule, verifies every replica and hands the
//! set off. Progress is checkpointed to the job document, and every step can be
//! resumed from the document plus what storage says.

pub mod poll;

use crate::config::ValidatedSettings;
use crate::handoff::{HandOff, HandoffSinks};
use crate::job::ValidatedJob;
use crate::metrics::Metrics;
use crate::plan::{self, is_our_replica, replica_metadata};
use crate::state::{
    JobDocument, JobState, Phase, ReplicaRecord, ReplicaState, StateError, StateStore,
};
use crate::storage::{
    BlobKind, BlobPath, BlobProperties, BlobStore, CopyState, ErrorClass, StorageError,
};
use crate::vhd;
use futures::stream::{FuturesUnordered, StreamExt};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Copies started for one replica before the job gives up on it.
pub const MAX_REPLICA_ATTEMPTS: u32 = 3;

/// How often a running job writes its document and looks for a cancel request.
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
}

impl Failure {
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
    slots: HashMap<String, Arc<Semaphore>>,
    live: LiveJobs,
}

/// Writes a running job's document under its ETag, keeping a cancel request that
/// another writer added in the meantime.
struct Checkpoint<'a> {
    state: &'a StateStore,
    id: String,
    etag: tokio::sync::Mutex<String>,
}

impl Checkpoint<'_> {
    async fn save(&self, live: &Mutex<JobDocument>) -> Result<(), StateError> {
        let mut etag = self.etag.lock().await;
        loop {
            let mut doc = live.lock().expect("live doc lock").clone();
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
                    if stored.cancel_requested {
                        live.lock().expect("live doc lock").cancel_requested = true;
                    }
                    *etag = new;
                }
                Err(e) => return Err(e),
            }
        }
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
    /// An engine over `store` (already rate-limited and instrumented).
    pub fn new(
        store: Arc<dyn BlobStore>,
        state: StateStore,
        handoff: HandoffSinks,
        metrics: Metrics,
        settings: Arc<ValidatedSettings>,
    ) -> Self {
        let slots = settings
            .accounts
            .iter()
            .map(|a| {
                (
                    a.name.clone(),
                    Arc::new(Semaphore::new(a.max_concurrent_copies as usize)),
                )
            })
            .collect();
        Self {
            store,
            state,
            handoff,
            metrics,
            settings,
            slots,
            live: LiveJobs::default(),
        }
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
        let (mut doc, etag) = loaded;
        if doc.state.is_terminal() {
            return Outcome::AlreadyEnded(doc.state);
        }
        doc.state = JobState::Running;
        doc.phase = Some(Phase::Planning);
        doc.error = None;
        let live = Arc::new(Mutex::new(doc));
        let checkpoint = Checkpoint {
            state: &self.state,
            id: id.clone(),
            etag: tokio::sync::Mutex::new(etag),
        };
        if let Err(e) = checkpoint.save(&live).await {
            return Outcome::Retry(format!("job state: {e}"));
        }
        self.live
            .lock()
            .expect("live lock")
            .insert(id.clone(), live.clone());
        self.metrics.jobs.with_label_values(&["running"]).inc();
        tracing::info!(replicas = job.replicas, accounts = ?job.accounts, "job running");

        let result = self.execute(job, &live, &checkpoint, &stop).await;
        let outcome = match result {
            Ok(()) => Outcome::Completed,
            Err(Failure::Fatal(reason)) => {
                self.finish(&live, JobState::Failed, Some(reason.clone()));
                Outcome::Failed(reason)
            }
            Err(Failure::Cancelled) => {
                self.clean_up_cancelled(&live).await;
                self.finish(&live, JobState::Cancelled, None);
                Outcome::Cancelled
            }
            Err(Failure::Interrupted) => Outcome::Interrupted,
            Err(Failure::Transient(reason)) => {
                live.lock().expect("live doc lock").error = Some(format!("will retry: {reason}"));
                Outcome::Retry(reason)
            }
        };
        if let Err(e) = checkpoint.save(&live).await {
            tracing::warn!(error = %e, "could not write the final job state; the job will be resumed");
            self.forget(&id);
            return match outcome {
                Outcome::Completed | Outcome::Failed(_) | Outcome::Cancelled => {
                    Outcome::Retry(format!("job state: {e}"))
                }
                other => other,
            };
        }
        self.forget(&id);
        match &outcome {
            Outcome::Completed => tracing::info!("job completed"),
            Outcome::Failed(r) => tracing::warn!(reason = %r, "job failed"),
            Outcome::Cancelled => tracing::info!("job cancelled"),
            Outcome::Interrupted => tracing::info!("job interrupted; it will resume"),
            Outcome::Retry(r) => tracing::warn!(reason = %r, "job will be retried"),
            Outcome::AlreadyEnded(_) => {}
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

    fn forget(&self, id: &str) {
        self.live.lock().expect("live lock").remove(id);
        self.metrics.jobs.with_label_values(&["running"]).dec();
        let _ = self.metrics.job_progress.remove_label_values(&[id]);
    }

    fn finish(&self, live: &Mutex<JobDocument>, state: JobState, error: Option<String>) {
        let mut doc = live.lock().expect("live doc lock");
        doc.state = state;
        doc.phase = None;
        doc.error = error;
    }

    async fn load_or_create(
        &self,
        job: &ValidatedJob,
    ) -> Result<(JobDocument, String), StateError> {
        if let Some(found) = self.state.load(job.id.as_str()).await? {
            return Ok(found);
        }
        let doc = JobDocument::queued(job.id.clone(), job.spec.clone());
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
        let save = |e: StateError| Failure::Transient(format!("job state: {e}"));
        if live.lock().expect("live doc lock").cancel_requested {
            return Err(Failure::Cancelled);
        }
        // Planning: the accounts suit Batch, the source is a fixed VHD page blob.
        for account in &job.accounts {
            let info = self
                .store
                .account_info(account)
                .await
                .map_err(|e| Failure::from_storage(&format!("account {account}"), &e))?;
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
                let s = self
                    .store
                    .snapshot(&job.source)
                    .await
                    .map_err(|e| Failure::from_storage("source snapshot", &e))?;
                {
                    let mut doc = live.lock().expect("live doc lock");
                    doc.source_snapshot = Some(s.clone());
                    doc.source_bytes = Some(props.len);
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

        // The plan, recorded once so a resume keeps the same names and places.
        let plan = plan::plan(job);
        {
            let mut doc = live.lock().expect("live doc lock");
            if doc.replicas.is_empty() {
                for r in &plan.replicas {
                    let uri = self
                        .store
                        .blob_url(&r.blob)
                        .map(|u| u.to_string())
                        .unwrap_or_default();
                    doc.replicas.push(ReplicaRecord {
                        index: r.index,
                        account: r.blob.account.clone(),
                        uri,
                        blob: r.blob.clone(),
                        state: ReplicaState::Pending,
                        copy_id: None,
                        bytes_copied: 0,
                        bytes_total: source_len,
                        attempts: 0,
                        status_requests: 0,
                        error: None,
                    });
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

        // Copying.
        set_phase(live, Phase::Copying);
        checkpoint.save(live).await.map_err(save)?;
        let cancel = stop.child_token();
        let user_cancel = CancellationToken::new();
        let copies_token = CancellationToken::new();
        let source_snapshot = job.source.at_snapshot(&snapshot);
        let pending: Vec<ReplicaRecord> = live
            .lock()
            .expect("live doc lock")
            .replicas
            .iter()
            .filter(|r| r.state != ReplicaState::Verified)
            .cloned()
            .collect();
        let mut copies: FuturesUnordered<_> = pending
            .into_iter()
            .map(|rec| {
                let ctx = CopyContext {
                    job,
                    live,
                    source: &source_snapshot,
                    snapshot: &snapshot,
                    source_len,
                    token: &copies_token,
                };
                async move { (rec.index, self.copy_replica(ctx, rec).await) }
            })
            .collect();
        let mut failures = Vec::new();
        let mut ticker = tokio::time::interval(CHECKPOINT_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                next = copies.next() => match next {
                    None => break,
                    Some((_, Ok(()))) => {}
                    Some((index, Err(f))) => {
                        if let Failure::Fatal(reason) | Failure::Transient(reason) = &f {
                            with_replica(live, index, |r| {
                                r.state = ReplicaState::Failed;
                                r.error = Some(reason.clone());
                            });
                            self.metrics.replicas_finished.with_label_values(&["failed"]).inc();
                        }
                        failures.push(f);
                    }
                },
                _ = ticker.tick() => {
                    let _ = checkpoint.save(live).await;
                    let doc = live.lock().expect("live doc lock").clone();
                    self.metrics.job_progress.with_label_values(&[job.id.as_str()]).set(doc.progress());
                    if doc.cancel_requested && !user_cancel.is_cancelled() {
                        tracing::info!("cancel requested; aborting copies");
                        user_cancel.cancel();
                        copies_token.cancel();
                    }
                },
                _ = cancel.cancelled(), if !copies_token.is_cancelled() => {
                    copies_token.cancel();
                }
            }
        }
        if user_cancel.is_cancelled() || live.lock().expect("live doc lock").cancel_requested {
            return Err(Failure::Cancelled);
        }
        if stop.is_cancelled() {
            let _ = checkpoint.save(live).await;
            return Err(Failure::Interrupted);
        }
        if let Some(f) = failures.iter().find(|f| matches!(f, Failure::Fatal(_))) {
            let reasons: Vec<String> = failures
                .iter()
                .filter_map(|f| match f {
                    Failure::Fatal(r) | Failure::Transient(r) => Some(r.clone()),
                    _ => None,
                })
                .collect();
            let _ = f;
            return Err(Failure::Fatal(format!(
                "{} of {} replicas failed: {}",
                reasons.len(),
                job.replicas,
                reasons.join("; ")
            )));
        }
        if let Some(Failure::Transient(r)) = failures.into_iter().next() {
            return Err(Failure::Transient(r));
        }

        // Hand-off: recorded before it is sent, so a repeat sends the same thing.
        set_phase(live, Phase::HandingOff);
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

    /// Copies one replica, with up to [`MAX_REPLICA_ATTEMPTS`] copies started.
    async fn copy_replica(&self, ctx: CopyContext<'_>, rec: ReplicaRecord) -> Result<(), Failure> {
        let slots =
            self.slots.get(&rec.account).cloned().ok_or_else(|| {
                Failure::Fatal(format!("account {} is not configured", rec.account))
            })?;
        let _permit = tokio::select! {
            p = slots.acquire_owned() => p.expect("semaphores are never closed"),
            _ = ctx.token.cancelled() => return Err(Failure::Interrupted),
        };
        let gauge = self
            .metrics
            .copies_in_flight
            .with_label_values(&[&rec.account]);
        gauge.inc();
        let started = Instant::now();
        let mut result = Err(Failure::Interrupted);
        for _ in 0..MAX_REPLICA_ATTEMPTS {
            match self.copy_once(&ctx, &rec).await {
                Ok(copied_now) => {
                    if copied_now {
                        let kind = if rec.account == ctx.source.account {
                            "same_account"
                        } else {
                            "cross_account"
                        };
                        self.metrics
                            .copy_duration
                            .with_label_values(&[kind])
                            .observe(started.elapsed().as_secs_f64());
                        self.metrics
                            .copy_bytes
                            .with_label_values(&[&rec.account])
                            .inc_by(ctx.source_len);
                    }
                    self.metrics
                        .replicas_finished
                        .with_label_values(&["completed"])
                        .inc();
                    result = Ok(());
                    break;
                }
                Err(CopyError::Retry(reason)) => {
                    tracing::warn!(replica = rec.index, account = %rec.account, reason = %reason, "replica copy failed; trying again");
                    with_replica(ctx.live, rec.index, |r| r.error = Some(reason.clone()));
                    result = Err(Failure::Fatal(format!(
                        "replica {} in {}: {reason} (gave up after {MAX_REPLICA_ATTEMPTS} copies)",
                        rec.index, rec.account
                    )));
                }
                Err(CopyError::Stop(f)) => {
                    result = Err(f);
                    break;
                }
            }
        }
        gauge.dec();
        result
    }

    /// One try: adopt, resume or start the copy, poll it, verify it. Returns
    /// whether bytes were copied by this call (false when the replica was already there).
    async fn copy_once(
        &self,
        ctx: &CopyContext<'_>,
        rec: &ReplicaRecord,
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
            _ => self.start(ctx, rec).await?,
        };
        self.poll_until_done(ctx, rec, &copy_id).await?;
        Ok(copied_now)
    }

    async fn start(&self, ctx: &CopyContext<'_>, rec: &ReplicaRecord) -> Result<String, CopyError> {
        let dest = &rec.blob;
        let expiry = OffsetDateTime::now_utc()
            + time::Duration::hours(self.settings.engine.sas_hours as i64);
        let url = self
            .store
            .copy_source_url(ctx.source, &dest.account, expiry)
            .await
            .map_err(|e| CopyError::Stop(Failure::from_storage("copy source", &e)))?;
        let metadata = replica_metadata(ctx.job, rec.index, ctx.snapshot);
        let started = match self.store.start_copy(dest, &url, &metadata).await {
            Ok(s) => s,
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
        tracing::debug!(replica = rec.index, account = %dest.account, copy_id = %started.copy_id, "copy started");
        Ok(started.copy_id)
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

    /// Aborts copies still pending and deletes the job's replicas.
    async fn clean_up_cancelled(&self, live: &Mutex<JobDocument>) {
        let replicas = live.lock().expect("live doc lock").replicas.clone();
        for r in replicas {
            if let Some(copy_id) = &r.copy_id {
                if r.state == ReplicaState::Copying {
                    if let Err(e) = self.store.abort_copy(&r.blob, copy_id).await {
                        if !matches!(e.class, ErrorClass::Conflict | ErrorClass::NotFound) {
                            tracing::warn!(blob = %r.blob, error = %e, "could not abort copy");
                        }
                    }
                }
            }
            match self.store.delete(&r.blob).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::warn!(blob = %r.blob, error = %e, "could not delete replica of a cancelled job")
                }
            }
            with_replica(live, r.index, |rec| {
                if rec.state != ReplicaState::Failed {
                    rec.state = ReplicaState::Cancelled;
                }
            });
            self.metrics
                .replicas_finished
                .with_label_values(&["cancelled"])
                .inc();
        }
    }
}

struct CopyContext<'a> {
    job: &'a ValidatedJob,
    live: &'a Arc<Mutex<JobDocument>>,
    source: &'a BlobPath,
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
