//! The end of a run that did not complete: what the run made is deleted, and
//! nothing else. Only while the run still holds the job (a write under the
//! document's ETag first, renewed as the clean-up goes on), only blobs tagged
//! with the run, and never what the pool's image sets or a recorded hand-off
//! name: those go only by retire or gc.

use super::*;

impl Engine {
    /// Deletes what this run made, so a failed or cancelled job leaves nothing
    /// behind: its replicas (aborting copies still pending) and the source
    /// snapshot it took. Only while the run still holds the job, confirmed by a
    /// write under the document's ETag before the first delete and again as the
    /// lease wears on; only blobs tagged with this run; never a blob the pool's
    /// image sets name or that a hand-off recorded in the document names (those
    /// go only by retire or gc). [`Failure::Lost`] when another run holds the
    /// job: nothing is deleted then. What is not deleted here is left to gc.
    pub(super) async fn clean_up(
        &self,
        job_run: &JobRun<'_>,
        job: &ValidatedJob,
    ) -> Result<(), Failure> {
        match job_run.save().await {
            Ok(()) => {}
            Err(StateError::Lost(_, by)) => return Err(Failure::Lost(by)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot confirm that this run still holds the job; deleting nothing (gc takes what the job left)");
                return Ok(());
            }
        }
        let Some(protected) = self.protected(job, job_run).await else {
            return Ok(());
        };
        self.publisher()
            .withdraw_version(job_run, job, &protected.versions)
            .await;
        let protected = protected.blobs;
        let (replicas, snapshot) =
            job_run.read(|d| (d.replicas.clone(), d.source_snapshot.clone()));
        let renew_every = self.lease() / 3;
        for r in replicas {
            if job_run.due(renew_every) {
                job_run.save().await.map_err(Failure::from_state)?;
            }
            if !protected.contains(&r.blob) {
                self.delete_own_replica(&r, job, job_run.id()).await;
            }
            if job_run.replica_cancelled(r.index) {
                self.metrics.replica_ended(crate::metrics::Ended::Cancelled);
            }
        }
        if let Some(s) = snapshot {
            let blob = job.source.at_snapshot(&s);
            if !protected.contains(&blob) {
                self.delete_if_made_by(&blob, job, job_run.id(), "source snapshot")
                    .await;
            }
        }
        Ok(())
    }

    /// What no job's clean-up may delete: every blob (replica and snapshot) and
    /// gallery version the pool's image sets name, and everything a hand-off
    /// recorded in the job's document names. `None` when the pool's record
    /// cannot be read (nothing is deleted then).
    async fn protected(&self, job: &ValidatedJob, job_run: &JobRun<'_>) -> Option<Protected> {
        let mut protected = Protected::default();
        match self.state.load_pool(&job.spec.pool.id).await {
            Ok(record) => {
                for set in record.iter().flat_map(|(r, _)| &r.sets) {
                    protected
                        .blobs
                        .insert(set.source_blob.at_snapshot(&set.source_snapshot));
                    protected
                        .blobs
                        .extend(set.replicas.iter().map(|r| r.blob.clone()));
                    protected
                        .versions
                        .extend(set.gallery_version.iter().map(|v| v.version.clone()));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pool's image sets; deleting nothing (gc takes what the job left)");
                return None;
            }
        }
        job_run.read(|doc| {
            if doc.handoff.is_some() {
                protected
                    .blobs
                    .extend(doc.replicas.iter().map(|r| r.blob.clone()));
                if let Some(s) = &doc.source_snapshot {
                    protected.blobs.insert(job.source.at_snapshot(s));
                }
                protected
                    .versions
                    .extend(doc.gallery.iter().map(|g| g.version.clone()));
            }
        });
        Some(protected)
    }

    /// Aborts a pending copy into `r`'s blob and deletes the blob, if this run
    /// made it (its tags name this job and this run).
    async fn delete_own_replica(&self, r: &ReplicaRecord, job: &ValidatedJob, run: &str) {
        let p = match self.store.properties(&r.blob).await {
            Ok(p) if plan::made_by_run(&p.metadata, job.id.as_str(), run) => p,
            Ok(_) => return,
            Err(e) if e.is_not_found() => return,
            Err(e) => {
                tracing::warn!(blob = %r.blob, error = %e, "could not check a replica of an ended job");
                return;
            }
        };
        if let Some(c) = p.copy.filter(|c| c.state == CopyState::Pending) {
            if let Err(e) = self.store.abort_copy(&r.blob, &c.id).await {
                if !matches!(e.class, ErrorClass::Conflict | ErrorClass::NotFound) {
                    tracing::warn!(blob = %r.blob, error = %e, "could not abort copy");
                }
            }
        }
        if let Err(e) = self.store.delete(&r.blob).await {
            if !e.is_not_found() {
                tracing::warn!(blob = %r.blob, error = %e, "could not delete a replica of an ended job");
            }
        }
    }

    /// Deletes `blob` if its tags say this run of `job` made it.
    async fn delete_if_made_by(&self, blob: &BlobPath, job: &ValidatedJob, run: &str, what: &str) {
        match self.store.properties(blob).await {
            Ok(p) if plan::made_by_run(&p.metadata, job.id.as_str(), run) => {}
            Ok(_) => {
                tracing::info!(blob = %blob, "the {what} was made by an earlier run; left to gc");
                return;
            }
            Err(e) if e.is_not_found() => return,
            Err(e) => {
                tracing::warn!(blob = %blob, error = %e, "could not check the job's {what}");
                return;
            }
        }
        match self.store.delete(blob).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!(blob = %blob, error = %e, "could not delete the job's {what}"),
        }
    }
}

/// What a job's clean-up must leave alone.
#[derive(Debug, Default)]
struct Protected {
    blobs: std::collections::HashSet<BlobPath>,
    /// Gallery image version names.
    versions: std::collections::HashSet<String>,
}
