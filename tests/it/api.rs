use crate::helpers::*;
use std::time::Duration;
use vhd_replicator::{job::parse_job_json, state::JobState};

/// The job routes: 400 naming the field for bad jobs, 202 with an id for good
/// ones, the job view of CONTRACT.md, 404 for unknown jobs, metrics and readiness.
#[tokio::test]
async fn job_routes_metrics_and_health() {
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    let http = reqwest::Client::new();
    let source = env.source_url("api.vhd");
    upload_sample(&app.control, &source, 2, 1, 5).await;

    bad_jobs_are_refused_naming_the_field(&app, &source).await;
    let id = format!("api-{}", env.id);
    let r = http
        .post(app.url("/v1/jobs"))
        .body(env.job_json(&id, &source, "windows", 30))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["job_id"], id.as_str());
    let doc = wait_for_end(&app.control, &id, Duration::from_secs(60)).await;
    assert_eq!(doc.state(), JobState::Completed);

    the_job_view_follows_the_contract(&app, &id).await;
    let metrics = metrics_showing(
        &app,
        &[
            "vhdrep_jobs{state=\"running\"} 0",
            "vhdrep_jobs_finished_total{outcome=\"completed\"} 1",
            "vhdrep_copies_in_flight{account=\"dst1\"} 0",
            "vhdrep_copy_bytes_total{account=\"dst1\"} 2097664",
            "vhdrep_copy_bytes_total{account=\"dst2\"} 2097664",
            "vhdrep_build_info{version=\"",
            "vhdrep_storage_requests_total{account=\"dst1\",operation=\"start_copy\",status_class=\"2xx\"} 1",
        ],
    )
    .await;
    assert!(
        !metrics.contains("vhdrep_job_progress_ratio{job_id"),
        "ended jobs leave the progress gauge"
    );
    assert_eq!(
        http.get(app.url("/readyz")).send().await.unwrap().status(),
        200
    );
    let page = http
        .get(app.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&id) && page.contains("class=\"bar\""),
        "{page}"
    );
    let job_page = http
        .get(app.url(&format!("/jobs/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(job_page.status(), 200);
    assert!(job_page.text().await.unwrap().contains("Replicas"));
    assert_eq!(
        http.get(app.url("/jobs/no-such-job"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    app.shutdown().await;
}

/// A job cancelled while still queued ends cancelled without copying anything.
#[tokio::test]
async fn cancelling_a_queued_job() {
    let env = TestEnv::new("");
    let control = env.control().await;
    let source = env.source_url("cancel.vhd");
    upload_sample(&control, &source, 2, 1, 6).await;
    let id = format!("cancel-{}", env.id);
    control
        .submit(parse_job_json(&env.job_json(&id, &source, "windows", 40)).unwrap())
        .await
        .unwrap();
    let d = control.cancel(&id).await.unwrap();
    assert!(d.cancel_requested);
    let app = TestApp::spawn(&env).await;
    let doc = wait_for_end(&app.control, &id, Duration::from_secs(30)).await;
    assert_eq!(doc.state(), JobState::Cancelled);
    for account in ["dst1", "dst2", "dst3"] {
        assert!(app
            .control
            .store
            .list(account, &env.container(), "")
            .await
            .unwrap()
            .is_empty());
    }
    assert!(drain(app.control.handoff.as_ref()).await.is_empty());
    // Cancelling an ended job is accepted and changes nothing.
    let r = reqwest::Client::new()
        .post(app.url(&format!("/v1/jobs/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["state"], "cancelled");
    app.shutdown().await;
}

/// With an admin token configured, mutating routes need it; reads do not.
#[tokio::test]
async fn admin_token_guards_mutating_routes() {
    let env = TestEnv::new("");
    let mut secrets = keys();
    secrets.insert("IT_ADMIN_TOKEN".into(), "s3cret-token".into());
    let app = TestApp::spawn_with(env.settings_with(secrets)).await;
    let http = reqwest::Client::new();
    let job = env.job_json(
        &format!("tok-{}", env.id),
        &env.source_url("t.vhd"),
        "linux",
        1,
    );
    let r = http
        .post(app.url("/v1/jobs"))
        .body(job.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(app.url("/v1/jobs"))
        .bearer_auth("wrong")
        .body(job.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(app.url("/v1/jobs/x/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(app.url("/v1/jobs"))
        .bearer_auth("s3cret-token")
        .body(job)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        http.get(app.url("/v1/jobs")).send().await.unwrap().status(),
        200
    );
    app.shutdown().await;
}

/// `GET /v1/jobs` lists summaries newest first in pages that chain by cursor,
/// and a corrupt job document is reported, not fatal to the list.
#[tokio::test]
async fn the_job_list_pages_and_survives_a_corrupt_document() {
    use vhd_replicator::state::JobDocument;
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    let spec = parse_job_json(&env.job_json("x", &env.source_url("x.vhd"), "windows", 20)).unwrap();
    for i in 0..7 {
        let mut d = JobDocument::replicate(
            vhd_replicator::job::JobId::parse(&format!("page-{i}")).unwrap(),
            spec.clone(),
        );
        d.created_at += time::Duration::seconds(i);
        app.control.state.create(&d).await.unwrap();
    }
    app.control
        .store
        .put_block_blob(
            &vhd_replicator::storage::BlobPath::new(
                "ops",
                &env.settings().control.state_container,
                "jobs/zz-broken.json",
            ),
            bytes::Bytes::from_static(b"not json"),
            &Default::default(),
            vhd_replicator::storage::Condition::Always,
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut url = app.url("/v1/jobs?limit=3");
    let mut pages = 0;
    loop {
        let page: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        pages += 1;
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 3);
        for j in jobs {
            assert_eq!(j["state"], "queued");
            assert_eq!(j["pool_id"], format!("pool-{}", env.id));
            seen.push(j["job_id"].as_str().unwrap().to_owned());
        }
        assert_eq!(page["skipped"][0]["name"], "zz-broken", "{page}");
        match page["next"].as_str() {
            Some(next) => url = app.url(&format!("/v1/jobs?limit=3&cursor={next}")),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..7).rev().map(|i| format!("page-{i}")).collect();
    assert_eq!(seen, expected, "newest first, each once");
    assert_eq!(
        reqwest::get(app.url("/v1/jobs?cursor=nonsense"))
            .await
            .unwrap()
            .status(),
        400
    );
    let page = reqwest::get(app.url("/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("page-6") && page.contains("zz-broken"),
        "{page}"
    );
    app.shutdown().await;
}

/// `POST /v1/jobs` answers 400 naming the field for a bad value, an unknown
/// field and a source in no configured account.
async fn bad_jobs_are_refused_naming_the_field(app: &TestApp, source: &str) {
    let http = reqwest::Client::new();
    let bad =
        serde_json::json!({"source": source, "pool": {"id": "p", "os": "windows", "nodes": -1}});
    let r = http
        .post(app.url("/v1/jobs"))
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().starts_with("pool.nodes"),
        "{body}"
    );
    let unknown = serde_json::json!({"source": source, "pool": {"id": "p", "os": "windows", "nodes": 1}, "colour": "red"});
    let r = http
        .post(app.url("/v1/jobs"))
        .json(&unknown)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("colour"));
    let elsewhere = serde_json::json!({"source": "https://other.blob.core.windows.net/c/b.vhd", "pool": {"id": "p", "os": "windows", "nodes": 1}});
    let r = http
        .post(app.url("/v1/jobs"))
        .json(&elsewhere)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("source"));
}

/// `GET /v1/jobs/{id}` is the job view of CONTRACT.md; the job is listed; an
/// unknown job is 404.
async fn the_job_view_follows_the_contract(app: &TestApp, id: &str) {
    let http = reqwest::Client::new();
    let view: serde_json::Value = http
        .get(app.url(&format!("/v1/jobs/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["job_id"], id);
    assert_eq!(view["state"], "completed");
    assert!(view["error"].is_null());
    assert!(view.get("phase").is_some());
    let replicas = view["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2);
    for r in replicas {
        for k in ["uri", "account", "state", "bytes_copied", "bytes_total"] {
            assert!(r.get(k).is_some(), "replica view lacks {k}: {r}");
        }
        assert_eq!(r["bytes_copied"], r["bytes_total"]);
        assert_eq!(r["state"], "verified");
    }
    let list: serde_json::Value = http
        .get(app.url("/v1/jobs"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["job_id"] == id));
    assert_eq!(
        http.get(app.url("/v1/jobs/no-such-job"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}
