//! Checkpoints: a running job's document written under its ETag, its claim
//! renewed, a cancel request written meanwhile by another process kept. The
//! claim is per run: a write that finds the stored document held by another
//! run (or ended) fails with [`StateError::Lost`], and the run stops.

use crate::state::{JobDocument, StateError, StateStore};
use std::{sync::Mutex, time::Duration};
use time::OffsetDateTime;
use tokio::time::Instant;

/// Writes a running job's document under its ETag, keeping a cancel request that
/// another writer added in the meantime.
pub(super) struct Checkpoint<'a> {
    state: &'a StateStore,
    id: String,
    run: String,
    lease: Duration,
    etag: tokio::sync::Mutex<String>,
    last_saved: Mutex<Instant>,
    transition: std::sync::atomic::AtomicBool,
}

impl Checkpoint<'_> {
    pub(super) fn new<'a>(
        state: &'a StateStore,
        id: &str,
        etag: String,
        run: &str,
        lease: Duration,
    ) -> Checkpoint<'a> {
        Checkpoint {
            state,
            id: id.to_owned(),
            run: run.to_owned(),
            lease,
            etag: tokio::sync::Mutex::new(etag),
            last_saved: Mutex::new(Instant::now()),
            transition: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// This run's id.
    pub(super) fn run(&self) -> &str {
        &self.run
    }

    /// This run of this job, for the pool's lock.
    pub(super) fn run_ref(&self) -> crate::state::RunRef<'_> {
        crate::state::RunRef {
            job_id: &self.id,
            run: &self.run,
        }
    }

    /// A replica changed state: the next tick writes the document.
    pub(super) fn note_transition(&self) {
        self.transition
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a tick should write: after a transition, or when progress alone
    /// has not been written for `every`.
    pub(super) fn due(&self, every: Duration) -> bool {
        self.transition
            .swap(false, std::sync::atomic::Ordering::Relaxed)
            || self.last_saved.lock().expect("checkpoint lock").elapsed() >= every
    }

    pub(super) async fn save(&self, live: &Mutex<JobDocument>) -> Result<(), StateError> {
        *self.last_saved.lock().expect("checkpoint lock") = Instant::now();
        let mut etag = self.etag.lock().await;
        for round in 0..crate::state::MAX_UPDATE_ROUNDS {
            if round > 0 {
                crate::state::contention_pause(round).await;
            }
            let mut doc = {
                let mut live = live.lock().expect("live doc lock");
                // The live document (what this instance's pages show) carries
                // what the stored one will: the time and the progress sample.
                let now = OffsetDateTime::now_utc();
                live.updated_at = now;
                live.note_progress(now);
                live.renew_claim(&self.run, crate::state::claim_now() + self.lease);
                live.clone()
            };
            match self.state.save(&mut doc, &etag).await {
                Ok(new) => {
                    *etag = new;
                    return Ok(());
                }
                Err(StateError::Conflict(_)) => {
                    let (stored, new) = self
                        .state
                        .load(&self.id)
                        .await?
                        .ok_or_else(|| StateError::NotFound(self.id.clone()))?;
                    if !stored.held_by(&self.run) {
                        let by = match stored.owner() {
                            _ if stored.state().is_terminal() => {
                                format!("another run, which ended it {}", stored.state().as_str())
                            }
                            Some(o) => format!(
                                "run {} on instance {}",
                                o.run.as_deref().unwrap_or("?"),
                                o.instance
                            ),
                            None => "nobody (the claim was released)".to_owned(),
                        };
                        return Err(StateError::Lost(stored.job_id.clone(), by));
                    }
                    if stored.cancel_requested {
                        live.lock().expect("live doc lock").cancel_requested = true;
                    }
                    *etag = new;
                }
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Contended(
            format!("job {}", self.id),
            crate::state::MAX_UPDATE_ROUNDS,
        ))
    }
}
