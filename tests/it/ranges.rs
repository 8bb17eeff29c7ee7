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
