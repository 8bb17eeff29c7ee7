//! The command line (see CONTRACT.md). Exit codes: 0 success, 1 the job failed or
//! was cancelled (or an operation failed), 2 usage or configuration error.

use crate::api::job_view;
use crate::config::{ConfigError, ProcessSecrets, Settings, ValidatedSettings, DEFAULT_CONFIG};
use crate::job::{parse_job_json, JobSpec, Os, PoolSpec};
use crate::metrics::Metrics;
use crate::state::{JobDocument, JobState};
use crate::{control::Control, daemon::run_daemon};
use clap::{Args, Parser, Subcommand};
use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// Exit code: the job failed, was cancelled, or the operation failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage or configuration.
pub const EXIT_USAGE: u8 = 2;

/// Replicates a custom VHD into the identical copies an Azure Batch pool needs.
///
/// Exit codes: 0 success; 1 the job failed or was cancelled, or the operation
/// failed; 2 usage or configuration error.
#[derive(Debug, Parser)]
#[command(name = "vhd-replicator", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// Configuration file (TOML); VHDREP__SECTION__KEY variables override it.
    #[arg(long, default_value = DEFAULT_CONFIG, global = true)]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM or SIGINT.
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Put a job on the intake queue and print its id.
    Submit {
        #[command(flatten)]
        config: ConfigArg,
        /// The job as JSON (see CONTRACT.md); instead of --source, --os, --nodes, --pool-id.
        #[arg(long, conflicts_with_all = ["source", "os", "nodes", "pool_id"])]
        file: Option<PathBuf>,
        #[command(flatten)]
        job: JobArgs,
        /// Pool id.
        #[arg(long)]
        pool_id: Option<String>,
        /// Job id (idempotency key); generated when absent.
        #[arg(long, conflicts_with = "file")]
        job_id: Option<String>,
        /// Follow the job (progress bars on a terminal); exit 0 only if it completes.
        #[arg(long)]
        wait: bool,
        /// With --wait: print a JSON job view per change instead of bars.
        #[arg(long, requires = "wait")]
        json: bool,
    },
    /// Show jobs, or one job.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// The job to show; all jobs when absent.
        job_id: Option<String>,
        /// Follow the job until it ends: progress bars per job and replica on a
        /// terminal, one line per change otherwise (JSON lines with --json).
        #[arg(long)]
        watch: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Show a pool's image set instead of jobs.
        #[arg(long, conflicts_with_all = ["job_id", "watch"])]
        pool: Option<String>,
    },
    /// Ask for a job to be cancelled (its copies are aborted).
    Cancel {
        #[command(flatten)]
        config: ConfigArg,
        /// The job.
        job_id: String,
    },
    /// Dry run: how many replicas, where, and their names. Writes nothing.
    Plan {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        job: JobArgs,
        /// Pool id used in the names.
        #[arg(long, default_value = "pool")]
        pool_id: String,
        /// Job id used in the names.
        #[arg(long, default_value = "dry-run")]
        job_id: String,
    },
    /// Delete a pool's image sets (replicas and snapshots made for it, nothing else).
    Retire {
        #[command(flatten)]
        config: ConfigArg,
        /// The pool.
        #[arg(long)]
        pool: String,
        /// List what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Follow the retire job until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Remove replicas and snapshots this daemon made that nothing needs any more
    /// (their job failed, was cancelled or is gone, and no pool's image set holds
    /// them) and that are older than the minimum age.
    Gc {
        #[command(flatten)]
        config: ConfigArg,
        /// List the orphans; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep orphans younger than this (default: gc.min_age_hours).
        #[arg(long)]
        min_age_hours: Option<u64>,
    },
    /// Upload a small fixed VHD test image (patterned data, then zeroes, then a
    /// valid footer) as a page blob, to try a deployment end to end.
    SampleVhd {
        #[command(flatten)]
        config: ConfigArg,
        /// Blob URL in a configured account.
        #[arg(long)]
        url: String,
        /// Virtual size in MiB.
        #[arg(long, default_value_t = 16)]
        size_mib: u64,
        /// MiB of non-zero data at the start (the rest stays sparse).
        #[arg(long, default_value_t = 4)]
        data_mib: u64,
    },
    /// Check the configuration; with --online, also each account.
    Validate {
        #[command(flatten)]
        config: ConfigArg,
        /// Also reach every account (Get Account Information) and the control queues.
        #[arg(long)]
        online: bool,
    },
}

#[derive(Debug, Args)]
struct JobArgs {
    /// Source VHD blob URL.
    #[arg(long)]
    source: Option<String>,
    /// Node OS.
    #[arg(long, value_enum)]
    os: Option<Os>,
    /// Nodes of the pool.
    #[arg(long)]
    nodes: Option<u32>,
    /// VM size for the add-pool body.
    #[arg(long)]
    vm_size: Option<String>,
    /// Replicas (default: one per 20 Windows or 40 Linux nodes).
    #[arg(long)]
    replicas: Option<u32>,
    /// Destination accounts, comma-separated (default: every destination account).
    #[arg(long, value_delimiter = ',')]
    accounts: Option<Vec<String>>,
}

impl JobArgs {
    /// The job these flags describe, or which flag is missing.
    fn spec(&self, pool_id: Option<String>, job_id: Option<String>) -> Result<JobSpec, String> {
        let missing =
            |flag: &str| format!("{flag} is required (or give the whole job with --file)");
        Ok(JobSpec {
            job_id,
            source: self.source.clone().ok_or_else(|| missing("--source"))?,
            pool: PoolSpec {
                id: pool_id.ok_or_else(|| missing("--pool-id"))?,
                os: self.os.ok_or_else(|| missing("--os"))?,
                nodes: self.nodes.ok_or_else(|| missing("--nodes"))?,
                vm_size: self.vm_size.clone(),
                node_agent_sku_id: None,
                caching: None,
            },
            replicas: self.replicas,
            accounts: self.accounts.clone(),
            container: None,
        })
    }
}

fn load(path: &std::path::Path) -> Result<ValidatedSettings, ConfigError> {
    Settings::load(path)?.validate(&ProcessSecrets)
}

/// Settings the daemon may run with (`run` and `validate`).
fn load_daemon(path: &std::path::Path) -> Result<ValidatedSettings, ConfigError> {
    let settings = load(path)?;
    settings.check_daemon()?;
    Ok(settings)
}

fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn failed(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_FAILED)
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(dispatch(cli.command))
}

fn connect(settings: ValidatedSettings) -> Result<Control, ExitCode> {
    Control::azure(Arc::new(settings), Metrics::new()).map_err(failed)
}

/// Loads and validates the configuration, then builds the clients.
fn control_for(path: &std::path::Path) -> Result<Control, ExitCode> {
    connect(load(path).map_err(usage_error)?)
}

async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Validate { config, online } => validate(&config.config, online).await,
        Command::Gc {
            config,
            dry_run,
            min_age_hours,
        } => {
            let settings = match load(&config.config) {
                Ok(s) => s,
                Err(e) => return usage_error(e),
            };
            let min_age =
                time::Duration::hours(min_age_hours.unwrap_or(settings.gc.min_age_hours) as i64);
            let control = match connect(settings) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match crate::gc::collect(&control, min_age, dry_run).await {
                Ok(r) => {
                    let verb = if dry_run { "would remove" } else { "removed" };
                    println!(
                        "{verb} {} orphans; kept {} younger than {} h; {} blobs still needed",
                        r.orphans.len(),
                        r.young.len(),
                        min_age.whole_hours(),
                        r.needed
                    );
                    for b in &r.orphans {
                        println!("  {b}");
                    }
                    println!(
                        "{verb} the documents of {} jobs finished more than {} days ago",
                        r.pruned_jobs.len(),
                        control.settings.gc.job_retention_days
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => failed(e),
            }
        }
        Command::Retire {
            config,
            pool,
            dry_run,
            wait,
        } => {
            let control = match control_for(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if dry_run {
                let record = match control.state.load_pool(&pool).await {
                    Ok(Some((r, _))) => r,
                    Ok(None) => {
                        println!("pool {pool}: nothing to retire");
                        return ExitCode::SUCCESS;
                    }
                    Err(e) => return failed(e),
                };
                return match crate::engine::retire_plan(
                    control.store.as_ref(),
                    &record,
                    &pool,
                    &crate::plan::owner_tag(&control.settings),
                )
                .await
                {
                    Ok(plan) if plan.is_empty() => {
                        println!("pool {pool}: nothing to retire");
                        ExitCode::SUCCESS
                    }
                    Ok(plan) => {
                        println!("pool {pool}: retiring would delete {} blobs:", plan.len());
                        for b in plan {
                            println!("  {b}");
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => failed(e),
                };
            }
            match control.submit_retire(&pool, None).await {
                Ok(s) => {
                    println!("{}", s.job_id);
                    if wait {
                        follow(&control, &s.job_id, Display::Lines).await
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(crate::control::SubmitError::Invalid(e)) => usage_error(e),
                Err(e) => failed(e),
            }
        }
        Command::SampleVhd {
            config,
            url,
            size_mib,
            data_mib,
        } => {
            let settings = match load(&config.config) {
                Ok(s) => s,
                Err(e) => return usage_error(e),
            };
            let blob = match crate::job::locate_source(&url, &settings) {
                Ok(b) => b,
                Err(e) => return usage_error(e),
            };
            if size_mib == 0 {
                return usage_error("--size-mib must be at least 1");
            }
            let control = match connect(settings) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let image = crate::vhd::sample_image(size_mib, data_mib, 42);
            let len = image.len();
            let result = async {
                control
                    .store
                    .ensure_container(&blob.account, &blob.container)
                    .await?;
                control
                    .store
                    .put_page_blob(&blob, bytes::Bytes::from(image))
                    .await
            }
            .await;
            match result {
                Ok(()) => {
                    println!("uploaded a fixed VHD of {len} bytes to {url}");
                    ExitCode::SUCCESS
                }
                Err(e) => failed(e),
            }
        }
        Command::Run { config } => {
            let settings = match load_daemon(&config.config) {
                Ok(s) => s,
                Err(e) => return usage_error(e),
            };
            crate::telemetry::init(settings.log_json);
            let listen = settings.listen;
            let control = match connect(settings) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let listener = match tokio::net::TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(e) => {
                    return usage_error(format!("service.listen: cannot listen on {listen}: {e}"))
                }
            };
            let stop = CancellationToken::new();
            tokio::spawn(shutdown_signal(stop.clone()));
            match run_daemon(control, listener, stop).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => failed(format!("{e:#}")),
            }
        }
        Command::Submit {
            config,
            file,
            job,
            pool_id,
            job_id,
            wait,
            json,
        } => {
            crate::telemetry::init(false);
            let settings = match load(&config.config) {
                Ok(s) => s,
                Err(e) => return usage_error(e),
            };
            let spec = match file {
                Some(path) => match std::fs::read_to_string(&path) {
                    Ok(text) => match parse_job_json(&text) {
                        Ok(s) => s,
                        Err(e) => return usage_error(format!("{}: {e}", path.display())),
                    },
                    Err(e) => return usage_error(format!("cannot read {}: {e}", path.display())),
                },
                None => match job.spec(pool_id, job_id) {
                    Ok(s) => s,
                    Err(e) => return usage_error(e),
                },
            };
            let control = match connect(settings) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Err(e) = control.ensure().await {
                return failed(e);
            }
            let submitted = match control.submit(spec).await {
                Ok(s) => s,
                Err(crate::control::SubmitError::Invalid(e)) => return usage_error(e),
                Err(e) => return failed(e),
            };
            println!("{}", submitted.job_id);
            if !submitted.created {
                eprintln!(
                    "note: job {} was submitted before; nothing new was queued",
                    submitted.job_id
                );
            }
            if wait {
                follow(&control, &submitted.job_id, Display::pick(json)).await
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Status {
            config,
            job_id,
            watch,
            json,
            pool,
        } => {
            let control = match control_for(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Some(pool) = pool {
                return match control.state.load_pool(&pool).await {
                    Ok(Some((r, _))) => {
                        if json {
                            println!(
                                "{}",
                                serde_json::to_string_pretty(&crate::api::pool_view(&r)).unwrap()
                            );
                        } else {
                            for (i, set) in r.sets.iter().enumerate() {
                                let current = if i + 1 == r.sets.len() {
                                    " (current)"
                                } else {
                                    ""
                                };
                                println!(
                                    "image set {i}{current}: {} @ {}, {} replicas, created {}",
                                    set.source,
                                    set.source_snapshot,
                                    set.replicas.len(),
                                    set.created_at.date()
                                );
                                for x in &set.replicas {
                                    println!("  {:<12} {}", x.account, x.uri);
                                }
                            }
                        }
                        ExitCode::SUCCESS
                    }
                    Ok(None) => failed(format!("no image set for pool {pool}")),
                    Err(e) => failed(e),
                };
            }
            match job_id {
                Some(id) if watch => follow(&control, &id, Display::pick(json)).await,
                Some(id) => match control.state.load(&id).await {
                    Ok(Some((d, _))) => {
                        print_job(&d, json);
                        ExitCode::SUCCESS
                    }
                    Ok(None) => failed(format!("no job {id}")),
                    Err(e) => failed(e),
                },
                None => match control.state.list().await {
                    Ok(listing) => {
                        for s in &listing.skipped {
                            eprintln!("skipped {}: {}", s.name, s.error);
                        }
                        let docs = listing.jobs;
                        if json {
                            let views: Vec<_> = docs.iter().map(crate::api::summary_view).collect();
                            println!(
                                "{}",
                                serde_json::to_string_pretty(&serde_json::json!({ "jobs": views }))
                                    .unwrap()
                            );
                        } else if docs.is_empty() {
                            println!("no jobs");
                        } else {
                            for d in &docs {
                                println!("{}", summary_line(d));
                            }
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => failed(e),
                },
            }
        }
        Command::Cancel { config, job_id } => {
            let control = match control_for(&config.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match control.cancel(&job_id).await {
                Ok(d) if d.state().is_terminal() => {
                    println!("job {job_id} has already ended: {}", d.state().as_str());
                    ExitCode::SUCCESS
                }
                Ok(_) => {
                    println!("cancel requested for job {job_id}");
                    ExitCode::SUCCESS
                }
                Err(crate::state::StateError::NotFound(_)) => failed(format!("no job {job_id}")),
                Err(e) => failed(e),
            }
        }
        Command::Plan {
            config,
            job,
            pool_id,
            job_id,
        } => {
            let settings = match load(&config.config) {
                Ok(s) => s,
                Err(e) => return usage_error(e),
            };
            let spec = match job.spec(Some(pool_id), Some(job_id)) {
                Ok(s) => s,
                Err(e) => return usage_error(e),
            };
            let validated = match spec.validate(&settings) {
                Ok(v) => v,
                Err(e) => return usage_error(e),
            };
            let control = match connect(settings) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let (plan, note) = match control.engine().preview(&validated).await {
                Ok(p) => p,
                Err(e) => return failed(e),
            };
            println!(
                "{} replicas for {} {} nodes from {}",
                validated.replicas,
                validated.spec.pool.nodes,
                validated.spec.pool.os,
                validated.spec.source
            );
            if let Some(note) = note {
                println!("{note}");
            }
            for (account, n) in plan.per_account() {
                println!("  {account}: {n}");
            }
            for r in &plan.replicas {
                println!(
                    "  [{}] {}/{}/{}{}",
                    r.index,
                    r.blob.account,
                    r.blob.container,
                    r.blob.name,
                    if r.kept { " (kept)" } else { "" }
                );
            }
            for b in &plan.surplus {
                println!("  surplus, deleted: {b}");
            }
            ExitCode::SUCCESS
        }
    }
}

async fn validate(path: &std::path::Path, online: bool) -> ExitCode {
    let settings = match load_daemon(path) {
        Ok(s) => s,
        Err(e) => return usage_error(e),
    };
    println!(
        "{}: configuration is valid ({} accounts, {} destinations)",
        path.display(),
        settings.accounts.len(),
        settings.destination_accounts().len()
    );
    if !online {
        return ExitCode::SUCCESS;
    }
    let control = match connect(settings) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut bad = 0;
    for a in &control.settings.accounts {
        match control.store.account_info(&a.name).await {
            Ok(info) => {
                let verdict = if a.destination {
                    info.suits_batch_images().err()
                } else {
                    None
                };
                match verdict {
                    None => println!("  {}: reachable, {} {}", a.name, info.sku, info.kind),
                    Some(why) => {
                        bad += 1;
                        println!("  {}: NOT USABLE as a destination: {why}", a.name);
                    }
                }
            }
            Err(e) => {
                bad += 1;
                println!(
                    "  NOT REACHABLE: {}",
                    crate::storage::account_info_problem(&a.name, &e)
                );
            }
        }
    }
    if bad > 0 {
        ExitCode::from(EXIT_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

fn summary_line(s: &crate::state::JobSummary) -> String {
    format!(
        "{:<40} {:<10} {:<12} {:>3}% {}/{} replicas{}",
        s.job_id,
        s.state.as_str(),
        s.phase.map(|p| p.as_str()).unwrap_or("-"),
        (s.progress() * 100.0).round(),
        s.verified,
        s.replicas,
        s.error
            .as_ref()
            .map(|e| format!("  error: {e}"))
            .unwrap_or_default()
    )
}

fn print_job(d: &JobDocument, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(&job_view(d)).unwrap());
        return;
    }
    println!("{}", summary_line(&crate::state::JobSummary::of(d)));
    for r in &d.replicas {
        println!(
            "  [{:>3}] {:<12} {:<10} {:>6.1}% {}",
            r.index,
            r.account,
            format!("{:?}", r.state).to_lowercase(),
            if r.bytes_total == 0 {
                0.0
            } else {
                r.bytes_copied as f64 * 100.0 / r.bytes_total as f64
            },
            r.uri
        );
    }
}

/// How `follow` shows a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Display {
    /// Progress bars on a terminal (stderr).
    Bars,
    /// One summary line per change (pipes, logs).
    Lines,
    /// One JSON job view per change (scripts).
    Json,
}

impl Display {
    fn pick(json: bool) -> Self {
        use std::io::IsTerminal;
        if json {
            Display::Json
        } else if std::io::stderr().is_terminal() {
            Display::Bars
        } else {
            Display::Lines
        }
    }
}

/// Live progress bars: one for the job, one per replica.
struct Bars {
    multi: indicatif::MultiProgress,
    job: indicatif::ProgressBar,
    replicas: Vec<indicatif::ProgressBar>,
}

impl Bars {
    fn new() -> Self {
        let multi = indicatif::MultiProgress::new();
        let job = multi.add(indicatif::ProgressBar::new(1));
        job.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix:.bold} {bar:40.cyan/blue} {percent:>3}% {bytes}/{total_bytes} {msg}",
            )
            .expect("static template"),
        );
        Self {
            multi,
            job,
            replicas: Vec::new(),
        }
    }

    fn update(&mut self, d: &JobDocument) {
        let total: u64 = d.replicas.iter().map(|r| r.bytes_total).sum();
        let done: u64 = d
            .replicas
            .iter()
            .map(|r| r.bytes_copied.min(r.bytes_total))
            .sum();
        self.job.set_prefix("job");
        self.job.set_length(total.max(1));
        self.job.set_position(done);
        self.job.set_message(format!(
            "{}{}",
            d.state().as_str(),
            d.phase
                .map(|p| format!(" / {}", format!("{p:?}").to_lowercase()))
                .unwrap_or_default()
        ));
        while self.replicas.len() < d.replicas.len() {
            let bar = self.multi.add(indicatif::ProgressBar::new(1));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "  {prefix:>14} {bar:30.green/white} {percent:>3}% {msg}",
                )
                .expect("static template"),
            );
            self.replicas.push(bar);
        }
        for (bar, r) in self.replicas.iter().zip(&d.replicas) {
            bar.set_prefix(format!("[{}] {}", r.index, r.account));
            bar.set_length(r.bytes_total.max(1));
            bar.set_position(r.bytes_copied.min(r.bytes_total));
            bar.set_message(format!(
                "{}{}",
                format!("{:?}", r.state).to_lowercase(),
                r.error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
    }

    fn finish(&self) {
        for bar in &self.replicas {
            bar.finish();
        }
        self.job.finish();
    }
}

/// Shows progress until the job ends; exit 0 only if it completed.
async fn follow(control: &Control, id: &str, display: Display) -> ExitCode {
    let mut last = String::new();
    let mut bars = (display == Display::Bars).then(Bars::new);
    loop {
        match control.state.load(id).await {
            Ok(Some((d, _))) => {
                match (&mut bars, display) {
                    (Some(b), _) => b.update(&d),
                    (None, Display::Json) => {
                        let line = serde_json::to_string(&job_view(&d)).expect("views serialise");
                        if line != last {
                            println!("{line}");
                            last = line;
                        }
                    }
                    (None, _) => {
                        let line = summary_line(&crate::state::JobSummary::of(&d));
                        if line != last {
                            println!("{line}");
                            last = line;
                        }
                    }
                }
                if d.state().is_terminal() {
                    if let Some(b) = &bars {
                        b.finish();
                        println!("{}", summary_line(&crate::state::JobSummary::of(&d)));
                    }
                    return if d.state() == JobState::Completed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_FAILED)
                    };
                }
            }
            Ok(None) => {}
            Err(e) => eprintln!("warning: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn shutdown_signal(stop: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
    stop.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submit_flags_name_what_is_missing() {
        let cli = Cli::try_parse_from([
            "vhd-replicator",
            "submit",
            "--source",
            "http://x/c/b.vhd",
            "--os",
            "linux",
        ])
        .unwrap();
        let Command::Submit { job, pool_id, .. } = cli.command else {
            panic!("submit")
        };
        let err = job.spec(pool_id, None).unwrap_err();
        assert!(err.contains("--pool-id"), "{err}");
        assert!(Cli::try_parse_from([
            "vhd-replicator",
            "submit",
            "--file",
            "j.json",
            "--nodes",
            "3"
        ])
        .is_err());
    }
}
