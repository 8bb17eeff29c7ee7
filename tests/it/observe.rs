//! Observability against a running job: the live /metrics pass `promtool check
//! metrics`, a real Prometheus server scrapes the daemon and answers queries for
//! job progress and copy bytes, and the status page shows the job in headless
//! Chromium.

use crate::helpers::*;
use std::{
    io::Write,
    process::{Child, Command, Stdio},
    time::Duration,
};
use vhd_replicator::{
    job::parse_job_json,
    state::JobState,
    testkit::proxy::{Proxy, ProxyConfig},
};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A job whose copies the proxy holds pending for `hold`, on a running daemon.
async fn running_job(env: &TestEnv, hold: Duration, seed: u8) -> (TestApp, Proxy, String) {
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        hold_copies: Some(hold),
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let source = env.source_url("observe.vhd");
    upload_sample(&direct, &source, 2, 1, seed).await;
    let app = TestApp::spawn_with(env.proxied(&proxy.url(), "")).await;
    let id = format!("observe-{}", env.id);
    app.control
        .submit(
            parse_job_json(&env.job_json(&id, &source.replace(BLOB, &proxy.url()), "windows", 60))
                .unwrap(),
        )
        .await
        .unwrap();
    (app, proxy, id)
}

async fn query(prometheus: &str, q: &str) -> Vec<serde_json::Value> {
    let mut url = url::Url::parse(&format!("{prometheus}/api/v1/query")).unwrap();
    url.query_pairs_mut().append_pair("query", q);
    let Ok(rsp) = reqwest::Client::new().get(url).send().await else {
        return Vec::new(); // not up yet
    };
    let rsp: serde_json::Value = rsp.json().await.unwrap_or_default();
    rsp["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// promtool accepts the live exposition (mid-job, per-job gauge included), and a
/// real Prometheus scraping the daemon answers for job progress and copy bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_progress_and_bytes_and_promtool_agrees() {
    let env = TestEnv::new("[engine]\ncheckpoint_seconds = 1\n");
    let (app, _proxy, id) = running_job(&env, Duration::from_secs(4), 80).await;
    let port = free_port();
    let dir = env.dir.path();
    let prometheus = start_prometheus(dir, port, &app.addr.to_string()).await;
    let base = format!("http://127.0.0.1:{port}");

    // Mid-job: progress is exported per job, and promtool accepts the exposition.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen_progress = false;
    let mut checked = false;
    while tokio::time::Instant::now() < deadline && !(seen_progress && checked) {
        let text = reqwest::get(app.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if !checked && text.contains(&format!("vhdrep_job_progress_ratio{{job_id=\"{id}\"}}")) {
            promtool_accepts(&text);
            checked = true;
        }
        if !seen_progress {
            let r = query(
                &base,
                &format!("vhdrep_job_progress_ratio{{job_id=\"{id}\"}}"),
            )
            .await;
            seen_progress = !r.is_empty();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(checked, "the per-job gauge never showed on /metrics");
    assert!(
        seen_progress,
        "Prometheus never answered for the job's progress"
    );

    let doc = wait_for_end(&app.control, &id, Duration::from_secs(60)).await;
    assert_eq!(doc.state(), JobState::Completed);
    let expected: f64 = doc.replicas.iter().map(|r| r.bytes_total as f64).sum();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = query(&base, "sum(vhdrep_copy_bytes_total)").await;
        let got: f64 = r
            .first()
            .and_then(|v| v["value"][1].as_str()?.parse().ok())
            .unwrap_or(0.0);
        if got == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "copy bytes in Prometheus: {got}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The finished-jobs counter moves just after the job's last write: wait for a
    // scrape that shows it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let finished = query(&base, "vhdrep_jobs_finished_total{outcome=\"completed\"}").await;
        if finished.first().and_then(|v| v["value"][1].as_str()) == Some("1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "completed jobs in Prometheus: {finished:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(prometheus);
    app.shutdown().await;
}

/// The status pages, loaded in headless Chromium during a job: the overview
/// shows the job, its state and a progress bar; its page shows a bar per
/// replica with its account; both refresh themselves and use no external assets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_running_job_in_chromium() {
    let env = TestEnv::new("[engine]\ncheckpoint_seconds = 1\n");
    let (app, _proxy, id) = running_job(&env, Duration::from_secs(8), 81).await;
    // Wait until a copy has made progress (a partly filled bar).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !app
        .control
        .state
        .load(&id)
        .await
        .unwrap()
        .is_some_and(|(d, _)| {
            d.replicas
                .iter()
                .any(|r| r.bytes_copied * 4 > r.bytes_total)
        })
    {
        assert!(tokio::time::Instant::now() < deadline, "no copy progressed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = env.dir.path().join("chromium");
    let overview = env.dir.path().join("status.png");
    let (dom, shot) = chromium_capture(&app.url("/"), &profile, &overview, (1200, 800)).await;
    assert!(
        dom.contains("<h1><a href=\"/\">vhd-replicator</a></h1>"),
        "{dom}"
    );
    assert!(dom.contains(&id), "the job is listed: {dom}");
    assert!(dom.contains("running"), "its state is shown: {dom}");
    assert_eq!(
        dom.matches("class=\"bar\"").count(),
        1,
        "a bar for the job: {dom}"
    );
    assert!(dom.contains("setInterval"), "the page refreshes itself");
    assert!(
        !dom.contains("<script src") && !dom.contains("<link"),
        "no external assets"
    );
    assert!(shot, "a screenshot was taken");
    let job_shot = env.dir.path().join("job.png");
    let (job_dom, shot) = chromium_capture(
        &app.url(&format!("/jobs/{id}")),
        &profile,
        &job_shot,
        (1200, 800),
    )
    .await;
    assert!(shot);
    assert_eq!(
        job_dom.matches("class=\"bar\"").count(),
        1 + 3,
        "a bar for the job and one per replica: {job_dom}"
    );
    for account in ["dst1", "dst2", "dst3"] {
        assert!(job_dom.contains(account), "replica account {account} shown");
    }
    keep_screenshot(&overview, "running-job-overview.png");
    keep_screenshot(&job_shot, "running-job.png");
    let pixels = Pixels::read(&job_shot);
    eprintln!("screenshot: {pixels:?}");
    assert_eq!((pixels.width, pixels.height), (1200, 800));
    // Not a blank page: dark text (the heading, the job, the accounts, the
    // filled part of the bars) on a light page.
    assert!(pixels.dark > 2_000, "text on the page: {pixels:?}");
    assert!(
        pixels.light * 2 > pixels.width * pixels.height,
        "a light page: {pixels:?}"
    );
    wait_for_end(&app.control, &id, Duration::from_secs(60)).await;
    app.shutdown().await;
}

/// The sum of every series of `name` in an exposition, and how many there are.
fn series_sum(text: &str, name: &str) -> (f64, usize) {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (values.iter().sum(), values.len())
}

/// A fresh daemon exports every series whose labels the configuration knows at
/// zero (so `rate()` and alerts have a series before the first event), and a
/// daemon stopped while a copy's request hangs (its job task aborted at the end
/// of the grace period) leaves no copy in flight and no job running.
#[tokio::test]
async fn known_series_start_at_zero_and_gauges_do_not_leak_on_shutdown() {
    use vhd_replicator::testkit::proxy::{ProxyAction, ProxyRule};
    let env = TestEnv::new("[service]\nshutdown_grace_seconds = 1\n");
    let direct = env.control().await;
    // Every status request on a replica hangs: a copy is stuck mid-request.
    let proxy = Proxy::start(ProxyConfig {
        rules: vec![ProxyRule::new(
            "HEAD",
            &format!("/it-{}/", env.id),
            ProxyAction::Swallow,
            1000,
        )],
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let app =
        TestApp::spawn_with(env.proxied(&proxy.url(), "[engine]\nrequest_timeout_seconds = 120\n"))
            .await;
    let fresh = reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "vhdrep_copies_in_flight{account=\"dst1\"} 0",
        "vhdrep_copy_bytes_total{account=\"dst3\"} 0",
        "vhdrep_storage_throttled_total{account=\"dst2\"} 0",
        "vhdrep_storage_retries_total{account=\"ops\",reason=\"throttled\"} 0",
        "vhdrep_storage_retries_total{account=\"dst1\",reason=\"timeout\"} 0",
        "vhdrep_replicas_finished_total{outcome=\"failed\"} 0",
        "vhdrep_jobs_finished_total{outcome=\"cancelled\"} 0",
        "vhdrep_copy_duration_seconds_count{kind=\"cross_account\"} 0",
        "vhdrep_checkpoint_failures_total 0",
    ] {
        assert!(fresh.contains(line), "missing {line} in\n{fresh}");
    }

    let source = env.source_url("leak.vhd");
    upload_sample(&direct, &source, 2, 1, 17).await;
    let id = format!("leak-{}", env.id);
    let via_proxy = source.replace(BLOB, &proxy.url());
    app.control
        .submit(parse_job_json(&env.job_json(&id, &via_proxy, "windows", 60)).unwrap())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = app.control.metrics.render();
        if series_sum(&text, "vhdrep_copies_in_flight").0 > 0.0 {
            assert!(text.contains("vhdrep_jobs{state=\"running\"} 1"), "{text}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no copy in flight:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = app.control.metrics.clone();
    app.shutdown().await;
    let after = metrics.render();
    let (in_flight, series) = series_sum(&after, "vhdrep_copies_in_flight");
    assert_eq!(
        (in_flight, series),
        (0.0, 5),
        "one series per account:\n{after}"
    );
    assert!(
        after.contains("vhdrep_jobs{state=\"running\"} 0"),
        "{after}"
    );
    assert!(
        !after.contains(&format!("job_id=\"{id}\"")),
        "the ended job's progress series is gone:\n{after}"
    );
}

/// Starts Prometheus scraping `target` every second and waits until it is ready.
async fn start_prometheus(dir: &std::path::Path, port: u16, target: &str) -> Killed {
    std::fs::write(
        dir.join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: vhd-replicator\n    static_configs:\n      - targets: [\"{}\"]\n", target),
    )
    .unwrap();
    let prometheus = Killed(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs (scripts/test.sh installs it)"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let ready = tokio::time::Instant::now() + Duration::from_secs(30);
    while !reqwest::get(format!("{base}/-/ready"))
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            tokio::time::Instant::now() < ready,
            "Prometheus did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    prometheus
}

/// `promtool check metrics` accepts the exposition.
fn promtool_accepts(text: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
