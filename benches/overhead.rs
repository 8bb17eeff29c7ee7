//! Engine overhead: 1,000 concurrent small-blob replica copies through the
//! simulated store (virtual time, so only the daemon's own work costs anything):
//! CPU time and memory per copy. Run: `cargo bench --bench overhead`.
//! The figures include the simulated store's own bookkeeping, so they are an upper
//! bound of the engine's cost.

use std::time::Instant;

const MIB: u64 = 1024 * 1024;
use vhd_replicator::{
    config::{CopyMethod, Strategy},
    engine::Outcome,
    testkit::simulation::{run, Scenario},
};

fn proc_field(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds of this thread (the current-thread runtime runs everything on it),
/// in nanoseconds from /proc/thread-self/schedstat.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0) as f64
        / 1e9
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    println!("| run | replicas | in flight at once | CPU s | CPU ms/replica | peak RSS growth MiB | KiB/replica | process peak RSS MiB | wall s | requests |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    // Naive first: all 1,000 copies are pending at once there, and the peak-RSS
    // growth of each run is measured from the peak so far. Then fan-out of
    // async copies, then the default (ranged copies across accounts, relays)
    // with a 16 GiB VHD, thousands of page writes in flight.
    let runs = [
        (
            "naive, async",
            Strategy::Naive,
            CopyMethod::Async,
            false,
            4 * MIB,
        ),
        (
            "fanout, async",
            Strategy::Fanout,
            CopyMethod::Async,
            false,
            4 * MIB,
        ),
        (
            "fanout, ranges + relays, 16 GiB",
            Strategy::Fanout,
            CopyMethod::Auto,
            true,
            16 * 1024 * MIB,
        ),
    ];
    for (name, strategy, method, relays, bytes) in runs {
        let mut scenario = Scenario::new(10, 1000, bytes, strategy);
        scenario.copy_method = method;
        scenario.relays = relays;
        if bytes == 4 * MIB {
            scenario.max_concurrent_copies = 100;
            scenario.max_reads_per_source = 100;
        }
        scenario.max_requests_per_second = 20_000;
        let rss_before = proc_field("/proc/self/status", "VmHWM:");
        let cpu_before = cpu_seconds();
        let wall = Instant::now();
        let report = runtime.block_on(run(&scenario));
        let wall = wall.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu_before;
        let peak = proc_field("/proc/self/status", "VmHWM:");
        assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.error);
        assert_eq!(report.destination_blobs.len(), 1000);
        let growth_kib = peak.saturating_sub(rss_before) as f64;
        println!(
            "| {name} | 1000 | up to {} | {cpu:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {wall:.3} | {} |",
            scenario.max_concurrent_copies * scenario.accounts as u32,
            cpu * 1000.0 / 1000.0,
            growth_kib / 1024.0,
            growth_kib / 1000.0,
            peak as f64 / 1024.0,
            report.stats.requests,
        );
    }
}
