//! Preparing a job: the accounts and the source checked, the pool's lock taken,
//! what its image set offers, the source frozen in a snapshot, the plan recorded.

use super::*;

impl Engine {
    /// Every destination account suits Batch (standard, general purpose); an
    /// identity without a data role is told which role to assign.
    pub(super) async fn check_accounts(&self, job: &ValidatedJob) -> Result<(), Failure> {
        for account in &job.accounts {
            let info =
                self.store
                    .account_info(account)
                    .await
                    .map_err(|source| JobError::AccountInfo {
                        account: account.clone(),
                        source,
                    })?;
            info.suits_batch_images()
                .map_err(|reason| JobError::AccountUnsuitable {
                    account: account.clone(),
                    reason,
                })?;
        }
        Ok(())
    }

    /// The source is a page blob holding a fixed VHD of a length Azure allows;
    /// returns its properties.
    pub(super) async fn check_source(&self, job: &ValidatedJob) -> Result<BlobProperties, Failure> {
        let source_url = &job.spec.source;
        let props = match self.store.properties(&job.source).await {
            Ok(p) => p,
            Err(e) if e.is_not_found() => {
                return Err(JobError::SourceMissing(source_url.clone()).into())
            }
            Err(e) => return Err(Failure::from_storage("source", &e)),
        };
        if props.kind != BlobKind::Page {
            return Err(JobError::SourceNotPageBlob {
                url: source_url.clone(),
                kind: props.kind,
            }
            .into());
        }
        let not_vhd = |source| JobError::SourceNotVhd {
            url: source_url.clone(),
            source,
        };
        vhd::check_length(props.len).map_err(not_vhd)?;
        let (footer, _) = self
            .store
            .read(&job.source, Some(props.len - vhd::FOOTER_LEN..props.len))
            .await
            .map_err(|e| Failure::from_storage("source footer", &e))?;
        vhd::check_footer(&footer, props.len).map_err(not_vhd)?;
        Ok(props)
    }

    /// What the pool's current image set offers this job: its replicas, when the
    /// set is of this source, unchanged since (same ETag, snapshot still there),
    /// each still a page blob of the set's length tagged for the pool; and a note
    /// saying how the job relates to the set.
    pub(super) async fn inheritance(
        &self,
        job: &ValidatedJob,
        record: &PoolRecord,
        source: &BlobProperties,
    ) -> Result<Inheritance, Failure> {
        let Some(set) = record.sets.last() else {
            return Ok(Inheritance::default());
        };
        let same_source = set.source == job.spec.source;
        let snapshot_there = same_source
            && set.source_etag == source.etag
            && match self
                .store
                .properties(&job.source.at_snapshot(&set.source_snapshot))
                .await
            {
                Ok(_) => true,
                Err(e) if e.is_not_found() => false,
                Err(e) => return Err(Failure::from_storage("image set snapshot", &e)),
            };
        let created = set.created_at.date();
        if !snapshot_there {
            let note = if same_source {
                format!("new image set: the source changed since the pool's image set of {created} (which stays until the pool is retired)")
            } else {
                format!("new image set: the pool's image set of {created} is of another source, {} (it stays until the pool is retired)", set.source)
            };
            return Ok(Inheritance {
                note: Some(note),
                ..Default::default()
            });
        }
        let mut keepable = Vec::new();
        for r in &set.replicas {
            match self.store.properties(&r.blob).await {
                Ok(p)
                    if p.kind == BlobKind::Page
                        && p.len == set.source_bytes
                        && p.metadata.get(plan::META_POOL) == Some(&job.spec.pool.id)
                        && p.metadata.get(plan::META_SNAPSHOT) == Some(&set.source_snapshot) =>
                {
                    keepable.push(r.blob.clone())
                }
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(Failure::from_storage("image set replica", &e)),
            }
        }
        let note = format!(
            "top-up of the pool's image set of {created}: {} of its {} replicas reused",
            keepable.len().min(job.replicas as usize),
            set.replicas.len()
        );
        Ok(Inheritance {
            keepable,
            snapshot: Some((set.source_snapshot.clone(), set.source_bytes)),
            note: Some(note),
        })
    }

    /// A fresh job takes over what its pool's image set offers: the set's
    /// snapshot and the replicas it can keep. Returns those replicas.
    pub(super) async fn adopt_image_set(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        record: &PoolRecord,
        source: &BlobProperties,
    ) -> Result<Vec<BlobPath>, Failure> {
        let inheritance = self.inheritance(job, record, source).await?;
        if let Some((snapshot, bytes)) = inheritance.snapshot {
            job_run.adopt_snapshot(snapshot, bytes);
        }
        if let Some(note) = inheritance.note {
            tracing::info!(pool = %job.spec.pool.id, "{note}");
            job_run.note_image_set(Some(note));
        }
        Ok(inheritance.keepable)
    }

    /// Freezes the source: every replica comes from one snapshot, taken once and
    /// recorded (a resumed job checks it is still there).
    pub(super) async fn freeze_source(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        source: &BlobProperties,
    ) -> Result<String, Failure> {
        let existing = job_run.read(|d| d.source_snapshot.clone());
        if let Some(s) = existing {
            return match self.store.properties(&job.source.at_snapshot(&s)).await {
                Ok(_) => Ok(s),
                Err(e) if e.is_not_found() => Err(JobError::SnapshotDeleted(s).into()),
                Err(e) => Err(Failure::from_storage("source snapshot", &e)),
            };
        }
        let s = self.take_snapshot(job, job_run.id()).await?;
        job_run.frozen(s.clone(), source.len, source.etag.clone());
        job_run.save().await.map_err(Failure::from_state)?;
        tracing::info!(snapshot = %s, bytes = source.len, "source frozen in a snapshot");
        Ok(s)
    }

    /// Records the job's plan once ([`plan::plan`], what `vhd-replicator plan`
    /// prints), so a resume keeps the same names and places, then deletes the
    /// image set's surplus (a smaller pool) is left in place: an earlier
    /// hand-off named it, so only retire removes it.
    pub(super) async fn record_plan(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        keepable: &[BlobPath],
        source_len: u64,
    ) -> Result<(), Failure> {
        if job_run.read(|d| !d.replicas.is_empty()) {
            return Ok(());
        }
        let plan = plan::plan(job, keepable, &plan::capacity(job, &self.settings))
            .map_err(JobError::from)?;
        let records = plan
            .replicas
            .iter()
            .map(|r| ReplicaRecord {
                index: r.index,
                account: r.blob.account.clone(),
                uri: self
                    .store
                    .blob_url(&r.blob)
                    .map(|u| u.to_string())
                    .unwrap_or_default(),
                blob: r.blob.clone(),
                state: if r.kept {
                    ReplicaState::Verified
                } else {
                    ReplicaState::Pending
                },
                copy_id: None,
                bytes_copied: if r.kept { source_len } else { 0 },
                bytes_total: source_len,
                attempts: 0,
                status_requests: 0,
                error: None,
                inherited: r.kept,
                method: None,
                ranges_done: Vec::new(),
                copied_from: None,
            })
            .collect();
        job_run.plan(records);
        job_run.save().await.map_err(Failure::from_state)?;
        if !plan.surplus.is_empty() {
            tracing::info!(
                surplus = plan.surplus.len(),
                "the image set's surplus replicas (a smaller pool) are kept: an earlier hand-off named them; retire removes them"
            );
        }
        Ok(())
    }

    /// The job's container exists in each of its accounts.
    pub(super) async fn ensure_containers(&self, job: &ValidatedJob) -> Result<(), Failure> {
        for account in &job.accounts {
            self.store
                .ensure_container(account, &job.container)
                .await
                .map_err(|e| {
                    Failure::from_storage(format!("container {account}/{}", job.container), &e)
                })?;
        }
        Ok(())
    }

    /// What a job would make, read only (no lock, no snapshot, nothing written):
    /// the plan the job records if it starts now, and how it relates to its
    /// pool's image set. What `vhd-replicator plan` prints.
    pub(crate) async fn preview(
        &self,
        job: &ValidatedJob,
    ) -> Result<(plan::Plan, Option<String>), String> {
        let failure = |f: Failure| f.to_string();
        let source = self.check_source(job).await.map_err(failure)?;
        let record = self
            .state
            .load_pool(&job.spec.pool.id)
            .await
            .map_err(|e| e.to_string())?
            .map(|(r, _)| r)
            .unwrap_or_else(|| PoolRecord {
                pool_id: job.spec.pool.id.clone(),
                sets: Vec::new(),
                lock: None,
            });
        let inheritance = self
            .inheritance(job, &record, &source)
            .await
            .map_err(failure)?;
        let plan = plan::plan(
            job,
            &inheritance.keepable,
            &plan::capacity(job, &self.settings),
        )
        .map_err(|e| e.to_string())?;
        Ok((plan, inheritance.note))
    }

    /// Takes the pool's lock for this job, waiting while another job of the pool
    /// or its retirement holds it (a holder whose job has ended is taken over).
    /// The wait keeps this job's claim alive and heeds cancel and shutdown.
    /// Returns the pool's record as locked (its image sets, maybe none).
    pub(super) async fn lock_pool(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
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
                .lock_pool(pool, &job_run.run_ref(), false, stale.as_deref())
                .await
                .map_err(Failure::from_state)?;
            let holder = match claim {
                PoolClaim::Held(record, _) => {
                    if waited {
                        job_run.note_image_set(None);
                        tracing::info!(pool = %pool, "the pool is free; going on");
                    }
                    return Ok(record);
                }
                PoolClaim::Busy(holder) => holder,
            };
            if self
                .job_has_ended(&holder.job_id)
                .await
                .map_err(|e| JobError::state(format!("job state of {}", holder.job_id), e))?
            {
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
                job_run.note_image_set(Some(note));
                waited = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(POOL_WAIT) => {}
                _ = stop.cancelled() => return Err(Failure::Interrupted),
            }
            if job_run.due(every) {
                job_run.save().await.map_err(Failure::from_state)?;
            }
            if job_run.cancel_requested() {
                return Err(Failure::Cancelled);
            }
        }
    }

    /// Whether the job holding a pool's lock has ended (or left no document).
    pub(super) async fn job_has_ended(&self, job_id: &str) -> Result<bool, StateError> {
        match self.state.load(job_id).await {
            Ok(None) | Err(StateError::Corrupt(..)) => Ok(true),
            Ok(Some((d, _))) => Ok(d.state().is_terminal()),
            Err(e) => Err(e),
        }
    }

    /// Gives up the job's lock on its pool. Best effort: a lock left by an ended
    /// job is taken over by the next one.
    pub(super) async fn unlock_pool(&self, job: &ValidatedJob, job_run: &JobRun<'_>) {
        if let Err(e) = self
            .state
            .unlock_pool(&job.spec.pool.id, &job_run.run_ref())
            .await
        {
            tracing::warn!(error = %e, "could not release the pool's lock; the next job of the pool takes it over");
        }
    }

    /// Freezes the source in a snapshot tagged with the job. Create Snapshot is
    /// not idempotent: when its answer was lost, the snapshot the request may have
    /// made is looked up by its tag rather than a second one taken.
    pub(super) async fn take_snapshot(
        &self,
        job: &ValidatedJob,
        run: &str,
    ) -> Result<String, Failure> {
        let metadata = crate::storage::Metadata::from([
            (plan::META_OWNER.to_owned(), plan::owner_tag(&self.settings)),
            (plan::META_JOB.to_owned(), job.id.to_string()),
            (plan::META_POOL.to_owned(), job.spec.pool.id.clone()),
            (plan::META_RUN.to_owned(), run.to_owned()),
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
                && plan::made_by_run(&b.metadata, job.id.as_str(), run)
        });
        match made.and_then(|b| b.snapshot) {
            Some(s) => {
                tracing::info!(snapshot = %s, "the lost answer's snapshot was found by its tag");
                Ok(s)
            }
            None => Err(Failure::from_storage("source snapshot", &lost)),
        }
    }
}

/// What a pool's current image set offers a job.
#[derive(Debug, Default)]
pub(super) struct Inheritance {
    /// Replicas the job can keep, in the set's order.
    keepable: Vec<BlobPath>,
    /// The set's snapshot and its length, when the job can build on the set.
    snapshot: Option<(String, u64)>,
    /// How the job relates to the set, for its document.
    note: Option<String>,
}
