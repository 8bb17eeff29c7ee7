//! The hand-off arrives whatever its size and however its consumer reads queues.

use crate::helpers::*;
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use std::time::Duration;
use vhd_replicator::{
    handoff::{HandOff, HandOffReference, MAX_QUEUE_MESSAGE},
    job::parse_job_json,
    state::JobState,
    storage::BlobPath,
};

/// A hand-off of 600 replicas, far over a queue message's 64 KiB, arrives as a
/// small message that references the whole document in the state container;
/// that document lists every replica once per list and equals the hand-off file.
#[tokio::test]
async fn a_hand_off_of_600_replicas_arrives_by_reference() {
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    let source = env.source_url("big-handoff.vhd");
    upload_sample(&app.control, &source, 2, 1, 60).await;
    let id = format!("big-{}", env.id);
    let mut job: serde_json::Value =
        serde_json::from_str(&env.job_json(&id, &source, "windows", 12_000)).unwrap();
    job["replicas"] = 600.into();
    app.control
        .submit(parse_job_json(&job.to_string()).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&app.control, &id, Duration::from_secs(240)).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    assert_eq!(doc.replicas.len(), 600);

    let messages = drain(app.control.handoff.as_ref()).await;
    assert_eq!(messages.len(), 1);
    assert!(messages[0].len() < 2048, "{} bytes", messages[0].len());
    let reference: HandOffReference = serde_json::from_str(&messages[0]).unwrap();
    assert_eq!(reference.job_id.as_str(), id);
    assert_eq!(reference.image_count, 600);
    let blob = BlobPath::new(
        &reference.handoff_ref.account,
        &reference.handoff_ref.container,
        &reference.handoff_ref.blob,
    );
    assert_eq!(
        app.control.store.blob_url(&blob).unwrap().to_string(),
        reference.handoff_ref.uri
    );
    let whole = read_all(&app.control, &blob).await;
    assert!(whole.len() > MAX_QUEUE_MESSAGE, "{} bytes", whole.len());
    let handoff: HandOff = serde_json::from_slice(&whole).unwrap();
    assert_eq!(handoff.image_uris.len(), 600);
    let distinct: std::collections::BTreeSet<_> = handoff.image_uris.iter().collect();
    assert_eq!(distinct.len(), 600);
    assert_eq!(
        handoff
            .add_pool
            .as_ref()
            .expect("a VHD hand-off has add_pool")
            .virtual_machine_configuration
            .os_disk
            .image_uris,
        handoff.image_uris
    );
    let file: HandOff = serde_json::from_slice(
        &std::fs::read(env.dir.path().join("handoff").join(format!("{id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(file, handoff);
    app.shutdown().await;
}

/// With `handoff.queue_encoding = "base64"` (what an Azure Functions queue
/// trigger reads) the message is the base64 of the hand-off JSON.
#[tokio::test]
async fn the_hand_off_message_can_be_base64() {
    let env = TestEnv::new("[handoff]\nqueue_encoding = \"base64\"\n");
    let app = TestApp::spawn(&env).await;
    let source = env.source_url("b64.vhd");
    upload_sample(&app.control, &source, 2, 1, 61).await;
    let id = format!("b64-{}", env.id);
    app.control
        .submit(parse_job_json(&env.job_json(&id, &source, "linux", 80)).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&app.control, &id, Duration::from_secs(60)).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    let messages = drain(app.control.handoff.as_ref()).await;
    assert_eq!(messages.len(), 1);
    assert!(!messages[0].contains('{'), "not JSON text: {}", messages[0]);
    let handoff: HandOff = serde_json::from_slice(&B64.decode(&messages[0]).unwrap()).unwrap();
    assert_eq!(handoff.job_id.as_str(), id);
    assert_eq!(handoff.image_uris.len(), 2);
    assert_eq!(
        handoff
            .add_pool
            .as_ref()
            .expect("a VHD hand-off has add_pool")
            .virtual_machine_configuration
            .node_agent_sku_id,
        "batch.node.ubuntu 22.04"
    );
    app.shutdown().await;
}

/// A hand-off the queue refuses as too large (`413 RequestBodyTooLarge`) can
/// never be sent: the job fails at once with that reason instead of retrying,
/// the hand-off stays in its document for a send by hand, and the job's
/// clean-up deletes none of the replicas that hand-off and the pool's image
/// set name.
#[tokio::test]
async fn a_hand_off_refused_as_too_large_fails_the_job_and_keeps_its_replicas() {
    use vhd_replicator::testkit::proxy::{Proxy, ProxyAction, ProxyConfig, ProxyRule};
    let env = TestEnv::new("");
    let direct = env.control().await;
    let queue_proxy = Proxy::start(ProxyConfig {
        rules: vec![ProxyRule::new(
            "POST",
            &format!("/ops/it-{}-handoff/messages", env.id),
            ProxyAction::Answer(413, "RequestBodyTooLarge"),
            1_000,
        )],
        ..ProxyConfig::transparent(QUEUE)
    })
    .await
    .unwrap();
    let app = TestApp::spawn_with(env.proxied_both(BLOB, &queue_proxy.url(), "")).await;
    let source = env.source_url("refused.vhd");
    upload_sample(&direct, &source, 2, 1, 62).await;
    let id = format!("refused-{}", env.id);
    let started = tokio::time::Instant::now();
    app.control
        .submit(parse_job_json(&env.job_json(&id, &source, "windows", 60)).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&direct, &id, Duration::from_secs(60)).await;
    let error = doc.error.clone().unwrap_or_default();
    assert_eq!(doc.state(), JobState::Failed, "{error}");
    assert!(
        error.contains("413") && error.contains("send it by hand"),
        "the reason names the refusal and what to do: {error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "failed at once, not after retries: {:?}",
        started.elapsed()
    );
    let attempts = vhd_replicator::testkit::proxy::ProxyStats::get(&queue_proxy.stats.rule_hits);
    assert_eq!(attempts, 1, "a refusal as too large is not sent again");
    let handoff: HandOff = serde_json::from_value(
        doc.handoff
            .clone()
            .expect("the hand-off stays in the document"),
    )
    .unwrap();
    assert_eq!(handoff.image_uris.len(), 3);
    for uri in &handoff.image_uris {
        let blob = vhd_replicator::job::locate_source(uri, &direct.settings).unwrap();
        direct.store.properties(&blob).await.unwrap_or_else(|e| {
            panic!("the clean-up deleted {uri}, named by the recorded hand-off: {e}")
        });
    }
    app.shutdown().await;
}
