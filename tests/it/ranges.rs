//! Ranged server-side copies (Put Page From URL) and page ranges, against
//! Azurite behind the behaviour proxy, which performs Put Page From URL as the
//! service does (Azurite answers it with 416): the groundwork of the ranged
//! copy method.

use crate::helpers::*;
use std::{collections::HashMap, sync::Arc};
use vhd_replicator::{
    control::Control,
    metrics::Metrics,
    proxy::{Proxy, ProxyAction, ProxyConfig, ProxyRule},
    storage::{auth::SharedKey, BlobPath, ErrorClass, MAX_PAGES_FROM_URL},
};

fn signers() -> HashMap<String, SharedKey> {
    keys()
        .into_iter()
        .filter_map(|(k, v)| {
            let account = k.strip_prefix("VHDREP_KEY_")?.to_lowercase();
            Some((account.clone(), SharedKey::new(&account, &v.into()).ok()?))
        })
        .collect()
}

/// A sparse VHD's snapshot copied into another account range by range, only
/// its written ranges, at most 4 MiB each, with two of the writes answered 503
/// (retried): the replica is byte-identical, has exactly the source's page
/// ranges (sparse where the source is) and its metadata. A source URL without
/// a SAS is refused as the service refuses it.
#[tokio::test]
async fn a_ranged_copy_is_identical_and_as_sparse_as_its_source() {
    let env = TestEnv::new("");
    let direct = env.control().await;
    let source_url = env.source_url("sparse.vhd");
    let image = upload_sample(&direct, &source_url, 16, 3, 91).await;
    let dest = BlobPath::new("dst1", &env.container(), "ranged.vhd");
    let proxy = Proxy::start(ProxyConfig {
        signers: signers(),
        rules: vec![ProxyRule {
            query_contains: Some("comp=page".into()),
            header: Some("x-ms-copy-source"),
            ..ProxyRule::new(
                "PUT",
                "ranged.vhd",
                ProxyAction::Answer(503, "ServerBusy"),
                2,
            )
        }],
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let store = Control::azure(Arc::new(env.proxied(&proxy.url(), "")), Metrics::new())
        .unwrap()
        .store;
    let source = vhd_replicator::job::locate_source(&source_url, &direct.settings).unwrap();
    let snapshot = source.at_snapshot(&store.snapshot(&source, &Default::default()).await.unwrap());
    let ranges = store.page_ranges(&snapshot).await.unwrap();
    let written: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    assert!(
        !ranges.is_empty() && written < image.len() as u64 / 2,
        "sparse source: {ranges:?}"
    );
    store
        .ensure_container("dst1", &env.container())
        .await
        .unwrap();
    let meta: vhd_replicator::storage::Metadata =
        [("vhdrep_job".to_owned(), "ranged".to_owned())].into();
    store
        .create_page_blob(&dest, image.len() as u64, &meta)
        .await
        .unwrap();
    let expiry = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let url = store
        .copy_source_url(&snapshot, "dst1", expiry)
        .await
        .unwrap();
    let mut writes = 0;
    for r in &ranges {
        let mut at = r.start;
        while at < r.end {
            let end = (at + MAX_PAGES_FROM_URL).min(r.end);
            store
                .put_pages_from_url(&dest, at..end, &url)
                .await
                .unwrap();
            writes += 1;
            at = end;
        }
    }
    assert!(writes >= 2);
    assert_eq!(
        read_all(&direct, &dest).await,
        image,
        "identical to the source"
    );
    assert_eq!(
        direct.store.page_ranges(&dest).await.unwrap(),
        ranges,
        "as sparse as the source"
    );
    let props = direct.store.properties(&dest).await.unwrap();
    assert_eq!(
        props.metadata.get("vhdrep_job").map(String::as_str),
        Some("ranged")
    );
    let busy = proxy
        .seen()
        .iter()
        .filter(|l| l.contains("ranged.vhd") && l.contains("comp=page"))
        .count();
    assert_eq!(busy, writes + 2, "each 503 was retried");

    let unsigned = url.split('?').next().unwrap().to_owned()
        + "?snapshot="
        + snapshot.snapshot.as_deref().unwrap();
    let e = store
        .put_pages_from_url(&dest, 0..512, &unsigned)
        .await
        .unwrap_err();
    assert_eq!(
        (e.class, e.code.as_deref()),
        (ErrorClass::Denied, Some("CannotVerifyCopySource")),
        "{e}"
    );
}

/// A job with `copy_method = "auto"`: the first replica in each account is a
/// ranged copy across accounts (Put Page From URL, through 503s), the second
/// an asynchronous Copy Blob inside the account; the job records each method,
/// every replica is byte-identical, the ranged ones exactly as sparse as the
/// source, and no Copy Blob ever crossed accounts; the relays that let every
/// account be seeded at once are gone at the end.
#[tokio::test]
async fn auto_copies_ranged_across_accounts_and_async_inside() {
    let env = TestEnv::new("[engine]\ncopy_method = \"auto\"\n");
    let direct = env.control().await;
    let source_url = env.source_url("auto.vhd");
    let image = upload_sample(&direct, &source_url, 16, 3, 92).await;
    let proxy = Proxy::start(ProxyConfig {
        signers: signers(),
        busy_rate: 0.1,
        seed: 92,
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let app = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    let id = format!("auto-{}", env.id);
    let via_proxy = source_url.replace(BLOB, &proxy.url());
    app.control
        .submit(
            vhd_replicator::job::parse_job_json(&env.job_json(&id, &via_proxy, "windows", 120))
                .unwrap(),
        )
        .await
        .unwrap();
    let doc = wait_for_end(&direct, &id, std::time::Duration::from_secs(90)).await;
    assert_eq!(
        doc.state(),
        vhd_replicator::state::JobState::Completed,
        "{:?}",
        doc.error
    );
    assert_eq!(doc.replicas.len(), 6);
    let source = vhd_replicator::job::locate_source(&source_url, &direct.settings).unwrap();
    let source_ranges = direct.store.page_ranges(&source).await.unwrap();
    let mut methods = std::collections::BTreeMap::new();
    for r in &doc.replicas {
        assert_eq!(
            read_all(&direct, &r.blob).await,
            image,
            "replica {}",
            r.index
        );
        let method = r.method.clone().expect("method recorded");
        if method == "ranges" {
            assert_eq!(
                direct.store.page_ranges(&r.blob).await.unwrap(),
                source_ranges,
                "replica {} sparse",
                r.index
            );
        }
        *methods.entry(method).or_insert(0) += 1;
    }
    assert_eq!(methods.get("ranges"), Some(&3), "{methods:?}");
    assert_eq!(methods.get("async"), Some(&3), "{methods:?}");
    // Copy Blob (Start Copy) reached storage only for the replicas made inside
    // their account.
    let started: std::collections::BTreeSet<String> = replica_starts(&proxy).into_keys().collect();
    let async_paths: std::collections::BTreeSet<String> = doc
        .replicas
        .iter()
        .filter(|r| r.method.as_deref() == Some("async"))
        .map(|r| format!("/{}/{}/{}", r.blob.account, r.blob.container, r.blob.name))
        .collect();
    assert_eq!(started, async_paths);
    assert!(proxy.seen().iter().any(|l| l.contains("comp=page")));
    // Three accounts wait for a seed while the snapshot serves one: relays
    // were made beside the source, and none is left.
    let relay = vhd_replicator::engine::relay::RELAY_PREFIX;
    assert!(
        proxy.copy_starts().keys().any(|k| k.contains(relay)),
        "{:?}",
        proxy.copy_starts()
    );
    let left = direct
        .store
        .list(&source.account, &source.container, relay)
        .await
        .unwrap();
    assert!(left.is_empty(), "relays left: {left:?}");
    assert!(doc.relays.is_empty(), "{:?}", doc.relays);
    app.shutdown().await;
}
