//! One run, one owner: the same job delivered several times at the same moment,
//! to one instance or to two, runs once. Queues deliver at least once, and in
//! practice duplicates come together (a client that retries a send, an operator
//! who submits twice, raw JSON and base64 of the same job), so every trial sends
//! its copies within a few milliseconds of each other, with seeded timings.

use crate::helpers::*;
use base64::Engine as _;
use rand::{Rng, SeedableRng};
use std::{collections::BTreeSet, time::Duration};
use vhd_replicator::{
    plan::{META_JOB, META_REPLICA, META_SNAPSHOT},
    state::JobState,
    storage::BlobKind,
    testkit::proxy::{Proxy, ProxyConfig},
};

/// What a trial measured, for the log and the closing note.
#[derive(Debug)]
struct Measured {
    /// Start Copy requests that reached storage, per replica blob.
    starts_per_replica: Vec<u32>,
    /// Source snapshots tagged with the job.
    snapshots: usize,
    /// Duplicate messages dropped by an instance already running the job.
    dropped_here: u64,
    /// Runs that found the job held by another run and stopped.
    runs_lost: u64,
    /// Hand-off messages.
    handoffs: usize,
    /// Time from the job's end until no delivery was left on the intake queue.
    drained_after: Duration,
}

/// Reads one counter from a daemon's own exposition.
fn counter(app: &TestApp, name: &str) -> u64 {
    app.control
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// One trial: `copies` deliveries of one job (raw JSON and base64 in turn),
/// sent at once with seeded delays of 0-20 ms, to `instances` daemons sharing
/// the queues and the state, behind a proxy that holds copies pending so that
/// the runs would overlap. The job must run once: one snapshot, one Start Copy
/// per replica, one image set; every URI of every hand-off exists afterwards
/// and is a verified replica of the job (tags, length, bytes); no message is
/// left on the intake queue.
async fn duplicate_trial(instances: usize, copies: usize, seed: u64) -> Measured {
    // With two instances, each takes one message at a time, so both hold a
    // delivery of the job (one instance alone would take every copy at once).
    let parallel = if instances > 1 { 1 } else { 4 };
    let env = TestEnv::new(&format!(
        "[engine]\nlease_seconds = 10\ncheckpoint_seconds = 1\nmax_parallel_jobs = {parallel}\n"
    ));
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        hold_copies: Some(Duration::from_millis(700)),
        seed,
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let mut apps = Vec::new();
    for _ in 0..instances {
        apps.push(TestApp::spawn_with(env.proxied(&proxy.url(), "")).await);
    }
    let image = upload_sample(&direct, &env.source_url("dup.vhd"), 2, 1, 61).await;
    let source = env.source_url("dup.vhd").replace(BLOB, &proxy.url());
    let id = format!("dup-{}", env.id);
    let pool = format!("pool-{}", env.id);
    let text = serde_json::json!({
        "job_id": id, "source": source, "replicas": 5,
        "pool": {"id": pool, "os": "windows", "nodes": 100, "vm_size": "STANDARD_D2_V3"},
        "container": env.container(),
    })
    .to_string();
    send_copies(&direct, &text, copies, seed).await;

    let done = wait_for_end(&direct, &id, Duration::from_secs(120)).await;
    let what = format!("{instances} instance(s), {copies} copies, seed {seed}");
    assert_eq!(
        done.state(),
        JobState::Completed,
        "{what}: {:?}",
        done.error
    );
    let snapshot = done.source_snapshot.clone().expect("snapshot recorded");

    // Nothing is lost or left: every delivery is consumed (the duplicates
    // dropped, or ended as already done once the other run's claim lapsed).
    let ended = tokio::time::Instant::now();
    let deadline = ended + Duration::from_secs(45);
    while direct.intake.approximate_count().await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: deliveries left on the intake queue"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained_after = ended.elapsed();

    // One run: one snapshot of the source for the job, one Start Copy per replica.
    let src =
        vhd_replicator::job::locate_source(&env.source_url("dup.vhd"), &direct.settings).unwrap();
    let snapshots = direct
        .store
        .list_detailed(&src.account, &src.container, &src.name, true)
        .await
        .unwrap()
        .into_iter()
        .filter(|b| b.snapshot.is_some() && b.metadata.get(META_JOB) == Some(&id))
        .count();
    assert_eq!(snapshots, 1, "{what}: the source was frozen once");
    let starts = replica_starts(&proxy);
    assert_eq!(starts.len(), 5, "{what}: {starts:?}");
    assert!(
        starts.values().all(|&n| n == 1),
        "{what}: every replica copied exactly once: {starts:?}"
    );
    let (record, _) = direct.state.load_pool(&pool).await.unwrap().unwrap();
    assert_eq!(record.sets.len(), 1, "{what}: one image set");
    assert_eq!(record.sets[0].replicas.len(), 5, "{what}");
    assert!(record.lock.is_none(), "{what}: the pool's lock is released");

    let handoffs = drain(direct.handoff.as_ref()).await;
    assert_handoffs_sound(&direct, &apps[0], &handoffs, &id, &snapshot, &image, &what).await;
    assert_no_relays(&direct, &env, &what).await;
    let measured = Measured {
        starts_per_replica: starts.values().copied().collect(),
        snapshots,
        dropped_here: apps
            .iter()
            .map(|a| counter(a, "vhdrep_duplicate_deliveries_total"))
            .sum(),
        runs_lost: apps
            .iter()
            .map(|a| counter(a, "vhdrep_runs_lost_total"))
            .sum(),
        handoffs: handoffs.len(),
        drained_after,
    };
    eprintln!("{what}: {measured:?}");
    for app in apps {
        app.shutdown().await;
    }
    measured
}

/// Sends `copies` deliveries of `text` (raw JSON and base64 in turn) at once,
/// each after a seeded delay of 0-20 ms.
async fn send_copies(
    control: &vhd_replicator::control::Control,
    text: &str,
    copies: usize,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sends = (0..copies).map(|i| {
        let body = if i % 2 == 0 {
            text.to_owned()
        } else {
            base64::engine::general_purpose::STANDARD.encode(text)
        };
        let delay = Duration::from_millis(rng.random_range(0..20));
        let intake = control.intake.clone();
        async move {
            tokio::time::sleep(delay).await;
            intake.send(&body).await.expect("send to the intake queue");
        }
    });
    futures::future::join_all(sends).await;
}

/// Every hand-off is of the job and names five replicas that exist and are
/// sound: page blobs of the image's length, tagged with the job and its
/// snapshot, holding the image's bytes.
async fn assert_handoffs_sound(
    direct: &vhd_replicator::control::Control,
    app: &TestApp,
    handoffs: &[String],
    id: &str,
    snapshot: &str,
    image: &[u8],
    what: &str,
) {
    assert!(!handoffs.is_empty(), "{what}: the job was handed off");
    let mut uris = BTreeSet::new();
    for h in handoffs {
        let h: serde_json::Value = serde_json::from_str(h).expect("hand-off JSON");
        assert_eq!(h["job_id"], id, "{what}");
        for u in h["image_uris"].as_array().expect("image_uris") {
            uris.insert(u.as_str().unwrap().to_owned());
        }
    }
    assert_eq!(uris.len(), 5, "{what}: {uris:?}");
    for uri in &uris {
        let blob = vhd_replicator::job::locate_source(uri, &app.control.settings)
            .expect("a hand-off URI names a configured account");
        let p = direct
            .store
            .properties(&blob)
            .await
            .unwrap_or_else(|e| panic!("{what}: handed-off {uri} is gone: {e}"));
        assert_eq!(p.kind, BlobKind::Page, "{what}: {uri}");
        assert_eq!(p.len, image.len() as u64, "{what}: {uri}");
        assert_eq!(
            p.metadata.get(META_JOB).map(String::as_str),
            Some(id),
            "{what}: {uri}"
        );
        assert_eq!(
            p.metadata.get(META_SNAPSHOT).map(String::as_str),
            Some(snapshot),
            "{what}"
        );
        assert!(p.metadata.contains_key(META_REPLICA), "{what}: {uri}");
        assert!(
            read_all(direct, &blob).await == image,
            "{what}: {uri} holds the image"
        );
    }
}

/// No run left a relay behind, in the source's container or the replicas'.
async fn assert_no_relays(direct: &vhd_replicator::control::Control, env: &TestEnv, what: &str) {
    for account in ["src", "dst1", "dst2", "dst3"] {
        for container in [env.container(), format!("it-{}-src", env.id)] {
            let relays = direct
                .store
                .list(
                    account,
                    &container,
                    vhd_replicator::engine::relay::RELAY_PREFIX,
                )
                .await
                .unwrap_or_default();
            assert!(relays.is_empty(), "{what}: relays left: {relays:?}");
        }
    }
}

/// The same job twice at the same moment to one instance, once as raw JSON
/// and once as base64 (the report that found the bug): one run, and the
/// second delivery is dropped as a duplicate of the run under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_job_twice_at_once_runs_once() {
    for seed in [1, 2] {
        let m = duplicate_trial(1, 2, seed).await;
        assert_eq!(m.handoffs, 1, "{m:?}");
        assert_eq!(
            m.dropped_here, 1,
            "the second delivery is dropped by the instance that runs the job: {m:?}"
        );
    }
}

/// Five copies of one job at once to one instance: one run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_copies_at_once_run_once() {
    let m = duplicate_trial(1, 5, 3).await;
    assert_eq!(m.dropped_here, 4, "{m:?}");
}

/// The same job to two instances at once, twice and five times, with seeded
/// timings: one run across both (the other backs off on the claim and ends
/// the delivery as already done), nothing deleted that was handed off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_to_two_instances_at_once_run_once() {
    let mut backed_off = 0;
    for (copies, seed) in [(2, 4), (5, 5), (5, 6)] {
        let m = duplicate_trial(2, copies, seed).await;
        assert_eq!(m.handoffs, 1, "one run hands off once: {m:?}");
        assert_eq!(m.snapshots, 1, "{m:?}");
        assert!(m.starts_per_replica.iter().all(|&n| n == 1), "{m:?}");
        assert_eq!(
            m.runs_lost, 0,
            "the other instance never got past the claim: {m:?}"
        );
        if m.drained_after > Duration::from_secs(2) {
            backed_off += 1;
        }
    }
    assert!(
        backed_off > 0,
        "in some trial the second instance held a delivery and backed off on the claim"
    );
}
