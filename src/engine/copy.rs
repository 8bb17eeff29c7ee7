//! Copying: every replica under the scheduler, the account gates and the
//! per-source read cap; each copy started (or adopted), polled on a schedule
//! that follows its progress, and verified; what a failed or cancelled job made
//! cleaned up.

use super::*;

impl Engine {
    /// Runs every copy of the job under the scheduler, the account gates and the
    /// per-source read cap, checkpointing and watching for a cancel request.
    pub(super) async fn copy_all(
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
    pub(super) async fn clean_up(&self, live: &Mutex<JobDocument>, job: &ValidatedJob) {
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

/// Waits for the future in `slot`, or forever when there is none (a
/// `select!` branch guarded by `slot.is_some()`).
async fn in_flight<F: std::future::Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}
