//! Retiring a pool: its image sets' replicas and snapshots deleted under the
//! pool's `retiring` mark, then its record.

use super::*;

impl Engine {
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
