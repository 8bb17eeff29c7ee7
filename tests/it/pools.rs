//! Pools grow: a job for a pool that already has an image set of the unchanged
//! source adds only the missing replicas, copied from the ones it has; a changed
//! source starts a new set; accounts' capacity is respected.

use crate::helpers::*;
use std::{collections::BTreeSet, time::Duration};
use vhd_replicator::{job::parse_job_json, state::JobState};

fn job(env: &TestEnv, id: &str, source: &str, nodes: u32) -> String {
    serde_json::json!({
        "job_id": id, "source": source,
        "pool": {"id": format!("pool-{}", env.id), "os": "windows", "nodes": nodes, "vm_size": "STANDARD_D2_V3"},
        "container": env.container(),
    })
    .to_string()
}

/// 200 -> 600 Windows nodes adds exactly 20 replicas, each copied from a replica
/// the pool already had, and the hand-off lists all 30; a changed source then
/// starts a new image set.
#[tokio::test]
async fn growing_a_pool_tops_up_from_existing_replicas() {
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    let source = env.source_url("grow.vhd");
    upload_sample(&app.control, &source, 2, 1, 90).await;
    let d1 = completed(&app, &env, &format!("grow-1-{}", env.id), &source, 200).await;
    assert_eq!(d1.replicas.len(), 10);
    drain(app.control.handoff.as_ref()).await;

    let d2 = completed(&app, &env, &format!("grow-2-{}", env.id), &source, 600).await;
    assert_eq!(d2.replicas.len(), 30);
    assert_eq!(
        d2.source_snapshot, d1.source_snapshot,
        "the same snapshot: identical replicas"
    );
    assert!(
        d2.image_set.as_deref().unwrap().starts_with("top-up"),
        "{:?}",
        d2.image_set
    );
    let old: BTreeSet<_> = d1.replicas.iter().map(|r| r.blob.clone()).collect();
    let kept: BTreeSet<_> = d2
        .replicas
        .iter()
        .filter(|r| r.inherited)
        .map(|r| r.blob.clone())
        .collect();
    assert_eq!(kept, old, "the 10 existing replicas are kept");
    assert_topped_up_from_replicas(&app, &d2).await;
    let handoff: serde_json::Value =
        serde_json::from_str(&drain(app.control.handoff.as_ref()).await[0]).unwrap();
    let uris: BTreeSet<String> = handoff["image_uris"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(uris.len(), 30);
    assert_eq!(handoff["add_pool"]["targetDedicatedNodes"], 600);
    assert_eq!(
        all_blobs(&app, &env).await.len(),
        30,
        "nothing else in the destination containers"
    );
    let pool = pool_view(&app, &env).await;
    assert_eq!(pool["replicas"].as_array().unwrap().len(), 30);
    assert_eq!(pool["image_sets"].as_array().unwrap().len(), 1);

    // The pool shrinks to 100 nodes: 5 replicas handed off. The surplus 25 were
    // named by the earlier hand-off (a pool built from it may still boot from
    // them), so no job deletes them: they stay in the image set, marked surplus,
    // until the pool is retired.
    let ds = completed(&app, &env, &format!("grow-s-{}", env.id), &source, 100).await;
    assert_eq!(ds.replicas.len(), 5);
    assert!(
        ds.replicas.iter().all(|r| r.inherited),
        "nothing copied to shrink"
    );
    let after_shrink = all_blobs(&app, &env).await;
    for uri in &uris {
        let name = uri
            .rsplit_once(&format!("/{}/", env.container()))
            .unwrap()
            .1;
        assert!(
            after_shrink.iter().any(|b| b.ends_with(name)),
            "{uri}, handed off by the grow job, was deleted by the shrink"
        );
    }
    assert_eq!(after_shrink.len(), 30, "nothing deleted, nothing added");
    let handoff: serde_json::Value =
        serde_json::from_str(&drain(app.control.handoff.as_ref()).await[0]).unwrap();
    assert_eq!(handoff["image_uris"].as_array().unwrap().len(), 5);
    let pool = pool_view(&app, &env).await;
    assert_eq!(pool["replicas"].as_array().unwrap().len(), 5);
    assert_eq!(pool["surplus"].as_array().unwrap().len(), 25);

    // The source changes: a new image set, copied from the new snapshot.
    upload_sample(&app.control, &source, 2, 1, 91).await;
    let d3 = completed(&app, &env, &format!("grow-3-{}", env.id), &source, 100).await;
    assert!(
        d3.image_set.as_deref().unwrap().contains("source changed"),
        "{:?}",
        d3.image_set
    );
    assert_ne!(d3.source_snapshot, d1.source_snapshot);
    assert!(d3.replicas.iter().all(|r| !r.inherited));
    let pool = pool_view(&app, &env).await;
    assert_eq!(
        pool["image_sets"].as_array().unwrap().len(),
        2,
        "the old set stays until retired"
    );
    assert_eq!(pool["replicas"].as_array().unwrap().len(), 5);
    assert_eq!(
        reqwest::get(app.url("/v1/pools/no-such-pool"))
            .await
            .unwrap()
            .status(),
        404
    );
    app.shutdown().await;
}

/// Accounts with `max_replicas` take no more; a pool that does not fit is refused
/// with the number of accounts still needed.
#[tokio::test]
async fn capacity_is_respected_and_shortfalls_are_named() {
    let env = TestEnv::new("");
    let toml = env.toml.replace(
        "destination = true\n",
        "destination = true\nmax_replicas = 2\n",
    );
    let settings = vhd_replicator::config::Settings::from_toml(&toml)
        .unwrap()
        .validate(&Keys(keys()))
        .unwrap();
    let spec = parse_job_json(&job(&env, "too-big", &env.source_url("x.vhd"), 200)).unwrap();
    let e = spec.validate(&settings).unwrap_err();
    assert_eq!(e.field, "replicas");
    assert!(
        e.message.contains(
            "hold at most 6 more replicas but 10 are needed; add 2 more destination account"
        ),
        "{}",
        e.message
    );
    let fits = parse_job_json(&job(&env, "fits", &env.source_url("x.vhd"), 120)).unwrap();
    assert_eq!(fits.validate(&settings).unwrap().replicas, 6);
}

/// Retiring a pool deletes exactly its replicas and snapshot, nothing else in the
/// same containers: not another pool's replicas, not a foreign blob. The dry run
/// lists what would go and deletes nothing.
#[tokio::test]
async fn retire_removes_exactly_the_pools_blobs() {
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    let source = env.source_url("retire.vhd");
    upload_sample(&app.control, &source, 2, 1, 92).await;
    let mut ids = Vec::new();
    for (i, pool) in ["keep", "gone"].iter().enumerate() {
        let id = format!("ret-{i}-{}", env.id);
        let job = serde_json::json!({"job_id": id, "source": source, "pool": {"id": format!("{pool}-{}", env.id), "os": "linux", "nodes": 120, "vm_size": "STANDARD_D2_V3"}, "container": env.container()});
        app.control
            .submit(parse_job_json(&job.to_string()).unwrap())
            .await
            .unwrap();
        let d = wait_for_end(&app.control, &id, Duration::from_secs(60)).await;
        assert_eq!(d.state(), JobState::Completed, "{:?}", d.error);
        ids.push(d);
    }
    let foreign =
        vhd_replicator::storage::BlobPath::new("dst1", &env.container(), "someone-elses.vhd");
    app.control
        .store
        .put_page_blob(&foreign, bytes::Bytes::from(vec![0u8; 1024]))
        .await
        .unwrap();
    let gone_pool = format!("gone-{}", env.id);

    // Dry run through the binary: lists the 3 replicas and the snapshot, deletes nothing.
    let config = env.config_file();
    let listed = run_ok(&[
        "retire",
        "--config",
        config.to_str().unwrap(),
        "--pool",
        &gone_pool,
        "--dry-run",
    ]);
    assert!(listed.contains("would delete 4 blobs"), "{listed}");
    for r in &ids[1].replicas {
        assert!(listed.contains(&r.blob.name), "{listed}");
    }
    assert!(
        !listed.contains(&ids[0].replicas[0].blob.name),
        "another pool's replica is not listed"
    );
    let before = all_blobs(&app, &env).await;
    assert_eq!(before.len(), 3 + 3 + 1);

    // The real thing, through the HTTP API: a job like any other.
    let r = reqwest::Client::new()
        .delete(app.url(&format!("/v1/pools/{gone_pool}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job_id = r.json::<serde_json::Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let d = wait_for_end(&app.control, &job_id, Duration::from_secs(60)).await;
    assert_eq!(d.state(), JobState::Completed, "{:?}", d.error);
    assert!(
        d.image_set
            .as_deref()
            .unwrap()
            .contains("deleted 4 of 4 blobs"),
        "{:?}",
        d.image_set
    );
    let after = all_blobs(&app, &env).await;
    let expected: BTreeSet<String> = ids[0]
        .replicas
        .iter()
        .map(|r| format!("{}/{}", r.account, r.blob.name))
        .chain(["dst1/someone-elses.vhd".to_owned()])
        .collect();
    assert_eq!(after, expected, "exactly the pool's blobs went");
    assert_retired(&app, &source, &ids, &gone_pool).await;
    metrics_showing(
        &app,
        &["vhdrep_jobs_finished_total{outcome=\"completed\"} 3"],
    )
    .await;
    app.shutdown().await;
}

async fn all_blobs(app: &TestApp, env: &TestEnv) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for account in ["dst1", "dst2", "dst3"] {
        for name in app
            .control
            .store
            .list(account, &env.container(), "")
            .await
            .unwrap()
        {
            out.insert(format!("{account}/{name}"));
        }
    }
    out
}

/// Copies `from` to `to` inside one account, with `tags`.
async fn copy_inside(
    app: &TestApp,
    from: &vhd_replicator::storage::BlobPath,
    to: &vhd_replicator::storage::BlobPath,
    tags: &vhd_replicator::storage::Metadata,
) {
    let url = app
        .control
        .store
        .copy_source_url(
            from,
            &from.account,
            vhd_replicator::storage::SourceRead::CopyBlob,
            time::OffsetDateTime::now_utc() + time::Duration::hours(1),
        )
        .await
        .unwrap();
    app.control.store.start_copy(to, &url, tags).await.unwrap();
}

/// Garbage collection removes replicas, relays and snapshots of jobs that no longer exist
/// once they are older than the minimum age, and keeps everything else: the pools'
/// image sets, younger orphans, blobs that are not ours.
#[tokio::test]
async fn gc_removes_old_orphans_and_keeps_the_rest() {
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    let source = env.source_url("gc.vhd");
    upload_sample(&app.control, &source, 2, 1, 93).await;
    let done = completed(&app, &env, &format!("gc-{}", env.id), &source, 60).await;

    // Leftovers of a job whose document is gone (a crash, a manual deletion).
    let ghost = vhd_replicator::storage::Metadata::from([
        (
            "vhdrep_owner".to_owned(),
            vhd_replicator::plan::owner_tag(&app.control.settings),
        ),
        ("vhdrep_job_id".to_owned(), "ghost-job".to_owned()),
        ("vhdrep_pool_id".to_owned(), format!("pool-{}", env.id)),
    ]);
    let from = &done.replicas[0].blob;
    let orphan = vhd_replicator::storage::BlobPath::new(
        &from.account,
        &env.container(),
        "ghost/ghost-0000.vhd",
    );
    copy_inside(&app, from, &orphan, &ghost).await;
    let src = vhd_replicator::job::locate_source(&source, &app.control.settings).unwrap();
    let orphan_snapshot = app.control.store.snapshot(&src, &ghost).await.unwrap();
    // A relay a crash left beside the source (relays carry no pool tag).
    let mut relay_tags = ghost.clone();
    relay_tags.remove("vhdrep_pool_id");
    relay_tags.insert("vhdrep_relay".to_owned(), "0".to_owned());
    let relay = vhd_replicator::storage::BlobPath::new(
        &src.account,
        &src.container,
        &format!(
            "{}ghost-job/relay-0000.vhd",
            vhd_replicator::engine::relay::RELAY_PREFIX
        ),
    );
    copy_inside(&app, &src, &relay, &relay_tags).await;
    let foreign = vhd_replicator::storage::BlobPath::new("dst2", &env.container(), "not-ours.vhd");
    app.control
        .store
        .put_page_blob(&foreign, bytes::Bytes::from(vec![0u8; 512]))
        .await
        .unwrap();

    // Young orphans are kept.
    let r = vhd_replicator::gc::collect(&app.control, time::Duration::hours(1), false)
        .await
        .unwrap();
    assert!(r.orphans.is_empty(), "{r:?}");
    assert_eq!(r.young.len(), 3, "{r:?}");
    assert!(
        r.needed >= 4,
        "the image set and its snapshot are needed: {r:?}"
    );

    // The binary's dry run lists them at age 0 and deletes nothing.
    let config = env.config_file();
    let text = run_ok(&[
        "gc",
        "--config",
        config.to_str().unwrap(),
        "--dry-run",
        "--min-age-hours",
        "0",
    ]);
    assert!(text.starts_with("would remove 3 orphans"), "{text}");
    assert!(text.contains("ghost/ghost-0000.vhd"), "{text}");
    app.control
        .store
        .properties(&orphan)
        .await
        .expect("a dry run deletes nothing");

    // Old enough: removed; everything else stays.
    let r = vhd_replicator::gc::collect(&app.control, time::Duration::ZERO, false)
        .await
        .unwrap();
    assert_eq!(r.orphans.len(), 3, "{r:?}");
    for gone in [&orphan, &relay] {
        assert!(app
            .control
            .store
            .properties(gone)
            .await
            .unwrap_err()
            .is_not_found());
    }
    assert!(app
        .control
        .store
        .properties(&src.at_snapshot(&orphan_snapshot))
        .await
        .unwrap_err()
        .is_not_found());
    assert_kept(&app, &done, &src, &foreign).await;
    let again = vhd_replicator::gc::collect(&app.control, time::Duration::ZERO, true)
        .await
        .unwrap();
    assert!(again.orphans.is_empty(), "{again:?}");
    app.shutdown().await;
}

/// One trial of a retire racing a job of the same pool over two instances, with
/// `delays` (ms) before the job and the retire are submitted. Returns whether
/// the retire completed.
async fn race_trial(job_delay: u64, retire_delay: u64) -> bool {
    use vhd_replicator::testkit::proxy::{Proxy, ProxyConfig};
    let env = TestEnv::new("");
    let direct = env.control().await;
    // Copies held 1.5 s and replica deletions slowed to 1 s each: jobs and
    // retires last long enough for their steps to interleave.
    let proxy = Proxy::start(ProxyConfig {
        hold_copies: Some(Duration::from_millis(1500)),
        rules: vec![vhd_replicator::testkit::proxy::ProxyRule::new(
            "DELETE",
            &format!("/it-{}/", env.id),
            vhd_replicator::testkit::proxy::ProxyAction::Delay(Duration::from_secs(1)),
            1000,
        )],
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let a = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    let b = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    let source = env.source_url("race.vhd").replace(BLOB, &proxy.url());
    upload_sample(&direct, &env.source_url("race.vhd"), 2, 1, 99).await;
    let pool = format!("pool-{}", env.id);
    let first = format!("race-0-{}", env.id);
    a.control
        .submit(parse_job_json(&job(&env, &first, &source, 40)).unwrap())
        .await
        .unwrap();
    let d0 = wait_for_end(&direct, &first, Duration::from_secs(60)).await;
    assert_eq!(d0.state(), JobState::Completed, "{:?}", d0.error);

    let grow = format!("race-1-{}", env.id);
    let retire = format!("race-r-{}", env.id);
    let submit_job = async {
        tokio::time::sleep(Duration::from_millis(job_delay)).await;
        a.control
            .submit(parse_job_json(&job(&env, &grow, &source, 80)).unwrap())
            .await
            .unwrap();
    };
    let submit_retire = async {
        tokio::time::sleep(Duration::from_millis(retire_delay)).await;
        b.control
            .submit_retire(&pool, Some(retire.clone()))
            .await
            .unwrap();
    };
    tokio::join!(submit_job, submit_retire);
    let d1 = wait_for_end(&direct, &grow, Duration::from_secs(90)).await;
    let r = wait_for_end(&direct, &retire, Duration::from_secs(90)).await;
    eprintln!(
        "race: job +{job_delay} ms -> {:?} ({:?}), retire +{retire_delay} ms -> {:?} ({:?}); retire ended {} the job",
        d1.state(),
        d1.image_set,
        r.state(),
        r.error,
        if r.updated_at > d1.updated_at { "after" } else { "before" }
    );
    // The requests as they reached storage, in order: no retire may delete a
    // URI of the job's hand-off before the job has ended (its last document
    // write); a URI no request deleted after that still exists.
    let seen = proxy.seen();
    let job_doc = format!("PUT /ops/it-{}-state/jobs/{grow}.json?", env.id);
    let ended_at = seen
        .iter()
        .rposition(|r| r.starts_with(&job_doc))
        .expect("the job's document was written");
    assert_handed_off_uris_kept(&direct, &d1, &grow, &seen, ended_at, r.state()).await;
    // Never two image sets at once for one source.
    if let Some((record, _)) = direct.state.load_pool(&pool).await.unwrap() {
        assert!(record.sets.len() <= 1, "{:?}", record.sets);
        assert!(
            record.lock.is_none(),
            "every job released the pool: {:?}",
            record.lock
        );
    }
    a.shutdown().await;
    b.shutdown().await;
    r.state() == JobState::Completed
}

/// A retire and a job of the same pool race over two instances with seeded
/// timings: no handed-off URI ever disappears unless a retire completed after
/// that job ended; the pool never holds two image sets of one source, and its
/// lock is released. The trials cover both orders: retires that went first
/// (the job waited, then made a new set) and retires refused for a running job.
#[tokio::test]
async fn retire_racing_a_job_never_removes_a_handed_off_uri() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261201);
    let mut retired = 0;
    // The job submitted while the retire deletes (the window a check-then-delete
    // retire leaves open), the retire during the job, then seeded timings.
    let mut delays = vec![(300, 0), (0, 700)];
    delays.extend((0..2).map(|_| (rng.random_range(0..800), rng.random_range(0..800))));
    let trials = delays.len();
    for (job_delay, retire_delay) in delays {
        if race_trial(job_delay, retire_delay).await {
            retired += 1;
        }
    }
    assert!(
        retired > 0 && retired < trials,
        "both orders met: {retired} of {trials} retires completed"
    );
}

/// Two jobs of one pool and source submitted at once to two instances: the
/// second waits for the first (the pool's lock) and tops its set up, so the pool
/// holds one image set, not two.
#[tokio::test]
async fn two_jobs_of_one_pool_at_once_make_one_image_set() {
    use vhd_replicator::testkit::proxy::{Proxy, ProxyConfig};
    let env = TestEnv::new("");
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        hold_copies: Some(Duration::from_millis(800)),
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let a = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    let b = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    upload_sample(&direct, &env.source_url("twice.vhd"), 2, 1, 98).await;
    let source = env.source_url("twice.vhd").replace(BLOB, &proxy.url());
    let (j1, j2) = (format!("twice-1-{}", env.id), format!("twice-2-{}", env.id));
    let (r1, r2) = tokio::join!(
        a.control
            .submit(parse_job_json(&job(&env, &j1, &source, 60)).unwrap()),
        b.control
            .submit(parse_job_json(&job(&env, &j2, &source, 100)).unwrap()),
    );
    r1.unwrap();
    r2.unwrap();
    let d1 = wait_for_end(&direct, &j1, Duration::from_secs(90)).await;
    let d2 = wait_for_end(&direct, &j2, Duration::from_secs(90)).await;
    assert_eq!(
        (d1.state(), d2.state()),
        (JobState::Completed, JobState::Completed),
        "{:?} {:?}",
        d1.error,
        d2.error
    );
    let (record, _) = direct
        .state
        .load_pool(&format!("pool-{}", env.id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.sets.len(), 1, "one image set: {:?}", record.sets);
    assert!(record.lock.is_none());
    let topped_up = [&d1, &d2]
        .iter()
        .filter(|d| {
            d.image_set
                .as_deref()
                .is_some_and(|n| n.starts_with("top-up"))
        })
        .count();
    assert_eq!(
        topped_up, 1,
        "the later job topped the earlier one's set up"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// Submits a job for `nodes` of the test pool and waits until it has completed.
async fn completed(
    app: &TestApp,
    env: &TestEnv,
    id: &str,
    source: &str,
    nodes: u32,
) -> vhd_replicator::state::JobDocument {
    app.control
        .submit(parse_job_json(&job(env, id, source, nodes)).unwrap())
        .await
        .unwrap();
    let d = wait_for_end(&app.control, id, Duration::from_secs(60)).await;
    assert_eq!(d.state(), JobState::Completed, "{id}: {:?}", d.error);
    d
}

/// The pool's view from the HTTP API.
async fn pool_view(app: &TestApp, env: &TestEnv) -> serde_json::Value {
    reqwest::get(app.url(&format!("/v1/pools/pool-{}", env.id)))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The source a replica was copied from.
async fn copied_from(app: &TestApp, blob: &vhd_replicator::storage::BlobPath) -> String {
    app.control
        .store
        .properties(blob)
        .await
        .unwrap()
        .copy
        .unwrap()
        .source
        .unwrap()
}

/// Exactly 20 new copies, each copied inside its account from a replica the pool
/// already had (not from the source), and 10 replicas in each account.
async fn assert_topped_up_from_replicas(app: &TestApp, d2: &vhd_replicator::state::JobDocument) {
    let new: Vec<_> = d2.replicas.iter().filter(|r| !r.inherited).collect();
    assert_eq!(new.len(), 20, "exactly 20 new copies");
    for r in &new {
        let from = copied_from(app, &r.blob).await;
        assert!(
            !from.contains("/src/"),
            "replica {} was copied from the source, not an existing replica: {from}",
            r.index
        );
        assert!(
            from.contains(&format!("/{}/", r.account)),
            "same-account copy first: {from}"
        );
    }
    let mut per_account = std::collections::BTreeMap::new();
    for r in &d2.replicas {
        *per_account.entry(r.account.clone()).or_insert(0) += 1;
    }
    assert_eq!(
        per_account.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10]
    );
}

/// The retired pool's snapshot and record are gone, the other pool's snapshot
/// stays, and a second retire finds nothing.
async fn assert_retired(
    app: &TestApp,
    source: &str,
    ids: &[vhd_replicator::state::JobDocument],
    gone_pool: &str,
) {
    let snapshot = ids[1].source_snapshot.clone().unwrap();
    let src = vhd_replicator::job::locate_source(source, &app.control.settings).unwrap();
    assert!(
        app.control
            .store
            .properties(&src.at_snapshot(&snapshot))
            .await
            .unwrap_err()
            .is_not_found(),
        "its snapshot went"
    );
    let kept_snapshot = ids[0].source_snapshot.clone().unwrap();
    app.control
        .store
        .properties(&src.at_snapshot(&kept_snapshot))
        .await
        .expect("the other pool's snapshot stays");
    assert_eq!(
        reqwest::get(app.url(&format!("/v1/pools/{gone_pool}")))
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        reqwest::Client::new()
            .delete(app.url(&format!("/v1/pools/{gone_pool}")))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

/// What gc keeps: blobs that are not ours, the image set, its snapshot, the source.
async fn assert_kept(
    app: &TestApp,
    done: &vhd_replicator::state::JobDocument,
    src: &vhd_replicator::storage::BlobPath,
    foreign: &vhd_replicator::storage::BlobPath,
) {
    app.control
        .store
        .properties(foreign)
        .await
        .expect("blobs that are not ours stay");
    app.control
        .store
        .properties(&src.at_snapshot(done.source_snapshot.as_ref().unwrap()))
        .await
        .expect("the set's snapshot stays");
    for r in &done.replicas {
        app.control
            .store
            .properties(&r.blob)
            .await
            .expect("the image set stays");
    }
    app.control
        .store
        .properties(src)
        .await
        .expect("the source stays");
}

/// No URI the job handed off was deleted before the job ended (request
/// `ended_at` in `seen`); one no request deleted still exists.
async fn assert_handed_off_uris_kept(
    direct: &vhd_replicator::control::Control,
    d1: &vhd_replicator::state::JobDocument,
    grow: &str,
    seen: &[String],
    ended_at: usize,
    retire: JobState,
) {
    use vhd_replicator::handoff::HandOff;
    let handoffs: Vec<HandOff> = drain(direct.handoff.as_ref())
        .await
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect();
    if let Some(h) = handoffs.iter().find(|h| h.job_id.as_str() == grow) {
        for uri in &h.image_uris {
            let path = url::Url::parse(uri).unwrap().path().to_owned();
            let deletes: Vec<usize> = seen
                .iter()
                .enumerate()
                .filter(|(_, r)| r.starts_with(&format!("DELETE {path}?")))
                .map(|(i, _)| i)
                .collect();
            assert!(
                deletes.iter().all(|i| *i > ended_at),
                "{uri}, handed off by job {grow}, was deleted before that job ended (retire {:?})",
                retire
            );
            if deletes.is_empty() {
                let blob = d1
                    .replicas
                    .iter()
                    .find(|x| &x.uri == uri)
                    .map(|x| x.blob.clone())
                    .expect("a handed-off URI is one of the job's replicas");
                assert!(
                    direct.store.properties(&blob).await.is_ok(),
                    "{uri} is gone"
                );
            }
        }
    } else {
        assert_ne!(
            d1.state(),
            JobState::Completed,
            "a completed job handed off"
        );
    }
}
