//! The intake queue consumer. A message is the job's work lease: it stays
//! invisible while the job runs (renewed, keeping the newest pop receipt), is
//! deleted when the job ends, is made visible again when this instance stops, and
//! goes to the poison queue with the reason when it can never succeed.

use crate::config::ValidatedSettings;
use crate::engine::{Engine, Outcome, RunSlot};
use crate::job::{Command, InvalidMessage, JobId, Salvage, ValidatedJob};
use crate::metrics::Metrics;
use crate::queue::{MessageQueue, ReceivedMessage};
use crate::state::{JobDocument, StateStore, Work};
use serde::Serialize;
use std::{sync::Arc, time::Duration};
use time::OffsetDateTime;
use tokio::{sync::Mutex, task::JoinSet};
use tokio_util::sync::CancellationToken;

/// The work a taken message becomes.
type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// How often the queued-jobs gauge is refreshed.
const QUEUED_GAUGE_EVERY: Duration = Duration::from_secs(15);

/// What goes to the poison queue: the original text and why it was refused.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PoisonMessage {
    /// The message text as received.
    pub original: String,
    /// Why it can never succeed.
    pub reason: String,
    /// Times it had been taken.
    pub dequeue_count: u32,
    /// When it was moved.
    #[serde(with = "time::serde::rfc3339")]
    pub poisoned_at: OffsetDateTime,
    /// The job id, when the message had a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

/// Consumes the intake queue and runs jobs on the engine.
#[derive(Debug, Clone)]
pub(crate) struct Worker {
    engine: Arc<Engine>,
    intake: Arc<dyn MessageQueue>,
    poison: Arc<dyn MessageQueue>,
    state: StateStore,
    metrics: Metrics,
    settings: Arc<ValidatedSettings>,
}

/// A taken message whose invisibility is kept up while its job runs.
struct Lease {
    queue: Arc<dyn MessageQueue>,
    id: String,
    receipt: Arc<Mutex<String>>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Lease {
    fn start(
        queue: Arc<dyn MessageQueue>,
        msg: &ReceivedMessage,
        lease: Duration,
        lost: CancellationToken,
    ) -> Self {
        let receipt = Arc::new(Mutex::new(msg.pop_receipt.clone()));
        let renewer = {
            let queue = queue.clone();
            let receipt = receipt.clone();
            let id = msg.id.clone();
            tokio::spawn(async move {
                let every = lease / 3;
                loop {
                    tokio::time::sleep(every).await;
                    let mut r = receipt.lock().await;
                    match queue.renew(&id, &r, lease).await {
                        Ok(new) => *r = new,
                        Err(e) if e.is_lost_message() => {
                            tracing::warn!(message_id = %id, "lost the message lease; another instance owns the job now");
                            lost.cancel();
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(message_id = %id, error = %e, "could not renew the message lease")
                        }
                    }
                }
            })
        };
        Self {
            queue,
            id: msg.id.clone(),
            receipt,
            renewer,
        }
    }

    async fn stop_renewing(&self) -> String {
        // (Also done on drop, so an aborted job task never keeps a lease alive.)
        self.renewer.abort();
        self.receipt.lock().await.clone()
    }

    async fn delete(self) {
        let r = self.stop_renewing().await;
        if let Err(e) = self.queue.delete(&self.id, &r).await {
            tracing::warn!(message_id = %self.id, error = %e, "could not delete the finished job's message");
        }
    }

    /// Makes the message visible again after `after`.
    async fn release(self, after: Duration) {
        let r = self.stop_renewing().await;
        if let Err(e) = self.queue.renew(&self.id, &r, after).await {
            tracing::warn!(message_id = %self.id, error = %e, "could not release the message");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

impl Worker {
    /// A worker over these queues.
    pub(crate) fn new(
        engine: Arc<Engine>,
        intake: Arc<dyn MessageQueue>,
        poison: Arc<dyn MessageQueue>,
        state: StateStore,
        metrics: Metrics,
        settings: Arc<ValidatedSettings>,
    ) -> Self {
        Self {
            engine,
            intake,
            poison,
            state,
            metrics,
            settings,
        }
    }

    /// Takes messages until `stop` fires, then waits up to the grace period for
    /// running jobs to checkpoint and release their messages.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let e = &self.settings.engine;
        let lease = Duration::from_secs(e.lease_seconds as u64);
        let idle = Duration::from_millis(e.idle_poll_ms);
        let mut jobs: JoinSet<()> = JoinSet::new();
        let mut gauge_at = tokio::time::Instant::now();
        while !stop.is_cancelled() {
            while jobs.try_join_next().is_some() {}
            if gauge_at.elapsed() >= QUEUED_GAUGE_EVERY {
                gauge_at = tokio::time::Instant::now();
                self.update_queued_gauge().await;
            }
            let free = (e.max_parallel_jobs as usize).saturating_sub(jobs.len());
            let mut took = 0;
            if free > 0 {
                match self.intake.receive(free.min(32) as u32, lease).await {
                    Ok(messages) => {
                        took = messages.len();
                        for m in messages {
                            if let Some(task) = self.take(m, lease, stop.clone()).await {
                                jobs.spawn(task);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(queue = self.intake.name(), error = %e, "cannot read the intake queue")
                    }
                }
            }
            if took == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(idle) => {}
                    _ = stop.cancelled() => {}
                    Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
                }
            }
        }
        let grace = self.settings.shutdown_grace;
        tracing::info!(
            running = jobs.len(),
            grace_s = grace.as_secs(),
            "stopping: draining jobs"
        );
        let drained =
            tokio::time::timeout(grace, async { while jobs.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("grace period over; leaving the remaining jobs to be resumed");
            jobs.abort_all();
        }
    }

    /// `vhdrep_jobs{state="queued"}`: messages on the intake queue that no job of
    /// this instance holds (an approximation: the queue counts taken messages too,
    /// including those other instances run).
    async fn update_queued_gauge(&self) {
        match self.intake.approximate_count().await {
            Ok(n) => {
                let running = self.engine.runs_here() as u64;
                self.metrics
                    .jobs_gauge(crate::metrics::JobsGauge::Queued)
                    .set(n.saturating_sub(running) as i64);
            }
            Err(e) => tracing::debug!(error = %e, "cannot count the intake queue"),
        }
    }

    /// Handles one message: refuses it to the poison queue, drops a duplicate, or
    /// returns the task that runs its job.
    async fn take(
        &self,
        m: ReceivedMessage,
        lease: Duration,
        stop: CancellationToken,
    ) -> Option<Task> {
        let command = Command::decode(&m.text);
        let job_id = command.job_id();
        if m.dequeue_count > self.settings.engine.max_dequeue_count {
            let reason = self.overdue_reason(&m, job_id.as_ref()).await;
            self.poison(&m, reason, job_id, salvage_of(&command)).await;
            return None;
        }
        match command {
            Command::Invalid(InvalidMessage {
                error,
                job_id,
                salvage,
            }) => {
                self.poison(&m, error.to_string(), job_id, salvage).await;
                None
            }
            Command::Retire(retire) => match retire.validate() {
                Ok((id, pool)) => self.retire_task(m, id, pool, lease, stop),
                Err(error) => {
                    let salvage = Salvage::Retire(retire.retire_pool.clone());
                    self.poison(&m, error.to_string(), job_id, salvage).await;
                    None
                }
            },
            Command::Replicate(spec) => match spec.validate(&self.settings) {
                Ok(job) => self.job_task(m, job, lease, stop),
                Err(error) => {
                    let salvage = Salvage::Replicate(spec);
                    self.poison(&m, error.to_string(), job_id, salvage).await;
                    None
                }
            },
        }
    }

    /// Why a message taken too often is poisoned, with its job's last error.
    async fn overdue_reason(&self, m: &ReceivedMessage, job_id: Option<&JobId>) -> String {
        let last = match job_id {
            Some(id) => self
                .state
                .load(id.as_str())
                .await
                .ok()
                .flatten()
                .and_then(|(d, _)| d.error),
            None => None,
        };
        format!(
            "taken {} times without finishing (engine.max_dequeue_count = {}){}",
            m.dequeue_count,
            self.settings.engine.max_dequeue_count,
            last.map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        )
    }

    /// The task of a retire job, under the message's lease; none for a
    /// duplicate message of a job running here.
    fn retire_task(
        &self,
        m: ReceivedMessage,
        id: JobId,
        pool: String,
        lease: Duration,
        stop: CancellationToken,
    ) -> Option<Task> {
        let slot = self.reserve_or_drop(&m, &id)?;
        let engine = self.engine.clone();
        let queue = self.intake.clone();
        Some(Box::pin(async move {
            let lease = Lease::start(queue, &m, lease, stop.child_token());
            let outcome = engine.retire_reserved(slot, &id, &pool).await;
            settle(lease, outcome, m.dequeue_count).await
        }))
    }

    /// Registers a run of job `id` here, or, when one runs here already, drops
    /// this duplicate message (the running job keeps its own message, so
    /// nothing is lost). One step: two deliveries taken together cannot both
    /// start a run.
    fn reserve_or_drop(&self, m: &ReceivedMessage, id: &JobId) -> Option<RunSlot> {
        if let Some(slot) = self.engine.reserve(id.as_str()) {
            return Some(slot);
        }
        tracing::info!(job_id = %id, message_id = %m.id, "duplicate message for a job running here; dropping it");
        self.metrics.duplicate_deliveries.inc();
        let (queue, id, receipt) = (self.intake.clone(), m.id.clone(), m.pop_receipt.clone());
        tokio::spawn(async move {
            if let Err(e) = queue.delete(&id, &receipt).await {
                tracing::warn!(message_id = %id, error = %e, "could not delete a duplicate message; it comes back and is dropped again");
            }
        });
        None
    }

    /// The task of a replication job, under the message's lease; none for a
    /// duplicate message of a job running here.
    fn job_task(
        &self,
        m: ReceivedMessage,
        job: ValidatedJob,
        lease: Duration,
        stop: CancellationToken,
    ) -> Option<Task> {
        let slot = self.reserve_or_drop(&m, &job.id)?;
        let engine = self.engine.clone();
        let queue = self.intake.clone();
        Some(Box::pin(async move {
            let job_stop = stop.child_token();
            let lease = Lease::start(queue, &m, lease, job_stop.clone());
            let outcome = engine.run_reserved(slot, &job, job_stop).await;
            settle(lease, outcome, m.dequeue_count).await
        }))
    }

    /// Moves a message to the poison queue with `reason`; a message with a valid
    /// job id also gets a failed state document (from what could be salvaged),
    /// so `status` tells why.
    async fn poison(
        &self,
        m: &ReceivedMessage,
        reason: String,
        job_id: Option<JobId>,
        salvage: Salvage,
    ) {
        tracing::warn!(message_id = %m.id, reason = %reason, "moving message to the poison queue");
        let wrapper = PoisonMessage {
            original: m.text.clone(),
            reason: reason.clone(),
            dequeue_count: m.dequeue_count,
            poisoned_at: OffsetDateTime::now_utc(),
            job_id: job_id.as_ref().map(JobId::to_string),
        };
        let text = serde_json::to_string(&wrapper).expect("poison wrapper serialises");
        if let Err(e) = self.poison.send(&text).await {
            tracing::error!(error = %e, "cannot write to the poison queue; the message stays on the intake queue");
            return;
        }
        self.metrics.queue_poisoned.inc();
        if let Some(id) = job_id {
            self.record_poisoned(id, salvage, reason).await;
        }
        if let Err(e) = self.intake.delete(&m.id, &m.pop_receipt).await {
            tracing::warn!(message_id = %m.id, error = %e, "could not delete the poisoned message");
        }
    }
}

impl Worker {
    /// The failed state document of a poisoned message with a job id: created
    /// from what was salvaged, or an existing unfinished job marked failed.
    async fn record_poisoned(&self, id: JobId, salvage: Salvage, reason: String) {
        let work = match salvage {
            Salvage::Replicate(spec) => Work::Replicate(spec),
            Salvage::Retire(pool) => Work::Retire { pool },
        };
        let mut doc = JobDocument::queued(id.clone(), work);
        doc.fail(reason.clone()).expect("a queued job may fail");
        match self.state.create(&doc).await {
            Ok(_) => {
                self.metrics.job_ended(crate::metrics::Ended::Failed);
            }
            Err(_) => {
                // A job a live run holds is that run's to end: this delivery was
                // one more copy of its message.
                let _ = self
                    .state
                    .update(id.as_str(), |d| {
                        d.owner()
                            .is_none_or(|o| o.until <= crate::state::claim_now())
                            && d.fail(reason.clone()).is_ok()
                    })
                    .await;
            }
        }
    }
}

/// Ends a run's message as its outcome says: deleted when the job has ended
/// (or this was a duplicate of a run here), made visible again when it is to
/// run again: at once after an interruption, when another run's claim lapses,
/// or after a backoff that grows with the deliveries.
async fn settle(lease: Lease, outcome: Outcome, dequeue_count: u32) {
    match outcome {
        Outcome::Completed
        | Outcome::Failed(_)
        | Outcome::Cancelled
        | Outcome::AlreadyEnded(_)
        | Outcome::RunningHere => lease.delete().await,
        Outcome::Interrupted => lease.release(Duration::from_secs(1)).await,
        Outcome::OwnedElsewhere(until) => {
            // Back off until the other run's claim would lapse.
            let wait = (until - crate::state::claim_now()).whole_seconds().max(1) as u64;
            lease.release(Duration::from_secs(wait + 1)).await
        }
        Outcome::Retry(_) => {
            let backoff = Duration::from_secs((30 * dequeue_count as u64).min(600));
            lease.release(backoff).await
        }
    }
}

/// What a decoded message asked for, for the failed document of a message
/// poisoned after too many tries.
fn salvage_of(command: &Command) -> Salvage {
    match command {
        Command::Replicate(spec) => Salvage::Replicate(spec.clone()),
        Command::Retire(r) => Salvage::Retire(r.retire_pool.clone()),
        Command::Invalid(m) => m.salvage.clone(),
    }
}
