//! The raw settings, section by section, exactly as the file and the
//! environment give them, with their defaults.

use crate::queue::QueueEncoding;
use azure_core::credentials::TokenCredential;
use serde::Deserialize;
use std::{fmt, sync::Arc};
use url::Url;

/// Raw settings, exactly as the file and environment give them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[service]`
    #[serde(default)]
    pub service: ServiceSettings,
    /// `[batch]`
    pub batch: BatchSettings,
    /// `[control]`
    pub control: ControlSettings,
    /// `[handoff]`
    #[serde(default)]
    pub handoff: HandoffSettings,
    /// `[limits]`
    #[serde(default)]
    pub limits: LimitSettings,
    /// `[engine]`
    #[serde(default)]
    pub engine: EngineSettings,
    /// `[gc]`
    #[serde(default)]
    pub gc: GcSettings,
    /// `[gallery]`: publish each job's image to an Azure Compute Gallery.
    #[serde(default)]
    pub gallery: Option<GallerySettings>,
    /// `[pool_stage]`: create or resize the pool after a hand-off, and keep
    /// the pools' image capacity ahead of their size.
    #[serde(default)]
    pub pool_stage: Option<PoolStageSettings>,
    /// `[[accounts]]`
    #[serde(default)]
    pub accounts: Vec<AccountSettings>,
}

/// `[pool_stage]`: the built-in pool-creation stage and background scaling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolStageSettings {
    /// The Batch account endpoint, e.g. `https://mybatch.westeurope.batch.azure.com`.
    pub batch_url: String,
    /// Entra credential kind (Batch pool creation needs Entra): `auto`,
    /// `managed_identity`, `workload_identity` or `azure_cli`.
    #[serde(default)]
    pub credential: Option<String>,
    /// A PEM file of extra CA certificates for `batch_url` (tests).
    #[serde(default)]
    pub ca_file: String,
    /// A JSON file of Pool - Add properties the stage owns (network, start
    /// task, task slots...), merged under `pool_create`.
    #[serde(default)]
    pub template: String,
    /// Create a pool that does not exist.
    #[serde(default = "default_true")]
    pub create: bool,
    /// Resize an existing pool on the same image version to the job's nodes.
    #[serde(default = "default_true")]
    pub resize: bool,
    /// When above 0: every so many seconds, read the pools this deployment
    /// made and submit a grow job for one whose target outgrows its image.
    #[serde(default)]
    pub watch_seconds: u64,
    /// Room kept above a pool's target: a grow job is submitted when the target
    /// exceeds capacity / (1 + headroom), for target x (1 + headroom) nodes.
    #[serde(default = "default_headroom")]
    pub headroom: f64,
}

fn default_headroom() -> f64 {
    0.25
}

/// `[pool_stage]`, validated.
#[derive(Clone)]
pub struct PoolStageConfig {
    /// The settings as given.
    pub settings: PoolStageSettings,
    /// The Batch account endpoint.
    pub batch_url: Url,
    /// The Entra credential for `https://batch.core.windows.net/.default`.
    pub credential: Arc<dyn TokenCredential>,
    /// Extra CA certificates (PEM) to trust.
    pub ca_pem: Option<Vec<u8>>,
    /// The template's properties (an empty object when none).
    pub template: serde_json::Map<String, serde_json::Value>,
}

impl fmt::Debug for PoolStageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolStageConfig")
            .field("batch_url", &self.batch_url.as_str())
            .field("create", &self.settings.create)
            .field("resize", &self.settings.resize)
            .field("watch_seconds", &self.settings.watch_seconds)
            .finish_non_exhaustive()
    }
}

/// `[gallery]`: the Azure Compute Gallery image definition each job publishes
/// a version of (the way Batch pools boot custom images today).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GallerySettings {
    /// Subscription of the gallery; must be the Batch account's.
    pub subscription: String,
    /// Resource group of the gallery.
    pub resource_group: String,
    /// Gallery name.
    pub gallery: String,
    /// Image definition; created when missing.
    pub image: String,
    /// `identifier.publisher` of a new definition.
    pub publisher: String,
    /// `identifier.offer` of a new definition.
    pub offer: String,
    /// `identifier.sku` of a new definition.
    pub sku: String,
    /// Region of the gallery; must be the Batch account's.
    pub region: String,
    /// Gallery replicas = ceil(nodes / this), clamped to [`min_replicas`, 100].
    #[serde(default = "default_nodes_per_replica")]
    pub nodes_per_replica: u32,
    /// Fewest gallery replicas of a version.
    #[serde(default = "default_min_replicas")]
    pub min_replicas: u32,
    /// Storage type of the gallery replicas.
    #[serde(default = "default_gallery_storage")]
    pub storage_account_type: String,
    /// A new version is made with at most this many replicas, then raised in
    /// steps (doubling) to the pool's count: large counts at creation throttle
    /// replication.
    #[serde(default = "default_initial_replicas")]
    pub initial_replicas: u32,
    /// Minutes without replication progress after which a version is reported
    /// stalled (status page, `vhdrep_gallery_replication_stalled`); 0: never.
    #[serde(default = "default_stall_minutes")]
    pub stall_minutes: u64,
    /// Azure Resource Manager endpoint (tests point it at a local fake).
    #[serde(default = "default_arm_endpoint")]
    pub arm_endpoint: String,
    /// Entra credential kind, as `accounts[].credential`.
    #[serde(default)]
    pub credential: Option<String>,
    /// Extra CA (PEM) to trust for `arm_endpoint`.
    #[serde(default)]
    pub ca_file: Option<String>,
}

fn default_nodes_per_replica() -> u32 {
    50
}
fn default_min_replicas() -> u32 {
    3
}
fn default_initial_replicas() -> u32 {
    5
}
fn default_stall_minutes() -> u64 {
    30
}
fn default_gallery_storage() -> String {
    "Standard_LRS".into()
}
fn default_arm_endpoint() -> String {
    "https://management.azure.com".into()
}

/// `[gallery]`, validated: the credential resolved, each destination account's
/// ARM resource id known.
#[derive(Clone)]
pub struct GalleryConfig {
    /// The settings as given.
    pub settings: GallerySettings,
    /// ARM endpoint without a trailing `/`.
    pub arm_endpoint: Url,
    /// The Entra credential for `https://management.azure.com/.default`.
    pub credential: Arc<dyn TokenCredential>,
    /// Extra CA certificates (PEM) to trust.
    pub ca_pem: Option<Vec<u8>>,
    /// ARM id of each destination account (the version's `storageAccountId`).
    pub storage_account_ids: std::collections::BTreeMap<String, String>,
}

impl fmt::Debug for GalleryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GalleryConfig")
            .field("settings", &self.settings)
            .field("arm_endpoint", &self.arm_endpoint.as_str())
            .finish_non_exhaustive()
    }
}

impl GalleryConfig {
    /// The image definition's ARM id.
    pub(crate) fn image_id(&self) -> String {
        let g = &self.settings;
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/galleries/{}/images/{}",
            g.subscription, g.resource_group, g.gallery, g.image
        )
    }

    /// Gallery replicas for a pool of `nodes`: one per `nodes_per_replica`, at
    /// least `min_replicas`, at most 100 (the service's limit per version).
    pub(crate) fn replicas_for(&self, nodes: u32) -> u32 {
        nodes
            .div_ceil(self.settings.nodes_per_replica.max(1))
            .max(self.settings.min_replicas)
            .clamp(1, 100)
    }
}

/// `[service]`: the HTTP listener and process behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSettings {
    /// Address of the HTTP API, status page and metrics.
    pub listen: String,
    /// Environment variable holding the admin token for mutating routes.
    pub admin_token_env: String,
    /// `text` (default) or `json`.
    pub log_format: LogFormat,
    /// Seconds to drain on SIGTERM before exiting.
    pub shutdown_grace_seconds: u64,
}

/// How the daemon logs: `service.log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            admin_token_env: "VHDREP_ADMIN_TOKEN".into(),
            log_format: LogFormat::Text,
            shutdown_grace_seconds: 30,
        }
    }
}

/// `[batch]`: the Batch account the pools are for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    /// Subscription id of the Batch account.
    pub subscription: String,
    /// Region of the Batch account.
    pub region: String,
}

/// `[control]`: where queues and job state live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSettings {
    /// One of `[[accounts]]`.
    pub account: String,
    /// Queue of submitted jobs.
    #[serde(default = "default_intake")]
    pub intake_queue: String,
    /// Queue of messages that can never succeed.
    #[serde(default = "default_poison")]
    pub poison_queue: String,
    /// Queue for the pool-creation stage.
    #[serde(default = "default_handoff")]
    pub handoff_queue: String,
    /// Container of job state documents.
    #[serde(default = "default_state")]
    pub state_container: String,
}

fn default_intake() -> String {
    "vhd-jobs".into()
}
fn default_poison() -> String {
    "vhd-jobs-poison".into()
}
fn default_handoff() -> String {
    "pool-requests".into()
}
fn default_state() -> String {
    "vhd-replicator-state".into()
}

/// `[handoff]`: extra hand-off sinks, the queue message's encoding, and the
/// defaults that make every add-pool body complete.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandoffSettings {
    /// Also write `<dir>/<job_id>.json` when not empty.
    pub dir: String,
    /// Also POST the hand-off JSON here when not empty.
    pub webhook: String,
    /// `text` (default: the JSON as is) or `base64` (what Azure Functions' queue
    /// trigger and the Portal expect).
    pub queue_encoding: QueueEncoding,
    /// `vmSize` for jobs that give no `pool.vm_size`; empty: such jobs are refused.
    pub vm_size: String,
    /// `nodeAgentSKUId` for Windows jobs that give no `pool.node_agent_sku_id`.
    pub windows_node_agent_sku_id: String,
    /// `nodeAgentSKUId` for Linux jobs that give none; empty (default): refused,
    /// since the Linux SKU depends on the image's distribution.
    pub linux_node_agent_sku_id: String,
}

impl Default for HandoffSettings {
    fn default() -> Self {
        Self {
            dir: String::new(),
            webhook: String::new(),
            queue_encoding: QueueEncoding::Text,
            vm_size: String::new(),
            windows_node_agent_sku_id: "batch.node.windows amd64".into(),
            linux_node_agent_sku_id: String::new(),
        }
    }
}

/// `[limits]`: nodes one VHD may serve.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Windows nodes per VHD (Azure Batch: 20).
    pub windows_nodes_per_vhd: u32,
    /// Linux nodes per VHD (Azure Batch: 40).
    pub linux_nodes_per_vhd: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            windows_nodes_per_vhd: 20,
            linux_nodes_per_vhd: 40,
        }
    }
}

/// `[engine]`: how jobs are taken and copies run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSettings {
    /// Jobs one instance runs at once.
    pub max_parallel_jobs: u32,
    /// Seconds a taken message stays invisible between renewals.
    pub lease_seconds: u32,
    /// A message seen more often than this goes to the poison queue.
    pub max_dequeue_count: u32,
    /// Milliseconds between intake polls when the queue is empty.
    pub idle_poll_ms: u64,
    /// Shortest wait between status polls of one pending copy, in milliseconds.
    pub min_poll_ms: u64,
    /// Longest wait between status polls of one pending copy, in milliseconds.
    pub max_poll_ms: u64,
    /// Hours a copy-source SAS stays valid.
    pub sas_hours: u32,
    /// `fanout` (seed each account once, grow inside it) or `naive` (every replica
    /// from the source snapshot).
    pub strategy: Strategy,
    /// Copies reading one source blob at once (fanout): every extra reader slows
    /// all readers of a blob.
    pub max_reads_per_source: u32,
    /// Seconds between writes of a running job's progress (state changes are
    /// written within 2 s); also bounds how late a cancel request is noticed.
    pub checkpoint_seconds: u64,
    /// Seconds to wait for a connection to storage, a webhook or a token endpoint.
    pub connect_timeout_seconds: u64,
    /// Seconds one attempt of any outbound call may wait for its answer; then it
    /// counts as a timeout and is retried under the retry policy.
    pub request_timeout_seconds: u64,
    /// How replicas are copied: `auto` (ranged across accounts, asynchronous
    /// Copy Blob inside one), `async` (always Copy Blob), `ranges` (always ranged).
    pub copy_method: CopyMethod,
    /// Seed accounts in parallel from short-lived same-account copies (relays)
    /// when every blob that could seed them is busy (fan-out only).
    #[serde(default = "default_true")]
    pub relays: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_parallel_jobs: 4,
            lease_seconds: 60,
            max_dequeue_count: 5,
            idle_poll_ms: 1000,
            min_poll_ms: 250,
            max_poll_ms: 300_000,
            sas_hours: 48,
            strategy: Strategy::Fanout,
            max_reads_per_source: 1,
            checkpoint_seconds: 10,
            connect_timeout_seconds: 10,
            request_timeout_seconds: 30,
            copy_method: CopyMethod::Auto,
            relays: true,
        }
    }
}

/// How replicas are sourced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Seed each account once, then grow inside it.
    #[default]
    Fanout,
    /// Every replica from the snapshot.
    Naive,
}

/// How replicas are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CopyMethod {
    /// Ranged (Put Page From URL) across accounts, Copy Blob inside one.
    #[default]
    Auto,
    /// Always the asynchronous Copy Blob.
    Async,
    /// Always ranged.
    Ranges,
}

impl CopyMethod {
    /// Whether a copy from `source_account` into `dest_account` is ranged.
    pub fn ranged(self, source_account: &str, dest_account: &str) -> bool {
        match self {
            CopyMethod::Auto => source_account != dest_account,
            CopyMethod::Async => false,
            CopyMethod::Ranges => true,
        }
    }
}

/// `[gc]`: garbage collection of orphaned replicas and snapshots.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcSettings {
    /// Minutes between collections in the daemon; 0 (default) turns it off.
    pub interval_minutes: u64,
    /// Orphans younger than this are kept (a crash may be resumed).
    pub min_age_hours: u64,
    /// Days a finished job's document is kept; then it is deleted (by the daemon
    /// every hour and by `vhd-replicator gc`). 0 keeps them forever. A job id is
    /// only remembered while its document exists.
    pub job_retention_days: u64,
}

impl Default for GcSettings {
    fn default() -> Self {
        Self {
            interval_minutes: 0,
            min_age_hours: 24,
            job_retention_days: 30,
        }
    }
}

/// One `[[accounts]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSettings {
    /// Storage account name.
    pub name: String,
    /// Blob endpoint; default `https://<name>.blob.core.windows.net`.
    #[serde(default)]
    pub blob_endpoint: Option<String>,
    /// Queue endpoint; default `https://<name>.queue.core.windows.net`.
    #[serde(default)]
    pub queue_endpoint: Option<String>,
    /// Environment variable holding the shared key.
    #[serde(default)]
    pub key_env: Option<String>,
    /// File holding the shared key.
    #[serde(default)]
    pub key_file: Option<String>,
    /// `shared_key` (default when a key is given) or `entra`.
    #[serde(default)]
    pub auth: Option<String>,
    /// With `auth = "entra"`: `auto` (default), `managed_identity`, `workload_identity`, `azure_cli`.
    #[serde(default)]
    pub credential: Option<String>,
    /// Subscription of the account (checked against `[batch]`).
    #[serde(default)]
    pub subscription: Option<String>,
    /// Region of the account (checked against `[batch]`).
    #[serde(default)]
    pub region: Option<String>,
    /// Whether replicas may be placed here.
    #[serde(default = "default_true")]
    pub destination: bool,
    /// Request rate cap for this account.
    #[serde(default = "default_rps")]
    pub max_requests_per_second: u32,
    /// Concurrent copies into this account.
    #[serde(default = "default_copies")]
    pub max_concurrent_copies: u32,
    /// Storage service version to send, for emulators that lag behind the SDK.
    #[serde(default)]
    pub api_version: Option<String>,
    /// A PEM file of CA certificates to trust for this account's endpoints (private
    /// CAs, TLS-intercepting proxies, emulators), besides the system's.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Most replicas (of all pools) this account may hold; unlimited when unset.
    #[serde(default)]
    pub max_replicas: Option<u32>,
    /// Resource group of the account: with `subscription`, its ARM id, which a
    /// gallery image version names as the source of its VHD.
    #[serde(default)]
    pub resource_group: Option<String>,
    /// Whether the service does Put Page From URL, for `copy_method = "auto"`;
    /// unset: judged from the endpoint (an emulator's does not).
    #[serde(default)]
    pub put_page_from_url: Option<bool>,
}

fn default_true() -> bool {
    true
}
fn default_rps() -> u32 {
    500
}
fn default_copies() -> u32 {
    16
}
