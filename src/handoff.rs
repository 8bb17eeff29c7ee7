//! The hand-off to the pool-creation stage: the replica URIs and a ready Azure
//! Batch "Add pool" body (API 2017-05-01.5.0), sent to the hand-off queue and
//! optionally written to a directory and POSTed to a webhook. No SAS, ever.

use crate::job::{Caching, JobId, Os, ValidatedJob};
use crate::queue::MessageQueue;
use crate::storage::{auth::redact_sas, StorageError, TransportFailure};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use url::Url;

/// `virtualMachineConfiguration.osDisk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsDisk {
    /// Replica URIs.
    #[serde(rename = "imageUris")]
    pub image_uris: Vec<String>,
    /// Caching mode.
    pub caching: Caching,
}

/// `virtualMachineConfiguration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualMachineConfiguration {
    /// The custom image.
    #[serde(rename = "osDisk")]
    pub os_disk: OsDisk,
    /// Node agent SKU.
    #[serde(rename = "nodeAgentSKUId", skip_serializing_if = "Option::is_none")]
    pub node_agent_sku_id: Option<String>,
}

/// The body of Batch "Add pool", API 2017-05-01.5.0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddPool {
    /// Pool id.
    pub id: String,
    /// VM size, when the job gave one.
    #[serde(rename = "vmSize", skip_serializing_if = "Option::is_none")]
    pub vm_size: Option<String>,
    /// Dedicated nodes.
    #[serde(rename = "targetDedicatedNodes")]
    pub target_dedicated_nodes: u32,
    /// VM configuration with the custom image.
    #[serde(rename = "virtualMachineConfiguration")]
    pub virtual_machine_configuration: VirtualMachineConfiguration,
}

/// The hand-off message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandOff {
    /// Job id (the stage dedupes by it).
    pub job_id: JobId,
    /// Source URL as submitted.
    pub source: String,
    /// Snapshot every replica was copied from.
    pub source_snapshot: String,
    /// Node OS.
    pub os: Os,
    /// Replica URIs, by replica index.
    pub image_uris: Vec<String>,
    /// Ready add-pool body.
    pub add_pool: AddPool,
}

impl HandOff {
    /// Builds the hand-off of a finished job.
    pub fn new(job: &ValidatedJob, source_snapshot: &str, image_uris: Vec<String>) -> Self {
        let pool = &job.spec.pool;
        let image_uris: Vec<String> = image_uris.iter().map(|u| redact_query(u)).collect();
        let node_agent = pool.node_agent_sku_id.clone().or_else(|| match pool.os {
            Os::Windows => Some("batch.node.windows amd64".to_owned()),
            Os::Linux => None,
        });
        Self {
            job_id: job.id.clone(),
            source: redact_query(&job.spec.source),
            source_snapshot: source_snapshot.to_owned(),
            os: pool.os,
            image_uris: image_uris.clone(),
            add_pool: AddPool {
                id: pool.id.clone(),
                vm_size: pool.vm_size.clone(),
                target_dedicated_nodes: pool.nodes,
                virtual_machine_configuration: VirtualMachineConfiguration {
                    os_disk: OsDisk {
                        image_uris,
                        caching: pool.caching.unwrap_or_default(),
                    },
                    node_agent_sku_id: node_agent,
                },
            },
        }
    }
}

/// Drops any query string (a SAS) from a URI.
fn redact_query(uri: &str) -> String {
    match Url::parse(uri) {
        Ok(mut u) => {
            u.set_query(None);
            u.to_string()
        }
        Err(_) => redact_sas(uri),
    }
}

/// Hand-off failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The queue refused the message.
    #[error("hand-off queue: {0}")]
    Queue(#[from] crate::storage::StorageError),
    /// The file could not be written.
    #[error("hand-off file {path}: {error}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        error: String,
    },
    /// The webhook refused it.
    #[error("hand-off webhook {url}: {error}")]
    Webhook {
        /// The webhook (query removed).
        url: String,
        /// What went wrong.
        error: String,
    },
}

/// Every configured hand-off destination.
#[derive(Debug, Clone)]
pub struct HandoffSinks {
    /// The hand-off queue.
    pub queue: std::sync::Arc<dyn MessageQueue>,
    /// Directory for `<job_id>.json`.
    pub dir: Option<PathBuf>,
    /// Webhook URL.
    pub webhook: Option<Url>,
    /// HTTP client for the webhook (with a connect timeout).
    pub http: reqwest::Client,
    /// The retry policy every outbound call follows (attempt timeout included).
    pub retry: crate::storage::retry::RetryPolicy,
}

impl HandoffSinks {
    /// Delivers the hand-off to every sink (at least once; the stage dedupes by job id).
    pub async fn deliver(&self, handoff: &HandOff) -> Result<(), HandoffError> {
        let text = serde_json::to_string(handoff).expect("hand-off serialises");
        self.queue.send(&text).await?;
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{}.json", handoff.job_id));
            let tmp = dir.join(format!(".{}.json.tmp", handoff.job_id));
            let pretty = serde_json::to_string_pretty(handoff).expect("hand-off serialises");
            let write = async {
                tokio::fs::create_dir_all(dir).await?;
                tokio::fs::write(&tmp, pretty.as_bytes()).await?;
                tokio::fs::rename(&tmp, &path).await
            };
            write.await.map_err(|e| HandoffError::File {
                path: path.display().to_string(),
                error: e.to_string(),
            })?;
        }
        if let Some(url) = &self.webhook {
            self.post_webhook(url, &text).await?;
        }
        Ok(())
    }
}

impl HandoffSinks {
    /// POSTs the hand-off under the retry policy: each attempt timed, 429 and 5xx
    /// and broken connections retried (the stage dedupes by job id), other
    /// answers final.
    async fn post_webhook(&self, url: &Url, text: &str) -> Result<(), HandoffError> {
        const OP: &str = "webhook";
        let shown = redact_query(url.as_str());
        let attempt = || async {
            let rsp = self
                .http
                .post(url.clone())
                .header("content-type", "application/json")
                .body(text.to_owned())
                .send()
                .await
                .map_err(|e| {
                    let failure = if e.is_connect() {
                        TransportFailure::Connect
                    } else {
                        TransportFailure::Broken
                    };
                    StorageError::transport(
                        OP,
                        &shown,
                        failure,
                        redact_sas(&e.without_url().to_string()),
                    )
                })?;
            if rsp.status().is_success() {
                Ok(())
            } else {
                Err(StorageError::http(OP, &shown, rsp.status().as_u16(), None))
            }
        };
        self.retry
            .run(
                crate::storage::retry::Idempotency::Idempotent,
                |_| {},
                || self.retry.timed(OP, &shown, attempt()),
            )
            .await
            .map_err(|e| HandoffError::Webhook {
                url: shown.clone(),
                error: e.message,
            })
    }
}
