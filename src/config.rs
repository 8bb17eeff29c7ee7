//! Configuration: raw [`Settings`] as read from TOML and `VHDREP__SECTION__KEY`
//! environment variables, then [`Settings::validate`] into [`ValidatedSettings`],
//! reporting every problem at once with the key it concerns.

use crate::azure::account::{AccountConfig, AccountCredential};
use crate::azure::auth::SharedKey;
use crate::queue::QueueEncoding;
use azure_core::credentials::TokenCredential;
use secrecy::SecretString;
use serde::Deserialize;
use std::{collections::HashSet, fmt, net::SocketAddr, path::Path, sync::Arc, time::Duration};
use url::Url;

/// The file `--config` defaults to.
pub(crate) const DEFAULT_CONFIG: &str = "config/default.toml";

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
    /// `[[accounts]]`
    #[serde(default)]
    pub accounts: Vec<AccountSettings>,
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

/// Settings that passed validation.
#[derive(Debug, Clone)]
pub struct ValidatedSettings {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// Admin token for mutating routes, when its variable is set.
    pub admin_token: Option<SecretString>,
    /// The variable the admin token is read from (`service.admin_token_env`).
    pub admin_token_env: String,
    /// Log as JSON lines.
    pub log_json: bool,
    /// Drain time on shutdown.
    pub shutdown_grace: Duration,
    /// `[batch]`
    pub batch: BatchSettings,
    /// `[control]`
    pub control: ControlSettings,
    /// Hand-off directory.
    pub handoff_dir: Option<std::path::PathBuf>,
    /// Hand-off webhook.
    pub handoff_webhook: Option<Url>,
    /// `[handoff]` as given (encoding and add-pool defaults).
    pub handoff: HandoffSettings,
    /// `[limits]`
    pub limits: LimitSettings,
    /// `[engine]`
    pub engine: EngineSettings,
    /// `[gc]`
    pub gc: GcSettings,
    /// All accounts, in configuration order.
    pub accounts: Vec<AccountConfig>,
    /// `[gallery]`, when configured.
    pub gallery: Option<GalleryConfig>,
}

impl ValidatedSettings {
    /// The retry policy of every outbound call, with the configured timeout.
    pub fn retry_policy(&self) -> crate::azure::retry::RetryPolicy {
        crate::azure::retry::RetryPolicy::with_timeout(Duration::from_secs(
            self.engine.request_timeout_seconds,
        ))
    }

    /// What the daemon alone must satisfy (checked by `run` and `validate`, not
    /// by commands that only talk to storage): an HTTP API reachable beyond
    /// loopback needs the admin token, or anyone who reaches the port can submit,
    /// cancel and retire.
    pub(crate) fn check_daemon(&self) -> Result<(), ConfigError> {
        let admin_token_env = self.admin_token_env.as_str();
        if self.listen.ip().is_loopback() || self.admin_token.is_some() {
            return Ok(());
        }
        Err(ConfigError::Invalid(vec![ConfigProblem {
            key: "service.listen".into(),
            message: format!(
                "{} accepts connections from other hosts, and service.admin_token_env names {} which is not set: every mutating route (submit, cancel, retire) would be open; set {} to a secret token, or listen on 127.0.0.1",
                self.listen,
                if admin_token_env.is_empty() { "no variable" } else { admin_token_env },
                if admin_token_env.is_empty() { "service.admin_token_env and that variable" } else { admin_token_env },
            ),
        }]))
    }

    /// How long to wait for a connection.
    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.engine.connect_timeout_seconds)
    }

    /// The account with this name.
    pub fn account(&self, name: &str) -> Option<&AccountConfig> {
        self.accounts.iter().find(|a| a.name == name)
    }

    /// Names of the accounts that may receive replicas.
    pub(crate) fn destination_accounts(&self) -> Vec<String> {
        self.accounts
            .iter()
            .filter(|a| a.destination)
            .map(|a| a.name.clone())
            .collect()
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key, e.g. `accounts[2].key_env`.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Configuration that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be read or parsed.
    #[error("cannot read configuration: {0}")]
    Load(String),
    /// The values are wrong.
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigProblem>),
}

/// Where secrets come from during validation (the process environment and files,
/// or a map in tests).
pub trait SecretSource {
    /// An environment variable.
    fn env(&self, name: &str) -> Option<String>;
    /// A file's contents.
    fn file(&self, path: &str) -> Result<String, String>;
}

/// The process environment and file system.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ProcessSecrets;

impl SecretSource for ProcessSecrets {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
    fn file(&self, path: &str) -> Result<String, String> {
        std::fs::read_to_string(path).map_err(|e| e.to_string())
    }
}

impl Settings {
    /// Reads the TOML file and `VHDREP__SECTION__KEY` overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::Load(format!(
                "{} does not exist; pass --config FILE",
                path.display()
            )));
        }
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("VHDREP")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .map_err(|e| ConfigError::Load(format!("{}: {e}", path.display())))?;
        raw.try_deserialize()
            .map_err(|e| ConfigError::Load(format!("{}: {e}", path.display())))
    }

    /// Reads a TOML string (no environment), for tests and tools.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml_de(text)
    }

    /// Checks every value and resolves credentials; reports all problems at once,
    /// each with its key (one check per section, as they compose).
    pub fn validate(&self, secrets: &dyn SecretSource) -> Result<ValidatedSettings, ConfigError> {
        let mut problems = Problems::default();
        let listen = self.service.check(&mut problems);
        self.batch.check(&mut problems);
        self.control.check(&mut problems);
        self.limits.check(&mut problems);
        self.engine.check(&mut problems);
        let handoff_webhook = self.handoff.check(&mut problems);
        let accounts = self.check_accounts(secrets, &mut problems);
        let gallery = self
            .gallery
            .as_ref()
            .and_then(|g| g.check(&self.batch, &self.accounts, secrets, &mut problems));
        let problems = problems.0;
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        let admin_token = if self.service.admin_token_env.is_empty() {
            None
        } else {
            secrets
                .env(&self.service.admin_token_env)
                .map(SecretString::from)
        };
        Ok(ValidatedSettings {
            listen: listen.expect("checked above"),
            admin_token,
            admin_token_env: self.service.admin_token_env.clone(),
            log_json: self.service.log_format == LogFormat::Json,
            shutdown_grace: Duration::from_secs(self.service.shutdown_grace_seconds),
            batch: self.batch.clone(),
            control: self.control.clone(),
            handoff_dir: (!self.handoff.dir.is_empty()).then(|| self.handoff.dir.clone().into()),
            handoff_webhook,
            handoff: self.handoff.clone(),
            limits: self.limits.clone(),
            engine: self.engine.clone(),
            gc: self.gc.clone(),
            accounts,
            gallery,
        })
    }
}

/// Problems found so far, each with its key.
#[derive(Debug, Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    /// Each of these values must be at least 1.
    fn at_least_one(&mut self, values: &[(&str, u64)]) {
        for (key, v) in values {
            if *v == 0 {
                self.add(key, "must be at least 1");
            }
        }
    }
}

impl ServiceSettings {
    fn check(&self, p: &mut Problems) -> Option<SocketAddr> {
        match self.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                p.add(
                    "service.listen",
                    format!(
                        "{:?} is not an address:port such as \"127.0.0.1:9464\"",
                        self.listen
                    ),
                );
                None
            }
        }
    }
}

impl BatchSettings {
    fn check(&self, p: &mut Problems) {
        if self.subscription.trim().is_empty() {
            p.add(
                "batch.subscription",
                "must name the Batch account's subscription id",
            );
        }
        if self.region.trim().is_empty() {
            p.add(
                "batch.region",
                "must name the Batch account's region, e.g. \"westeurope\"",
            );
        }
    }
}

impl GallerySettings {
    /// Checks `[gallery]` against `[batch]` and the accounts; the validated
    /// form when nothing is wrong.
    fn check(
        &self,
        batch: &BatchSettings,
        accounts: &[AccountSettings],
        secrets: &dyn SecretSource,
        p: &mut Problems,
    ) -> Option<GalleryConfig> {
        let before = p.0.len();
        self.check_values(batch, p);
        let arm_endpoint = match Url::parse(self.arm_endpoint.trim().trim_end_matches('/')) {
            Ok(u)
                if matches!(u.scheme(), "https" | "http")
                    && u.host().is_some()
                    && u.query().is_none() =>
            {
                Some(u)
            }
            _ => {
                p.add(
                    "gallery.arm_endpoint",
                    format!(
                        "{:?} is not an https URL such as \"https://management.azure.com\"",
                        self.arm_endpoint
                    ),
                );
                None
            }
        };
        let credential = entra_credential(self.credential.as_deref().unwrap_or("auto"))
            .map_err(|m| p.add("gallery.credential", m))
            .ok();
        let ca_pem = match &self.ca_file {
            None => Some(None),
            Some(path) => match secrets.file(path) {
                Ok(text)
                    if reqwest::Certificate::from_pem_bundle(text.as_bytes())
                        .is_ok_and(|c| !c.is_empty()) =>
                {
                    Some(Some(text.into_bytes()))
                }
                Ok(_) => {
                    p.add(
                        "gallery.ca_file",
                        format!("{path} holds no PEM certificate"),
                    );
                    None
                }
                Err(e) => {
                    p.add("gallery.ca_file", format!("cannot read {path}: {e}"));
                    None
                }
            },
        };
        let storage_account_ids = self.storage_account_ids(accounts, p);
        if p.0.len() > before {
            return None;
        }
        Some(GalleryConfig {
            settings: self.clone(),
            arm_endpoint: arm_endpoint?,
            credential: credential?,
            ca_pem: ca_pem?,
            storage_account_ids,
        })
    }

    /// The values that need nothing but themselves and `[batch]`.
    fn check_values(&self, batch: &BatchSettings, p: &mut Problems) {
        for (key, value) in [
            ("gallery.resource_group", &self.resource_group),
            ("gallery.gallery", &self.gallery),
            ("gallery.image", &self.image),
            ("gallery.publisher", &self.publisher),
            ("gallery.offer", &self.offer),
            ("gallery.sku", &self.sku),
        ] {
            if value.trim().is_empty() {
                p.add(key, "must not be empty");
            }
        }
        if !self.subscription.eq_ignore_ascii_case(&batch.subscription) {
            p.add("gallery.subscription", format!("{} differs from batch.subscription ({}); Batch boots gallery images only from its own subscription: use a gallery there", self.subscription, batch.subscription));
        }
        if !self.region.eq_ignore_ascii_case(&batch.region) {
            p.add("gallery.region", format!("{} differs from batch.region ({}); the image version needs a replica in the Batch region and its VHD in the gallery's region: use a gallery in {}", self.region, batch.region, batch.region));
        }
        if self.nodes_per_replica == 0 {
            p.add(
                "gallery.nodes_per_replica",
                "must be at least 1 (the gallery's guidance is 50)",
            );
        }
        if !(1..=100).contains(&self.min_replicas) {
            p.add(
                "gallery.min_replicas",
                "must be 1 to 100 (a version has at most 100 replicas per region)",
            );
        }
        if !(1..=100).contains(&self.initial_replicas) {
            p.add(
                "gallery.initial_replicas",
                "must be 1 to 100 (the field's advice is about 5, raised in steps)",
            );
        }
        const TYPES: [&str; 4] = [
            "Standard_LRS",
            "Standard_ZRS",
            "Premium_LRS",
            "PremiumV2_LRS",
        ];
        if !TYPES.contains(&self.storage_account_type.as_str()) {
            p.add(
                "gallery.storage_account_type",
                format!(
                    "{:?} is not one of {}",
                    self.storage_account_type,
                    TYPES.join(", ")
                ),
            );
        }
    }

    /// The ARM id of every destination account: a version's VHD source names
    /// its storage account, so each needs `subscription` and `resource_group`.
    fn storage_account_ids(
        &self,
        accounts: &[AccountSettings],
        p: &mut Problems,
    ) -> std::collections::BTreeMap<String, String> {
        let mut ids = std::collections::BTreeMap::new();
        for (i, a) in accounts.iter().enumerate().filter(|(_, a)| a.destination) {
            let Some(rg) = a.resource_group.as_deref().filter(|r| !r.trim().is_empty()) else {
                p.add(&format!("accounts[{i}].resource_group"), format!("with [gallery], account {} may stage the image version's VHD and needs its resource group (the version names the account by its ARM id); set it, or destination = false", a.name));
                continue;
            };
            let subscription = a.subscription.as_deref().unwrap_or(&self.subscription);
            ids.insert(a.name.clone(), format!("/subscriptions/{subscription}/resourceGroups/{rg}/providers/Microsoft.Storage/storageAccounts/{}", a.name));
        }
        ids
    }
}

impl ControlSettings {
    fn check(&self, p: &mut Problems) {
        for (key, value) in [
            ("control.intake_queue", &self.intake_queue),
            ("control.poison_queue", &self.poison_queue),
            ("control.handoff_queue", &self.handoff_queue),
        ] {
            if let Err(m) = check_queue_name(value) {
                p.add(key, m);
            }
        }
        if let Err(m) = check_container_name(&self.state_container) {
            p.add("control.state_container", m);
        }
    }
}

impl LimitSettings {
    fn check(&self, p: &mut Problems) {
        if self.windows_nodes_per_vhd == 0 {
            p.add(
                "limits.windows_nodes_per_vhd",
                "must be at least 1 (Azure Batch allows 20)",
            );
        }
        if self.linux_nodes_per_vhd == 0 {
            p.add(
                "limits.linux_nodes_per_vhd",
                "must be at least 1 (Azure Batch allows 40)",
            );
        }
    }
}

impl EngineSettings {
    fn check(&self, p: &mut Problems) {
        p.at_least_one(&[
            ("engine.max_parallel_jobs", self.max_parallel_jobs as u64),
            ("engine.lease_seconds", self.lease_seconds as u64),
            ("engine.max_dequeue_count", self.max_dequeue_count as u64),
            ("engine.idle_poll_ms", self.idle_poll_ms),
            ("engine.min_poll_ms", self.min_poll_ms),
            ("engine.max_poll_ms", self.max_poll_ms),
            ("engine.sas_hours", self.sas_hours as u64),
            (
                "engine.max_reads_per_source",
                self.max_reads_per_source as u64,
            ),
            ("engine.checkpoint_seconds", self.checkpoint_seconds),
            (
                "engine.connect_timeout_seconds",
                self.connect_timeout_seconds,
            ),
            (
                "engine.request_timeout_seconds",
                self.request_timeout_seconds,
            ),
        ]);
        if self.lease_seconds > 0 && self.lease_seconds < 10 {
            p.add(
                "engine.lease_seconds",
                "must be at least 10 so renewals keep up",
            );
        }
        if self.lease_seconds > 7 * 24 * 3600 {
            p.add(
                "engine.lease_seconds",
                "cannot exceed 7 days (604800), the queue's limit",
            );
        }
        if self.request_timeout_seconds > 600 {
            p.add(
                "engine.request_timeout_seconds",
                "must be at most 600; a storage request that has not answered in 10 minutes will not",
            );
        }
        if self.min_poll_ms > self.max_poll_ms {
            p.add("engine.min_poll_ms", "must not exceed engine.max_poll_ms");
        }
    }
}

impl HandoffSettings {
    /// Returns the webhook, when one is configured and valid.
    fn check(&self, p: &mut Problems) -> Option<Url> {
        if self.webhook.is_empty() {
            return None;
        }
        match Url::parse(&self.webhook) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => Some(u),
            _ => {
                p.add(
                    "handoff.webhook",
                    format!("{:?} is not an http(s) URL", self.webhook),
                );
                None
            }
        }
    }
}

impl AccountSettings {
    /// The account resolved, when every field of it is valid; `k` names a field.
    fn check(
        &self,
        k: &dyn Fn(&str) -> String,
        batch: &BatchSettings,
        secrets: &dyn SecretSource,
        p: &mut Problems,
    ) -> Option<AccountConfig> {
        if let Err(m) = check_account_name(&self.name) {
            p.add(&k("name"), m);
        }
        p.at_least_one(&[
            (
                &k("max_requests_per_second"),
                self.max_requests_per_second as u64,
            ),
            (
                &k("max_concurrent_copies"),
                self.max_concurrent_copies as u64,
            ),
        ]);
        if self.max_replicas == Some(0) {
            p.add(
                &k("max_replicas"),
                "must be at least 1; remove it for no limit, or set destination = false",
            );
        }
        if self.destination {
            self.check_batch_reach(k, batch, p);
        }
        let blob = endpoint(&self.blob_endpoint, &self.name, "blob")
            .map_err(|m| p.add(&k("blob_endpoint"), m));
        let queue = endpoint(&self.queue_endpoint, &self.name, "queue")
            .map_err(|m| p.add(&k("queue_endpoint"), m));
        let credential =
            resolve_credential(self, secrets).map_err(|(field, m)| p.add(&k(field), m));
        let ca_pem = match &self.ca_file {
            None => Ok(None),
            Some(path) => match secrets.file(path) {
                Ok(text) if text.contains("-----BEGIN CERTIFICATE-----") => {
                    Ok(Some(text.into_bytes()))
                }
                Ok(_) => Err(format!("{path} holds no PEM certificate")),
                Err(e) => Err(format!("cannot read {path}: {e}")),
            }
            .map_err(|m| p.add(&k("ca_file"), m)),
        };
        let (Ok(blob_endpoint), Ok(queue_endpoint), Ok(credential), Ok(ca_pem)) =
            (blob, queue, credential, ca_pem)
        else {
            return None;
        };
        Some(AccountConfig {
            name: self.name.clone(),
            blob_endpoint,
            queue_endpoint,
            credential,
            destination: self.destination,
            max_requests_per_second: self.max_requests_per_second,
            max_concurrent_copies: self.max_concurrent_copies,
            api_version: self.api_version.clone(),
            ca_pem,
            max_replicas: self.max_replicas,
            put_page_from_url: self.put_page_from_url,
        })
    }

    /// A destination must be in the Batch account's subscription and region.
    fn check_batch_reach(
        &self,
        k: &dyn Fn(&str) -> String,
        batch: &BatchSettings,
        p: &mut Problems,
    ) {
        if let Some(s) = &self.subscription {
            if !s.eq_ignore_ascii_case(&batch.subscription) {
                p.add(&k("subscription"), format!("{s} differs from batch.subscription; Batch reads custom images only from its own subscription (set destination = false to keep it as a source)"));
            }
        }
        if let Some(r) = &self.region {
            if !r.eq_ignore_ascii_case(&batch.region) {
                p.add(&k("region"), format!("{r} differs from batch.region ({}); Batch reads custom images only from its own region (set destination = false to keep it as a source)", batch.region));
            }
        }
    }
}

impl Settings {
    /// Every account resolved; names unique; the control account among them and
    /// at least one destination.
    fn check_accounts(&self, secrets: &dyn SecretSource, p: &mut Problems) -> Vec<AccountConfig> {
        if self.accounts.is_empty() {
            p.add(
                "accounts",
                "no [[accounts]] configured; add the control and destination accounts",
            );
            return Vec::new();
        }
        let mut seen = HashSet::new();
        let mut accounts = Vec::new();
        for (i, a) in self.accounts.iter().enumerate() {
            let k = |field: &str| format!("accounts[{i}].{field}");
            if !seen.insert(a.name.clone()) {
                p.add(
                    &k("name"),
                    format!(
                        "account {:?} is configured twice; names must be unique",
                        a.name
                    ),
                );
            }
            accounts.extend(a.check(&k, &self.batch, secrets, p));
        }
        if !self.accounts.iter().any(|a| a.name == self.control.account) {
            p.add(
                "control.account",
                format!(
                    "{:?} is not one of [[accounts]]; add it or name a configured account",
                    self.control.account
                ),
            );
        }
        if !self.accounts.iter().any(|a| a.destination) {
            p.add(
                "accounts",
                "no account has destination = true; at least one must receive replicas",
            );
        }
        accounts
    }
}

fn toml_de(text: &str) -> Result<Settings, ConfigError> {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| ConfigError::Load(name_the_words(&e.to_string())))
}

/// The words each enumerated setting takes, by its type's name.
const WORDS: &[(&str, &str)] = &[
    ("LogFormat", "\"text\" or \"json\""),
    (
        "QueueEncoding",
        "\"text\" or \"base64\" (base64 for Azure Functions queue triggers)",
    ),
    ("CopyMethod", "\"auto\", \"async\" or \"ranges\""),
    ("Strategy", "\"fanout\" or \"naive\""),
];

/// The loader says "enum CopyMethod does not have variant constructor fast for
/// key `engine.copy_method`"; people are told the key and the words it takes.
fn name_the_words(message: &str) -> String {
    let Some(rest) = message.split("enum ").nth(1) else {
        return message.to_owned();
    };
    let mut parts = rest.split_whitespace();
    let (Some(kind), Some(key)) = (parts.next(), message.split('`').nth(1)) else {
        return message.to_owned();
    };
    let bad = rest
        .split("variant constructor ")
        .nth(1)
        .and_then(|r| r.split(" for key").next())
        .unwrap_or("?");
    match WORDS.iter().find(|(k, _)| *k == kind) {
        Some((_, words)) => format!("{key}: {bad:?} is not {words}"),
        None => message.to_owned(),
    }
}

fn endpoint(given: &Option<String>, account: &str, service: &str) -> Result<Url, String> {
    let text = match given {
        Some(t) => t.trim().trim_end_matches('/').to_owned(),
        None => format!("https://{account}.{service}.core.windows.net"),
    };
    let url = Url::parse(&text).map_err(|e| format!("{text:?} is not a URL ({e}); use e.g. \"https://{account}.{service}.core.windows.net\""))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{text:?} must be an http(s) URL with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{text:?} must not carry a query (no SAS here; keys come from key_env, key_file or auth = \"entra\")"));
    }
    Ok(url)
}

fn resolve_credential(
    a: &AccountSettings,
    secrets: &dyn SecretSource,
) -> Result<AccountCredential, (&'static str, String)> {
    let entra = match a.auth.as_deref() {
        None | Some("shared_key") => false,
        Some("entra") => true,
        Some(other) => {
            return Err((
                "auth",
                format!("{other:?} is not \"shared_key\" or \"entra\""),
            ));
        }
    };
    match (entra, &a.key_env, &a.key_file) {
        (true, None, None) => entra_credential(a.credential.as_deref().unwrap_or("auto"))
            .map(AccountCredential::Entra)
            .map_err(|m| ("credential", m)),
        (true, _, _) => Err(("auth", "auth = \"entra\" takes no key_env or key_file; remove one or the other".into())),
        (false, Some(_), Some(_)) => Err(("key_env", "give key_env or key_file, not both".into())),
        (false, None, None) => Err(("key_env", "no credential: set key_env (a variable holding the account key), key_file, or auth = \"entra\"".into())),
        (false, Some(var), None) => {
            let value = secrets.env(var).ok_or_else(|| ("key_env", format!("environment variable {var} is not set or empty; export the account key in it")))?;
            SharedKey::new(&a.name, &SecretString::from(value))
                .map(AccountCredential::SharedKey)
                .map_err(|_| ("key_env", format!("the value of {var} is not a base64 account key")))
        }
        (false, None, Some(path)) => {
            let value = secrets.file(path).map_err(|e| ("key_file", format!("cannot read {path}: {e}")))?;
            SharedKey::new(&a.name, &SecretString::from(value))
                .map(AccountCredential::SharedKey)
                .map_err(|_| ("key_file", format!("{path} does not hold a base64 account key")))
        }
    }
}

fn entra_credential(kind: &str) -> Result<Arc<dyn TokenCredential>, String> {
    let kind = if kind == "auto" {
        if std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some() {
            "workload_identity"
        } else if std::env::var_os("IDENTITY_ENDPOINT").is_some()
            || std::env::var_os("MSI_ENDPOINT").is_some()
        {
            "managed_identity"
        } else {
            "azure_cli"
        }
    } else {
        kind
    };
    let r: azure_core::Result<Arc<dyn TokenCredential>> = match kind {
        "managed_identity" => azure_identity::ManagedIdentityCredential::new(None).map(|c| c as _),
        "workload_identity" => {
            azure_identity::WorkloadIdentityCredential::new(None).map(|c| c as _)
        }
        "azure_cli" => azure_identity::AzureCliCredential::new(None).map(|c| c as _),
        other => {
            return Err(format!(
                "{other:?} is not one of auto, managed_identity, workload_identity, azure_cli"
            ))
        }
    };
    r.map_err(|e| format!("cannot build the {kind} credential: {e}"))
}

/// Storage account names: 3–24 lower-case letters and digits.
pub(crate) fn check_account_name(name: &str) -> Result<(), String> {
    if (3..=24).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a storage account name (3-24 lower-case letters and digits)"
        ))
    }
}

/// Container names: 3–63 of lower-case letters, digits and single hyphens, starting
/// and ending with a letter or digit.
pub(crate) fn check_container_name(name: &str) -> Result<(), String> {
    let ok = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a container name (3-63 lower-case letters, digits and single hyphens, starting and ending with a letter or digit)"))
    }
}

/// Queue names follow the container rules.
pub(crate) fn check_queue_name(name: &str) -> Result<(), String> {
    check_container_name(name).map_err(|_| {
        format!("{name:?} is not a queue name (3-63 lower-case letters, digits and single hyphens, starting and ending with a letter or digit)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<String, String>);
    impl SecretSource for Map {
        fn env(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
        fn file(&self, path: &str) -> Result<String, String> {
            self.0
                .get(path)
                .cloned()
                .ok_or_else(|| "no such file".into())
        }
    }
    const KEY: &str =
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    fn secrets() -> Map {
        Map(HashMap::from([
            ("K_OPS".to_owned(), KEY.to_owned()),
            ("K_DST".to_owned(), KEY.to_owned()),
        ]))
    }

    const GOOD: &str = r#"
[batch]
subscription = "00000000-0000-0000-0000-000000000000"
region = "westeurope"
[control]
account = "ops"
[[accounts]]
name = "ops"
blob_endpoint = "http://127.0.0.1:10000/ops/"
queue_endpoint = "http://127.0.0.1:10001/ops"
key_env = "K_OPS"
destination = false
[[accounts]]
name = "dst1"
key_env = "K_DST"
region = "westeurope"
"#;

    fn problems(toml: &str) -> Vec<ConfigProblem> {
        match Settings::from_toml(toml).unwrap().validate(&secrets()) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    fn keys(toml: &str) -> Vec<String> {
        problems(toml).into_iter().map(|p| p.key).collect()
    }

    /// A value outside an enumerated setting's words is refused at load,
    /// naming the key and the words it takes.
    #[test]
    fn enumerated_settings_name_the_key_and_the_words() {
        for (section, key, bad, words) in [
            ("service", "log_format", "jsn", ["text", "json"]),
            ("handoff", "queue_encoding", "b64", ["text", "base64"]),
            ("engine", "copy_method", "fast", ["auto", "ranges"]),
            ("engine", "strategy", "tree", ["fanout", "naive"]),
        ] {
            let text = format!("{GOOD}\n[{section}]\n{key} = \"{bad}\"\n");
            let e = match Settings::from_toml(&text) {
                Ok(s) => s.validate(&secrets()).err().map(|e| e.to_string()),
                Err(e) => Some(e.to_string()),
            }
            .unwrap_or_default();
            assert!(
                e.contains(key) && e.contains(bad) && words.iter().all(|w| e.contains(w)),
                "{section}.{key}: {e}"
            );
        }
        let v = Settings::from_toml(&format!("{GOOD}\n[service]\nlog_format = \"json\"\n"))
            .unwrap()
            .validate(&secrets())
            .unwrap();
        assert!(v.log_json);
    }

    #[test]
    fn a_good_config_validates_with_defaults() {
        let v = Settings::from_toml(GOOD)
            .unwrap()
            .validate(&secrets())
            .unwrap();
        assert_eq!(v.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(v.control.intake_queue, "vhd-jobs");
        assert_eq!(
            v.accounts[0].blob_endpoint.as_str(),
            "http://127.0.0.1:10000/ops"
        );
        assert_eq!(
            v.accounts[1].blob_endpoint.as_str(),
            "https://dst1.blob.core.windows.net/"
        );
        assert_eq!(v.destination_accounts(), vec!["dst1"]);
        assert_eq!(v.limits.windows_nodes_per_vhd, 20);
        assert!(v.admin_token.is_none());
    }

    const GALLERY: &str = r#"
[gallery]
subscription = "00000000-0000-0000-0000-000000000000"
resource_group = "images"
gallery = "g"
image = "render-win"
publisher = "contoso"
offer = "render"
sku = "win2016"
region = "westeurope"
credential = "azure_cli"
"#;

    /// A gallery must be the Batch account's (subscription and region), and
    /// every destination account needs its resource group for the version's
    /// `storageAccountId`; each problem names its key.
    #[test]
    fn a_gallery_elsewhere_or_without_staging_ids_is_refused() {
        let bad = GALLERY
            .replace("region = \"westeurope\"", "region = \"eastus\"")
            .replace(
                "subscription = \"00000000-0000-0000-0000-000000000000\"",
                "subscription = \"11111111-0000-0000-0000-000000000000\"",
            )
            .replace(
                "[gallery]",
                "[gallery]\nmin_replicas = 0\nstorage_account_type = \"Standard_GRS\"",
            );
        let got = problems(&format!("{GOOD}{bad}"));
        let keys: Vec<&str> = got.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "gallery.subscription",
            "gallery.region",
            "gallery.min_replicas",
            "gallery.storage_account_type",
            "accounts[1].resource_group",
        ] {
            assert!(keys.contains(&k), "{k} in {got:?}");
        }
        let region = got.iter().find(|p| p.key == "gallery.region").unwrap();
        assert!(region.message.contains("westeurope"), "{}", region.message);
        let good = format!("{GOOD}{GALLERY}").replace(
            "name = \"dst1\"",
            "name = \"dst1\"\nresource_group = \"storage\"",
        );
        let v = Settings::from_toml(&good)
            .unwrap()
            .validate(&secrets())
            .unwrap();
        let g = v.gallery.expect("configured");
        assert_eq!(
            g.storage_account_ids["dst1"],
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/storage/providers/Microsoft.Storage/storageAccounts/dst1"
        );
        assert_eq!(g.arm_endpoint.as_str(), "https://management.azure.com/");
        assert_eq!(g.replicas_for(200), 4);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Settings::from_toml(&format!("{GOOD}\nbogus = 1\n")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = Settings::from_toml(&GOOD.replace("[control]", "[control]\nqueue = \"x\""))
            .unwrap_err();
        assert!(err.to_string().contains("queue"), "{err}");
    }

    #[test]
    fn zero_limits_are_named() {
        let t = GOOD.replace(
            "name = \"dst1\"",
            "name = \"dst1\"\nmax_concurrent_copies = 0\nmax_requests_per_second = 0",
        ) + "[limits]\nwindows_nodes_per_vhd = 0\n";
        let k = keys(&t);
        assert!(
            k.contains(&"accounts[1].max_concurrent_copies".to_owned()),
            "{k:?}"
        );
        assert!(
            k.contains(&"accounts[1].max_requests_per_second".to_owned()),
            "{k:?}"
        );
        assert!(
            k.contains(&"limits.windows_nodes_per_vhd".to_owned()),
            "{k:?}"
        );
    }

    #[test]
    fn duplicate_accounts_missing_control_and_no_destination() {
        let t = GOOD.replace("name = \"dst1\"", "name = \"ops\"");
        assert!(keys(&t).contains(&"accounts[1].name".to_owned()));
        let t = GOOD.replace("account = \"ops\"", "account = \"nope\"");
        assert_eq!(keys(&t), vec!["control.account"]);
        let t = GOOD.replace("region = \"westeurope\"\n\"#", "") + "";
        let t = t.replace(
            "key_env = \"K_DST\"",
            "key_env = \"K_DST\"\ndestination = false",
        );
        assert!(keys(&t).contains(&"accounts".to_owned()));
    }

    #[test]
    fn malformed_endpoints_and_missing_keys() {
        let t = GOOD.replace("http://127.0.0.1:10001/ops", "not a url");
        assert_eq!(keys(&t), vec!["accounts[0].queue_endpoint"]);
        let t = GOOD.replace("K_DST", "K_MISSING");
        let p = problems(&t);
        assert_eq!(p[0].key, "accounts[1].key_env");
        assert!(p[0].message.contains("K_MISSING"));
        let t = GOOD.replace("key_env = \"K_DST\"\n", "");
        assert_eq!(keys(&t), vec!["accounts[1].key_env"]);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let t = GOOD
            .replace("127.0.0.1:10001/ops", "::bad")
            .replace("K_DST", "K_MISSING")
            .replace("account = \"ops\"", "account = \"zzz\"")
            + "[service]\nlisten = \"nowhere\"\n";
        let k = keys(&t);
        assert_eq!(k.len(), 4, "{k:?}");
    }

    #[test]
    fn region_mismatch_of_a_destination_is_refused() {
        let t = GOOD.replace("region = \"westeurope\"\n\"#", "").replace(
            "key_env = \"K_DST\"\nregion = \"westeurope\"",
            "key_env = \"K_DST\"\nregion = \"eastus\"",
        );
        assert_eq!(keys(&t), vec!["accounts[1].region"]);
    }

    /// An API beyond loopback without the admin token is refused for the daemon
    /// (naming both keys); with the token, or on loopback, it is fine.
    #[test]
    fn an_open_api_beyond_loopback_is_refused() {
        let open =
            format!("{GOOD}\n[service]\nlisten = \"0.0.0.0:9464\"\nadmin_token_env = \"TOKEN\"\n");
        let v = Settings::from_toml(&open)
            .unwrap()
            .validate(&secrets())
            .unwrap();
        let Err(ConfigError::Invalid(p)) = v.check_daemon() else {
            panic!("accepted an open API")
        };
        assert_eq!(p[0].key, "service.listen");
        assert!(
            p[0].message.contains("service.admin_token_env") && p[0].message.contains("TOKEN"),
            "{}",
            p[0].message
        );
        let mut with_token = secrets();
        with_token.0.insert("TOKEN".into(), "s3cret".into());
        let v = Settings::from_toml(&open)
            .unwrap()
            .validate(&with_token)
            .unwrap();
        assert!(v.check_daemon().is_ok());
        let v = Settings::from_toml(GOOD)
            .unwrap()
            .validate(&secrets())
            .unwrap();
        assert!(v.check_daemon().is_ok(), "loopback needs no token");
        let v6 = format!("{GOOD}\n[service]\nlisten = \"[::]:9464\"\n");
        let v = Settings::from_toml(&v6)
            .unwrap()
            .validate(&secrets())
            .unwrap();
        assert!(v.check_daemon().is_err(), "[::] is beyond loopback too");
    }

    #[test]
    fn name_rules() {
        assert!(check_account_name("dst1").is_ok());
        assert!(check_account_name("Dst1").is_err());
        assert!(check_account_name("ab").is_err());
        assert!(check_container_name("vhd-replicas").is_ok());
        assert!(check_container_name("vhd--replicas").is_err());
        assert!(check_container_name("-vhd").is_err());
        assert!(check_queue_name("Jobs").is_err());
    }
}
