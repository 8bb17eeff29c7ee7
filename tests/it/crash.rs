//! Crash safety and scale-out with the real binary: SIGKILL at random moments,
//! SIGTERM draining, two instances sharing the work, and no secret in anything the
//! daemon writes.

use crate::helpers::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::{
    collections::BTreeSet,
    process::{Child, Command, Stdio},
    time::Duration,
};
use vhd_replicator::{
    state::{JobState, Phase, ReplicaState},
    testkit::proxy::{Proxy, ProxyConfig, ProxyStats},
};

/// Engine settings that make crash tests quick: a short lease, frequent checkpoints.
pub(crate) const FAST: &str =
    "[engine]\nmin_poll_ms = 100\nidle_poll_ms = 100\nlease_seconds = 10\ncheckpoint_seconds = 1\n";

/// A daemon process of the binary.
pub(crate) struct Daemon {
    child: Child,
    log: std::path::PathBuf,
}

impl Daemon {
    pub(crate) fn start(
        config: &std::path::Path,
        log: std::path::PathBuf,
        extra_env: &[(&str, &str)],
    ) -> Self {
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(binary());
        cmd.args(["run", "--config", config.to_str().unwrap()])
            .env("VHDREP__SERVICE__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in keys().iter().filter(|(k, _)| k.starts_with("VHDREP_KEY_")) {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        Self {
            child: cmd.spawn().expect("daemon starts"),
            log,
        }
    }

    pub(crate) fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self, within: Duration) -> Option<Duration> {
        let start = std::time::Instant::now();
        while start.elapsed() < within {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "daemon exited with {status}");
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The copy id of every replica a job has started a copy for.
async fn started_copies(
    control: &vhd_replicator::control::Control,
    id: &str,
) -> std::collections::BTreeMap<u32, String> {
    control
        .state
        .load(id)
        .await
        .unwrap()
        .map(|(d, _)| {
            d.replicas
                .iter()
                .filter_map(|r| r.copy_id.clone().map(|c| (r.index, c)))
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that copies started before an interruption were adopted, not started
/// again: each keeps its copy id to the end, and storage saw exactly one Start
/// Copy per replica.
fn assert_adopted(
    before: &std::collections::BTreeMap<u32, String>,
    doc: &vhd_replicator::state::JobDocument,
    proxy: &Proxy,
    context: &str,
) {
    for r in &doc.replicas {
        if let Some(id) = before.get(&r.index) {
            assert_eq!(
                r.copy_id.as_ref(),
                Some(id),
                "{context}: replica {} was copied again instead of adopted",
                r.index
            );
        }
    }
    let starts = replica_starts(proxy);
    assert!(
        starts.values().all(|n| *n == 1),
        "{context}: a replica's copy was started twice: {starts:?}"
    );
}

/// Waits until the job is running in `phase`.
async fn wait_for_phase(
    control: &vhd_replicator::control::Control,
    id: &str,
    phase: Phase,
    daemon: &Daemon,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((d, _)) = control.state.load(id).await.unwrap() {
            // In the phase, with one of its copies under way and on record.
            let copying = d
                .replicas
                .iter()
                .any(|r| r.state == ReplicaState::Copying && r.copy_id.is_some());
            if d.state() == JobState::Running && d.phase() == Some(phase) && copying {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} never reached {phase:?}:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One crash trial: a job under way behind a proxy that holds copies pending for
/// longer than the claim's lease, the daemon killed with SIGKILL `offset` after
/// the job entered `phase`, a new daemon started. The kill must land in that
/// phase; the resumed job meets its copies still pending, polls them instead of
/// starting them again, and completes with exactly the planned replicas and
/// hand-offs that agree.
async fn crash_trial(phase: Phase, offset: Duration, seed: u64) {
    let env = TestEnv::new(FAST);
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        seed,
        // Longer than the 10 s lease, with room for a loaded machine: the
        // resumed daemon finds them pending.
        hold_copies: Some(Duration::from_secs(17)),
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let source = env.source_url("crash.vhd");
    upload_sample(&direct, &source, 2, 1, seed as u8).await;
    let config = env.proxied_config_file(&proxy.url());
    let id = format!("crash-{}", env.id);
    let via_proxy = source.replace(BLOB, &proxy.url());
    direct
        .intake
        .send(&env.job_json(&id, &via_proxy, "windows", 100))
        .await
        .unwrap();

    let first = Daemon::start(&config, env.dir.path().join("first.log"), &[]);
    wait_for_phase(&direct, &id, phase, &first).await;
    tokio::time::sleep(offset).await;
    let before = started_copies(&direct, &id).await;
    let (at_kill, _) = direct.state.load(&id).await.unwrap().unwrap();
    first.kill9();
    let context = format!("killed {offset:?} into {phase:?}");
    assert_eq!(
        (at_kill.state(), at_kill.phase()),
        (JobState::Running, Some(phase)),
        "{context}: the kill landed elsewhere"
    );
    assert!(!before.is_empty(), "{context}: copies were under way");
    let pending_before = ProxyStats::get(&proxy.stats.pending_answers);
    let second = Daemon::start(&config, env.dir.path().join("second.log"), &[]);
    let doc = wait_for_end(&direct, &id, Duration::from_secs(120)).await;
    assert_eq!(
        doc.state(),
        JobState::Completed,
        "{context}: {:?}\n{}",
        doc.error,
        second.log()
    );
    assert!(
        ProxyStats::get(&proxy.stats.pending_answers) > pending_before,
        "{context}: the resumed daemon met copies still pending"
    );
    assert_adopted(&before, &doc, &proxy, &context);
    assert_eq!(doc.replicas.len(), 5);
    assert!(doc
        .replicas
        .iter()
        .all(|r| r.state == ReplicaState::Verified));
    let planned: BTreeSet<String> = doc
        .replicas
        .iter()
        .map(|r| format!("{}/{}", r.account, r.blob.name))
        .collect();
    let mut found = BTreeSet::new();
    for account in ["dst1", "dst2", "dst3"] {
        for name in direct
            .store
            .list(account, &env.container(), "")
            .await
            .unwrap()
        {
            assert!(found.insert(format!("{account}/{name}")));
        }
    }
    assert_eq!(found, planned, "{context}: extra or missing blobs");
    let handoffs = drain(direct.handoff.as_ref()).await;
    assert!(!handoffs.is_empty(), "at least one hand-off");
    let first_handoff: serde_json::Value = serde_json::from_str(&handoffs[0]).unwrap();
    for h in &handoffs {
        let h: serde_json::Value = serde_json::from_str(h).unwrap();
        assert_eq!(h, first_handoff, "repeated hand-offs agree");
    }
    assert_eq!(first_handoff["job_id"], id.as_str());
    assert_eq!(first_handoff["image_uris"].as_array().unwrap().len(), 5);
    drop(second);
}

/// SIGKILL while seeding and while copying, at seeded offsets into each phase:
/// every kill lands in its phase, and each time a restarted daemon adopts the
/// pending copies (one Start Copy per replica, copy ids kept) and completes the
/// job with exactly the planned replicas, no extra blobs, and agreeing hand-offs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_in_each_phase_then_resume() {
    let mut rng = StdRng::seed_from_u64(20261201);
    let trials: Vec<(Phase, Duration)> = [
        Phase::Seeding,
        Phase::Seeding,
        Phase::Seeding,
        Phase::Copying,
        Phase::Copying,
        Phase::Copying,
    ]
    .into_iter()
    .map(|p| (p, Duration::from_millis(rng.random_range(0..1500))))
    .collect();
    let runs = trials
        .iter()
        .enumerate()
        .map(|(i, (phase, offset))| crash_trial(*phase, *offset, 100 + i as u64));
    futures::future::join_all(runs).await;
}

/// SIGTERM: the daemon stops taking work, checkpoints, makes its message visible
/// again at once and exits well within the grace period; another instance then
/// resumes the job without waiting for the lease to lapse, meets the copies still
/// pending and adopts them (one Start Copy per replica, copy ids kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_hands_the_job_over_promptly() {
    let env = TestEnv::new("[engine]\nmin_poll_ms = 100\nidle_poll_ms = 100\nlease_seconds = 60\ncheckpoint_seconds = 1\n[service]\nshutdown_grace_seconds = 5\n");
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        hold_copies: Some(Duration::from_secs(10)),
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let source = env.source_url("term.vhd");
    upload_sample(&direct, &source, 2, 1, 9).await;
    let config = env.proxied_config_file(&proxy.url());
    let id = format!("term-{}", env.id);
    direct
        .intake
        .send(&env.job_json(&id, &source.replace(BLOB, &proxy.url()), "linux", 80))
        .await
        .unwrap();
    let mut first = Daemon::start(&config, env.dir.path().join("first.log"), &[]);
    // Wait for copies to be under way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((d, _)) = direct.state.load(&id).await.unwrap() {
            if d.replicas.iter().any(|r| r.state == ReplicaState::Copying) {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no copy started:\n{}",
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = started_copies(&direct, &id).await;
    first.signal("-TERM");
    let took = first
        .wait_exit(Duration::from_secs(8))
        .unwrap_or_else(|| panic!("no exit within the grace period:\n{}", first.log()));
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    let (d, _) = direct.state.load(&id).await.unwrap().unwrap();
    assert_eq!(d.state(), JobState::Running, "left resumable");
    assert!(d.owner().is_none(), "the claim was released");
    let released = tokio::time::Instant::now();
    let pending_before = ProxyStats::get(&proxy.stats.pending_answers);
    let second = Daemon::start(&config, env.dir.path().join("second.log"), &[]);
    let doc = wait_for_end(&direct, &id, Duration::from_secs(60)).await;
    assert_eq!(
        doc.state(),
        JobState::Completed,
        "{:?}\n{}",
        doc.error,
        second.log()
    );
    assert!(
        released.elapsed() < Duration::from_secs(30),
        "resumed without waiting out the 60 s lease ({:?})",
        released.elapsed()
    );
    assert!(
        ProxyStats::get(&proxy.stats.pending_answers) > pending_before,
        "the second daemon met copies still pending"
    );
    assert_adopted(&before, &doc, &proxy, "after SIGTERM");
    let log = first.log();
    assert!(log.contains("stopping"), "{log}");
}

/// Two daemons share the queue and the state, each running jobs when one is
/// killed: the other resumes the dead one's jobs after the lease, meets their
/// copies still pending and adopts them; every job completes with every replica
/// copied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_work_and_survive_one_dying() {
    let env = TestEnv::new(FAST);
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        // Longer than the 10 s lease.
        hold_copies: Some(Duration::from_secs(14)),
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let config = env.proxied_config_file(&proxy.url());
    let mut ids = Vec::new();
    for i in 0..4u8 {
        let source = env.source_url(&format!("two-{i}.vhd"));
        upload_sample(&direct, &source, 2, 1, 30 + i).await;
        let id = format!("two-{i}-{}", env.id);
        // A pool each: jobs of one pool take turns (its lock), these run at once.
        let mut job: serde_json::Value = serde_json::from_str(&env.job_json(
            &id,
            &source.replace(BLOB, &proxy.url()),
            "windows",
            60,
        ))
        .unwrap();
        job["pool"]["id"] = format!("pool-{i}-{}", env.id).into();
        direct.intake.send(&job.to_string()).await.unwrap();
        ids.push(id);
    }
    // Each instance takes at most two of the four jobs, so both own work.
    let two = [("VHDREP__ENGINE__MAX_PARALLEL_JOBS", "2")];
    let a = Daemon::start(&config, env.dir.path().join("a.log"), &two);
    let b = Daemon::start(&config, env.dir.path().join("b.log"), &two);
    let owners = copying_owners(&direct, &ids, &a, &b).await;
    let instances: BTreeSet<&String> = owners.values().collect();
    assert_eq!(instances.len(), 2, "both instances own jobs: {owners:?}");
    let mut before = std::collections::BTreeMap::new();
    for id in &ids {
        before.insert(id.clone(), started_copies(&direct, id).await);
    }
    let pending_before = ProxyStats::get(&proxy.stats.pending_answers);
    a.kill9();
    for id in &ids {
        let doc = wait_for_end(&direct, id, Duration::from_secs(90)).await;
        assert_eq!(
            doc.state(),
            JobState::Completed,
            "{id}: {:?}\n{}",
            doc.error,
            b.log()
        );
        assert_eq!(doc.replicas.len(), 3);
        assert_adopted(&before[id], &doc, &proxy, id);
        let mut names = BTreeSet::new();
        for r in &doc.replicas {
            assert!(names.insert(r.blob.clone()));
        }
    }
    let expected = only_these_replicas(&direct, &env, &ids).await;
    assert!(
        ProxyStats::get(&proxy.stats.pending_answers) > pending_before,
        "copies were still pending after the kill"
    );
    // No double copying: exactly one Start Copy reached storage per replica.
    let starts = replica_starts(&proxy);
    assert_eq!(starts.len(), expected.len(), "{starts:?}");
    assert!(
        starts.values().all(|n| *n == 1),
        "a replica was copied twice: {starts:?}"
    );
    let handoffs = drain(direct.handoff.as_ref()).await;
    let handed: BTreeSet<String> = handoffs
        .iter()
        .map(|h| {
            serde_json::from_str::<serde_json::Value>(h).unwrap()["job_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(handed, ids.iter().cloned().collect::<BTreeSet<_>>());
}

/// `log_format = "json"`: every line the daemon logs is a JSON object; the job's
/// lines carry its id from the span; one line per state change, not one per poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_job_id_and_stay_quiet_while_polling() {
    let env = TestEnv::new(FAST);
    let direct = env.control().await;
    let proxy = Proxy::start(ProxyConfig {
        hold_copies: Some(Duration::from_secs(2)),
        ..ProxyConfig::transparent(BLOB)
    })
    .await
    .unwrap();
    let config = env.proxied_config_file(&proxy.url());
    let source = env.source_url("logs.vhd");
    upload_sample(&direct, &source, 2, 1, 41).await;
    let id = format!("logs-{}", env.id);
    direct
        .intake
        .send(&env.job_json(&id, &source.replace(BLOB, &proxy.url()), "windows", 60))
        .await
        .unwrap();
    let daemon = Daemon::start(
        &config,
        env.dir.path().join("json.log"),
        &[("VHDREP__SERVICE__LOG_FORMAT", "json")],
    );
    let doc = wait_for_end(&direct, &id, Duration::from_secs(60)).await;
    assert_eq!(doc.state(), JobState::Completed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = daemon.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let of_job: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["span"]["job_id"] == id.as_str())
        .collect();
    let messages: Vec<&str> = of_job
        .iter()
        .filter_map(|l| l["message"].as_str())
        .collect();
    assert!(
        messages.contains(&"job running") && messages.contains(&"job completed"),
        "{messages:?}"
    );
    assert_eq!(
        messages
            .iter()
            .filter(|m| **m == "replica verified")
            .count(),
        3,
        "{messages:?}"
    );
    let polls: u32 = doc.replicas.iter().map(|r| r.status_requests).sum();
    assert!(
        polls as usize > of_job.len() / 2,
        "polled {polls} times, logged {} lines",
        of_job.len()
    );
    assert!(
        of_job.len() <= 10,
        "one line per state change: {messages:?}"
    );
}

/// Waits until every job has an owner that has started copies, and returns the owners.
async fn copying_owners(
    direct: &vhd_replicator::control::Control,
    ids: &[String],
    a: &Daemon,
    b: &Daemon,
) -> std::collections::BTreeMap<String, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut owners = std::collections::BTreeMap::new();
        for id in ids {
            if let Some((d, _)) = direct.state.load(id).await.unwrap() {
                if let Some(o) = d
                    .owner()
                    .filter(|_| d.replicas.iter().any(|r| r.copy_id.is_some()))
                {
                    owners.insert(id.clone(), o.instance.clone());
                }
            }
        }
        if owners.len() == ids.len() {
            break owners;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "both instances did not start copies: {owners:?}\n{}\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every job's replicas exist in the destination accounts, and nothing else; returns them.
async fn only_these_replicas(
    direct: &vhd_replicator::control::Control,
    env: &TestEnv,
    ids: &[String],
) -> BTreeSet<String> {
    // Every job's replicas, and nothing else.
    let mut expected = BTreeSet::new();
    for id in ids {
        let (d, _) = direct.state.load(id).await.unwrap().unwrap();
        expected.extend(
            d.replicas
                .iter()
                .map(|r| format!("{}/{}", r.account, r.blob.name)),
        );
    }
    let mut found = BTreeSet::new();
    for account in ["dst1", "dst2", "dst3"] {
        for name in direct
            .store
            .list(account, &env.container(), "")
            .await
            .unwrap()
        {
            found.insert(format!("{account}/{name}"));
        }
    }
    assert_eq!(found, expected);
    expected
}
