//! One replica, one try: adopt a copy already there, resume one in flight or
//! start one (Copy Blob, or ranged through [`super::ranged`]), poll it on a
//! schedule that follows its progress, and verify it; and why a try fails
//! ([`CopyError`]).

use super::copier::{Copier, CopyContext, CopyError};
use super::*;
use crate::state::ReplicaMethod;

impl Copier<'_> {
    /// One try: adopt, resume or start the copy, poll it, verify it. Returns
    /// whether bytes were copied by this call (false when the replica was already there).
    pub(super) async fn copy_once(
        &self,
        ctx: &CopyContext<'_>,
        rec: &ReplicaRecord,
        source: &BlobPath,
    ) -> Result<bool, CopyError> {
        let from = if source.snapshot.is_some() {
            "snapshot".to_owned()
        } else {
            format!("{}/{}", source.account, source.name)
        };
        ctx.job_run.replica_copied_from(rec.index, from);
        if self.ranged(source, &rec.blob) {
            match self.copy_ranged(ctx, rec, source).await {
                // Too fragmented to list in time: this replica goes by Copy
                // Blob (nothing was written yet: the listing comes first).
                Err(CopyError::Storage(e))
                    if e.code.as_deref() == Some(crate::storage::TOO_FRAGMENTED) =>
                {
                    tracing::warn!(replica = rec.index, error = %e, "the source is too fragmented to copy by ranges; copying it with Copy Blob");
                }
                other => return other,
            }
        }
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

    /// A URL the service reads `source` from when copying into `dest`, with a
    /// SAS valid for `engine.sas_hours` across accounts.
    pub(super) async fn source_url(
        &self,
        source: &BlobPath,
        dest: &BlobPath,
        read: crate::storage::SourceRead,
    ) -> Result<String, CopyError> {
        let expiry = OffsetDateTime::now_utc()
            + time::Duration::hours(self.settings.engine.sas_hours as i64);
        self.store
            .copy_source_url(source, &dest.account, read, expiry)
            .await
            .map_err(|e| CopyError::Stop(Failure::from_storage("copy source", &e)))
    }

    /// The tags of `rec`'s blob: this deployment, job, pool, replica, snapshot.
    pub(super) fn replica_tags(
        &self,
        ctx: &CopyContext<'_>,
        rec: &ReplicaRecord,
    ) -> crate::storage::Metadata {
        let mut tags = replica_metadata(
            ctx.job,
            rec.index,
            ctx.snapshot,
            &plan::owner_tag(self.settings),
        );
        tags.insert(plan::META_RUN.to_owned(), ctx.job_run.id().to_owned());
        tags
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
        let url = self
            .source_url(source, dest, crate::storage::SourceRead::CopyBlob)
            .await?;
        let metadata = self.replica_tags(ctx, rec);
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
                        return Err(CopyError::Unsound(format!(
                            "{dest}: another copy is pending on the destination ({e})"
                        )))
                    }
                }
            }
            Err(e) => return Err(CopyError::from_storage(&e)),
        };
        // The copy id reaches the document at the next tick: cancel and resume use it.
        ctx.job_run.replica_started(
            rec.index,
            ReplicaMethod::Async,
            Some(started.copy_id.clone()),
            ctx.source_len,
        );
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
            ctx.job_run.replica_polled(rec.index);
            let c = p.copy.clone().ok_or_else(|| {
                CopyError::Unsound(format!("{}: the destination has no copy status", rec.blob))
            })?;
            if c.id != copy_id {
                return Err(CopyError::Unsound(format!(
                    "{}: the copy id changed (another writer started a copy on this blob)",
                    rec.blob
                )));
            }
            match c.state {
                CopyState::Success => return self.verify(ctx, rec, &p, copy_id),
                CopyState::Failed | CopyState::Aborted => {
                    return Err(CopyError::Unsound(format!(
                        "{}: copy {:?}{}",
                        rec.blob,
                        c.state,
                        c.description.map(|d| format!(" ({d})")).unwrap_or_default()
                    )))
                }
                CopyState::Pending => {
                    ctx.job_run.replica_progress(rec.index, c.copied, c.total);
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
            return Err(CopyError::Unsound(format!("{} {problem}", rec.blob)));
        }
        ctx.job_run.replica_verified(
            rec.index,
            ReplicaMethod::Async,
            Some(copy_id.to_owned()),
            ctx.source_len,
        );
        tracing::info!(replica = rec.index, account = %rec.account, "replica verified");
        Ok(())
    }
}
