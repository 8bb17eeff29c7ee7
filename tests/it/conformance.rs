//! One suite, every `BlobStore` and `MessageQueue`: the Azure adapter against
//! Azurite and the in-memory implementations must behave alike.

use crate::helpers::*;
use bytes::Bytes;
use std::{sync::Arc, time::Duration};
use time::OffsetDateTime;
use vhd_replicator::{
    azure::ErrorClass,
    queue::MessageQueue,
    storage::{BlobKind, BlobPath, BlobStore, Condition, CopyState, Metadata},
    testkit::{
        memory_queue::MemoryQueue,
        sim::{SimConfig, SimStore},
    },
    vhd,
};

async fn wait_copied(store: &dyn BlobStore, blob: &BlobPath, copy_id: &str) {
    for _ in 0..100 {
        let p = store.properties(blob).await.unwrap();
        let c = p.copy.expect("copy status");
        assert_eq!(c.id, copy_id);
        match c.state {
            CopyState::Success => return,
            CopyState::Pending => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("copy ended {other:?}"),
        }
    }
    panic!("copy did not finish");
}

async fn blob_store_suite(store: Arc<dyn BlobStore>, id: &str, expect_sas: bool) {
    let c = format!("conf-{id}");
    store.ensure_container("src", &c).await.unwrap();
    store
        .ensure_container("src", &c)
        .await
        .expect("creating a container twice is fine");
    store.ensure_container("dst1", &c).await.unwrap();

    // Page blobs and ranges.
    let image = vhd::sample_image(1, 1, 9);
    let src = BlobPath::new("src", &c, "dir/disk.vhd");
    store
        .put_page_blob(&src, Bytes::from(image.clone()))
        .await
        .unwrap();
    let p = store.properties(&src).await.unwrap();
    assert_eq!((p.kind, p.len), (BlobKind::Page, image.len() as u64));
    assert!(!p.etag.is_empty());
    assert!(p.copy.is_none());
    let len = image.len() as u64;
    let (footer, _) = store.read(&src, Some(len - 512..len)).await.unwrap();
    vhd::check_footer(&footer, len).unwrap();

    // Snapshots are frozen copies.
    let tag = Metadata::from([("vhdrep_job_id".to_owned(), "conf-snap".to_owned())]);
    let snap = store.snapshot(&src, &tag).await.unwrap();
    let at = src.at_snapshot(&snap);
    assert_eq!(store.properties(&at).await.unwrap().len, len);

    copies_work(store.as_ref(), &c, &at, &image, expect_sas).await;
    conditional_writes(store.as_ref(), &c).await;
    listing_shows_what_is_there(store.as_ref(), &c, &snap).await;

    // Deleting a blob takes its snapshots along.
    store.delete(&src).await.unwrap();
    assert!(store.properties(&src).await.unwrap_err().is_not_found());
    assert!(store.properties(&at).await.unwrap_err().is_not_found());
    assert!(store.delete(&src).await.unwrap_err().is_not_found());

    let info = store.account_info("dst1").await.unwrap();
    info.suits_batch_images().unwrap();
}

/// Copies within and across accounts, and the errors a copy can meet.
async fn copies_work(
    store: &dyn BlobStore,
    c: &str,
    at: &BlobPath,
    image: &[u8],
    expect_sas: bool,
) {
    let len = image.len() as u64;
    // A copy inside one account needs no SAS; across accounts it does.
    let meta = Metadata::from([("vhdrep_job_id".to_owned(), "conf".to_owned())]);
    let until = OffsetDateTime::now_utc() + time::Duration::hours(1);
    let same_url = store
        .copy_source_url(
            at,
            "src",
            vhd_replicator::storage::SourceRead::CopyBlob,
            until,
        )
        .await
        .unwrap();
    assert!(!same_url.contains("sig="));
    // Put Page From URL needs a signed source even inside one account.
    let same_from_url = store
        .copy_source_url(
            at,
            "src",
            vhd_replicator::storage::SourceRead::FromUrl,
            until,
        )
        .await
        .unwrap();
    assert_eq!(
        same_from_url.contains("sig="),
        expect_sas,
        "{same_from_url}"
    );
    let same = BlobPath::new("src", c, "copy-same.vhd");
    let started = store.start_copy(&same, &same_url, &meta).await.unwrap();
    wait_copied(store, &same, &started.copy_id).await;
    let cross_url = store
        .copy_source_url(
            at,
            "dst1",
            vhd_replicator::storage::SourceRead::CopyBlob,
            until,
        )
        .await
        .unwrap();
    assert_eq!(cross_url.contains("sig="), expect_sas);
    let cross = BlobPath::new("dst1", c, "nested/copy-cross.vhd");
    let started = store.start_copy(&cross, &cross_url, &meta).await.unwrap();
    wait_copied(store, &cross, &started.copy_id).await;
    let p = store.properties(&cross).await.unwrap();
    assert_eq!((p.kind, p.len), (BlobKind::Page, len));
    assert_eq!(
        p.metadata.get("vhdrep_job_id").map(String::as_str),
        Some("conf")
    );
    assert_eq!(store.read(&cross, None).await.unwrap().0.to_vec(), image);
    if let Some(source) = p.copy.and_then(|c| c.source) {
        assert!(
            !source.contains(&cross_url[cross_url.find("sig=").map(|i| i + 4).unwrap_or(0)..])
                || !expect_sas,
            "copy source shows the signature"
        );
    }

    // Aborting a finished copy is a conflict; missing blobs are NotFound.
    let e = store
        .abort_copy(&cross, &started.copy_id)
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Conflict, "{e}");
    let e = store
        .properties(&BlobPath::new("dst1", c, "nope"))
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::NotFound);
    let e = store
        .start_copy(
            &BlobPath::new("dst1", c, "x"),
            &store
                .copy_source_url(
                    &BlobPath::new("src", c, "absent"),
                    "dst1",
                    vhd_replicator::storage::SourceRead::CopyBlob,
                    until,
                )
                .await
                .unwrap(),
            &meta,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e.class, ErrorClass::NotFound | ErrorClass::Denied),
        "{e:?}"
    );
}

/// Conditional writes of small documents.
async fn conditional_writes(store: &dyn BlobStore, c: &str) {
    // Conditional writes of small documents.
    let doc = BlobPath::new("src", c, "state/doc.json");
    let e1 = store
        .put_block_blob(
            &doc,
            Bytes::from_static(b"{\"v\":1}"),
            &Default::default(),
            Condition::IfAbsent,
        )
        .await
        .unwrap();
    let e = store
        .put_block_blob(
            &doc,
            Bytes::from_static(b"{}"),
            &Default::default(),
            Condition::IfAbsent,
        )
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::PreconditionFailed, "{e:?}");
    let e2 = store
        .put_block_blob(
            &doc,
            Bytes::from_static(b"{\"v\":2}"),
            &Default::default(),
            Condition::IfMatch(e1.clone()),
        )
        .await
        .unwrap();
    assert_ne!(e1, e2);
    let e = store
        .put_block_blob(
            &doc,
            Bytes::from_static(b"{}"),
            &Default::default(),
            Condition::IfMatch(e1),
        )
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::PreconditionFailed, "{e:?}");
    let (data, etag) = store.read(&doc, None).await.unwrap();
    assert_eq!((&data[..], etag), (&b"{\"v\":2}"[..], e2));
    assert_eq!(store.properties(&doc).await.unwrap().kind, BlobKind::Block);
}

/// Listing by prefix shows base blobs only; a detailed listing shows metadata and snapshots.
async fn listing_shows_what_is_there(store: &dyn BlobStore, c: &str, snap: &str) {
    // Listing by prefix shows base blobs only.
    let mut names = store.list("src", c, "").await.unwrap();
    names.sort();
    assert_eq!(
        names,
        vec!["copy-same.vhd", "dir/disk.vhd", "state/doc.json"]
    );
    assert_eq!(
        store.list("src", c, "state/").await.unwrap(),
        vec!["state/doc.json"]
    );
    assert!(store
        .list("src", "no-such-container-here", "")
        .await
        .unwrap()
        .is_empty());

    // A detailed listing shows metadata, times and (when asked) snapshots.
    let detailed = store.list_detailed("src", c, "dir/", true).await.unwrap();
    assert!(
        detailed.iter().any(|b| b.snapshot.as_deref() == Some(snap)
            && b.metadata.get("vhdrep_job_id").map(String::as_str) == Some("conf-snap")),
        "the snapshot with its own metadata: {detailed:?}"
    );
    assert!(detailed
        .iter()
        .any(|b| b.snapshot.is_none() && b.name == "dir/disk.vhd" && b.last_modified.is_some()));
    let bases = store.list_detailed("src", c, "", false).await.unwrap();
    assert!(bases.iter().all(|b| b.snapshot.is_none()));
    assert_eq!(
        bases
            .iter()
            .find(|b| b.name == "copy-same.vhd")
            .and_then(|b| b.metadata.get("vhdrep_job_id"))
            .map(String::as_str),
        Some("conf")
    );
}

async fn queue_suite(q: Arc<dyn MessageQueue>) {
    q.ensure().await.unwrap();
    q.ensure().await.unwrap();
    let text = "{\"a\":\"<&>\"}";
    q.send(text).await.unwrap();
    let got = q.receive(32, Duration::from_secs(30)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, text);
    assert_eq!(got[0].dequeue_count, 1);
    assert!(
        q.receive(32, Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty(),
        "a taken message is invisible"
    );
    let renewed = q
        .renew(&got[0].id, &got[0].pop_receipt, Duration::from_secs(30))
        .await
        .unwrap();
    assert_ne!(
        renewed, got[0].pop_receipt,
        "renewal gives a new pop receipt"
    );
    let stale = q.delete(&got[0].id, &got[0].pop_receipt).await.unwrap_err();
    assert!(
        stale.is_lost_message(),
        "the old receipt is stale: {stale:?}"
    );
    q.delete(&got[0].id, &renewed).await.unwrap();
    // A message released with visibility 0 comes back with a higher count.
    q.send("again").await.unwrap();
    assert_eq!(q.approximate_count().await.unwrap(), 1);
    let m = q
        .receive(1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    q.renew(&m.id, &m.pop_receipt, Duration::ZERO)
        .await
        .unwrap();
    let m2 = q
        .receive(1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    assert_eq!((m2.id.as_str(), m2.dequeue_count), (m.id.as_str(), 2));
    q.delete(&m2.id, &m2.pop_receipt).await.unwrap();
}

/// The Azure adapter, through the Shared Key policy and SAS signer, on Azurite.
#[tokio::test]
async fn azure_store_conforms() {
    let env = TestEnv::new("");
    let control = env.control().await;
    blob_store_suite(control.store.clone(), &env.id, true).await;
}

/// The simulated store behaves the same, with instant copies and with Azure's
/// pending, bandwidth-limited ones (on real time here).
#[tokio::test]
async fn simulated_store_conforms() {
    blob_store_suite(
        Arc::new(SimStore::new(SimConfig::instant())),
        "instant",
        true,
    )
    .await;
    let modelled = SimConfig {
        latency: std::time::Duration::ZERO,
        blob_read_bps: 200.0 * 1024.0 * 1024.0,
        ..SimConfig::default()
    };
    blob_store_suite(Arc::new(SimStore::new(modelled)), "model", true).await;
}

/// The Azure queue on Azurite.
#[tokio::test]
async fn azure_queue_conforms() {
    let env = TestEnv::new("");
    let control = env.control().await;
    queue_suite(control.intake.clone()).await;
}

/// The in-memory queue behaves the same.
#[tokio::test]
async fn memory_queue_conforms() {
    queue_suite(Arc::new(MemoryQueue::new("q"))).await;
}

/// A source SAS with a wrong signature is refused: Azurite checks what we sign.
#[tokio::test]
async fn a_forged_source_sas_is_refused() {
    let env = TestEnv::new("");
    let control = env.control().await;
    let c = format!("forge-{}", env.id);
    control.store.ensure_container("src", &c).await.unwrap();
    control.store.ensure_container("dst2", &c).await.unwrap();
    let src = BlobPath::new("src", &c, "d.vhd");
    control
        .store
        .put_page_blob(&src, Bytes::from(vhd::sample_image(1, 1, 1)))
        .await
        .unwrap();
    let url = control
        .store
        .copy_source_url(
            &src,
            "dst2",
            vhd_replicator::storage::SourceRead::CopyBlob,
            OffsetDateTime::now_utc() + time::Duration::hours(1),
        )
        .await
        .unwrap();
    let sig_at = url.find("sig=").unwrap() + 4;
    let forged = format!("{}AAAA{}", &url[..sig_at], &url[sig_at..]);
    let dest = BlobPath::new("dst2", &c, "d.vhd");
    let result = control
        .store
        .start_copy(&dest, &forged, &Metadata::new())
        .await;
    match result {
        Err(e) => assert!(
            matches!(e.class, ErrorClass::Denied | ErrorClass::Invalid),
            "{e:?}"
        ),
        Ok(s) => {
            // Some service versions accept the request and fail the copy.
            let p = control.store.properties(&dest).await.unwrap();
            assert_ne!(
                p.copy.map(|c| c.state),
                Some(CopyState::Success),
                "forged SAS copied anyway ({})",
                s.copy_id
            );
        }
    }
    let e = control
        .store
        .start_copy(&dest, &url, &Metadata::new())
        .await;
    assert!(e.is_ok(), "the genuine SAS works: {e:?}");
}
