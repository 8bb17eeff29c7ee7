//! The deployment files parse, agree with the product, and pass promtool: every
//! YAML and JSON file under deploy/, the dashboard and alert rules referring only
//! to metrics the daemon exports, the Kubernetes and systemd set-ups doing what
//! the README says.

use std::{collections::BTreeSet, path::Path, process::Command};
use vhd_replicator::metrics::Metrics;
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn deploy_files(ext: &str) -> Vec<std::path::PathBuf> {
    let mut all = Vec::new();
    files(&root().join("deploy"), &mut all);
    all.retain(|p| p.extension().is_some_and(|e| e == ext));
    all.sort();
    all
}

fn yaml(path: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&std::fs::read_to_string(root().join(path)).unwrap()).unwrap()
}

/// Names `vhdrep_*` used in a text (histogram series reduced to their family).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("vhdrep_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        out.insert(family.to_owned());
        rest = &tail[end..];
    }
    out
}

fn exported() -> BTreeSet<String> {
    let m = Metrics::new();
    // Touch every labelled family so it shows in the exposition.
    m.copies_in_flight.with_label_values(&["a"]).set(0);
    m.copy_bytes.with_label_values(&["a"]).inc();
    m.copy_duration
        .with_label_values(&["same_account"])
        .observe(1.0);
    m.job_progress.with_label_values(&["j"]).set(0.5);
    m.gallery_replication.with_label_values(&["j"]).set(0.5);
    m.gallery_stalled.with_label_values(&["j"]).set(1.0);
    for g in [&m.pools.target, &m.pools.current, &m.pools.capacity] {
        g.with_label_values(&["p"]).set(1);
    }
    m.replicas_finished.with_label_values(&["completed"]).inc();
    m.storage_request("a", "op", Some(503));
    m.storage_retries
        .with_label_values(&["a", "throttled"])
        .inc();
    metric_names(&m.render())
}

#[test]
fn every_yaml_and_json_file_parses() {
    let yamls = deploy_files("yaml").into_iter().chain(deploy_files("yml"));
    let mut n = 0;
    for p in yamls {
        let docs = YamlLoader::load_from_str(&std::fs::read_to_string(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(!docs.is_empty(), "{} is empty", p.display());
        n += 1;
    }
    for p in deploy_files("json") {
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        n += 1;
    }
    assert!(n >= 8, "found only {n} files");
}

#[test]
fn the_dashboard_and_alerts_use_only_exported_metrics() {
    let exported = exported();
    let dashboard =
        std::fs::read_to_string(root().join("deploy/grafana/vhd-replicator.json")).unwrap();
    let alerts = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    let used: BTreeSet<String> = metric_names(&dashboard)
        .union(&metric_names(&alerts))
        .cloned()
        .collect();
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "unknown metrics {unknown:?}; exported {exported:?}"
    );
    // The dashboard shows what the issue asks for.
    let d: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let titles: Vec<String> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap().to_lowercase())
        .collect();
    for want in [
        "throughput by account",
        "jobs by state",
        "progress",
        "throttling",
        "poison",
        "durations",
        "pool nodes",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "no panel for {want}: {titles:?}"
        );
    }
    for name in [
        "vhdrep_job_progress_ratio",
        "vhdrep_queue_poisoned_total",
        "vhdrep_storage_throttled_total",
        "vhdrep_pool_target_nodes",
        "vhdrep_pool_image_capacity_nodes",
    ] {
        assert!(metric_names(&alerts).contains(name), "no alert uses {name}");
    }
    assert!(
        alerts.contains("up{job=\"vhd-replicator\"} == 0"),
        "a daemon-down alert"
    );
}

#[test]
fn promtool_accepts_the_rules_and_the_config() {
    let promtool = Command::new("promtool").arg("--version").output();
    assert!(
        promtool.is_ok(),
        "promtool is missing: scripts/test.sh installs it (Debian package prometheus)"
    );
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(root().join("deploy/prometheus/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SUCCESS: 7 rules found"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(root().join("deploy/prometheus/prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kubernetes_runs_two_probed_non_root_replicas_that_drain() {
    let deployment = &yaml("deploy/kubernetes/deployment.yaml")[0];
    assert_eq!(deployment["kind"].as_str(), Some("Deployment"));
    assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(2));
    let pod = &deployment["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    let daemon_grace =
        vhd_replicator::config::ServiceSettings::default().shutdown_grace_seconds as i64;
    assert!(
        grace > daemon_grace,
        "pod grace {grace} s must exceed the daemon's {daemon_grace} s"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let container = &pod["containers"][0];
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        container["envFrom"][0]["secretRef"]["name"].as_str(),
        Some("vhd-replicator-keys")
    );
    assert_eq!(
        pod["initContainers"][0]["args"][0].as_str(),
        Some("validate")
    );
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    // The config in the ConfigMap is a valid configuration (keys aside).
    let cm = &yaml("deploy/kubernetes/configmap.yaml")[0];
    let toml = cm["data"]["config.toml"].as_str().unwrap();
    let settings =
        vhd_replicator::config::Settings::from_toml(toml).expect("ConfigMap config parses");
    assert_eq!(settings.service.listen, "0.0.0.0:9464");
    let secret = &yaml("deploy/kubernetes/secret.example.yaml")[0];
    // Listening beyond loopback, the daemon refuses to start without the admin
    // token: the Secret the pod reads must hold it.
    assert!(
        !secret["stringData"][settings.service.admin_token_env.as_str()].is_badvalue(),
        "the example Secret lacks the admin token {}",
        settings.service.admin_token_env
    );
    for account in &settings.accounts {
        let var = account.key_env.as_deref().unwrap();
        assert!(
            !secret["stringData"][var].is_badvalue(),
            "the example Secret lacks {var}"
        );
    }
    let monitor = &yaml("deploy/kubernetes/servicemonitor.yaml")[0];
    assert_eq!(
        monitor["spec"]["endpoints"][0]["path"].as_str(),
        Some("/metrics")
    );
}

#[test]
fn docker_and_systemd_follow_the_conventions() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/docker/Dockerfile")).unwrap();
    assert_eq!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count(),
        2,
        "multi-stage"
    );
    let user = dockerfile
        .lines()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER line");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
    let unit =
        std::fs::read_to_string(root().join("deploy/systemd/vhd-replicator.service")).unwrap();
    assert!(unit
        .lines()
        .any(|l| l.starts_with("ExecStartPre=") && l.contains(" validate ")));
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(stop > vhd_replicator::config::ServiceSettings::default().shutdown_grace_seconds);
}
