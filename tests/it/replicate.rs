use crate::helpers::*;
use std::{collections::BTreeMap, time::Duration};
use vhd_replicator::{
    job::parse_job_json,
    plan::{META_JOB, META_REPLICA, META_SNAPSHOT},
    state::{JobState, ReplicaState},
    storage::{BlobKind, BlobPath},
};

/// A 90-node Windows job gives 5 verified replicas over the 3 destination accounts
/// (2/2/1), each a page blob of the source's length with byte-identical content,
/// tagged with our metadata, and a hand-off of the CONTRACT.md shape with no SAS.
#[tokio::test]
async fn windows_90_nodes_make_5_identical_replicas_over_3_accounts() {
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    let source = env.source_url("win2016-app.vhd");
    let image = upload_sample(&app.control, &source, 8, 3, 1).await;
    let job_id = format!("win-{}", env.id);
    let spec = parse_job_json(&env.job_json(&job_id, &source, "windows", 90)).unwrap();
    let submitted = app.control.submit(spec).await.unwrap();
    assert!(submitted.created);

    let doc = wait_for_end(&app.control, &job_id, Duration::from_secs(120)).await;
    assert_eq!(doc.state(), JobState::Completed, "error: {:?}", doc.error);
    assert_eq!(doc.replicas.len(), 5);
    let mut per_account = BTreeMap::new();
    for r in &doc.replicas {
        *per_account.entry(r.account.as_str()).or_insert(0) += 1;
        assert_eq!(r.state, ReplicaState::Verified);
        assert_eq!(r.bytes_copied, image.len() as u64);
    }
    assert_eq!(
        per_account,
        BTreeMap::from([("dst1", 2), ("dst2", 2), ("dst3", 1)])
    );

    let snapshot = doc.source_snapshot.clone().expect("snapshot recorded");
    for r in &doc.replicas {
        let props = app.control.store.properties(&r.blob).await.unwrap();
        assert_eq!(props.kind, BlobKind::Page);
        assert_eq!(props.len, image.len() as u64);
        assert_eq!(props.metadata.get(META_JOB), Some(&job_id));
        assert_eq!(props.metadata.get(META_REPLICA), Some(&r.index.to_string()));
        assert_eq!(props.metadata.get(META_SNAPSHOT), Some(&snapshot));
        let bytes = read_all(&app.control, &r.blob).await;
        assert!(
            bytes == image,
            "replica {} differs from the source",
            r.index
        );
    }
    assert_fanned_out(&app, &env, &doc).await;
    assert_handed_off(&app, &env, &doc, &source).await;

    // Resubmitting the id makes nothing new.
    let again = app
        .control
        .submit(parse_job_json(&env.job_json(&job_id, &source, "windows", 90)).unwrap())
        .await
        .unwrap();
    assert!(!again.created);
    app.shutdown().await;
}

/// A 41-node Linux job gives 2 replicas.
#[tokio::test]
async fn linux_41_nodes_make_2_replicas() {
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    let source = env.source_url("ubuntu.vhd");
    let image = upload_sample(&app.control, &source, 4, 1, 2).await;
    let job_id = format!("lin-{}", env.id);
    app.control
        .submit(parse_job_json(&env.job_json(&job_id, &source, "linux", 41)).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&app.control, &job_id, Duration::from_secs(120)).await;
    assert_eq!(doc.state(), JobState::Completed, "error: {:?}", doc.error);
    assert_eq!(doc.replicas.len(), 2);
    let accounts: Vec<&str> = doc.replicas.iter().map(|r| r.account.as_str()).collect();
    assert_eq!(accounts, vec!["dst1", "dst2"]);
    for r in &doc.replicas {
        assert_eq!(read_all(&app.control, &r.blob).await, image);
    }
    let handoff: serde_json::Value =
        serde_json::from_str(&drain(app.control.handoff.as_ref()).await[0]).unwrap();
    assert_eq!(handoff["os"], "linux");
    assert_eq!(handoff["image_uris"].as_array().unwrap().len(), 2);
    app.shutdown().await;
}

/// A source that is not a fixed VHD, or that does not exist, fails the job with a
/// reason naming the problem; the daemon goes on.
#[tokio::test]
async fn bad_sources_fail_with_a_reason() {
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    // Not a VHD: a page blob of zeroes without a footer.
    let blob = BlobPath::new("src", &format!("it-{}-src", env.id), "zeros.vhd");
    app.control
        .store
        .ensure_container("src", &blob.container)
        .await
        .unwrap();
    app.control
        .store
        .put_page_blob(&blob, bytes::Bytes::from(vec![0u8; 1024 * 1024 + 512]))
        .await
        .unwrap();
    let id1 = format!("nofooter-{}", env.id);
    app.control
        .submit(
            parse_job_json(&env.job_json(&id1, &env.source_url("zeros.vhd"), "linux", 1)).unwrap(),
        )
        .await
        .unwrap();
    let id2 = format!("missing-{}", env.id);
    app.control
        .submit(
            parse_job_json(&env.job_json(&id2, &env.source_url("nothing-here.vhd"), "linux", 1))
                .unwrap(),
        )
        .await
        .unwrap();
    let d1 = wait_for_end(&app.control, &id1, Duration::from_secs(60)).await;
    assert_eq!(d1.state(), JobState::Failed);
    assert!(
        d1.error.as_deref().unwrap().contains("conectix"),
        "{:?}",
        d1.error
    );
    let d2 = wait_for_end(&app.control, &id2, Duration::from_secs(60)).await;
    assert_eq!(d2.state(), JobState::Failed);
    assert!(
        d2.error.as_deref().unwrap().contains("does not exist"),
        "{:?}",
        d2.error
    );
    assert!(
        drain(app.control.handoff.as_ref()).await.is_empty(),
        "no hand-off for failed jobs"
    );
    app.shutdown().await;
}

/// Fan-out: each account got one copy from outside (the seed), the rest from
/// replicas inside the account; nothing else is in the destination containers.
async fn assert_fanned_out(app: &TestApp, env: &TestEnv, doc: &vhd_replicator::state::JobDocument) {
    // Fan-out: each account got one copy from outside (the seed); the rest were
    // copied from replicas inside the account.
    let mut outside = BTreeMap::new();
    for r in &doc.replicas {
        let props = app.control.store.properties(&r.blob).await.unwrap();
        let from = props
            .copy
            .and_then(|c| c.source)
            .expect("copy source recorded");
        assert!(
            !from.contains("sig=") || from.contains("sig=REDACTED"),
            "{from}"
        );
        let from_account = from
            .trim_start_matches(BLOB)
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        if from_account != r.account {
            *outside.entry(r.account.clone()).or_insert(0) += 1;
        }
    }
    assert_eq!(
        outside,
        BTreeMap::from([
            ("dst1".to_owned(), 1),
            ("dst2".to_owned(), 1),
            ("dst3".to_owned(), 1)
        ])
    );

    // Nothing else in the destination containers.
    for account in ["dst1", "dst2", "dst3"] {
        let mut listed = app
            .control
            .store
            .list(account, &env.container(), "")
            .await
            .unwrap();
        listed.sort();
        let mut expected: Vec<String> = doc
            .replicas
            .iter()
            .filter(|r| r.account == account)
            .map(|r| r.blob.name.clone())
            .collect();
        expected.sort();
        assert_eq!(listed, expected);
    }
}

/// The hand-off message has the CONTRACT.md shape, no SAS, and lands in the
/// configured directory too.
async fn assert_handed_off(
    app: &TestApp,
    env: &TestEnv,
    doc: &vhd_replicator::state::JobDocument,
    source: &str,
) {
    let job_id = doc.job_id.as_str();
    let snapshot = doc.source_snapshot.clone().expect("snapshot recorded");
    // The hand-off message.
    let messages = drain(app.control.handoff.as_ref()).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    let text = &messages[0];
    assert!(!text.contains("sig="), "no SAS in the hand-off: {text}");
    let h: serde_json::Value = serde_json::from_str(text).unwrap();
    let keys: Vec<&str> = h.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 6, "{keys:?}");
    for k in [
        "job_id",
        "source",
        "source_snapshot",
        "os",
        "image_uris",
        "add_pool",
    ] {
        assert!(h.get(k).is_some(), "hand-off lacks {k}");
    }
    assert_eq!(h["job_id"], job_id);
    assert_eq!(h["source"], source);
    assert_eq!(h["source_snapshot"], snapshot.as_str());
    assert_eq!(h["os"], "windows");
    let uris: Vec<String> = doc.replicas.iter().map(|r| r.uri.clone()).collect();
    assert_eq!(h["image_uris"], serde_json::json!(uris));
    for u in &uris {
        assert!(!u.contains('?'), "URI carries a query: {u}");
        let blob: Vec<&str> = u
            .trim_start_matches(BLOB)
            .trim_start_matches('/')
            .splitn(3, '/')
            .collect();
        assert_eq!(blob[1], env.container());
    }
    let pool = &h["add_pool"];
    assert_eq!(pool["id"], format!("pool-{}", env.id));
    assert_eq!(pool["vmSize"], "STANDARD_D2_V3");
    assert_eq!(pool["targetDedicatedNodes"], 90);
    assert_eq!(
        pool["virtualMachineConfiguration"]["osDisk"]["imageUris"],
        serde_json::json!(uris)
    );
    assert_eq!(
        pool["virtualMachineConfiguration"]["osDisk"]["caching"],
        "none"
    );
    assert_eq!(
        pool["virtualMachineConfiguration"]["nodeAgentSKUId"],
        "batch.node.windows amd64"
    );
    // The same hand-off lands in the configured directory.
    let file = env
        .dir
        .path()
        .join("handoff")
        .join(format!("{job_id}.json"));
    let from_file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    assert_eq!(from_file, h);
}

/// A configuration that does not name `engine.copy_method` (so `auto`) against
/// plain Azurite, which answers Put Page From URL with 416: the first ranged
/// write into each account is refused as unsupported, the account falls back
/// to Copy Blob (no try counted), and the job completes with every replica
/// made by Copy Blob and identical to the source.
#[tokio::test]
async fn the_default_copy_method_works_against_azurite() {
    let mut env = TestEnv::new("");
    env.toml = env.toml.replace("copy_method = \"async\"\n", "");
    assert!(!env.toml.contains("copy_method"), "{}", env.toml);
    let app = TestApp::spawn(&env).await;
    assert_eq!(
        app.control.settings.engine.copy_method,
        vhd_replicator::config::CopyMethod::Auto
    );
    let source = env.source_url("default.vhd");
    let image = upload_sample(&app.control, &source, 2, 1, 3).await;
    let job_id = format!("default-{}", env.id);
    app.control
        .submit(parse_job_json(&env.job_json(&job_id, &source, "windows", 60)).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&app.control, &job_id, Duration::from_secs(60)).await;
    assert_eq!(doc.state(), JobState::Completed, "error: {:?}", doc.error);
    assert_eq!(doc.replicas.len(), 3);
    for r in &doc.replicas {
        assert_eq!(
            r.method.map(|m| m.as_str()),
            Some("async"),
            "replica {}",
            r.index
        );
        // Azurite's endpoint is path-style on a loopback address: `auto`
        // chose Copy Blob up front, without a refused Put Page From URL.
        assert_eq!(r.attempts, 1, "a ranged try was made first: {r:?}");
        assert!(read_all(&app.control, &r.blob).await == image);
    }
    app.shutdown().await;
}
