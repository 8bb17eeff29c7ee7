//! Decoding queue messages and job JSON, each error naming its field, and
//! what can be salvaged of a message that is not a job.

use super::*;
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};

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
        submitted_by: s(v, "submitted_by"),
    }
}
