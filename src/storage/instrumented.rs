//! A [`BlobStore`] wrapper that is itself a store: every attempt takes a token from
//! the account's request-rate limiter (governor), runs under the attempt timeout,
//! is counted in the metrics, tells the account's adaptive copy gate whether it
//! was throttled, and retryable failures are retried under the one
//! [`RetryPolicy`](crate::azure::retry::RetryPolicy), through
//! [`Outbound`], the call path of every Azure client.

use super::{
    AccountInfo, BlobPath, BlobProperties, BlobStore, Condition, CopyStarted, Metadata, SourceRead,
    StorageResult,
};
use crate::azure::{outbound::Outbound, retry::Idempotency};
use async_trait::async_trait;
use bytes::Bytes;
use std::{future::Future, sync::Arc};
use time::OffsetDateTime;
use url::Url;

/// Rate-limited, timed, retried, counted storage.
#[derive(Debug)]
pub(crate) struct Instrumented {
    inner: Arc<dyn BlobStore>,
    out: Outbound,
}

impl Instrumented {
    /// Wraps `inner` in the outbound call path.
    pub(crate) fn new(inner: Arc<dyn BlobStore>, out: Outbound) -> Self {
        Self { inner, out }
    }

    async fn call<T, F, Fut>(
        &self,
        account: &str,
        operation: &'static str,
        f: F,
    ) -> StorageResult<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = StorageResult<T>>,
    {
        self.out
            .call(account, operation, Idempotency::Idempotent, f)
            .await
    }
}

#[async_trait]
impl BlobStore for Instrumented {
    fn blob_url(&self, blob: &BlobPath) -> StorageResult<Url> {
        self.inner.blob_url(blob)
    }

    async fn copy_source_url(
        &self,
        source: &BlobPath,
        dest_account: &str,
        read: SourceRead,
        expiry: OffsetDateTime,
    ) -> StorageResult<String> {
        self.inner
            .copy_source_url(source, dest_account, read, expiry)
            .await
    }

    async fn ensure_container(&self, account: &str, container: &str) -> StorageResult<()> {
        self.call(account, "create_container", || {
            self.inner.ensure_container(account, container)
        })
        .await
    }

    async fn properties(&self, blob: &BlobPath) -> StorageResult<BlobProperties> {
        self.call(&blob.account, "get_properties", || {
            self.inner.properties(blob)
        })
        .await
    }

    async fn snapshot(&self, blob: &BlobPath, metadata: &Metadata) -> StorageResult<String> {
        self.out
            .call(
                &blob.account,
                "create_snapshot",
                Idempotency::NotIdempotent,
                || self.inner.snapshot(blob, metadata),
            )
            .await
    }

    async fn start_copy(
        &self,
        dest: &BlobPath,
        source_url: &str,
        metadata: &Metadata,
    ) -> StorageResult<CopyStarted> {
        self.out
            .call(
                &dest.account,
                "start_copy",
                Idempotency::NotIdempotent,
                || self.inner.start_copy(dest, source_url, metadata),
            )
            .await
    }

    async fn abort_copy(&self, dest: &BlobPath, copy_id: &str) -> StorageResult<()> {
        self.call(&dest.account, "abort_copy", || {
            self.inner.abort_copy(dest, copy_id)
        })
        .await
    }

    async fn delete(&self, blob: &BlobPath) -> StorageResult<()> {
        self.call(&blob.account, "delete", || self.inner.delete(blob))
            .await
    }

    async fn delete_if_match(&self, blob: &BlobPath, etag: &str) -> StorageResult<()> {
        self.call(&blob.account, "delete", || {
            self.inner.delete_if_match(blob, etag)
        })
        .await
    }

    async fn account_info(&self, account: &str) -> StorageResult<AccountInfo> {
        self.call(account, "get_account_info", || {
            self.inner.account_info(account)
        })
        .await
    }

    async fn put_block_blob(
        &self,
        blob: &BlobPath,
        data: Bytes,
        metadata: &Metadata,
        condition: Condition,
    ) -> StorageResult<String> {
        self.call(&blob.account, "put_blob", || {
            self.inner
                .put_block_blob(blob, data.clone(), metadata, condition.clone())
        })
        .await
    }

    async fn put_page_blob(&self, blob: &BlobPath, data: Bytes) -> StorageResult<()> {
        self.call(&blob.account, "put_page_blob", || {
            self.inner.put_page_blob(blob, data.clone())
        })
        .await
    }

    async fn page_ranges_page(
        &self,
        blob: &BlobPath,
        marker: Option<&str>,
    ) -> StorageResult<(Vec<std::ops::Range<u64>>, Option<String>)> {
        self.call(&blob.account, "get_page_ranges", || {
            self.inner.page_ranges_page(blob, marker)
        })
        .await
    }

    async fn create_page_blob(
        &self,
        blob: &BlobPath,
        len: u64,
        metadata: &Metadata,
    ) -> StorageResult<()> {
        self.call(&blob.account, "create_page_blob", || {
            self.inner.create_page_blob(blob, len, metadata)
        })
        .await
    }

    async fn put_pages_from_url(
        &self,
        dest: &BlobPath,
        range: std::ops::Range<u64>,
        source_url: &str,
    ) -> StorageResult<()> {
        self.call(&dest.account, "put_page_from_url", || {
            self.inner
                .put_pages_from_url(dest, range.clone(), source_url)
        })
        .await
    }

    async fn read(
        &self,
        blob: &BlobPath,
        range: Option<std::ops::Range<u64>>,
    ) -> StorageResult<(Bytes, String)> {
        self.call(&blob.account, "read", || {
            self.inner.read(blob, range.clone())
        })
        .await
    }

    async fn list(
        &self,
        account: &str,
        container: &str,
        prefix: &str,
    ) -> StorageResult<Vec<String>> {
        self.call(account, "list_blobs", || {
            self.inner.list(account, container, prefix)
        })
        .await
    }

    async fn list_detailed(
        &self,
        account: &str,
        container: &str,
        prefix: &str,
        snapshots: bool,
    ) -> StorageResult<Vec<super::ListedBlob>> {
        self.call(account, "list_blobs", || {
            self.inner
                .list_detailed(account, container, prefix, snapshots)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::azure::{limits::AccountLimits, retry::RetryPolicy};
    use crate::metrics::Metrics;
    use crate::storage::{MAX_RANGE_PAGES, TOO_FRAGMENTED};
    use crate::testkit::sim::{SimConfig, SimFault, SimFaultAction, SimStore};

    fn instrumented(sim: SimStore) -> (Instrumented, Metrics) {
        let metrics = Metrics::new();
        let limits = Arc::new(AccountLimits::new([("a".to_owned(), 20_000, 16)]));
        let retry = RetryPolicy {
            jitter_seed: Some(1),
            ..RetryPolicy::default()
        };
        let out = Outbound::new(limits, metrics.clone(), retry);
        (Instrumented::new(Arc::new(sim), out), metrics)
    }

    fn page_list_requests(metrics: &Metrics) -> u64 {
        metrics
            .render()
            .lines()
            .filter(|l| {
                l.starts_with("vhdrep_storage_requests_total") && l.contains("get_page_ranges")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// Get Page Ranges is listed page by page, each page its own request under
    /// the retry policy: a page that fails twice is asked again from its own
    /// marker (two more requests, not the whole listing again), and the ranges
    /// come back whole and merged.
    #[tokio::test(start_paused = true)]
    async fn page_ranges_resume_from_the_failed_page() {
        let sim = SimStore::new(SimConfig {
            page_ranges_per_page: 2,
            ..SimConfig::instant()
        });
        let blob = BlobPath::new("a", "c", "frag.vhd");
        let mut data = vec![0u8; 64 * 1024];
        for i in 0..7 {
            data[i * 8192..i * 8192 + 512].fill(1);
        }
        sim.ensure_container("a", "c").await.unwrap();
        sim.put_page_blob(&blob, Bytes::from(data)).await.unwrap();
        sim.inject(SimFault {
            operation: "get_page_ranges",
            target_contains: "marker=4".into(),
            action: SimFaultAction::Fail(500, "OperationTimedOut"),
            times: 2,
            from: std::time::Duration::ZERO,
        });
        let (store, metrics) = instrumented(sim);
        let ranges = store.page_ranges(&blob).await.unwrap();
        assert_eq!(ranges.len(), 7, "{ranges:?}");
        assert_eq!(ranges[6], 6 * 8192..6 * 8192 + 512);
        assert_eq!(
            page_list_requests(&metrics),
            4 + 2,
            "four pages, the third asked twice more"
        );
    }

    /// A blob whose listing runs past the page limit is refused as too
    /// fragmented (the ranged copy then uses Copy Blob).
    #[tokio::test(start_paused = true)]
    async fn a_listing_past_the_page_limit_is_too_fragmented() {
        let sim = SimStore::new(SimConfig {
            page_ranges_per_page: 1,
            ..SimConfig::instant()
        });
        let blob = BlobPath::new("a", "c", "frag.vhd");
        let n = MAX_RANGE_PAGES + 1;
        let mut data = vec![0u8; n * 1024];
        for i in 0..n {
            data[i * 1024..i * 1024 + 512].fill(1);
        }
        sim.ensure_container("a", "c").await.unwrap();
        sim.put_page_blob(&blob, Bytes::from(data)).await.unwrap();
        let (store, _) = instrumented(sim);
        let e = store.page_ranges(&blob).await.unwrap_err();
        assert_eq!(e.code.as_deref(), Some(TOO_FRAGMENTED), "{e}");
    }
}
