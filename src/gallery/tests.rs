use super::*;
use crate::config::{GalleryConfig, GallerySettings};
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use std::{collections::BTreeSet, sync::Arc};

#[derive(Debug)]
struct NoToken;

#[async_trait::async_trait]
impl TokenCredential for NoToken {
    async fn get_token(
        &self,
        _: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        Err(azure_core::Error::with_message(
            azure_core::error::ErrorKind::Credential,
            "no token in unit tests",
        ))
    }
}

fn config() -> GalleryConfig {
    GalleryConfig {
        settings: GallerySettings {
            subscription: "sub".into(),
            resource_group: "images".into(),
            gallery: "batchimages".into(),
            image: "render-win".into(),
            publisher: "contoso".into(),
            offer: "render".into(),
            sku: "win2016".into(),
            region: "westeurope".into(),
            nodes_per_replica: 50,
            min_replicas: 3,
            storage_account_type: "Standard_LRS".into(),
            initial_replicas: 5,
            stall_minutes: 30,
            arm_endpoint: "https://management.azure.com".into(),
            credential: None,
            ca_file: None,
        },
        arm_endpoint: url::Url::parse("https://management.azure.com").unwrap(),
        credential: Arc::new(NoToken),
        ca_pem: None,
        storage_account_ids: [(
            "dst1".to_owned(),
            "/subscriptions/sub/resourceGroups/storage/providers/Microsoft.Storage/storageAccounts/dst1".to_owned(),
        )]
        .into(),
    }
}

fn gallery() -> Gallery {
    Gallery::new(&config(), RetryPolicy::default(), Duration::from_secs(1)).unwrap()
}

/// Every leaf path of a JSON value, arrays as `[]`, tag names as `*`.
fn paths(v: &Value, at: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                let key = if at == "tags" { "*" } else { k.as_str() };
                let p = if at.is_empty() {
                    key.to_owned()
                } else {
                    format!("{at}.{key}")
                };
                paths(v, &p, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| paths(v, &format!("{at}[]"), out)),
        _ => {
            out.insert(at.to_owned());
        }
    }
}

/// The image definition body uses only properties of `GalleryImage` in
/// GalleryRP 2025-03-03 (`GalleryImage_Create.json`: location, osType, osState,
/// hyperVGeneration, identifier; the definition's `features` of
/// `GalleryImageFeature`), and asks for what a legacy VHD needs: generation 1
/// and the Standard security type (new definitions default to Trusted Launch).
#[test]
fn the_image_definition_body_follows_gallery_image_create() {
    let body = gallery().image_body(Os::Windows);
    let mut got = BTreeSet::new();
    paths(&body, "", &mut got);
    let allowed: BTreeSet<String> = [
        "location",
        "properties.osType",
        "properties.osState",
        "properties.hyperVGeneration",
        "properties.identifier.publisher",
        "properties.identifier.offer",
        "properties.identifier.sku",
        "properties.features[].name",
        "properties.features[].value",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(got, allowed);
    let p = &body["properties"];
    assert_eq!(p["osType"], "Windows");
    assert_eq!(p["osState"], "Generalized");
    assert_eq!(p["hyperVGeneration"], "V1");
    assert_eq!(
        p["features"],
        json!([{"name": "SecurityType", "value": "Standard"}])
    );
    assert_eq!(
        gallery().image_body(Os::Linux)["properties"]["osType"],
        "Linux"
    );
}

/// The version body uses only properties of `GalleryImageVersion` 2025-03-03
/// (`GalleryImageVersion_Create_WithVHD.json`: targetRegions with name,
/// regionalReplicaCount, storageAccountType; osDiskImage.source with
/// storageAccountId and uri; hostCaching; safetyProfile; and the resource's
/// tags and publishingProfile.excludeFromLatest of the definitions), with the
/// source's region among the targets.
#[test]
fn the_version_body_follows_gallery_image_version_create_with_vhd() {
    let tags: BTreeMap<String, String> = [(TAG_POOL.to_owned(), "render".to_owned())].into();
    let uri = "https://dst1.blob.core.windows.net/vhd-replicas/render-0.vhd";
    let body = gallery().version_body(uri, "dst1", 4, &tags);
    let mut got = BTreeSet::new();
    paths(&body, "", &mut got);
    let example: BTreeSet<String> = [
        "location",
        "tags.*",
        "properties.publishingProfile.targetRegions[].name",
        "properties.publishingProfile.targetRegions[].regionalReplicaCount",
        "properties.publishingProfile.targetRegions[].storageAccountType",
        "properties.publishingProfile.excludeFromLatest",
        "properties.storageProfile.osDiskImage.source.storageAccountId",
        "properties.storageProfile.osDiskImage.source.uri",
        "properties.storageProfile.osDiskImage.hostCaching",
        "properties.safetyProfile.allowDeletionOfReplicatedLocations",
        // GalleryImageVersionSafetyProfile (2023-07-03 on): set false, so a
        // version this daemon makes can always be deleted by retire.
        "properties.safetyProfile.blockDeletionBeforeEndOfLife",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(got, example);
    let p = &body["properties"];
    assert_eq!(
        p["publishingProfile"]["targetRegions"][0]["name"],
        body["location"]
    );
    assert_eq!(
        p["publishingProfile"]["targetRegions"][0]["regionalReplicaCount"],
        4
    );
    assert_eq!(
        p["storageProfile"]["osDiskImage"]["source"]["storageAccountId"],
        "/subscriptions/sub/resourceGroups/storage/providers/Microsoft.Storage/storageAccounts/dst1"
    );
    assert_eq!(p["storageProfile"]["osDiskImage"]["source"]["uri"], uri);
    assert_eq!(body["tags"][TAG_POOL], "render");
}

#[test]
fn ids_names_and_replica_counts() {
    let g = gallery();
    assert_eq!(
        g.version_id("2026.1201.1"),
        "/subscriptions/sub/resourceGroups/images/providers/Microsoft.Compute/galleries/batchimages/images/render-win/versions/2026.1201.1"
    );
    let at = time::macros::datetime!(2026-12-01 18:30:05 UTC);
    assert_eq!(version_name(at, 0), "2026.1201.666050");
    assert_eq!(version_name(at, 3), "2026.1201.666053");
    let last = time::macros::datetime!(2026-02-09 23:59:59 UTC);
    assert_eq!(version_name(last, 9), "2026.209.863999");
    let c = config();
    // ceil(nodes / 50), at least 3, at most 100.
    assert_eq!(c.replicas_for(10), 3);
    assert_eq!(c.replicas_for(200), 4);
    assert_eq!(c.replicas_for(201), 5);
    assert_eq!(c.replicas_for(600), 12);
    assert_eq!(c.replicas_for(100_000), 100);
}

#[test]
fn a_version_reads_its_replication_progress_and_owner() {
    let body = json!({
        "tags": {TAG_OWNER: "ops/state", TAG_POOL: "render"},
        "properties": {
            "provisioningState": "Creating",
            "publishingProfile": {"targetRegions": [
                {"name": "North Europe", "regionalReplicaCount": 1},
                {"name": "West Europe", "regionalReplicaCount": 4}
            ]},
            "storageProfile": {"osDiskImage": {"source": {"uri": "https://x/y.vhd"}}},
            "replicationStatus": {"aggregatedState": "InProgress", "summary": [{"region": "westeurope", "state": "Replicating", "progress": 40}]}
        }
    });
    let v = parse_version(&body, "westeurope");
    assert_eq!(v.replicas, 4);
    assert!((v.progress - 0.4).abs() < 1e-9);
    assert_eq!(v.provisioning_state, "Creating");
    assert!(v.is_ours("ops/state", "render"));
    assert!(!v.is_ours("ops/state", "other"));
    assert!(!v.is_ours("elsewhere/state", "render"));
    assert_eq!(v.source_uri.as_deref(), Some("https://x/y.vhd"));
}

/// A Retry-After of 0 cannot make a wait spin, nor one of an hour stall it.
#[test]
fn waits_keep_a_floor_and_a_ceiling() {
    use std::time::Duration;
    assert_eq!(super::pause_for(Some(Duration::ZERO)), super::MIN_WAIT);
    assert_eq!(super::pause_for(None), Duration::from_secs(2));
    assert_eq!(
        super::pause_for(Some(Duration::from_secs(7))),
        Duration::from_secs(7)
    );
    assert_eq!(
        super::pause_for(Some(Duration::from_secs(3600))),
        super::MAX_WAIT
    );
}

#[test]
fn a_disk_over_2048_gib_is_refused_before_any_copy() {
    const GIB: u64 = 1024 * 1024 * 1024;
    let footer = crate::vhd::FOOTER_LEN;
    assert!(check_source_size(30 * GIB + footer).is_ok());
    assert!(check_source_size(2048 * GIB + footer).is_ok());
    let e = check_source_size(2049 * GIB + footer)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2049.0 GiB") && e.contains("at most 2048 GiB"),
        "{e}"
    );
    assert!(e.contains("GallerySourceResourceExceedsMaxSize"), "{e}");
    assert!(e.contains("\"gallery\": false"), "{e}");
    assert!(!GalleryError::Unsuitable(e).is_transient());
}
