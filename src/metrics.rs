//! Every metric of the product contract, in one place (prefix `vhdrep_`, base
//! units, bounded labels).

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every value of `vhdrep_storage_retries_total`'s `reason` label.
pub(crate) const RETRY_REASONS: [&str; 3] = ["throttled", "timeout", "transient"];

/// Buckets of `vhdrep_copy_duration_seconds`: from a same-account copy's
/// fraction of a second to a 127 GiB cross-account copy's hours.
const COPY_DURATION_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// The daemon's metrics and the registry that exports them.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `vhdrep_jobs{state}`: jobs this instance knows in each state.
    pub jobs: IntGaugeVec,
    /// `vhdrep_jobs_finished_total{outcome}`.
    pub jobs_finished: IntCounterVec,
    /// `vhdrep_replicas_finished_total{outcome}`.
    pub replicas_finished: IntCounterVec,
    /// `vhdrep_copies_in_flight{account}`.
    pub copies_in_flight: IntGaugeVec,
    /// `vhdrep_copy_bytes_total{account}`: bytes of finished copies into each account.
    pub copy_bytes: IntCounterVec,
    /// `vhdrep_copy_duration_seconds{kind}`.
    pub copy_duration: HistogramVec,
    /// `vhdrep_job_progress_ratio{job_id}` of active jobs.
    pub job_progress: GaugeVec,
    /// `vhdrep_gallery_replication_ratio{job_id}` of active jobs that publish.
    pub gallery_replication: GaugeVec,
    /// `vhdrep_gallery_replication_stalled{job_id}`: 1 while an active job's
    /// gallery replication has made no progress for `gallery.stall_minutes`.
    pub gallery_stalled: GaugeVec,
    /// `vhdrep_storage_requests_total{account,operation,status_class}`.
    pub storage_requests: IntCounterVec,
    /// `vhdrep_storage_throttled_total{account}`.
    pub storage_throttled: IntCounterVec,
    /// `vhdrep_storage_retries_total{account,reason}`.
    pub storage_retries: IntCounterVec,
    /// `vhdrep_queue_poisoned_total`.
    pub queue_poisoned: IntCounter,
    /// `vhdrep_checkpoint_failures_total`: job document writes that failed while
    /// copies went on.
    pub checkpoint_failures: IntCounter,
    /// `vhdrep_runs_lost_total`: runs that found their job held by another run
    /// and stopped touching storage.
    pub runs_lost: IntCounter,
    /// `vhdrep_duplicate_deliveries_total`: intake messages of a job this
    /// instance already runs, dropped without a second run.
    pub duplicate_deliveries: IntCounter,
    /// The pool stage's gauges.
    pub pools: PoolGauges,
    /// `vhdrep_build_info{version}`.
    pub build_info: GaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `vhdrep_copy_duration_seconds{kind}`, with buckets from seconds to days.
fn copy_duration_histogram() -> prometheus::Result<HistogramVec> {
    HistogramVec::new(
        HistogramOpts::new(
            "vhdrep_copy_duration_seconds",
            "Time from starting a copy to its verified end.",
        )
        .buckets(COPY_DURATION_BUCKETS.to_vec()),
        &["kind"],
    )
}

/// The pool stage's gauges, label `pool`.
#[derive(Clone)]
pub struct PoolGauges {
    /// `vhdrep_pool_target_nodes`: a staged or watched pool's target dedicated nodes.
    pub target: IntGaugeVec,
    /// `vhdrep_pool_current_nodes`: its current dedicated nodes.
    pub current: IntGaugeVec,
    /// `vhdrep_pool_image_capacity_nodes`: the nodes its image serves
    /// (gallery replicas x `gallery.nodes_per_replica`).
    pub capacity: IntGaugeVec,
}

impl PoolGauges {
    fn new(r: &Registry) -> Self {
        let gauge = |name: &str, help: &str| {
            register(r, IntGaugeVec::new(Opts::new(name, help), &["pool"]))
        };
        Self {
            target: gauge(
                "vhdrep_pool_target_nodes",
                "Target dedicated nodes of a pool the pool stage made or watches.",
            ),
            current: gauge(
                "vhdrep_pool_current_nodes",
                "Current dedicated nodes of a pool the pool stage made or watches.",
            ),
            capacity: gauge(
                "vhdrep_pool_image_capacity_nodes",
                "Nodes a pool's image serves: gallery replicas x gallery.nodes_per_replica.",
            ),
        }
    }
}

/// How a job or a replica ended: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Completed.
    Completed,
    /// Failed with a reason.
    Failed,
    /// Cancelled on request.
    Cancelled,
}

impl Ended {
    const ALL: [Ended; 3] = [Ended::Completed, Ended::Failed, Ended::Cancelled];

    fn label(self) -> &'static str {
        match self {
            Ended::Completed => "completed",
            Ended::Failed => "failed",
            Ended::Cancelled => "cancelled",
        }
    }
}

/// Where the jobs counted by `vhdrep_jobs` are: the `state` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobsGauge {
    /// Waiting in the intake queue.
    Queued,
    /// Running on this instance.
    Running,
}

impl JobsGauge {
    const ALL: [JobsGauge; 2] = [JobsGauge::Queued, JobsGauge::Running];

    fn label(self) -> &'static str {
        match self {
            JobsGauge::Queued => "queued",
            JobsGauge::Running => "running",
        }
    }
}

/// Where a copy went: the `kind` label of `vhdrep_copy_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyKind {
    /// Into another account than its source's.
    CrossAccount,
    /// Inside its source's account.
    SameAccount,
}

impl CopyKind {
    const ALL: [CopyKind; 2] = [CopyKind::CrossAccount, CopyKind::SameAccount];

    fn label(self) -> &'static str {
        match self {
            CopyKind::CrossAccount => "cross_account",
            CopyKind::SameAccount => "same_account",
        }
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let r = Registry::new();
        let counters = |name: &str, help: &str, labels: &[&str]| {
            register(&r, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            register(&r, IntGaugeVec::new(Opts::new(name, help), labels))
        };
        let counter = |name: &str, help: &str| register(&r, IntCounter::new(name, help));
        let ratios = |name: &str, help: &str| {
            register(&r, GaugeVec::new(Opts::new(name, help), &["job_id"]))
        };
        let m = Self {
            jobs: gauges(
                "vhdrep_jobs",
                "Jobs known to this instance, by state.",
                &["state"],
            ),
            jobs_finished: counters(
                "vhdrep_jobs_finished_total",
                "Jobs that ended, by outcome.",
                &["outcome"],
            ),
            replicas_finished: counters(
                "vhdrep_replicas_finished_total",
                "Replicas that ended, by outcome.",
                &["outcome"],
            ),
            copies_in_flight: gauges(
                "vhdrep_copies_in_flight",
                "Server-side copies running, by destination account.",
                &["account"],
            ),
            copy_bytes: counters(
                "vhdrep_copy_bytes_total",
                "Bytes copied into each destination account.",
                &["account"],
            ),
            copy_duration: register(&r, copy_duration_histogram()),
            job_progress: ratios(
                "vhdrep_job_progress_ratio",
                "Share of an active job's bytes copied (0 to 1).",
            ),
            gallery_stalled: ratios(
                "vhdrep_gallery_replication_stalled",
                "1 while an active job's gallery replication makes no progress for gallery.stall_minutes.",
            ),
            gallery_replication: ratios(
                "vhdrep_gallery_replication_ratio",
                "Replication progress of the gallery image version an active job publishes (0 to 1).",
            ),
            storage_requests: counters(
                "vhdrep_storage_requests_total",
                "Storage requests, by account, operation and status class.",
                &["account", "operation", "status_class"],
            ),
            storage_throttled: counters(
                "vhdrep_storage_throttled_total",
                "Storage requests answered with throttling.",
                &["account"],
            ),
            storage_retries: counters(
                "vhdrep_storage_retries_total",
                "Storage requests retried, by reason.",
                &["account", "reason"],
            ),
            queue_poisoned: counter(
                "vhdrep_queue_poisoned_total",
                "Intake messages moved to the poison queue.",
            ),
            checkpoint_failures: counter(
                "vhdrep_checkpoint_failures_total",
                "Checkpoint writes of running jobs that failed (tried again at the next tick).",
            ),
            runs_lost: counter(
                "vhdrep_runs_lost_total",
                "Job runs that found their job held by another run and stopped.",
            ),
            duplicate_deliveries: counter(
                "vhdrep_duplicate_deliveries_total",
                "Intake messages of a job already running on this instance, dropped.",
            ),
            pools: PoolGauges::new(&r),
            build_info: register(
                &r,
                GaugeVec::new(
                    Opts::new("vhdrep_build_info", "Build information; always 1."),
                    &["version"],
                ),
            ),
            registry: r.clone(),
        };
        m.set_initial_values();
        m
    }

    /// The build, and the series every instance has from the start.
    fn set_initial_values(&self) {
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        for outcome in Ended::ALL {
            self.jobs_finished
                .with_label_values(&[outcome.label()])
                .reset();
        }
        for state in JobsGauge::ALL {
            self.jobs.with_label_values(&[state.label()]).set(0);
        }
    }

    /// Exports every series whose labels are known from the configuration at
    /// zero, so `rate()` and alerts see them before the first event: per account
    /// the copy gauges and counters, throttles and each retry reason; each
    /// replica outcome; each copy kind.
    pub(crate) fn export_known_series<'a>(&self, accounts: impl IntoIterator<Item = &'a str>) {
        for account in accounts {
            self.copies_in_flight.with_label_values(&[account]).add(0);
            self.copy_bytes.with_label_values(&[account]).inc_by(0);
            self.storage_throttled
                .with_label_values(&[account])
                .inc_by(0);
            for reason in RETRY_REASONS {
                self.storage_retries
                    .with_label_values(&[account, reason])
                    .inc_by(0);
            }
        }
        for outcome in Ended::ALL {
            self.replicas_finished
                .with_label_values(&[outcome.label()])
                .inc_by(0);
        }
        for kind in CopyKind::ALL {
            let _ = self.copy_duration.with_label_values(&[kind.label()]);
        }
    }

    /// A pool's target and current dedicated nodes, as Batch last said.
    pub(crate) fn pool_nodes(&self, pool: &str, target: u32, current: u32) {
        self.pools
            .target
            .with_label_values(&[pool])
            .set(i64::from(target));
        self.pools
            .current
            .with_label_values(&[pool])
            .set(i64::from(current));
    }

    /// The nodes a pool's image serves.
    pub(crate) fn pool_capacity(&self, pool: &str, nodes: u32) {
        self.pools
            .capacity
            .with_label_values(&[pool])
            .set(i64::from(nodes));
    }

    /// A job ended so.
    pub(crate) fn job_ended(&self, how: Ended) {
        self.jobs_finished.with_label_values(&[how.label()]).inc();
    }

    /// A replica ended so.
    pub(crate) fn replica_ended(&self, how: Ended) {
        self.replicas_finished
            .with_label_values(&[how.label()])
            .inc();
    }

    /// The gauge of jobs in `state`.
    pub(crate) fn jobs_gauge(&self, state: JobsGauge) -> prometheus::IntGauge {
        self.jobs.with_label_values(&[state.label()])
    }

    /// A copy of `kind` took `secs`.
    pub(crate) fn copy_took(&self, kind: CopyKind, secs: f64) {
        self.copy_duration
            .with_label_values(&[kind.label()])
            .observe(secs);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }

    /// Records one storage request's outcome.
    pub fn storage_request(&self, account: &str, operation: &str, status: Option<u16>) {
        let class = match status {
            Some(s) if s < 300 => "2xx",
            Some(s) if s < 400 => "3xx",
            Some(s) if s < 500 => "4xx",
            Some(_) => "5xx",
            None => "error",
        };
        self.storage_requests
            .with_label_values(&[account, operation, class])
            .inc();
        if matches!(status, Some(429) | Some(503)) {
            self.storage_throttled.with_label_values(&[account]).inc();
        }
    }
}

/// A metric built from its (static, valid) options and registered.
fn register<C>(registry: &Registry, metric: prometheus::Result<C>) -> C
where
    C: prometheus::core::Collector + Clone + 'static,
{
    let metric = metric.expect("metric options are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

/// A gauge raised while the guard lives: lowered again however the holder ends
/// (returned early, failed, or its future dropped), so it cannot leak.
#[derive(Debug)]
pub(crate) struct GaugeGuard(prometheus::IntGauge);

impl GaugeGuard {
    /// Raises `gauge` by one until the guard is dropped.
    pub(crate) fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_contract_names() {
        let m = Metrics::new();
        m.copies_in_flight.with_label_values(&["dst1"]).set(2);
        m.copy_bytes.with_label_values(&["dst1"]).inc_by(512);
        m.job_progress.with_label_values(&["j1"]).set(0.5);
        m.storage_request("dst1", "start_copy", Some(503));
        m.copy_duration
            .with_label_values(&["cross_account"])
            .observe(1.0);
        m.replicas_finished.with_label_values(&["completed"]).inc();
        m.storage_retries
            .with_label_values(&["dst1", "throttled"])
            .inc();
        m.queue_poisoned.inc();
        m.export_known_series(["dst2"]);
        let text = m.render();
        for name in [
            "vhdrep_copies_in_flight{account=\"dst2\"} 0",
            "vhdrep_copy_bytes_total{account=\"dst2\"} 0",
            "vhdrep_storage_throttled_total{account=\"dst2\"} 0",
            "vhdrep_storage_retries_total{account=\"dst2\",reason=\"timeout\"} 0",
            "vhdrep_replicas_finished_total{outcome=\"failed\"} 0",
            "vhdrep_copy_duration_seconds_count{kind=\"same_account\"} 0",
            "vhdrep_checkpoint_failures_total 0",
            "vhdrep_runs_lost_total 0",
            "vhdrep_duplicate_deliveries_total 0",
            "vhdrep_jobs{state=\"queued\"} 0",
            "vhdrep_jobs_finished_total",
            "vhdrep_replicas_finished_total",
            "vhdrep_copies_in_flight{account=\"dst1\"} 2",
            "vhdrep_copy_bytes_total{account=\"dst1\"} 512",
            "vhdrep_copy_duration_seconds_bucket",
            "vhdrep_job_progress_ratio{job_id=\"j1\"} 0.5",
            "vhdrep_storage_requests_total{account=\"dst1\",operation=\"start_copy\",status_class=\"5xx\"} 1",
            "vhdrep_storage_throttled_total{account=\"dst1\"} 1",
            "vhdrep_storage_retries_total",
            "vhdrep_queue_poisoned_total 1",
            "vhdrep_build_info{version=",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
