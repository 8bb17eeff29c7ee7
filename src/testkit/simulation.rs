//! Whole-daemon runs against the simulated store ([`crate::testkit::sim`]) on
//! virtual time: the engine, state documents, limits and scheduler exactly as in
//! production, only the storage is a model. Used by property tests and benchmarks;
//! call [`run`] inside a tokio runtime whose clock is paused.

use crate::config::{CopyMethod, SecretSource, Settings};
use crate::control::Control;
use crate::job::parse_job_json;
use crate::metrics::Metrics;
use crate::state::ReplicaRecord;
use crate::{config::Strategy, engine::Outcome};
use crate::{queue::MessageQueue, testkit::memory_queue::MemoryQueue};
use crate::{
    storage::{BlobPath, BlobStore},
    testkit::sim::{SimConfig, SimStats, SimStore},
};
use bytes::Bytes;
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// One simulated job.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Destination accounts.
    pub accounts: usize,
    /// Replicas to make.
    pub replicas: u32,
    /// Size of the VHD in bytes (its data part; the footer is added).
    pub vhd_bytes: u64,
    /// Copy strategy.
    pub strategy: Strategy,
    /// The storage model.
    pub sim: SimConfig,
    /// `max_concurrent_copies` of every account.
    pub max_concurrent_copies: u32,
    /// `max_requests_per_second` of every account.
    pub max_requests_per_second: u32,
    /// `engine.max_reads_per_source`.
    pub max_reads_per_source: u32,
    /// What Get Account Information answers for some accounts (default: standard, StorageV2).
    pub account_info: Vec<(String, crate::storage::AccountInfo)>,
    /// Faults injected into the store's requests.
    pub faults: Vec<crate::testkit::sim::SimFault>,
    /// `engine.copy_method`.
    pub copy_method: CopyMethod,
    /// `engine.relays`.
    pub relays: bool,
    /// Share of the VHD's data that is written (the rest is sparse): 1.0 for a
    /// full disk.
    pub data_fraction: f64,
}

impl Scenario {
    /// A scenario with the product's defaults.
    pub fn new(accounts: usize, replicas: u32, vhd_bytes: u64, strategy: Strategy) -> Self {
        Self {
            accounts,
            replicas,
            vhd_bytes,
            strategy,
            sim: SimConfig::default(),
            max_concurrent_copies: 16,
            max_requests_per_second: 500,
            max_reads_per_source: 1,
            account_info: Vec::new(),
            faults: Vec::new(),
            copy_method: CopyMethod::Auto,
            relays: false,
            data_fraction: 1.0,
        }
    }

    /// The written pages of the VHD: `data_fraction` of each 64 MiB stretch,
    /// and the footer.
    pub fn written(&self) -> Vec<std::ops::Range<u64>> {
        const STRETCH: u64 = 64 * 1024 * 1024;
        let len = self.vhd_bytes + 512;
        if self.data_fraction >= 1.0 {
            return std::iter::once(0..len).collect();
        }
        let per = ((STRETCH as f64 * self.data_fraction) as u64 / 512) * 512;
        let mut out: Vec<_> = (0..self.vhd_bytes)
            .step_by(STRETCH as usize)
            .map(|at| at..(at + per).min(self.vhd_bytes))
            .filter(|r| !r.is_empty())
            .collect();
        out.push(self.vhd_bytes..len);
        out
    }

    /// Bytes of data the VHD holds (its written pages).
    pub fn data_bytes(&self) -> u64 {
        self.written().iter().map(|r| r.end - r.start).sum()
    }

    /// The physical lower bound on the makespan: every destination account must
    /// receive the data from outside at least once, and no number of parallel
    /// sources writes one blob faster than its write bandwidth (nor reads one
    /// faster than its read bandwidth): one cross-account transfer of the data.
    /// Then each account grows to its share of replicas by copies inside it,
    /// doubling at most (every copy needs a finished source) and at most
    /// `max_concurrent_copies` at once.
    pub fn lower_bound(&self) -> Duration {
        let data = self.data_bytes() as f64;
        let per_blob = self.sim.blob_read_bps.min(self.sim.blob_write_bps);
        let cross = data / per_blob.min(self.sim.account_ingress_bps);
        let used = self.accounts.min(self.replicas as usize).max(1) as u64;
        let per_account = u64::from(self.replicas).div_ceil(used);
        let cap = u64::from(self.max_concurrent_copies.max(1));
        let (mut held, mut rounds) = (1u64, 0u32);
        while held < per_account {
            held += held.min(cap).min(per_account - held);
            rounds += 1;
        }
        let grow = f64::from(rounds) * data / self.sim.same_account_bps;
        Duration::from_secs_f64(cross + grow)
    }
}

/// What a simulated run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// How the job ended.
    pub outcome: Outcome,
    /// Virtual time from submission to the end.
    pub makespan: Duration,
    /// Every replica record of the job.
    pub replicas: Vec<ReplicaRecord>,
    /// Blobs left in the destination containers.
    pub destination_blobs: Vec<BlobPath>,
    /// The store's counters.
    pub stats: SimStats,
    /// The error recorded on the job, if any.
    pub error: Option<String>,
    /// The daemon's metrics at the end, in the text exposition.
    pub metrics: String,
    /// Snapshots of the source left at the end, with their metadata.
    pub source_snapshots: Vec<(String, crate::storage::Metadata)>,
    /// Relays left beside the source at the end (those in destination
    /// containers are among `destination_blobs`).
    pub relays_left: Vec<String>,
}

impl Report {
    /// Status requests spent per replica.
    pub fn status_requests_per_replica(&self) -> f64 {
        let n = self.replicas.len().max(1) as f64;
        self.replicas
            .iter()
            .map(|r| r.status_requests as f64)
            .sum::<f64>()
            / n
    }
}

struct DummyKeys;

impl SecretSource for DummyKeys {
    fn env(&self, _: &str) -> Option<String> {
        Some("c2ltdWxhdGVkLWtleS1vbmx5".into())
    }
    fn file(&self, _: &str) -> Result<String, String> {
        Err("no files in simulations".into())
    }
}

/// The destination account names of a scenario.
pub(crate) fn account_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("dst{i}")).collect()
}

/// The configuration of a scenario: a control and a source account, and its
/// destination accounts with its limits.
fn settings_for(scenario: &Scenario) -> crate::config::ValidatedSettings {
    let mut toml = format!(
        "[batch]\nsubscription = \"sim\"\nregion = \"sim\"\n[control]\naccount = \"ops\"\n\
         [handoff]\nvm_size = \"STANDARD_D2_V3\"\n[engine]\ncopy_method = \"{}\"\nrelays = {}\nstrategy = \"{}\"\nmax_reads_per_source = {}\n",
        match scenario.copy_method {
            CopyMethod::Auto => "auto",
            CopyMethod::Async => "async",
            CopyMethod::Ranges => "ranges",
        },
        scenario.relays,
        match scenario.strategy {
            Strategy::Fanout => "fanout",
            Strategy::Naive => "naive",
        },
        scenario.max_reads_per_source
    );
    for (name, dest) in [("ops".to_owned(), false), ("src".to_owned(), false)]
        .into_iter()
        .chain(
            account_names(scenario.accounts)
                .into_iter()
                .map(|n| (n, true)),
        )
    {
        toml.push_str(&format!(
            "[[accounts]]\nname = \"{name}\"\nblob_endpoint = \"http://{name}.blob.sim.invalid\"\nkey_env = \"K\"\ndestination = {dest}\nmax_concurrent_copies = {}\nmax_requests_per_second = {}\n",
            scenario.max_concurrent_copies, scenario.max_requests_per_second
        ));
    }
    Settings::from_toml(&toml)
        .expect("simulation config parses")
        .validate(&DummyKeys)
        .expect("simulation config validates")
}

/// The names under `prefix`, asked until the (faulty) store answers.
async fn list(store: &SimStore, account: &str, container: &str, prefix: &str) -> Vec<String> {
    loop {
        match store.list(account, container, prefix).await {
            Ok(n) => return n,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The simulated store of `scenario`, with its accounts, faults and the
/// source VHD (returned) in place.
fn seeded_store(scenario: &Scenario) -> (Arc<SimStore>, BlobPath) {
    let store = Arc::new(SimStore::new(scenario.sim.clone()));
    for (account, info) in &scenario.account_info {
        store.set_account_info(account, info.clone());
    }
    for fault in &scenario.faults {
        store.inject(fault.clone());
    }
    let source = BlobPath::new("src", "images", "disk.vhd");
    let footer = crate::vhd::fixed_footer(scenario.vhd_bytes, [7; 16]);
    store.put_virtual_sparse_page_blob(
        &source,
        scenario.vhd_bytes + 512,
        Bytes::copy_from_slice(&footer),
        scenario.written(),
    );
    (store, source)
}

/// The blobs under `prefix` in the destination containers of `scenario`.
async fn destination_blobs(store: &SimStore, scenario: &Scenario, prefix: &str) -> Vec<BlobPath> {
    let mut out = Vec::new();
    for account in account_names(scenario.accounts) {
        let names = list(store, &account, crate::job::DEFAULT_CONTAINER, prefix).await;
        out.extend(
            names
                .into_iter()
                .map(|n| BlobPath::new(&account, crate::job::DEFAULT_CONTAINER, &n)),
        );
    }
    out
}

/// Runs one job of `scenario` to its end on the simulated store.
pub async fn run(scenario: &Scenario) -> Report {
    let settings = settings_for(scenario);
    let (store, source) = seeded_store(scenario);
    let control = Control::with_retry(
        Arc::new(settings),
        Metrics::new(),
        store.clone(),
        Arc::new(MemoryQueue::new("intake")),
        Arc::new(MemoryQueue::new("poison")),
        Arc::new(MemoryQueue::new("handoff")),
        crate::azure::retry::RetryPolicy {
            jitter_seed: Some(scenario.sim.seed),
            ..Default::default()
        },
    );
    let started = tokio::time::Instant::now();
    // The control plane sees the same faults as the destinations: keep trying.
    while control.ensure().await.is_err() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let url = store.blob_url(&source).expect("sim URL").to_string();
    let spec = parse_job_json(&format!(
        r#"{{"job_id":"sim","source":"{url}","pool":{{"id":"sim","os":"windows","nodes":{}}},"replicas":{}}}"#,
        scenario.replicas * 20,
        scenario.replicas
    ))
    .expect("simulation job parses");
    let job = spec
        .validate(&control.settings)
        .expect("simulation job validates");
    let engine = control.engine();
    let mut outcome = engine.run(&job, CancellationToken::new()).await;
    // A job-level retry is what the queue would do after the message reappears.
    let mut retries = 0;
    while matches!(outcome, Outcome::Retry(_)) && retries < 5 {
        retries += 1;
        tokio::time::sleep(Duration::from_secs(30)).await;
        outcome = engine.run(&job, CancellationToken::new()).await;
    }
    let makespan = started.elapsed();
    let doc = loop {
        match control.state.load("sim").await {
            Ok(Some((d, _))) => break d,
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    let destination_blobs = destination_blobs(&store, scenario, "").await;
    let source_snapshots = loop {
        match store
            .list_detailed(&source.account, &source.container, &source.name, true)
            .await
        {
            Ok(listed) => {
                break listed
                    .into_iter()
                    .filter_map(|b| Some((b.snapshot?, b.metadata)))
                    .collect()
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let relays_left = list(
        &store,
        &source.account,
        &source.container,
        crate::engine::relay::RELAY_PREFIX,
    )
    .await;
    Report {
        relays_left,
        source_snapshots,
        outcome,
        makespan,
        replicas: doc.replicas,
        destination_blobs,
        stats: store.stats(),
        error: doc.error,
        metrics: control.metrics.render(),
    }
}

/// Deliveries of one job to several instances, and kills: the at-least-once
/// queue and crashes, for the contested property test.
#[derive(Debug, Clone)]
pub struct Contest {
    /// Copies of the job's message put on the intake queue at the start (raw
    /// JSON and base64 in turn), each after a seeded delay of under a second.
    pub deliveries: u32,
    /// Instances (each its own engine and intake worker, as separate
    /// processes) taking messages from the start.
    pub instances: u32,
    /// Virtual times at which one instance, chosen by the seed, is killed (its
    /// worker and every run in it dropped where they stand, as SIGKILL would)
    /// and a new instance started in its place.
    pub kills: Vec<Duration>,
    /// Seed of the delays and of which instance each kill takes.
    pub seed: u64,
}

/// What a contested run left.
#[derive(Debug)]
pub struct ContestReport {
    /// The job document at the end.
    pub doc: crate::state::JobDocument,
    /// Every hand-off message sent, as JSON.
    pub handoffs: Vec<serde_json::Value>,
    /// URIs named by a hand-off that do not exist at the end.
    pub missing: Vec<String>,
    /// Messages left on the intake queue at the end.
    pub left_on_queue: u64,
    /// Messages moved to the poison queue.
    pub poisoned: usize,
    /// Replica blobs of the job in the destination containers at the end.
    pub destination_blobs: Vec<BlobPath>,
    /// Virtual time from the first delivery to the end.
    pub makespan: Duration,
    /// Runs seen holding the job's claim (sampled every second or five): more
    /// than one when a kill landed while the job ran and another run took over.
    pub runs_seen: usize,
}

/// A control plane of its own (own metrics and account limits, as a separate
/// process has) over the shared store and queues.
fn control_over(
    settings: &Arc<crate::config::ValidatedSettings>,
    store: &Arc<SimStore>,
    queues: &[Arc<MemoryQueue>; 3],
    jitter_seed: Option<u64>,
) -> Control {
    Control::with_retry(
        settings.clone(),
        Metrics::new(),
        store.clone(),
        queues[0].clone(),
        queues[1].clone(),
        queues[2].clone(),
        crate::azure::retry::RetryPolicy {
            jitter_seed,
            ..Default::default()
        },
    )
}

/// One instance of the daemon: its worker task and its stop token.
struct Instance {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Instance {
    fn start(
        settings: &Arc<crate::config::ValidatedSettings>,
        store: &Arc<SimStore>,
        queues: &[Arc<MemoryQueue>; 3],
        seed: u64,
    ) -> Self {
        let control = control_over(settings, store, queues, Some(seed));
        let worker = crate::intake::Worker::new(
            Arc::new(control.engine()),
            control.intake.clone(),
            control.poison.clone(),
            control.state.clone(),
            control.metrics.clone(),
            control.settings.clone(),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(worker.run(stop.clone()));
        Self { stop, task }
    }
}

/// The URIs named by `handoffs` that do not exist in `store`.
async fn missing_uris(
    store: &SimStore,
    settings: &crate::config::ValidatedSettings,
    handoffs: &[serde_json::Value],
) -> Vec<String> {
    let mut missing = Vec::new();
    for uri in handoffs
        .iter()
        .flat_map(|h| h["image_uris"].as_array().cloned().unwrap_or_default())
    {
        let uri = uri.as_str().unwrap_or_default().to_owned();
        let blob = crate::job::locate_source(&uri, settings).expect("a configured account");
        loop {
            match store.properties(&blob).await {
                Ok(_) => break,
                Err(e) if e.is_not_found() => {
                    missing.push(uri);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    missing
}

/// The intake message of the simulated job of `scenario`.
fn job_text(store: &SimStore, source: &BlobPath, scenario: &Scenario) -> String {
    let url = store.blob_url(source).expect("sim URL").to_string();
    format!(
        r#"{{"job_id":"sim","source":"{url}","pool":{{"id":"sim","os":"windows","nodes":{}}},"replicas":{}}}"#,
        scenario.replicas * 20,
        scenario.replicas
    )
}

/// Puts `text` on `queue` `copies` times (raw JSON and base64 in turn), each
/// after a seeded delay of under a second.
async fn deliver(queue: &MemoryQueue, text: &str, copies: u32, rng: &mut rand::rngs::StdRng) {
    use base64::Engine as _;
    use rand::Rng;
    for i in 0..copies {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
        let body = if i % 2 == 0 {
            text.to_owned()
        } else {
            base64::engine::general_purpose::STANDARD.encode(text)
        };
        queue.send(&body).await.expect("memory queue");
    }
}

/// The job's document now, noting the run that holds its claim.
async fn note_owner(
    control: &Control,
    runs: &mut std::collections::BTreeSet<String>,
) -> Option<crate::state::JobDocument> {
    let doc = control
        .state
        .load("sim")
        .await
        .ok()
        .flatten()
        .map(|(d, _)| d);
    if let Some(run) = doc.as_ref().and_then(|d| d.owner()?.run.clone()) {
        runs.insert(run);
    }
    doc
}

/// Runs one job of `scenario` delivered and interrupted as `contest` says,
/// until the job has ended and no delivery is left (or six virtual hours pass).
pub async fn run_contested(scenario: &Scenario, contest: &Contest) -> ContestReport {
    use rand::{Rng, SeedableRng};
    let settings = Arc::new(settings_for(scenario));
    let (store, source) = seeded_store(scenario);
    let queues = [
        Arc::new(MemoryQueue::new("intake")),
        Arc::new(MemoryQueue::new("poison")),
        Arc::new(MemoryQueue::new("handoff")),
    ];
    let control = control_over(&settings, &store, &queues, None);
    while control.ensure().await.is_err() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(contest.seed);
    let mut instances: Vec<Instance> = (0..contest.instances)
        .map(|i| Instance::start(&settings, &store, &queues, contest.seed + u64::from(i)))
        .collect();
    let started = tokio::time::Instant::now();
    let text = job_text(&store, &source, scenario);
    deliver(&queues[0], &text, contest.deliveries, &mut rng).await;
    let mut runs_seen = std::collections::BTreeSet::new();
    let mut kills = contest.kills.clone();
    kills.sort();
    for (n, at) in kills.into_iter().enumerate() {
        while tokio::time::Instant::now() + Duration::from_secs(1) < started + at {
            tokio::time::sleep(Duration::from_secs(1)).await;
            note_owner(&control, &mut runs_seen).await;
        }
        tokio::time::sleep_until(started + at).await;
        let victim = rng.random_range(0..instances.len());
        instances[victim].task.abort();
        let seed = contest.seed + 100 + n as u64;
        instances[victim] = Instance::start(&settings, &store, &queues, seed);
    }
    let deadline = started + Duration::from_secs(6 * 3600);
    let doc = loop {
        let doc = note_owner(&control, &mut runs_seen).await;
        let left = queues[0].approximate_count().await.unwrap_or(1);
        match doc {
            Some(d) if d.state().is_terminal() && left == 0 => break d,
            Some(d) if tokio::time::Instant::now() >= deadline => break d,
            _ => tokio::time::sleep(Duration::from_secs(5)).await,
        }
    };
    let makespan = started.elapsed();
    for i in &instances {
        i.stop.cancel();
    }
    for i in instances {
        let _ = i.task.await;
    }
    let handoffs: Vec<serde_json::Value> = queues[2]
        .texts()
        .iter()
        .map(|t| serde_json::from_str(t).expect("hand-off JSON"))
        .collect();
    let missing = missing_uris(&store, &settings, &handoffs).await;
    let destination_blobs = destination_blobs(&store, scenario, "sim/").await;
    ContestReport {
        doc,
        handoffs,
        missing,
        left_on_queue: queues[0].approximate_count().await.unwrap_or(0),
        poisoned: queues[1].texts().len(),
        destination_blobs,
        makespan,
        runs_seen: runs_seen.len(),
    }
}
