//! The stored form of a job document: the JSON fields of every version, so
//! documents written by earlier versions still load.

use super::*;
use crate::job::{JobId, JobSpec};
use crate::storage::BlobPath;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A job document as stored: the JSON fields of every version (a retire job
/// was once a placeholder `spec` with `retire_pool`; `kind` says which now).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredDocument {
    job_id: JobId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spec: Option<JobSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retire_pool: Option<String>,
    state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    #[serde(default)]
    cancel_requested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_etag: Option<String>,
    #[serde(default)]
    replicas: Vec<ReplicaRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    handoff: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image_set: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<Owner>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gallery: Option<Publication>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pool_stage: Option<PoolStage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    relays: Vec<BlobPath>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    started_at: Option<OffsetDateTime>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    progress_log: Vec<crate::estimate::Sample>,
}

impl TryFrom<StoredDocument> for JobDocument {
    type Error = String;
    fn try_from(d: StoredDocument) -> Result<Self, String> {
        let work = match (d.kind.as_deref(), d.retire_pool, d.spec) {
            (Some("retire") | None, Some(pool), _) => Work::Retire { pool },
            (Some("replicate") | None, None, Some(spec)) => Work::Replicate(spec),
            (kind, _, _) => {
                return Err(format!(
                "a job document of kind {kind:?} needs a spec (replicate) or retire_pool (retire)"
            ))
            }
        };
        Ok(Self {
            job_id: d.job_id,
            work,
            state: d.state,
            phase: d.phase,
            error: d.error,
            created_at: d.created_at,
            updated_at: d.updated_at,
            cancel_requested: d.cancel_requested,
            source_snapshot: d.source_snapshot,
            source_bytes: d.source_bytes,
            source_etag: d.source_etag,
            replicas: d.replicas,
            handoff: d.handoff,
            image_set: d.image_set,
            owner: d.owner,
            gallery: d.gallery,
            pool_stage: d.pool_stage,
            relays: d.relays,
            started_at: d.started_at,
            progress_log: d.progress_log,
        })
    }
}

impl From<JobDocument> for StoredDocument {
    fn from(d: JobDocument) -> Self {
        let (kind, spec, retire_pool) = match d.work {
            Work::Replicate(spec) => ("replicate", Some(spec), None),
            Work::Retire { pool } => ("retire", None, Some(pool)),
        };
        Self {
            job_id: d.job_id,
            kind: Some(kind.to_owned()),
            spec,
            retire_pool,
            state: d.state,
            phase: d.phase,
            error: d.error,
            created_at: d.created_at,
            updated_at: d.updated_at,
            cancel_requested: d.cancel_requested,
            source_snapshot: d.source_snapshot,
            source_bytes: d.source_bytes,
            source_etag: d.source_etag,
            replicas: d.replicas,
            handoff: d.handoff,
            image_set: d.image_set,
            owner: d.owner,
            gallery: d.gallery,
            pool_stage: d.pool_stage,
            relays: d.relays,
            started_at: d.started_at,
            progress_log: d.progress_log,
        }
    }
}
