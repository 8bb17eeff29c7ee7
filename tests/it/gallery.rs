//! Publishing to an Azure Compute Gallery: Azurite for the blobs, queues and
//! state, and the test kit's fake Azure Resource Manager (HTTPS with the test
//! CA, bearer tokens required, long-running operations as ARM documents them)
//! for the gallery, since ARM has no emulator.

use crate::helpers::*;
use serde_json::Value;
use std::{path::Path, sync::Arc, time::Duration};
use vhd_replicator::{
    config::{Settings, ValidatedSettings},
    job::parse_job_json,
    state::{JobDocument, JobState},
    testkit::fake_arm::{ArmFault, FakeArm, FakeArmConfig},
};

pub(crate) const TOKEN: &str = "arm-test-token";

pub(crate) fn test_ca() -> std::path::PathBuf {
    let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join(".azurite");
    assert!(
        ca.join("ca.pem").exists(),
        "scripts/azurite.sh makes the test CA"
    );
    ca
}

pub(crate) async fn fake_arm(polls: u32) -> FakeArm {
    let ca = test_ca();
    FakeArm::start(FakeArmConfig {
        token: TOKEN.into(),
        tls: Some((ca.join("tls.pem"), ca.join("tls.key"))),
        polls,
        retry_after: 0,
    })
    .await
    .expect("the fake ARM starts")
}

/// The PUT that ARM throttled (429 with `Retry-After: secs`) was asked again
/// no sooner than `secs` later, measured at the fake.
fn assert_retry_waited(requests: &[vhd_replicator::testkit::fake_arm::ArmRequest], secs: u64) {
    let throttled = requests
        .iter()
        .position(|r| r.method == "PUT" && r.status == 429)
        .expect("the version PUT was throttled");
    let retry = requests[throttled + 1..]
        .iter()
        .find(|r| r.method == "PUT" && r.path == requests[throttled].path)
        .expect("and asked again");
    let waited = retry.at - requests[throttled].at;
    assert!(
        waited >= Duration::from_secs(secs),
        "the retry came {waited:?} after a 429 with Retry-After: {secs}"
    );
}

/// The version as the fake holds it (its storage profile never changes).
fn version_before_patch(arm: &FakeArm, id: &str) -> Value {
    arm.resource(id).expect("the version exists")
}

/// A test environment whose jobs publish to the fake's gallery.
pub(crate) fn gallery_env(arm: &FakeArm) -> (TestEnv, ValidatedSettings) {
    let mut env = TestEnv::new("");
    env.toml = env.toml.replace(
        "destination = true\n",
        "destination = true\nresource_group = \"storage\"\n",
    );
    env.toml.push_str(&format!(
        r#"
[gallery]
subscription = "00000000-0000-0000-0000-000000000000"
resource_group = "images"
gallery = "batchimages"
image = "img-{id}"
publisher = "contoso"
offer = "render"
sku = "win2016"
region = "local"
nodes_per_replica = 50
min_replicas = 3
arm_endpoint = "{endpoint}"
credential = "azure_cli"
ca_file = "{ca}"
"#,
        id = env.id,
        endpoint = arm.endpoint(),
        ca = test_ca().join("ca.pem").display(),
    ));
    let mut settings = Settings::from_toml(&env.toml)
        .expect("gallery config parses")
        .validate(&Keys(keys()))
        .expect("gallery config validates");
    settings.gallery.as_mut().expect("configured").credential = Arc::new(ScopedToken {
        scope: "https://management.azure.com/.default",
        token: TOKEN,
    });
    (env, settings)
}

fn image_path(env: &TestEnv) -> String {
    format!("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/images/providers/Microsoft.Compute/galleries/batchimages/images/img-{}", env.id)
}

async fn submit(app: &TestApp, env: &TestEnv, job_id: &str, source: &str, nodes: u32) {
    app.control
        .submit(parse_job_json(&env.job_json(job_id, source, "windows", nodes)).unwrap())
        .await
        .unwrap();
}

/// Waits for the job's end, noting every replication progress, gallery metric
/// and status-page gallery line seen on the way.
async fn watch(app: &TestApp, id: &str) -> (JobDocument, Vec<f64>, Vec<String>, Vec<String>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let (mut progress, mut metric, mut page) = (Vec::new(), Vec::new(), Vec::new());
    let series = format!("vhdrep_gallery_replication_ratio{{job_id=\"{id}\"}}");
    loop {
        if let Some((d, _)) = app.control.state.load(id).await.unwrap() {
            if let Some(g) = &d.gallery {
                progress.push(g.progress);
            }
            if d.state().is_terminal() {
                return (d, progress, metric, page);
            }
        }
        let text = reqwest::get(app.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric.extend(
            text.lines()
                .filter(|l| l.starts_with(&series))
                .map(str::to_owned),
        );
        let html = reqwest::get(app.url(&format!("/jobs/{id}")))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        page.extend(
            html.split("<p class=\"gallery\">")
                .skip(1)
                .filter_map(|p| p.split_once("</p>").map(|(p, _)| p.to_owned())),
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} did not end"
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

fn version_puts(arm: &FakeArm) -> Vec<vhd_replicator::testkit::fake_arm::ArmRequest> {
    arm.requests()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/versions/") && r.status == 201)
        .collect()
}

/// A 200-node Windows job stages one VHD, creates the image definition (V1,
/// Standard security) and one version from the staged VHD with ceil(200/50) = 4
/// replicas, meets a 429 with Retry-After and a 409 on the way and retries
/// them, shows replication progress in its document and on /metrics, and
/// hands off the 2025-06-01 pool-create body naming the version (no legacy
/// add-pool body). Every ARM request carried the token.
#[tokio::test]
async fn a_job_publishes_a_gallery_version_and_hands_off_pool_create() {
    let arm = fake_arm(8).await;
    let (env, settings) = gallery_env(&arm);
    arm.fault(ArmFault {
        method: Some("PUT"),
        path_contains: "/versions/".into(),
        status: 429,
        code: "TooManyRequests".into(),
        // Longer than any backoff of the first retry (200 ms at most).
        retry_after: Some(2),
    });
    arm.fault(ArmFault {
        method: Some("GET"),
        path_contains: "/operations/".into(),
        status: 409,
        code: "Conflict".into(),
        retry_after: None,
    });
    let app = TestApp::spawn_with(settings).await;
    let source = env.source_url("gallery.vhd");
    let image = upload_sample(&app.control, &source, 2, 1, 81).await;
    let job_id = format!("gal-{}", env.id);
    submit(&app, &env, &job_id, &source, 200).await;
    let (doc, progress, metric, page) = watch(&app, &job_id).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    assert_eq!(doc.replicas.len(), 1, "one staged VHD");
    assert_eq!(read_all(&app.control, &doc.replicas[0].blob).await, image);
    let g = doc.gallery.clone().expect("published");
    assert_eq!(
        (g.state.as_str(), g.replicas, g.progress),
        ("succeeded", 4, 1.0)
    );
    assert!(
        progress.iter().any(|p| *p > 0.0 && *p < 1.0),
        "replication progress seen on the way: {progress:?}"
    );
    assert!(
        !metric.is_empty(),
        "vhdrep_gallery_replication_ratio exported while publishing"
    );
    assert!(
        page.iter()
            .any(|l| l.contains("replication") && l.contains("class=\"bar\"")),
        "the status page shows the replication: {page:?}"
    );

    let definition = arm.resource(&image_path(&env)).expect("definition created");
    assert_eq!(definition["properties"]["hyperVGeneration"], "V1");
    assert_eq!(definition["properties"]["features"][0]["value"], "Standard");
    let version = arm.resource(&g.version_id).expect("version created");
    assert_eq!(version["properties"]["provisioningState"], "Succeeded");
    assert_eq!(
        version["properties"]["storageProfile"]["osDiskImage"]["source"]["uri"],
        doc.replicas[0].uri
    );
    assert_eq!(
        version["properties"]["storageProfile"]["osDiskImage"]["source"]["storageAccountId"],
        format!("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/storage/providers/Microsoft.Storage/storageAccounts/{}", doc.replicas[0].account)
    );
    assert_eq!(version["tags"]["vhdrep-job"], job_id.as_str());
    let requests = arm.requests();
    assert!(
        requests.iter().all(|r| r.authorized),
        "every ARM request carried the token"
    );
    assert!(requests.iter().any(|r| r.status == 429) && requests.iter().any(|r| r.status == 409));
    assert_retry_waited(&requests, 2);
    assert_eq!(
        version_puts(&arm).len(),
        1,
        "one version, asked for once after the 429"
    );

    let handoff: Vec<Value> = drain(app.control.handoff.as_ref())
        .await
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect();
    assert_eq!(handoff.len(), 1);
    let h = &handoff[0];
    assert!(h.get("add_pool").is_none(), "{h}");
    assert_eq!(h["gallery_image_version_id"], g.version_id.as_str());
    assert_eq!(h["gallery_replicas"], 4);
    assert_eq!(
        h["pool_create"]["virtualMachineConfiguration"]["imageReference"]["virtualMachineImageId"],
        g.version_id.as_str()
    );
    assert_eq!(h["pool_create"]["targetDedicatedNodes"], 200);
    assert_eq!(h["pool_create"]["resizeTimeout"], "PT15M");
    let view: Value = reqwest::get(app.url(&format!("/v1/jobs/{job_id}")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["gallery"]["replication_progress"], 1.0);
    app.shutdown().await;
}

/// Growing the pool from 200 to 600 nodes with the same source changes the
/// version's replica count (to 12) and copies nothing: no second version, no
/// new VHD, the same staged blob.
#[tokio::test]
async fn growing_a_published_pool_changes_the_replica_count_only() {
    let arm = fake_arm(2).await;
    let (env, settings) = gallery_env(&arm);
    let app = TestApp::spawn_with(settings).await;
    let source = env.source_url("grow.vhd");
    upload_sample(&app.control, &source, 2, 1, 82).await;
    let first = format!("grow1-{}", env.id);
    submit(&app, &env, &first, &source, 200).await;
    let d1 = wait_for_end(&app.control, &first, Duration::from_secs(60)).await;
    assert_eq!(d1.state(), JobState::Completed, "{:?}", d1.error);
    let second = format!("grow2-{}", env.id);
    submit(&app, &env, &second, &source, 600).await;
    let d2 = wait_for_end(&app.control, &second, Duration::from_secs(60)).await;
    assert_eq!(d2.state(), JobState::Completed, "{:?}", d2.error);
    let (g1, g2) = (d1.gallery.unwrap(), d2.gallery.unwrap());
    assert_eq!(g1.version, g2.version, "the same version");
    assert_eq!((g1.replicas, g2.replicas), (4, 12));
    assert_eq!(version_puts(&arm).len(), 1, "no second version");
    let patches: Vec<_> = arm
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    // Raised in steps, doubling: 4 -> 8 -> 12 (large counts at once throttle
    // replication).
    let steps: Vec<_> = patches
        .iter()
        .map(|p| {
            p.body["properties"]["publishingProfile"]["targetRegions"][0]["regionalReplicaCount"]
                .clone()
        })
        .collect();
    assert_eq!(steps, [8, 12], "{steps:?}");
    assert!(
        g2.history.iter().any(|h| h.contains("4 -> 8 of 12")),
        "{:?}",
        g2.history
    );
    assert_eq!(
        patches[0].body["properties"]["storageProfile"],
        version_before_patch(&arm, &g2.version_id)["properties"]["storageProfile"],
        "the update carries the version's storage profile as it is (GalleryRP 2025-03-03 requires it)"
    );
    assert_eq!(patches[0].status, 202, "the fake accepted the update body");
    assert_eq!(d2.replicas.len(), 1);
    assert_eq!(
        d2.replicas[0].blob, d1.replicas[0].blob,
        "the staged VHD is kept, nothing copied"
    );
    let version = arm.resource(&g2.version_id).unwrap();
    assert_eq!(
        version["properties"]["publishingProfile"]["targetRegions"][0]["regionalReplicaCount"],
        12
    );
    app.shutdown().await;
}

/// A daemon stopped while the version replicates leaves the version's name in
/// the job document; the daemon that resumes the job follows the same version
/// to its end and never asks for a second.
#[tokio::test]
async fn a_resumed_job_adopts_the_version_it_named() {
    let arm = fake_arm(40).await;
    let (env, settings) = gallery_env(&arm);
    let app = TestApp::spawn_with(settings.clone()).await;
    let source = env.source_url("resume.vhd");
    upload_sample(&app.control, &source, 2, 1, 83).await;
    let job_id = format!("res-{}", env.id);
    submit(&app, &env, &job_id, &source, 100).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let named = loop {
        let (d, _) = app.control.state.load(&job_id).await.unwrap().unwrap();
        if let Some(g) = d
            .gallery
            .filter(|g| g.state.as_str() == "creating" && g.progress > 0.0)
        {
            break g;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the version never started replicating"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    app.shutdown().await;
    let puts_before = version_puts(&arm).len();
    // Resume in a later second than the one the version was named in, so a
    // resumed job that ignored the recorded name would make a name of its own
    // (a new name is the second of the day): whatever the timing, only
    // following the recorded version passes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while vhd_replicator::gallery::version_name(time::OffsetDateTime::now_utc(), 0) == named.version
    {
        assert!(tokio::time::Instant::now() < deadline, "the clock moved on");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (d, _) = {
        let c = TestApp::spawn_with(settings).await;
        let d = wait_for_end(&c.control, &job_id, Duration::from_secs(90)).await;
        c.shutdown().await;
        (d, ())
    };
    assert_eq!(d.state(), JobState::Completed, "{:?}", d.error);
    let g = d.gallery.unwrap();
    assert_eq!(
        g.version, named.version,
        "the resumed job followed the version it had named"
    );
    assert_eq!(
        puts_before, 1,
        "the first daemon asked for the version once"
    );
    assert_eq!(
        version_puts(&arm).len(),
        1,
        "the resumed daemon asked for no version: it adopted the recorded one"
    );
    assert_eq!(
        arm.resources()
            .iter()
            .filter(|p| p.contains("/versions/"))
            .count(),
        1
    );
}

/// A replication that keeps failing (three times: made, updated again,
/// deleted and made again) fails the job with ARM's message and the recovery
/// steps in its history; an identity without the role is told which role to
/// assign and where.
#[tokio::test]
async fn failures_say_what_arm_said_and_what_to_do() {
    let arm = fake_arm(2).await;
    let (env, settings) = gallery_env(&arm);
    let app = TestApp::spawn_with(settings).await;
    let source = env.source_url("fail.vhd");
    upload_sample(&app.control, &source, 2, 1, 84).await;
    for _ in 0..3 {
        arm.fail_next_replication("The VHD is not a generalized OS disk.");
    }
    let failed = format!("fail-{}", env.id);
    submit(&app, &env, &failed, &source, 100).await;
    let d = wait_for_end(&app.control, &failed, Duration::from_secs(60)).await;
    assert_eq!(d.state(), JobState::Failed);
    let reason = d.error.unwrap();
    assert!(
        reason.contains("The VHD is not a generalized OS disk.") && reason.contains("3 times"),
        "{reason}"
    );

    arm.fault(ArmFault {
        method: Some("GET"),
        path_contains: "/images/".into(),
        status: 403,
        code: "AuthorizationFailed".into(),
        retry_after: None,
    });
    let denied = format!("deny-{}", env.id);
    let mut job: Value =
        serde_json::from_str(&env.job_json(&denied, &source, "windows", 100)).unwrap();
    job["pool"]["id"] = format!("other-{}", env.id).into();
    app.control
        .submit(parse_job_json(&job.to_string()).unwrap())
        .await
        .unwrap();
    let d = wait_for_end(&app.control, &denied, Duration::from_secs(60)).await;
    assert_eq!(d.state(), JobState::Failed);
    let reason = d.error.unwrap();
    assert!(
        reason.contains("Compute Gallery Artifacts Publisher"),
        "{reason}"
    );
    app.shutdown().await;
}

/// Retiring a published pool deletes its gallery version (followed to its end)
/// and its staged VHD, and leaves another pool's version and VHD, and a
/// version this deployment did not make, in place.
#[tokio::test]
async fn retire_deletes_the_pools_version_and_nothing_else() {
    let arm = fake_arm(2).await;
    let (env, settings) = gallery_env(&arm);
    let app = TestApp::spawn_with(settings).await;
    let source = env.source_url("retire.vhd");
    upload_sample(&app.control, &source, 2, 1, 85).await;
    let mut docs = Vec::new();
    for (job, pool) in [("keep", "other"), ("gone", "doomed")] {
        let job_id = format!("{job}-{}", env.id);
        let mut spec: Value =
            serde_json::from_str(&env.job_json(&job_id, &source, "windows", 100)).unwrap();
        spec["pool"]["id"] = format!("{pool}-{}", env.id).into();
        app.control
            .submit(parse_job_json(&spec.to_string()).unwrap())
            .await
            .unwrap();
        let d = wait_for_end(&app.control, &job_id, Duration::from_secs(60)).await;
        assert_eq!(d.state(), JobState::Completed, "{:?}", d.error);
        docs.push(d);
    }
    let foreign = format!("{}/versions/1.0.0", image_path(&env));
    arm.put_resource(
        &foreign,
        serde_json::json!({"properties": {"provisioningState": "Succeeded"}}),
    );
    let retire = app
        .control
        .submit_retire(&format!("doomed-{}", env.id), None)
        .await
        .unwrap();
    let r = wait_for_end(&app.control, &retire.job_id, Duration::from_secs(60)).await;
    assert_eq!(r.state(), JobState::Completed, "{:?}", r.error);
    let (kept, gone) = (&docs[0], &docs[1]);
    let (kept_v, gone_v) = (kept.gallery.clone().unwrap(), gone.gallery.clone().unwrap());
    assert_ne!(kept_v.version, gone_v.version);
    assert!(
        arm.resource(&gone_v.version_id).is_none(),
        "the retired pool's version is deleted"
    );
    assert!(
        arm.resource(&kept_v.version_id).is_some(),
        "another pool's version stays"
    );
    assert!(
        arm.resource(&foreign).is_some(),
        "a version we did not make stays"
    );
    assert!(
        app.control
            .store
            .properties(&gone.replicas[0].blob)
            .await
            .is_err(),
        "the staged VHD is deleted"
    );
    app.control
        .store
        .properties(&kept.replicas[0].blob)
        .await
        .expect("another pool's staged VHD stays");
    assert!(r.error.is_none());
    app.shutdown().await;
}

/// A stand-in `az` for the Azure CLI credential of a daemon process: it hands
/// out the fake ARM's token for the management scope and the fake Batch's for
/// the Batch scope, and nothing for any other.
pub(crate) fn fake_az(dir: &Path) -> String {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let batch = crate::pool_stage::BATCH_TOKEN;
    let script = format!(
        "#!/bin/sh\ncase \"$*\" in *\"--scope https://management.azure.com/.default\"*) t={TOKEN};; *\"--scope https://batch.core.windows.net/.default\"*) t={batch};; *) echo \"unexpected: $*\" >&2; exit 1;; esac\n\
         echo \"{{\\\"accessToken\\\":\\\"$t\\\",\\\"expires_on\\\":$(( $(date +%s) + 3600 )),\\\"tokenType\\\":\\\"Bearer\\\"}}\"\n"
    );
    let az = bin.join("az");
    std::fs::write(&az, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&az, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// SIGKILL while the version replicates: the kill lands in phase
/// `publishing` with the version named in the job document; a new daemon
/// process resumes the job after the lease, follows the same version to its
/// end and never asks for a second. The daemons get their ARM token from the
/// Azure CLI credential (a stand-in `az`).
#[tokio::test]
async fn sigkill_mid_replication_then_the_same_version_is_adopted() {
    let arm = fake_arm(30).await;
    let (env, settings) = gallery_env(&arm);
    let control = vhd_replicator::control::Control::azure(
        Arc::new(settings),
        vhd_replicator::metrics::Metrics::new(),
    )
    .unwrap();
    control.ensure().await.unwrap();
    let config = env.dir.path().join("gallery.toml");
    std::fs::write(&config, merge_toml(&env.toml, crate::crash::FAST)).unwrap();
    let path = fake_az(env.dir.path());
    let source = env.source_url("kill.vhd");
    upload_sample(&control, &source, 2, 1, 86).await;
    let job_id = format!("kill-{}", env.id);
    control
        .submit(parse_job_json(&env.job_json(&job_id, &source, "windows", 100)).unwrap())
        .await
        .unwrap();
    let first = crate::crash::Daemon::start(
        &config,
        env.dir.path().join("first.log"),
        &[("PATH", &path)],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (phase, named) = loop {
        let (d, _) = control.state.load(&job_id).await.unwrap().unwrap();
        if let Some(g) = d
            .gallery
            .clone()
            .filter(|g| g.state.as_str() == "creating" && g.progress > 0.0)
        {
            break (d.phase(), g);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never replicating; log:\n{}",
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    first.kill9();
    assert_eq!(phase, Some(vhd_replicator::state::Phase::Publishing));
    let second = crate::crash::Daemon::start(
        &config,
        env.dir.path().join("second.log"),
        &[("PATH", &path)],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let d = loop {
        let (d, _) = control.state.load(&job_id).await.unwrap().unwrap();
        if d.state().is_terminal() {
            break d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not resumed; log:\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        d.state(),
        JobState::Completed,
        "{:?}\n{}",
        d.error,
        second.log()
    );
    assert_eq!(d.gallery.unwrap().version, named.version);
    assert_eq!(version_puts(&arm).len(), 1, "never a second version");
    assert!(arm.requests().iter().all(|r| r.authorized));
    drop(second);
}

/// `validate --online`'s gallery check: a missing gallery and one in another
/// region are named with what to do; the right one is reported.
#[tokio::test]
async fn the_online_check_finds_the_gallery_and_its_region() {
    let arm = fake_arm(1).await;
    let (_env, settings) = gallery_env(&arm);
    let g = vhd_replicator::gallery::Gallery::new(
        settings.gallery.as_ref().unwrap(),
        settings.retry_policy(),
        Duration::from_secs(5),
    )
    .unwrap();
    let missing = g.check_gallery().await.unwrap_err().to_string();
    assert!(
        missing.contains("not found") && missing.contains("az sig create"),
        "{missing}"
    );
    let path = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/images/providers/Microsoft.Compute/galleries/batchimages";
    arm.put_resource(path, serde_json::json!({"location": "westeurope"}));
    let elsewhere = g.check_gallery().await.unwrap_err().to_string();
    assert!(
        elsewhere.contains("is in westeurope, not in local"),
        "{elsewhere}"
    );
    arm.put_resource(path, serde_json::json!({"location": "local"}));
    assert!(g
        .check_gallery()
        .await
        .unwrap()
        .contains("gallery batchimages in local"));
}

/// An existing image definition that cannot boot Batch nodes from this VHD (a
/// specialized OS state, or an Arm64 architecture) fails the job before any
/// copy is made, saying what is wrong and what to set.
#[tokio::test]
async fn an_unsuitable_image_definition_fails_the_job_before_any_copy() {
    let arm = fake_arm(2).await;
    let (env, settings) = gallery_env(&arm);
    let app = TestApp::spawn_with(settings).await;
    let source = env.source_url("unsuitable.vhd");
    upload_sample(&app.control, &source, 2, 1, 87).await;
    for (n, (field, value, says)) in [
        ("osState", "Specialized", "osState Specialized"),
        ("architecture", "Arm64", "architecture Arm64"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut props = serde_json::json!({
            "osType": "Windows", "osState": "Generalized", "hyperVGeneration": "V1",
            "identifier": {"publisher": "contoso", "offer": "render", "sku": "win2016"},
        });
        props[field] = value.into();
        arm.put_resource(
            &image_path(&env),
            serde_json::json!({"location": "local", "properties": props}),
        );
        let job_id = format!("unsuitable{n}-{}", env.id);
        submit(&app, &env, &job_id, &source, 100).await;
        let d = wait_for_end(&app.control, &job_id, Duration::from_secs(60)).await;
        assert_eq!(d.state(), JobState::Failed);
        let reason = d.error.unwrap_or_default();
        assert!(
            reason.contains(says) && reason.contains("gallery.image"),
            "{reason}"
        );
        assert!(
            d.replicas.is_empty(),
            "nothing was planned or copied: {:?}",
            d.replicas
        );
    }
    app.shutdown().await;
}

/// A regional replication that fails is recovered as users do it: the first
/// failure by updating the version again, a second by deleting it and making
/// it again; each step is in the job's view, and the job completes with one
/// version (asked for twice, deleted once in between).
#[tokio::test]
async fn a_failed_replication_is_recovered_and_each_step_shows() {
    let arm = fake_arm(2).await;
    let (env, settings) = gallery_env(&arm);
    let app = TestApp::spawn_with(settings).await;
    let source = env.source_url("recover.vhd");
    upload_sample(&app.control, &source, 2, 1, 88).await;
    arm.fail_next_replication("Replication to westeurope failed: internal error.");
    arm.fail_next_replication("Replication to westeurope failed: internal error.");
    let job_id = format!("recover-{}", env.id);
    submit(&app, &env, &job_id, &source, 100).await;
    let d = wait_for_end(&app.control, &job_id, Duration::from_secs(90)).await;
    assert_eq!(d.state(), JobState::Completed, "{:?}", d.error);
    let g = d.gallery.unwrap();
    assert_eq!(g.state.as_str(), "succeeded");
    let history = g.history.join("\n");
    assert!(history.contains("updating it again"), "{history}");
    assert!(
        history.contains("deleting it and making it again"),
        "{history}"
    );
    assert!(history.contains("internal error"), "{history}");
    let methods: Vec<String> = arm
        .requests()
        .iter()
        .filter(|r| r.path.contains("/versions/") && r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.status))
        .collect();
    assert_eq!(
        methods,
        ["PUT 201", "PATCH 202", "DELETE 202", "PUT 201"],
        "made, updated again, deleted, made again"
    );
    let view: Value = reqwest::get(app.url(&format!("/v1/jobs/{job_id}")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        view.to_string().contains("updating it again"),
        "the recovery shows in the job view: {view}"
    );
    app.shutdown().await;
}
