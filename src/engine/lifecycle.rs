//! A job's life on this instance: claimed, run phase by phase, ended with one
//! outcome, its end recorded; and what it registers while it runs.

use super::*;
use crate::metrics::{Ended, JobsGauge};

impl Engine {
    /// Runs (or resumes) a job until it ends, `stop` fires, or it must be
    /// retried; [`Outcome::RunningHere`] when this instance runs it already.
    pub async fn run(&self, job: &ValidatedJob, stop: CancellationToken) -> Outcome {
        match self.reserve(job.id.as_str()) {
            Some(slot) => self.run_reserved(slot, job, stop).await,
            None => Outcome::RunningHere,
        }
    }

    /// [`Engine::run`] for a job whose run the caller has registered already
    /// ([`Engine::reserve`]), as the intake does at the moment it takes a message.
    #[tracing::instrument(skip_all, fields(job_id = %job.id, run = tracing::field::Empty))]
    pub(crate) async fn run_reserved(
        &self,
        slot: RunSlot,
        job: &ValidatedJob,
        stop: CancellationToken,
    ) -> Outcome {
        debug_assert_eq!(slot.job_id(), job.id.as_str());
        let id = job.id.to_string();
        let run_id = run_id();
        tracing::Span::current().record("run", run_id.as_str());
        let fresh = || JobDocument::replicate(job.id.clone(), job.spec.clone());
        let (doc, etag) = match self.claim(&job.id, &run_id, fresh).await {
            Ok(claimed) => claimed,
            Err(outcome) => return outcome,
        };
        let checkpoint = Checkpoint::new(&self.state, &id, etag, &run_id, self.lease());
        let job_run = JobRun::new(doc, checkpoint);
        // Registered while this run lasts, however it ends (an aborted task too):
        // the live view, the running gauge and the job's progress series.
        let _running = RunningJob::start(self, &id, job_run.shared());
        tracing::info!(replicas = job.replicas, accounts = ?job.accounts, "job running");
        let result = self.execute(job, &job_run, &stop).await;
        let outcome = match result {
            Ok(()) => Outcome::Completed,
            Err(Failure::Job(e)) if !e.is_transient() => {
                let reason = e.to_string();
                if let Err(Failure::Lost(by)) = self.clean_up(&job_run, job).await {
                    return self.lost(&by);
                }
                job_run.finish(JobState::Failed, Some(reason.clone()));
                Outcome::Failed(reason)
            }
            Err(Failure::Cancelled) => {
                if let Err(Failure::Lost(by)) = self.clean_up(&job_run, job).await {
                    return self.lost(&by);
                }
                job_run.finish(JobState::Cancelled, None);
                Outcome::Cancelled
            }
            Err(Failure::Interrupted) => {
                // Let another run take it at once rather than after the claim lapses.
                job_run.release(None);
                Outcome::Interrupted
            }
            Err(Failure::Lost(by)) => return self.lost(&by),
            Err(Failure::Job(e)) => {
                let reason = e.to_string();
                // The next run (here or elsewhere) may claim it at once.
                job_run.release(Some(format!("will retry: {reason}")));
                Outcome::Retry(reason)
            }
        };
        self.conclude(job, &job_run, outcome).await
    }

    /// Another run holds the job now: this one touches nothing more.
    pub(super) fn lost(&self, by: &str) -> Outcome {
        tracing::warn!(by = %by, "another run took the job over; this run stops and touches nothing more");
        self.metrics.runs_lost.inc();
        Outcome::Interrupted
    }

    /// Claims the job for run `run` with an ETag-fenced write (whoever loses the
    /// race backs off): running, planning, owned by this run until the lease
    /// lapses. A live claim of any other run, on this instance or another, is
    /// respected. Returns the document and its ETag, or the outcome that ends
    /// this run. `fresh` is the document of a job seen for the first time.
    pub(super) async fn claim(
        &self,
        id: &crate::job::JobId,
        run: &str,
        fresh: impl Fn() -> JobDocument,
    ) -> Result<(JobDocument, String), Outcome> {
        let (mut doc, mut etag) = self
            .load_or_create(id, fresh)
            .await
            .map_err(|e| Outcome::from(JobError::job_state(e)))?;
        for _ in 0..crate::state::MAX_UPDATE_ROUNDS {
            if doc.state().is_terminal() {
                return Err(Outcome::AlreadyEnded(doc.state()));
            }
            let now = crate::state::claim_now();
            if let Some(owner) = doc.owned_by_another_run(run, now) {
                tracing::info!(owner = %owner.instance, owner_run = ?owner.run, "job is held by another run");
                return Err(Outcome::OwnedElsewhere(owner.until));
            }
            let owner = Owner {
                instance: self.instance.clone(),
                run: Some(run.to_owned()),
                until: now + self.lease(),
            };
            if let Err(e) = doc.claim(owner) {
                tracing::error!(error = %e, "refusing an illegal state change");
                return Err(Outcome::AlreadyEnded(doc.state()));
            }
            match self.state.save(&mut doc, &etag).await {
                Ok(new) => return Ok((doc, new)),
                Err(StateError::Conflict(_)) => match self.state.load(id.as_str()).await {
                    Ok(Some((d, e))) => (doc, etag) = (d, e),
                    Ok(None) => return Err(JobError::StateVanished.into()),
                    Err(e) => return Err(JobError::job_state(e).into()),
                },
                Err(e) => return Err(JobError::job_state(e).into()),
            }
        }
        Err(JobError::ClaimContended {
            job: id.to_string(),
            rounds: crate::state::MAX_UPDATE_ROUNDS,
        }
        .into())
    }

    /// Writes the run's end, frees the pool once an end is on record (so a
    /// retire or the next job of the pool always comes after this job's
    /// hand-off), and logs and counts the outcome.
    async fn conclude(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        outcome: Outcome,
    ) -> Outcome {
        if let Err(e) = job_run.save().await {
            tracing::warn!(error = %e, "could not write the final job state; the job will be resumed");
            return match outcome {
                Outcome::Completed | Outcome::Failed(_) | Outcome::Cancelled => {
                    JobError::job_state(e).into()
                }
                other => other,
            };
        }
        let ended = match &outcome {
            Outcome::Completed => Some(Ended::Completed),
            Outcome::Failed(_) => Some(Ended::Failed),
            Outcome::Cancelled => Some(Ended::Cancelled),
            _ => None,
        };
        if let Some(label) = ended {
            self.unlock_pool(job, job_run).await;
            self.metrics.job_ended(label);
        }
        match &outcome {
            Outcome::Completed => tracing::info!("job completed"),
            Outcome::Failed(r) => tracing::warn!(reason = %r, "job failed"),
            Outcome::Cancelled => tracing::info!("job cancelled"),
            Outcome::Interrupted => tracing::info!("job interrupted; it will resume"),
            Outcome::Retry(r) => tracing::warn!(reason = %r, "job will be retried"),
            Outcome::AlreadyEnded(_) | Outcome::OwnedElsewhere(_) | Outcome::RunningHere => {}
        }
        outcome
    }

    async fn load_or_create(
        &self,
        id: &crate::job::JobId,
        fresh: impl Fn() -> JobDocument,
    ) -> Result<(JobDocument, String), StateError> {
        if let Some(found) = self.state.load(id.as_str()).await? {
            return Ok(found);
        }
        let doc = fresh();
        match self.state.create(&doc).await {
            Ok(etag) => Ok((doc, etag)),
            Err(StateError::Exists(_)) => self
                .state
                .load(id.as_str())
                .await?
                .ok_or_else(|| StateError::NotFound(id.to_string())),
            Err(e) => Err(e),
        }
    }

    /// The job's phases, in order; each resumes from what the document and
    /// storage say.
    async fn execute(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        stop: &CancellationToken,
    ) -> Result<(), Failure> {
        if job_run.cancel_requested() {
            return Err(Failure::Cancelled);
        }
        self.check_accounts(job).await?;
        let source = self.check_source(job).await?;
        // What the gallery can be asked before any copy: it takes a VHD this
        // large, and the image definition (if there is one) can take it.
        if let Some(gallery) = self.gallery.as_deref().filter(|_| job.publish) {
            gallery
                .check_image(job.spec.pool.os, source.len)
                .await
                .map_err(JobError::Gallery)?;
        }
        // From here until its end is on record, this job alone may change the
        // pool's image sets (a retire or another job of the pool waits).
        let record = self.lock_pool(job, job_run, stop).await?;
        let fresh = job_run.read(|d| d.source_snapshot.is_none());
        let keepable = if fresh {
            self.adopt_image_set(job, job_run, &record, &source).await?
        } else {
            Vec::new()
        };
        let snapshot = self.freeze_source(job, job_run, &source).await?;
        let source_len = job_run.read(|d| d.source_bytes.unwrap_or(source.len));
        self.record_plan(job, job_run, &keepable, source_len)
            .await?;
        self.ensure_containers(job).await?;
        self.copier()
            .copy_all(job, job_run, stop, &snapshot, source_len)
            .await?;
        self.publisher()
            .publish(job, job_run, stop, &record)
            .await?;
        job_run.enter_phase(Phase::HandingOff);
        // Written under the claim before the pool's image set names the replicas:
        // a run that lost the job stops here.
        job_run.save().await.map_err(Failure::from_state)?;
        self.record_image_set(job, job_run, &snapshot, source_len)
            .await?;
        let handoff = self.hand_off(job, job_run, &snapshot).await?;
        if let Some(stager) = self.pool_stager() {
            job_run.enter_phase(Phase::PoolStage);
            stager.run(job, job_run, stop, &handoff).await?;
        }
        job_run.finish(JobState::Completed, None);
        self.metrics
            .job_progress
            .with_label_values(&[job.id.as_str()])
            .set(1.0);
        Ok(())
    }

    /// Sends the hand-off: recorded in the document before it is sent, so a
    /// repeat (after a crash) sends the same thing.
    async fn hand_off(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        snapshot: &str,
    ) -> Result<HandOff, Failure> {
        let recorded = job_run.read(|d| d.handoff.clone());
        let handoff: HandOff = match recorded.and_then(|v| serde_json::from_value(v).ok()) {
            Some(h) => h,
            None => {
                let mut uris: Vec<(u32, String)> = job_run.read(|d| {
                    d.replicas
                        .iter()
                        .map(|r| (r.index, r.uri.clone()))
                        .collect()
                });
                uris.sort();
                let mut h = HandOff::new(job, snapshot, uris.into_iter().map(|(_, u)| u).collect());
                let published = job_run.publication();
                if let Some(g) =
                    published.filter(|g| g.state == crate::state::PublicationState::Succeeded)
                {
                    h = h.published(job, &g.version_id, g.replicas);
                }
                job_run.record_handoff(serde_json::to_value(&h).expect("hand-off serialises"));
                job_run.save().await.map_err(Failure::from_state)?;
                h
            }
        };
        self.handoff
            .deliver(&handoff)
            .await
            .map_err(|e| Failure::from(JobError::from(e)))?;
        Ok(handoff)
    }

    /// Writes the pool's image set: the current set (same snapshot) takes this job's
    /// replicas, or a new set starts.
    async fn record_image_set(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        snapshot: &str,
        source_len: u64,
    ) -> Result<(), Failure> {
        let (mut records, etag, version) = job_run.read(|doc| {
            let version = doc.gallery.as_ref().map(|g| crate::state::SetVersion {
                version: g.version.clone(),
                version_id: g.version_id.clone(),
                replicas: g.replicas,
            });
            (doc.replicas.clone(), doc.source_etag.clone(), version)
        });
        records.sort_by_key(|r| r.index);
        let now = OffsetDateTime::now_utc();
        self.state
            .update_pool_held(&job.spec.pool.id, &job_run.run_ref(), |record| {
                let previous: HashMap<BlobPath, String> = record
                    .sets
                    .iter()
                    .flat_map(|s| {
                        s.replicas
                            .iter()
                            .map(|r| (r.blob.clone(), r.job_id.clone()))
                    })
                    .collect();
                let mut replicas: Vec<crate::state::SetReplica> = records
                    .iter()
                    .map(|r| crate::state::SetReplica {
                        account: r.account.clone(),
                        uri: r.uri.clone(),
                        blob: r.blob.clone(),
                        job_id: previous
                            .get(&r.blob)
                            .cloned()
                            .unwrap_or_else(|| job.id.to_string()),
                        surplus: false,
                    })
                    .collect();
                // What the set held beyond this job's replicas stays named (an
                // earlier hand-off named it): surplus, until retire.
                let surplus: Vec<crate::state::SetReplica> = record
                    .sets
                    .iter()
                    .filter(|s| s.source_snapshot == snapshot)
                    .flat_map(|s| s.replicas.iter())
                    .filter(|x| !records.iter().any(|r| r.blob == x.blob))
                    .map(|x| crate::state::SetReplica {
                        surplus: true,
                        ..x.clone()
                    })
                    .collect();
                replicas.extend(surplus);
                match record
                    .sets
                    .iter_mut()
                    .find(|s| s.source_snapshot == snapshot)
                {
                    Some(set) => {
                        set.replicas = replicas;
                        set.updated_at = now;
                        if version.is_some() {
                            set.gallery_version = version.clone();
                        }
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
                        gallery_version: version.clone(),
                    }),
                }
            })
            .await
            .map_err(Failure::from_state)?;
        Ok(())
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
            _gauge: crate::metrics::GaugeGuard::new(engine.metrics.jobs_gauge(JobsGauge::Running)),
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
        let _ = self
            .engine
            .metrics
            .gallery_replication
            .remove_label_values(&[&self.id]);
        let _ = self
            .engine
            .metrics
            .gallery_stalled
            .remove_label_values(&[&self.id]);
    }
}
