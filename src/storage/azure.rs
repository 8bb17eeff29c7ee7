//! [`BlobStore`] on the GA Azure SDK crates, for Azure and Azurite.
//!
//! Authentication is per account: a Shared Key (signed by our own per-try policy,
//! see [`crate::azure::auth`]) or an Entra ID credential. The SDK's own retry policy is
//! switched off: retries belong to [`crate::azure::retry`], so the two never stack.

use super::{
    AccountInfo, BlobKind, BlobPath, BlobProperties, BlobStore, Condition, CopyInfo, CopyStarted,
    CopyState, Metadata, SourceRead, StorageResult,
};
use crate::azure::account::{AccountConfig, AccountCredential};
use crate::azure::{
    auth::{self, BlobSasRequest, SharedKey},
    map_sdk_error,
    retry::{Idempotency, RetryPolicy},
    transport::{client_options, service_version},
    ErrorClass, ServiceError,
};
use async_trait::async_trait;
use azure_core::{
    credentials::TokenCredential,
    http::{Etag, RequestContent, Transport},
};
use azure_storage_blob::{
    models::{
        BlobClientCreateSnapshotResultHeaders, BlobClientDeleteOptions, BlobClientDownloadOptions,
        BlobClientGetAccountInfoResultHeaders, BlobClientGetPropertiesResultHeaders,
        BlobClientStartCopyFromUrlOptions, BlobClientStartCopyFromUrlResultHeaders,
        BlobClientUploadOptions, BlobContainerClientListBlobsOptions, DeleteSnapshotsOptionType,
        HttpRange,
    },
    BlobClient, BlobClientOptions, BlobContainerClient, BlobContainerClientOptions,
    BlobServiceClient, BlobServiceClientOptions,
};
use azure_storage_common::models::UserDelegationKey;
use azure_storage_sas::{SasBuilder, SasProtocol};
use bytes::Bytes;
use futures::TryStreamExt;
use std::{collections::HashMap, sync::Arc};
use time::OffsetDateTime;
use url::Url;

/// How long a copy-source SAS starts before "now", against clock skew.
const SAS_START_SKEW: time::Duration = time::Duration::minutes(15);

/// Largest chunk one Put Page call may carry.
const MAX_PUT_PAGE: usize = 4 * 1024 * 1024;

struct Account {
    endpoint: Url,
    key: Option<SharedKey>,
    token: Option<Arc<dyn TokenCredential>>,
    blob_options: BlobClientOptions,
    container_options: BlobContainerClientOptions,
    service_options: BlobServiceClientOptions,
    /// The user delegation key (Entra accounts), reused until near its expiry.
    /// Never held across a request: two callers that miss at once both fetch
    /// one, which is harmless.
    delegation_key: std::sync::Mutex<Option<UserDelegationKey>>,
}

/// Longest validity of a user delegation key.
const MAX_DELEGATION: time::Duration = time::Duration::days(7);

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("endpoint", &self.endpoint.as_str())
            .field("shared_key", &self.key.is_some())
            .field("entra", &self.token.is_some())
            .finish()
    }
}

/// Azure Blob Storage over the SDK, for every configured account.
#[derive(Debug)]
pub(crate) struct AzureStore {
    accounts: HashMap<String, Account>,
    /// For the one call this store makes on its own (the user delegation key);
    /// every other call is retried by the [`super::instrumented`] wrapper.
    retry: RetryPolicy,
}

impl AzureStore {
    /// A store for these accounts, sharing one HTTP transport.
    pub(crate) fn new(
        accounts: &[AccountConfig],
        transport: &Transport,
        retry: RetryPolicy,
    ) -> Self {
        let accounts = accounts
            .iter()
            .map(|a| {
                let client_options = client_options(transport, a);
                let mut blob_options = BlobClientOptions {
                    client_options: client_options.clone(),
                    ..Default::default()
                };
                let mut container_options = BlobContainerClientOptions {
                    client_options: client_options.clone(),
                    ..Default::default()
                };
                let mut service_options = BlobServiceClientOptions {
                    client_options,
                    ..Default::default()
                };
                if let Some(v) = service_version(a) {
                    blob_options.version = v.clone();
                    container_options.version = v.clone();
                    service_options.version = v;
                }
                let (key, token) = match &a.credential {
                    AccountCredential::SharedKey(k) => (Some(k.clone()), None),
                    AccountCredential::Entra(t) => (None, Some(t.clone())),
                };
                (
                    a.name.clone(),
                    Account {
                        endpoint: a.blob_endpoint.clone(),
                        key,
                        token,
                        blob_options,
                        container_options,
                        service_options,
                        delegation_key: std::sync::Mutex::new(None),
                    },
                )
            })
            .collect();
        Self { accounts, retry }
    }

    fn account(&self, name: &str, operation: &'static str) -> StorageResult<&Account> {
        self.accounts.get(name).ok_or_else(|| {
            ServiceError::other(
                operation,
                name,
                ErrorClass::Invalid,
                format!("account {name} is not configured"),
            )
        })
    }

    fn container_url(account: &Account, container: &str) -> Url {
        let mut url = account.endpoint.clone();
        url.path_segments_mut()
            .expect("endpoints are validated as base URLs")
            .pop_if_empty()
            .push(container);
        url
    }

    fn url_of(account: &Account, blob: &BlobPath) -> Url {
        let mut url = Self::container_url(account, &blob.container);
        url.path_segments_mut()
            .expect("endpoints are validated as base URLs")
            .extend(blob.name.split('/'));
        if let Some(s) = &blob.snapshot {
            url.query_pairs_mut().append_pair("snapshot", s);
        }
        url
    }

    fn blob_client(&self, blob: &BlobPath, op: &'static str) -> StorageResult<BlobClient> {
        let account = self.account(&blob.account, op)?;
        BlobClient::new(
            Self::url_of(account, blob),
            account.token.clone(),
            Some(account.blob_options.clone()),
        )
        .map_err(|e| map_sdk_error(op, blob, e))
    }

    /// The account's user delegation key, fetched again when it would lapse
    /// before `until`, under the retry policy (each attempt timed).
    async fn delegation_key(
        &self,
        account: &Account,
        name: &str,
        until: OffsetDateTime,
    ) -> StorageResult<UserDelegationKey> {
        const OP: &str = "get_user_delegation_key";
        let cached = account
            .delegation_key
            .lock()
            .expect("delegation key lock")
            .clone();
        if let Some(key) = cached.filter(|k| k.signed_expiry.is_some_and(|e| e >= until)) {
            return Ok(key);
        }
        let service = BlobServiceClient::new(
            account.endpoint.clone(),
            account.token.clone(),
            Some(account.service_options.clone()),
        )
        .map_err(|e| map_sdk_error(OP, name, e))?;
        let fetch = || async {
            let now = OffsetDateTime::now_utc();
            let info = azure_storage_blob::models::KeyInfo {
                start: Some(now - SAS_START_SKEW),
                expiry: Some(
                    (now + MAX_DELEGATION - time::Duration::minutes(1))
                        .min(until + time::Duration::hours(1)),
                ),
                ..Default::default()
            };
            let request = info.try_into().map_err(|e| map_sdk_error(OP, name, e))?;
            let rsp = service
                .get_user_delegation_key(request, None)
                .await
                .map_err(|e| map_sdk_error(OP, name, e))?;
            rsp.into_model().map_err(|e| map_sdk_error(OP, name, e))
        };
        let key: UserDelegationKey = self
            .retry
            .run(
                Idempotency::Idempotent,
                |_| {},
                || self.retry.timed(OP, name, fetch()),
            )
            .await?;
        *account.delegation_key.lock().expect("delegation key lock") = Some(key.clone());
        Ok(key)
    }

    fn container_client(
        &self,
        account_name: &str,
        container: &str,
        op: &'static str,
    ) -> StorageResult<BlobContainerClient> {
        let account = self.account(account_name, op)?;
        BlobContainerClient::new(
            Self::container_url(account, container),
            account.token.clone(),
            Some(account.container_options.clone()),
        )
        .map_err(|e| map_sdk_error(op, format!("{account_name}/{container}"), e))
    }
}

fn parse_progress(text: &str) -> (u64, u64) {
    let mut parts = text.split('/');
    let copied = parts
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0);
    let total = parts
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0);
    (copied, total)
}

fn copy_state(s: azure_storage_blob::models::CopyStatus) -> CopyState {
    use azure_storage_blob::models::CopyStatus as S;
    match s {
        S::Pending => CopyState::Pending,
        S::Success => CopyState::Success,
        S::Aborted => CopyState::Aborted,
        _ => CopyState::Failed,
    }
}

#[async_trait]
impl BlobStore for AzureStore {
    fn blob_url(&self, blob: &BlobPath) -> StorageResult<Url> {
        let account = self.account(&blob.account, "blob_url")?;
        Ok(Self::url_of(account, blob))
    }

    async fn copy_source_url(
        &self,
        source: &BlobPath,
        dest_account: &str,
        read: SourceRead,
        expiry: OffsetDateTime,
    ) -> StorageResult<String> {
        const OP: &str = "copy_source_url";
        let account = self.account(&source.account, OP)?;
        let url = Self::url_of(account, source);
        // Inside one account the destination's own authorization (Shared Key or
        // Entra ID) covers a Copy Blob's source: no SAS. A from-URL call needs one.
        if source.account == dest_account && read == SourceRead::CopyBlob {
            return Ok(url.to_string());
        }
        match &account.key {
            Some(key) => {
                let now = OffsetDateTime::now_utc();
                let protocol = if url.scheme() == "https" {
                    "https"
                } else {
                    "https,http"
                };
                let sas = auth::blob_sas_query(
                    key,
                    &BlobSasRequest {
                        container: &source.container,
                        blob: &source.name,
                        snapshot: source.snapshot.as_deref(),
                        permissions: "r",
                        start: now - SAS_START_SKEW,
                        expiry,
                        protocol,
                    },
                );
                let sep = if url.query().is_some() { '&' } else { '?' };
                Ok(format!("{url}{sep}{sas}"))
            }
            None => {
                // Entra ID: a user delegation SAS, read-only, scoped to the blob or snapshot.
                let now = OffsetDateTime::now_utc();
                let key = self
                    .delegation_key(account, &source.account, expiry)
                    .await?;
                let key_expiry = key.signed_expiry.unwrap_or(expiry);
                let mut builder =
                    SasBuilder::new(source.account.as_str(), &key, expiry.min(key_expiry))
                        .map_err(|e| map_sdk_error(OP, source, e))?
                        .blob(source.container.as_str(), source.name.as_str())
                        .read()
                        .start(now - SAS_START_SKEW)
                        .protocol(if url.scheme() == "https" {
                            SasProtocol::Https
                        } else {
                            SasProtocol::HttpsAndHttp
                        });
                if let Some(s) = &source.snapshot {
                    builder = builder.snapshot(s.as_str());
                }
                // The token carries `snapshot=` itself: it goes on the base blob's
                // URL, or the service sees the parameter twice and refuses the copy.
                let base = Self::url_of(
                    account,
                    &BlobPath {
                        snapshot: None,
                        ..source.clone()
                    },
                );
                Ok(format!("{base}?{}", builder.build()))
            }
        }
    }

    async fn ensure_container(&self, account: &str, container: &str) -> StorageResult<()> {
        const OP: &str = "create_container";
        let client = self.container_client(account, container, OP)?;
        match client.create(None).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let err = map_sdk_error(OP, format!("{account}/{container}"), e);
                if err.class == ErrorClass::Conflict {
                    Ok(())
                } else {
                    Err(err)
                }
            }
        }
    }

    async fn properties(&self, blob: &BlobPath) -> StorageResult<BlobProperties> {
        const OP: &str = "get_properties";
        let client = self.blob_client(blob, OP)?;
        let rsp = client
            .get_properties(None)
            .await
            .map_err(|e| map_sdk_error(OP, blob, e))?;
        let conv = |e: azure_core::Error| map_sdk_error(OP, blob, e);
        let kind = match rsp.blob_type().map_err(conv)? {
            Some(azure_storage_blob::models::BlobType::PageBlob) => BlobKind::Page,
            Some(azure_storage_blob::models::BlobType::AppendBlob) => BlobKind::Append,
            _ => BlobKind::Block,
        };
        let copy = match (
            rsp.copy_id().map_err(conv)?,
            rsp.copy_status().map_err(conv)?,
        ) {
            (Some(id), Some(status)) => {
                let (copied, total) = rsp
                    .copy_progress()
                    .map_err(conv)?
                    .map(|p| parse_progress(&p))
                    .unwrap_or((0, 0));
                Some(CopyInfo {
                    id,
                    state: copy_state(status),
                    copied,
                    total,
                    description: rsp
                        .copy_status_description()
                        .map_err(conv)?
                        .map(|d| auth::redact_sas(&d)),
                    source: rsp
                        .copy_source()
                        .map_err(conv)?
                        .map(|s| auth::redact_sas(&s)),
                })
            }
            _ => None,
        };
        Ok(BlobProperties {
            len: rsp.content_length().map_err(conv)?.unwrap_or(0),
            kind,
            etag: rsp
                .etag()
                .map_err(conv)?
                .map(|e| e.to_string())
                .unwrap_or_default(),
            metadata: rsp
                .metadata()
                .map_err(conv)?
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            copy,
        })
    }

    async fn snapshot(&self, blob: &BlobPath, metadata: &Metadata) -> StorageResult<String> {
        const OP: &str = "create_snapshot";
        let client = self.blob_client(blob, OP)?;
        let options = azure_storage_blob::models::BlobClientCreateSnapshotOptions {
            metadata: Some(metadata.clone().into_iter().collect()),
            ..Default::default()
        };
        let rsp = client
            .create_snapshot(Some(options))
            .await
            .map_err(|e| map_sdk_error(OP, blob, e))?;
        rsp.snapshot()
            .map_err(|e| map_sdk_error(OP, blob, e))?
            .ok_or_else(|| {
                ServiceError::other(
                    OP,
                    blob,
                    ErrorClass::Transient,
                    "no x-ms-snapshot in answer",
                )
            })
    }

    async fn start_copy(
        &self,
        dest: &BlobPath,
        source_url: &str,
        metadata: &Metadata,
    ) -> StorageResult<CopyStarted> {
        const OP: &str = "start_copy";
        let client = self.blob_client(dest, OP)?;
        let options = BlobClientStartCopyFromUrlOptions {
            metadata: Some(metadata.clone().into_iter().collect()),
            ..Default::default()
        };
        let rsp = client
            .start_copy_from_url(source_url.to_owned(), Some(options))
            .await
            .map_err(|e| map_sdk_error(OP, dest, e))?;
        let conv = |e: azure_core::Error| map_sdk_error(OP, dest, e);
        let copy_id = rsp.copy_id().map_err(conv)?.ok_or_else(|| {
            ServiceError::other(OP, dest, ErrorClass::Transient, "no x-ms-copy-id in answer")
        })?;
        let state = rsp
            .copy_status()
            .map_err(conv)?
            .map(copy_state)
            .unwrap_or(CopyState::Pending);
        Ok(CopyStarted { copy_id, state })
    }

    async fn abort_copy(&self, dest: &BlobPath, copy_id: &str) -> StorageResult<()> {
        const OP: &str = "abort_copy";
        let client = self.blob_client(dest, OP)?;
        client
            .abort_copy(copy_id, None)
            .await
            .map(|_| ())
            .map_err(|e| map_sdk_error(OP, dest, e))
    }

    async fn delete(&self, blob: &BlobPath) -> StorageResult<()> {
        const OP: &str = "delete";
        let client = self.blob_client(blob, OP)?;
        let options = BlobClientDeleteOptions {
            delete_snapshots: blob
                .snapshot
                .is_none()
                .then_some(DeleteSnapshotsOptionType::Include),
            ..Default::default()
        };
        client
            .delete(Some(options))
            .await
            .map(|_| ())
            .map_err(|e| map_sdk_error(OP, blob, e))
    }

    async fn delete_if_match(&self, blob: &BlobPath, etag: &str) -> StorageResult<()> {
        const OP: &str = "delete";
        let client = self.blob_client(blob, OP)?;
        let options = BlobClientDeleteOptions {
            delete_snapshots: Some(DeleteSnapshotsOptionType::Include),
            if_match: Some(Etag::from(etag.to_owned())),
            ..Default::default()
        };
        client
            .delete(Some(options))
            .await
            .map(|_| ())
            .map_err(|e| map_sdk_error(OP, blob, e))
    }

    async fn account_info(&self, account_name: &str) -> StorageResult<AccountInfo> {
        const OP: &str = "get_account_info";
        let account = self.account(account_name, OP)?;
        // Any blob URL of the account answers Get Account Information.
        let client = BlobClient::new(
            Self::url_of(account, &BlobPath::new(account_name, "$root", "x")),
            account.token.clone(),
            Some(account.blob_options.clone()),
        )
        .map_err(|e| map_sdk_error(OP, account_name, e))?;
        let rsp = client
            .get_account_info(None)
            .await
            .map_err(|e| map_sdk_error(OP, account_name, e))?;
        let conv = |e: azure_core::Error| map_sdk_error(OP, account_name, e);
        Ok(AccountInfo {
            sku: rsp
                .sku_name()
                .map_err(conv)?
                .map(|s| s.to_string())
                .unwrap_or_default(),
            kind: rsp
                .account_kind()
                .map_err(conv)?
                .map(|k| k.to_string())
                .unwrap_or_default(),
        })
    }

    async fn put_block_blob(
        &self,
        blob: &BlobPath,
        data: Bytes,
        metadata: &Metadata,
        condition: Condition,
    ) -> StorageResult<String> {
        const OP: &str = "put_blob";
        let client = self.blob_client(blob, OP)?;
        let mut options = BlobClientUploadOptions {
            blob_content_type: Some("application/json".into()),
            metadata: (!metadata.is_empty()).then(|| metadata.clone().into_iter().collect()),
            ..Default::default()
        };
        match condition {
            Condition::Always => {}
            Condition::IfAbsent => options.if_none_match = Some(Etag::from("*")),
            Condition::IfMatch(etag) => options.if_match = Some(Etag::from(etag)),
        }
        let rsp = client
            .upload(RequestContent::from(data.to_vec()), Some(options))
            .await
            .map_err(|e| {
                let mut err = map_sdk_error(OP, blob, e);
                // An If-None-Match: * on an existing blob answers 409 BlobAlreadyExists.
                if err.code.as_deref() == Some("BlobAlreadyExists") {
                    err.class = ErrorClass::PreconditionFailed;
                }
                err
            })?;
        Ok(rsp.etag.map(|e| e.to_string()).unwrap_or_default())
    }

    async fn put_page_blob(&self, blob: &BlobPath, data: Bytes) -> StorageResult<()> {
        const OP: &str = "put_page_blob";
        if !data.len().is_multiple_of(512) {
            return Err(ServiceError::other(
                OP,
                blob,
                ErrorClass::Invalid,
                "a page blob's length must be a multiple of 512 bytes",
            ));
        }
        let client = self.blob_client(blob, OP)?.page_blob_client();
        client
            .create(data.len() as u64, None)
            .await
            .map_err(|e| map_sdk_error(OP, blob, e))?;
        let mut offset = 0usize;
        while offset < data.len() {
            let end = (offset + MAX_PUT_PAGE).min(data.len());
            let chunk = data.slice(offset..end);
            // Pages of zeroes stay unwritten: page blobs read zeroes there anyway.
            if chunk.iter().any(|b| *b != 0) {
                client
                    .upload_pages(
                        RequestContent::from(chunk.to_vec()),
                        chunk.len() as u64,
                        HttpRange::from(offset as u64..end as u64),
                        None,
                    )
                    .await
                    .map_err(|e| map_sdk_error(OP, blob, e))?;
            }
            offset = end;
        }
        Ok(())
    }

    async fn page_ranges_page(
        &self,
        blob: &BlobPath,
        marker: Option<&str>,
    ) -> StorageResult<(Vec<std::ops::Range<u64>>, Option<String>)> {
        const OP: &str = "get_page_ranges";
        let client = self.blob_client(blob, OP)?.page_blob_client();
        let options = azure_storage_blob::models::PageBlobClientListPageRangesOptions {
            marker: marker.map(str::to_owned),
            ..Default::default()
        };
        // One page per call: the caller's retry resumes from this marker.
        let mut pager = client
            .list_page_ranges(Some(options))
            .map_err(|e| map_sdk_error(OP, blob, e))?;
        let Some(page) = pager
            .try_next()
            .await
            .map_err(|e| map_sdk_error(OP, blob, e))?
        else {
            return Ok((Vec::new(), None));
        };
        let list = page.into_model().map_err(|e| map_sdk_error(OP, blob, e))?;
        // The service gives inclusive ends.
        let ranges = list
            .page_ranges
            .iter()
            .filter_map(|r| Some(u64::try_from(r.start?).ok()?..u64::try_from(r.end?).ok()? + 1))
            .collect();
        Ok((ranges, list.next_marker.filter(|m| !m.is_empty())))
    }

    async fn create_page_blob(
        &self,
        blob: &BlobPath,
        len: u64,
        metadata: &Metadata,
    ) -> StorageResult<()> {
        const OP: &str = "create_page_blob";
        let client = self.blob_client(blob, OP)?.page_blob_client();
        let options = azure_storage_blob::models::PageBlobClientCreateOptions {
            metadata: Some(metadata.clone().into_iter().collect()),
            ..Default::default()
        };
        client
            .create(len, Some(options))
            .await
            .map_err(|e| map_sdk_error(OP, blob, e))?;
        Ok(())
    }

    async fn put_pages_from_url(
        &self,
        dest: &BlobPath,
        range: std::ops::Range<u64>,
        source_url: &str,
    ) -> StorageResult<()> {
        const OP: &str = "put_page_from_url";
        let client = self.blob_client(dest, OP)?.page_blob_client();
        client
            .upload_pages_from_url(
                source_url.to_owned(),
                HttpRange::from(range.clone()),
                0,
                HttpRange::from(range),
                None,
            )
            .await
            .map_err(|e| map_sdk_error(OP, dest, e))?;
        Ok(())
    }

    async fn read(
        &self,
        blob: &BlobPath,
        range: Option<std::ops::Range<u64>>,
    ) -> StorageResult<(Bytes, String)> {
        const OP: &str = "read";
        let client = self.blob_client(blob, OP)?;
        let options = BlobClientDownloadOptions {
            range: range.map(HttpRange::from),
            ..Default::default()
        };
        let rsp = client
            .download(Some(options))
            .await
            .map_err(|e| map_sdk_error(OP, blob, e))?;
        let etag = rsp
            .properties
            .etag
            .as_ref()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let body = rsp
            .body
            .collect()
            .await
            .map_err(|e| map_sdk_error(OP, blob, e))?;
        Ok((body, etag))
    }

    async fn list(
        &self,
        account: &str,
        container: &str,
        prefix: &str,
    ) -> StorageResult<Vec<String>> {
        Ok(self
            .list_items(account, container, prefix, None)
            .await?
            .into_iter()
            .filter_map(|i| i.name)
            .collect())
    }

    async fn list_detailed(
        &self,
        account: &str,
        container: &str,
        prefix: &str,
        snapshots: bool,
    ) -> StorageResult<Vec<super::ListedBlob>> {
        use azure_storage_blob::models::ListBlobsIncludeItem as I;
        let include = if snapshots {
            vec![I::Metadata, I::Snapshots]
        } else {
            vec![I::Metadata]
        };
        Ok(self
            .list_items(account, container, prefix, Some(include))
            .await?
            .into_iter()
            .filter_map(|i| {
                Some(super::ListedBlob {
                    name: i.name?,
                    snapshot: i.snapshot.filter(|s| !s.is_empty()),
                    metadata: i
                        .metadata
                        .and_then(|m| m.values)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v))
                        .collect(),
                    last_modified: i.properties.and_then(|p| p.last_modified),
                })
            })
            .collect())
    }
}

impl AzureStore {
    async fn list_items(
        &self,
        account: &str,
        container: &str,
        prefix: &str,
        include: Option<Vec<azure_storage_blob::models::ListBlobsIncludeItem>>,
    ) -> StorageResult<Vec<azure_storage_blob::models::BlobItem>> {
        const OP: &str = "list_blobs";
        let target = format!("{account}/{container}");
        let client = self.container_client(account, container, OP)?;
        let options = BlobContainerClientListBlobsOptions {
            prefix: (!prefix.is_empty()).then(|| prefix.to_owned()),
            include,
            ..Default::default()
        };
        let mut pager = client
            .list_blobs(Some(options))
            .map_err(|e| map_sdk_error(OP, &target, e))?;
        let mut items = Vec::new();
        loop {
            match pager.try_next().await {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => {
                    let err = map_sdk_error(OP, &target, e);
                    if err.is_not_found() {
                        return Ok(Vec::new());
                    }
                    return Err(err);
                }
            }
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_parses() {
        assert_eq!(parse_progress("512/1024"), (512, 1024));
        assert_eq!(parse_progress("garbage"), (0, 0));
    }
}
