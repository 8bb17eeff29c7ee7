//! Jobs: the submitted spec (queue message, `submit --file`, `POST /v1/jobs`), its
//! validation against the configuration, ids and states.

use crate::azure::names::check_container_name;
use crate::config::ValidatedSettings;
use crate::storage::BlobPath;
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Default destination container.
pub(crate) const DEFAULT_CONTAINER: &str = "vhd-replicas";
/// More nodes than any Batch pool can have.
pub(crate) const MAX_NODES: u32 = 100_000;
/// More replicas than one job may ask for.
pub(crate) const MAX_REPLICAS: u32 = 5_000;

/// A job id: `[a-z0-9-]{1,63}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// Checks the id's characters and length.
    pub fn parse(text: &str) -> Result<Self, String> {
        if (1..=63).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            Ok(Self(text.to_owned()))
        } else {
            Err(format!(
                "{text:?} is not a job id: use 1-63 lower-case letters, digits and hyphens"
            ))
        }
    }

    /// A fresh random id.
    pub(crate) fn generate() -> Self {
        Self(format!("job-{}", uuid::Uuid::new_v4().simple()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> Self {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

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
}

/// Why a job was refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct JobError {
    /// The field, e.g. `pool.nodes`.
    pub field: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl JobError {
    fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

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

/// A message of the intake queue, decoded once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Replicate a VHD (the job as sent, not yet checked against the configuration).
    Replicate(JobSpec),
    /// Retire a pool's image sets.
    Retire(RetireSpec),
    /// Not a job: why, and what could be read of it.
    Invalid(InvalidMessage),
}

/// A message that is not a job, with what could be salvaged for its failed
/// state document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidMessage {
    /// What is wrong, naming the field.
    pub error: JobError,
    /// Its job id, when it had a valid one.
    pub job_id: Option<JobId>,
    /// What it asked for, as far as it could be read.
    pub salvage: Salvage,
}

/// What an invalid message asked for, as far as it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Salvage {
    /// A replication: the fields that parse, defaults for the rest.
    Replicate(JobSpec),
    /// A retirement of this pool.
    Retire(String),
}

impl Command {
    /// Decodes a message body: the JSON itself or its base64 (SDKs and `az
    /// storage message put` differ), then a retire request (it has
    /// `retire_pool`) or a job.
    pub fn decode(text: &str) -> Self {
        let value = match message_json(text) {
            Ok(v) => v,
            Err(error) => {
                return Command::Invalid(InvalidMessage {
                    error,
                    job_id: None,
                    salvage: Salvage::Replicate(lenient_spec(&serde_json::Value::Null)),
                })
            }
        };
        let job_id = value
            .get("job_id")
            .and_then(|v| v.as_str())
            .and_then(|id| JobId::parse(id).ok());
        if let Some(pool) = value.get("retire_pool") {
            let salvage = Salvage::Retire(pool.as_str().unwrap_or_default().to_owned());
            return match deserialize_named(value.clone()) {
                Ok(r) => Command::Retire(r),
                Err(error) => Command::Invalid(InvalidMessage {
                    error,
                    job_id,
                    salvage,
                }),
            };
        }
        match deserialize_named(value.clone()) {
            Ok(spec) => Command::Replicate(spec),
            Err(error) => Command::Invalid(InvalidMessage {
                error,
                job_id,
                salvage: Salvage::Replicate(lenient_spec(&value)),
            }),
        }
    }

    /// The message's job id, when it has a valid one.
    pub fn job_id(&self) -> Option<JobId> {
        match self {
            Command::Replicate(spec) => spec.job_id.as_deref().and_then(|i| JobId::parse(i).ok()),
            Command::Retire(r) => r.job_id.as_deref().and_then(|i| JobId::parse(i).ok()),
            Command::Invalid(m) => m.job_id.clone(),
        }
    }
}

/// The JSON object of a message body (JSON or base64 of JSON).
fn message_json(text: &str) -> Result<serde_json::Value, JobError> {
    let trimmed = text.trim();
    let value = match serde_json::from_str::<serde_json::Value>(trimmed) {
        Ok(v) => v,
        Err(_) => {
            let bytes = B64.decode(trimmed).map_err(|_| {
                JobError::new(
                    "message",
                    "the message is neither JSON nor base64-encoded JSON; send the job object of CONTRACT.md",
                )
            })?;
            let text = String::from_utf8(bytes).map_err(|_| {
                JobError::new(
                    "message",
                    "the base64 message does not decode to UTF-8 text",
                )
            })?;
            serde_json::from_str(&text)
                .map_err(|e| JobError::new("message", format!("not valid JSON: {e}")))?
        }
    };
    if !value.is_object() {
        return Err(JobError::new("message", "the job must be a JSON object"));
    }
    Ok(value)
}

/// Deserializes a JSON object, naming the field of any error.
fn deserialize_named<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, JobError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "job".to_owned() } else { path };
        JobError::new(&field, e.into_inner().to_string())
    })
}

/// Parses job JSON (the body of `POST /v1/jobs`, `submit --file`), naming the
/// field of any error.
pub fn parse_job_json(json: &str) -> Result<JobSpec, JobError> {
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| JobError::new("message", format!("not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(JobError::new("message", "the job must be a JSON object"));
    }
    deserialize_named(value)
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

/// What can be read of an invalid job, for its failed state document: the fields
/// that parse, defaults for the rest.
fn lenient_spec(v: &serde_json::Value) -> JobSpec {
    let s = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let pool = v.get("pool").cloned().unwrap_or_default();
    JobSpec {
        job_id: s(v, "job_id"),
        source: s(v, "source").unwrap_or_default(),
        pool: PoolSpec {
            id: s(&pool, "id").unwrap_or_default(),
            os: serde_json::from_value(pool.get("os").cloned().unwrap_or_default())
                .unwrap_or(Os::Windows),
            nodes: pool
                .get("nodes")
                .and_then(|n| n.as_u64())
                .unwrap_or(0)
                .min(u32::MAX as u64) as u32,
            vm_size: None,
            node_agent_sku_id: None,
            caching: None,
        },
        replicas: None,
        accounts: None,
        container: s(v, "container"),
        gallery: None,
    }
}

/// Replicas a pool of `nodes` needs: one VHD per so many nodes of its OS.
pub(crate) fn replicas_needed(os: Os, nodes: u32, limits: &crate::config::LimitSettings) -> u32 {
    let per = match os {
        Os::Windows => limits.windows_nodes_per_vhd,
        Os::Linux => limits.linux_nodes_per_vhd,
    }
    .max(1);
    nodes.div_ceil(per)
}

/// Finds which configured account holds the blob at `url`.
pub fn locate_source(url: &str, settings: &ValidatedSettings) -> Result<BlobPath, JobError> {
    let parsed = url::Url::parse(url).map_err(|_| {
        JobError::new(
            "source",
            format!("{url:?} is not a URL; give the VHD's blob URL"),
        )
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(JobError::new(
            "source",
            "the source must be an http(s) blob URL",
        ));
    }
    if parsed.query().is_some() {
        return Err(JobError::new(
            "source",
            "the source URL must not carry a query or SAS; the daemon signs its own read access",
        ));
    }
    for account in &settings.accounts {
        let base = account.blob_endpoint.as_str().trim_end_matches('/');
        if let Some(rest) = url.strip_prefix(base).and_then(|r| r.strip_prefix('/')) {
            let (container, name) = rest.split_once('/').ok_or_else(|| {
                JobError::new("source", "the source URL must name a container and a blob")
            })?;
            if name.is_empty() {
                return Err(JobError::new("source", "the source URL must name a blob"));
            }
            let name =
                url::form_urlencoded::parse(format!("n={}", name.replace('+', "%2B")).as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
            return Ok(BlobPath::new(&account.name, container, &name));
        }
    }
    Err(JobError::new(
        "source",
        format!("{url} is not in any configured account; add its account to [[accounts]] (destination = false for a source-only account)"),
    ))
}

impl JobSpec {
    /// Checks the job against the configuration and fills in defaults; the
    /// first problem found is refused, naming its field.
    pub fn validate(&self, settings: &ValidatedSettings) -> Result<ValidatedJob, JobError> {
        let id = match &self.job_id {
            Some(id) => JobId::parse(id).map_err(|m| JobError::new("job_id", m))?,
            None => JobId::generate(),
        };
        let source = locate_source(&self.source, settings)?;
        self.pool.check()?;
        let publish = match (self.gallery, &settings.gallery) {
            (Some(true), None) => {
                return Err(JobError::new(
                    "gallery",
                    "true needs a [gallery] section in the configuration; remove it to hand off VHD URIs only",
                ))
            }
            (Some(false), _) | (None, None) => false,
            (_, Some(_)) => true,
        };
        let replicas = self.replicas_for(settings, publish)?;
        let accounts = self.accounts_for(settings)?;
        let capacity: std::collections::BTreeMap<String, Option<u32>> = accounts
            .iter()
            .map(|a| (a.clone(), settings.account(a).and_then(|c| c.max_replicas)))
            .collect();
        crate::placement::place_more(replicas, &accounts, &Default::default(), &capacity)
            .map_err(|e| JobError::new("replicas", e.to_string()))?;
        let container = self
            .container
            .clone()
            .unwrap_or_else(|| DEFAULT_CONTAINER.to_owned());
        check_container_name(&container).map_err(|m| JobError::new("container", m))?;
        let (vm_size, node_agent_sku_id) = add_pool_fields(&self.pool, &settings.handoff)?;
        let mut spec = self.clone();
        spec.job_id = Some(id.to_string());
        Ok(ValidatedJob {
            id,
            spec,
            source,
            replicas,
            accounts,
            container,
            vm_size,
            node_agent_sku_id,
            publish,
        })
    }

    /// Replicas to make: the default for the nodes, or as many as asked if that
    /// serves them. A job that publishes to a gallery stages one VHD (the
    /// gallery makes the copies the nodes boot from), unless it asks for more.
    fn replicas_for(&self, settings: &ValidatedSettings, publish: bool) -> Result<u32, JobError> {
        let pool = &self.pool;
        let needed = if publish {
            1
        } else {
            replicas_needed(pool.os, pool.nodes, &settings.limits)
        };
        match self.replicas {
            None => Ok(needed),
            Some(0) => Err(JobError::new(
                "replicas",
                "must be at least 1; omit it to use the default",
            )),
            Some(r) if r > MAX_REPLICAS => Err(JobError::new(
                "replicas",
                format!("{r} is more than one job may make (at most {MAX_REPLICAS})"),
            )),
            Some(r) if r < needed => {
                let per = match pool.os {
                    Os::Windows => settings.limits.windows_nodes_per_vhd,
                    Os::Linux => settings.limits.linux_nodes_per_vhd,
                };
                Err(JobError::new(
                    "replicas",
                    format!(
                        "{r} replicas serve fewer than {} {} nodes (Batch allows {per} nodes per VHD); ask for at least {needed} or omit replicas",
                        pool.nodes, pool.os,
                    ),
                ))
            }
            Some(r) => Ok(r),
        }
    }

    /// Destination accounts: the job's (configured destinations, each once), or
    /// every destination account.
    fn accounts_for(&self, settings: &ValidatedSettings) -> Result<Vec<String>, JobError> {
        let Some(list) = &self.accounts else {
            return Ok(settings.destination_accounts());
        };
        if list.is_empty() {
            return Err(JobError::new(
                "accounts",
                "must name at least one account; omit it to use every destination account",
            ));
        }
        let mut out: Vec<String> = Vec::new();
        for (i, name) in list.iter().enumerate() {
            let field = format!("accounts[{i}]");
            match settings.account(name) {
                None => {
                    return Err(JobError::new(
                        &field,
                        format!("{name:?} is not a configured account"),
                    ))
                }
                Some(a) if !a.destination => {
                    return Err(JobError::new(
                        &field,
                        format!("{name:?} is not a destination account (destination = false)"),
                    ))
                }
                Some(_) if out.contains(name) => {
                    return Err(JobError::new(&field, format!("{name:?} is listed twice")))
                }
                Some(_) => out.push(name.clone()),
            }
        }
        Ok(out)
    }
}

impl PoolSpec {
    /// A Batch pool id, a node count Batch allows, no empty VM size.
    fn check(&self) -> Result<(), JobError> {
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(JobError::new(
                "pool.id",
                format!(
                    "{:?} is not a Batch pool id: 1-64 letters, digits, hyphens and underscores",
                    self.id
                ),
            ));
        }
        if self.nodes == 0 {
            return Err(JobError::new("pool.nodes", "must be at least 1"));
        }
        if self.nodes > MAX_NODES {
            return Err(JobError::new(
                "pool.nodes",
                format!(
                    "{} is more than any Batch pool holds (at most {MAX_NODES})",
                    self.nodes
                ),
            ));
        }
        if self
            .vm_size
            .as_deref()
            .is_some_and(|vm| vm.trim().is_empty())
        {
            return Err(JobError::new(
                "pool.vm_size",
                "must not be empty; omit it or name a VM size",
            ));
        }
        Ok(())
    }
}

/// `vmSize` and `nodeAgentSKUId`, which Batch's Add Pool requires: the job's,
/// else the configured defaults; a job that has neither is refused at submission
/// rather than handed off with a body Batch rejects.
fn add_pool_fields(
    pool: &PoolSpec,
    defaults: &crate::config::HandoffSettings,
) -> Result<(String, String), JobError> {
    let vm_size = non_empty(pool.vm_size.as_deref())
        .or_else(|| non_empty(Some(&defaults.vm_size)))
        .ok_or_else(|| {
            JobError::new(
                "pool.vm_size",
                "Batch's Add Pool requires vmSize: give pool.vm_size (e.g. \"STANDARD_D2_V3\") or set handoff.vm_size in the configuration",
            )
        })?;
    let (default_sku, key) = match pool.os {
        Os::Windows => (
            &defaults.windows_node_agent_sku_id,
            "handoff.windows_node_agent_sku_id",
        ),
        Os::Linux => (
            &defaults.linux_node_agent_sku_id,
            "handoff.linux_node_agent_sku_id",
        ),
    };
    let sku = non_empty(pool.node_agent_sku_id.as_deref())
        .or_else(|| non_empty(Some(default_sku)))
        .ok_or_else(|| {
            JobError::new(
                "pool.node_agent_sku_id",
                format!("Batch's Add Pool requires nodeAgentSKUId, which for {} depends on the image (e.g. \"batch.node.ubuntu 22.04\"): give pool.node_agent_sku_id or set {key} in the configuration", pool.os),
            )
        })?;
    Ok((vm_size.to_owned(), sku.to_owned()))
}

fn non_empty(v: Option<&str>) -> Option<&str> {
    v.map(str::trim).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids() {
        assert!(JobId::parse("render-2026-11-28").is_ok());
        assert!(JobId::parse("Render").is_err());
        assert!(JobId::parse("a_b").is_err());
        assert!(JobId::parse("").is_err());
        assert!(JobId::parse(&"a".repeat(64)).is_err());
        assert!(JobId::parse(JobId::generate().as_str()).is_ok());
    }

    const JOB: &str = r#"{"job_id":"j1","source":"http://x/a/b.vhd","pool":{"id":"render","os":"windows","nodes":200}}"#;

    fn replicate(text: &str) -> JobSpec {
        match Command::decode(text) {
            Command::Replicate(spec) => spec,
            other => panic!("not a job: {other:?}"),
        }
    }

    fn invalid(text: &str) -> InvalidMessage {
        match Command::decode(text) {
            Command::Invalid(m) => m,
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn messages_are_json_or_base64() {
        let a = replicate(JOB);
        let b = replicate(&B64.encode(JOB));
        assert_eq!(a, b);
        assert_eq!(a.pool.nodes, 200);
        assert_eq!(invalid("hello world").error.field, "message");
        assert_eq!(invalid("[1,2]").error.field, "message");
        assert_eq!(invalid(&B64.encode("[1]")).error.field, "message");
        let retire = Command::decode(r#"{"job_id":"r1","retire_pool":"p"}"#);
        assert_eq!(
            retire,
            Command::Retire(RetireSpec {
                job_id: Some("r1".into()),
                retire_pool: "p".into()
            })
        );
        assert_eq!(retire.job_id().unwrap().as_str(), "r1");
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_job_json(r#"{"source":"s","pool":{"id":"p","os":"windows","nodes":-5}}"#)
            .unwrap_err();
        assert_eq!(e.field, "pool.nodes");
        let e = parse_job_json(r#"{"source":"s","pool":{"id":"p","os":"beos","nodes":5}}"#)
            .unwrap_err();
        assert_eq!(e.field, "pool.os");
        let e =
            parse_job_json(r#"{"source":"s","pool":{"id":"p","os":"linux","nodes":5},"colour":1}"#)
                .unwrap_err();
        assert!(e.message.contains("colour"), "{e}");
        let e = parse_job_json(r#"{"pool":{"id":"p","os":"linux","nodes":5}}"#).unwrap_err();
        assert!(e.message.contains("source"), "{e}");
        let e = parse_job_json(
            r#"{"source":"s","pool":{"id":"p","os":"linux","nodes":5,"caching":"all"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "pool.caching");
    }

    #[test]
    fn ids_and_fields_of_invalid_jobs_are_still_read() {
        let text = r#"{"job_id":"j9","source":"s","pool":{"id":"p","os":"linux"}}"#;
        for encoded in [text.to_owned(), B64.encode(text)] {
            let m = invalid(&encoded);
            assert_eq!(m.job_id.unwrap().as_str(), "j9");
            let Salvage::Replicate(spec) = m.salvage else {
                panic!("a job")
            };
            assert_eq!(
                (spec.pool.id.as_str(), spec.pool.os, spec.pool.nodes),
                ("p", Os::Linux, 0)
            );
        }
        assert!(invalid(r#"{"job_id":"Bad Id"}"#).job_id.is_none());
        let m = invalid(r#"{"job_id":"r2","retire_pool":"p","colour":1}"#);
        assert_eq!(m.salvage, Salvage::Retire("p".into()));
        assert!(m.error.message.contains("colour"));
    }

    #[test]
    fn replicas_round_up() {
        let l = crate::config::LimitSettings::default();
        assert_eq!(replicas_needed(Os::Windows, 200, &l), 10);
        assert_eq!(replicas_needed(Os::Windows, 90, &l), 5);
        assert_eq!(replicas_needed(Os::Linux, 41, &l), 2);
        assert_eq!(replicas_needed(Os::Linux, 40, &l), 1);
        assert_eq!(replicas_needed(Os::Windows, 1, &l), 1);
    }
}
