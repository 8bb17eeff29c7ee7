//! A job as it comes over the wire (queue message, `POST /v1/jobs`, a file),
//! a retire request, and a job checked against the configuration.

use super::*;
use crate::storage::BlobPath;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Operating system of the pool's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    /// Windows: 20 nodes per VHD.
    Windows,
    /// Linux: 40 nodes per VHD.
    Linux,
}

impl fmt::Display for Os {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Os::Windows => "windows",
            Os::Linux => "linux",
        })
    }
}

/// OS disk caching of the pool's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Caching {
    /// No caching (default).
    #[default]
    #[serde(rename = "none")]
    None,
    /// Read-only caching.
    #[serde(rename = "readOnly")]
    ReadOnly,
    /// Read-write caching.
    #[serde(rename = "readWrite")]
    ReadWrite,
}

/// The `pool` object of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Batch pool id.
    pub id: String,
    /// Node OS.
    pub os: Os,
    /// Dedicated nodes the pool will have.
    pub nodes: u32,
    /// VM size for the add-pool body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_size: Option<String>,
    /// Node agent SKU for the add-pool body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_agent_sku_id: Option<String>,
    /// OS disk caching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caching: Option<Caching>,
}

/// A job as submitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Idempotency key; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// URL of the source VHD (a page blob in a configured account).
    pub source: String,
    /// The pool the replicas are for.
    pub pool: PoolSpec,
    /// Replicas to make; default ceil(nodes / per-VHD limit of the OS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Destination accounts; default every configured destination account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounts: Option<Vec<String>>,
    /// Destination container; default `vhd-replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Publish to the configured gallery (default: when `[gallery]` is configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gallery: Option<bool>,
    /// Who submitted it: `watch` for a grow job of the pool stage's background
    /// scaling (such a job raises image capacity only, never the pool's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
}

/// `submitted_by` of the jobs background scaling submits.
pub const SUBMITTED_BY_WATCH: &str = "watch";

/// A job checked against the configuration, with defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidatedJob {
    /// Job id.
    pub id: JobId,
    /// The spec as submitted (with the id filled in).
    pub spec: JobSpec,
    /// The source blob.
    pub source: BlobPath,
    /// Replicas to make.
    pub replicas: u32,
    /// Destination accounts, in order.
    pub accounts: Vec<String>,
    /// Destination container.
    pub container: String,
    /// `vmSize` of the add-pool body: the job's, else `handoff.vm_size`.
    pub vm_size: String,
    /// `nodeAgentSKUId` of the add-pool body: the job's, else the configured
    /// default for its OS.
    pub node_agent_sku_id: String,
    /// Publishes an image version to the configured gallery.
    #[serde(default)]
    pub publish: bool,
}

/// A request to retire a pool's image sets: delete its replicas and snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetireSpec {
    /// Idempotency key; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The pool whose image sets go.
    pub retire_pool: String,
}

impl RetireSpec {
    /// Checks the ids and fills in a job id.
    pub fn validate(&self) -> Result<(JobId, String), JobError> {
        let id = match &self.job_id {
            Some(id) => JobId::parse(id).map_err(|m| JobError::new("job_id", m))?,
            None => JobId::generate(),
        };
        let pool = &self.retire_pool;
        if pool.is_empty()
            || pool.len() > 64
            || !pool
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(JobError::new(
                "retire_pool",
                format!("{pool:?} is not a Batch pool id"),
            ));
        }
        Ok((id, pool.clone()))
    }
}
