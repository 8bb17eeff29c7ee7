//! Retiring a pool: its image sets' replicas and snapshots deleted under the
//! pool's `retiring` mark, then its record.

use super::*;
use crate::job::JobId;

impl Engine {
    /// Runs a retire job: deletes every replica of the pool's image sets (only
    /// blobs whose metadata names the pool) and the sets' snapshots, then the
    /// pool's record. Idempotent, so a resumed retire finishes the work. Claimed
    /// per run like a replication: one run at a time, everywhere.
    pub async fn retire(&self, id: &JobId, pool: &str) -> Outcome {
        match self.reserve(id.as_str()) {
            Some(slot) => self.retire_reserved(slot, id, pool).await,
            None => Outcome::RunningHere,
        }
    }

    /// [`Engine::retire`] for a job whose run the caller registered already.
    #[tracing::instrument(skip_all, fields(job_id = %id, pool = %pool, run = tracing::field::Empty))]
    pub(crate) async fn retire_reserved(&self, slot: RunSlot, id: &JobId, pool: &str) -> Outcome {
        debug_assert_eq!(slot.job_id(), id.as_str());
        let run_id = run_id();
        tracing::Span::current().record("run", run_id.as_str());
        let (doc, etag) = match self
            .claim(id, &run_id, || JobDocument::retire(id.clone(), pool))
            .await
        {
            Ok(claimed) => claimed,
            Err(outcome) => return outcome,
        };
        let checkpoint = Checkpoint::new(&self.state, id.as_str(), etag, &run_id, self.lease());
        let job_run = JobRun::new(doc, checkpoint);
        let outcome = match self.retire_steps(pool, &job_run).await {
            Ok(note) => {
                job_run.note_image_set(Some(note));
                job_run.finish(JobState::Completed, None);
                Outcome::Completed
            }
            Err(Outcome::Failed(reason)) => {
                job_run.finish(JobState::Failed, Some(reason.clone()));
                Outcome::Failed(reason)
            }
            // Resumable: the next run may claim it at once.
            Err(outcome) => {
                job_run.release(None);
                outcome
            }
        };
        if let Err(e) = job_run.save().await {
            return match e {
                StateError::Lost(_, by) => self.lost(&by),
                e => JobError::job_state(e).into(),
            };
        }
        match &outcome {
            Outcome::Completed | Outcome::Failed(_) => {
                self.metrics.job_ended(if outcome == Outcome::Completed {
                    crate::metrics::Ended::Completed
                } else {
                    crate::metrics::Ended::Failed
                });
            }
            _ => {}
        }
        outcome
    }

    /// The retire's steps; returns the note of what was deleted.
    async fn retire_steps(&self, pool: &str, job_run: &JobRun<'_>) -> Result<String, Outcome> {
        let holder = job_run.run_ref();
        let (record, etag) = self.take_retiring_mark(pool, &holder).await?;
        self.refuse_if_a_job_is_waiting(pool, &holder).await?;
        tracing::info!("retiring the pool's image sets");
        let owner = plan::owner_tag(&self.settings);
        let doomed = retire_plan(self.store.as_ref(), &record, pool, &owner)
            .await
            .map_err(|e| Outcome::from(JobError::storage("image sets", e)))?;
        // The gallery versions first: they were made from the staged VHDs.
        let versions = self
            .retire_versions(&record, pool, &owner)
            .await
            .map_err(|e| Outcome::from(JobError::Gallery(e)))?;
        let mut deleted = 0;
        for blob in &doomed {
            match self.store.delete(blob).await {
                Ok(()) => deleted += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    let e = JobError::storage(format!("could not delete {blob}"), e);
                    return Err(Outcome::from(e));
                }
            }
        }
        // With the ETag of the mark: a record someone changed since is not ours
        // to delete (the retire runs again and sees what changed).
        self.state
            .delete_pool_if(pool, &etag)
            .await
            .map_err(|e| Outcome::from(JobError::state("pool record", e)))?;
        // The pool stage's observation of the pool goes with its record.
        if let Err(e) = self.state.delete_pool_nodes(pool).await {
            tracing::warn!(%pool, error = %e, "cannot delete the pool's node observation");
        }
        let note = format!(
            "retired pool {pool}: deleted {deleted} of {} blobs (replicas and snapshots){}",
            doomed.len(),
            if versions.is_empty() {
                String::new()
            } else {
                format!(" and gallery image versions {}", versions.join(", "))
            }
        );
        tracing::info!("{note}");
        Ok(note)
    }

    /// Takes the pool's `retiring` mark: no job of the pool changes its image sets
    /// while it is held. A job that holds it fails the retire; one that has ended
    /// is taken over. Returns the record as marked and its ETag.
    async fn take_retiring_mark(
        &self,
        pool: &str,
        holder: &crate::state::RunRef<'_>,
    ) -> Result<(PoolRecord, String), Outcome> {
        let mut stale: Option<String> = None;
        loop {
            match self
                .state
                .lock_pool(pool, holder, true, stale.as_deref())
                .await
            {
                Ok(PoolClaim::Held(record, etag)) => return Ok((record, etag)),
                Ok(PoolClaim::Busy(holder)) => match self.job_has_ended(&holder.job_id).await {
                    Ok(true) => stale = Some(holder.job_id),
                    Ok(false) => {
                        let busy = JobError::PoolBusy {
                            pool: pool.to_owned(),
                            job: holder.job_id,
                            state: JobState::Running.as_str(),
                        };
                        return Err(Outcome::from(busy));
                    }
                    Err(e) => {
                        let context = format!("job state of {}", holder.job_id);
                        return Err(JobError::state(context, e).into());
                    }
                },
                Err(e) => return Err(JobError::state("pool record", e).into()),
            }
        }
    }

    /// Never pulls the replicas from under a job of the pool that is still to
    /// run: with one queued or running, the mark is given up and the retire fails.
    async fn refuse_if_a_job_is_waiting(
        &self,
        pool: &str,
        holder: &crate::state::RunRef<'_>,
    ) -> Result<(), Outcome> {
        let busy = match self.state.list().await {
            Ok(listing) => listing.jobs.into_iter().find(|d| {
                d.kind == "replicate"
                    && d.pool_id == pool
                    && matches!(d.state, JobState::Queued | JobState::Running)
            }),
            Err(e) => return Err(JobError::job_state(e).into()),
        };
        let Some(d) = busy else {
            return Ok(());
        };
        let busy = JobError::PoolBusy {
            pool: pool.to_owned(),
            job: d.job_id,
            state: d.state.as_str(),
        };
        if let Err(e) = self.state.unlock_pool(pool, holder).await {
            tracing::warn!(error = %e, "could not clear the pool's retiring mark; the next job takes it over");
        }
        Err(Outcome::from(busy))
    }

    /// Deletes the gallery image versions of the pool's image sets that this
    /// deployment made for this pool (their tags say so; any other version is
    /// left alone and named in the log), each followed to its end. Returns the
    /// versions deleted.
    async fn retire_versions(
        &self,
        record: &PoolRecord,
        pool: &str,
        owner: &str,
    ) -> Result<Vec<String>, crate::gallery::GalleryError> {
        let names: Vec<String> = record
            .sets
            .iter()
            .filter_map(|s| s.gallery_version.as_ref().map(|v| v.version.clone()))
            .collect();
        if names.is_empty() {
            return Ok(names);
        }
        let Some(gallery) = self.gallery.as_deref() else {
            tracing::warn!(versions = ?names, "the pool has gallery image versions but [gallery] is not configured; they are left in place");
            return Ok(Vec::new());
        };
        let mut deleted = Vec::new();
        for name in names {
            match gallery.version(&name).await? {
                None => {}
                Some(v) if !v.is_ours(owner, pool) => {
                    tracing::warn!(version = %name, "a gallery image version of this name was not made by this deployment for this pool; left in place");
                }
                Some(_) => {
                    tracing::info!(version = %name, "deleting the gallery image version");
                    let op = gallery.delete_version(&name).await?;
                    gallery.wait(&op, |_| {}).await?;
                    deleted.push(name);
                }
            }
        }
        Ok(deleted)
    }
}

/// What retiring `pool` deletes: every replica of its image sets whose metadata
/// says this deployment (`owner`) made it for that pool (never anything else), then
/// the sets' source snapshots.
pub(crate) async fn retire_plan(
    store: &dyn BlobStore,
    record: &PoolRecord,
    pool: &str,
    owner: &str,
) -> Result<Vec<BlobPath>, ServiceError> {
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
                Err(e) => return Err(e),
            }
        }
        let snapshot = set.source_blob.at_snapshot(&set.source_snapshot);
        match store.properties(&snapshot).await {
            Ok(_) => out.push(snapshot),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
