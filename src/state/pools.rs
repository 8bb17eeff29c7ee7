//! Pool records: each pool's image sets, newest last, and the lock that
//! lets one run at a time change them.

use super::*;
use crate::{
    azure::ErrorClass,
    storage::{BlobPath, Condition},
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One replica of a pool's image set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetReplica {
    /// Account.
    pub account: String,
    /// Blob URL (no SAS).
    pub uri: String,
    /// The blob.
    pub blob: BlobPath,
    /// The job that made it.
    pub job_id: String,
    /// Beyond what the pool's latest job needs (a smaller pool): kept, since an
    /// earlier hand-off named it and a pool built from that may still boot
    /// from it, until the pool is retired; a later, larger job reuses it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub surplus: bool,
}

/// The identical replicas a pool's nodes boot from, all copies of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSet {
    /// Source URL as submitted.
    pub source: String,
    /// The source blob.
    pub source_blob: BlobPath,
    /// The snapshot every replica holds.
    pub source_snapshot: String,
    /// The source's ETag when the snapshot was taken.
    pub source_etag: String,
    /// Length of the VHD.
    pub source_bytes: u64,
    /// The replicas, in hand-off order.
    pub replicas: Vec<SetReplica>,
    /// When the set was started.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// The gallery image version made from this set's staged VHD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gallery_version: Option<SetVersion>,
}

/// A gallery image version of an image set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetVersion {
    /// Version name.
    pub version: String,
    /// Its ARM id.
    pub version_id: String,
    /// Replicas in the gallery's region.
    pub replicas: u32,
}

/// What Batch last said of a pool, and what its image serves: written by the
/// pool stage and by background scaling (last writer wins; it is an
/// observation, not a decision), shown on the pools page and in the pool view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolNodes {
    /// Target dedicated nodes.
    pub target_nodes: u32,
    /// Current dedicated nodes.
    pub current_nodes: u32,
    /// Nodes the pool's image serves (gallery replicas x nodes per replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_capacity_nodes: Option<u32>,
    /// The pool's resize errors, in Batch's words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resize_errors: Vec<String>,
    /// When Batch said so.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Everything the daemon made for one pool: its image sets, newest last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    /// Batch pool id.
    pub pool_id: String,
    /// Image sets, oldest first; the last is the current one.
    pub sets: Vec<ImageSet>,
    /// The one job that may change the pool's image sets now: a job from its
    /// planning until its hand-off is sent, or a retire (the `retiring` mark)
    /// until the record is deleted. Written under the record's ETag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<PoolLock>,
}

/// Who holds a pool's image sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolLock {
    /// The job holding it.
    pub job_id: String,
    /// The run of that job holding it (absent in records of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// `true` for a retire job: the pool is being retired.
    #[serde(default)]
    pub retiring: bool,
    /// Since when.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
}

/// One run of one job: who may hold a job's claim and its pool's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunRef<'a> {
    /// The job.
    pub job_id: &'a str,
    /// The run.
    pub run: &'a str,
}

impl RunRef<'_> {
    /// Whether `lock` is this run's.
    pub(crate) fn holds(&self, lock: &PoolLock) -> bool {
        lock.job_id == self.job_id && lock.run.as_deref() == Some(self.run)
    }
}

/// What taking a pool's lock found.
#[derive(Debug)]
pub(crate) enum PoolClaim {
    /// The lock is ours: the record as written (sets from before, maybe none)
    /// and its ETag.
    Held(PoolRecord, String),
    /// Another job holds it.
    Busy(PoolLock),
}

impl StateStore {
    fn pool_path(&self, pool_id: &str) -> BlobPath {
        BlobPath::new(
            &self.account,
            &self.container,
            &format!("pools/{pool_id}.json"),
        )
    }

    /// A pool's record and its ETag.
    pub async fn load_pool(
        &self,
        pool_id: &str,
    ) -> Result<Option<(PoolRecord, String)>, StateError> {
        match self.store.read(&self.pool_path(pool_id), None).await {
            Ok((bytes, etag)) => serde_json::from_slice(&bytes)
                .map(|r| Some((r, etag)))
                .map_err(|e| StateError::Corrupt(format!("pools/{pool_id}"), e.to_string())),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every pool's record.
    /// Records what Batch said of `pool_id`.
    pub(crate) async fn put_pool_nodes(
        &self,
        pool_id: &str,
        nodes: &PoolNodes,
    ) -> Result<(), StateError> {
        let path = self.pool_nodes_path(pool_id);
        let bytes = Bytes::from(serde_json::to_vec(nodes).expect("observations serialise"));
        self.store
            .put_block_blob(&path, bytes, &Default::default(), Condition::Always)
            .await?;
        Ok(())
    }

    /// Forgets what Batch said of `pool_id` (its pool was retired).
    pub(crate) async fn delete_pool_nodes(&self, pool_id: &str) -> Result<(), StateError> {
        match self.store.delete(&self.pool_nodes_path(pool_id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn pool_nodes_path(&self, pool_id: &str) -> BlobPath {
        BlobPath::new(
            &self.account,
            &self.container,
            &format!("pool-nodes/{pool_id}.json"),
        )
    }

    /// What Batch last said of `pool_id`, if anything was recorded.
    pub async fn pool_nodes(&self, pool_id: &str) -> Result<Option<PoolNodes>, StateError> {
        let path = self.pool_nodes_path(pool_id);
        match self.store.read(&path, None).await {
            Ok((bytes, _)) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn list_pools(&self) -> Result<Vec<PoolRecord>, StateError> {
        let names = self
            .store
            .list(&self.account, &self.container, "pools/")
            .await?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let id = name.trim_start_matches("pools/").trim_end_matches(".json");
            if let Some((r, _)) = self.load_pool(id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Takes the lock of `pool_id`'s record for run `run` of `job_id` (creating
    /// the record when there is none). Re-entrant: the run that holds it gets it
    /// again. A lock held by another run of the same job is taken over: only the
    /// run that holds the job's fenced claim calls this, so that other run has
    /// lost the job. `stale` names a holder job known to have ended, whose lock
    /// is taken over.
    pub(crate) async fn lock_pool(
        &self,
        pool_id: &str,
        holder: &RunRef<'_>,
        retiring: bool,
        stale: Option<&str>,
    ) -> Result<PoolClaim, StateError> {
        for round in 0..MAX_UPDATE_ROUNDS {
            if round > 0 {
                contention_pause(round).await;
            }
            let (mut record, condition) = match self.load_pool(pool_id).await? {
                Some((r, etag)) => (r, Condition::IfMatch(etag)),
                None => (
                    PoolRecord {
                        pool_id: pool_id.to_owned(),
                        sets: Vec::new(),
                        lock: None,
                    },
                    Condition::IfAbsent,
                ),
            };
            match &record.lock {
                Some(l) if holder.holds(l) => {
                    if let Condition::IfMatch(etag) = condition {
                        return Ok(PoolClaim::Held(record, etag));
                    }
                }
                Some(l) if l.job_id == holder.job_id => {
                    tracing::info!(pool = %pool_id, previous_run = ?l.run, "taking the pool's lock over from an earlier run of this job");
                }
                Some(l) if Some(l.job_id.as_str()) != stale => {
                    return Ok(PoolClaim::Busy(l.clone()))
                }
                _ => {}
            }
            record.lock = Some(PoolLock {
                job_id: holder.job_id.to_owned(),
                run: Some(holder.run.to_owned()),
                retiring,
                since: OffsetDateTime::now_utc(),
            });
            match self.put_pool(pool_id, &record, condition).await {
                Ok(etag) => return Ok(PoolClaim::Held(record, etag)),
                Err(StateError::PoolChanged(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Contended(
            format!("pool record {pool_id}"),
            MAX_UPDATE_ROUNDS,
        ))
    }

    /// Gives up the lock of `pool_id` if `holder` holds it.
    pub(crate) async fn unlock_pool(
        &self,
        pool_id: &str,
        holder: &RunRef<'_>,
    ) -> Result<(), StateError> {
        for round in 0..MAX_UPDATE_ROUNDS {
            if round > 0 {
                contention_pause(round).await;
            }
            let Some((mut record, etag)) = self.load_pool(pool_id).await? else {
                return Ok(());
            };
            if !record.lock.as_ref().is_some_and(|l| holder.holds(l)) {
                return Ok(());
            }
            record.lock = None;
            match self
                .put_pool(pool_id, &record, Condition::IfMatch(etag))
                .await
            {
                Ok(_) => return Ok(()),
                Err(StateError::PoolChanged(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Contended(
            format!("pool record {pool_id}"),
            MAX_UPDATE_ROUNDS,
        ))
    }

    /// Changes `pool_id`'s record only while `holder` holds its lock, under the
    /// record's ETag: a run that lost its job (and with it the pool's lock)
    /// never writes the pool's image sets. [`StateError::LockLost`] otherwise.
    pub(crate) async fn update_pool_held(
        &self,
        pool_id: &str,
        holder: &RunRef<'_>,
        mut change: impl FnMut(&mut PoolRecord),
    ) -> Result<PoolRecord, StateError> {
        for round in 0..MAX_UPDATE_ROUNDS {
            if round > 0 {
                contention_pause(round).await;
            }
            let (mut record, etag) = self
                .load_pool(pool_id)
                .await?
                .ok_or_else(|| StateError::LockLost(pool_id.to_owned()))?;
            if !record.lock.as_ref().is_some_and(|l| holder.holds(l)) {
                return Err(StateError::LockLost(pool_id.to_owned()));
            }
            change(&mut record);
            match self
                .put_pool(pool_id, &record, Condition::IfMatch(etag))
                .await
            {
                Ok(_) => return Ok(record),
                Err(StateError::PoolChanged(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StateError::Contended(
            format!("pool record {pool_id}"),
            MAX_UPDATE_ROUNDS,
        ))
    }

    /// Deletes a pool's record if it is still as read with `etag`; a record
    /// changed since fails with [`StateError::PoolChanged`].
    pub(crate) async fn delete_pool_if(&self, pool_id: &str, etag: &str) -> Result<(), StateError> {
        match self
            .store
            .delete_if_match(&self.pool_path(pool_id), etag)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) if e.class == ErrorClass::PreconditionFailed => {
                Err(StateError::PoolChanged(pool_id.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn put_pool(
        &self,
        pool_id: &str,
        record: &PoolRecord,
        condition: Condition,
    ) -> Result<String, StateError> {
        let bytes = Bytes::from(serde_json::to_vec_pretty(record).expect("pool records serialise"));
        match self
            .store
            .put_block_blob(
                &self.pool_path(pool_id),
                bytes,
                &Default::default(),
                condition,
            )
            .await
        {
            Ok(etag) => Ok(etag),
            Err(e) if e.code.as_deref() == Some("ContainerNotFound") => Err(e.into()),
            Err(e)
                if matches!(
                    e.class,
                    ErrorClass::PreconditionFailed | ErrorClass::Conflict | ErrorClass::NotFound
                ) =>
            {
                Err(StateError::PoolChanged(pool_id.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }
}
