//! The hand-off to the pool-creation stage: the replica URIs and a ready Azure
//! Batch "Add pool" body (API 2017-05-01.5.0), sent to the hand-off queue and
//! optionally written to a directory and POSTed to a webhook. No SAS, ever.
//!
//! A queue message holds at most 64 KiB. A hand-off that does not fit (about 270
//! replicas and more) is written whole to the state container and the queue
//! gets a small [`HandOffReference`] to it instead (a claim check); the file and
//! the webhook always get the whole document.

use crate::azure::{auth::redact_sas, ServiceError, TransportFailure};
use crate::job::{Caching, JobId, Os, ValidatedJob};
use crate::queue::{MessageQueue, QueueEncoding};
use crate::storage::BlobReference;
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
    /// Node agent SKU (required by Batch).
    #[serde(rename = "nodeAgentSKUId")]
    pub node_agent_sku_id: String,
}

/// The body of Batch "Add pool", API 2017-05-01.5.0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddPool {
    /// Pool id.
    pub id: String,
    /// VM size (required by Batch).
    #[serde(rename = "vmSize")]
    pub vm_size: String,
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
    /// Ready add-pool body of Batch API 2017-05-01.5.0 (legacy: VHD URIs);
    /// left out when the job published to a gallery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub add_pool: Option<AddPool>,
    /// The gallery image version the pool boots from, when the job published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gallery_image_version_id: Option<String>,
    /// Its replicas in the Batch region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gallery_replicas: Option<u32>,
    /// Ready body of Batch "Pool - Add", API [`BATCH_API_VERSION`], when the job published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_create: Option<PoolCreate>,
}

/// The Batch data-plane API version `pool_create` is written for, as the
/// `api-version` query string: `2025-06-01`, without the `.NN.0` suffix that
/// versions up to `2024-07-01.20.0` carried. (The Swagger published in
/// azure-rest-api-specs under `stable/2025-06-01.21.0/` still labels itself
/// `2025-06-01.21.0`; the service's version string has no suffix.)
pub const BATCH_API_VERSION: &str = "2025-06-01";

/// `resizeTimeout` of the pool-create body: Batch asks for at least 15 minutes
/// per 1,000 nodes of a large custom-image pool, and 15 minutes is its default.
pub(crate) fn resize_timeout(nodes: u32) -> String {
    format!("PT{}M", 15 * nodes.div_ceil(1000).max(1))
}

/// The body of Batch "Pool - Add" (REST API [`BATCH_API_VERSION`]) for a pool
/// booting a gallery image version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolCreate {
    /// Pool id.
    pub id: String,
    /// VM size.
    pub vm_size: String,
    /// Dedicated nodes.
    pub target_dedicated_nodes: u32,
    /// ISO 8601 duration: 15 minutes per 1,000 nodes, at least 15.
    pub resize_timeout: String,
    /// The image and node agent.
    pub virtual_machine_configuration: GalleryVmConfiguration,
}

/// `virtualMachineConfiguration` of [`PoolCreate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GalleryVmConfiguration {
    /// The gallery image version.
    #[serde(rename = "imageReference")]
    pub image_reference: ImageReference,
    /// Node agent SKU.
    #[serde(rename = "nodeAgentSKUId")]
    pub node_agent_sku_id: String,
}

/// `imageReference` naming a gallery image version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageReference {
    /// ARM id of the image version.
    #[serde(rename = "virtualMachineImageId")]
    pub virtual_machine_image_id: String,
}

impl HandOff {
    /// Builds the hand-off of a finished job.
    pub fn new(job: &ValidatedJob, source_snapshot: &str, image_uris: Vec<String>) -> Self {
        let pool = &job.spec.pool;
        let image_uris: Vec<String> = image_uris.iter().map(|u| redact_query(u)).collect();
        Self {
            job_id: job.id.clone(),
            source: redact_query(&job.spec.source),
            source_snapshot: source_snapshot.to_owned(),
            os: pool.os,
            image_uris: image_uris.clone(),
            gallery_image_version_id: None,
            gallery_replicas: None,
            pool_create: None,
            add_pool: Some(AddPool {
                id: pool.id.clone(),
                vm_size: job.vm_size.clone(),
                target_dedicated_nodes: pool.nodes,
                virtual_machine_configuration: VirtualMachineConfiguration {
                    os_disk: OsDisk {
                        image_uris,
                        caching: pool.caching.unwrap_or_default(),
                    },
                    node_agent_sku_id: job.node_agent_sku_id.clone(),
                },
            }),
        }
    }

    /// The hand-off of a job that published gallery image version
    /// `version_id` with `replicas`: the pool-create body of today's Batch API
    /// instead of the legacy add-pool body.
    pub fn published(mut self, job: &ValidatedJob, version_id: &str, replicas: u32) -> Self {
        let pool = &job.spec.pool;
        self.add_pool = None;
        self.gallery_image_version_id = Some(version_id.to_owned());
        self.gallery_replicas = Some(replicas);
        self.pool_create = Some(PoolCreate {
            id: pool.id.clone(),
            vm_size: job.vm_size.clone(),
            target_dedicated_nodes: pool.nodes,
            resize_timeout: resize_timeout(pool.nodes),
            virtual_machine_configuration: GalleryVmConfiguration {
                image_reference: ImageReference {
                    virtual_machine_image_id: version_id.to_owned(),
                },
                node_agent_sku_id: job.node_agent_sku_id.clone(),
            },
        });
        self
    }
}

/// The largest queue message Azure Storage accepts.
pub const MAX_QUEUE_MESSAGE: usize = 64 * 1024;

/// What the hand-off queue gets when the whole hand-off would not fit in one
/// message: the job's identity and where the whole document is (in the state
/// container of the control account; read it with the control account's
/// credentials). A consumer tells it apart by `handoff_ref`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandOffReference {
    /// Job id (the stage dedupes by it).
    pub job_id: JobId,
    /// Source URL as submitted.
    pub source: String,
    /// Snapshot every replica was copied from.
    pub source_snapshot: String,
    /// Node OS.
    pub os: Os,
    /// How many replica URIs the document lists.
    pub image_count: usize,
    /// Where the whole hand-off document is.
    pub handoff_ref: BlobReference,
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
    Queue(#[from] crate::azure::ServiceError),
    /// The whole document (for a hand-off too large for one message) could not
    /// be written.
    #[error("hand-off document: {0}")]
    Document(String),
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

impl HandoffError {
    /// Whether sending the same hand-off again can never succeed: the queue
    /// refused the message as too large (`413 RequestBodyTooLarge`, or
    /// `MessageTooLarge`). Everything else may pass on a later try.
    pub(crate) fn is_permanent(&self) -> bool {
        match self {
            HandoffError::Queue(e) => {
                e.status == Some(413)
                    || matches!(
                        e.code.as_deref(),
                        Some("RequestBodyTooLarge" | "MessageTooLarge")
                    )
            }
            _ => false,
        }
    }
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
    pub retry: crate::azure::retry::RetryPolicy,
    /// How the queue message is encoded.
    pub encoding: QueueEncoding,
    /// Where a hand-off too large for one message is written.
    pub state: crate::state::StateStore,
}

impl HandoffSinks {
    /// Delivers the hand-off to every sink (at least once; the stage dedupes by job id).
    pub async fn deliver(&self, handoff: &HandOff) -> Result<(), HandoffError> {
        let text = serde_json::to_string(handoff).expect("hand-off serialises");
        let message = self.queue_message(handoff, &text).await?;
        self.queue.send(&message).await?;
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
    /// The queue message for `handoff` (whose JSON is `text`): the hand-off
    /// itself when it fits, else a reference to the whole document, written to
    /// the state container first.
    async fn queue_message(&self, handoff: &HandOff, text: &str) -> Result<String, HandoffError> {
        let whole = self.encoding.encode(text);
        if whole.len() <= MAX_QUEUE_MESSAGE {
            return Ok(whole);
        }
        let blob = self
            .state
            .put_handoff(handoff.job_id.as_str(), text)
            .await
            .map_err(|e| HandoffError::Document(e.to_string()))?;
        let reference = HandOffReference {
            job_id: handoff.job_id.clone(),
            source: handoff.source.clone(),
            source_snapshot: handoff.source_snapshot.clone(),
            os: handoff.os,
            image_count: handoff.image_uris.len(),
            handoff_ref: blob,
        };
        tracing::info!(
            bytes = whole.len(),
            uris = handoff.image_uris.len(),
            "the hand-off exceeds a queue message; sending a reference to the whole document"
        );
        Ok(self
            .encoding
            .encode(&serde_json::to_string(&reference).expect("reference serialises")))
    }

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
                    ServiceError::transport(
                        OP,
                        &shown,
                        failure,
                        redact_sas(&e.without_url().to_string()),
                    )
                })?;
            if rsp.status().is_success() {
                Ok(())
            } else {
                Err(ServiceError::http(OP, &shown, rsp.status().as_u16(), None))
            }
        };
        self.retry
            .run(
                crate::azure::retry::Idempotency::Idempotent,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_timeout_is_15_minutes_per_1000_nodes() {
        assert_eq!(resize_timeout(200), "PT15M");
        assert_eq!(resize_timeout(1000), "PT15M");
        assert_eq!(resize_timeout(1001), "PT30M");
        assert_eq!(resize_timeout(2500), "PT45M");
    }
    use crate::config::{SecretSource, Settings};
    use serde_json::Value;

    struct Keys;
    impl SecretSource for Keys {
        fn env(&self, _: &str) -> Option<String> {
            Some("a2V5".into())
        }
        fn file(&self, _: &str) -> Result<String, String> {
            Err("none".into())
        }
    }

    fn settings(handoff: &str) -> crate::config::ValidatedSettings {
        Settings::from_toml(&format!(
            "[batch]\nsubscription = \"s\"\nregion = \"r\"\n[control]\naccount = \"ops\"\n[handoff]\n{handoff}\n\
             [[accounts]]\nname = \"ops\"\nkey_env = \"K\"\n[[accounts]]\nname = \"src\"\nkey_env = \"K\"\ndestination = false\n"
        ))
        .unwrap()
        .validate(&Keys)
        .unwrap()
    }

    fn job(settings: &crate::config::ValidatedSettings, pool: &str) -> ValidatedJob {
        crate::job::parse_job_json(&format!(
            r#"{{"job_id":"j","source":"https://src.blob.core.windows.net/i/a.vhd","pool":{pool}}}"#
        ))
        .unwrap()
        .validate(settings)
        .unwrap()
    }

    /// Checks a body against `PoolAddParameter` of Batch REST API 2017-05-01.5.0
    /// (azure-rest-api-specs, specification/batch/data-plane/Microsoft.Batch/
    /// stable/2017-05-01.5.0/BatchService.json), as far as this body goes:
    /// required properties, known property names, types and the caching enum.
    fn check_pool_add_2017_05_01(body: &Value) -> Result<(), String> {
        fn object<'a>(
            v: &'a Value,
            at: &str,
        ) -> Result<&'a serde_json::Map<String, Value>, String> {
            v.as_object().ok_or(format!("{at} is not an object"))
        }
        fn known(
            o: &serde_json::Map<String, Value>,
            at: &str,
            names: &[&str],
        ) -> Result<(), String> {
            match o.keys().find(|k| !names.contains(&k.as_str())) {
                Some(k) => Err(format!("{at}.{k} is not a property of the definition")),
                None => Ok(()),
            }
        }
        fn required(
            o: &serde_json::Map<String, Value>,
            at: &str,
            names: &[&str],
        ) -> Result<(), String> {
            match names.iter().find(|n| o.get(**n).is_none_or(Value::is_null)) {
                Some(n) => Err(format!("{at}.{n} is required")),
                None => Ok(()),
            }
        }
        let pool = object(body, "PoolAddParameter")?;
        known(
            pool,
            "PoolAddParameter",
            &[
                "id",
                "displayName",
                "vmSize",
                "cloudServiceConfiguration",
                "virtualMachineConfiguration",
                "resizeTimeout",
                "targetDedicatedNodes",
                "targetLowPriorityNodes",
                "enableAutoScale",
                "autoScaleFormula",
                "autoScaleEvaluationInterval",
                "enableInterNodeCommunication",
                "networkConfiguration",
                "startTask",
                "certificateReferences",
                "applicationPackageReferences",
                "applicationLicenses",
                "maxTasksPerNode",
                "taskSchedulingPolicy",
                "userAccounts",
                "metadata",
            ],
        )?;
        required(pool, "PoolAddParameter", &["id", "vmSize"])?;
        for s in ["id", "vmSize"] {
            if pool[s].as_str().is_none_or(|v| v.is_empty()) {
                return Err(format!("PoolAddParameter.{s} must be a non-empty string"));
            }
        }
        if !pool["targetDedicatedNodes"]
            .as_i64()
            .is_some_and(|n| n >= 0 && n <= i32::MAX as i64)
        {
            return Err("targetDedicatedNodes must be an int32".into());
        }
        let vm = object(
            &pool["virtualMachineConfiguration"],
            "virtualMachineConfiguration",
        )?;
        known(
            vm,
            "VirtualMachineConfiguration",
            &[
                "imageReference",
                "osDisk",
                "nodeAgentSKUId",
                "windowsConfiguration",
            ],
        )?;
        required(vm, "VirtualMachineConfiguration", &["nodeAgentSKUId"])?;
        if vm.contains_key("imageReference") == vm.contains_key("osDisk") {
            return Err("exactly one of imageReference and osDisk".into());
        }
        let disk = object(&vm["osDisk"], "osDisk")?;
        known(disk, "OSDisk", &["imageUris", "caching"])?;
        required(disk, "OSDisk", &["imageUris"])?;
        let uris = disk["imageUris"]
            .as_array()
            .ok_or("imageUris is not an array")?;
        if uris.is_empty() || !uris.iter().all(Value::is_string) {
            return Err("imageUris must list strings".into());
        }
        if let Some(c) = disk.get("caching") {
            if !matches!(c.as_str(), Some("none" | "readOnly" | "readWrite")) {
                return Err(format!("caching {c} is not none, readOnly or readWrite"));
            }
        }
        Ok(())
    }

    /// Every add-pool body is valid for its API version: vmSize and
    /// nodeAgentSKUId come from the job or the configured defaults.
    #[test]
    fn add_pool_bodies_follow_the_batch_definition() {
        let uris = vec!["https://dst1.blob.core.windows.net/v/a.vhd?sig=x".to_owned()];
        let s = settings(
            "vm_size = \"STANDARD_D2_V3\"\nlinux_node_agent_sku_id = \"batch.node.ubuntu 22.04\"",
        );
        for pool in [
            r#"{"id":"w","os":"windows","nodes":20}"#,
            r#"{"id":"l","os":"linux","nodes":40}"#,
            r#"{"id":"x","os":"linux","nodes":40,"vm_size":"STANDARD_F4S_V2","node_agent_sku_id":"batch.node.centos 7","caching":"readOnly"}"#,
        ] {
            let h = HandOff::new(&job(&s, pool), "2026-11-28T10:00:00.0000000Z", uris.clone());
            let body = serde_json::to_value(&h.add_pool).unwrap();
            check_pool_add_2017_05_01(&body).unwrap_or_else(|e| panic!("{pool}: {e}\n{body}"));
            assert!(!body.to_string().contains("sig="), "no SAS in the body");
        }
        let h = HandOff::new(
            &job(&s, r#"{"id":"w","os":"windows","nodes":20}"#),
            "t",
            uris.clone(),
        );
        assert_eq!(h.add_pool.as_ref().unwrap().vm_size, "STANDARD_D2_V3");
        assert_eq!(
            h.add_pool
                .as_ref()
                .unwrap()
                .virtual_machine_configuration
                .node_agent_sku_id,
            "batch.node.windows amd64"
        );
        // The checker itself refuses what Batch refuses.
        let mut broken = serde_json::to_value(&h.add_pool).unwrap();
        broken.as_object_mut().unwrap().remove("vmSize");
        assert!(check_pool_add_2017_05_01(&broken)
            .unwrap_err()
            .contains("vmSize"));
        let mut broken = serde_json::to_value(&h.add_pool).unwrap();
        broken["virtualMachineConfiguration"]
            .as_object_mut()
            .unwrap()
            .remove("nodeAgentSKUId");
        assert!(check_pool_add_2017_05_01(&broken)
            .unwrap_err()
            .contains("nodeAgentSKUId"));
    }

    /// Without a default, a job that lacks what Batch requires is refused at
    /// submission, naming the field and the configuration key.
    #[test]
    fn pool_create_bodies_follow_batch_2025_06_01() {
        let s = settings("windows_node_agent_sku_id = \"batch.node.windows amd64\"\nvm_size = \"STANDARD_D2_V3\"");
        let id = "/subscriptions/s/resourceGroups/images/providers/Microsoft.Compute/galleries/g/images/render-win/versions/2026.1201.1";
        for (nodes, timeout) in [(20, "PT15M"), (2500, "PT45M")] {
            let job = job(
                &s,
                &format!(r#"{{"id":"w","os":"windows","nodes":{nodes}}}"#),
            );
            let h = HandOff::new(
                &job,
                "t",
                vec!["https://dst1.blob.core.windows.net/v/a.vhd".into()],
            )
            .published(&job, id, 4);
            let text = serde_json::to_value(&h).unwrap();
            assert!(
                text.get("add_pool").is_none(),
                "the legacy body is left out: {text}"
            );
            assert_eq!(text["gallery_image_version_id"], id);
            assert_eq!(text["gallery_replicas"], 4);
            let body = &text["pool_create"];
            crate::testkit::fake_batch::check_pool_add(body).unwrap();
            assert_eq!(body["resizeTimeout"], timeout);
            assert_eq!(
                body["virtualMachineConfiguration"]["imageReference"]["virtualMachineImageId"],
                id
            );
            assert_eq!(
                body["virtualMachineConfiguration"]["nodeAgentSKUId"],
                "batch.node.windows amd64"
            );
        }
        // The checker refuses what Batch refuses.
        let legacy = serde_json::to_value(
            HandOff::new(
                &job(&s, r#"{"id":"w","os":"windows","nodes":20}"#),
                "t",
                vec![],
            )
            .add_pool,
        )
        .unwrap();
        assert!(crate::testkit::fake_batch::check_pool_add(&legacy).is_err());
        let mut short = serde_json::json!({"id":"p","vmSize":"v","targetDedicatedNodes":1001,"resizeTimeout":"PT15M",
            "virtualMachineConfiguration":{"imageReference":{"virtualMachineImageId":id},"nodeAgentSKUId":"a"}});
        assert!(crate::testkit::fake_batch::check_pool_add(&short)
            .unwrap_err()
            .contains("short"));
        short["resizeTimeout"] = "PT30M".into();
        crate::testkit::fake_batch::check_pool_add(&short).unwrap();
        short["virtualMachineConfiguration"]["imageReference"]["virtualMachineImageId"] =
            "/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/images/legacy".into();
        assert!(crate::testkit::fake_batch::check_pool_add(&short).is_err());
    }

    #[test]
    fn jobs_without_vm_size_or_linux_sku_are_refused() {
        let s = settings("");
        let err = crate::job::parse_job_json(
            r#"{"source":"https://src.blob.core.windows.net/i/a.vhd","pool":{"id":"w","os":"windows","nodes":20}}"#,
        )
        .unwrap()
        .validate(&s)
        .unwrap_err();
        assert_eq!(err.field, "pool.vm_size");
        assert!(err.message.contains("handoff.vm_size"), "{err}");
        let err = crate::job::parse_job_json(
            r#"{"source":"https://src.blob.core.windows.net/i/a.vhd","pool":{"id":"l","os":"linux","nodes":20,"vm_size":"STANDARD_D2_V3"}}"#,
        )
        .unwrap()
        .validate(&s)
        .unwrap_err();
        assert_eq!(err.field, "pool.node_agent_sku_id");
        assert!(
            err.message.contains("handoff.linux_node_agent_sku_id"),
            "{err}"
        );
        // Windows keeps its default SKU.
        let ok = crate::job::parse_job_json(
            r#"{"source":"https://src.blob.core.windows.net/i/a.vhd","pool":{"id":"w","os":"windows","nodes":20,"vm_size":"STANDARD_D2_V3"}}"#,
        )
        .unwrap()
        .validate(&s)
        .unwrap();
        assert_eq!(ok.node_agent_sku_id, "batch.node.windows amd64");
    }

    #[test]
    fn base64_encoding_round_trips() {
        use base64::{engine::general_purpose::STANDARD, Engine as _};
        let text = r#"{"job_id":"j"}"#;
        assert_eq!(QueueEncoding::Text.encode(text), text);
        let b = QueueEncoding::Base64.encode(text);
        assert_eq!(STANDARD.decode(b).unwrap(), text.as_bytes());
    }
}
