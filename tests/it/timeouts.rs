//! Calls that never get an answer: each attempt of every outbound call has a
//! timeout and is retried under the one retry policy, so a swallowed request costs
//! one timeout, not the job. A Start Copy whose answer is lost is reconciled from
//! the destination instead of being sent twice.

use crate::helpers::*;
use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};
use vhd_replicator::{
    job::parse_job_json,
    state::JobState,
    testkit::proxy::{Proxy, ProxyAction, ProxyConfig, ProxyRule, ProxyStats},
};

/// A webhook that never answers its first request and accepts the others.
async fn hanging_webhook() -> (String, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counter = counter.clone();
            async move {
                if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    std::future::pending::<()>().await;
                }
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), calls)
}

/// With a 2 s request timeout, a swallowed job-document write, a swallowed
/// hand-off queue send, a lost status answer, a lost Start Copy answer and a
/// webhook that never answers its first POST: each call times out and is tried
/// again on its own, the job completes within seconds, every replica's copy was
/// started exactly once, and exactly one hand-off message arrives.
#[tokio::test]
async fn calls_without_an_answer_time_out_and_are_retried() {
    let env = TestEnv::new("");
    let direct = env.control().await;
    let state_docs = format!("/ops/it-{}-state/jobs/", env.id);
    let blob_proxy = Proxy::start(ProxyConfig {
        rules: vec![
            ProxyRule::new("PUT", &state_docs, ProxyAction::Swallow, 1),
            ProxyRule {
                header: Some("x-ms-copy-source"),
                ..ProxyRule::new(
                    "PUT",
                    &format!("/it-{}/", env.id),
                    ProxyAction::LoseAnswer,
                    1,
                )
            },
            ProxyRule::new(
                "HEAD",
                &format!("/it-{}/", env.id),
                ProxyAction::LoseAnswer,
                1,
            ),
        ],
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let queue_proxy = Proxy::start(ProxyConfig {
        rules: vec![ProxyRule::new(
            "POST",
            &format!("/ops/it-{}-handoff/messages", env.id),
            ProxyAction::Swallow,
            1,
        )],
        ..ProxyConfig::transparent(QUEUE)
    })
    .await
    .unwrap();
    let (webhook, webhook_calls) = hanging_webhook().await;
    let source = env.source_url("timeouts.vhd");
    upload_sample(&direct, &source, 2, 1, 31).await;
    let settings = env.proxied_both(
        &blob_proxy.url(),
        &queue_proxy.url(),
        &format!(
            "[engine]\nrequest_timeout_seconds = 2\nconnect_timeout_seconds = 2\n[handoff]\nwebhook = \"{webhook}\"\n"
        ),
    );
    let app = TestApp::spawn_with(settings).await;
    let id = format!("timeouts-{}", env.id);
    let via_proxy = source.replace(BLOB, &blob_proxy.url());
    let started = tokio::time::Instant::now();
    app.control
        .submit(parse_job_json(&env.job_json(&id, &via_proxy, "windows", 60)).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&direct, &id, Duration::from_secs(60)).await;
    let took = started.elapsed();
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    assert!(
        took < Duration::from_secs(25),
        "five 2 s timeouts should cost seconds, not the job: took {took:?}"
    );
    assert_eq!(
        ProxyStats::get(&blob_proxy.stats.rule_hits)
            + ProxyStats::get(&queue_proxy.stats.rule_hits),
        4,
        "every scripted fault was met"
    );
    // The lost Start Copy answer was reconciled, not sent again.
    let starts = replica_starts(&blob_proxy);
    assert_eq!(starts.len(), 3, "{starts:?}");
    assert!(starts.values().all(|n| *n == 1), "{starts:?}");
    assert_eq!(
        drain(direct.handoff.as_ref()).await.len(),
        1,
        "one hand-off message"
    );
    assert_eq!(
        webhook_calls.load(Ordering::SeqCst),
        2,
        "webhook retried once"
    );
    let metrics = metrics_showing(&app, &["reason=\"timeout\""]).await;
    let timeouts: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("vhdrep_storage_retries_total{") && l.contains("reason=\"timeout\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        timeouts >= 3.0,
        "state write, status and queue send retried:\n{metrics}"
    );
    app.shutdown().await;
}
