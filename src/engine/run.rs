//! One run of a job, and the one writer of its document.
//!
//! A [`JobRun`] holds the job's document while the run lasts and its
//! [`Checkpoint`] (the claim, fenced per run, and the document's ETag). Every
//! change the run makes to the document goes through a method here, each a
//! typed transition: the job's phase only moves forward, a replica moves only
//! along its life ([`ReplicaState::may_enter`]), and a refused change is logged
//! and leaves the document as it was. Requests from outside the run (a cancel,
//! another run taking the job over) reach it through the stored document,
//! which the checkpoint reads back when a write meets another writer's change.
//! The live view of this instance's pages shares the document read-only.

use super::checkpoint::Checkpoint;
use crate::state::{
    JobDocument, JobState, Phase, Publication, ReplicaRecord, ReplicaState, RunRef, StateError,
};
use crate::state::{PoolStage, ReplicaMethod};
use crate::storage::BlobPath;
use std::{
    ops::Range,
    sync::{Arc, Mutex},
    time::Duration,
};

/// A run of a job: its document, and the only code that changes it.
pub(super) struct JobRun<'a> {
    doc: Arc<Mutex<JobDocument>>,
    checkpoint: Checkpoint<'a>,
}

impl<'a> JobRun<'a> {
    /// The run that claimed `doc` (written under `checkpoint`).
    pub(super) fn new(doc: JobDocument, checkpoint: Checkpoint<'a>) -> Self {
        Self {
            doc: Arc::new(Mutex::new(doc)),
            checkpoint,
        }
    }

    /// The document, shared read-only with this instance's live view.
    pub(super) fn shared(&self) -> Arc<Mutex<JobDocument>> {
        self.doc.clone()
    }

    /// Reads the document.
    pub(super) fn read<T>(&self, f: impl FnOnce(&JobDocument) -> T) -> T {
        f(&self.doc.lock().expect("live doc lock"))
    }

    /// Changes the document: private, so every change has a name below.
    fn change<T>(&self, f: impl FnOnce(&mut JobDocument) -> T) -> T {
        f(&mut self.doc.lock().expect("live doc lock"))
    }

    /// Changes replica `index`'s record.
    fn change_replica<T>(&self, index: u32, f: impl FnOnce(&mut ReplicaRecord) -> T) -> T {
        self.change(|d| {
            let rec = d
                .replicas
                .iter_mut()
                .find(|r| r.index == index)
                .expect("replica records cover the plan");
            f(rec)
        })
    }

    /// Moves replica `index` to `to` and, when its life allows it, applies
    /// `then`; a refused move is logged and changes nothing.
    fn move_replica(&self, index: u32, to: ReplicaState, then: impl FnOnce(&mut ReplicaRecord)) {
        self.change_replica(index, |r| match r.enter(to) {
            Ok(()) => then(r),
            Err(e) => tracing::error!(error = %e, "refusing an illegal replica state change"),
        });
        self.checkpoint.note_transition();
    }

    // --- storage -------------------------------------------------------------

    /// Writes the document under its ETag (renewing the claim); fails with
    /// [`StateError::Lost`] when another run holds the job.
    pub(super) async fn save(&self) -> Result<(), StateError> {
        self.checkpoint.save(&self.doc).await
    }

    /// This run's id.
    pub(super) fn id(&self) -> &str {
        self.checkpoint.run()
    }

    /// This run of this job, for the pool's lock.
    pub(super) fn run_ref(&self) -> RunRef<'_> {
        self.checkpoint.run_ref()
    }

    /// Whether a write is due: after a transition, or when `every` passed.
    pub(super) fn due(&self, every: Duration) -> bool {
        self.checkpoint.due(every)
    }

    /// Something changed that the next tick should write.
    pub(super) fn note_transition(&self) {
        self.checkpoint.note_transition();
    }

    // --- the job ---------------------------------------------------------------

    /// Whether someone asked for the job to be cancelled.
    pub(super) fn cancel_requested(&self) -> bool {
        self.read(|d| d.cancel_requested)
    }

    /// The job's phase moves forward to `phase`.
    pub(super) fn enter_phase(&self, phase: Phase) {
        if let Err(e) = self.change(|d| d.enter_phase(phase)) {
            tracing::error!(error = %e, "refusing an illegal phase change");
        }
    }

    /// The job ends in `state` with `error`.
    pub(super) fn finish(&self, state: JobState, error: Option<String>) {
        self.change(|d| match d.enter(state) {
            Ok(()) => d.error = error,
            Err(e) => tracing::error!(error = %e, "refusing an illegal state change"),
        });
    }

    /// The run ends without ending the job: its claim is given up so the next
    /// run may start at once, with `error` (if any) saying why.
    pub(super) fn release(&self, error: Option<String>) {
        self.change(|d| {
            d.release_claim();
            if error.is_some() {
                d.error = error;
            }
        });
    }

    /// How the job relates to its pool's image set (or what it waits for).
    pub(super) fn note_image_set(&self, note: Option<String>) {
        self.change(|d| d.image_set = note);
        self.checkpoint.note_transition();
    }

    /// A fresh job builds on its pool's image set: its snapshot and length.
    pub(super) fn adopt_snapshot(&self, snapshot: String, bytes: u64) {
        self.change(|d| {
            d.source_snapshot = Some(snapshot);
            d.source_bytes = Some(bytes);
        });
    }

    /// The source frozen in `snapshot` of `bytes`, at ETag `etag`.
    pub(super) fn frozen(&self, snapshot: String, bytes: u64, etag: String) {
        self.change(|d| {
            d.source_snapshot = Some(snapshot);
            d.source_bytes = Some(bytes);
            d.source_etag = Some(etag);
        });
    }

    /// The job's plan, recorded once.
    pub(super) fn plan(&self, records: Vec<ReplicaRecord>) {
        self.change(|d| {
            if d.replicas.is_empty() {
                d.replicas = records;
            }
        });
    }

    /// The hand-off, recorded before it is sent.
    pub(super) fn record_handoff(&self, handoff: serde_json::Value) {
        self.change(|d| d.handoff = Some(handoff));
    }

    // --- relays ----------------------------------------------------------------

    /// A relay this run is making.
    pub(super) fn relay_listed(&self, blob: &BlobPath) {
        self.change(|d| {
            if !d.relays.contains(blob) {
                d.relays.push(blob.clone());
            }
        });
        self.checkpoint.note_transition();
    }

    /// A relay deleted, or found gone.
    pub(super) fn relay_gone(&self, blob: &BlobPath) {
        self.change(|d| d.relays.retain(|r| r != blob));
    }

    /// Drops the relays whose names do not start with `prefix` (an earlier
    /// run's); returns how many.
    pub(super) fn keep_relays_under(&self, prefix: &str) -> usize {
        self.change(|d| {
            let before = d.relays.len();
            d.relays.retain(|r| r.name.starts_with(prefix));
            before - d.relays.len()
        })
    }

    // --- the pool stage ----------------------------------------------------------

    /// The pool stage's record, once it has one.
    pub(super) fn pool_stage(&self) -> Option<PoolStage> {
        self.read(|d| d.pool_stage.clone())
    }

    /// The pool stage's record is now `stage`.
    pub(super) fn record_pool_stage(&self, stage: PoolStage) {
        self.change(|d| d.pool_stage = Some(stage));
    }

    // --- the gallery -------------------------------------------------------------

    /// The publication, once its version is named.
    pub(super) fn publication(&self) -> Option<Publication> {
        self.read(|d| d.gallery.clone())
    }

    /// The version to publish is named.
    pub(super) fn name_publication(&self, p: Publication) {
        self.change(|d| d.gallery = Some(p));
    }

    /// The publication moves on (state, operation, name, progress, replicas).
    pub(super) fn update_publication(&self, f: impl FnOnce(&mut Publication)) {
        self.change(|d| d.gallery.as_mut().map(f));
    }

    // --- replicas ----------------------------------------------------------------

    /// Replica `index`'s record as it stands.
    pub(super) fn replica(&self, index: u32) -> ReplicaRecord {
        self.read(|d| {
            d.replicas
                .iter()
                .find(|r| r.index == index)
                .expect("replica records cover the plan")
                .clone()
        })
    }

    /// Where replica `index` is copied from, in words.
    pub(super) fn replica_copied_from(&self, index: u32, from: String) {
        self.change_replica(index, |r| r.copied_from = Some(from));
    }

    /// A copy into replica `index` started (`copy_id` for an async copy), a
    /// new try.
    pub(super) fn replica_started(
        &self,
        index: u32,
        method: ReplicaMethod,
        copy_id: Option<String>,
        bytes_total: u64,
    ) {
        self.move_replica(index, ReplicaState::Copying, |r| {
            r.copy_id = copy_id;
            r.method = Some(method);
            r.attempts += 1;
            r.bytes_copied = 0;
            r.bytes_total = bytes_total;
            r.ranges_done.clear();
            r.error = None;
        });
    }

    /// A status request was spent on replica `index`.
    pub(super) fn replica_polled(&self, index: u32) {
        self.change_replica(index, |r| r.status_requests += 1);
    }

    /// Replica `index`'s copy has `copied` of `total` bytes (total 0: unknown
    /// yet); a copy an earlier run started and this one adopted is copying.
    pub(super) fn replica_progress(&self, index: u32, copied: u64, total: u64) {
        self.change_replica(index, |r| {
            if r.state != ReplicaState::Copying && r.enter(ReplicaState::Copying).is_err() {
                return;
            }
            r.bytes_copied = copied;
            if total > 0 {
                r.bytes_total = total;
            }
        });
    }

    /// Replica `index`'s ranged copy wrote `range`; its progress is the share
    /// of the `wanted` bytes written, of a `len`-byte replica.
    pub(super) fn replica_range_written(
        &self,
        index: u32,
        range: Range<u64>,
        wanted: u64,
        len: u64,
    ) {
        self.change_replica(index, |r| {
            if r.state != ReplicaState::Copying {
                return;
            }
            r.ranges_done.push(range);
            r.ranges_done = crate::storage::merge_ranges(std::mem::take(&mut r.ranges_done));
            let written: u64 = r.ranges_done.iter().map(|d| d.end - d.start).sum();
            r.bytes_copied = if wanted == 0 {
                len
            } else {
                (len as f64 * written as f64 / wanted as f64) as u64
            };
        });
    }

    /// Replica `index`'s ranged copy starts over: the ranges recorded as done
    /// are not to be trusted.
    pub(super) fn replica_ranges_forgotten(&self, index: u32) {
        self.change_replica(index, |r| r.ranges_done.clear());
    }

    /// Replica `index` is verified: `len` bytes, made by `method` (the copy id
    /// of an async copy).
    pub(super) fn replica_verified(
        &self,
        index: u32,
        method: ReplicaMethod,
        copy_id: Option<String>,
        len: u64,
    ) {
        self.move_replica(index, ReplicaState::Verified, |r| {
            if copy_id.is_some() {
                r.copy_id = copy_id;
            }
            r.method = Some(method);
            r.ranges_done.clear();
            r.bytes_copied = len;
            r.bytes_total = len;
            r.error = None;
        });
    }

    /// A try of replica `index` failed; another follows.
    pub(super) fn replica_retrying(&self, index: u32, reason: &str) {
        self.change_replica(index, |r| r.error = Some(reason.to_owned()));
        self.checkpoint.note_transition();
    }

    /// Replica `index` failed for good.
    pub(super) fn replica_failed(&self, index: u32, reason: &str) {
        self.move_replica(index, ReplicaState::Failed, |r| {
            r.error = Some(reason.to_owned())
        });
    }

    /// Replica `index` ends with its job (failed or cancelled); a failed one
    /// keeps its state. Returns whether it was still under way.
    pub(super) fn replica_cancelled(&self, index: u32) -> bool {
        let state = self.replica(index).state;
        if state != ReplicaState::Failed {
            self.move_replica(index, ReplicaState::Cancelled, |_| {});
        }
        !matches!(state, ReplicaState::Failed | ReplicaState::Verified)
    }
}
