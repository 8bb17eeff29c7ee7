//! Publishing: the staged VHD becomes an Azure Compute Gallery image version
//! (or an existing version of the pool's image set gets the replica count the
//! nodes need), followed to its end with its replication progress. The
//! version's name is written to the job document before it is asked for, so a
//! resumed job follows the same version and never makes a second.

use super::*;
use crate::gallery::{arm::Operation, arm::OperationState, version_name, Gallery, GalleryError};
use crate::state::Publication;

/// Names taken by others before a job gives up finding one.
const MAX_NAME_ATTEMPTS: u32 = 10;

/// Longest pause between two looks at a replicating version.
const MAX_POLL: Duration = Duration::from_secs(30);

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
        match self.start_or_adopt(job, job_run, gallery).await? {
            Some(op) => self.follow(job, job_run, stop, gallery, op).await,
            None => self.published(job, job_run, gallery).await,
        }
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
            state: "pending".into(),
            progress: 0.0,
            operation: None,
            attempt: 0,
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
    ) -> Result<Option<Operation>, Failure> {
        let owner = plan::owner_tag(self.settings);
        let pool = &job.spec.pool.id;
        loop {
            let p = publication(job_run);
            let found = gallery
                .version(&p.version)
                .await
                .map_err(|e| JobError::Gallery(e.into()))?;
            let (state, op) = match found {
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
                    let body = gallery.version_body(&uri, &account, p.replicas, &tags);
                    tracing::info!(version = %p.version, replicas = p.replicas, "creating the gallery image version");
                    let op = gallery.create_version(&p.version, &body).await;
                    ("creating", op)
                }
                Some(v) if v.provisioning_state == "Failed" => {
                    return Err(JobError::Gallery(GalleryError::Failed(format!(
                        "image version {} is in state Failed; delete it (or retire the pool) and submit the job again",
                        p.version_id
                    )))
                    .into())
                }
                Some(v) if matches!(v.provisioning_state.as_str(), "Creating" | "Updating" | "Deleting" | "Migrating") => {
                    let op = p
                        .operation
                        .and_then(|o| serde_json::from_value(o).ok())
                        .unwrap_or_else(|| Operation::Resource(gallery.version_url(&p.version)));
                    return Ok(Some(op));
                }
                Some(v) if v.replicas != p.replicas => {
                    tracing::info!(version = %p.version, from = v.replicas, to = p.replicas, "changing the gallery replica count");
                    let op = gallery.set_replicas(&p.version, &v, p.replicas).await;
                    ("updating", op)
                }
                Some(_) => return Ok(None),
            };
            let op = op.map_err(|e| JobError::Gallery(e.into()))?;
            job_run.update_publication(|g| {
                g.state = state.into();
                g.operation = serde_json::to_value(&op).ok();
            });
            job_run.save().await.map_err(Failure::from_state)?;
            return Ok(Some(op));
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
    ) -> Result<(), Failure> {
        let name = publication(job_run).version;
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
                OperationState::Succeeded => return self.published(job, job_run, gallery).await,
                OperationState::Failed(m) => {
                    return Err(JobError::Gallery(GalleryError::Failed(format!(
                        "image version {name}: {m}"
                    )))
                    .into())
                }
                OperationState::Running(after) => after,
            };
            if let Ok(Some(v)) = gallery.version(&name).await {
                self.set_progress(job, job_run, v.progress);
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
            g.state = "succeeded".into();
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
