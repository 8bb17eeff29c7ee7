use crate::helpers::*;
use std::time::Duration;
use vhd_replicator::{intake::PoisonMessage, job::parse_job_json, state::JobState};

/// Malformed messages land in the poison queue with their reason, while the daemon
/// keeps serving and a later good job completes.
#[tokio::test]
async fn malformed_messages_are_poisoned_and_the_daemon_keeps_serving() {
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    let bad_id = format!("bad-{}", env.id);
    app.control.intake.send("this is not json").await.unwrap();
    app.control.intake.send("[1, 2, 3]").await.unwrap();
    let missing_nodes = serde_json::json!({"job_id": bad_id, "source": env.source_url("x.vhd"), "pool": {"id": "p", "os": "windows"}}).to_string();
    app.control.intake.send(&missing_nodes).await.unwrap();
    let bad_os = serde_json::json!({"source": env.source_url("x.vhd"), "pool": {"id": "p", "os": "beos", "nodes": 3}}).to_string();
    app.control.intake.send(&bad_os).await.unwrap();

    let source = env.source_url("good.vhd");
    upload_sample(&app.control, &source, 2, 1, 3).await;
    let good = format!("good-{}", env.id);
    app.control
        .submit(parse_job_json(&env.job_json(&good, &source, "linux", 1)).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&app.control, &good, Duration::from_secs(60)).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);

    let poisoned: Vec<PoisonMessage> = drain(app.control.poison.as_ref())
        .await
        .iter()
        .map(|t| serde_json::from_str(t).expect("poison wrapper is JSON"))
        .collect();
    assert_eq!(poisoned.len(), 4, "{poisoned:?}");
    let reason_of = |original: &str| {
        poisoned
            .iter()
            .find(|p| p.original == original)
            .unwrap_or_else(|| panic!("{original} not poisoned"))
            .reason
            .clone()
    };
    assert!(reason_of("this is not json").contains("neither JSON nor base64"));
    assert!(reason_of("[1, 2, 3]").contains("JSON object"));
    let r = reason_of(&missing_nodes);
    assert!(r.contains("pool") && r.contains("nodes"), "{r}");
    assert!(
        reason_of(&bad_os).starts_with("pool.os"),
        "{}",
        reason_of(&bad_os)
    );
    assert!(poisoned.iter().all(|p| p.dequeue_count == 1));
    // The job with an id is failed with the same reason, so `status` explains it.
    let (failed, _) = app
        .control
        .state
        .load(&bad_id)
        .await
        .unwrap()
        .expect("failed job recorded");
    assert_eq!(failed.state(), JobState::Failed);
    assert!(failed.error.unwrap().contains("nodes"));
    // Nothing is left on the intake queue.
    assert!(drain(app.control.intake.as_ref()).await.is_empty());

    let health = reqwest::get(app.url("/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    metrics_showing(&app, &["vhdrep_queue_poisoned_total 4"]).await;
    app.shutdown().await;
}

/// A message taken more often than `max_dequeue_count` is poisoned with the count.
#[tokio::test]
async fn a_message_seen_too_often_is_poisoned() {
    let env = TestEnv::new("");
    let control = env.control().await;
    let source = env.source_url("often.vhd");
    upload_sample(&control, &source, 2, 1, 4).await;
    let id = format!("often-{}", env.id);
    control
        .intake
        .send(&env.job_json(&id, &source, "linux", 1))
        .await
        .unwrap();
    // Take it (and let it go) as many times as allowed, as crashed workers would.
    for _ in 0..5 {
        let m = control
            .intake
            .receive(1, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(m.len(), 1);
        control
            .intake
            .renew(&m[0].id, &m[0].pop_receipt, Duration::from_secs(0))
            .await
            .unwrap();
    }
    let app = TestApp::spawn(&env).await;
    let doc = wait_for_end(&app.control, &id, Duration::from_secs(30)).await;
    assert_eq!(doc.state(), JobState::Failed);
    assert!(
        doc.error.as_deref().unwrap().contains("taken 6 times"),
        "{:?}",
        doc.error
    );
    let poisoned = drain(app.control.poison.as_ref()).await;
    assert_eq!(poisoned.len(), 1);
    let p: PoisonMessage = serde_json::from_str(&poisoned[0]).unwrap();
    assert_eq!(p.dequeue_count, 6);
    assert_eq!(p.job_id.as_deref(), Some(id.as_str()));
    app.shutdown().await;
}
