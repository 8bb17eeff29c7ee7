//! Relays: short-lived copies of the snapshot inside an account that already
//! holds it, each read for cross-account seeds, so every destination account can
//! be seeded at once from distinct blobs (one blob's read bandwidth would
//! otherwise serialize the seeding). A relay lives beside the blob it was copied
//! from under a prefix of its own, carries this deployment's owner tag and its
//! job, is recorded in the job document while it exists, counts against the
//! account's `max_replicas`, and is deleted when the copy phase ends (gc removes
//! one a crash left behind). A relay belongs to the run that made it: its name
//! and its `vhdrep_run` tag carry the run, and no other run deletes it (a run
//! that took a job over leaves an earlier run's relays to gc, since that run
//! may still be reading them).

use super::copier::{Copier, CopyContext, CopyError};
use super::*;
use crate::storage::Metadata;

/// Prefix of every relay's name, inside the container of the blob it copies.
pub const RELAY_PREFIX: &str = ".vhdrep-relays/";

/// Metadata key naming a relay's number.
pub(crate) const META_RELAY: &str = "vhdrep_relay";

/// Where relay `n` of `run` of `job` lives when copied from `from`.
pub(super) fn relay_blob(job: &ValidatedJob, run: &str, from: &BlobPath, n: u32) -> BlobPath {
    BlobPath::new(
        &from.account,
        &from.container,
        &format!("{}relay-{n:04}.vhd", run_prefix(job, run)),
    )
}

/// The name prefix of every relay of `run` of `job`.
fn run_prefix(job: &ValidatedJob, run: &str) -> String {
    format!("{RELAY_PREFIX}{}/{run}/", job.id)
}

impl Copier<'_> {
    /// Accounts relays may be made in, and how many each may hold under its
    /// `max_replicas` beside this job's replicas (`None`: no limit): the
    /// snapshot's account and every account the job copies into.
    pub(super) fn relay_room(
        &self,
        job: &ValidatedJob,
        records: &[ReplicaRecord],
    ) -> Vec<(String, Option<u32>)> {
        let mut accounts: Vec<String> = records.iter().map(|r| r.account.clone()).collect();
        accounts.push(job.source.account.clone());
        accounts.sort();
        accounts.dedup();
        accounts
            .into_iter()
            .map(|a| {
                let here = records.iter().filter(|r| r.account == a).count() as u32;
                let room = self
                    .settings
                    .account(&a)
                    .and_then(|c| c.max_replicas)
                    .map(|max| max.saturating_sub(here));
                (a, room)
            })
            .collect()
    }

    /// Makes relay `n` at `dest` from `source` (same account): an async Copy
    /// Blob, fast inside one account, polled to its end and checked.
    pub(super) async fn make_relay(
        &self,
        ctx: &CopyContext<'_>,
        source: &BlobPath,
        dest: &BlobPath,
        n: u32,
    ) -> Result<(), CopyError> {
        ctx.job_run.relay_listed(dest);
        let url = self
            .source_url(source, dest, crate::storage::SourceRead::CopyBlob)
            .await?;
        let metadata = Metadata::from([
            (plan::META_OWNER.to_owned(), plan::owner_tag(self.settings)),
            (plan::META_JOB.to_owned(), ctx.job.id.to_string()),
            (plan::META_SNAPSHOT.to_owned(), ctx.snapshot.to_owned()),
            (META_RELAY.to_owned(), n.to_string()),
            (plan::META_RUN.to_owned(), ctx.job_run.id().to_owned()),
        ]);
        let started = self
            .store
            .start_copy(dest, &url, &metadata)
            .await
            .map_err(|e| CopyError::from_storage(&e))?;
        let min = Duration::from_millis(self.settings.engine.min_poll_ms);
        let max = Duration::from_millis(self.settings.engine.max_poll_ms);
        let (mut state, mut wait, mut last, mut at) =
            (started.state, Duration::ZERO, 0u64, Instant::now());
        while state == CopyState::Pending {
            tokio::select! {
                _ = tokio::time::sleep(wait.max(min)) => {}
                _ = ctx.token.cancelled() => return Err(CopyError::Stop(Failure::Interrupted)),
            }
            let p = self
                .store
                .properties(dest)
                .await
                .map_err(|e| CopyError::from_storage(&e))?;
            let c = p.copy.filter(|c| c.id == started.copy_id).ok_or_else(|| {
                CopyError::Unsound(format!("{dest}: the relay's copy was replaced"))
            })?;
            let now = Instant::now();
            wait = poll::next_poll(
                wait,
                c.copied.saturating_sub(last),
                now - at,
                c.total.saturating_sub(c.copied),
                min,
                max,
            );
            (state, last, at) = (c.state, c.copied, now);
        }
        if state != CopyState::Success {
            return Err(CopyError::Unsound(format!("{dest}: relay copy {state:?}")));
        }
        let p = self
            .store
            .properties(dest)
            .await
            .map_err(|e| CopyError::from_storage(&e))?;
        if p.len != ctx.source_len {
            return Err(CopyError::Unsound(format!(
                "{dest}: the relay holds {} bytes, the source {}",
                p.len, ctx.source_len
            )));
        }
        tracing::info!(relay = n, blob = %dest, "relay ready");
        Ok(())
    }

    /// Forgets the relays an earlier run of the job listed: they are that run's
    /// (it may still read them if it has not yet seen that it lost the job), so
    /// this run leaves them to gc, which takes them once the job has ended.
    pub(super) fn forget_earlier_relays(&self, job: &ValidatedJob, job_run: &JobRun<'_>) {
        let dropped = job_run.keep_relays_under(&run_prefix(job, job_run.id()));
        if dropped > 0 {
            tracing::info!(
                relays = dropped,
                "relays of an earlier run of this job are left to gc"
            );
        }
    }

    /// Deletes every relay of this run that the document lists; one that cannot
    /// be deleted now is left to gc (it carries the job's tags) and logged.
    pub(super) async fn delete_relays(&self, job: &ValidatedJob, job_run: &JobRun<'_>) {
        let mine = run_prefix(job, job_run.id());
        let relays = job_run.read(|d| d.relays.clone());
        for r in relays.into_iter().filter(|r| r.name.starts_with(&mine)) {
            match self.store.delete(&r).await {
                Ok(()) => tracing::debug!(blob = %r, "relay deleted"),
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    tracing::warn!(blob = %r, error = %e, "could not delete a relay; gc will");
                    continue;
                }
            }
            job_run.relay_gone(&r);
        }
    }
}
