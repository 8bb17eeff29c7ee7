//! What a listing of the job documents tells without reading them: every job
//! document carries its summary in its blob metadata, written with the
//! document, so one List Blobs call (5,000 documents per page) answers
//! `GET /v1/jobs`, the status page, retire and gc.

use super::{JobDocument, JobState, Phase, ReplicaState, Work};
use crate::storage::Metadata;
use serde::Serialize;
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

/// Metadata keys of a summary (lower case, as Azure returns them).
mod key {
    pub(super) const STATE: &str = "vhdrep_state";
    pub(super) const PHASE: &str = "vhdrep_phase";
    pub(super) const KIND: &str = "vhdrep_kind";
    pub(super) const POOL: &str = "vhdrep_pool";
    pub(super) const CREATED: &str = "vhdrep_created";
    pub(super) const UPDATED: &str = "vhdrep_updated";
    pub(super) const REPLICAS: &str = "vhdrep_replicas";
    pub(super) const VERIFIED: &str = "vhdrep_verified";
    pub(super) const BYTES_COPIED: &str = "vhdrep_bytes_copied";
    pub(super) const BYTES_TOTAL: &str = "vhdrep_bytes_total";
    pub(super) const CANCEL: &str = "vhdrep_cancel";
    pub(super) const CONTAINER: &str = "vhdrep_container";
    pub(super) const SOURCE: &str = "vhdrep_source";
    pub(super) const ERROR: &str = "vhdrep_error";
    pub(super) const NODES: &str = "vhdrep_nodes";
    pub(super) const STARTED: &str = "vhdrep_started";
    pub(super) const RATE: &str = "vhdrep_rate";
    pub(super) const ETA: &str = "vhdrep_eta";
}

/// The longest error text a summary keeps (the document has all of it).
const ERROR_CHARS: usize = 300;

/// A job as its listing shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSummary {
    /// Job id.
    pub job_id: String,
    /// State.
    pub state: JobState,
    /// Phase while running.
    pub phase: Option<Phase>,
    /// `replicate` or `retire`.
    pub kind: &'static str,
    /// Batch pool id.
    pub pool_id: String,
    /// When it was submitted.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Replicas planned.
    pub replicas: u32,
    /// Replicas verified.
    pub verified: u32,
    /// Bytes copied so far, over every replica.
    pub bytes_copied: u64,
    /// Bytes to copy, over every replica.
    pub bytes_total: u64,
    /// Someone asked to cancel it.
    pub cancel_requested: bool,
    /// Destination container (for gc's scan).
    #[serde(skip)]
    pub container: Option<String>,
    /// The source URL as submitted (for gc's scan).
    #[serde(skip)]
    pub source: Option<String>,
    /// The error, its first few hundred characters.
    pub error: Option<String>,
    /// Nodes of the pool (0 for a retire).
    pub nodes: u32,
    /// When it started running.
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    /// Observed copy throughput when last written, bytes per second.
    pub throughput_bytes_per_second: Option<u64>,
    /// When the copying will be done at that throughput.
    #[serde(with = "time::serde::rfc3339::option")]
    pub eta_at: Option<OffsetDateTime>,
}

impl JobSummary {
    /// The summary of a document.
    pub fn of(doc: &JobDocument) -> Self {
        let total: u64 = doc.replicas.iter().map(|r| r.bytes_total).sum();
        let copied = doc.bytes_copied();
        let rate = crate::estimate::throughput(&doc.progress_log);
        Self {
            nodes: doc.spec().map_or(0, |s| s.pool.nodes),
            started_at: doc.started_at,
            throughput_bytes_per_second: rate.map(|r| r as u64),
            eta_at: crate::estimate::eta(&doc.progress_log, total, rate),
            job_id: doc.job_id.to_string(),
            state: doc.state,
            phase: doc.phase,
            kind: match doc.work {
                Work::Retire { .. } => "retire",
                Work::Replicate(_) => "replicate",
            },
            pool_id: doc.pool_id().to_owned(),
            created_at: doc.created_at,
            updated_at: doc.updated_at,
            replicas: doc.replicas.len() as u32,
            verified: doc
                .replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Verified)
                .count() as u32,
            bytes_copied: copied,
            bytes_total: total,
            cancel_requested: doc.cancel_requested,
            container: doc
                .replicas
                .first()
                .map(|r| r.blob.container.clone())
                .or_else(|| doc.spec().and_then(|s| s.container.clone())),
            source: doc
                .spec()
                .map(|s| s.source.clone())
                .filter(|s| !s.is_empty()),
            error: doc
                .error
                .as_ref()
                .map(|e| e.chars().take(ERROR_CHARS).collect()),
        }
    }

    /// Share of bytes copied, 0 to 1 (1 for a completed job with nothing to copy).
    pub fn progress(&self) -> f64 {
        if self.bytes_total == 0 {
            return if self.state == JobState::Completed {
                1.0
            } else {
                0.0
            };
        }
        self.bytes_copied as f64 / self.bytes_total as f64
    }

    /// The summary as blob metadata: ASCII values only (the error text is
    /// percent-encoded), well under the service's 8 KiB.
    pub(crate) fn to_metadata(&self) -> Metadata {
        let mut m = Metadata::new();
        let time = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
        m.insert(key::STATE.into(), self.state.as_str().into());
        if let Some(p) = self.phase {
            m.insert(key::PHASE.into(), p.as_str().into());
        }
        m.insert(key::KIND.into(), self.kind.into());
        m.insert(key::POOL.into(), encode(&self.pool_id));
        m.insert(key::CREATED.into(), time(self.created_at));
        m.insert(key::UPDATED.into(), time(self.updated_at));
        m.insert(key::REPLICAS.into(), self.replicas.to_string());
        m.insert(key::VERIFIED.into(), self.verified.to_string());
        m.insert(key::BYTES_COPIED.into(), self.bytes_copied.to_string());
        m.insert(key::BYTES_TOTAL.into(), self.bytes_total.to_string());
        if self.cancel_requested {
            m.insert(key::CANCEL.into(), "1".into());
        }
        if let Some(c) = &self.container {
            m.insert(key::CONTAINER.into(), encode(c));
        }
        if let Some(s) = &self.source {
            m.insert(key::SOURCE.into(), encode(s));
        }
        if let Some(e) = &self.error {
            m.insert(key::ERROR.into(), encode(e));
        }
        m.insert(key::NODES.into(), self.nodes.to_string());
        if let Some(t) = self.started_at {
            m.insert(key::STARTED.into(), time(t));
        }
        if let Some(r) = self.throughput_bytes_per_second {
            m.insert(key::RATE.into(), r.to_string());
        }
        if let Some(t) = self.eta_at {
            m.insert(key::ETA.into(), time(t));
        }
        m
    }

    /// Elapsed time, throughput and ETA at `now`, for people.
    pub fn timing(&self, now: OffsetDateTime) -> crate::estimate::Timing {
        crate::estimate::timing(
            self.state == JobState::Running,
            self.started_at,
            self.state.is_terminal().then_some(self.updated_at),
            self.throughput_bytes_per_second.map(|r| r as f64),
            self.eta_at,
            self.bytes_total == 0 || self.bytes_copied < self.bytes_total,
            now,
        )
    }

    /// Reads a summary back from the metadata of `jobs/<job_id>.json`; `None`
    /// when it carries none (a document written before summaries existed).
    pub(crate) fn from_metadata(job_id: &str, m: &Metadata) -> Option<Self> {
        let get = |k: &str| m.get(k).map(String::as_str);
        let time = |k: &str| get(k).and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok());
        let num = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        Some(Self {
            job_id: job_id.to_owned(),
            state: JobState::parse(get(key::STATE)?)?,
            phase: get(key::PHASE).and_then(Phase::parse),
            kind: if get(key::KIND) == Some("retire") {
                "retire"
            } else {
                "replicate"
            },
            pool_id: decode(get(key::POOL)?),
            created_at: time(key::CREATED)?,
            updated_at: time(key::UPDATED)?,
            replicas: num(key::REPLICAS) as u32,
            verified: num(key::VERIFIED) as u32,
            bytes_copied: num(key::BYTES_COPIED),
            bytes_total: num(key::BYTES_TOTAL),
            cancel_requested: get(key::CANCEL) == Some("1"),
            container: get(key::CONTAINER).map(decode),
            source: get(key::SOURCE).map(decode),
            error: get(key::ERROR).map(decode),
            nodes: num(key::NODES) as u32,
            started_at: time(key::STARTED),
            throughput_bytes_per_second: get(key::RATE).and_then(|v| v.parse().ok()),
            eta_at: time(key::ETA),
        })
    }
}

fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("v={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}
