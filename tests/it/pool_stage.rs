//! The pool stage against the test kit's fake Batch (HTTPS with the test CA,
//! bearer tokens required, bodies checked against Batch 2025-06-01, pools that
//! allocate over time) and the fake ARM: a published job creates its pool, a
//! grow job resizes it, a pool on another image is left alone.

use crate::gallery::{fake_arm, gallery_env, test_ca};
use crate::helpers::*;
use std::{sync::Arc, time::Duration};
use vhd_replicator::{
    config::{Settings, ValidatedSettings},
    job::parse_job_json,
    state::{JobDocument, JobState, PoolAction, PoolStageState},
    testkit::fake_batch::{BatchFault, FakeBatch, FakeBatchConfig},
};

pub(crate) const BATCH_TOKEN: &str = "batch-test-token";

pub(crate) async fn fake_batch(nodes_per_second: f64, quota: Option<u32>) -> FakeBatch {
    let ca = test_ca();
    FakeBatch::start(FakeBatchConfig {
        token: BATCH_TOKEN.into(),
        tls: Some((ca.join("tls.pem"), ca.join("tls.key"))),
        nodes_per_second,
        quota,
    })
    .await
    .expect("the fake Batch starts")
}

/// `[pool_stage]` for the fake, with `extra` keys.
pub(crate) fn stage_toml(batch: &FakeBatch, extra: &str) -> String {
    format!(
        "\n[pool_stage]\nbatch_url = \"{}\"\ncredential = \"azure_cli\"\nca_file = \"{}\"\n{extra}",
        batch.endpoint(),
        test_ca().join("ca.pem").display()
    )
}

/// A gallery environment whose jobs also go through the pool stage.
async fn stage_env(
    batch: &FakeBatch,
    extra: &str,
) -> (
    TestEnv,
    ValidatedSettings,
    vhd_replicator::testkit::fake_arm::FakeArm,
) {
    let arm = fake_arm(2).await;
    let (mut env, gallery_settings) = gallery_env(&arm);
    env.toml.push_str(&stage_toml(batch, extra));
    let mut settings = Settings::from_toml(&env.toml)
        .expect("stage config parses")
        .validate(&Keys(keys()))
        .expect("stage config validates");
    settings.gallery = gallery_settings.gallery;
    settings.pool_stage.as_mut().expect("configured").credential = Arc::new(ScopedToken {
        scope: "https://batch.core.windows.net/.default",
        token: BATCH_TOKEN,
    });
    (env, settings, arm)
}

/// Submits a Windows job of `nodes` nodes for the environment's pool.
async fn submit(
    control: &vhd_replicator::control::Control,
    env: &TestEnv,
    id: &str,
    source: &str,
    nodes: u32,
) {
    control
        .submit(parse_job_json(&env.job_json(id, source, "windows", nodes)).unwrap())
        .await
        .unwrap();
}

async fn run_job(app: &TestApp, env: &TestEnv, id: &str, source: &str, nodes: u32) -> JobDocument {
    submit(&app.control, env, id, source, nodes).await;
    wait_for_end(&app.control, id, Duration::from_secs(120)).await
}

fn pool_id(env: &TestEnv) -> String {
    format!("pool-{}", env.id)
}

/// A published 200-node job creates its pool (the template's network and
/// task slots merged under the hand-off's body, Batch's 429 retried) and ends
/// with the pool steady at 200 nodes, in phase `pool_stage`; a second job for
/// 300 nodes resizes the same pool (asked again after Batch's 409 for a pool
/// still resizing) without a second create. Every request carried the token
/// and a body Batch 2025-06-01 accepts.
#[tokio::test]
async fn a_published_job_creates_its_pool_and_a_grow_job_resizes_it() {
    let batch = fake_batch(400.0, None).await;
    let template = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        template.path(),
        r#"{"taskSlotsPerNode": 4, "networkConfiguration": {"subnetId": "/subscriptions/s/resourceGroups/n/providers/Microsoft.Network/virtualNetworks/v/subnets/batch"}}"#,
    )
    .unwrap();
    let (env, settings, _arm) = stage_env(
        &batch,
        &format!("template = \"{}\"\n", template.path().display()),
    )
    .await;
    let app = TestApp::spawn_with(settings).await;
    let source = env.source_url("stage.vhd");
    upload_sample(&app.control, &source, 2, 1, 61).await;
    batch.fault(BatchFault {
        method: Some("POST"),
        path_contains: "/pools".into(),
        status: 429,
        code: "TooManyRequests".into(),
        retry_after: Some(1),
    });
    let started = std::time::Instant::now();
    let doc = run_job(&app, &env, &format!("stage-a-{}", env.id), &source, 200).await;
    let took = started.elapsed();
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    let stage = doc.pool_stage.clone().expect("the stage ran");
    assert_eq!(
        (
            stage.action,
            stage.state,
            stage.target_nodes,
            stage.current_nodes
        ),
        (PoolAction::Create, PoolStageState::Steady, 200, 200),
        "{stage:?}"
    );
    let pool = batch.pool(&pool_id(&env)).expect("created");
    assert_eq!(pool["allocationState"], "steady");
    assert_eq!(pool["taskSlotsPerNode"], 4, "the template's properties");
    assert!(pool["networkConfiguration"]["subnetId"].is_string());
    let version = doc.gallery.as_ref().unwrap().version_id.clone();
    assert_eq!(
        pool["virtualMachineConfiguration"]["imageReference"]["virtualMachineImageId"],
        version.as_str()
    );
    println!("submission to a steady 200-node pool: {took:?}");

    // Grow: the first resize meets the 409 of a pool still resizing.
    batch.fault(BatchFault {
        method: Some("POST"),
        path_contains: "/resize".into(),
        status: 409,
        code: "PoolBeingResized".into(),
        retry_after: None,
    });
    let doc = run_job(&app, &env, &format!("stage-b-{}", env.id), &source, 300).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    let stage = doc.pool_stage.clone().expect("the stage ran");
    assert_eq!(
        (stage.action, stage.state, stage.current_nodes),
        (PoolAction::Resize, PoolStageState::Steady, 300),
        "{stage:?}"
    );
    let requests = batch.requests();
    assert!(
        requests.iter().all(|r| r.authorized),
        "every request carried the token"
    );
    assert!(
        requests.iter().all(|r| r.status != 400),
        "every body was accepted: {requests:?}"
    );
    for r in &requests {
        println!("batch request: {} {} -> {}", r.method, r.path, r.status);
    }
    assert_eq!(batch.count("POST", "/pools"), 1, "one create");
    assert_eq!(batch.count("POST", "/resize"), 1, "one resize");
    assert!(
        requests
            .iter()
            .any(|r| r.path.ends_with("/resize") && r.status == 409),
        "the resize met the pool still resizing and waited"
    );
    operators_see_the_pool(&app, &env).await;
    app.shutdown().await;
}

/// The grown pool as operators see it: the gauge, the pool's view and page,
/// and the grow job's page.
async fn operators_see_the_pool(app: &TestApp, env: &TestEnv) {
    let text = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("vhdrep_pool_current_nodes{{pool=\"{}\"}} 300", pool_id(env));
    assert!(text.contains(&series), "{series} in /metrics");
    // Operators see it: the pool's view and page, and the job's page.
    let view: serde_json::Value = reqwest::get(app.url(&format!("/v1/pools/{}", pool_id(env))))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["nodes"]["target_nodes"], 300, "{view}");
    assert_eq!(
        view["nodes"]["image_capacity_nodes"], 300,
        "6 replicas x 50: {view}"
    );
    let page = reqwest::get(app.url("/pools"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("nodes: target 300, current 300, image capacity 300"),
        "{page}"
    );
    let page = reqwest::get(app.url(&format!("/jobs/stage-b-{}", env.id)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("pool stage: resize to 300 nodes, steady, 300 of 300 nodes"),
        "{page}"
    );
}

/// A pool that boots another image is never touched: the job completes, its
/// `pool_stage` says why it was skipped, and Batch saw only reads.
#[tokio::test]
async fn a_pool_on_another_image_is_left_alone() {
    let batch = fake_batch(400.0, None).await;
    let (env, settings, _arm) = stage_env(&batch, "").await;
    let other = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/images/providers/Microsoft.Compute/galleries/other/images/x/versions/1.0.0";
    batch.put_pool(serde_json::json!({
        "id": pool_id(&env), "vmSize": "STANDARD_D2_V3", "targetDedicatedNodes": 10,
        "virtualMachineConfiguration": {"imageReference": {"virtualMachineImageId": other}, "nodeAgentSKUId": "batch.node.windows amd64"}
    }));
    let app = TestApp::spawn_with(settings).await;
    let source = env.source_url("other.vhd");
    upload_sample(&app.control, &source, 2, 1, 62).await;
    let doc = run_job(&app, &env, &format!("stage-o-{}", env.id), &source, 100).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    let stage = doc.pool_stage.clone().expect("the stage ran");
    assert_eq!(stage.state, PoolStageState::Skipped);
    assert!(
        stage.reason.as_deref().unwrap_or_default().contains(other),
        "{stage:?}"
    );
    assert!(batch.requests().iter().all(|r| r.method == "GET"));
    assert_eq!(
        batch.pool(&pool_id(&env)).unwrap()["targetDedicatedNodes"],
        10
    );
    app.shutdown().await;
}

/// Waits for the job's document to satisfy `done`, or fails with `log`.
async fn wait_doc(
    control: &vhd_replicator::control::Control,
    id: &str,
    within: Duration,
    log: impl Fn() -> String,
    done: impl Fn(&JobDocument) -> bool,
) -> JobDocument {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some((d, _)) = control.state.load(id).await.unwrap() {
            if done(&d) {
                return d;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id}; log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// SIGKILL while the pool resizes: daemon processes (tokens from a stand-in
/// `az`) create the pool with one job, then a grow job resizes it and the
/// daemon is killed while the pool allocates; a new daemon resumes the job
/// after the lease and follows the same resize to a steady pool. Batch saw
/// exactly one create and one resize.
#[tokio::test]
async fn sigkill_during_the_resize_resumes_without_a_second_request() {
    let batch = fake_batch(15.0, None).await;
    let (env, settings, _arm) = stage_env(&batch, "").await;
    let control = vhd_replicator::control::Control::azure(
        Arc::new(settings),
        vhd_replicator::metrics::Metrics::new(),
    )
    .unwrap();
    control.ensure().await.unwrap();
    let config = env.dir.path().join("stage.toml");
    std::fs::write(&config, merge_toml(&env.toml, crate::crash::FAST)).unwrap();
    let path = crate::gallery::fake_az(env.dir.path());
    let source = env.source_url("kill.vhd");
    upload_sample(&control, &source, 2, 1, 63).await;
    let first = crate::crash::Daemon::start(
        &config,
        env.dir.path().join("first.log"),
        &[("PATH", &path)],
    );
    let create = format!("kc-{}", env.id);
    submit(&control, &env, &create, &source, 60).await;
    let d = wait_doc(
        &control,
        &create,
        Duration::from_secs(90),
        || first.log(),
        |d| d.state().is_terminal(),
    )
    .await;
    assert_eq!(
        d.state(),
        JobState::Completed,
        "{:?}\n{}",
        d.error,
        first.log()
    );
    let grow = format!("kg-{}", env.id);
    submit(&control, &env, &grow, &source, 150).await;
    let d = wait_doc(
        &control,
        &grow,
        Duration::from_secs(90),
        || first.log(),
        |d| {
            d.pool_stage
                .as_ref()
                .is_some_and(|s| s.requested && s.state == PoolStageState::Resizing)
        },
    )
    .await;
    first.kill9();
    let at_kill = d.pool_stage.clone().unwrap();
    assert!(
        at_kill.current_nodes < 150,
        "killed while allocating: {at_kill:?}"
    );
    let second = crate::crash::Daemon::start(
        &config,
        env.dir.path().join("second.log"),
        &[("PATH", &path)],
    );
    let d = wait_doc(
        &control,
        &grow,
        Duration::from_secs(90),
        || second.log(),
        |d| d.state().is_terminal(),
    )
    .await;
    assert_eq!(
        d.state(),
        JobState::Completed,
        "{:?}\n{}",
        d.error,
        second.log()
    );
    let stage = d.pool_stage.unwrap();
    assert_eq!(
        (stage.action, stage.state, stage.current_nodes),
        (PoolAction::Resize, PoolStageState::Steady, 150),
        "{stage:?}"
    );
    assert_eq!(batch.count("POST", "/pools"), 1, "exactly one create");
    assert_eq!(batch.count("POST", "/resize"), 1, "exactly one resize");
    assert!(batch.requests().iter().all(|r| r.authorized));
    drop(second);
}

/// The jobs background scaling submitted.
async fn watch_jobs(app: &TestApp) -> Vec<vhd_replicator::state::JobSummary> {
    app.control
        .state
        .list()
        .await
        .unwrap()
        .jobs
        .into_iter()
        .filter(|j| j.job_id.starts_with("watch-"))
        .collect()
}

/// Background scaling across two instances: a 50-node pool's image serves
/// 150 nodes (3 gallery replicas x 50); its target is raised to 400 as an
/// operator or a formula would. Both instances watch (every second); one grow
/// job for 500 nodes (400 x 1.25) is submitted by itself, marked `watch`, it
/// raises the version to 10 replicas (capacity 500), and the pool itself is
/// never resized. No second job follows once the capacity is there.
#[tokio::test]
async fn a_watched_pool_gets_one_grow_job_from_two_instances() {
    let batch = fake_batch(400.0, None).await;
    let (env, settings, arm) = stage_env(&batch, "watch_seconds = 1\n").await;
    let first = TestApp::spawn_with(settings.clone()).await;
    let source = env.source_url("watch.vhd");
    upload_sample(&first.control, &source, 2, 1, 64).await;
    let doc = run_job(&first, &env, &format!("w0-{}", env.id), &source, 50).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    let version = doc.gallery.clone().unwrap().version_id;
    let second = TestApp::spawn_with(settings).await;
    let capacity = format!(
        "vhdrep_pool_image_capacity_nodes{{pool=\"{}\"}} 150",
        pool_id(&env)
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut text = String::new();
        for app in [&first, &second] {
            text.push_str(
                &reqwest::get(app.url("/metrics"))
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap(),
            );
        }
        if text.contains(&capacity) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch never measured the pool"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    batch.set_target(&pool_id(&env), 400);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let grown = loop {
        let watch_jobs = watch_jobs(&first).await;
        if let Some(j) = watch_jobs.iter().find(|j| j.state.is_terminal()) {
            break j.job_id.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no grow job ended: {watch_jobs:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (doc, _) = first.control.state.load(&grown).await.unwrap().unwrap();
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    let spec = doc.spec().unwrap();
    assert_eq!(spec.submitted_by.as_deref(), Some("watch"));
    assert_eq!(spec.pool.nodes, 500);
    assert_eq!(doc.gallery.as_ref().unwrap().replicas, 10);
    assert_eq!(
        doc.gallery.as_ref().unwrap().version_id,
        version,
        "the same version, more replicas"
    );
    let stage = doc.pool_stage.unwrap();
    assert_eq!(stage.state, PoolStageState::Skipped, "{stage:?}");
    // A few more rounds of both instances: capacity 500 serves 400 with the
    // headroom, so nothing more is submitted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        watch_jobs(&first).await.len(),
        1,
        "one grow job from two watching instances"
    );
    assert_eq!(
        batch.count("POST", "/resize"),
        0,
        "the pool was never resized"
    );
    assert_eq!(
        batch.pool(&pool_id(&env)).unwrap()["targetDedicatedNodes"],
        400
    );
    let regions =
        &arm.resource(&version).unwrap()["properties"]["publishingProfile"]["targetRegions"];
    assert_eq!(regions[0]["regionalReplicaCount"], 10, "{regions}");
    first.shutdown().await;
    second.shutdown().await;
}

/// A pool that runs into the account's quota: the stage follows it to steady
/// short of its target and records Batch's resize error in its own words;
/// the job completes (its image is there) with the stage `failed`, and the
/// pools page shows the last resize error. Retiring the pool removes the
/// observation, never the Batch pool.
#[tokio::test]
async fn a_quota_shortfall_is_recorded_in_batchs_words() {
    let batch = fake_batch(400.0, Some(30)).await;
    let (env, settings, _arm) = stage_env(&batch, "").await;
    let app = TestApp::spawn_with(settings).await;
    let source = env.source_url("quota.vhd");
    upload_sample(&app.control, &source, 2, 1, 65).await;
    let doc = run_job(&app, &env, &format!("stage-q-{}", env.id), &source, 50).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    let stage = doc.pool_stage.unwrap();
    assert_eq!(
        (stage.state, stage.current_nodes, stage.target_nodes),
        (PoolStageState::Failed, 30, 50),
        "{stage:?}"
    );
    assert!(
        stage
            .errors
            .iter()
            .any(|e| e.starts_with("AccountCoreQuotaReached: ")),
        "{stage:?}"
    );
    let page = reqwest::get(app.url("/pools"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("last resize error: AccountCoreQuotaReached"),
        "{page}"
    );
    // Retiring the pool forgets the observation with the record (the Batch
    // pool itself is never deleted).
    assert!(app
        .control
        .state
        .pool_nodes(&pool_id(&env))
        .await
        .unwrap()
        .is_some());
    let r = app
        .control
        .submit_retire(&pool_id(&env), None)
        .await
        .unwrap();
    let d = wait_for_end(&app.control, &r.job_id, Duration::from_secs(60)).await;
    assert_eq!(d.state(), JobState::Completed, "{:?}", d.error);
    assert!(app
        .control
        .state
        .pool_nodes(&pool_id(&env))
        .await
        .unwrap()
        .is_none());
    assert!(
        batch.pool(&pool_id(&env)).is_some(),
        "the stage never deletes a pool"
    );
    app.shutdown().await;
}

/// A job that does not publish hands off the legacy add_pool (VHD URIs), which
/// Batch refuses since 2026-03-31: the stage skips it with that reason and
/// asks Batch nothing.
#[tokio::test]
async fn a_legacy_add_pool_hand_off_is_skipped_with_the_reason() {
    let batch = fake_batch(400.0, None).await;
    let (env, settings, _arm) = stage_env(&batch, "").await;
    let app = TestApp::spawn_with(settings).await;
    let source = env.source_url("legacy.vhd");
    upload_sample(&app.control, &source, 2, 1, 66).await;
    let id = format!("stage-l-{}", env.id);
    let mut job: serde_json::Value =
        serde_json::from_str(&env.job_json(&id, &source, "windows", 20)).unwrap();
    job["gallery"] = serde_json::json!(false);
    app.control
        .submit(parse_job_json(&job.to_string()).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&app.control, &id, Duration::from_secs(60)).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    let stage = doc.pool_stage.unwrap();
    assert_eq!(
        (stage.action, stage.state),
        (PoolAction::None, PoolStageState::Skipped)
    );
    assert!(
        stage
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("add_pool"),
        "{stage:?}"
    );
    assert!(batch.requests().is_empty(), "{:?}", batch.requests());
    app.shutdown().await;
}
