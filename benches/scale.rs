//! Scale benchmark on the simulated store (virtual time): for each case of the
//! scale table, side by side in one run, the makespan of
//! - `async fan-out`: fan-out of async Copy Blob (the daemon before Step 9),
//! - `ranges + relays`: fan-out, ranged copies across accounts, relays (the default),
//! - `naive`: every replica an async copy of the snapshot, all at once,
//! - `AzCopy-like`: every replica a ranged copy of the snapshot, a bounded
//!   number at once (16 over all accounts),
//!
//! against the physical lower bound, with status requests per replica and
//! throttling. Run: `cargo bench --bench scale` (`-- --quick` for the key case
//! only; `-- --serial` models async copies processed one at a time per account).

use std::time::{Duration, Instant};
use vhd_replicator::{
    config::{CopyMethod, Strategy},
    engine::Outcome,
    testkit::simulation::{run, Scenario},
};

const GIB: u64 = 1024 * 1024 * 1024;

fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
}

/// The four ways of making the replicas.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    AsyncFanout,
    RangesRelays,
    Naive,
    AzCopyLike,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::AsyncFanout => "async fan-out",
            Way::RangesRelays => "ranges + relays",
            Way::Naive => "naive",
            Way::AzCopyLike => "AzCopy-like",
        }
    }

    fn scenario(self, accounts: usize, replicas: u32, bytes: u64, data: f64) -> Scenario {
        let strategy = match self {
            Way::AsyncFanout | Way::RangesRelays => Strategy::Fanout,
            Way::Naive | Way::AzCopyLike => Strategy::Naive,
        };
        let mut s = Scenario::new(accounts, replicas, bytes, strategy);
        s.data_fraction = data;
        s.copy_method = match self {
            Way::RangesRelays | Way::AzCopyLike => CopyMethod::Auto,
            Way::AsyncFanout | Way::Naive => CopyMethod::Async,
        };
        s.relays = self == Way::RangesRelays;
        if self == Way::AzCopyLike {
            s.max_concurrent_copies = (16 / accounts as u32).max(1);
        }
        s
    }
}

struct Case {
    name: String,
    bytes: u64,
    data: f64,
    replicas: u32,
    accounts: usize,
}

fn cases(quick: bool) -> Vec<Case> {
    let case = |name: &str, bytes, data, replicas, accounts| Case {
        name: name.to_owned(),
        bytes,
        data,
        replicas,
        accounts,
    };
    let mut out = vec![case("127 GiB", 127 * GIB, 1.0, 100, 10)];
    if quick {
        return out;
    }
    out.push(case("127 GiB, 30% data", 127 * GIB, 0.3, 100, 10));
    for replicas in [10u32, 100, 1000] {
        for accounts in [1usize, 5, 10, 50] {
            out.push(case("16 GiB", 16 * GIB, 1.0, replicas, accounts));
        }
    }
    out.push(case("16 GiB, 30% data", 16 * GIB, 0.3, 100, 10));
    out
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let serial = std::env::args().any(|a| a == "--serial");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    println!(
        "| case | replicas | accounts | way | makespan | physical bound | ratio | status req/replica | throttled | wall |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for c in cases(quick) {
        let mut times = Vec::new();
        // The physical bound is the problem's, the same for every way (at the
        // default copy caps).
        let bound = Way::RangesRelays
            .scenario(c.accounts, c.replicas, c.bytes, c.data)
            .lower_bound();
        for way in [
            Way::AsyncFanout,
            Way::RangesRelays,
            Way::Naive,
            Way::AzCopyLike,
        ] {
            let mut scenario = way.scenario(c.accounts, c.replicas, c.bytes, c.data);
            scenario.sim.async_serial_per_account = serial;
            // The naive ways at 1,000 replicas read one blob 1,000 times: days of
            // virtual time that only restate replicas x size / one blob's bandwidth.
            if c.replicas >= 1000 && matches!(way, Way::Naive | Way::AzCopyLike) {
                let est = Duration::from_secs_f64(
                    f64::from(c.replicas) * scenario.data_bytes() as f64
                        / scenario.sim.blob_read_bps,
                );
                println!(
                    "| {} | {} | {} | {} | (not run: at least {}) | {} | - | - | - | - |",
                    c.name,
                    c.replicas,
                    c.accounts,
                    way.name(),
                    hms(est),
                    hms(bound)
                );
                times.push(None);
                continue;
            }
            let wall = Instant::now();
            let report = runtime.block_on(run(&scenario));
            let wall = wall.elapsed();
            assert_eq!(
                report.outcome,
                Outcome::Completed,
                "{} {}: {:?}",
                c.name,
                way.name(),
                report.error
            );
            assert_eq!(report.destination_blobs.len(), c.replicas as usize);
            assert!(report.relays_left.is_empty());
            times.push(Some(report.makespan));
            println!(
                "| {} | {} | {} | {} | {} | {} | {:.2} | {:.1} | {} | {:.1} s |",
                c.name,
                c.replicas,
                c.accounts,
                way.name(),
                hms(report.makespan),
                hms(bound),
                report.makespan.as_secs_f64() / bound.as_secs_f64(),
                report.status_requests_per_replica(),
                report.stats.throttled,
                wall.as_secs_f64()
            );
        }
        let ratio = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.1}x", a.as_secs_f64() / b.as_secs_f64()),
            _ => "-".to_owned(),
        };
        println!(
            "|  |  |  | ranges + relays vs async fan-out / naive / AzCopy-like | {} / {} / {} faster |  |  |  |  |  |",
            ratio(times[0], times[1]),
            ratio(times[2], times[1]),
            ratio(times[3], times[1]),
        );
    }
}
