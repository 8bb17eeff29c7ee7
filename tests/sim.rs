//! Property tests of the whole engine on the simulated store, on virtual time: for
//! random plans, fault seeds and strategies, every job ends completed with exactly
//! the planned replicas, or failed with a reason and nothing left behind.

use proptest::prelude::*;
use std::{collections::BTreeSet, time::Duration};
use vhd_replicator::{
    engine::{schedule::Strategy, Outcome},
    simulation::{run, Scenario},
    state::ReplicaState,
    storage::sim::SimConfig,
};

const MIB: u64 = 1024 * 1024;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Completed jobs hold exactly the planned replicas (no duplicate, no orphan),
    /// every one verified; failed jobs say why and leave no blob behind.
    #[test]
    fn jobs_end_with_exactly_the_plan_or_a_reason(
        accounts in 1usize..6,
        replicas in 1u32..30,
        fanout in any::<bool>(),
        seed in any::<u64>(),
        transient in prop_oneof![Just(0.0f64), 0.0f64..0.15],
        copy_failures in prop_oneof![Just(0.0f64), 0.0f64..0.5],
        rps in prop_oneof![Just(20_000u32), 20u32..200],
        retry_after in any::<bool>(),
        reads in 1u32..3,
    ) {
        let strategy = if fanout { Strategy::Fanout } else { Strategy::Naive };
        let mut scenario = Scenario::new(accounts, replicas, 64 * MIB, strategy);
        scenario.max_reads_per_source = reads;
        scenario.max_requests_per_second = rps.min(500);
        scenario.sim = SimConfig {
            seed,
            transient_failure_rate: transient,
            copy_failure_rate: copy_failures,
            requests_per_second: rps,
            retry_after: retry_after.then_some(Duration::from_secs(1)),
            ..SimConfig::default()
        };
        let report = runtime().block_on(run(&scenario));
        let left: BTreeSet<_> = report.destination_blobs.iter().cloned().collect();
        prop_assert_eq!(left.len(), report.destination_blobs.len(), "duplicate listing");
        match &report.outcome {
            Outcome::Completed => {
                prop_assert_eq!(report.replicas.len(), replicas as usize);
                prop_assert!(report.replicas.iter().all(|r| r.state == ReplicaState::Verified));
                let planned: BTreeSet<_> = report.replicas.iter().map(|r| r.blob.clone()).collect();
                prop_assert_eq!(planned.len(), replicas as usize, "replica names are unique");
                prop_assert_eq!(left, planned, "exactly the planned replicas, nothing else");
            }
            Outcome::Failed(reason) => {
                prop_assert!(!reason.is_empty());
                prop_assert_eq!(report.error.as_deref(), Some(reason.as_str()));
                prop_assert!(left.is_empty(), "a failed job leaves nothing: {:?}", left);
                // Failing needs copies that keep failing: never with a clean store.
                prop_assert!(copy_failures > 0.0 || transient > 0.0, "failed without faults: {}", reason);
            }
            other => prop_assert!(false, "unexpected outcome {:?} ({:?})", other, report.error),
        }
    }
}

/// Without faults, fan-out makes 100 replicas over 10 accounts close to the model's
/// lower bound and far faster than naive (the benchmark prints the figures; this
/// guards the shape of the schedule, not a speed).
#[test]
fn fanout_reads_each_blob_once_at_a_time_and_seeds_every_account_once() {
    let scenario = Scenario::new(10, 100, 1024 * MIB, Strategy::Fanout);
    let report = runtime().block_on(run(&scenario));
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.error);
    assert_eq!(report.replicas.len(), 100);
    assert!(report.replicas.iter().all(|r| r.attempts <= 1));
    let naive = runtime().block_on(run(&Scenario::new(10, 100, 1024 * MIB, Strategy::Naive)));
    assert_eq!(naive.outcome, Outcome::Completed);
    assert!(
        report.makespan * 5 < naive.makespan,
        "fanout {:?} vs naive {:?}",
        report.makespan,
        naive.makespan
    );
    assert!(
        report.makespan < scenario.lower_bound() * 2,
        "{:?} vs bound {:?}",
        report.makespan,
        scenario.lower_bound()
    );
}

/// Copies that keep failing fail the job with the replica named, after the
/// bounded retries, and the job leaves nothing behind.
#[test]
fn copies_that_keep_failing_fail_the_job_cleanly() {
    let mut scenario = Scenario::new(3, 6, 64 * MIB, Strategy::Fanout);
    scenario.sim.copy_failure_rate = 1.0;
    let report = runtime().block_on(run(&scenario));
    let Outcome::Failed(reason) = &report.outcome else {
        panic!("expected a failure, got {:?}", report.outcome)
    };
    assert!(reason.contains("gave up after 3 tries"), "{reason}");
    assert!(reason.contains("copy Failed"), "{reason}");
    assert!(
        report.destination_blobs.is_empty(),
        "{:?}",
        report.destination_blobs
    );
    assert!(report.stats.copies_failed >= 3);
    // The failed job leaves no copy in flight and no job running.
    let in_flight: Vec<&str> = report
        .metrics
        .lines()
        .filter(|l| l.starts_with("vhdrep_copies_in_flight{"))
        .collect();
    assert_eq!(in_flight.len(), 5, "{in_flight:?}");
    assert!(in_flight.iter().all(|l| l.ends_with(" 0")), "{in_flight:?}");
    assert!(report.metrics.contains("vhdrep_jobs{state=\"running\"} 0"));
    assert!(report
        .metrics
        .contains("vhdrep_jobs_finished_total{outcome=\"failed\"} 1"));
}

/// Transient errors and throttling are retried: the job completes, and the store
/// counted the faults it injected.
#[test]
fn transient_errors_and_throttling_are_survived() {
    let mut scenario = Scenario::new(8, 16, 64 * MIB, Strategy::Fanout);
    scenario.sim.transient_failure_rate = 0.1;
    // 20% of copies fail: some replicas need a second try, and three failures
    // in a row (0.8%) are rare enough for the seed to complete.
    scenario.sim.copy_failure_rate = 0.2;
    scenario.sim.requests_per_second = 3;
    scenario.sim.seed = 2;
    scenario.sim.retry_after = Some(Duration::from_secs(1));
    let report = runtime().block_on(run(&scenario));
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.error);
    assert_eq!(report.destination_blobs.len(), 16);
    assert!(report.stats.transient_failures > 0, "{:?}", report.stats);
    assert!(report.stats.throttled > 0, "{:?}", report.stats);
    assert!(report.stats.copies_failed > 0, "{:?}", report.stats);
    assert!(
        report.replicas.iter().any(|r| r.attempts > 1),
        "a failed copy was tried again"
    );
}

/// A source larger than Azure's 8 TiB page-blob limit is refused with the reason.
#[test]
fn a_source_over_8_tib_is_refused() {
    let scenario = Scenario::new(2, 2, 9 * 1024 * 1024 * MIB, Strategy::Fanout);
    let report = runtime().block_on(run(&scenario));
    let Outcome::Failed(reason) = &report.outcome else {
        panic!("expected a failure, got {:?}", report.outcome)
    };
    assert!(
        reason.contains("larger than the 8 TiB page-blob limit"),
        "{reason}"
    );
    assert!(report.destination_blobs.is_empty());
}

/// Destination accounts that Batch cannot read custom images from (premium, or
/// block-blob-only) fail the job before anything is copied.
#[test]
fn premium_and_block_blob_accounts_are_refused() {
    use vhd_replicator::storage::AccountInfo;
    for (sku, kind, expected) in [
        ("Premium_LRS", "StorageV2", "standard (not premium)"),
        (
            "Standard_LRS",
            "BlockBlobStorage",
            "general-purpose account",
        ),
    ] {
        let mut scenario = Scenario::new(2, 2, 64 * MIB, Strategy::Fanout);
        scenario.account_info = vec![(
            "dst2".into(),
            AccountInfo {
                sku: sku.into(),
                kind: kind.into(),
            },
        )];
        let report = runtime().block_on(run(&scenario));
        let Outcome::Failed(reason) = &report.outcome else {
            panic!("expected a failure, got {:?}", report.outcome)
        };
        assert!(
            reason.starts_with("account dst2:") && reason.contains(expected),
            "{reason}"
        );
        assert_eq!(report.stats.copies_started, 0);
    }
}

/// A job-document write that hangs while copies run (every attempt times out,
/// for the whole retry budget) does not stall the copies: they go on being
/// polled and started, the job ends as soon as without the hang, and the failed
/// write is counted. (Before, the write was awaited in place of the copy loop,
/// and its error dropped.)
#[test]
fn a_hung_checkpoint_write_does_not_stall_the_copies() {
    use vhd_replicator::storage::sim::{SimFault, SimFaultAction};
    let scenario = Scenario::new(2, 4, 4096 * MIB, Strategy::Fanout);
    let clean = runtime().block_on(run(&scenario));
    assert_eq!(clean.outcome, Outcome::Completed, "{:?}", clean.error);
    let mut hung = scenario.clone();
    hung.faults = vec![SimFault {
        operation: "put_blob",
        target_contains: "jobs/sim".into(),
        action: SimFaultAction::Hang,
        // Every attempt of one write: 30 s each, the fourth ends past the
        // policy's 120 s budget.
        times: 4,
        // Early in the copies (one cross-account seed alone takes over a minute).
        from: Duration::from_secs(5),
    }];
    let report = runtime().block_on(run(&hung));
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.error);
    assert!(
        report.makespan < clean.makespan + Duration::from_secs(10),
        "hung write stalled the copies: {:?} vs {:?} without it",
        report.makespan,
        clean.makespan
    );
    assert!(
        clean.makespan > Duration::from_secs(120),
        "the copies outlast the hung write's retry budget: {:?}",
        clean.makespan
    );
    assert!(
        report
            .metrics
            .contains("vhdrep_checkpoint_failures_total 1"),
        "the failed write is counted:\n{}",
        report
            .metrics
            .lines()
            .filter(|l| l.contains("checkpoint"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
