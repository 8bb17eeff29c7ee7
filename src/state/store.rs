//! Job documents in a container of the control account, written under ETag
//! conditions; listing, pruning, and the hand-off documents too large for a
//! queue message.

use super::*;
use crate::job::JobId;
use crate::{
    azure::{ErrorClass, ServiceError},
    storage::{BlobPath, BlobStore, Condition},
};
use bytes::Bytes;
use serde::Serialize;
use std::{sync::Arc, time::Duration};
use time::OffsetDateTime;

/// A state operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The document changed since it was read (someone else wrote it).
    #[error("job {0} was changed by another writer")]
    Conflict(JobId),
    /// A document with this id exists already.
    #[error("job {0} exists already")]
    Exists(JobId),
    /// No such job.
    #[error("job {0} not found")]
    NotFound(String),
    /// Another instance has taken the job over.
    #[error("job {0} was taken over by {1}")]
    Lost(JobId, String),
    /// The run no longer holds the pool's lock (another run of its job took it).
    #[error("the lock of pool {0} is held by another run")]
    LockLost(String),
    /// The stored document is not valid JSON of a job.
    #[error("job document {0} is corrupt: {1}")]
    Corrupt(String, String),
    /// A pool record changed since it was read.
    #[error("pool record {0} was changed by another writer")]
    PoolChanged(String),
    /// Other writers won every one of this many read-change-write rounds.
    #[error("{0} kept changing under {1} attempts to update it; try again later")]
    Contended(String, u32),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] ServiceError),
}

/// Job documents in a container of the control account.
#[derive(Debug, Clone)]
pub struct StateStore {
    pub(super) store: Arc<dyn BlobStore>,
    pub(super) account: String,
    pub(super) container: String,
}

const PREFIX: &str = "jobs/";

/// Read-change-write rounds an update tries before it gives up as contended.
pub(crate) const MAX_UPDATE_ROUNDS: u32 = 16;

/// A short, growing, jittered pause between read-change-write rounds, so
/// writers that collided do not collide again in lockstep.
pub(crate) async fn contention_pause(round: u32) {
    use rand::Rng;
    let cap = Duration::from_millis(10u64 << round.min(6));
    let wait = cap.mul_f64(rand::rng().random::<f64>());
    tokio::time::sleep(wait).await;
}

impl StateStore {
    /// Documents in `container` of `account`.
    pub fn new(store: Arc<dyn BlobStore>, account: &str, container: &str) -> Self {
        Self {
            store,
            account: account.to_owned(),
            container: container.to_owned(),
        }
    }

    fn path(&self, id: &str) -> BlobPath {
        BlobPath::new(
            &self.account,
            &self.container,
            &format!("{PREFIX}{id}.json"),
        )
    }

    /// Creates the container.
    pub async fn ensure(&self) -> Result<(), StateError> {
        Ok(self
            .store
            .ensure_container(&self.account, &self.container)
            .await?)
    }

    /// Stores a new document; fails with [`StateError::Exists`] if the id is taken.
    pub async fn create(&self, doc: &JobDocument) -> Result<String, StateError> {
        match self
            .store
            .put_block_blob(
                &self.path(doc.job_id.as_str()),
                to_bytes(doc),
                &JobSummary::of(doc).to_metadata(),
                Condition::IfAbsent,
            )
            .await
        {
            Ok(etag) => Ok(etag),
            Err(e)
                if matches!(
                    e.class,
                    ErrorClass::PreconditionFailed | ErrorClass::Conflict
                ) =>
            {
                Err(StateError::Exists(doc.job_id.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads a document and its ETag.
    pub async fn load(&self, id: &str) -> Result<Option<(JobDocument, String)>, StateError> {
        match self.store.read(&self.path(id), None).await {
            Ok((bytes, etag)) => {
                let doc = serde_json::from_slice(&bytes)
                    .map_err(|e| StateError::Corrupt(id.to_owned(), e.to_string()))?;
                Ok(Some((doc, etag)))
            }
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes a document if it still has `etag`; returns the new ETag.
    pub async fn save(&self, doc: &mut JobDocument, etag: &str) -> Result<String, StateError> {
        doc.updated_at = OffsetDateTime::now_utc();
        match self
            .store
            .put_block_blob(
                &self.path(doc.job_id.as_str()),
                to_bytes(doc),
                &JobSummary::of(doc).to_metadata(),
                Condition::IfMatch(etag.to_owned()),
            )
            .await
        {
            Ok(etag) => Ok(etag),
            Err(e) if e.class == ErrorClass::PreconditionFailed => {
                Err(StateError::Conflict(doc.job_id.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Reads, changes and writes a document, again from the start whenever another
    /// writer got there first. `change` returns false to leave it as it is.
    pub async fn update(
        &self,
        id: &str,
        mut change: impl FnMut(&mut JobDocument) -> bool,
    ) -> Result<JobDocument, StateError> {
        for round in 0..MAX_UPDATE_ROUNDS {
            if round > 0 {
                contention_pause(round).await;
            }
            let (mut doc, etag) = self
                .load(id)
                .await?
                .ok_or_else(|| StateError::NotFound(id.to_owned()))?;
            if !change(&mut doc) {
                return Ok(doc);
            }
            match self.save(&mut doc, &etag).await {
                Ok(_) => return Ok(doc),
                Err(StateError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Contended(
            format!("job {id}"),
            MAX_UPDATE_ROUNDS,
        ))
    }

    /// Every job's summary, newest first, from one listing of the documents'
    /// metadata (a document written before summaries existed is read instead).
    /// A document that cannot be read as a job is left out and reported in
    /// [`JobListing::skipped`], never failing the whole list.
    pub async fn list(&self) -> Result<JobListing, StateError> {
        let listed = self
            .store
            .list_detailed(&self.account, &self.container, PREFIX, false)
            .await?;
        let mut listing = JobListing::default();
        for blob in listed {
            let Some(id) = blob
                .name
                .strip_prefix(PREFIX)
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            if let Some(summary) = JobSummary::from_metadata(id, &blob.metadata) {
                listing.jobs.push(summary);
                continue;
            }
            match self.load(id).await {
                Ok(Some((doc, _))) => listing.jobs.push(JobSummary::of(&doc)),
                Ok(None) => {}
                Err(StateError::Corrupt(name, error)) => {
                    tracing::warn!(document = %name, %error, "skipping a job document that is not a job");
                    listing.skipped.push(SkippedDocument { name, error });
                }
                Err(e) => return Err(e),
            }
        }
        listing.jobs.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(b.job_id.cmp(&a.job_id))
        });
        Ok(listing)
    }

    /// Deletes the documents (and stored hand-offs) of jobs that ended before
    /// `cutoff`; returns their ids. Unless `dry_run`.
    pub(crate) async fn prune(
        &self,
        cutoff: OffsetDateTime,
        dry_run: bool,
    ) -> Result<Vec<String>, StateError> {
        let mut pruned = Vec::new();
        for job in self.list().await?.jobs {
            if !job.state.is_terminal() || job.updated_at >= cutoff {
                continue;
            }
            if !dry_run {
                for path in [
                    self.path(&job.job_id),
                    BlobPath::new(
                        &self.account,
                        &self.container,
                        &format!("handoffs/{}.json", job.job_id),
                    ),
                ] {
                    match self.store.delete(&path).await {
                        Ok(()) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            pruned.push(job.job_id);
        }
        Ok(pruned)
    }
}

/// Every job's summary and the documents that could not be read.
#[derive(Debug, Clone, Default)]
pub struct JobListing {
    /// Summaries, newest first.
    pub jobs: Vec<JobSummary>,
    /// Documents left out: not JSON of a job.
    pub skipped: Vec<SkippedDocument>,
}

/// A job document the listing could not read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedDocument {
    /// Its name.
    pub name: String,
    /// Why.
    pub error: String,
}

impl StateStore {
    /// Takes or renews the lease `name` for `holder` until `ttl` from now:
    /// whether `holder` holds it. A lease held by another holder and not yet
    /// run out is left alone; every write is conditional on the ETag read (or
    /// on there being none), so two takers at once get one lease.
    pub(crate) async fn lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StateError> {
        #[derive(Serialize, serde::Deserialize)]
        struct Lease {
            holder: String,
            #[serde(with = "time::serde::rfc3339")]
            until: OffsetDateTime,
        }
        let path = BlobPath::new(
            &self.account,
            &self.container,
            &format!("leases/{name}.json"),
        );
        let now = claim_now();
        let condition = match self.store.read(&path, None).await {
            Ok((bytes, etag)) => match serde_json::from_slice::<Lease>(&bytes) {
                Ok(l) if l.holder != holder && l.until > now => return Ok(false),
                _ => Condition::IfMatch(etag),
            },
            Err(e) if e.is_not_found() => Condition::IfAbsent,
            Err(e) => return Err(e.into()),
        };
        let lease = Lease {
            holder: holder.to_owned(),
            until: now + ttl,
        };
        let bytes = Bytes::from(serde_json::to_vec(&lease).expect("leases serialise"));
        match self
            .store
            .put_block_blob(&path, bytes, &Default::default(), condition)
            .await
        {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.class,
                    ErrorClass::PreconditionFailed | ErrorClass::Conflict
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes the whole hand-off document of a job (for a hand-off too large for
    /// one queue message) and returns where it is. Overwrites: the document of a
    /// job never changes once recorded.
    pub(crate) async fn put_handoff(
        &self,
        job_id: &str,
        json: &str,
    ) -> Result<crate::storage::BlobReference, StateError> {
        let path = BlobPath::new(
            &self.account,
            &self.container,
            &format!("handoffs/{job_id}.json"),
        );
        self.store
            .put_block_blob(
                &path,
                Bytes::from(json.to_owned()),
                &Default::default(),
                Condition::Always,
            )
            .await?;
        Ok(crate::storage::BlobReference {
            uri: self.store.blob_url(&path)?.to_string(),
            account: path.account,
            container: path.container,
            blob: path.name,
        })
    }
}

fn to_bytes(doc: &JobDocument) -> Bytes {
    Bytes::from(serde_json::to_vec_pretty(doc).expect("job documents serialise"))
}
