//! Publishing: the staged VHD becomes an Azure Compute Gallery image version
//! (or an existing version of the pool's image set gets the replica count the
//! nodes need), followed to its end with its replication progress. The
//! version's name is written to the job document before it is asked for, so a
//! resumed job follows the same version and never makes a second.

use super::*;
use crate::gallery::{arm::Operation, arm::OperationState, version_name, Gallery, GalleryError};
use crate::state::Publication;
use crate::state::PublicationState;

/// Names taken by others before a job gives up finding one.
const MAX_NAME_ATTEMPTS: u32 = 10;

/// Longest pause between two looks at a replicating version.
const MAX_POLL: Duration = Duration::from_secs(30);

/// Failed replications of one version a job recovers from (updated again,
/// then deleted and made again) before it fails.
const MAX_RECOVERIES: u32 = 2;

/// What to do next with the job's version.
enum Next {
    /// Follow this operation to its end.
    Follow(Operation),
    /// The version is there with the replicas the pool needs.
    Done,
    /// The version's replication failed (ARM's words).
    Failed(String),
}

/// The replica count to ask for next on the way from `current` (0: no
/// version yet) to `target`: at most `initial` at creation, then doubling (so
/// large counts never throttle replication), a smaller target at once.
pub(super) fn next_step(current: u32, target: u32, initial: u32) -> u32 {
    if current == 0 {
        return target.min(initial.max(1));
    }
    if current >= target {
        return target;
    }
    target.min(current.saturating_mul(2).max(initial))
}

/// Whether replication progress has stood still for too long.
#[derive(Debug)]
pub(super) struct Stall {
    progress: f64,
    since: tokio::time::Instant,
    stalled: bool,
}

impl Stall {
    pub(super) fn new(now: tokio::time::Instant) -> Self {
        Self {
            progress: -1.0,
            since: now,
            stalled: false,
        }
    }

    /// Progress seen at `now`; `Some(stalled)` when that changes whether it
    /// has stood still for `after` (never with `after` zero).
    pub(super) fn observe(
        &mut self,
        progress: f64,
        now: tokio::time::Instant,
        after: Duration,
    ) -> Option<bool> {
        if progress > self.progress {
            self.progress = progress;
            self.since = now;
        }
        let stalled = !after.is_zero() && now.duration_since(self.since) >= after;
        (stalled != self.stalled).then(|| {
            self.stalled = stalled;
            stalled
        })
    }
}

/// The publishing phase of a run: the gallery, the metrics and the settings
/// are all it reads from the engine; the run's document is reached only
/// through the [`JobRun`] it is given.
pub(super) struct Publisher<'a> {
    pub(super) gallery: Option<&'a Gallery>,
    pub(super) metrics: &'a Metrics,
    pub(super) settings: &'a ValidatedSettings,
}

impl Publisher<'_> {
    /// Publishes the job's staged VHD to the gallery, when the job publishes.
    pub(super) async fn publish(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        stop: &CancellationToken,
        record: &PoolRecord,
    ) -> Result<(), Failure> {
        let Some(gallery) = self.gallery.filter(|_| job.publish) else {
            return Ok(());
        };
        job_run.enter_phase(Phase::Publishing);
        self.name_version(job, job_run, gallery, record).await?;
        gallery
            .ensure_image(job.spec.pool.os)
            .await
            .map_err(JobError::Gallery)?;
        // Each pass asks for one step (the version made, a replica-count step,
        // a recovery) and follows it; the version is done when nothing is left.
        let mut recoveries = 0;
        loop {
            let failed = match self.start_or_adopt(job, job_run, gallery).await? {
                Next::Done => return self.published(job, job_run, gallery).await,
                Next::Follow(op) => match self.follow(job, job_run, stop, gallery, op).await? {
                    Ok(()) => continue,
                    Err(reason) => reason,
                },
                Next::Failed(reason) => reason,
            };
            recoveries += 1;
            if recoveries > MAX_RECOVERIES {
                let name = publication(job_run).version;
                return Err(JobError::Gallery(GalleryError::Failed(format!(
                    "image version {name}: replication failed {recoveries} times, the last: {failed}"
                )))
                .into());
            }
            self.recover(job_run, gallery, recoveries, &failed).await?;
        }
    }

    /// A failed replication, recovered as users do: the first time the version
    /// is updated again (the next pass asks for its replica count anew), the
    /// second time it is deleted and made again (the next pass creates it).
    /// Each step is written to the publication's history.
    async fn recover(
        &self,
        job_run: &JobRun<'_>,
        gallery: &Gallery,
        attempt: u32,
        failed: &str,
    ) -> Result<(), Failure> {
        let name = publication(job_run).version;
        let how = if attempt == 1 {
            "updating it again"
        } else {
            "deleting it and making it again"
        };
        tracing::warn!(version = %name, reason = %failed, attempt, "gallery replication failed; {how}");
        job_run.update_publication(|g| {
            g.history
                .push(format!("replication failed ({failed}); {how}"));
            g.state = PublicationState::Recovering;
            g.operation = None;
        });
        job_run.save().await.map_err(Failure::from_state)?;
        if attempt > 1 {
            let op = gallery
                .delete_version(&name)
                .await
                .map_err(|e| JobError::Gallery(e.into()))?;
            gallery.wait(&op, |_| {}).await.map_err(JobError::Gallery)?;
        }
        Ok(())
    }

    /// Fixes the version's name in the document: the pool's version of this
    /// image set when there is one (a grow or shrink changes its replicas),
    /// else a new name.
    async fn name_version(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        gallery: &Gallery,
        record: &PoolRecord,
    ) -> Result<(), Failure> {
        if job_run.publication().is_some() {
            return Ok(());
        }
        let (snapshot, staged) = job_run.read(|doc| {
            let staged = doc
                .replicas
                .iter()
                .min_by_key(|r| r.index)
                .map(|r| r.uri.clone())
                .unwrap_or_default();
            (doc.source_snapshot.clone().unwrap_or_default(), staged)
        });
        let existing = record
            .sets
            .iter()
            .find(|s| s.source_snapshot == snapshot)
            .and_then(|s| s.gallery_version.clone());
        let version = match existing {
            Some(v) => v.version,
            None => version_name(OffsetDateTime::now_utc(), 0),
        };
        job_run.name_publication(Publication {
            version_id: gallery.version_id(&version),
            version,
            replicas: gallery.config().replicas_for(job.spec.pool.nodes),
            staged_uri: staged,
            state: PublicationState::Pending,
            progress: 0.0,
            operation: None,
            attempt: 0,
            history: Vec::new(),
            stalled: false,
        });
        job_run.save().await.map_err(Failure::from_state)
    }

    /// Asks for the version (or its new replica count) unless it is under way
    /// already; returns the operation to follow, or `None` when nothing is left
    /// to do.
    async fn start_or_adopt(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        gallery: &Gallery,
    ) -> Result<Next, Failure> {
        let owner = plan::owner_tag(self.settings);
        let initial = gallery.config().settings.initial_replicas;
        let pool = &job.spec.pool.id;
        loop {
            let p = publication(job_run);
            let found = gallery
                .version(&p.version)
                .await
                .map_err(|e| JobError::Gallery(e.into()))?;
            let (state, op, step) = match found {
                Some(v) if !v.is_ours(&owner, pool) => {
                    self.next_name(job_run, gallery, &p).await?;
                    continue;
                }
                None => {
                    let (uri, account) = staged(job, job_run, &p)?;
                    let tags = [
                        (crate::gallery::TAG_OWNER, owner.clone()),
                        (crate::gallery::TAG_POOL, pool.clone()),
                        (crate::gallery::TAG_JOB, job.id.to_string()),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                    let first = next_step(0, p.replicas, initial);
                    let body = gallery.version_body(&uri, &account, first, &tags);
                    tracing::info!(version = %p.version, replicas = first, of = p.replicas, "creating the gallery image version");
                    let op = gallery.create_version(&p.version, &body).await;
                    (
                        PublicationState::Creating,
                        op,
                        format!("created with {first} of {} replicas", p.replicas),
                    )
                }
                // (A recovery under way updates it instead, below.)
                Some(v)
                    if v.provisioning_state == "Failed"
                        && p.state != PublicationState::Recovering =>
                {
                    return Ok(Next::Failed(format!(
                        "image version {} is in state Failed",
                        p.version_id
                    )))
                }
                Some(v)
                    if matches!(
                        v.provisioning_state.as_str(),
                        "Creating" | "Updating" | "Deleting" | "Migrating"
                    ) =>
                {
                    let op = p
                        .operation
                        .and_then(|o| serde_json::from_value(o).ok())
                        .unwrap_or_else(|| Operation::Resource(gallery.version_url(&p.version)));
                    return Ok(Next::Follow(op));
                }
                Some(v) if v.replicas != p.replicas || p.state == PublicationState::Recovering => {
                    let step = next_step(v.replicas, p.replicas, initial);
                    tracing::info!(version = %p.version, from = v.replicas, to = step, of = p.replicas, "changing the gallery replica count");
                    let op = gallery.set_replicas(&p.version, &v, step).await;
                    (
                        PublicationState::Updating,
                        op,
                        format!("replicas {} -> {step} of {}", v.replicas, p.replicas),
                    )
                }
                Some(_) => return Ok(Next::Done),
            };
            let op = op.map_err(|e| JobError::Gallery(e.into()))?;
            job_run.update_publication(|g| {
                g.state = state;
                g.operation = serde_json::to_value(&op).ok();
                g.history.push(step);
            });
            job_run.save().await.map_err(Failure::from_state)?;
            return Ok(Next::Follow(op));
        }
    }

    /// The name is someone else's version: take the next one.
    async fn next_name(
        &self,
        job_run: &JobRun<'_>,
        gallery: &Gallery,
        p: &Publication,
    ) -> Result<(), Failure> {
        if p.attempt + 1 >= MAX_NAME_ATTEMPTS {
            return Err(JobError::Gallery(GalleryError::Unsuitable(format!(
                "{MAX_NAME_ATTEMPTS} version names of image {} were taken by versions this deployment did not make for this pool; check the gallery's versions",
                gallery.config().settings.image
            )))
            .into());
        }
        tracing::warn!(version = %p.version, "that version name is taken by another pool or deployment; taking the next");
        job_run.update_publication(|g| {
            g.attempt += 1;
            g.version = version_name(OffsetDateTime::now_utc(), g.attempt);
            g.version_id = gallery.version_id(&g.version);
        });
        job_run.save().await.map_err(Failure::from_state)
    }

    /// Follows the operation to its end, reporting replication progress.
    async fn follow(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        stop: &CancellationToken,
        gallery: &Gallery,
        mut op: Operation,
    ) -> Result<Result<(), String>, Failure> {
        let name = publication(job_run).version;
        let stall_after = Duration::from_secs(gallery.config().settings.stall_minutes * 60);
        let mut stall = Stall::new(tokio::time::Instant::now());
        loop {
            let before = op.clone();
            let state = gallery
                .poll(&mut op)
                .await
                .map_err(|e| JobError::Gallery(e.into()))?;
            if op != before {
                // ARM named a new place to ask: a restart asks there too.
                job_run.update_publication(|g| g.operation = serde_json::to_value(&op).ok());
            }
            let after = match state {
                OperationState::Succeeded => return Ok(Ok(())),
                OperationState::Failed(m) => return Ok(Err(m)),
                OperationState::Running(after) => after,
            };
            if let Ok(Some(v)) = gallery.version(&name).await {
                self.set_progress(job, job_run, v.progress);
                let now = tokio::time::Instant::now();
                if let Some(stalled) = stall.observe(v.progress, now, stall_after) {
                    self.note_stall(job, job_run, &name, stalled, stall_after);
                }
            }
            job_run.save().await.map_err(Failure::from_state)?;
            if job_run.cancel_requested() {
                return Err(Failure::Cancelled);
            }
            let pause = after
                .unwrap_or(MAX_POLL)
                .clamp(Duration::from_millis(200), MAX_POLL);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return Err(Failure::Interrupted),
            }
        }
    }

    /// The version is there with its replicas: recorded as done.
    async fn published(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        gallery: &Gallery,
    ) -> Result<(), Failure> {
        let name = publication(job_run).version;
        let v = gallery
            .version(&name)
            .await
            .map_err(|e| JobError::Gallery(e.into()))?
            .ok_or_else(|| {
                JobError::Gallery(GalleryError::Failed(format!(
                    "image version {name} disappeared once it was made"
                )))
            })?;
        if v.provisioning_state != "Succeeded" {
            return Err(JobError::Gallery(GalleryError::Failed(format!(
                "image version {name} ended in state {}",
                v.provisioning_state
            )))
            .into());
        }
        self.set_progress(job, job_run, 1.0);
        job_run.update_publication(|g| {
            g.state = PublicationState::Succeeded;
            g.replicas = v.replicas;
            g.operation = None;
        });
        tracing::info!(version = %name, replicas = v.replicas, "the gallery image version is replicated");
        job_run.save().await.map_err(Failure::from_state)
    }

    /// A job that ends without completing withdraws the version it made itself
    /// (its tag names the job): nothing boots from it, and its VHD goes with
    /// the job. A version of an earlier job (a grow or shrink) stays.
    pub(super) async fn withdraw_version(
        &self,
        job_run: &JobRun<'_>,
        job: &ValidatedJob,
        keep: &std::collections::HashSet<String>,
    ) {
        let (Some(gallery), Some(p)) = (self.gallery, job_run.publication()) else {
            return;
        };
        if keep.contains(&p.version) {
            tracing::info!(version = %p.version, "the gallery image version is the pool's or was handed off; kept");
            return;
        }
        match gallery.version(&p.version).await {
            Ok(Some(v))
                if v.tags.get(crate::gallery::TAG_JOB).map(String::as_str)
                    == Some(job.id.as_str()) =>
            {
                match gallery.delete_version(&p.version).await {
                    Ok(_) => {
                        tracing::info!(version = %p.version, "deleting the gallery image version of the ended job")
                    }
                    Err(e) => {
                        tracing::warn!(version = %p.version, error = %e, "could not delete the gallery image version of the ended job")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(version = %p.version, error = %e, "could not check the gallery image version of the ended job")
            }
        }
    }

    /// Replication stood still for `after` (or moves again): on the status
    /// page, in the metric, in the log once each way.
    fn note_stall(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        name: &str,
        stalled: bool,
        after: Duration,
    ) {
        if stalled {
            tracing::warn!(version = %name, minutes = after.as_secs() / 60, "gallery replication has made no progress; still waiting");
        } else {
            tracing::info!(version = %name, "gallery replication moves again");
        }
        job_run.update_publication(|g| g.stalled = stalled);
        self.metrics
            .gallery_stalled
            .with_label_values(&[job.id.as_str()])
            .set(if stalled { 1.0 } else { 0.0 });
    }

    fn set_progress(&self, job: &ValidatedJob, job_run: &JobRun<'_>, progress: f64) {
        job_run.update_publication(|g| g.progress = progress);
        self.metrics
            .gallery_replication
            .with_label_values(&[job.id.as_str()])
            .set(progress);
    }
}

fn publication(job_run: &JobRun<'_>) -> Publication {
    job_run
        .publication()
        .expect("the version is named before it is asked for")
}

/// The staged VHD's URI and account.
fn staged(
    job: &ValidatedJob,
    job_run: &JobRun<'_>,
    p: &Publication,
) -> Result<(String, String), Failure> {
    job_run
        .read(|doc| {
            doc.replicas
                .iter()
                .find(|r| r.uri == p.staged_uri)
                .map(|r| (r.uri.clone(), r.account.clone()))
        })
        .ok_or_else(|| {
            JobError::Gallery(GalleryError::Unsuitable(format!(
                "job {} has no staged VHD {} to make the image version from",
                job.id, p.staged_uri
            )))
            .into()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version is made with a few replicas and raised by doubling to the
    /// pool's count; a smaller count is asked for at once.
    #[test]
    fn replica_counts_rise_in_doubling_steps_from_a_few() {
        let path = |target: u32, initial: u32| {
            let mut at = 0;
            let mut steps = Vec::new();
            while at != target {
                at = next_step(at, target, initial);
                steps.push(at);
            }
            steps
        };
        assert_eq!(path(40, 5), [5, 10, 20, 40]);
        assert_eq!(path(100, 5), [5, 10, 20, 40, 80, 100]);
        assert_eq!(path(3, 5), [3]);
        assert_eq!(next_step(4, 12, 5), 8);
        assert_eq!(
            next_step(2, 12, 5),
            5,
            "never a smaller step than the first"
        );
        assert_eq!(next_step(12, 4, 5), 4, "fewer replicas at once");
    }

    /// Standing still for the stall time is reported once, moving again once;
    /// with no stall time, never.
    #[test]
    fn a_stall_is_reported_once_each_way() {
        let t0 = tokio::time::Instant::now();
        let min = Duration::from_secs(60);
        let after = Duration::from_secs(30 * 60);
        let mut s = Stall::new(t0);
        assert_eq!(s.observe(0.1, t0, after), None);
        assert_eq!(s.observe(0.1, t0 + 29 * min, after), None);
        assert_eq!(s.observe(0.1, t0 + 30 * min, after), Some(true));
        assert_eq!(s.observe(0.1, t0 + 40 * min, after), None, "said once");
        assert_eq!(s.observe(0.2, t0 + 41 * min, after), Some(false));
        let mut never = Stall::new(t0);
        never.observe(0.1, t0, Duration::ZERO);
        assert_eq!(never.observe(0.1, t0 + 600 * min, Duration::ZERO), None);
    }
}
