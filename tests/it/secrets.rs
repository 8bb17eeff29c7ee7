//! Secrets (account keys, SAS signatures, ARM tokens) never appear in anything
//! the daemon writes: its log at trace level, the job's document, the pool's
//! record, the hand-off message and file, and its own `/metrics`. Each test
//! looks for the secrets actually sent on the wire (read at the behaviour
//! proxy or the fake ARM), in every encoding a log or a URL could give them,
//! on one of the paths that carry them: async copies, ranged copies with
//! failing page writes and relays, and a gallery job.

use crate::crash::{Daemon, FAST};
use crate::helpers::*;
use std::{collections::BTreeSet, path::Path, time::Duration};
use vhd_replicator::{
    control::Control,
    state::JobState,
    testkit::proxy::{Proxy, ProxyAction, ProxyConfig, ProxyRule},
};

/// Every way a secret could be written: as is, percent-encoded with upper- and
/// lower-case hex (as URLs and query strings carry it), and percent-encoded once
/// more (a URL that already carried it, encoded again for a log or a label).
fn encodings(secret: &str) -> Vec<String> {
    let once = percent_encodings(secret);
    let mut all = once.clone();
    for e in &once {
        all.extend(percent_encodings(e));
    }
    all.sort();
    all.dedup();
    all
}

fn percent_encodings(secret: &str) -> Vec<String> {
    let upper: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let lower = {
        let mut out = String::new();
        let mut chars = upper.chars().peekable();
        while let Some(c) = chars.next() {
            out.push(c);
            if c == '%' {
                for _ in 0..2 {
                    if let Some(h) = chars.next() {
                        out.push(h.to_ascii_lowercase());
                    }
                }
            }
        }
        out
    };
    let mut all = vec![secret.to_owned(), upper, lower];
    all.dedup();
    all
}

/// The secrets to look for: every SAS signature the proxy saw in a copy
/// source (there must be some), every account key, and `extra`, each in every
/// encoding.
fn secrets(proxy: &Proxy, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let signatures: BTreeSet<String> = proxy
        .copy_sources()
        .iter()
        .filter_map(|(_, source)| url::Url::parse(source).ok())
        .filter_map(|u| {
            u.query_pairs()
                .find(|(k, _)| k == "sig")
                .map(|(_, v)| v.into_owned())
        })
        .collect();
    assert!(
        !signatures.is_empty(),
        "the cross-account copies carried signed SAS"
    );
    let mut out: Vec<(String, String)> = Vec::new();
    for sig in &signatures {
        out.extend(
            encodings(sig)
                .into_iter()
                .map(|e| ("a SAS signature".to_owned(), e)),
        );
    }
    for (name, key) in keys().iter().filter(|(k, _)| k.starts_with("VHDREP_KEY_")) {
        out.extend(encodings(key).into_iter().map(|e| (name.clone(), e)));
    }
    for (name, secret) in extra {
        out.extend(
            encodings(secret)
                .into_iter()
                .map(|e| ((*name).to_owned(), e)),
        );
    }
    out
}

/// A port for the daemon's HTTP listener.
fn free_listen() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// Everything job `id` made the daemon write, by name.
async fn artefacts(
    direct: &Control,
    env: &TestEnv,
    id: &str,
    daemon: &Daemon,
    listen: &str,
) -> Vec<(&'static str, String)> {
    let metrics = reqwest::get(format!("http://{listen}/metrics"))
        .await
        .expect("the daemon serves /metrics")
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("vhdrep_copy_bytes_total"), "{metrics}");
    let log = daemon.log();
    assert!(
        log.len() > 10_000,
        "trace logging was on ({} bytes)",
        log.len()
    );
    let read = |name: String| async move {
        let blob = vhd_replicator::storage::BlobPath::new(
            "ops",
            &direct.settings.control.state_container,
            &name,
        );
        String::from_utf8_lossy(&direct.store.read(&blob, None).await.unwrap().0).into_owned()
    };
    let job_doc = read(format!("jobs/{id}.json")).await;
    let pool_doc = read(format!("pools/pool-{}.json", env.id)).await;
    let handoff_queue = drain(direct.handoff.as_ref()).await.join("\n");
    assert!(handoff_queue.contains(id), "the hand-off message was read");
    let handoff_file =
        std::fs::read_to_string(env.dir.path().join("handoff").join(format!("{id}.json"))).unwrap();
    vec![
        ("log", log),
        ("job document", job_doc),
        ("pool record", pool_doc),
        ("hand-off message", handoff_queue),
        ("hand-off file", handoff_file),
        ("/metrics", metrics),
    ]
}

/// Fails naming the artefact and the secret if any artefact holds any secret.
fn assert_none_in(artefacts: &[(&str, String)], secrets: &[(String, String)]) {
    for (what, text) in artefacts {
        for (name, secret) in secrets {
            assert!(
                !text.contains(secret.as_str()),
                "the {what} contains {name} ({secret})"
            );
        }
    }
}

/// Runs job `id` (already on the intake queue) in a daemon process with
/// `config`, logging at trace level, and returns it with its listener once the
/// job completed.
async fn run_to_completion(
    direct: &Control,
    env: &TestEnv,
    config: &Path,
    id: &str,
    extra_env: &[(&str, &str)],
) -> (Daemon, String) {
    let listen = free_listen();
    let mut vars = vec![
        ("RUST_LOG", "trace"),
        ("VHDREP__SERVICE__LISTEN", listen.as_str()),
    ];
    vars.extend_from_slice(extra_env);
    let daemon = Daemon::start(config, env.dir.path().join("trace.log"), &vars);
    let doc = wait_for_end(direct, id, Duration::from_secs(90)).await;
    assert_eq!(
        doc.state(),
        JobState::Completed,
        "{:?}\n{}",
        doc.error,
        daemon.log()
    );
    (daemon, listen)
}

/// Async copies across accounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_anything_the_daemon_writes() {
    let env = TestEnv::new(FAST);
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig::transparent(BLOB)).await.unwrap();
    let config = env.proxied_config_file(&proxy.url());
    let source = env.source_url("secret.vhd");
    upload_sample(&direct, &source, 2, 1, 40).await;
    let id = format!("secret-{}", env.id);
    direct
        .intake
        .send(&env.job_json(&id, &source.replace(BLOB, &proxy.url()), "windows", 60))
        .await
        .unwrap();
    let (daemon, listen) = run_to_completion(&direct, &env, &config, &id, &[]).await;
    let written = artefacts(&direct, &env, &id, &daemon, &listen).await;
    assert_none_in(&written, &secrets(&proxy, &[]));
}

/// Ranged copies (Put Page From URL, whose source carries a SAS) with relays,
/// page writes into one replica failing with 500 beyond what the request
/// retries absorb, and random 503s on the way: the failure paths log what
/// failed, never the source URL's signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_on_the_ranged_path_with_failing_writes_and_relays() {
    let env = TestEnv::new(&format!("{FAST}copy_method = \"ranges\"\nrelays = true\n"));
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        signers: crate::ranges::signers(),
        // Into one replica, more failed writes than the request retries (6)
        // absorb: the ranged copy itself meets failed writes and retries them.
        rules: vec![ProxyRule {
            query_contains: Some("comp=page".into()),
            header: Some("x-ms-copy-source"),
            ..ProxyRule::new(
                "PUT",
                "-0001.vhd",
                ProxyAction::Answer(500, "InternalError"),
                14,
            )
        }],
        busy_rate: 0.05,
        seed: 77,
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let config = env.proxied_config_file(&proxy.url());
    let source = env.source_url("ranged-secret.vhd");
    upload_sample(&direct, &source, 8, 3, 41).await;
    let id = format!("rsecret-{}", env.id);
    direct
        .intake
        .send(&env.job_json(&id, &source.replace(BLOB, &proxy.url()), "windows", 120))
        .await
        .unwrap();
    let (daemon, listen) = run_to_completion(&direct, &env, &config, &id, &[]).await;
    let writes = proxy.page_writes();
    assert!(!writes.is_empty(), "the replicas were copied by ranges");
    // Two replicas per account: some were copied inside one account, whose
    // source needs a SAS too.
    let inside = proxy
        .copy_sources()
        .iter()
        .filter(|(dest, source)| {
            let account = |p: &str| {
                p.trim_start_matches('/')
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .to_owned()
            };
            let src_path = url::Url::parse(source)
                .map(|u| u.path().to_owned())
                .unwrap_or_default();
            account(dest) == account(&src_path) && source.contains("sig=")
        })
        .count();
    assert!(
        inside > 0,
        "ranged copies inside one account carried a signed source"
    );
    let written = artefacts(&direct, &env, &id, &daemon, &listen).await;
    assert_none_in(&written, &secrets(&proxy, &[]));
}

/// A job that publishes to a gallery: the ARM token (from the Azure CLI
/// credential, a stand-in `az`) joins the SAS signatures and keys looked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_a_gallery_job() {
    let arm = crate::gallery::fake_arm(3).await;
    let (env, _) = crate::gallery::gallery_env(&arm);
    let proxy = Proxy::start(ProxyConfig::transparent(BLOB)).await.unwrap();
    let direct = env.control().await;
    let config = env.dir.path().join("gallery-secret.toml");
    std::fs::write(&config, merge_toml(&env.proxied_toml(&proxy.url()), FAST)).unwrap();
    let path = crate::gallery::fake_az(env.dir.path());
    let source = env.source_url("gallery-secret.vhd");
    upload_sample(&direct, &source, 2, 1, 42).await;
    let id = format!("gsecret-{}", env.id);
    direct
        .intake
        .send(&env.job_json(&id, &source.replace(BLOB, &proxy.url()), "windows", 100))
        .await
        .unwrap();
    let (daemon, listen) = run_to_completion(&direct, &env, &config, &id, &[("PATH", &path)]).await;
    assert!(
        arm.requests().iter().any(|r| r.authorized),
        "the daemon called ARM with the token"
    );
    let written = artefacts(&direct, &env, &id, &daemon, &listen).await;
    assert_none_in(
        &written,
        &secrets(&proxy, &[("the ARM token", crate::gallery::TOKEN)]),
    );
}
