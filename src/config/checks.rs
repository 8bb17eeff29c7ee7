//! The checks of each section, every problem reported with its key, and the
//! loader's own errors said in the same words.

use super::credentials::{entra_credential, resolve_credential};
use super::*;
use crate::azure::account::AccountConfig;
use crate::azure::names::{check_account_name, check_container_name, check_queue_name};
use std::{collections::HashSet, net::SocketAddr};
use url::Url;

/// Problems found so far, each with its key.
#[derive(Debug, Default)]
pub(super) struct Problems(pub(super) Vec<ConfigProblem>);

impl Problems {
    pub(super) fn add(&mut self, key: &str, message: impl Into<String>) {
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
    pub(super) fn check(&self, p: &mut Problems) -> Option<SocketAddr> {
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
    pub(super) fn check(&self, p: &mut Problems) {
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

/// An http(s) URL with a host and no query, or `None` with a problem under
/// `key` saying it is not `what`.
fn service_url(value: &str, key: &str, what: &str, p: &mut Problems) -> Option<Url> {
    match Url::parse(value.trim().trim_end_matches('/')) {
        Ok(u)
            if matches!(u.scheme(), "https" | "http")
                && u.host().is_some()
                && u.query().is_none() =>
        {
            Some(u)
        }
        _ => {
            p.add(key, format!("{value:?} is not {what}"));
            None
        }
    }
}

/// The PEM file at `path` (none: `Some(None)`), or `None` with a problem
/// under `key`.
fn read_ca(
    path: Option<&str>,
    key: &str,
    secrets: &dyn SecretSource,
    p: &mut Problems,
) -> Option<Option<Vec<u8>>> {
    let Some(path) = path.filter(|p| !p.is_empty()) else {
        return Some(None);
    };
    match secrets.file(path) {
        Ok(text)
            if reqwest::Certificate::from_pem_bundle(text.as_bytes())
                .is_ok_and(|c| !c.is_empty()) =>
        {
            Some(Some(text.into_bytes()))
        }
        Ok(_) => {
            p.add(key, format!("{path} holds no PEM certificate"));
            None
        }
        Err(e) => {
            p.add(key, format!("cannot read {path}: {e}"));
            None
        }
    }
}

impl PoolStageSettings {
    /// Checks `[pool_stage]`; the validated form when nothing is wrong.
    pub(super) fn check(
        &self,
        gallery: bool,
        secrets: &dyn SecretSource,
        p: &mut Problems,
    ) -> Option<PoolStageConfig> {
        let before = p.0.len();
        let batch_url = service_url(
            &self.batch_url,
            "pool_stage.batch_url",
            "the Batch account's URL, such as \"https://mybatch.westeurope.batch.azure.com\"",
            p,
        );
        let credential = entra_credential(self.credential.as_deref().unwrap_or("auto"), secrets)
            .map_err(|m| p.add("pool_stage.credential", m))
            .ok();
        let ca_pem = read_ca(Some(&self.ca_file), "pool_stage.ca_file", secrets, p);
        let template = self.template(secrets, p);
        if !(0.0..=10.0).contains(&self.headroom) {
            p.add(
                "pool_stage.headroom",
                format!(
                    "{} is not between 0 and 10 (0.25 keeps a quarter above the target)",
                    self.headroom
                ),
            );
        }
        if self.watch_seconds > 0 && !gallery {
            p.add(
                "pool_stage.watch_seconds",
                "background scaling raises gallery replicas: configure [gallery], or set watch_seconds = 0",
            );
        }
        if p.0.len() > before {
            return None;
        }
        Some(PoolStageConfig {
            settings: self.clone(),
            batch_url: batch_url?,
            credential: credential?,
            ca_pem: ca_pem?,
            template: template?,
        })
    }

    /// The template file's JSON object (an empty one when none is named).
    fn template(
        &self,
        secrets: &dyn SecretSource,
        p: &mut Problems,
    ) -> Option<serde_json::Map<String, serde_json::Value>> {
        if self.template.is_empty() {
            return Some(serde_json::Map::new());
        }
        let key = "pool_stage.template";
        let text = secrets
            .file(&self.template)
            .map_err(|e| p.add(key, format!("cannot read {}: {e}", self.template)))
            .ok()?;
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(m)) => Some(m),
            Ok(_) => {
                p.add(
                    key,
                    format!(
                        "{} is not a JSON object of Pool - Add properties",
                        self.template
                    ),
                );
                None
            }
            Err(e) => {
                p.add(key, format!("{} is not JSON: {e}", self.template));
                None
            }
        }
    }
}

impl GallerySettings {
    /// Checks `[gallery]` against `[batch]` and the accounts; the validated
    /// form when nothing is wrong.
    pub(super) fn check(
        &self,
        batch: &BatchSettings,
        accounts: &[AccountSettings],
        secrets: &dyn SecretSource,
        p: &mut Problems,
    ) -> Option<GalleryConfig> {
        let before = p.0.len();
        self.check_values(batch, p);
        let arm_endpoint = service_url(
            &self.arm_endpoint,
            "gallery.arm_endpoint",
            "an https URL such as \"https://management.azure.com\"",
            p,
        );
        let credential = entra_credential(self.credential.as_deref().unwrap_or("auto"), secrets)
            .map_err(|m| p.add("gallery.credential", m))
            .ok();
        let ca_pem = read_ca(self.ca_file.as_deref(), "gallery.ca_file", secrets, p);
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
    pub(super) fn check(&self, p: &mut Problems) {
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
    pub(super) fn check(&self, p: &mut Problems) {
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
    pub(super) fn check(&self, p: &mut Problems) {
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
    pub(super) fn check(&self, p: &mut Problems) -> Option<Url> {
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
    pub(super) fn check(
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
    pub(super) fn check_accounts(
        &self,
        secrets: &dyn SecretSource,
        p: &mut Problems,
    ) -> Vec<AccountConfig> {
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

pub(super) fn toml_de(text: &str) -> Result<Settings, ConfigError> {
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
