//! The job list with 5,000 job documents: requests made and time taken by one
//! `GET /v1/jobs` (the same listing the status page, retire and gc read), next
//! to reading every document as the daemon did before summaries. On the
//! simulated store (5 ms per request, virtual time) and, when it is running,
//! on Azurite (real time). Run: `cargo bench --bench list_jobs` (after
//! `scripts/azurite.sh start` for the Azurite figures).

use std::{sync::Arc, time::Instant};
use vhd_replicator::{
    config::{SecretSource, Settings},
    control::Control,
    job::{parse_job_json, JobId},
    metrics::Metrics,
    state::{JobDocument, JobState},
    testkit::{
        memory_queue::MemoryQueue,
        sim::{SimConfig, SimStore},
    },
};

const JOBS: usize = 5_000;

struct Env(std::collections::HashMap<String, String>);

impl SecretSource for Env {
    fn env(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
    fn file(&self, _: &str) -> Result<String, String> {
        Err("no files".into())
    }
}

fn local_keys() -> std::collections::HashMap<String, String> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/local-env.sh"))
            .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter(|l| !l.contains('$'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

fn settings(endpoint: &str, container: &str) -> Settings {
    Settings::from_toml(&format!(
        "[batch]\nsubscription = \"s\"\nregion = \"local\"\n[control]\naccount = \"ops\"\nstate_container = \"{container}\"\n\
         [handoff]\nvm_size = \"STANDARD_D2_V3\"\n\
         [[accounts]]\nname = \"ops\"\nblob_endpoint = \"{endpoint}/ops\"\nqueue_endpoint = \"http://127.0.0.1:10001/ops\"\nkey_env = \"VHDREP_KEY_OPS\"\nmax_requests_per_second = 100000\n"
    ))
    .expect("bench config parses")
}

async fn fill(control: &Control) {
    let spec = parse_job_json(
        r#"{"source":"http://127.0.0.1:10000/ops/images/a.vhd","pool":{"id":"bench","os":"windows","nodes":200,"vm_size":"STANDARD_D2_V3"}}"#,
    )
    .expect("bench job parses");
    let docs: Vec<JobDocument> = (0..JOBS)
        .map(|i| {
            let mut d = JobDocument::replicate(
                JobId::parse(&format!("bench-{i:05}")).unwrap(),
                spec.clone(),
            );
            d.enter(JobState::Running).unwrap();
            if i % 10 != 0 {
                d.enter(JobState::Completed).unwrap();
            }
            d
        })
        .collect();
    for chunk in docs.chunks(64) {
        futures::future::join_all(chunk.iter().map(|d| control.state.create(d))).await;
    }
}

fn requests(control: &Control) -> f64 {
    control
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("vhdrep_storage_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn measure(name: &str, control: &Control, clock: impl Fn() -> std::time::Duration) {
    let before = requests(control);
    let t0 = clock();
    let listing = control.state.list().await.expect("list");
    let list_time = clock() - t0;
    let list_requests = requests(control) - before;
    assert_eq!(listing.jobs.len(), JOBS);

    let before = requests(control);
    let t0 = clock();
    for s in &listing.jobs {
        control.state.load(&s.job_id).await.expect("load");
    }
    let read_time = clock() - t0;
    let read_requests = requests(control) - before;
    println!(
        "| {name} | {JOBS} | {list_requests} | {:.0} ms | {} | {:.1} s |",
        list_time.as_secs_f64() * 1e3,
        read_requests + list_requests,
        read_time.as_secs_f64(),
    );
}

fn main() {
    println!("| store | job documents | list: requests | list: time | read every document: requests | read every document: time |");
    println!("|---|---|---|---|---|---|");
    let keys = local_keys();
    // The simulated store, on virtual time (5 ms per request).
    let sim_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    sim_rt.block_on(async {
        let s = settings("http://sim.invalid", "bench-state")
            .validate(&Env(keys.clone()))
            .expect("validates");
        let control = Control::from_parts(
            Arc::new(s),
            Metrics::new(),
            Arc::new(SimStore::new(SimConfig::default())),
            Arc::new(MemoryQueue::new("i")),
            Arc::new(MemoryQueue::new("p")),
            Arc::new(MemoryQueue::new("h")),
        );
        control.ensure().await.expect("state container");
        fill(&control).await;
        let start = tokio::time::Instant::now();
        measure("simulated (5 ms/request, virtual time)", &control, || {
            start.elapsed()
        })
        .await;
    });
    if std::net::TcpStream::connect(("127.0.0.1", 10000)).is_err() {
        println!("(Azurite is not running on 127.0.0.1:10000: no Azurite figures; run scripts/azurite.sh start)");
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let container = format!("bench-{}", std::process::id());
        let s = settings("http://127.0.0.1:10000", &container)
            .validate(&Env(keys.clone()))
            .expect("validates");
        let control = Control::azure(Arc::new(s), Metrics::new()).expect("clients");
        control.ensure().await.expect("state container");
        let t = Instant::now();
        fill(&control).await;
        eprintln!(
            "(wrote {JOBS} documents to Azurite in {:.1} s)",
            t.elapsed().as_secs_f64()
        );
        let start = Instant::now();
        measure("Azurite 3.35 (loopback, 2 cores)", &control, || {
            start.elapsed()
        })
        .await;
    });
}
