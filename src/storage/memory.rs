//! An in-memory [`BlobStore`] for unit tests: copies finish at once, ETags change
//! on every write, containers are created on demand.

use super::{
    AccountInfo, BlobKind, BlobPath, BlobProperties, BlobStore, Condition, CopyInfo, CopyStarted,
    CopyState, ErrorClass, Metadata, StorageError, StorageResult,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
};
use time::OffsetDateTime;
use url::Url;

#[derive(Debug, Clone)]
struct Blob {
    data: Bytes,
    kind: BlobKind,
    etag: u64,
    metadata: Metadata,
    copy: Option<CopyInfo>,
    modified: OffsetDateTime,
}

#[derive(Debug, Default)]
struct Inner {
    containers: HashSet<(String, String)>,
    blobs: BTreeMap<BlobPath, Blob>,
    next_etag: u64,
    next_snapshot: u64,
    account_info: HashMap<String, AccountInfo>,
}

/// Blob storage in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

const SCHEME_BASE: &str = "http://memory.invalid";

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `account` answer Get Account Information with this SKU and kind.
    pub fn set_account_info(&self, account: &str, info: AccountInfo) {
        self.lock().account_info.insert(account.to_owned(), info);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("memory store lock poisoned")
    }

    fn not_found(op: &'static str, blob: &BlobPath) -> StorageError {
        StorageError::http(op, blob, 404, Some("BlobNotFound"))
    }
}

/// Applies a write condition as the service does: 412 for an existing blob under
/// `IfAbsent` or another ETag under `IfMatch`, 404 for `IfMatch` on nothing.
pub(crate) fn check_condition(
    op: &'static str,
    blob: &BlobPath,
    condition: &Condition,
    current_etag: Option<&str>,
) -> StorageResult<()> {
    match (condition, current_etag) {
        (Condition::IfAbsent, Some(_)) => {
            Err(StorageError::http(op, blob, 412, Some("BlobAlreadyExists")))
        }
        (Condition::IfMatch(_), None) => {
            Err(StorageError::http(op, blob, 404, Some("BlobNotFound")))
        }
        (Condition::IfMatch(want), Some(have)) if want != have => {
            Err(StorageError::http(op, blob, 412, Some("ConditionNotMet")))
        }
        _ => Ok(()),
    }
}

/// Parses a URL made by [`url_of`] (query parameters such as a SAS ignored).
pub(crate) fn parse_source(url: &str) -> Option<BlobPath> {
    let url = Url::parse(url).ok()?;
    let mut segments = url.path_segments()?;
    let account = segments.next()?.to_owned();
    let container = segments.next()?.to_owned();
    let name = segments.collect::<Vec<_>>().join("/");
    let name = percent_decode(&name);
    let snapshot = url
        .query_pairs()
        .find(|(k, _)| k == "snapshot")
        .map(|(_, v)| v.into_owned());
    Some(BlobPath {
        account,
        container,
        name,
        snapshot,
    })
}

/// A path-style URL of `blob` under `base` (for stores without real endpoints).
pub(crate) fn url_of(base: &str, blob: &BlobPath) -> Url {
    let mut url = Url::parse(base).expect("static base URL parses");
    url.path_segments_mut()
        .expect("base URL")
        .push(&blob.account)
        .push(&blob.container)
        .extend(blob.name.split('/'));
    if let Some(s) = &blob.snapshot {
        url.query_pairs_mut().append_pair("snapshot", s);
    }
    url
}

/// A copy-source URL: plain inside one account, with a stand-in SAS across accounts.
pub(crate) fn source_url_of(
    base: &str,
    source: &BlobPath,
    dest_account: &str,
    expiry: OffsetDateTime,
) -> String {
    let mut url = url_of(base, source);
    if source.account != dest_account {
        url.query_pairs_mut()
            .append_pair("sp", "r")
            .append_pair("se", &super::auth::sas_time(expiry))
            .append_pair("sig", "simulated-signature");
    }
    url.to_string()
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[async_trait]
impl BlobStore for MemoryStore {
    fn blob_url(&self, blob: &BlobPath) -> StorageResult<Url> {
        Ok(url_of(SCHEME_BASE, blob))
    }

    async fn copy_source_url(
        &self,
        source: &BlobPath,
        dest_account: &str,
        expiry: OffsetDateTime,
    ) -> StorageResult<String> {
        Ok(source_url_of(SCHEME_BASE, source, dest_account, expiry))
    }

    async fn ensure_container(&self, account: &str, container: &str) -> StorageResult<()> {
        self.lock()
            .containers
            .insert((account.to_owned(), container.to_owned()));
        Ok(())
    }

    async fn properties(&self, blob: &BlobPath) -> StorageResult<BlobProperties> {
        let inner = self.lock();
        let b = inner
            .blobs
            .get(blob)
            .ok_or_else(|| Self::not_found("get_properties", blob))?;
        Ok(BlobProperties {
            len: b.data.len() as u64,
            kind: b.kind,
            etag: format!("\"0x{:X}\"", b.etag),
            metadata: b.metadata.clone(),
            copy: b.copy.clone(),
        })
    }

    async fn snapshot(&self, blob: &BlobPath, metadata: &Metadata) -> StorageResult<String> {
        let mut inner = self.lock();
        let b = inner
            .blobs
            .get(blob)
            .cloned()
            .ok_or_else(|| Self::not_found("create_snapshot", blob))?;
        inner.next_snapshot += 1;
        let stamp = format!(
            "2026-01-01T00:00:00.{:07}Z",
            inner.next_snapshot % 10_000_000
        );
        let snap = Blob {
            metadata: metadata.clone(),
            copy: None,
            modified: OffsetDateTime::now_utc(),
            ..b
        };
        inner.blobs.insert(blob.at_snapshot(&stamp), snap);
        Ok(stamp)
    }

    async fn start_copy(
        &self,
        dest: &BlobPath,
        source_url: &str,
        metadata: &Metadata,
    ) -> StorageResult<CopyStarted> {
        const OP: &str = "start_copy";
        let source = parse_source(source_url).ok_or_else(|| {
            StorageError::other(
                OP,
                dest,
                ErrorClass::Invalid,
                "copy source is not a URL of this store",
            )
        })?;
        if source.account != dest.account && !source_url.contains("sig=") {
            return Err(StorageError::http(
                OP,
                dest,
                403,
                Some("CannotVerifyCopySource"),
            ));
        }
        let mut inner = self.lock();
        if !inner
            .containers
            .contains(&(dest.account.clone(), dest.container.clone()))
        {
            return Err(StorageError::http(OP, dest, 404, Some("ContainerNotFound")));
        }
        if let Some(existing) = inner.blobs.get(dest) {
            if existing.copy.as_ref().map(|c| c.state) == Some(CopyState::Pending) {
                return Err(StorageError::http(
                    OP,
                    dest,
                    409,
                    Some("PendingCopyOperation"),
                ));
            }
        }
        let src = inner
            .blobs
            .get(&source)
            .cloned()
            .ok_or_else(|| StorageError::http(OP, dest, 404, Some("CannotVerifyCopySource")))?;
        inner.next_etag += 1;
        let copy_id = uuid::Uuid::new_v4().to_string();
        let len = src.data.len() as u64;
        let blob = Blob {
            data: src.data,
            kind: src.kind,
            etag: inner.next_etag,
            metadata: metadata.clone(),
            copy: Some(CopyInfo {
                id: copy_id.clone(),
                state: CopyState::Success,
                copied: len,
                total: len,
                description: None,
                source: Some(super::auth::redact_sas(source_url)),
            }),
            modified: OffsetDateTime::now_utc(),
        };
        inner.blobs.insert(dest.clone(), blob);
        Ok(CopyStarted {
            copy_id,
            state: CopyState::Success,
        })
    }

    async fn abort_copy(&self, dest: &BlobPath, _copy_id: &str) -> StorageResult<()> {
        let inner = self.lock();
        match inner.blobs.get(dest) {
            None => Err(Self::not_found("abort_copy", dest)),
            Some(_) => Err(StorageError::http(
                "abort_copy",
                dest,
                409,
                Some("NoPendingCopyOperation"),
            )),
        }
    }

    async fn delete(&self, blob: &BlobPath) -> StorageResult<()> {
        let mut inner = self.lock();
        if inner.blobs.remove(blob).is_none() {
            return Err(Self::not_found("delete", blob));
        }
        if blob.snapshot.is_none() {
            inner.blobs.retain(|k, _| {
                !(k.account == blob.account && k.container == blob.container && k.name == blob.name)
            });
        }
        Ok(())
    }

    async fn account_info(&self, account: &str) -> StorageResult<AccountInfo> {
        Ok(self
            .lock()
            .account_info
            .get(account)
            .cloned()
            .unwrap_or(AccountInfo {
                sku: "Standard_LRS".into(),
                kind: "StorageV2".into(),
            }))
    }

    async fn put_block_blob(
        &self,
        blob: &BlobPath,
        data: Bytes,
        condition: Condition,
    ) -> StorageResult<String> {
        const OP: &str = "put_blob";
        let mut inner = self.lock();
        if !inner
            .containers
            .contains(&(blob.account.clone(), blob.container.clone()))
        {
            return Err(StorageError::http(OP, blob, 404, Some("ContainerNotFound")));
        }
        let current = inner.blobs.get(blob).map(|b| format!("\"0x{:X}\"", b.etag));
        check_condition(OP, blob, &condition, current.as_deref())?;
        inner.next_etag += 1;
        let etag = inner.next_etag;
        inner.blobs.insert(
            blob.clone(),
            Blob {
                data,
                kind: BlobKind::Block,
                etag,
                metadata: Metadata::new(),
                copy: None,
                modified: OffsetDateTime::now_utc(),
            },
        );
        Ok(format!("\"0x{etag:X}\""))
    }

    async fn put_page_blob(&self, blob: &BlobPath, data: Bytes) -> StorageResult<()> {
        if !data.len().is_multiple_of(512) {
            return Err(StorageError::other(
                "put_page_blob",
                blob,
                ErrorClass::Invalid,
                "a page blob's length must be a multiple of 512 bytes",
            ));
        }
        let mut inner = self.lock();
        inner
            .containers
            .insert((blob.account.clone(), blob.container.clone()));
        inner.next_etag += 1;
        let etag = inner.next_etag;
        inner.blobs.insert(
            blob.clone(),
            Blob {
                data,
                kind: BlobKind::Page,
                etag,
                metadata: Metadata::new(),
                copy: None,
                modified: OffsetDateTime::now_utc(),
            },
        );
        Ok(())
    }

    async fn read(
        &self,
        blob: &BlobPath,
        range: Option<std::ops::Range<u64>>,
    ) -> StorageResult<(Bytes, String)> {
        let inner = self.lock();
        let b = inner
            .blobs
            .get(blob)
            .ok_or_else(|| Self::not_found("read", blob))?;
        let data = match range {
            None => b.data.clone(),
            Some(r) => {
                let end = (r.end as usize).min(b.data.len());
                let start = (r.start as usize).min(end);
                b.data.slice(start..end)
            }
        };
        Ok((data, format!("\"0x{:X}\"", b.etag)))
    }

    async fn list(
        &self,
        account: &str,
        container: &str,
        prefix: &str,
    ) -> StorageResult<Vec<String>> {
        Ok(self
            .lock()
            .blobs
            .keys()
            .filter(|k| {
                k.account == account
                    && k.container == container
                    && k.snapshot.is_none()
                    && k.name.starts_with(prefix)
            })
            .map(|k| k.name.clone())
            .collect())
    }

    async fn list_detailed(
        &self,
        account: &str,
        container: &str,
        prefix: &str,
        snapshots: bool,
    ) -> StorageResult<Vec<super::ListedBlob>> {
        Ok(self
            .lock()
            .blobs
            .iter()
            .filter(|(k, _)| {
                k.account == account
                    && k.container == container
                    && (snapshots || k.snapshot.is_none())
                    && k.name.starts_with(prefix)
            })
            .map(|(k, b)| super::ListedBlob {
                name: k.name.clone(),
                snapshot: k.snapshot.clone(),
                metadata: b.metadata.clone(),
                last_modified: Some(b.modified),
            })
            .collect())
    }
}
