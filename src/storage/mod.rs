//! Blob storage behind one narrow trait.
//!
//! [`BlobStore`] is everything the daemon asks of Azure Blob Storage: snapshots,
//! server-side copies and their status, account information, and small JSON
//! documents for job state. `azure::AzureStore` talks to Azure (or Azurite);
//! the test kit's `SimStore` keeps everything in memory: with
//! `SimConfig::instant` for unit tests (copies done at once), or as a model of Azure's bandwidths,
//! limits and faults on virtual time for property tests and benchmarks. The
//! conformance suite in `tests/` runs the same checks against both.

pub mod azure;
pub mod instrumented;

use crate::azure::{ErrorClass, ServiceError};
use async_trait::async_trait;
use bytes::Bytes;
use std::{collections::BTreeMap, fmt};
use time::OffsetDateTime;
use url::Url;

/// Metadata keys as stored on blobs (Azure lower-cases them).
pub type Metadata = BTreeMap<String, String>;

/// Where a blob lives: account (as configured), container, name, optional snapshot.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct BlobPath {
    /// Configured account name.
    pub account: String,
    /// Container name.
    pub container: String,
    /// Blob name, `/` allowed.
    pub name: String,
    /// Snapshot time, when this addresses a snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

impl BlobPath {
    /// A path to the base blob.
    pub fn new(account: &str, container: &str, name: &str) -> Self {
        Self {
            account: account.to_owned(),
            container: container.to_owned(),
            name: name.to_owned(),
            snapshot: None,
        }
    }

    /// The same blob at a snapshot.
    pub fn at_snapshot(&self, snapshot: &str) -> Self {
        Self {
            snapshot: Some(snapshot.to_owned()),
            ..self.clone()
        }
    }
}

impl fmt::Display for BlobPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.account, self.container, self.name)?;
        if let Some(s) = &self.snapshot {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

/// Kind of blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BlobKind {
    /// Page blob: what a VHD must be.
    Page,
    /// Block blob.
    Block,
    /// Append blob.
    Append,
}

/// State of the last copy into a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    /// Still running.
    Pending,
    /// Finished.
    Success,
    /// Aborted by a client.
    Aborted,
    /// Failed in the service.
    Failed,
}

/// What the destination says of its last copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInfo {
    /// Copy id (`x-ms-copy-id`).
    pub id: String,
    /// Status.
    pub state: CopyState,
    /// Bytes copied so far.
    pub copied: u64,
    /// Bytes to copy.
    pub total: u64,
    /// Status description (free text; do not parse).
    pub description: Option<String>,
    /// The copy source as the service records it (SAS redacted).
    pub source: Option<String>,
}

/// Properties of a blob.
#[derive(Debug, Clone)]
pub struct BlobProperties {
    /// Length in bytes.
    pub len: u64,
    /// Kind of blob.
    pub kind: BlobKind,
    /// ETag.
    pub etag: String,
    /// User metadata.
    pub metadata: Metadata,
    /// Last copy into this blob, if any.
    pub copy: Option<CopyInfo>,
}

/// A copy the service accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyStarted {
    /// The copy id to track and abort it by.
    pub copy_id: String,
    /// `Success` when the service finished at once, otherwise `Pending`.
    pub state: CopyState,
}

/// What Get Account Information says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountInfo {
    /// e.g. `Standard_LRS`, `Premium_LRS`.
    pub sku: String,
    /// e.g. `StorageV2`, `BlockBlobStorage`.
    pub kind: String,
}

impl AccountInfo {
    /// Whether Batch accepts custom VHDs from this account: standard, general purpose.
    pub fn suits_batch_images(&self) -> Result<(), String> {
        if !self.sku.starts_with("Standard") {
            return Err(format!(
                "account SKU is {}; Batch custom images need a standard (not premium) account",
                self.sku
            ));
        }
        if self.kind != "StorageV2" && self.kind != "Storage" {
            return Err(format!(
                "account kind is {}; Batch custom images need a general-purpose account (StorageV2 or Storage)",
                self.kind
            ));
        }
        Ok(())
    }
}

/// What to tell a person when Get Account Information fails on `account`.
/// Azure answers it with 404 `ResourceNotFound` (not 403) when an Entra ID
/// identity has no data role on the account.
pub(crate) fn account_info_problem(account: &str, e: &ServiceError) -> String {
    if e.status == Some(404) && e.code.as_deref() == Some("ResourceNotFound") {
        return format!(
            "account {account}: Get Account Information answered 404 ResourceNotFound, Azure's answer to an identity without a data role on the account: assign the daemon's identity \"Storage Blob Data Contributor\" on account {account} (and \"Storage Queue Data Contributor\" on the control account), then allow a few minutes for the assignment to apply; with a shared key, check the account name and blob_endpoint"
        );
    }
    format!("account {account}: {e}")
}

/// A write condition for optimistic concurrency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Write whatever is there.
    Always,
    /// Write only if the blob does not exist.
    IfAbsent,
    /// Write only if the blob still has this ETag.
    IfMatch(String),
}

/// Result of a storage operation.
pub(crate) type StorageResult<T> = Result<T, ServiceError>;

/// The largest range one Put Page From URL may write.
pub const MAX_PAGES_FROM_URL: u64 = 4 * 1024 * 1024;

/// Merges touching or overlapping ranges (sorted by start) into as few as possible.
pub(crate) fn merge_ranges(mut ranges: Vec<std::ops::Range<u64>>) -> Vec<std::ops::Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<std::ops::Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges.into_iter().filter(|r| r.start < r.end) {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Pages of Get Page Ranges a ranged copy lists before it takes the source as
/// too fragmented to copy by ranges (the service returns thousands of ranges
/// a page; a VHD past this many pages is better copied by Copy Blob).
pub const MAX_RANGE_PAGES: usize = 64;

/// Error code of a page-range listing past [`MAX_RANGE_PAGES`] pages.
pub(crate) const TOO_FRAGMENTED: &str = "TooFragmented";

/// How the service reads a copy's source, which decides whether its URL must
/// carry a SAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRead {
    /// An asynchronous Copy Blob: inside one account the destination's own
    /// authorization covers the source; across accounts it needs a SAS.
    CopyBlob,
    /// A synchronous from-URL call (Put Page From URL): the source must be
    /// authorized even inside one account (azure-sdk-for-net#32523 and #32028,
    /// azure-sdk-for-python#36176), so its URL always carries a SAS.
    FromUrl,
}

/// Everything the daemon asks of blob storage.
#[async_trait]
pub trait BlobStore: Send + Sync + fmt::Debug {
    /// The blob's URL without any SAS (what the hand-off carries).
    fn blob_url(&self, blob: &BlobPath) -> StorageResult<Url>;

    /// A URL the service can read `source` from when copying into
    /// `dest_account` as `read` says: plain for a Copy Blob inside one
    /// account, else with a read-only SAS valid until `expiry`.
    async fn copy_source_url(
        &self,
        source: &BlobPath,
        dest_account: &str,
        read: SourceRead,
        expiry: OffsetDateTime,
    ) -> StorageResult<String>;

    /// Creates the container if it does not exist.
    async fn ensure_container(&self, account: &str, container: &str) -> StorageResult<()>;

    /// Properties, metadata and copy status of a blob.
    async fn properties(&self, blob: &BlobPath) -> StorageResult<BlobProperties>;

    /// Takes a snapshot tagged with `metadata` and returns its time stamp.
    async fn snapshot(&self, blob: &BlobPath, metadata: &Metadata) -> StorageResult<String>;

    /// Starts a server-side copy into `dest`, tagging it with `metadata`.
    async fn start_copy(
        &self,
        dest: &BlobPath,
        source_url: &str,
        metadata: &Metadata,
    ) -> StorageResult<CopyStarted>;

    /// Aborts a pending copy.
    async fn abort_copy(&self, dest: &BlobPath, copy_id: &str) -> StorageResult<()>;

    /// Deletes a blob (with its snapshots) or one snapshot.
    async fn delete(&self, blob: &BlobPath) -> StorageResult<()>;

    /// Deletes a base blob only if it still has `etag` (412 otherwise).
    async fn delete_if_match(&self, blob: &BlobPath, etag: &str) -> StorageResult<()>;

    /// SKU and kind of an account.
    async fn account_info(&self, account: &str) -> StorageResult<AccountInfo>;

    /// Writes a small block blob with `metadata` under a condition and returns
    /// the new ETag.
    async fn put_block_blob(
        &self,
        blob: &BlobPath,
        data: Bytes,
        metadata: &Metadata,
        condition: Condition,
    ) -> StorageResult<String>;

    /// Creates a page blob holding `data` (a whole number of 512-byte pages).
    async fn put_page_blob(&self, blob: &BlobPath, data: Bytes) -> StorageResult<()>;

    /// One page of a page blob's written ranges (Get Page Ranges), from
    /// `marker` (none for the first page): the ranges, ends exclusive, and the
    /// marker of the next page when there is one.
    async fn page_ranges_page(
        &self,
        blob: &BlobPath,
        marker: Option<&str>,
    ) -> StorageResult<(Vec<std::ops::Range<u64>>, Option<String>)>;

    /// The written ranges of a page blob (or of one snapshot of it), in order
    /// and merged: what a ranged copy must carry. Listed page by page, each
    /// page one request (so a wrapper times and retries each, and a retry
    /// resumes from the last marker, never from the first page); a blob whose
    /// listing runs past [`MAX_RANGE_PAGES`] pages is refused with
    /// `TooFragmented` (a Copy Blob copies it instead).
    async fn page_ranges(&self, blob: &BlobPath) -> StorageResult<Vec<std::ops::Range<u64>>> {
        let mut ranges = Vec::new();
        let mut marker: Option<String> = None;
        for _ in 0..MAX_RANGE_PAGES {
            let (page, next) = self.page_ranges_page(blob, marker.as_deref()).await?;
            ranges.extend(page);
            match next.filter(|m| !m.is_empty()) {
                Some(m) => marker = Some(m),
                None => return Ok(merge_ranges(ranges)),
            }
        }
        let mut e = ServiceError::other(
            "get_page_ranges",
            blob,
            ErrorClass::Invalid,
            format!("more than {MAX_RANGE_PAGES} pages of page ranges: too fragmented to copy by ranges"),
        );
        e.code = Some(TOO_FRAGMENTED.to_owned());
        Err(e)
    }

    /// Creates an empty page blob of `len` bytes (a whole number of pages)
    /// tagged with `metadata`, replacing any blob of that name.
    async fn create_page_blob(
        &self,
        blob: &BlobPath,
        len: u64,
        metadata: &Metadata,
    ) -> StorageResult<()>;

    /// Writes `range` of the page blob `dest` from the same range of the blob
    /// at `source_url` (Put Page From URL: synchronous, server-side, at most
    /// [`MAX_PAGES_FROM_URL`] bytes, 512-byte aligned). Writing the same range
    /// again gives the same result, so it is idempotent.
    async fn put_pages_from_url(
        &self,
        dest: &BlobPath,
        range: std::ops::Range<u64>,
        source_url: &str,
    ) -> StorageResult<()>;

    /// Reads a blob, or a byte range of it, with its ETag.
    async fn read(
        &self,
        blob: &BlobPath,
        range: Option<std::ops::Range<u64>>,
    ) -> StorageResult<(Bytes, String)>;

    /// Names of the base blobs under a prefix.
    async fn list(
        &self,
        account: &str,
        container: &str,
        prefix: &str,
    ) -> StorageResult<Vec<String>>;

    /// Blobs under a prefix with metadata and last change, snapshots too when asked.
    async fn list_detailed(
        &self,
        account: &str,
        container: &str,
        prefix: &str,
        snapshots: bool,
    ) -> StorageResult<Vec<ListedBlob>>;
}

/// Where a blob is, for someone reading it with their own access: its URL (no
/// SAS) and its account, container and name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlobReference {
    /// Its URL (no SAS).
    pub uri: String,
    /// The configured account name.
    pub account: String,
    /// Container.
    pub container: String,
    /// Blob name.
    pub blob: String,
}

/// A blob as a detailed listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedBlob {
    /// Blob name.
    pub name: String,
    /// Snapshot time, for a snapshot.
    pub snapshot: Option<String>,
    /// User metadata (keys lower-cased).
    pub metadata: Metadata,
    /// Last change.
    pub last_modified: Option<OffsetDateTime>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_when_they_touch_or_overlap() {
        assert_eq!(
            merge_ranges(vec![2048..4096, 0..512, 512..1024, 3000..5000, 9..9]),
            vec![0..1024, 2048..5000]
        );
        assert!(merge_ranges(Vec::new()).is_empty());
    }

    #[test]
    fn a_snapshot_path_is_the_same_blob_at_that_time() {
        let base = BlobPath::new("a", "c", "dir/x.vhd");
        let at = base.at_snapshot("2026-01-01T00:00:00.0000000Z");
        assert_eq!(at.snapshot.as_deref(), Some("2026-01-01T00:00:00.0000000Z"));
        assert_eq!(
            (&at.account, &at.container, &at.name),
            (&base.account, &base.container, &base.name)
        );
        assert_eq!(at.to_string(), "a/c/dir/x.vhd@2026-01-01T00:00:00.0000000Z");
    }

    #[test]
    fn batch_images_need_a_standard_general_purpose_account() {
        let info = |sku: &str, kind: &str| AccountInfo {
            sku: sku.into(),
            kind: kind.into(),
        };
        assert!(info("Standard_LRS", "StorageV2")
            .suits_batch_images()
            .is_ok());
        assert!(info("Standard_GRS", "Storage").suits_batch_images().is_ok());
        let e = info("Premium_LRS", "StorageV2")
            .suits_batch_images()
            .unwrap_err();
        assert!(e.contains("Premium_LRS") && e.contains("standard"), "{e}");
        let e = info("Standard_LRS", "BlobStorage")
            .suits_batch_images()
            .unwrap_err();
        assert!(
            e.contains("BlobStorage") && e.contains("general-purpose"),
            "{e}"
        );
        assert!(info("Premium_LRS", "BlockBlobStorage")
            .suits_batch_images()
            .is_err());
    }

    #[test]
    fn a_missing_data_role_is_named_as_such() {
        let no_role = ServiceError::http("account info", "dst1", 404, Some("ResourceNotFound"));
        let m = account_info_problem("dst1", &no_role);
        assert!(
            m.contains("Storage Blob Data Contributor") && m.contains("dst1"),
            "{m}"
        );
        for other in [
            ServiceError::http("account info", "dst1", 404, Some("ContainerNotFound")),
            ServiceError::http("account info", "dst1", 403, Some("ResourceNotFound")),
            ServiceError::http("account info", "dst1", 403, None),
        ] {
            let m = account_info_problem("dst1", &other);
            assert!(!m.contains("Data Contributor"), "{m}");
            assert!(
                m.starts_with("account dst1: ") && m.contains(&other.message),
                "{m}"
            );
        }
    }

    #[test]
    fn statuses_are_classified_once() {
        use ErrorClass::*;
        for (status, code, class) in [
            (404, None, NotFound),
            (409, Some("PendingCopyOperation"), Conflict),
            (409, None, Conflict),
            (400, Some("PopReceiptMismatch"), Conflict),
            (400, Some("InvalidHeaderValue"), Invalid),
            (412, None, PreconditionFailed),
            (429, None, Throttled),
            (503, Some("ServerBusy"), Throttled),
            (500, Some("CannotVerifyCopySource"), Transient),
            (408, None, Transient),
            (502, None, Transient),
            (504, None, Transient),
            (403, Some("CannotVerifyCopySource"), Denied),
            (401, None, Denied),
            (416, None, Invalid),
        ] {
            assert_eq!(
                ErrorClass::from_status(status, code),
                class,
                "{status} {code:?}"
            );
        }
        assert!(Throttled.is_retryable() && Transient.is_retryable());
        assert!(!Denied.is_retryable() && !Conflict.is_retryable() && !NotFound.is_retryable());
    }

    #[test]
    fn lost_messages_and_missing_blobs_are_told_apart() {
        let e = |status, code| ServiceError::http("op", "t", status, code);
        assert!(e(404, None).is_not_found());
        assert!(!e(409, None).is_not_found());
        assert!(!e(412, None).is_not_found());
        assert!(e(404, Some("MessageNotFound")).is_lost_message());
        assert!(e(400, Some("PopReceiptMismatch")).is_lost_message());
        assert!(!e(500, None).is_lost_message());
        assert!(!e(403, None).is_lost_message());
    }
}
