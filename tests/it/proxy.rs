//! The Azure adapter and engine against Azurite behind the behaviour proxy: copies
//! held pending, aborted, throttled, reset.

use crate::helpers::*;
use std::{sync::atomic::Ordering, time::Duration};
use vhd_replicator::{
    job::parse_job_json,
    state::{JobState, ReplicaState},
    testkit::proxy::{Proxy, ProxyConfig, ProxyStats},
};

/// Copies held pending (with advancing progress) are polled until they succeed,
/// within loose bounds on the number of polls, and the job completes with
/// verified replicas. The schedule's timing against progress is tested on
/// virtual time (`tests/sim.rs`, `polls_follow_the_copy_progress`), where it can
/// be measured exactly.
#[tokio::test]
async fn pending_copies_are_polled_until_they_succeed() {
    let env = TestEnv::new("");
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        hold_copies: Some(Duration::from_secs(3)),
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let source = env.source_url("held.vhd");
    upload_sample(&direct, &source, 2, 1, 11).await;
    let app = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    let id = format!("held-{}", env.id);
    let via_proxy = source.replace(BLOB, &proxy.url());
    let started = tokio::time::Instant::now();
    app.control
        .submit(parse_job_json(&env.job_json(&id, &via_proxy, "windows", 60)).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&direct, &id, Duration::from_secs(60)).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    assert_eq!(doc.replicas.len(), 3);
    // Fan-out: a seed, then copies from it; each held 3 s.
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert!(ProxyStats::get(&proxy.stats.held) >= 3);
    assert!(ProxyStats::get(&proxy.stats.pending_answers) >= 3);
    for r in &doc.replicas {
        assert_eq!(r.state, ReplicaState::Verified);
        assert!(
            r.status_requests >= 2,
            "replica {} polled {} times",
            r.index,
            r.status_requests
        );
        // Polls follow progress: nowhere near one per 50 ms minimum over 3 s.
        assert!(
            r.status_requests <= 20,
            "replica {} polled {} times",
            r.index,
            r.status_requests
        );
    }
    app.shutdown().await;
}

/// Cancelling a job whose copies are pending aborts them and deletes the replicas.
#[tokio::test]
async fn cancel_aborts_pending_copies() {
    let env = TestEnv::new("");
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        hold_copies: Some(Duration::from_secs(120)),
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let source = env.source_url("abort.vhd");
    upload_sample(&direct, &source, 2, 1, 12).await;
    let settings = env.proxied(&proxy.url(), "");
    let mut settings = settings;
    settings.engine.checkpoint_seconds = 1;
    let app = TestApp::spawn_with(settings).await;
    let id = format!("abort-{}", env.id);
    let via_proxy = source.replace(BLOB, &proxy.url());
    app.control
        .submit(parse_job_json(&env.job_json(&id, &via_proxy, "linux", 120)).unwrap())
        .await
        .unwrap();
    // Wait until copies are under way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (d, _) = direct
            .state
            .load(&id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("job {id} recorded"));
        if d.replicas.iter().any(|r| r.state == ReplicaState::Copying) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no copy started: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    direct.cancel(&id).await.unwrap();
    let doc = wait_for_end(&direct, &id, Duration::from_secs(30)).await;
    assert_eq!(doc.state(), JobState::Cancelled);
    assert!(
        ProxyStats::get(&proxy.stats.aborted) >= 1,
        "pending copies were aborted"
    );
    for account in ["dst1", "dst2", "dst3"] {
        assert!(
            direct
                .store
                .list(account, &env.container(), "")
                .await
                .unwrap()
                .is_empty(),
            "replicas deleted in {account}"
        );
    }
    // The job's snapshot went with it.
    let snapshot = doc.source_snapshot.expect("snapshot recorded");
    let src = vhd_replicator::job::locate_source(&source, &direct.settings).unwrap();
    assert!(direct
        .store
        .properties(&src.at_snapshot(&snapshot))
        .await
        .unwrap_err()
        .is_not_found());
    app.shutdown().await;
}

/// With 20% 503 ServerBusy (half with Retry-After), 5% connection resets, 5% 500
/// OperationTimedOut and latency spikes, every job completes; the retries show in
/// the metrics.
#[tokio::test]
async fn throttling_resets_and_timeouts_are_survived() {
    let env = TestEnv::new("");
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        seed: 7,
        hold_copies: Some(Duration::from_millis(500)),
        busy_rate: 0.2,
        retry_after_share: 0.5,
        timeout_rate: 0.05,
        reset_rate: 0.05,
        spike_rate: 0.05,
        spike: Duration::from_millis(300),
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let mut ids = Vec::new();
    let app = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    for i in 0..3 {
        let source = env.source_url(&format!("faulty-{i}.vhd"));
        upload_sample(&direct, &source, 2, 1, 20 + i).await;
        let id = format!("faulty-{i}-{}", env.id);
        let via_proxy = source.replace(BLOB, &proxy.url());
        app.control
            .submit(parse_job_json(&env.job_json(&id, &via_proxy, "windows", 100)).unwrap())
            .await
            .unwrap();
        ids.push(id);
    }
    for id in &ids {
        let doc = wait_for_end(&direct, id, Duration::from_secs(120)).await;
        assert_eq!(doc.state(), JobState::Completed, "{id}: {:?}", doc.error);
        assert_eq!(doc.replicas.len(), 5);
    }
    let busy = ProxyStats::get(&proxy.stats.busy);
    let resets = ProxyStats::get(&proxy.stats.resets);
    assert!(
        busy > 0 && resets > 0,
        "faults injected: busy {busy}, resets {resets}"
    );
    let metrics = app.control.metrics.render();
    let retries: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("vhdrep_storage_retries_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let throttled: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("vhdrep_storage_throttled_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        retries > 0.0 && throttled > 0.0,
        "retries {retries}, throttled {throttled}"
    );
    eprintln!(
        "faults: {} requests, {busy} busy ({} with Retry-After), {} timeouts, {resets} resets, {} spikes; daemon retries {retries}, throttled {throttled}",
        ProxyStats::get(&proxy.stats.requests),
        proxy.stats.busy_with_retry_after.load(Ordering::Relaxed),
        ProxyStats::get(&proxy.stats.timeouts),
        ProxyStats::get(&proxy.stats.spikes),
    );
    app.shutdown().await;
}

/// Azure answers Get Account Information with 404 ResourceNotFound when the
/// identity has no data role on the account: the job fails naming the account
/// and the role to assign, before anything is copied.
#[tokio::test]
async fn an_identity_without_a_data_role_is_told_which_role_to_assign() {
    use vhd_replicator::testkit::proxy::{ProxyAction, ProxyRule};
    let env = TestEnv::new("");
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        rules: vec![ProxyRule {
            method: None,
            query_contains: Some("restype=account".into()),
            ..ProxyRule::new(
                "GET",
                "/dst2/",
                ProxyAction::Answer(404, "ResourceNotFound"),
                100,
            )
        }],
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let source = env.source_url("norole.vhd");
    upload_sample(&direct, &source, 2, 1, 13).await;
    let app = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    let id = format!("norole-{}", env.id);
    let via_proxy = source.replace(BLOB, &proxy.url());
    app.control
        .submit(parse_job_json(&env.job_json(&id, &via_proxy, "windows", 60)).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&direct, &id, Duration::from_secs(60)).await;
    assert_eq!(doc.state(), JobState::Failed);
    let error = doc.error.unwrap_or_default();
    assert!(
        error.contains("account dst2")
            && error.contains("Storage Blob Data Contributor")
            && error.contains("ResourceNotFound"),
        "{error}"
    );
    assert!(proxy.copy_starts().is_empty(), "nothing copied");
    app.shutdown().await;
}

/// `500 CannotVerifyCopySource` is the service running out of time verifying the
/// source: the Start Copy is retried, and once the request retries are spent the
/// replica is tried again with a freshly signed source SAS; the job completes.
#[tokio::test]
async fn a_copy_source_verification_timeout_is_retried_with_a_fresh_sas() {
    use vhd_replicator::testkit::proxy::{ProxyAction, ProxyRule};
    let env = TestEnv::new("");
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        rules: vec![ProxyRule {
            header: Some("x-ms-copy-source"),
            // Every attempt the request retry policy makes (6).
            ..ProxyRule::new(
                "PUT",
                &format!("/it-{}/", env.id),
                ProxyAction::Answer(500, "CannotVerifyCopySource"),
                6,
            )
        }],
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let source = env.source_url("verify.vhd");
    upload_sample(&direct, &source, 2, 1, 14).await;
    let app = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    let id = format!("verify-{}", env.id);
    let via_proxy = source.replace(BLOB, &proxy.url());
    app.control
        .submit(parse_job_json(&env.job_json(&id, &via_proxy, "windows", 20)).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&direct, &id, Duration::from_secs(90)).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    let sources = proxy.copy_sources();
    assert_eq!(
        sources.len(),
        7,
        "6 refused tries and the one that worked: {sources:?}"
    );
    let signatures: std::collections::BTreeSet<String> = sources
        .iter()
        .filter_map(|(_, s)| url::Url::parse(s).ok())
        .filter_map(|u| {
            u.query_pairs()
                .find(|(k, _)| k == "sig")
                .map(|(_, v)| v.into_owned())
        })
        .collect();
    assert_eq!(
        signatures.len(),
        2,
        "the replica's retry signed a fresh SAS"
    );
    app.shutdown().await;
}

/// A Start Copy answered `503 ServerBusy` with `Retry-After: 2` is sent again
/// no sooner than two seconds later (the request backoff alone would wait at
/// most 200 ms), and the job completes with the one replica.
#[tokio::test]
async fn storage_throttling_waits_the_retry_after_it_was_given() {
    use vhd_replicator::testkit::proxy::{ProxyAction, ProxyRule};
    let env = TestEnv::new("");
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        rules: vec![ProxyRule {
            header: Some("x-ms-copy-source"),
            ..ProxyRule::new("PUT", &format!("/it-{}/", env.id), ProxyAction::Busy(2), 1)
        }],
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let source = env.source_url("busy.vhd");
    upload_sample(&direct, &source, 2, 1, 15).await;
    let app = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    let id = format!("busy-{}", env.id);
    let via_proxy = source.replace(BLOB, &proxy.url());
    app.control
        .submit(parse_job_json(&env.job_json(&id, &via_proxy, "windows", 20)).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&direct, &id, Duration::from_secs(60)).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    let replica = format!("/{}", doc.replicas[0].blob.name);
    let starts: Vec<_> = proxy
        .seen_timed()
        .into_iter()
        .filter(|(_, r)| r.starts_with("PUT ") && r.split('?').next().unwrap().ends_with(&replica))
        .collect();
    assert!(starts.len() >= 2, "throttled, then sent again: {starts:?}");
    let waited = starts[1].0 - starts[0].0;
    assert!(
        waited >= Duration::from_secs(2),
        "the Start Copy came again {waited:?} after a 503 with Retry-After: 2"
    );
    app.shutdown().await;
}
