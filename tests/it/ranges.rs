//! Ranged server-side copies (Put Page From URL) and page ranges, against
//! Azurite behind the behaviour proxy, which performs Put Page From URL as the
//! service does (Azurite answers it with 416): the groundwork of the ranged
//! copy method.

use crate::helpers::*;
use std::{collections::HashMap, sync::Arc};
use vhd_replicator::{
    azure::{auth::SharedKey, ErrorClass},
    control::Control,
    metrics::Metrics,
    storage::{BlobPath, MAX_PAGES_FROM_URL},
    testkit::proxy::{Proxy, ProxyAction, ProxyConfig, ProxyRule, ProxyStats},
};

pub(crate) fn signers() -> HashMap<String, SharedKey> {
    keys()
        .into_iter()
        .filter_map(|(k, v)| {
            let account = k.strip_prefix("VHDREP_KEY_")?.to_lowercase();
            Some((account.clone(), SharedKey::new(&account, &v.into()).ok()?))
        })
        .collect()
}

/// A rule for the ranged writes (Put Page From URL) into blobs whose path
/// contains `path`.
fn page_writes(path: &str, action: ProxyAction, times: u32) -> ProxyRule {
    ProxyRule {
        query_contains: Some("comp=page".into()),
        header: Some("x-ms-copy-source"),
        ..ProxyRule::new("PUT", path, action, times)
    }
}

/// A daemon in this process behind a proxy that performs Put Page From URL
/// (with `rules` and a `busy_rate` of random 503s), running job
/// `<name>-<env id>` of `source_url` for `nodes` Windows nodes.
async fn ranged_job(
    env: &TestEnv,
    name: &str,
    source_url: &str,
    rules: Vec<ProxyRule>,
    busy_rate: f64,
    nodes: u32,
) -> (Proxy, TestApp, String) {
    let proxy = Proxy::start(ProxyConfig {
        signers: signers(),
        rules,
        busy_rate,
        seed: 92,
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let app = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    let id = format!("{name}-{}", env.id);
    let via_proxy = source_url.replace(BLOB, &proxy.url());
    app.control
        .submit(
            vhd_replicator::job::parse_job_json(&env.job_json(&id, &via_proxy, "windows", nodes))
                .unwrap(),
        )
        .await
        .unwrap();
    (proxy, app, id)
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
        .copy_source_url(
            &snapshot,
            "dst1",
            vhd_replicator::storage::SourceRead::FromUrl,
            expiry,
        )
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
    let (proxy, app, id) = ranged_job(&env, "auto", &source_url, Vec::new(), 0.1, 120).await;
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
        let method = r.method.expect("method recorded").as_str();
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
        .filter(|r| r.method.map(|m| m.as_str()) == Some("async"))
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

/// The `bytes=<first>-<last>` of a page write, as a range.
fn parse_range(r: &str) -> std::ops::Range<u64> {
    let (a, b) = r
        .trim_start_matches("bytes=")
        .split_once('-')
        .expect("a page range");
    a.parse().unwrap()..b.parse::<u64>().unwrap() + 1
}

/// Page writes into the one replica slowed (1.5 s each) and its first two
/// answered 500 (a range that fails, then succeeds): the daemon is killed
/// with SIGKILL once the document records ranges done, and a new daemon
/// resumes the same replica. Nothing recorded done is written again, the
/// resumed run writes only what was left (fewer writes than the whole), and
/// the replica is identical to the source and exactly as sparse.
#[tokio::test]
async fn a_ranged_copy_killed_midway_resumes_with_the_ranges_left() {
    use std::time::Duration;
    let env = TestEnv::new(&format!(
        "{}copy_method = \"ranges\"\nrelays = false\n",
        crate::crash::FAST
    ));
    let direct = env.control().await;
    let source_url = env.source_url("resume.vhd");
    let image = upload_sample(&direct, &source_url, 96, 64, 93).await;
    let proxy = Proxy::start(ProxyConfig {
        signers: signers(),
        rules: vec![
            page_writes("resume-", ProxyAction::Answer(500, "OperationTimedOut"), 2),
            page_writes(
                "resume-",
                ProxyAction::Delay(Duration::from_millis(1500)),
                10_000,
            ),
        ],
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let config = env.proxied_config_file(&proxy.url());
    let id = format!("resume-{}", env.id);
    let via_proxy = source_url.replace(BLOB, &proxy.url());
    direct
        .intake
        .send(&env.job_json(&id, &via_proxy, "windows", 20))
        .await
        .unwrap();
    let first = crate::crash::Daemon::start(&config, env.dir.path().join("first.log"), &[]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let done_at_kill = loop {
        let doc = direct.state.load(&id).await.unwrap().map(|(d, _)| d);
        if let Some(done) = doc
            .and_then(|d| d.replicas.first().map(|r| r.ranges_done.clone()))
            .filter(|d| !d.is_empty())
        {
            break done;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ranges recorded done\n{}",
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    first.kill9();
    let before = proxy.page_writes().len();
    let second = crate::crash::Daemon::start(&config, env.dir.path().join("second.log"), &[]);
    let doc = wait_for_end(&direct, &id, Duration::from_secs(120)).await;
    assert_eq!(
        doc.state(),
        vhd_replicator::state::JobState::Completed,
        "{:?}\n{}",
        doc.error,
        second.log()
    );
    let r = &doc.replicas[0];
    assert_eq!(r.method.map(|m| m.as_str()), Some("ranges"));
    assert_eq!(read_all(&direct, &r.blob).await, image);
    let source = vhd_replicator::job::locate_source(&source_url, &direct.settings).unwrap();
    let wanted = direct.store.page_ranges(&source).await.unwrap();
    assert_eq!(direct.store.page_ranges(&r.blob).await.unwrap(), wanted);
    let pieces: u64 = wanted
        .iter()
        .map(|w| (w.end - w.start).div_ceil(MAX_PAGES_FROM_URL))
        .sum();
    let writes = proxy.page_writes();
    let after: Vec<_> = writes[before..]
        .iter()
        .map(|(_, r)| parse_range(r))
        .collect();
    for w in &after {
        assert!(
            !done_at_kill
                .iter()
                .any(|d| d.start < w.end && w.start < d.end),
            "{w:?} was recorded done before the kill ({done_at_kill:?}) and written again"
        );
    }
    assert!(
        !after.is_empty() && (after.len() as u64) < pieces,
        "the resumed run wrote {} of {pieces} pieces",
        after.len()
    );
    assert!(ProxyStats::get(&proxy.stats.rule_hits) >= 2);
    drop(second);
}

/// Cancelling a job in the middle of a ranged copy (65 page writes, each
/// slowed to 1 s) stops it at once: the job is cancelled within seconds, no
/// page write is sent once it has ended, far fewer than all were made, and the
/// replica is deleted.
#[tokio::test]
async fn a_cancelled_ranged_copy_stops_at_once() {
    use std::time::Duration;
    let env = TestEnv::new("[engine]\ncopy_method = \"ranges\"\nrelays = false\n");
    let direct = env.control().await;
    let source_url = env.source_url("cancel.vhd");
    upload_sample(&direct, &source_url, 288, 256, 94).await;
    let rule = page_writes(
        "cancel-",
        ProxyAction::Delay(Duration::from_secs(1)),
        10_000,
    );
    let (proxy, app, id) = ranged_job(&env, "cancel", &source_url, vec![rule], 0.0, 20).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while proxy.page_writes().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no page written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancelled_at = tokio::time::Instant::now();
    app.control.cancel(&id).await.unwrap();
    let doc = wait_for_end(&direct, &id, Duration::from_secs(30)).await;
    let took = cancelled_at.elapsed();
    assert_eq!(doc.state(), vhd_replicator::state::JobState::Cancelled);
    assert!(took < Duration::from_secs(8), "cancel took {took:?}");
    let seen_at_end = proxy
        .seen()
        .iter()
        .filter(|l| l.contains("cancel-") && l.contains("comp=page"))
        .count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen_later = proxy
        .seen()
        .iter()
        .filter(|l| l.contains("cancel-") && l.contains("comp=page"))
        .count();
    assert_eq!(
        seen_at_end, seen_later,
        "page writes went on after the cancel"
    );
    let pieces = 256 / 4 + 1;
    assert!(
        proxy.page_writes().len() < pieces,
        "the copy did not run to its end: {} writes",
        proxy.page_writes().len()
    );
    let r = &doc.replicas[0];
    assert!(direct
        .store
        .properties(&r.blob)
        .await
        .unwrap_err()
        .is_not_found());
    app.shutdown().await;
}

/// A storm of 503 ServerBusy on the page writes (the first 40 of them, more
/// than one per range): the pacer backs off, every range is written in the
/// end exactly once, and the replica is identical to the source.
#[tokio::test]
async fn a_storm_of_server_busy_is_ridden_out() {
    let env = TestEnv::new("[engine]\ncopy_method = \"ranges\"\nrelays = false\n");
    let direct = env.control().await;
    let source_url = env.source_url("storm.vhd");
    let image = upload_sample(&direct, &source_url, 48, 32, 95).await;
    let rule = page_writes("storm-", ProxyAction::Answer(503, "ServerBusy"), 40);
    let (proxy, app, id) = ranged_job(&env, "storm", &source_url, vec![rule], 0.0, 20).await;
    let doc = wait_for_end(&direct, &id, std::time::Duration::from_secs(120)).await;
    assert_eq!(
        doc.state(),
        vhd_replicator::state::JobState::Completed,
        "{:?}",
        doc.error
    );
    assert_eq!(ProxyStats::get(&proxy.stats.rule_hits), 40);
    let r = &doc.replicas[0];
    assert_eq!(read_all(&direct, &r.blob).await, image);
    let writes: Vec<_> = proxy.page_writes().into_iter().map(|(_, r)| r).collect();
    let distinct: std::collections::BTreeSet<_> = writes.iter().collect();
    assert_eq!(
        distinct.len(),
        writes.len(),
        "a range written twice: {writes:?}"
    );
    assert_eq!(writes.len(), 32 / 4 + 1, "{writes:?}");
    app.shutdown().await;
}
