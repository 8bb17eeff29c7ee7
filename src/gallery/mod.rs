//! Azure Compute Gallery: the image definition jobs publish to, the image
//! versions made from a staged VHD, their replica counts and their deletion.
//! Batch pools boot custom images only from a gallery today; see the README,
//! "Creating the Batch pool".

pub mod arm;

use crate::azure::{retry::RetryPolicy, ErrorClass};
use crate::config::GalleryConfig;
use crate::job::Os;
use arm::{Arm, ArmResult, Operation, OperationState};
use reqwest::Method;
use serde_json::{json, Value};
use std::{collections::BTreeMap, time::Duration};
use time::OffsetDateTime;

/// Tag naming the deployment that made a version (its control account and state container).
pub(crate) const TAG_OWNER: &str = "vhdrep-owner";
/// Tag naming the pool a version is for.
pub(crate) const TAG_POOL: &str = "vhdrep-pool";
/// Tag naming the job that made a version.
pub(crate) const TAG_JOB: &str = "vhdrep-job";

/// A gallery image version, as ARM describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// `provisioningState`.
    pub provisioning_state: String,
    /// Replicas in the gallery's region.
    pub replicas: u32,
    /// Replication progress over every target region, 0 to 1.
    pub progress: f64,
    /// The VHD it was made from.
    pub source_uri: Option<String>,
    /// Its storage profile as ARM gave it (an update sends it back unchanged).
    pub storage_profile: Value,
}

impl Version {
    /// Whether this deployment made it for this pool.
    pub(crate) fn is_ours(&self, owner: &str, pool: &str) -> bool {
        self.tags.get(TAG_OWNER).map(String::as_str) == Some(owner)
            && self.tags.get(TAG_POOL).map(String::as_str) == Some(pool)
    }
}

/// The gallery of one deployment.
#[derive(Debug)]
pub struct Gallery {
    arm: Arm,
    cfg: GalleryConfig,
}

/// A version name `YYYY.MMDD.P` for `now`: the patch is the second of the day
/// times ten plus `attempt` (a name taken by someone else moves on to the next
/// attempt), so names sort by time and fit the 32-bit parts ARM requires.
pub fn version_name(now: OffsetDateTime, attempt: u32) -> String {
    let second =
        u32::from(now.hour()) * 3600 + u32::from(now.minute()) * 60 + u32::from(now.second());
    format!(
        "{}.{}{:02}.{}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        second * 10 + attempt % 10
    )
}

impl Gallery {
    /// A client for `cfg` under the one retry policy.
    pub fn new(
        cfg: &GalleryConfig,
        retry: RetryPolicy,
        connect_timeout: Duration,
    ) -> ArmResult<Self> {
        Ok(Self {
            arm: Arm::new(cfg, retry, connect_timeout)?,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &GalleryConfig {
        &self.cfg
    }

    /// ARM id of the version `name`.
    pub fn version_id(&self, name: &str) -> String {
        format!("{}/versions/{name}", self.cfg.image_id())
    }

    /// The ARM URL of version `name` (with the API version).
    pub(crate) fn version_url(&self, name: &str) -> String {
        self.arm.url(&self.version_id(name)).to_string()
    }

    /// The body of a new image definition for a legacy (generation 1) VHD of
    /// `os`: since API 2025-03-03 a definition defaults to Gen2 and Trusted
    /// Launch, which a VHD made for Batch's VHD pools is not.
    pub(crate) fn image_body(&self, os: Os) -> Value {
        let g = &self.cfg.settings;
        json!({
            "location": g.region,
            "properties": {
                "osType": os_type(os),
                "osState": "Generalized",
                "hyperVGeneration": "V1",
                "features": [{"name": "SecurityType", "value": "Standard"}],
                "identifier": {"publisher": g.publisher, "offer": g.offer, "sku": g.sku},
            }
        })
    }

    /// The body of a version made from the VHD at `uri` in `account`, with
    /// `replicas` in the gallery's region (the VHD's region, as ARM requires).
    pub(crate) fn version_body(
        &self,
        uri: &str,
        account: &str,
        replicas: u32,
        tags: &BTreeMap<String, String>,
    ) -> Value {
        let g = &self.cfg.settings;
        json!({
            "location": g.region,
            "tags": tags,
            "properties": {
                "publishingProfile": {
                    "targetRegions": [self.target_region(replicas)],
                    "excludeFromLatest": false,
                },
                "storageProfile": self.storage_profile(uri, account),
                // Versions this daemon makes can always be deleted (retire,
                // a failed job): never blocked before their end of life.
                "safetyProfile": {
                    "allowDeletionOfReplicatedLocations": true,
                    "blockDeletionBeforeEndOfLife": false,
                },
            }
        })
    }

    /// A version's storage profile: the staged VHD at `uri` in `account`.
    fn storage_profile(&self, uri: &str, account: &str) -> Value {
        json!({
            "osDiskImage": {
                "source": {
                    "storageAccountId": self.cfg.storage_account_ids.get(account).cloned().unwrap_or_default(),
                    "uri": uri,
                },
                "hostCaching": "ReadOnly",
            }
        })
    }

    fn target_region(&self, replicas: u32) -> Value {
        let g = &self.cfg.settings;
        json!({
            "name": g.region,
            "regionalReplicaCount": replicas,
            "storageAccountType": g.storage_account_type,
        })
    }

    /// Checks that the gallery exists and is in the configured region (for
    /// `validate --online`); says what it found.
    pub async fn check_gallery(&self) -> Result<String, GalleryError> {
        let g = &self.cfg.settings;
        let path = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/galleries/{}",
            g.subscription, g.resource_group, g.gallery
        );
        let url = self.arm.url(&path);
        let found = match self.arm.call("gallery_get", Method::GET, &url, None).await {
            Ok(a) => a.body,
            Err(e) if e.class == ErrorClass::NotFound => {
                return Err(GalleryError::Unsuitable(format!(
                    "gallery {} not found in resource group {} of subscription {}: create it in {} (az sig create) or fix [gallery]",
                    g.gallery, g.resource_group, g.subscription, g.region
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let location = found["location"].as_str().unwrap_or_default();
        let norm = |r: &str| r.to_lowercase().replace(' ', "");
        if norm(location) != norm(&g.region) {
            return Err(GalleryError::Unsuitable(format!(
                "gallery {} is in {location}, not in {} (the Batch region): use a gallery in {}",
                g.gallery, g.region, g.region
            )));
        }
        Ok(format!(
            "gallery {} in {location}, image definition {}",
            g.gallery, g.image
        ))
    }

    /// Whether the existing image definition (`body`) can take this job's VHD
    /// of `os` and boot Batch nodes: the same OS, generation 1 (a VHD), a
    /// generalized OS state (Batch boots only generalized images) and x64.
    fn suits(&self, body: &Value, os: Os) -> Result<(), GalleryError> {
        let p = &body["properties"];
        let image = &self.cfg.settings.image;
        let fix = "set gallery.image to a suitable definition (or a new name, which is created)";
        let (want_os, got_os) = (os_type(os), p["osType"].as_str().unwrap_or_default());
        if !got_os.eq_ignore_ascii_case(want_os) {
            return Err(GalleryError::Unsuitable(format!(
                "image definition {image} is for {got_os}, this job's VHD is {want_os}: {fix}"
            )));
        }
        let generation = p["hyperVGeneration"].as_str().unwrap_or("V1");
        if generation != "V1" {
            return Err(GalleryError::Unsuitable(format!("image definition {image} is hyperVGeneration {generation}; a VHD is generation 1 (V1): {fix}")));
        }
        let state = p["osState"].as_str().unwrap_or("Generalized");
        if !state.eq_ignore_ascii_case("Generalized") {
            return Err(GalleryError::Unsuitable(format!("image definition {image} is osState {state}; Batch boots only generalized images: {fix}")));
        }
        let arch = p["architecture"].as_str().unwrap_or("x64");
        if !arch.eq_ignore_ascii_case("x64") {
            return Err(GalleryError::Unsuitable(format!("image definition {image} is for architecture {arch}; a VHD for Batch's x64 sizes needs x64: {fix}")));
        }
        Ok(())
    }

    /// The image definition as ARM has it, `None` when there is none.
    async fn image_definition(&self) -> Result<Option<Value>, GalleryError> {
        let url = self.arm.url(&self.cfg.image_id());
        match self
            .arm
            .call("gallery_image_get", Method::GET, &url, None)
            .await
        {
            Ok(a) => Ok(Some(a.body)),
            Err(e) if e.class == ErrorClass::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Before any copy: the VHD of `blob_len` bytes is not larger than a
    /// gallery takes, and the image definition, if it exists, can take it (a
    /// missing one is created when the job publishes).
    pub(crate) async fn check_image(&self, os: Os, blob_len: u64) -> Result<(), GalleryError> {
        check_source_size(blob_len)?;
        match self.image_definition().await? {
            Some(body) => self.suits(&body, os),
            None => Ok(()),
        }
    }

    /// Makes sure the image definition exists and takes VHDs of `os`: created
    /// when missing; an existing one that cannot take it is refused.
    pub(crate) async fn ensure_image(&self, os: Os) -> Result<(), GalleryError> {
        if let Some(body) = self.image_definition().await? {
            return self.suits(&body, os);
        }
        tracing::info!(image = %self.cfg.settings.image, "creating the gallery image definition");
        let url = self.arm.url(&self.cfg.image_id());
        let a = self
            .arm
            .call(
                "gallery_image_put",
                Method::PUT,
                &url,
                Some(&self.image_body(os)),
            )
            .await?;
        self.wait(&a.operation, |_| {}).await
    }

    /// The version `name`, with its replication status; `None` when missing.
    pub async fn version(&self, name: &str) -> ArmResult<Option<Version>> {
        let mut url = self.arm.url(&self.version_id(name));
        url.query_pairs_mut()
            .append_pair("$expand", "ReplicationStatus");
        match self
            .arm
            .call("gallery_version_get", Method::GET, &url, None)
            .await
        {
            Ok(a) => Ok(Some(parse_version(&a.body, &self.cfg.settings.region))),
            Err(e) if e.class == ErrorClass::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts making version `name` from a staged VHD.
    pub(crate) async fn create_version(&self, name: &str, body: &Value) -> ArmResult<Operation> {
        let url = self.arm.url(&self.version_id(name));
        let a = self
            .arm
            .call("gallery_version_put", Method::PUT, &url, Some(body))
            .await?;
        Ok(a.operation)
    }

    /// Starts changing the replica count of `version` (named `name`, as read).
    /// The update carries the version's storage profile as read, unchanged:
    /// GalleryRP 2025-03-03 requires `storageProfile` in an update (its
    /// published Update examples send it).
    pub(crate) async fn set_replicas(
        &self,
        name: &str,
        version: &Version,
        replicas: u32,
    ) -> ArmResult<Operation> {
        let url = self.arm.url(&self.version_id(name));
        let storage = if version.storage_profile.is_object() {
            version.storage_profile.clone()
        } else {
            json!({})
        };
        let body = json!({"properties": {
            "publishingProfile": {"targetRegions": [self.target_region(replicas)]},
            "storageProfile": storage,
        }});
        let a = self
            .arm
            .call("gallery_version_patch", Method::PATCH, &url, Some(&body))
            .await?;
        Ok(a.operation)
    }

    /// Starts deleting version `name`.
    pub(crate) async fn delete_version(&self, name: &str) -> ArmResult<Operation> {
        let url = self.arm.url(&self.version_id(name));
        match self
            .arm
            .call("gallery_version_delete", Method::DELETE, &url, None)
            .await
        {
            Ok(a) if a.status == 204 || a.status == 200 => Ok(Operation::Resource(url.to_string())),
            Ok(a) => Ok(a.operation),
            Err(e) if e.class == ErrorClass::NotFound => Ok(Operation::Resource(url.to_string())),
            Err(e) => Err(e),
        }
    }

    /// Where an operation stands (a new `Location` it names is followed from
    /// then on).
    pub async fn poll(&self, op: &mut Operation) -> ArmResult<OperationState> {
        self.arm.poll(op).await
    }

    /// Follows `op` to its end, calling `on_poll` with each state, sleeping
    /// Retry-After between polls (two seconds without one; never less than
    /// `MIN_WAIT` nor more than `MAX_WAIT`, so a `Retry-After: 0` cannot
    /// spin), and giving up after `WAIT_LIMIT` with ARM's operation named.
    pub async fn wait(
        &self,
        op: &Operation,
        mut on_poll: impl FnMut(&OperationState),
    ) -> Result<(), GalleryError> {
        let mut op = op.clone();
        let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
        loop {
            let state = self.arm.poll(&mut op).await?;
            on_poll(&state);
            match state {
                OperationState::Succeeded => return Ok(()),
                OperationState::Failed(m) => return Err(GalleryError::Failed(m)),
                OperationState::Running(after) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(GalleryError::Failed(format!(
                            "the operation did not end within {} h: {op:?}; look at it in the portal (Activity log) and try again",
                            WAIT_LIMIT.as_secs() / 3600
                        )));
                    }
                    tokio::time::sleep(pause_for(after)).await
                }
            }
        }
    }
}

/// Shortest pause between two looks at an ARM operation.
pub(crate) const MIN_WAIT: Duration = Duration::from_secs(1);
/// Longest pause between two looks at an ARM operation.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(60);
/// How long a wait for one ARM operation (an image definition made, a version
/// deleted) may last before it is given up: replication can take hours.
pub(crate) const WAIT_LIMIT: Duration = Duration::from_secs(6 * 3600);

/// The pause before the next look at an operation that answered `Retry-After`
/// (if any): two seconds without one, within [`MIN_WAIT`] and [`MAX_WAIT`].
pub(crate) fn pause_for(retry_after: Option<Duration>) -> Duration {
    retry_after
        .unwrap_or(Duration::from_secs(2))
        .clamp(MIN_WAIT, MAX_WAIT)
}

fn os_type(os: Os) -> &'static str {
    match os {
        Os::Windows => "Windows",
        Os::Linux => "Linux",
    }
}

/// A region's name as ARM compares them: "West Europe" is "westeurope".
fn region_key(name: &str) -> String {
    name.to_lowercase().replace(' ', "")
}

/// Reads what this daemon needs of a version's ARM body; its replica count is
/// the one of `region` (the gallery's), found by name: ARM lists target
/// regions in any order, spelled either way.
pub(crate) fn parse_version(body: &Value, region: &str) -> Version {
    let p = &body["properties"];
    let tags = body["tags"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let replicas = p["publishingProfile"]["targetRegions"]
        .as_array()
        .and_then(|rs| {
            rs.iter()
                .find(|r| region_key(r["name"].as_str().unwrap_or_default()) == region_key(region))
        })
        .and_then(|r| r["regionalReplicaCount"].as_u64())
        .or_else(|| p["publishingProfile"]["replicaCount"].as_u64())
        .unwrap_or(1) as u32;
    let summary = p["replicationStatus"]["summary"].as_array();
    let progress = match summary {
        Some(s) if !s.is_empty() => {
            s.iter()
                .map(|r| r["progress"].as_f64().unwrap_or(0.0))
                .sum::<f64>()
                / (100.0 * s.len() as f64)
        }
        _ if p["provisioningState"] == "Succeeded" => 1.0,
        _ => 0.0,
    };
    Version {
        tags,
        provisioning_state: p["provisioningState"]
            .as_str()
            .unwrap_or("Unknown")
            .to_owned(),
        replicas,
        progress: progress.clamp(0.0, 1.0),
        source_uri: p["storageProfile"]["osDiskImage"]["source"]["uri"]
            .as_str()
            .map(str::to_owned),
        storage_profile: p["storageProfile"].clone(),
    }
}

/// Publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum GalleryError {
    /// An ARM request failed.
    #[error("{0}")]
    Arm(#[from] crate::azure::ServiceError),
    /// ARM ran the operation and it failed.
    #[error("gallery operation failed: {0}")]
    Failed(String),
    /// The gallery's image definition cannot take this image.
    #[error("{0}")]
    Unsuitable(String),
}

impl GalleryError {
    /// Whether trying again later may succeed.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, GalleryError::Arm(e) if e.class.is_retryable())
    }
}

/// The largest disk, in GiB, a gallery image version takes from a VHD: ARM
/// refuses a larger one with `GallerySourceResourceExceedsMaxSize` ("The
/// GalleryImageVersion source resource size 2520 exceeds the max size 2048
/// supported"), as Azure's "Troubleshoot Azure Compute Gallery" page lists
/// (raised from 1 TiB; MicrosoftDocs/azure-docs#113012). Generation 1 images,
/// the ones made here, boot OS disks of at most 2 TiB anyway.
pub(crate) const MAX_SOURCE_GIB: u64 = 2048;

/// Refuses a VHD whose disk (the blob less its 512-byte footer) is larger than
/// [`MAX_SOURCE_GIB`], before anything is copied.
pub(crate) fn check_source_size(blob_len: u64) -> Result<(), GalleryError> {
    const GIB: u64 = 1024 * 1024 * 1024;
    let disk = blob_len.saturating_sub(crate::vhd::FOOTER_LEN);
    if disk > MAX_SOURCE_GIB * GIB {
        return Err(GalleryError::Unsuitable(format!(
            "the source disk is {:.1} GiB; a gallery image version takes at most {MAX_SOURCE_GIB} GiB from a VHD (Azure answers GallerySourceResourceExceedsMaxSize): shrink the disk, or submit the job with \"gallery\": false for VHD replicas only",
            disk as f64 / GIB as f64
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
