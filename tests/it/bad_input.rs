//! Bad input, end to end: every case ends in the poison queue with a reason naming
//! the field, or as a failed job with a reason a person can act on, while the
//! daemon keeps serving. (The README's table of these cases follows this file.)

use crate::helpers::*;
use bytes::Bytes;
use std::time::Duration;
use vhd_replicator::{
    intake::PoisonMessage, job::parse_job_json, state::JobState, storage::BlobPath,
};

/// Messages refused before any work: each lands in the poison queue, wrapped with
/// its reason, and a valid job id gets a failed state document.
#[tokio::test]
async fn refused_messages_each_name_their_problem() {
    let env = TestEnv::new("[[accounts]]\nname = \"srconly\"\nblob_endpoint = \"http://127.0.0.1:10000/srconly\"\nqueue_endpoint = \"http://127.0.0.1:10001/srconly\"\nkey_env = \"VHDREP_KEY_SRC\"\ndestination = false\n");
    let app = TestApp::spawn(&env).await;
    let src = env.source_url("x.vhd");
    let novm = format!("novm-{}", env.id);
    let cases = refused_cases(&src, &novm);
    for (text, _) in &cases {
        app.control.intake.send(text).await.unwrap();
    }
    // A good job after all of them still completes.
    let source = env.source_url("good.vhd");
    upload_sample(&app.control, &source, 2, 1, 50).await;
    let good = format!("good-{}", env.id);
    app.control
        .submit(parse_job_json(&env.job_json(&good, &source, "linux", 1)).unwrap())
        .await
        .unwrap();
    let doc = wait_for_end(&app.control, &good, Duration::from_secs(60)).await;
    assert_eq!(doc.state(), JobState::Completed);

    let poisoned: Vec<PoisonMessage> = drain(app.control.poison.as_ref())
        .await
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect();
    assert_eq!(poisoned.len(), cases.len());
    for (text, expected) in &cases {
        let p = poisoned
            .iter()
            .find(|p| &p.original == text)
            .unwrap_or_else(|| panic!("not poisoned: {text}"));
        assert!(
            p.reason.contains(expected),
            "{text}\n  got:      {}\n  expected: {expected}",
            p.reason
        );
        assert_eq!(p.dequeue_count, 1);
    }
    assert!(
        drain(app.control.intake.as_ref()).await.is_empty(),
        "nothing left on the intake queue"
    );
    let (failed, _) = app
        .control
        .state
        .load(&novm)
        .await
        .unwrap()
        .expect("a valid job id gets a state document");
    assert_eq!(failed.state(), JobState::Failed);
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("pool.vm_size:")),
        "{:?}",
        failed.error
    );
    app.shutdown().await;
}

/// Sources that exist but are not a Batch VHD fail the job with the reason.
#[tokio::test]
async fn unusable_sources_fail_with_the_reason() {
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    let c = format!("it-{}-src", env.id);
    app.control.store.ensure_container("src", &c).await.unwrap();
    let image = vhd_replicator::vhd::sample_image(2, 1, 60);
    let len = image.len();
    // A block blob.
    app.control
        .store
        .put_block_blob(
            &BlobPath::new("src", &c, "block.vhd"),
            Bytes::from(image.clone()),
            &Default::default(),
            vhd_replicator::storage::Condition::Always,
        )
        .await
        .unwrap();
    // A damaged footer (checksum).
    let mut damaged = image.clone();
    damaged[len - 100] ^= 0xff;
    app.control
        .store
        .put_page_blob(
            &BlobPath::new("src", &c, "damaged.vhd"),
            Bytes::from(damaged),
        )
        .await
        .unwrap();
    // A dynamic VHD's footer (disk type 3).
    let mut dynamic = image.clone();
    dynamic[len - 512 + 60..len - 512 + 64].copy_from_slice(&3u32.to_be_bytes());
    let footer = &mut dynamic[len - 512..];
    footer[64..68].fill(0);
    let sum: u32 = footer.iter().fold(0u32, |a, b| a.wrapping_add(*b as u32));
    footer[64..68].copy_from_slice(&(!sum).to_be_bytes());
    app.control
        .store
        .put_page_blob(
            &BlobPath::new("src", &c, "dynamic.vhd"),
            Bytes::from(dynamic),
        )
        .await
        .unwrap();
    // A size that is not a whole number of MiB plus the footer.
    app.control
        .store
        .put_page_blob(
            &BlobPath::new("src", &c, "odd.vhd"),
            Bytes::from(vec![0u8; 1024 * 1024 + 2048]),
        )
        .await
        .unwrap();

    let cases = [
        (
            "block.vhd",
            "is a Block blob; a VHD for Batch must be a page blob",
        ),
        ("damaged.vhd", "checksum is wrong"),
        ("dynamic.vhd", "disk type is 3 (dynamic)"),
        ("odd.vhd", "not a whole number of MiB"),
        ("missing.vhd", "does not exist"),
    ];
    for (name, _) in cases {
        let id = format!("{}-{}", name.trim_end_matches(".vhd"), env.id);
        app.control
            .submit(parse_job_json(&env.job_json(&id, &env.source_url(name), "linux", 1)).unwrap())
            .await
            .unwrap();
    }
    for (name, expected) in cases {
        let id = format!("{}-{}", name.trim_end_matches(".vhd"), env.id);
        let doc = wait_for_end(&app.control, &id, Duration::from_secs(60)).await;
        assert_eq!(doc.state(), JobState::Failed, "{name}");
        let error = doc.error.unwrap();
        assert!(error.contains(expected), "{name}: {error}");
        assert!(
            error.contains(&env.source_url(name)),
            "the error names the source: {error}"
        );
    }
    app.shutdown().await;
}

/// The refused messages and what each one's reason says: each field wrong in
/// turn in an otherwise valid job (`src` its source, `novm` a valid job id of a
/// job without a VM size).
fn refused_cases(src: &str, novm: &str) -> Vec<(String, &'static str)> {
    let job = |extra: serde_json::Value| {
        let mut j =
            serde_json::json!({"source": src, "pool": {"id": "p", "os": "windows", "nodes": 10}});
        for (k, v) in extra.as_object().unwrap() {
            if k == "pool" {
                for (pk, pv) in v.as_object().unwrap() {
                    j["pool"][pk] = pv.clone();
                }
            } else {
                j[k] = v.clone();
            }
        }
        j.to_string()
    };
    vec![
        (
            "not json at all".into(),
            "message: the message is neither JSON nor base64",
        ),
        (
            "\"a string\"".into(),
            "message: the job must be a JSON object",
        ),
        (
            job(serde_json::json!({"colour": "red"})),
            "unknown field `colour`",
        ),
        (job(serde_json::json!({"job_id": "Bad_Id!"})), "job_id:"),
        (
            job(serde_json::json!({"source": "ftp://host/c/b.vhd"})),
            "source: the source must be an http(s) blob URL",
        ),
        (
            job(serde_json::json!({"source": "https://elsewhere.blob.core.windows.net/c/b.vhd"})),
            "is not in any configured account",
        ),
        (job(serde_json::json!({"pool": {"os": "beos"}})), "pool.os:"),
        (
            job(serde_json::json!({"pool": {"nodes": 0}})),
            "pool.nodes: must be at least 1",
        ),
        (
            job(serde_json::json!({"pool": {"nodes": -3}})),
            "pool.nodes:",
        ),
        (
            job(serde_json::json!({"pool": {"nodes": 10_000_000}})),
            "pool.nodes: 10000000 is more than any Batch pool holds",
        ),
        (
            job(serde_json::json!({"replicas": 0})),
            "replicas: must be at least 1",
        ),
        (
            job(serde_json::json!({"replicas": 100_000})),
            "replicas: 100000 is more than one job may make",
        ),
        (
            job(serde_json::json!({"pool": {"nodes": 200}, "replicas": 3})),
            "ask for at least 10",
        ),
        (
            job(serde_json::json!({"accounts": ["nosuch"]})),
            "accounts[0]: \"nosuch\" is not a configured account",
        ),
        (
            job(serde_json::json!({"accounts": ["srconly"]})),
            "not a destination account",
        ),
        (
            job(serde_json::json!({"container": "Bad_Container"})),
            "container:",
        ),
        (
            job(serde_json::json!({"pool": {"id": "has space"}})),
            "pool.id:",
        ),
        (
            job(serde_json::json!({"submitted_by": "Not Me!"})),
            "submitted_by:",
        ),
        // Valid in every field but without a VM size, which Batch requires and
        // this configuration has no default for; its valid job id gets a
        // failed state document.
        (
            job(serde_json::json!({"job_id": novm})),
            "pool.vm_size: Batch's Add Pool requires vmSize",
        ),
    ]
}
