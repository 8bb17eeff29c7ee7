//! Ranged copies: for a copy across accounts, the source's written page ranges
//! are read once and copied with synchronous Put Page From URL calls of at most
//! 4 MiB, many in flight under a per-blob pacer (additive increase, halved on
//! throttling or timeouts, as AzCopy's page-blob sender does), empty ranges
//! skipped so the replica is as sparse as its source. Progress is exact (ranges
//! done); the ranges done are checkpointed in the job document, so a resumed
//! copy writes only the rest; a cancel stops it at once. The replica is
//! verified by its length, its tags and its page ranges, which must equal the
//! source's.

use super::copier::{Copier, CopyContext, CopyError};
use super::*;
use crate::config::CopyMethod;
use crate::state::ReplicaMethod;
use crate::storage::{merge_ranges, MAX_PAGES_FROM_URL};
use std::{collections::VecDeque, ops::Range};

/// Metadata key recording how a replica was made.
pub(super) const META_METHOD: &str = "vhdrep_method";

/// Writes in flight per blob at first, and at most.
const PACER_START: f64 = 8.0;
const PACER_MAX: f64 = 32.0;
/// Times one range may fail transiently (after the request retries) before
/// the copy gives up; a long copy meets many passing failures, so the count is
/// per range (AzCopy likewise retries each chunk).
const MAX_RANGE_RETRIES: u32 = 8;

/// Whether a Put Page From URL was refused because the service does not do
/// it: Azurite answers 416, a service without it 501, and an older API
/// (Azure Stack Hub) refuses the header or the feature. A copy method to fall
/// back from, not a failure of the replica.
pub(super) fn from_url_unsupported(e: &ServiceError) -> bool {
    matches!(e.status, Some(416 | 501))
        || matches!(
            e.code.as_deref(),
            Some("UnsupportedHeader" | "FeatureNotSupported" | "NotImplemented")
        )
}

/// The per-blob pacer: one more write in flight per window of successes, half
/// as many after throttling or a timeout.
#[derive(Debug, Clone)]
pub(super) struct Pacer {
    limit: f64,
}

impl Default for Pacer {
    fn default() -> Self {
        Self { limit: PACER_START }
    }
}

impl Pacer {
    /// Writes allowed in flight now.
    pub(super) fn limit(&self) -> usize {
        self.limit.floor() as usize
    }

    /// A write succeeded.
    pub(super) fn on_success(&mut self) {
        self.limit = (self.limit + 1.0 / self.limit).min(PACER_MAX);
    }

    /// The service pushed back.
    pub(super) fn on_busy(&mut self) {
        self.limit = (self.limit / 2.0).max(1.0);
    }
}

/// What is left of `wanted` once `done` is written, in pieces of at most
/// `max` bytes.
pub(super) fn remaining(wanted: &[Range<u64>], done: &[Range<u64>], max: u64) -> Vec<Range<u64>> {
    let done = merge_ranges(done.to_vec());
    let mut out = Vec::new();
    for w in wanted {
        let mut at = w.start;
        for d in done.iter().filter(|d| d.end > w.start && d.start < w.end) {
            if d.start > at {
                out.push(at..d.start);
            }
            at = at.max(d.end);
        }
        if at < w.end {
            out.push(at..w.end);
        }
    }
    out.into_iter()
        .flat_map(|r| {
            let max = max.max(512);
            (r.start..r.end)
                .step_by(max as usize)
                .map(move |s| s..(s + max).min(r.end))
        })
        .collect()
}

impl Copier<'_> {
    /// Whether the copy of `source` into `dest` is ranged. `auto` means the
    /// best method the destination's endpoint does: Copy Blob on an emulator
    /// endpoint (Azurite has no Put Page From URL) and on an account that
    /// answered it as unsupported, ranges across accounts elsewhere.
    pub(super) fn ranged(&self, source: &BlobPath, dest: &BlobPath) -> bool {
        let method = self.settings.engine.copy_method;
        if !method.ranged(&source.account, &dest.account) {
            return false;
        }
        method != CopyMethod::Auto
            || !(self.without_from_url.contains(&dest.account)
                || self
                    .settings
                    .account(&dest.account)
                    .is_some_and(|a| !a.does_put_page_from_url()))
    }

    /// One try of a ranged copy into `rec`'s blob: adopt what an earlier try
    /// wrote, write the rest, verify.
    pub(super) async fn copy_ranged(
        &self,
        ctx: &CopyContext<'_>,
        rec: &ReplicaRecord,
        source: &BlobPath,
    ) -> Result<bool, CopyError> {
        let dest = &rec.blob;
        let wanted = self
            .store
            .page_ranges(source)
            .await
            .map_err(|e| CopyError::from_storage(&e))?;
        let done = self.ranged_start(ctx, rec).await?;
        let todo = remaining(&wanted, &done, MAX_PAGES_FROM_URL);
        let total: u64 = wanted.iter().map(|r| r.end - r.start).sum();
        // Put Page From URL needs a signed source even inside one account.
        let url = self
            .source_url(source, dest, crate::storage::SourceRead::FromUrl)
            .await?;
        tracing::debug!(replica = rec.index, account = %dest.account, ranges = todo.len(), "ranged copy");
        self.write_ranges(ctx, rec, todo, &url, total)
            .await
            .map_err(|e| match e {
                CopyError::Storage(e) if from_url_unsupported(&e) => {
                    CopyError::MethodUnsupported(e)
                }
                other => other,
            })?;
        self.verify_ranged(ctx, rec, &wanted).await?;
        Ok(true)
    }

    /// Makes the destination ready: an earlier ranged try of this replica is
    /// adopted with the ranges the document says it wrote; anything else is
    /// replaced by an empty page blob with the replica's tags. Returns the
    /// ranges already written.
    async fn ranged_start(
        &self,
        ctx: &CopyContext<'_>,
        rec: &ReplicaRecord,
    ) -> Result<Vec<Range<u64>>, CopyError> {
        let dest = &rec.blob;
        let done = ctx.job_run.replica(rec.index).ranges_done;
        let existing = match self.store.properties(dest).await {
            Ok(p) => Some(p),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(CopyError::from_storage(&e)),
        };
        let adoptable = existing.as_ref().is_some_and(|p| {
            is_our_replica(&p.metadata, ctx.job, rec.index, ctx.snapshot)
                && p.metadata.get(META_METHOD).map(String::as_str)
                    == Some(ReplicaMethod::Ranges.as_str())
                && p.len == ctx.source_len
        });
        if adoptable {
            tracing::info!(replica = rec.index, "resuming a ranged copy");
            return Ok(done);
        }
        if let Some(c) = existing.as_ref().and_then(|p| p.copy.as_ref()) {
            if c.state == CopyState::Pending {
                let _ = self.store.abort_copy(dest, &c.id).await;
            }
        }
        let mut metadata = self.replica_tags(ctx, rec);
        metadata.insert(
            META_METHOD.to_owned(),
            ReplicaMethod::Ranges.as_str().to_owned(),
        );
        self.store
            .create_page_blob(dest, ctx.source_len, &metadata)
            .await
            .map_err(|e| CopyError::from_storage(&e))?;
        ctx.job_run
            .replica_started(rec.index, ReplicaMethod::Ranges, None, ctx.source_len);
        Ok(Vec::new())
    }

    /// Writes `todo`, many ranges at once under the pacer, recording each.
    async fn write_ranges(
        &self,
        ctx: &CopyContext<'_>,
        rec: &ReplicaRecord,
        todo: Vec<Range<u64>>,
        url: &str,
        total: u64,
    ) -> Result<(), CopyError> {
        let mut pending: VecDeque<Range<u64>> = todo.into();
        let mut inflight = FuturesUnordered::new();
        let mut pacer = Pacer::default();
        let mut retries: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
        loop {
            while inflight.len() < pacer.limit() {
                let Some(r) = pending.pop_front() else { break };
                let store = self.store;
                let dest = rec.blob.clone();
                let url = url.to_owned();
                inflight.push(async move {
                    let res = store.put_pages_from_url(&dest, r.clone(), &url).await;
                    (r, res)
                });
            }
            if inflight.is_empty() {
                return Ok(());
            }
            let next = tokio::select! {
                n = inflight.next() => n,
                _ = ctx.token.cancelled() => return Err(CopyError::Stop(Failure::Interrupted)),
            };
            let Some((r, res)) = next else {
                return Ok(());
            };
            match res {
                Ok(()) => {
                    pacer.on_success();
                    ctx.job_run
                        .replica_range_written(rec.index, r, total, ctx.source_len);
                }
                Err(e)
                    if e.class.is_retryable()
                        && *retries.entry(r.start).or_default() < MAX_RANGE_RETRIES =>
                {
                    *retries.entry(r.start).or_default() += 1;
                    pacer.on_busy();
                    tracing::debug!(replica = rec.index, error = %e, "a range write failed; writing it again later");
                    pending.push_back(r);
                }
                Err(e) => return Err(CopyError::from_storage(&e)),
            }
        }
    }

    /// The replica holds exactly the source's pages: length, tags and page ranges.
    async fn verify_ranged(
        &self,
        ctx: &CopyContext<'_>,
        rec: &ReplicaRecord,
        wanted: &[Range<u64>],
    ) -> Result<(), CopyError> {
        let p = self
            .store
            .properties(&rec.blob)
            .await
            .map_err(|e| CopyError::from_storage(&e))?;
        let got = self
            .store
            .page_ranges(&rec.blob)
            .await
            .map_err(|e| CopyError::from_storage(&e))?;
        let problem = if p.kind != BlobKind::Page {
            Some(format!("is a {:?} blob, not a page blob", p.kind))
        } else if p.len != ctx.source_len {
            Some(format!(
                "holds {} bytes, the source {}",
                p.len, ctx.source_len
            ))
        } else if !is_our_replica(&p.metadata, ctx.job, rec.index, ctx.snapshot) {
            Some("does not carry this replica's tags".to_owned())
        } else if got != wanted {
            Some(format!(
                "has {} page ranges where the source has {}",
                got.len(),
                wanted.len()
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            ctx.job_run.replica_ranges_forgotten(rec.index);
            return Err(CopyError::Unsound(format!("{} {problem}", rec.blob)));
        }
        ctx.job_run
            .replica_verified(rec.index, ReplicaMethod::Ranges, None, ctx.source_len);
        tracing::info!(replica = rec.index, account = %rec.account, method = "ranges", "replica verified");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn what_remains_is_split_and_skips_what_is_done() {
        const M: u64 = 1024 * 1024;
        let wanted = vec![0..10 * M, 20 * M..20 * M + 512];
        assert_eq!(
            remaining(&wanted, &[], 4 * M),
            vec![0..4 * M, 4 * M..8 * M, 8 * M..10 * M, 20 * M..20 * M + 512]
        );
        assert_eq!(
            remaining(&wanted, &[0..4 * M, 8 * M..10 * M], 4 * M),
            vec![4 * M..8 * M, 20 * M..20 * M + 512]
        );
        assert_eq!(
            remaining(&wanted, &[2 * M..3 * M], 4 * M),
            vec![0..2 * M, 3 * M..7 * M, 7 * M..10 * M, 20 * M..20 * M + 512]
        );
        assert!(remaining(&wanted, &[0..30 * M], 4 * M).is_empty());
    }

    #[test]
    fn the_pacer_grows_slowly_and_halves_on_pushback() {
        let mut p = Pacer::default();
        assert_eq!(p.limit(), 8);
        // One more per window of about eight successes.
        for _ in 0..9 {
            p.on_success();
        }
        assert_eq!(p.limit(), 9);
        p.on_busy();
        assert_eq!(p.limit(), 4);
        for _ in 0..10 {
            p.on_busy();
        }
        assert_eq!(p.limit(), 1);
        for _ in 0..10_000 {
            p.on_success();
        }
        assert_eq!(p.limit(), 32);
    }
}
