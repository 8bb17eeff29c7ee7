//! Scale benchmark on the simulated store (virtual time): makespan of `fanout` and
//! `naive` against the model's lower bound, status requests per replica, throttle
//! events. Run: `cargo bench --bench scale` (add `-- --quick` for a short run).

use std::time::{Duration, Instant};
use vhd_replicator::{
    engine::{schedule::Strategy, Outcome},
    simulation::{run, Scenario},
};

const GIB: u64 = 1024 * 1024 * 1024;

fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let mut cases: Vec<(String, u64, u32, usize)> =
        vec![("127 GiB, 2,000 Windows nodes".into(), 127 * GIB, 100, 10)];
    if !quick {
        for replicas in [10u32, 100, 1000] {
            for accounts in [1usize, 5, 10, 50] {
                cases.push((
                    format!("16 GiB, {replicas} replicas"),
                    16 * GIB,
                    replicas,
                    accounts,
                ));
            }
        }
    }
    println!(
        "| case | replicas | accounts | strategy | makespan | lower bound | ratio | status req/replica | throttled | requests | wall |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, bytes, replicas, accounts) in cases {
        let mut makespans = Vec::new();
        for strategy in [Strategy::Fanout, Strategy::Naive] {
            let scenario = Scenario::new(accounts, replicas, bytes, strategy);
            let wall = Instant::now();
            let report = runtime.block_on(run(&scenario));
            let wall = wall.elapsed();
            assert_eq!(
                report.outcome,
                Outcome::Completed,
                "{name}: {:?}",
                report.error
            );
            assert_eq!(report.destination_blobs.len(), replicas as usize);
            let lb = scenario.lower_bound();
            makespans.push(report.makespan);
            println!(
                "| {name} | {replicas} | {accounts} | {strategy:?} | {} | {} | {:.2} | {:.1} | {} | {} | {:.1} s |",
                hms(report.makespan),
                hms(lb),
                report.makespan.as_secs_f64() / lb.as_secs_f64(),
                report.status_requests_per_replica(),
                report.stats.throttled,
                report.stats.requests,
                wall.as_secs_f64()
            );
        }
        println!(
            "|  |  |  | naive / fanout | {:.1}x |  |  |  |  |  |  |",
            makespans[1].as_secs_f64() / makespans[0].as_secs_f64()
        );
    }
}
