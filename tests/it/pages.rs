//! The status pages as an operator sees them: the overview with 1 job and with
//! 50, a 600-replica job's page and the pools page, in headless Chromium at
//! 1280 px and at phone width, checked for what carries the meaning (the ETA,
//! the progress, a failed job's error) and kept as screenshots; and what one
//! page view costs in storage requests with 5,000 job documents.

use crate::helpers::*;
use std::sync::Arc;
use time::{Duration as TimeSpan, OffsetDateTime};
use vhd_replicator::{
    control::Control,
    estimate::Sample,
    job::{parse_job_json, JobId},
    state::{JobDocument, JobState, Phase, ReplicaRecord, ReplicaState},
    storage::BlobPath,
};

const GIB: u64 = 1024 * 1024 * 1024;

/// A replica record in `state`, `share` of 127 GiB copied.
fn replica(index: u32, account: &str, state: ReplicaState, share: f64) -> ReplicaRecord {
    let blob = BlobPath::new(
        account,
        "vhd-replicas",
        &format!("pool/job/disk-{index:04}.vhd"),
    );
    ReplicaRecord {
        index,
        account: account.to_owned(),
        uri: format!(
            "https://{account}.blob.core.windows.net/vhd-replicas/{}",
            blob.name
        ),
        blob,
        state,
        copy_id: None,
        bytes_copied: (127.0 * GIB as f64 * share) as u64,
        bytes_total: 127 * GIB,
        attempts: 1,
        status_requests: 0,
        error: (state == ReplicaState::Failed)
            .then(|| "copy Failed (500 InternalError: the copy failed in the service)".to_owned()),
        inherited: false,
        method: Some(if index.is_multiple_of(7) {
            vhd_replicator::state::ReplicaMethod::Async
        } else {
            vhd_replicator::state::ReplicaMethod::Ranges
        }),
        ranges_done: Vec::new(),
        copied_from: Some(if index == 0 {
            "snapshot".to_owned()
        } else {
            format!("{account}/pool/job/disk-{:04}.vhd", index / 2)
        }),
    }
}

/// A job document of `replicas` replicas over `accounts` accounts, `state`
/// running (copying at about 120 MiB/s for five minutes), completed or failed.
fn job(
    id: &str,
    nodes: u32,
    replicas: u32,
    accounts: u32,
    state: JobState,
    share: f64,
) -> JobDocument {
    let spec = parse_job_json(&format!(
        r#"{{"source":"https://src.blob.core.windows.net/images/win2022.vhd","pool":{{"id":"pool-{}","os":"windows","nodes":{nodes},"vm_size":"STANDARD_D2_V3"}},"replicas":{replicas}}}"#,
        id.split('-').next().unwrap_or(id)
    ))
    .unwrap();
    let mut d = JobDocument::replicate(JobId::parse(id).unwrap(), spec);
    d.enter(JobState::Running).unwrap();
    let now = OffsetDateTime::now_utc();
    d.started_at = Some(now - TimeSpan::minutes(6));
    d.enter_phase(Phase::Copying).unwrap();
    d.replicas = (0..replicas)
        .map(|i| {
            let account = format!("dst{}", i % accounts + 1);
            // Each account holds a mix of states.
            let (st, s) = match (state, (i + i / accounts) % 5) {
                (JobState::Completed, _) => (ReplicaState::Verified, 1.0),
                (JobState::Failed, 0) => (ReplicaState::Failed, 0.4),
                (_, 0 | 1) => (ReplicaState::Verified, 1.0),
                (_, 2) => (ReplicaState::Copying, share),
                (_, 3) => (ReplicaState::Copying, share / 2.0),
                _ => (ReplicaState::Pending, 0.0),
            };
            replica(i, &account, st, s)
        })
        .collect();
    // Progress samples every 10 s over the last five minutes, at a steady rate.
    let done = d.bytes_copied();
    let rate = 120 * 1024 * 1024;
    d.progress_log = (0..30)
        .map(|k| Sample {
            at: now - TimeSpan::seconds(300 - k * 10),
            bytes: done.saturating_sub(((29 - k) * 10) as u64 * rate),
        })
        .collect();
    match state {
        JobState::Completed => d.enter(JobState::Completed).unwrap(),
        JobState::Failed => {
            d.enter(JobState::Failed).unwrap();
            d.error = Some(format!("1 of {replicas} replicas failed: replica 0 in dst1: copy Failed (500 InternalError) (gave up after 3 tries)"));
        }
        _ => {}
    }
    d
}

/// The API alone (no worker), on a free port, for `control`.
async fn serve(control: Control) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router =
        vhd_replicator::api::router(vhd_replicator::api::AppState::new(control, Arc::default()));
    let handle = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    (format!("http://{addr}"), handle)
}

/// The API alone for `env`, its state holding `docs`.
async fn serve_docs(env: &TestEnv, docs: &[JobDocument]) -> (String, tokio::task::JoinHandle<()>) {
    let control = env.control().await;
    for d in docs {
        control.state.create(d).await.unwrap();
    }
    serve(control).await
}

/// Screenshots of `path` at 1280 px wide and `height` tall (and at phone width
/// when `phone`), kept under `name`; returns the 1280 px DOM.
async fn look(
    base: &str,
    path: &str,
    dir: &std::path::Path,
    name: &str,
    phone: bool,
    height: u32,
) -> String {
    let profile = dir.join("chromium");
    let shot = dir.join(format!("{name}.png"));
    let (dom, ok) =
        chromium_capture(&format!("{base}{path}"), &profile, &shot, (1280, height)).await;
    assert!(ok, "a screenshot of {path}");
    let px = Pixels::read(&shot);
    assert!(
        px.dark > 1_000 && px.light * 2 > px.width * px.height,
        "{name}: {px:?}"
    );
    keep_screenshot(&shot, &format!("{name}.png"));
    if phone {
        let small = dir.join(format!("{name}-phone.png"));
        let (_, ok) =
            chromium_capture(&format!("{base}{path}"), &profile, &small, (390, 844)).await;
        assert!(ok, "a phone-width screenshot of {path}");
        keep_screenshot(&small, &format!("{name}-phone.png"));
    }
    dom
}

/// One running job: the overview shows its row with progress, copied bytes,
/// throughput, elapsed time and an ETA; its page shows the same and a replica
/// table with method, source and attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_and_a_job_page_with_one_job() {
    let env = TestEnv::new("");
    let (base, server) =
        serve_docs(&env, &[job("one-job", 200, 10, 5, JobState::Running, 0.5)]).await;
    let dom = look(&base, "/", env.dir.path(), "overview-1-job", true, 900).await;
    assert!(dom.contains("href=\"/jobs/one-job\""), "{dom}");
    assert!(
        dom.contains("running</span> · copying"),
        "state and phase in words: {dom}"
    );
    assert!(dom.contains("MiB/s"), "throughput: {dom}");
    assert!(dom.contains("class=\"eta\""), "an ETA: {dom}");
    assert!(
        !dom.contains("estimating"),
        "enough samples to go on: {dom}"
    );
    assert_eq!(dom.matches("<tr class=\"job\"").count(), 1);
    let page = look(
        &base,
        "/jobs/one-job",
        env.dir.path(),
        "job-10-replicas",
        true,
        900,
    )
    .await;
    assert_eq!(page.matches("class=\"bar\"").count(), 1 + 10, "{page}");
    assert!(page.contains("class=\"eta\"") && page.contains("ranges") && page.contains("snapshot"));
    server.abort();
}

/// Fifty jobs (running, queued, completed and failed): the overview lists the
/// active ones first, then the finished ones newest first, each with its bar;
/// a failed job's error in one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_with_fifty_jobs() {
    let env = TestEnv::new("");
    let control = env.control().await;
    let mut with_eta = 0;
    for i in 0..50u32 {
        let state = match i % 10 {
            0 => JobState::Failed,
            1..=3 => JobState::Running,
            4 => JobState::Queued,
            _ => JobState::Completed,
        };
        let d = if state == JobState::Queued {
            let spec = parse_job_json(r#"{"source":"https://src.blob.core.windows.net/images/a.vhd","pool":{"id":"pool-q","os":"linux","nodes":80}}"#).unwrap();
            JobDocument::replicate(JobId::parse(&format!("job{i:02}-queued")).unwrap(), spec)
        } else {
            job(
                &format!("job{i:02}-{}", state.as_str()),
                40 + i * 20,
                2 + i % 8,
                3,
                state,
                0.3,
            )
        };
        let mut d = d;
        if i == 1 {
            // Just started: one sample, too little to go on.
            d.progress_log.drain(..d.progress_log.len() - 1);
        }
        let total: u64 = d.replicas.iter().map(|r| r.bytes_total).sum();
        if state == JobState::Running && d.bytes_copied() < total && i != 1 {
            with_eta += 1;
        }
        control.state.create(&d).await.unwrap();
    }
    let (base, server) = serve(control).await;
    let dom = look(&base, "/", env.dir.path(), "overview-50-jobs", true, 1900).await;
    let rows = dom.matches("<tr class=\"job\"").count();
    assert_eq!(
        rows,
        20 + 25,
        "every active job and the 25 newest finished: {dom}"
    );
    let running = dom.find("running</span>").unwrap();
    let finished = dom.find("Recently finished").unwrap();
    assert!(running < finished, "active jobs first");
    assert!(
        dom.contains("gave up after 3 tries"),
        "a failed job's error: {dom}"
    );
    // Every running job with bytes left has an ETA (a running job whose bytes
    // are all copied has none: nothing is left to promise).
    let etas = dom.matches("class=\"eta\"").count();
    assert!(with_eta >= 10);
    assert_eq!(etas, with_eta, "{dom}");
    let just_started = dom.split("id=\"job-job01-running\"").nth(1).unwrap();
    let just_started = just_started.split("</tr>").next().unwrap();
    assert_eq!(
        just_started.matches("estimating").count(),
        2,
        "throughput and ETA say estimating: {just_started}"
    );
    assert!(dom.contains("and 5 older"), "the rest counted: {dom}");
    server.abort();
}

/// A 600-replica job over 10 accounts: its page summarises each account (a
/// bar, verified of total) and folds each account's replicas away, so the page
/// stays short; the overview row still carries the ETA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_page_with_six_hundred_replicas() {
    let env = TestEnv::new("");
    let (base, server) = serve_docs(
        &env,
        &[job("big-job", 12_000, 600, 10, JobState::Running, 0.6)],
    )
    .await;
    let page = look(
        &base,
        "/jobs/big-job",
        env.dir.path(),
        "job-600-replicas",
        true,
        900,
    )
    .await;
    for a in 1..=10 {
        assert!(
            page.contains(&format!("href=\"#acct-dst{a}\"")),
            "account dst{a} summarised"
        );
    }
    assert!(
        page.contains("24 of 60"),
        "verified of total per account: {page}"
    );
    assert_eq!(page.matches("<details").count(), 10);
    assert_eq!(page.matches("class=\"bar\"").count(), 1 + 10 + 600);
    assert!(page.contains("class=\"eta\""));
    let overview = look(
        &base,
        "/",
        env.dir.path(),
        "overview-600-replicas",
        false,
        900,
    )
    .await;
    assert!(overview.contains("class=\"eta\"") && overview.contains("big-job"));
    server.abort();
}

/// What one page view costs with 5,000 job documents and a 600-replica job,
/// counted on the simulated store: the overview one listing, a job page one
/// document read, however many jobs there are.
#[tokio::test]
async fn a_page_view_costs_one_listing_or_one_document() {
    use vhd_replicator::testkit::sim::{SimConfig, SimStore};
    let env = TestEnv::new("");
    let store = Arc::new(SimStore::new(SimConfig::instant()));
    let control = Control::with_retry(
        Arc::new(env.settings()),
        vhd_replicator::metrics::Metrics::new(),
        store.clone(),
        Arc::new(vhd_replicator::testkit::memory_queue::MemoryQueue::new(
            "intake",
        )),
        Arc::new(vhd_replicator::testkit::memory_queue::MemoryQueue::new(
            "poison",
        )),
        Arc::new(vhd_replicator::testkit::memory_queue::MemoryQueue::new(
            "handoff",
        )),
        Default::default(),
    );
    control.state.ensure().await.unwrap();
    let big = job("big-job", 12_000, 600, 10, JobState::Running, 0.6);
    control.state.create(&big).await.unwrap();
    let small = job("small-job", 200, 10, 5, JobState::Completed, 1.0);
    for i in 0..4_999 {
        let mut d = small.clone();
        d.job_id = JobId::parse(&format!("done-{i:05}")).unwrap();
        control.state.create(&d).await.unwrap();
    }
    let (base, server) = serve(control).await;
    let http = reqwest::Client::new();
    let cost = |path: &'static str| {
        let (http, base, store) = (http.clone(), base.clone(), store.clone());
        async move {
            let before = store.stats().requests;
            let rsp = http.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(rsp.status(), 200, "{path}");
            let body = rsp.text().await.unwrap();
            (store.stats().requests - before, body.len())
        }
    };
    let (overview, overview_bytes) = cost("/").await;
    let (detail, _) = cost("/jobs/big-job").await;
    assert_eq!(overview, 1, "the overview reads the summary listing only");
    assert_eq!(detail, 1, "a job page reads one document");
    assert!(
        overview_bytes < 200_000,
        "the overview stays short: {overview_bytes} bytes"
    );
    eprintln!("5,000 jobs: overview {overview} request(s), {overview_bytes} bytes; 600-replica job page {detail}");
    server.abort();
}

/// A real job of one replica (its copy held pending for 45 s by the proxy,
/// progress advancing linearly):
/// while too little has been seen the job says "estimating"; once its
/// checkpoints span 20 s of movement, the summary, the job view and the
/// overview carry a throughput and an ETA, and the ETA is about the time the
/// copies have left.
#[tokio::test]
async fn a_running_job_estimates_its_throughput_and_eta_from_its_checkpoints() {
    use std::time::Duration;
    use vhd_replicator::testkit::proxy::{Proxy, ProxyConfig};
    let env = TestEnv::new("[engine]\ncheckpoint_seconds = 1\n");
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        hold_copies: Some(Duration::from_secs(45)),
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let source = env.source_url("eta.vhd");
    upload_sample(&direct, &source, 8, 4, 33).await;
    let app = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    let id = format!("eta-{}", env.id);
    app.control
        .submit(
            parse_job_json(&env.job_json(&id, &source.replace(BLOB, &proxy.url()), "windows", 20))
                .unwrap(),
        )
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let started = tokio::time::Instant::now();
    let (mut estimating_seen, mut view) = (false, serde_json::Value::Null);
    while started.elapsed() < Duration::from_secs(40) {
        view = http
            .get(app.url(&format!("/v1/jobs/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view["state"] == "running" && view["estimating"] == true {
            estimating_seen = true;
        }
        if view["eta_seconds"].is_u64() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(estimating_seen, "the job said estimating before it knew");
    let eta = view["eta_seconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("no ETA: {view}"));
    let rate = view["throughput_bytes_per_second"].as_u64().unwrap();
    let elapsed = view["elapsed_seconds"].as_u64().unwrap();
    assert!(rate > 0 && elapsed >= 20, "{view}");
    // The copy ends 45 s after it started: the ETA is what is left of that,
    // give or take the checkpoint spacing. (With several copies one after
    // another the ETA is the bytes left at the rate seen so far, which
    // overstates it when later copies run side by side.)
    let left = 45u64.saturating_sub(started.elapsed().as_secs());
    assert!(
        eta.abs_diff(left) <= 12,
        "ETA {eta} s, about {left} s left: {view}"
    );
    let listed: serde_json::Value = http
        .get(app.url("/v1/jobs"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let summary = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job_id"] == id.as_str())
        .unwrap();
    assert!(summary["eta_at"].is_string() && summary["throughput_bytes_per_second"].is_u64());
    let overview = http
        .get(app.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(overview.contains("class=\"eta\""), "{overview}");
    let doc = wait_for_end(&direct, &id, Duration::from_secs(90)).await;
    assert_eq!(doc.state(), JobState::Completed, "{:?}", doc.error);
    app.shutdown().await;
}
