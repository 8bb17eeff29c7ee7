use crate::helpers::*;
use std::process::{Command, Output};
use std::time::Duration;

fn run(env_vars: &[(String, String)], args: &[&str]) -> Output {
    let mut cmd = Command::new(binary());
    cmd.args(args);
    for (k, v) in env_vars {
        cmd.env(k, v);
    }
    cmd.env_remove("RUST_LOG");
    cmd.output().expect("binary runs")
}

fn key_env() -> Vec<(String, String)> {
    keys()
        .into_iter()
        .filter(|(k, _)| k.starts_with("VHDREP_KEY_"))
        .collect()
}

/// `validate` reports every problem of a broken config at once, naming each key,
/// and exits 2; a good config passes with 0, and `--online` reaches every account.
#[test]
fn validate_names_every_broken_key() {
    let env = TestEnv::new("");
    let good = env.config_file();
    let out = run(
        &key_env(),
        &["validate", "--config", good.to_str().unwrap()],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &key_env(),
        &["validate", "--online", "--config", good.to_str().unwrap()],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("dst3: reachable"));

    let broken = env
        .toml
        .replace("account = \"ops\"", "account = \"nosuch\"")
        .replace(
            "queue_endpoint = \"http://127.0.0.1:10001/dst2\"",
            "queue_endpoint = \"not a url\"",
        )
        .replace(
            "key_env = \"VHDREP_KEY_DST3\"",
            "key_env = \"VHDREP_KEY_UNSET_FOR_TEST\"",
        )
        .replace(
            "name = \"dst1\"",
            "name = \"dst1\"\nmax_concurrent_copies = 0",
        )
        .replace("name = \"dst2\"", "name = \"dst1\"");
    let path = env.dir.path().join("broken.toml");
    std::fs::write(&path, broken).unwrap();
    let out = run(
        &key_env(),
        &["validate", "--config", path.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "control.account",
        "accounts[3].queue_endpoint",
        "accounts[4].key_env",
        "accounts[2].max_concurrent_copies",
        "accounts[3].name",
        "VHDREP_KEY_UNSET_FOR_TEST",
    ] {
        assert!(err.contains(key), "stderr lacks {key}:\n{err}");
    }
    // An unknown key is refused by name.
    let path = env.dir.path().join("unknown.toml");
    std::fs::write(
        &path,
        env.toml.replace("[engine]", "[engine]\nturbo = true"),
    )
    .unwrap();
    let out = run(
        &key_env(),
        &["validate", "--config", path.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("turbo"));
    // A missing file says so.
    let out = run(&key_env(), &["validate", "--config", "/nonexistent/x.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

/// `plan` prints replicas per account and names without writing; `submit --wait`
/// through the binary exits 0 when the job completes; `status --json` shows it.
#[tokio::test(flavor = "multi_thread")]
async fn plan_submit_wait_and_status_through_the_binary() {
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    let config = env.config_file();
    let config = config.to_str().unwrap().to_owned();
    let source = env.source_url("cli.vhd");
    upload_sample(&app.control, &source, 2, 1, 7).await;

    plan_prints_the_placement_and_refuses_bad_flags(&config, &source);
    // Batch's Add Pool requires a VM size; this configuration has no default.
    let out = run(
        &key_env(),
        &[
            "submit",
            "--config",
            &config,
            "--source",
            &source,
            "--os",
            "linux",
            "--nodes",
            "41",
            "--pool-id",
            "clipool",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pool.vm_size"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let vars = key_env();
    let (cfg, src) = (config.clone(), source.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(
            &vars,
            &[
                "submit",
                "--config",
                &cfg,
                "--source",
                &src,
                "--os",
                "linux",
                "--nodes",
                "41",
                "--pool-id",
                "clipool",
                "--vm-size",
                "STANDARD_D2_V3",
                "--wait",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let job_id = stdout.lines().next().unwrap().trim().to_owned();
    assert!(stdout.contains("completed"), "{stdout}");

    status_shows_the_job(&config, &job_id);
    // A bad submit is a usage error naming the field.
    let out = run(
        &key_env(),
        &[
            "submit",
            "--config",
            &config,
            "--source",
            &source,
            "--os",
            "linux",
            "--nodes",
            "1",
            "--pool-id",
            "bad id!",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pool.id"));
    let _ = tokio::time::timeout(Duration::from_secs(1), async {}).await;
    app.shutdown().await;
}

/// `validate` and `run` refuse an HTTP API beyond loopback without the admin
/// token, naming both keys; with the token set, `validate` passes.
#[tokio::test]
async fn an_open_api_beyond_loopback_is_refused_at_start() {
    let env =
        TestEnv::new("[service]\nlisten = \"0.0.0.0:0\"\nadmin_token_env = \"IT_OPEN_TOKEN\"\n");
    let config = env.config_file().display().to_string();
    for command in ["validate", "run"] {
        let out = run(&key_env(), &[command, "--config", &config]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("service.listen")
                && stderr.contains("service.admin_token_env")
                && stderr.contains("IT_OPEN_TOKEN"),
            "{command}: {stderr}"
        );
    }
    let mut vars = key_env();
    vars.push(("IT_OPEN_TOKEN".into(), "a-long-random-token".into()));
    let out = run(&vars, &["validate", "--config", &config]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The replica lines `plan` prints: index, account, container and name, kept.
fn planned_lines(stdout: &str) -> Vec<(u32, String, bool)> {
    stdout
        .lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix('[')?;
            let (index, rest) = l.split_once("] ")?;
            let kept = rest.ends_with(" (kept)");
            Some((
                index.parse().ok()?,
                rest.trim_end_matches(" (kept)").to_owned(),
                kept,
            ))
        })
        .collect()
}

/// `plan` prints exactly what the job then makes, for a new pool and for a
/// top-up of its image set (the kept replicas first, new ones where fewest are).
#[tokio::test(flavor = "multi_thread")]
async fn plan_prints_exactly_what_the_job_makes() {
    let env = TestEnv::new("");
    let app = TestApp::spawn(&env).await;
    let config = env.config_file().display().to_string();
    let source = env.source_url("planned.vhd");
    upload_sample(&app.control, &source, 2, 1, 8).await;
    let pool = format!("planned-{}", env.id);
    for (job, nodes, kept) in [("first", "40", 0), ("second", "100", 2)] {
        let job_id = format!("{job}-{}", env.id);
        let args = |command: &str| {
            vec![
                command.to_owned(),
                "--config".into(),
                config.clone(),
                "--source".into(),
                source.clone(),
                "--os".into(),
                "windows".into(),
                "--nodes".into(),
                nodes.into(),
                "--pool-id".into(),
                pool.clone(),
                "--job-id".into(),
                job_id.clone(),
                "--vm-size".into(),
                "STANDARD_D2_V3".into(),
            ]
        };
        let plan_args = args("plan");
        let out = run(
            &key_env(),
            &plan_args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let planned = planned_lines(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(planned.iter().filter(|p| p.2).count(), kept, "{planned:?}");
        let mut submit = args("submit");
        submit.push("--wait".into());
        let vars = key_env();
        let out = tokio::task::spawn_blocking(move || {
            run(
                &vars,
                &submit.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        })
        .await
        .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (doc, _) = app.control.state.load(&job_id).await.unwrap().unwrap();
        let made: Vec<(u32, String, bool)> = doc
            .replicas
            .iter()
            .map(|r| {
                (
                    r.index,
                    format!("{}/{}/{}", r.account, r.blob.container, r.blob.name),
                    r.inherited,
                )
            })
            .collect();
        assert_eq!(made, planned, "{job}: the plan printed is the plan made");
    }
    app.shutdown().await;
}

/// `plan` prints replicas per account and names without writing, and refuses
/// bad flags as a usage error naming the field.
fn plan_prints_the_placement_and_refuses_bad_flags(config: &str, source: &str) {
    let out = run(
        &key_env(),
        &[
            "plan",
            "--config",
            config,
            "--source",
            source,
            "--os",
            "windows",
            "--nodes",
            "90",
            "--pool-id",
            "render",
            "--vm-size",
            "STANDARD_D2_V3",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("5 replicas"), "{text}");
    assert!(
        text.contains("dst1: 2") && text.contains("dst2: 2") && text.contains("dst3: 1"),
        "{text}"
    );
    assert!(text.contains("render/dry-run/cli-0004.vhd"), "{text}");
    let out = run(
        &key_env(),
        &[
            "plan",
            "--config",
            config,
            "--source",
            source,
            "--os",
            "windows",
            "--nodes",
            "0",
            "--pool-id",
            "render",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pool.nodes"));
}

/// `status` shows the completed job (JSON, in the list, followed with --watch),
/// an unknown job fails, and cancelling an ended job says so.
fn status_shows_the_job(config: &str, job_id: &str) {
    let out = run(
        &key_env(),
        &["status", "--config", config, job_id, "--json"],
    );
    assert_eq!(out.status.code(), Some(0));
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(view["state"], "completed");
    assert_eq!(view["replicas"].as_array().unwrap().len(), 2);
    // An ended job has its elapsed time and no throughput or ETA to promise.
    assert!(view["elapsed_seconds"].is_u64(), "{view}");
    assert!(view["eta_seconds"].is_null() && view["throughput_bytes_per_second"].is_null());
    assert_eq!(view["estimating"], false);

    let out = run(&key_env(), &["status", "--config", config]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(job_id));
    // --watch on a pipe prints JSON lines with --json, and exits 0 on a completed job.
    let out = run(
        &key_env(),
        &["status", "--config", config, job_id, "--watch", "--json"],
    );
    assert_eq!(out.status.code(), Some(0));
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let view: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(view["state"], "completed");
    let out = run(&key_env(), &["status", "--config", config, "no-such-job"]);
    assert_eq!(out.status.code(), Some(1));
    let out = run(&key_env(), &["cancel", "--config", config, job_id]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("already ended: completed"));
}
