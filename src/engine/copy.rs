//! Copying: every replica under the scheduler, the account gates and the
//! per-source read cap; each copy started (or adopted), polled on a schedule
//! that follows its progress, and verified; what a failed or cancelled job made
//! cleaned up.

use super::copier::{Copier, CopyContext, CopyError};
use super::*;
use crate::metrics::{CopyKind, Ended};

impl Copier<'_> {
    /// Runs every copy of the job under the scheduler, the account gates and the
    /// per-source read cap, checkpointing and watching for a cancel request.
    pub(super) async fn copy_all(
        &self,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        stop: &CancellationToken,
        snapshot: &str,
        source_len: u64,
    ) -> Result<(), Failure> {
        let records = job_run.read(|d| d.replicas.clone());
        let (verified, targets) = self.recheck(job, &records, snapshot, source_len).await?;
        self.forget_earlier_relays(job, job_run);
        let strategy = self.settings.engine.strategy;
        let mut sched = Scheduler::new(
            strategy,
            self.settings.engine.max_reads_per_source,
            &job.source.account,
            targets,
            verified,
        );
        if self.settings.engine.relays {
            sched.enable_relays(self.relay_room(job, &records));
        }
        let mut run = CopyRun {
            sched,
            relay_blobs: HashMap::new(),
            fanout: strategy == Strategy::Fanout,
            attempts: HashMap::new(),
            fatal: Vec::new(),
            transient: Vec::new(),
            cancelled: false,
            lost: None,
        };
        job_run.enter_phase(run.phase());
        job_run
            .save()
            .await
            .map_err(|e| Failure::from(JobError::job_state(e)))?;
        let token = CancellationToken::new();
        let ctx = CopyContext {
            job_run,
            job,
            snapshot,
            source_len,
            token: &token,
        };
        let snapshot_blob = job.source.at_snapshot(snapshot);
        let mut copies = FuturesUnordered::new();
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
            self.launch_ready(&mut run, &mut copies, &ctx, &records, &snapshot_blob)?;
            if copies.is_empty() && run.stopped(stop) {
                break;
            }
            let gates_freed = self.gates_freed(run.sched.waiting_accounts());
            tokio::select! {
                Some(done) = copies.next(), if !copies.is_empty() => {
                    job_run.note_transition();
                    match done {
                        Finished::Copy(done) => self.copy_done(&mut run, done, job_run, &token, source_len),
                        Finished::Relay(pick, result) => self.relay_done(&mut run, &pick, result, &token),
                    }
                },
                written = in_flight(&mut saving), if saving.is_some() => {
                    saving = None;
                    if let Some(by) = self.checkpoint_written(written, job_run) {
                        run.lose(by, &token);
                    }
                },
                _ = ticker.tick() => {
                    if saving.is_none() && job_run.due(progress_every) {
                        saving = Some(Box::pin(job_run.save()));
                    }
                    self.tick(&mut run, job, job_run, &token);
                },
                _ = stop.cancelled(), if !token.is_cancelled() => {
                    run.sched.clear();
                    token.cancel();
                },
                _ = gates_freed, if copies.is_empty() => {},
            }
        }
        // A write still in flight is dropped, not awaited: the job's next write
        // carries the same state and more (a write dropped after it landed only
        // costs that next write one ETag round).
        drop(saving);
        if run.lost.is_none() {
            self.delete_relays(job, job_run).await;
        }
        self.copy_run_end(run, job, job_run, stop).await
    }

    /// Replicas recorded as verified are checked again (someone may have deleted
    /// one): those still there, and the targets to copy, by index and account.
    async fn recheck(
        &self,
        job: &ValidatedJob,
        records: &[ReplicaRecord],
        snapshot: &str,
        source_len: u64,
    ) -> Result<(Vec<(u32, String)>, Vec<(u32, String)>), Failure> {
        let mut verified = Vec::new();
        let mut targets = Vec::new();
        for r in records {
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
        Ok((verified, targets))
    }

    /// Starts every copy the scheduler, the account gates and the read caps
    /// allow now.
    fn launch_ready<'a>(
        &'a self,
        run: &mut CopyRun,
        copies: &mut FuturesUnordered<futures::future::BoxFuture<'a, Finished>>,
        ctx: &'a CopyContext<'a>,
        records: &[ReplicaRecord],
        snapshot_blob: &BlobPath,
    ) -> Result<(), Failure> {
        let blob_of = |index: u32| -> ReplicaRecord {
            records
                .iter()
                .find(|r| r.index == index)
                .expect("record per replica")
                .clone()
        };
        for account in run.sched.waiting_accounts() {
            let Some(gate) = self.limits.gate(&account) else {
                return Err(JobError::AccountNotConfigured(account).into());
            };
            while let Some(slot) = gate.try_acquire() {
                let Some(pick) = run.sched.next_for(&account) else {
                    break;
                };
                let source = run.source_blob(pick.source, snapshot_blob, &blob_of);
                let record = blob_of(pick.index);
                let account = account.clone();
                copies.push(Box::pin(async move {
                    let in_flight = crate::metrics::GaugeGuard::new(
                        self.metrics.copies_in_flight.with_label_values(&[&account]),
                    );
                    let started = tokio::time::Instant::now();
                    let result = match self.copy_once(ctx, &record, &source).await {
                        Err(e) if e.is_not_found() => {
                            Err(self.source_gone(&source).await.unwrap_or(e))
                        }
                        other => other,
                    };
                    drop(in_flight);
                    drop(slot);
                    Finished::Copy(CopyDone {
                        pick,
                        account,
                        source_account: source.account.clone(),
                        took: started.elapsed(),
                        result,
                    })
                }));
            }
        }
        self.launch_relays(run, copies, ctx, snapshot_blob, &blob_of);
        Ok(())
    }

    /// Starts the relays the scheduler asks for, within the account gates.
    fn launch_relays<'a>(
        &'a self,
        run: &mut CopyRun,
        copies: &mut FuturesUnordered<futures::future::BoxFuture<'a, Finished>>,
        ctx: &'a CopyContext<'a>,
        snapshot_blob: &BlobPath,
        blob_of: &dyn Fn(u32) -> ReplicaRecord,
    ) {
        let free = |a: &str| self.limits.gate(a).is_some_and(|g| g.active() < g.limit());
        while let Some(pick) = run.sched.next_relay(free) {
            let Some(slot) = self
                .limits
                .gate(&pick.account)
                .and_then(|g| g.try_acquire())
            else {
                run.sched.relay_unmade(&pick);
                break;
            };
            let source = run.source_blob(pick.source, snapshot_blob, blob_of);
            let dest = relay::relay_blob(ctx.job, ctx.job_run.id(), &source, pick.relay);
            run.relay_blobs.insert(pick.relay, dest.clone());
            copies.push(Box::pin(async move {
                let result = self.make_relay(ctx, &source, &dest, pick.relay).await;
                drop(slot);
                Finished::Relay(pick, result)
            }));
        }
    }

    /// A relay copy ended: a source now, or not (its blob, if any, is deleted
    /// with the others at the end of the copy phase).
    fn relay_done(
        &self,
        run: &mut CopyRun,
        pick: &schedule::RelayPick,
        result: Result<(), CopyError>,
        token: &CancellationToken,
    ) {
        match result {
            Ok(()) => run.sched.relay_finished(pick, true),
            Err(CopyError::Stop(Failure::Lost(by))) => run.lose(by, token),
            // The job is stopping: not a failure of the relay.
            Err(CopyError::Stop(Failure::Interrupted | Failure::Cancelled)) => {
                run.sched.relay_unmade(pick);
            }
            Err(e) => {
                let reason = e.reason();
                tracing::warn!(relay = pick.relay, account = %pick.account, %reason, "a relay could not be made; seeding goes on from the other blobs");
                run.sched.relay_finished(pick, false);
            }
        }
    }

    /// [`CopyError::SourceLost`] when `source` (a relay or a replica, never the
    /// snapshot, whose loss fails the job) no longer exists.
    async fn source_gone(&self, source: &BlobPath) -> Option<CopyError> {
        if source.snapshot.is_some() {
            return None;
        }
        match self.store.properties(source).await {
            Err(e) if e.is_not_found() => Some(CopyError::SourceLost(source.clone())),
            _ => None,
        }
    }

    /// Resolves when a copy slot frees up in one of `waiting`'s accounts.
    async fn gates_freed(&self, waiting: Vec<String>) {
        let gates: Vec<_> = waiting.iter().filter_map(|a| self.limits.gate(a)).collect();
        if gates.is_empty() {
            std::future::pending::<()>().await;
        }
        let waits = gates.iter().map(|g| Box::pin(g.released()));
        futures::future::select_all(waits).await;
    }

    /// A copy ended: counted and the scheduler told; a failure tried again (up to
    /// [`MAX_REPLICA_ATTEMPTS`]) or recorded.
    fn copy_done(
        &self,
        run: &mut CopyRun,
        done: CopyDone,
        job_run: &JobRun<'_>,
        token: &CancellationToken,
        source_len: u64,
    ) {
        let CopyDone {
            pick,
            account,
            source_account,
            took,
            result,
        } = done;
        run.sched.finished(pick, &account, result.is_ok());
        match result {
            Ok(copied_now) => {
                if copied_now {
                    let kind = if source_account == account {
                        CopyKind::SameAccount
                    } else {
                        CopyKind::CrossAccount
                    };
                    self.metrics.copy_took(kind, took.as_secs_f64());
                    self.metrics
                        .copy_bytes
                        .with_label_values(&[&account])
                        .inc_by(source_len);
                }
                self.metrics.replica_ended(Ended::Completed);
                job_run.enter_phase(run.phase());
            }
            Err(CopyError::Stop(Failure::Interrupted)) => {}
            Err(CopyError::Stop(Failure::Lost(by))) => run.lose(by, token),
            Err(CopyError::Stop(Failure::Cancelled)) => run.cancelled = true,
            Err(CopyError::MethodUnsupported(e))
                if self.settings.engine.copy_method == crate::config::CopyMethod::Auto =>
            {
                if self.without_from_url.insert(&account) {
                    tracing::warn!(%account, error = %e, "the service does not do Put Page From URL; copies into this account use Copy Blob from now on");
                }
                run.sched.requeue(pick.index, &account);
            }
            Err(CopyError::SourceLost(gone)) => {
                // A vanished source is not the replica's failure: the source is
                // dropped and the replica waits for another one.
                tracing::warn!(replica = pick.index, %account, source = %gone, "the blob a copy read from is gone; copying the replica again from another source");
                run.sched.source_lost(pick.source);
                run.sched.requeue(pick.index, &account);
                job_run.relay_gone(&gone);
            }
            Err(e) if e.is_fatal() => {
                let reason = e.reason();
                self.replica_failed(job_run, pick.index, &reason);
                run.fatal.push(reason);
                run.sched.clear();
            }
            Err(e) => self.copy_failed(run, job_run, pick.index, &account, e.reason()),
        }
    }

    /// A copy failed in a way a new try may fix: requeued, or given up on after
    /// [`MAX_REPLICA_ATTEMPTS`].
    fn copy_failed(
        &self,
        run: &mut CopyRun,
        job_run: &JobRun<'_>,
        index: u32,
        account: &str,
        reason: String,
    ) {
        let n = run.attempts.entry(index).or_default();
        *n += 1;
        if *n < MAX_REPLICA_ATTEMPTS {
            tracing::warn!(replica = index, %account, reason = %reason, "replica copy failed; trying again");
            job_run.replica_retrying(index, &reason);
            run.sched.requeue(index, account);
        } else {
            let reason = format!(
                "replica {index} in {account}: {reason} (gave up after {MAX_REPLICA_ATTEMPTS} tries)"
            );
            self.replica_failed(job_run, index, &reason);
            run.transient.push(reason);
            run.sched.clear();
        }
    }

    /// Every checkpoint tick: the progress gauge, and a cancel request noticed.
    fn tick(
        &self,
        run: &mut CopyRun,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        token: &CancellationToken,
    ) {
        let (progress, cancel_requested) = job_run.read(|d| (d.progress(), d.cancel_requested));
        self.metrics
            .job_progress
            .with_label_values(&[job.id.as_str()])
            .set(progress);
        if cancel_requested && !run.cancelled {
            tracing::info!("cancel requested; aborting copies");
            run.cancelled = true;
            run.sched.clear();
            token.cancel();
        }
    }

    /// How the copy phase ended: taken over, cancelled, interrupted (its state
    /// written), failed with every reason, or done.
    async fn copy_run_end(
        &self,
        run: CopyRun,
        job: &ValidatedJob,
        job_run: &JobRun<'_>,
        stop: &CancellationToken,
    ) -> Result<(), Failure> {
        if let Some(by) = run.lost {
            return Err(Failure::Lost(by));
        }
        if run.cancelled || job_run.cancel_requested() {
            return Err(Failure::Cancelled);
        }
        if stop.is_cancelled() {
            let written = job_run.save().await;
            if let Some(by) = self.checkpoint_written(written, job_run) {
                return Err(Failure::Lost(by));
            }
            return Err(Failure::Interrupted);
        }
        let mut failed = run.fatal;
        failed.extend(run.transient);
        if failed.is_empty() {
            return Ok(());
        }
        Err(JobError::ReplicasFailed {
            failed,
            total: job.replicas,
        }
        .into())
    }

    /// Handles the end of a checkpoint write during copying: returns the instance
    /// that took the job over, if one did; a failed write is logged, counted and
    /// tried again at the next tick (the copies go on meanwhile).
    fn checkpoint_written(
        &self,
        written: Result<(), StateError>,
        job_run: &JobRun<'_>,
    ) -> Option<String> {
        match written {
            Ok(()) => None,
            Err(StateError::Lost(_, by)) => Some(by),
            Err(e) => {
                self.metrics.checkpoint_failures.inc();
                tracing::warn!(error = %e, "could not write a checkpoint; the copies go on and the next tick tries again");
                job_run.note_transition();
                None
            }
        }
    }

    fn replica_failed(&self, job_run: &JobRun<'_>, index: u32, reason: &str) {
        job_run.replica_failed(index, reason);
        self.metrics.replica_ended(Ended::Failed);
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

/// One copy phase's state: what is left, what failed, and why it stops.
struct CopyRun {
    sched: Scheduler,
    /// The blob of each relay made or being made, by number.
    relay_blobs: HashMap<u32, BlobPath>,
    fanout: bool,
    attempts: HashMap<u32, u32>,
    fatal: Vec<String>,
    transient: Vec<String>,
    cancelled: bool,
    lost: Option<String>,
}

/// What a copy future ends with.
enum Finished {
    Copy(CopyDone),
    Relay(schedule::RelayPick, Result<(), CopyError>),
}

impl CopyRun {
    /// The blob of source `i`: the snapshot, a replica or a relay.
    fn source_blob(
        &self,
        i: usize,
        snapshot_blob: &BlobPath,
        blob_of: &dyn Fn(u32) -> ReplicaRecord,
    ) -> BlobPath {
        let slot = &self.sched.sources()[i];
        match (slot.replica, slot.relay) {
            (Some(r), _) => blob_of(r).blob,
            (None, Some(n)) => self.relay_blobs[&n].clone(),
            (None, None) => snapshot_blob.clone(),
        }
    }

    /// Seeding until every account has its first replica (fan-out), then copying.
    fn phase(&self) -> Phase {
        if self.fanout && !self.sched.seeded() {
            Phase::Seeding
        } else {
            Phase::Copying
        }
    }

    /// Another instance took the job over: nothing more starts, copies stop.
    fn lose(&mut self, by: String, token: &CancellationToken) {
        self.lost = Some(by);
        self.sched.clear();
        token.cancel();
    }

    /// Whether no more copies will start (with none in flight, the phase ends).
    fn stopped(&self, stop: &CancellationToken) -> bool {
        self.sched.is_drained() || !self.fatal.is_empty() || self.cancelled || stop.is_cancelled()
    }
}

/// A copy that ended, with what the metrics and the scheduler need.
struct CopyDone {
    pick: schedule::Pick,
    account: String,
    source_account: String,
    took: Duration,
    result: Result<bool, CopyError>,
}
